r"""Per-sample scores: the functions whose per-sample gradients every metric in fishr is built from.

SR (:func:`fishr.sr`)
---------------------
``apply_fn(params, batch)`` returns ``log psi`` of every sample, shape ``(n,)``. Its
*score rows* (:func:`log_psi_rows`) are ``(n, C)``: ``C = 1`` for a real ``log psi`` or a
holomorphic one, ``C = 2`` (real and imaginary parts stacked) for a complex ``log psi``
of real parameters; their Jacobian is SR's ``O``.

K-FAC (:func:`fishr.kfac`)
--------------------------
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

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from fishr import distributed
from fishr._validate import check_choice, local_batch_size
from fishr.distributed import AxisName

__all__ = ["FISHERS", "LIKELIHOODS", "inactive_leaves", "log_psi_one_sample", "log_psi_rows", "make_score_fn",
           "mean_loss", "split_batch"]

Likelihood = Literal["categorical", "gaussian"] | None
Fisher = Literal["true", "empirical"]
LIKELIHOODS = (None, "categorical", "gaussian")
FISHERS = ("true", "empirical")

ScoreFn = Callable[[Any, Any, jax.Array], jax.Array]
ApplyFn = Callable[[Any, Any], jax.Array]


# --------------------------------------------------------------------------- SR: log psi rows


def log_psi_rows(apply_fn: ApplyFn, batch: Any, holomorphic: bool, who: str = "fishr.sr") -> Callable[[Any], jax.Array]:
    """``params -> (n_local, C)`` score rows of ``log psi`` on ``batch`` (see the module docstring).

    The output shape and dtype of ``apply_fn`` are checked when the returned function
    is traced: one value per sample, complex when ``holomorphic``.
    """
    n_local = local_batch_size(batch, who)

    def rows(params):
        out = apply_fn(params, batch)
        if jnp.shape(out) != (n_local,):
            raise ValueError(
                f"{who}: `apply_fn(params, batch)` must return log psi, one value per sample, "
                f"shape ({n_local},); got shape {jnp.shape(out)}."
            )
        if holomorphic:
            if not jnp.iscomplexobj(out):
                raise ValueError(f"{who}: holomorphic=True needs a complex `apply_fn` output (log psi).")
            return out[:, None]
        if jnp.iscomplexobj(out):
            return jnp.stack([out.real, out.imag], axis=-1)
        return out[:, None]

    return rows


def log_psi_one_sample(apply_fn: ApplyFn, holomorphic: bool, who: str = "fishr.sr") -> Callable[[Any, Any], jax.Array]:
    """``(params, x) -> (C,)``: the score rows of one sample ``x`` (evaluated as a batch of one)."""

    def one_sample(params, x):
        batch_of_one = jax.tree.map(lambda leaf: leaf[None], x)
        return log_psi_rows(apply_fn, batch_of_one, holomorphic, who)(params)[0]

    return one_sample


# --------------------------------------------------------------------------- K-FAC: log-likelihoods


def inactive_leaves(apply_fn: ApplyFn, params: Any, batch: Any) -> Any:
    """A pytree of bools like ``params``: ``True`` for a leaf that ``apply_fn`` does not depend on.

    Found at trace time from the jaxpr of the transposed JVP of ``log psi`` (what a
    cotangent on the output reaches), never from values: a leaf that is used but has a
    zero gradient on this batch is active. Costs one abstract trace, no FLOPs.
    """
    out = jax.eval_shape(lambda p: apply_fn(p, batch), params)

    def pullback(p, cotangent):
        return jax.vjp(lambda q: apply_fn(q, batch), p)[1](cotangent)[0]

    closed = jax.make_jaxpr(pullback)(params, jnp.zeros(out.shape, out.dtype))
    jaxpr = closed.jaxpr
    n_params = len(jax.tree.leaves(params))
    cot_vars = jaxpr.invars[n_params:]  # only what the cotangent reaches counts
    reached = set(map(id, cot_vars))
    for eqn in jaxpr.eqns:
        if any(id(v) in reached for v in eqn.invars if not hasattr(v, "val")):
            reached.update(map(id, eqn.outvars))
    active = [not hasattr(v, "val") and id(v) in reached for v in jaxpr.outvars]
    return jax.tree.unflatten(jax.tree.structure(params), [not a for a in active])


def split_batch(batch: Any, likelihood: str, who: str = "fishr.kfac") -> tuple[Any, Any]:
    """``(inputs, labels)`` of a likelihood's batch; a clear error naming ``who`` for anything else."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            f"{who}: with likelihood={likelihood!r}, `batch` must be a pair (inputs, labels); "
            f"got {type(batch).__name__}."
        )
    inputs, labels = batch
    return inputs, labels


