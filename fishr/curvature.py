r"""Exact curvature on the current batch, as Gram matrices ``M_ab = v_a^T C v_b``.

The adaptive pieces (:func:`fishr.quadratic_step`, :func:`fishr.trust_region`) need
the curvature ``C`` only on a few parameter-space vectors ``v_1 .. v_k`` (the
preconditioned direction and the previous update). Every ``C`` here factors as
``C = mean_i J_i^T H_i J_i`` over the global batch, with ``J_i`` the Jacobian of sample
``i``'s output, so ``M`` costs one linearisation of the model and ``k``
Jacobian-vector products (``jax.linearize`` + ``jax.vmap``; no vector-Jacobian
product, and ``C`` is never formed):

``M_ab = mean_i (J_i v_a)^H H_i (J_i v_b)``

* :func:`gauss_newton`: the generalised Gauss-Newton matrix of a likelihood's loss
  (``apply_fn(params, inputs)`` gives logits or means, ``batch = (inputs, labels)``):
  ``"gaussian"`` (loss ``1/2 |y - f|^2``): ``H_i = I``; ``"categorical"`` (loss
  ``-log softmax(f)[y]``): ``H_i = diag(p_i) - p_i p_i^T`` with ``p_i = softmax(f_i)``.
  For these likelihoods it equals the true Fisher that :func:`fishr.kfac` approximates.
* :func:`fisher`: the covariance of the score rows of ``apply_fn(params, batch) -> (n,)``
  (:func:`fishr.scores.log_psi_rows`): SR's ``S = Re mean_i conj(Obar_i)^T Obar_i`` with
  the rows centred over the global batch (``centred=True``, the default), or the
  uncentred ``mean_i O_i^T O_i`` (``centred=False``: the Fisher that :func:`fishr.kfac`
  with ``likelihood=None`` approximates). A complex ``log psi`` of real parameters
  stacks its real and imaginary rows; ``holomorphic=True`` takes complex tangents and
  returns the Hermitian form's real part.

Means over samples go through :func:`fishr.distributed.batch_mean` (``axis_name``), so
``M`` is the global one on every device.

A curvature is a function ``(params, batch, vectors) -> M`` with ``vectors`` a sequence
of ``k`` pytrees shaped like ``params`` and ``M`` a real ``(k, k)`` array; any function
with that signature can be passed where fishr asks for a curvature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from fishr import distributed
from fishr._validate import check_choice
from fishr.distributed import AxisName
from fishr.scores import log_psi_rows, split_batch

__all__ = ["GAUSS_NEWTON_LIKELIHOODS", "Curvature", "fisher", "gauss_newton", "tangent_outputs"]

Curvature = Callable[[Any, Any, Sequence[Any]], jax.Array]
GAUSS_NEWTON_LIKELIHOODS = ("gaussian", "categorical")


def tangent_outputs(fn: Callable[[Any], jax.Array], params: Any, vectors: Sequence[Any]) -> tuple[jax.Array, jax.Array]:
    """``(fn(params), stack_a J v_a)``: the output and its ``k`` directional derivatives, shape ``(k,) + out``.

    One linearisation and one vmapped Jacobian-vector product; ``vectors`` are cast to
    the dtypes of ``params``.
    """
    if len(vectors) == 0:
        raise ValueError("fishr.curvature: at least one vector is needed.")
    vectors = [jax.tree.map(lambda v, p: jnp.asarray(v, jnp.result_type(p)), v, params) for v in vectors]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *vectors)
    out, jvp = jax.linearize(fn, params)
    return out, jax.vmap(jvp)(stacked)


def _gram(u: jax.Array, weighted: jax.Array, axis_name: AxisName) -> jax.Array:
    """``M_ab = Re mean_i sum_rest conj(u_a,i) weighted_b,i`` for ``u``, ``weighted`` of shape ``(k, n, ...)``."""
    k, n = u.shape[:2]
    u = u.reshape(k, n, -1)
    weighted = weighted.reshape(k, n, -1)
    per_sample = jnp.einsum("anr,bnr->nab", jnp.conj(u), weighted).real
    return distributed.batch_mean(per_sample, axis_name)


def gauss_newton(
    apply_fn: Callable[[Any, Any], jax.Array],
    likelihood: Literal["gaussian", "categorical"],
    *,
    axis_name: AxisName = None,
) -> Curvature:
    """The Gauss-Newton curvature of a likelihood's mean loss (module docstring).

    Args:
      apply_fn: ``(params, inputs) -> outputs`` (means ``(n, ...)`` or logits ``(n, C)``).
      likelihood: ``"gaussian"`` or ``"categorical"``.
      axis_name: mapped axis name(s) when the batch is split over devices.

    Returns:
      ``curvature(params, batch, vectors) -> (k, k)``; ``batch = (inputs, labels)`` (the
      labels are not used: the Gauss-Newton matrix does not depend on them).
    """
    check_choice(likelihood, GAUSS_NEWTON_LIKELIHOODS, "fishr.curvature.gauss_newton", "likelihood")

    def curvature(params, batch, vectors):
        inputs, _ = split_batch(batch, likelihood, "fishr.curvature.gauss_newton")
        out, u = tangent_outputs(lambda p: apply_fn(p, inputs), params, vectors)
        if likelihood == "gaussian":
            return _gram(u, u, axis_name)
        if out.ndim != 2:
            raise ValueError(f"fishr.curvature.gauss_newton: categorical logits must be (n, C); got shape {out.shape}.")
        p = jax.nn.softmax(out, axis=-1)
        weighted = p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)
        return _gram(u, weighted, axis_name)

    return curvature


def fisher(
    apply_fn: Callable[[Any, Any], jax.Array],
    *,
    centred: bool = True,
    holomorphic: bool = False,
    axis_name: AxisName = None,
) -> Curvature:
    """The covariance (``centred=True``: SR's ``S``) or second moment of the score rows (module docstring).

    Args:
      apply_fn: ``(params, batch) -> (n,)`` per-sample scores (``log psi`` in VMC).
      centred: subtract the global batch mean of the rows (SR's ``S``); ``False`` for
        the uncentred Fisher.
      holomorphic: complex parameters with a holomorphic ``log psi``.
      axis_name: mapped axis name(s) when the batch is split over devices.
    """
    if not isinstance(centred, bool):
        raise ValueError(f"fishr.curvature.fisher: `centred` must be True or False, got {centred!r}.")

    def curvature(params, batch, vectors):
        rows = log_psi_rows(apply_fn, batch, holomorphic, "fishr.curvature.fisher")
        _, u = tangent_outputs(rows, params, vectors)  # (k, n, C)
        if centred:
            u = u - distributed.batch_mean(u, axis_name, axis=1, keepdims=True)
        return _gram(u, u, axis_name)

    return curvature
