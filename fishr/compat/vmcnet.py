"""vmcnet's ``get_fisher_inverse_fn`` / ``SRMode``, with its signature and contract, on :func:`fishr.sr_solve`.

``get_fisher_inverse_fn(log_psi_apply, mean_grad_fn, damping, maxiter, mode)``
returns ``precondition(energy_grad, params, positions) -> (S + damping I)^{-1} energy_grad``
with, for the ``n`` local samples (``J`` the per-sample gradients of ``log|psi|``,
``c(u) = u - mean_grad_fn(u)`` the user's centring)::

    LAZY :  S v = pmean( J^T c(J v) / n )         (one JVP and one VJP of log_psi_apply on the batch)
    DEBUG:  S v = pmean( c(J)^T c(J) v / n )      (J formed by vmap of grad over single samples)

i.e. vmcnet's ``(0.25 F + damping I)^{-1} grad_E``. Conventions kept from vmcnet:

* ``mean_grad_fn`` does the centring mean over the batch axis 0, *including* any
  ``pmean`` across devices (vmcnet passes its ``mean_all_local_devices``);
  fishr calls it instead of its own batch mean.
* The outer average ``pmean`` runs over the axis named ``"pmap"`` when that axis
  is bound (vmcnet's ``pmean_if_pmap``: inside ``jax.pmap(..., axis_name="pmap")``
  or a ``shard_map`` over a mesh axis ``"pmap"``), and is the identity otherwise.
* CG (:func:`fishr.linalg.cg`, as ``jax.scipy.sparse.linalg.cg``) starts from
  ``energy_grad``; relative tolerance ``1e-5``, absolute ``0``; ``maxiter=None`` is
  ``10 * number of parameters``.
* ``log_psi_apply(params, positions)`` returns the real ``log|psi|`` per sample,
  shape ``(n,)``. DEBUG evaluates it on batches of one sample (``positions[i][None]``,
  shape ``(1,)`` expected) where vmcnet passes the unbatched ``positions[i]``;
  any model that handles vmcnet's batches handles both.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fishr import distributed
from fishr._sr_solve import Mode, sr_solve
from fishr.solvers import CG

__all__ = ["PMAP_AXIS_NAME", "SRMode", "get_fisher_inverse_fn"]

PMAP_AXIS_NAME = "pmap"  # vmcnet's utils.distribute.PMAP_AXIS_NAME
_FISHR_MODES: dict[str, Mode] = {"LAZY": "lazy", "DEBUG": "dense"}


class SRMode(enum.Enum):
    """Modes for computing the preconditioning by the Fisher inverse during SR.

    LAZY composes JVP/VJP calls (memory-efficient); DEBUG forms the per-example
    Jacobian and uses matmuls.
    """

    LAZY = enum.auto()
    DEBUG = enum.auto()


def _fishr_mode(mode: Any) -> Mode:
    name = getattr(mode, "name", None)  # also vmcnet's own SRMode members
    if isinstance(mode, enum.Enum) and name in _FISHR_MODES:
        return _FISHR_MODES[name]
    raise ValueError(
        "Requested Fisher apply mode not supported; only {} are supported, "
        "but {} was requested.".format(", ".join(SRMode.__members__.keys()), mode)
    )


def _pmap_axis_if_bound() -> str | None:
    """``"pmap"`` inside a mapped axis of that name, else ``None`` (vmcnet's ``pmean_if_pmap`` test)."""
    try:
        distributed.device_count(PMAP_AXIS_NAME)
    except NameError:
        return None
    return PMAP_AXIS_NAME


def get_fisher_inverse_fn(
    log_psi_apply: Callable[[Any, jax.Array], jax.Array],
    mean_grad_fn: Callable[[jax.Array], jax.Array],
    damping: float = 0.001,
    maxiter: int | None = None,
    mode: SRMode = SRMode.LAZY,
) -> Callable[[Any, Any, jax.Array], Any]:
    """Get a Fisher-preconditioned update (vmcnet's signature; see the module docs).

    Args:
      log_psi_apply: ``(params, x) -> log|psi(x)|``, batched over ``x``'s axis 0.
      mean_grad_fn: ``local_grads -> mean`` over the batch axis 0 (with any pmean).
      damping: multiple of the identity added to ``0.25 F``.
      maxiter: maximum CG iterations; ``None`` is ``10 * number of params``.
      mode: ``SRMode.LAZY`` or ``SRMode.DEBUG``; anything else raises ``ValueError``.

    Returns:
      ``precondition_grad_with_fisher(energy_grad, params, positions)``, the
      preconditioned gradient with the structure of ``energy_grad``.

    The products run at JAX's precision setting, as vmcnet's do (``fishr.sr``'s default
    ``matmul_precision="highest"`` is not applied here), so that on GPUs too the result is
    vmcnet's.
    """
    fishr_mode = _fishr_mode(mode)
    solver = CG(rtol=1e-5, atol=0.0, max_steps=maxiter, initial_guess="rhs")

    def centring_mean(scores: jax.Array) -> jax.Array:
        # fishr's score rows carry a component axis, (n, 1) or (n, 1, P); vmcnet's are (n,) or (n, P)
        local = jnp.squeeze(scores, axis=1)
        mean = mean_grad_fn(local)
        if jnp.shape(mean) not in (local.shape[1:], (1,) + local.shape[1:]):
            raise ValueError(
                "get_fisher_inverse_fn: `mean_grad_fn` must average over the batch axis 0 only, mapping an "
                f"array of shape {local.shape} to shape {local.shape[1:]}; it returned shape {jnp.shape(mean)} "
                "(e.g. jnp.mean without axis=0)."
            )
        return jnp.reshape(mean, local.shape[1:])[None]

    def precondition_grad_with_fisher(energy_grad: Any, params: Any, positions: jax.Array) -> Any:
        x, _ = sr_solve(
            log_psi_apply, energy_grad, params, positions, damping=damping, mode=fishr_mode, solver=solver,
            axis_name=_pmap_axis_if_bound(), mean_fn=centring_mean,
            matmul_precision=None,  # vmcnet's products: JAX's setting (TF32 on recent GPUs), as the seed
        )
        return x

    return precondition_grad_with_fisher