def _sample_keys(key: jax.Array, n_local: int, axis_name: AxisName) -> jax.Array:
    first = distributed.device_index(axis_name) * n_local
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(n_local))


def make_score_fn(
    apply_fn: ApplyFn,
    likelihood: Likelihood = None,
    fisher: Fisher = "true",
    axis_name: AxisName = None,
) -> ScoreFn:
    """``score(params, batch, key) -> (n_local,)`` for the conventions of the module docstring.

    With ``fisher="empirical"`` and ``likelihood="categorical"`` the data labels must be
    integers (checked at trace time); a label outside ``[0, C)`` makes that sample's
    score NaN, so the K-FAC update is NaN and its state is kept (a label cannot be
    checked before run time).
    """
    check_choice(likelihood, LIKELIHOODS, "fishr.kfac", "likelihood")
    check_choice(fisher, FISHERS, "fishr.kfac", "fisher")

    if likelihood is None:
        return lambda params, batch, key: apply_fn(params, batch)

    def score(params, batch, key):
        x, y = split_batch(batch, likelihood)
        out = apply_fn(params, x)
        n_local = out.shape[0]
        if n_local == 0:
            raise ValueError("fishr.kfac: `batch` holds no samples (its leading axis has size 0).")
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
                valid = True
            else:
                if jnp.shape(y) != (n_local,) or not jnp.issubdtype(jnp.result_type(y), jnp.integer):
                    raise ValueError(
                        "fishr.kfac: with likelihood='categorical', the labels must be integers of shape "
                        f"({n_local},); got {jnp.result_type(y)} of shape {jnp.shape(y)}."
                    )
                valid = (y >= 0) & (y < out.shape[1])
            logp = jax.nn.log_softmax(out, axis=-1)
            picked = jnp.take_along_axis(logp, jnp.clip(jnp.asarray(y, jnp.int32), 0, out.shape[1] - 1)[:, None],
                                         axis=-1)[:, 0]
            # a factor 1 or NaN (not jnp.where, whose gradient would be 0): an invalid label's
            # score AND its output gradients are NaN
            return picked * jnp.where(valid, 1.0, jnp.nan).astype(picked.dtype)
        if fisher == "true":
            y = frozen + jax.vmap(lambda k: jax.random.normal(k, out.shape[1:], out.dtype))(keys)
        residual = (jnp.asarray(y, out.dtype) - out).reshape(n_local, -1)
        return -0.5 * jnp.sum(residual**2, axis=-1)

    return score


def mean_loss(apply_fn: ApplyFn, likelihood: str) -> Callable[[Any, Any], jax.Array]:
    """``(params, (x, y)) -> loss``: the likelihood's negative log-likelihood, the mean over the local batch.

    ``"categorical"``: ``mean_i -log softmax(apply_fn(params, x)_i)[y_i]`` with integer
    labels; ``"gaussian"``: ``mean_i 1/2 |y_i - apply_fn(params, x)_i|^2`` (unit variance, no
    constant). These are the losses whose Fisher the scores above estimate.
    """
    check_choice(likelihood, LIKELIHOODS[1:], "fishr.scores.mean_loss", "likelihood")

    def loss(params, batch):
        x, y = split_batch(batch, likelihood, "fishr.scores.mean_loss")
        out = apply_fn(params, x)
        if likelihood == "categorical":
            logp = jax.nn.log_softmax(out, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(y, jnp.int32)[:, None], axis=-1))
        residual = (jnp.asarray(y, out.dtype) - out).reshape(out.shape[0], -1)
        return 0.5 * jnp.mean(jnp.sum(residual**2, axis=-1))

    return loss
