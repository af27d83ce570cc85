r"""Per-sample scores whose gradients K-FAC's Fisher is built from.

K-FAC's ``F = E_i[g_i g_i^T]`` uses ``g_i = d s_i / d theta`` for a per-sample scalar
score ``s_i`` (the same object as SR's ``O_i``):

* ``likelihood=None``: ``apply_fn(params, batch)`` already returns the scores,
  shape ``(n,)``: ``log psi(x_i)`` in variational Monte Carlo (then ``F`` is, up to
  centring, SR's ``S``), or any per-example log-likelihood the user writes (with
  the data labels: the empirical Fisher).
* ``likelihood="categorical"``: ``apply_fn(params, x)`` returns logits ``(n, C)``,
  ``batch = (x, y)`` with integer labels ``y`` ``(n,)``, and
  ``s_i = log softmax(logits_i)[y~_i]``.
* ``likelihood="gaussian"``: ``apply_fn(params, x)`` returns means ``mu`` ``(n, ...)``,
  ``batch = (x, y)``, unit variance: ``s_i = -|y~_i - mu_i|^2 / 2``.

``fisher="true"`` (default for a likelihood): ``y~_i`` is drawn from the model's
own predictive distribution at ``stop_gradient(params)`` (categorical from the
logits; ``mu + N(0, 1)``), giving an unbiased estimate of the true Fisher (the
generalised Gauss-Newton matrix for these losses); ``fisher="empirical"``: ``y~ = y``,
the data labels. Sample ``i``'s label is drawn with the key
``fold_in(key, global index of i)``, so the draws do not depend on how the batch is
split over devices.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from fishr import distributed
from fishr.distributed import AxisName

__all__ = ["FISHERS", "LIKELIHOODS", "make_score_fn"]

LIKELIHOODS = (None, "categorical", "gaussian")
FISHERS = ("true", "empirical")

ScoreFn = Callable[[Any, Any, jax.Array], jax.Array]


def _split_batch(batch: Any, likelihood: str):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            f"fishr.kfac: with likelihood={likelihood!r}, `batch` must be a pair (inputs, labels); "
            f"got {type(batch).__name__}."
        )
    return batch


def _sample_keys(key: jax.Array, n_local: int, axis_name: AxisName) -> jax.Array:
    first = distributed.device_index(axis_name) * n_local
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(n_local))


def make_score_fn(
    apply_fn: Callable[[Any, Any], jax.Array],
    likelihood: Optional[str] = None,
    fisher: str = "true",
    axis_name: AxisName = None,
) -> ScoreFn:
    """``score(params, batch, key) -> (n_local,)`` for the conventions of the module docstring."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"fishr.kfac: `likelihood` must be one of {LIKELIHOODS}, got {likelihood!r}.")
    if fisher not in FISHERS:
        raise ValueError(f"fishr.kfac: `fisher` must be one of {FISHERS}, got {fisher!r}.")

    if likelihood is None:
        return lambda params, batch, key: apply_fn(params, batch)

    def score(params, batch, key):
        x, y = _split_batch(batch, likelihood)
        out = apply_fn(params, x)
        n_local = out.shape[0]
        if jnp.shape(y)[:1] != (n_local,):
            raise ValueError(
                f"fishr.kfac: labels must have leading size {n_local} (one per sample); got shape {jnp.shape(y)}."
            )
        keys = _sample_keys(key, n_local, axis_name)
        frozen = jax.lax.stop_gradient(out)
        if likelihood == "categorical":
            if out.ndim != 2:
                raise ValueError(f"fishr.kfac: categorical logits must be (n, C); got shape {out.shape}.")
            if fisher == "true":
                y = jax.vmap(jax.random.categorical)(keys, frozen)
            logp = jax.nn.log_softmax(out, axis=-1)
            return jnp.take_along_axis(logp, jnp.asarray(y, jnp.int32)[:, None], axis=-1)[:, 0]
        if fisher == "true":
            y = frozen + jax.vmap(lambda k: jax.random.normal(k, out.shape[1:], out.dtype))(keys)
        residual = (jnp.asarray(y, out.dtype) - out).reshape(n_local, -1)
        return -0.5 * jnp.sum(residual**2, axis=-1)

    return score
