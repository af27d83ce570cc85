r"""Kronecker factors of the Fisher for dense layers: statistics, EMA, damping, inverses, preconditioning.

The pure functions under :func:`fishr.kfac` (its optax transform).

The math and its conventions
----------------------------
For a captured dense layer ``z = a W (+ b)`` (Flax layout, ``W`` is ``(d_in, d_out)``),
per-sample score ``s_i`` and ``d_{i,t} = d s_i / d z_{i,t}`` (see :mod:`fishr.capture`),
the layer's block of the Fisher ``F = E_i[vec(g_i) vec(g_i)^T]`` of the per-sample
gradients ``g_i = sum_t abar_{i,t} d_{i,t}^T`` is approximated by ``A (x) G`` with

    A = 1 / (N T) sum_{i,t} abar_{i,t} abar_{i,t}^T       abar = [a, 1] with a bias, else a
    G = 1 / N     sum_{i,t} d_{i,t} d_{i,t}^T

``N`` is the number of samples on all devices (means are ``pmean``'d through
:mod:`fishr.distributed`), ``T`` the positions per sample (extra axes the layer is
applied over, and repeated calls of a shared layer). With ``T = 1`` these are the
seed's ``A = E[a a^T]`` and ``G = E[g g^T]``. For ``T > 1`` the positions are folded
into the batch with the K-FAC-expand normalisation (Eschenhagen et al. 2023):
``A`` averages over positions, ``G`` sums over them, so ``A (x) G`` has the scale
of ``sum_t E[(a_t a_t^T) (x) (d_t d_t^T)]``, the position-diagonal part of the
exact block, and the damping keeps its meaning relative to ``F``.
``vec`` is row-major on ``W``'s ``(d_in [+1], d_out)`` layout, so ``A (x) G`` is
``np.kron(A, G)``.

Normalisation layers (LayerNorm, RMSNorm; :class:`fishr.capture.NormInfo`): their
``[scale, bias]`` gets a diagonal block ``diag_j = mean_i g_{i,j}^2`` of the exact
per-sample gradients (``sum_t xhat_t d_t`` for the scale, ``sum_t d_t`` for the bias),
as kfac-jax's scale-and-shift diagonal blocks; it enters the same EMA and is inverted
as ``1 / (diag + damping)``.

Centring (``centre=True``): ``a`` and ``d`` are replaced by ``a - mean(a)`` and
``d - mean(d)`` (means over all samples and positions) before the products; the
bias column ``1`` is appended after centring, so ``A``'s bias block stays 1. The
default is ``False`` (second moments, as the seed and Martens & Grosse): for the
true Fisher ``E[d] = 0`` already, and centring ``a`` removes the input mean that
the layer's curvature genuinely contains.

EMA: ``debias=True`` (the default of :func:`fishr.kfac`) is the bias-corrected EMA
(kfac-jax's and Adam's convention), see :func:`ema_update`; ``debias=False`` is the
seed's rule, ``X <- new`` on the first update (``count == 0``, the zero initial
factors are replaced), afterwards ``X <- ema X + (1 - ema) new``.

Damping (``kind``):

* ``"trace"`` (the seed): each factor ``X`` (``n x n``) gets
  ``max(damping * tr(X) / n, 1e-10)`` on its diagonal (``1e-10`` is the seed's EPS floor);
* ``"pi"`` (Martens & Grosse 2015): ``pi = sqrt((tr A / dim A) / (tr G / dim G))``,
  ``A + pi sqrt(damping) I`` and ``G + sqrt(damping) / pi I``.

Preconditioning: ``W``'s gradient ``Gamma`` (with the bias gradient as an extra
row) becomes ``(A + s_A I)^{-1} Gamma (G + s_G I)^{-1}``, i.e.
``((A + s_A I) (x) (G + s_G I))^{-1} vec(Gamma)``; in the seed's ``(out, in)``
layout this is ``G^{-1} dW A^{-1}``. Inverses are explicit, by the solver object
:class:`fishr.Cholesky` (the seed) or :class:`fishr.Eigh`. A damped factor that is
not positive definite gives a non-finite inverse (the optax transform then keeps the
layer's previous inverse, the ruvector adapter raises).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from fishr import distributed
from fishr._validate import check_choice
from fishr.capture import LayerInfo, LayerPlan, NormInfo, augment_bias, capture, layer_block, put_layer_block
from fishr.distributed import AxisName
from fishr.linalg import pi_damping, trace_damping
from fishr.solvers import Cholesky, DirectSolver, Eigh, check_solver

__all__ = [
    "DAMPING_KINDS",
    "SEED_EPS",
    "KroneckerFactors",
    "damping_shifts",
    "ema_update",
    "factor_inverses",
    "factor_statistics",
    "identity_factors",
    "layer_factors",
    "norm_diagonal",
    "norm_size",
    "precondition",
    "precondition_matrix",
    "zero_factors",
]

SEED_EPS = 1e-10  # ruvector-math's utils::EPS: the floor of the seed's trace damping
DAMPING_KINDS = ("pi", "trace")
DampingKind = Literal["pi", "trace"]


class KroneckerFactors(NamedTuple):
    """Per captured layer, the input-side ``a`` and output-side ``g`` matrices (factors or their inverses);
    per captured normalisation layer, ``diag``: the diagonal Fisher block of its ``[scale, bias]`` (or its
    damped inverse)."""

    a: tuple
    g: tuple
    diag: tuple = ()


# --------------------------------------------------------------------------- one layer


def layer_factors(
    inputs: jax.Array,
    output_grads: jax.Array,
    *,
    has_bias: bool,
    centre: bool = False,
    axis_name: AxisName = None,
) -> tuple[jax.Array, jax.Array]:
    """``(A, G)`` from ``a`` ``(n_local, T, d_in)`` and ``d`` ``(n_local, T, d_out)`` (module docs)."""
    if inputs.ndim != 3 or output_grads.ndim != 3 or inputs.shape[:2] != output_grads.shape[:2]:
        raise ValueError(
            "fishr.kfac: `inputs` and `output_grads` must be (n, T, d_in) and (n, T, d_out) with the same "
            f"(n, T); got {inputs.shape} and {output_grads.shape}."
        )
    n_local, positions = inputs.shape[:2]
    if centre:
        inputs = inputs - distributed.batch_mean(jnp.mean(inputs, axis=1), axis_name)
        output_grads = output_grads - distributed.batch_mean(jnp.mean(output_grads, axis=1), axis_name)
    a = augment_bias(inputs, has_bias).reshape(n_local * positions, -1)
    d = output_grads.reshape(n_local * positions, -1)
    a_factor = a.T @ a / (n_local * positions)
    g_factor = d.T @ d / n_local
    return distributed.pmean((a_factor, g_factor), axis_name)


def norm_diagonal(xhat: jax.Array, output_grads: jax.Array, *, has_scale: bool, has_bias: bool,
                  axis_name: AxisName = None) -> jax.Array:
    """The diagonal Fisher block ``mean_i g_i^2`` of a norm layer's ``[scale, bias]`` (module docs).

    ``g_i = [sum_t xhat_{i,t} d_{i,t}, sum_t d_{i,t}]`` are the exact per-sample gradients
    of ``y = xhat * scale + bias`` (:class:`fishr.capture.NormInfo`); ``xhat`` and ``d`` are
    ``(n_local, T, features)``.
    """
    parts = ([jnp.sum(xhat * output_grads, axis=1)] if has_scale else []) + \
        ([jnp.sum(output_grads, axis=1)] if has_bias else [])
    g = jnp.concatenate(parts, axis=-1)
    return distributed.batch_mean(g * g, axis_name)


def damping_shifts(a: jax.Array, g: jax.Array, damping: Any, kind: str = "pi") -> tuple[jax.Array, jax.Array]:
    """Diagonal shifts ``(s_A, s_G)`` of ``kind`` ``"trace"`` or ``"pi"`` (module docs)."""
    if kind == "trace":
        return trace_damping(a, damping, SEED_EPS), trace_damping(g, damping, SEED_EPS)
    if kind == "pi":
        return pi_damping(a, g, damping)
    check_choice(kind, DAMPING_KINDS, "fishr.kfac", "damping_kind")
    raise AssertionError(kind)


def precondition_matrix(grad_matrix: jax.Array, a_inv: jax.Array, g_inv: jax.Array) -> jax.Array:
    """``a_inv @ Gamma @ g_inv`` for a ``(d_in [+1], d_out)`` gradient ``Gamma`` (Flax layout)."""
    return a_inv @ grad_matrix @ g_inv


# --------------------------------------------------------------------------- all layers


def factor_statistics(
    score_fn: Callable[..., jax.Array],
    params: Any,
    *args: Any,
    centre: bool = False,
    axis_name: AxisName = None,
    norms: bool = True,
) -> tuple[LayerPlan, KroneckerFactors]:
    """This batch's ``(A, G)`` for every captured layer of ``score_fn(params, *args)`` (shape ``(n_local,)``).

    One forward and one backward pass (:func:`fishr.capture.capture`), then
    the means of module docs over all devices of ``axis_name``. Returns the
    static :class:`~fishr.capture.LayerPlan` and the factors; with ``norms`` (default)
    also the diagonal blocks of LayerNorm / RMSNorm scales and biases (:func:`norm_diagonal`).
    """
    cap = capture(score_fn, params, *args, norms=norms)
    if cap.outputs.ndim != 1:
        raise ValueError(
            "fishr.kfac: the score function must return one real score per sample, shape (n,); "
            f"got shape {cap.outputs.shape}."
        )
    pairs = [
        layer_factors(a, d, has_bias=layer.has_bias, centre=centre, axis_name=axis_name)
        for layer, a, d in zip(cap.plan.layers, cap.inputs, cap.output_grads)
    ]
    diag = tuple(
        norm_diagonal(xhat, d, has_scale=m.scale_index is not None, has_bias=m.bias_index is not None,
                      axis_name=axis_name)
        for m, xhat, d in zip(cap.plan.norms, cap.norm_inputs, cap.norm_output_grads)
    )
    return cap.plan, KroneckerFactors(a=tuple(p[0] for p in pairs), g=tuple(p[1] for p in pairs), diag=diag)


def _factor_dims(layer: LayerInfo) -> tuple[int, int]:
    return layer.d_in + int(layer.has_bias), layer.d_out


def norm_size(norm: NormInfo) -> int:
    """Length of a norm layer's ``[scale, bias]`` diagonal block."""
    return norm.features * (int(norm.scale_index is not None) + int(norm.bias_index is not None))


def zero_factors(plan: LayerPlan, dtype: Any) -> KroneckerFactors:
    """All-zero factors for ``plan`` (the seed's initial state)."""
    dims = [_factor_dims(layer) for layer in plan.layers]
    return KroneckerFactors(
        a=tuple(jnp.zeros((m, m), dtype) for m, _ in dims), g=tuple(jnp.zeros((k, k), dtype) for _, k in dims),
        diag=tuple(jnp.zeros((norm_size(m),), dtype) for m in plan.norms),
    )


def identity_factors(plan: LayerPlan, dtype: Any) -> KroneckerFactors:
    """Identity matrices for ``plan``: as inverses they leave every gradient unchanged."""
    dims = [_factor_dims(layer) for layer in plan.layers]
    return KroneckerFactors(
        a=tuple(jnp.eye(m, dtype=dtype) for m, _ in dims), g=tuple(jnp.eye(k, dtype=dtype) for _, k in dims),
        diag=tuple(jnp.ones((norm_size(m),), dtype) for m in plan.norms),
    )


def ema_update(
    old: KroneckerFactors, new: KroneckerFactors, ema: Any, count: Any, debias: bool = True
) -> KroneckerFactors:
    """The factors' exponential moving average after ``count`` earlier updates.

    ``debias=False`` (the seed's rule): ``new`` if ``count == 0`` (first update replaces),
    else ``ema * old + (1 - ema) * new``. ``debias=True`` (the default) instead keeps the
    bias-corrected average of all updates so far,
    ``X_t = sum_k ema^(t-k) (1 - ema) new_k / (1 - ema^t)`` (``t = count + 1``; Adam's and
    kfac-jax's convention), by the recursion ``X_t = (ema (1 - ema^(t-1)) X_{t-1} +
    (1 - ema) new_t) / (1 - ema^t)``. It also replaces on the first update but forgets
    the first batches faster: with the seed's rule the first batch keeps weight
    ``0.95^k`` after ``k`` updates, which lags while the parameters move quickly.
    """
    count = jnp.asarray(count)
    first = count == 0
    if debias:
        t = (count + 1).astype(jnp.result_type(float))
        if ema == 1.0:  # the limit ema -> 1: the plain running mean
            w_new = 1.0 / t
        else:
            w_new = (1.0 - ema) / (1.0 - ema**t)
        w_old = 1.0 - w_new
    else:
        w_old, w_new = ema, 1.0 - ema

    def mix(o, n):
        return jnp.where(first, n, w_old * o + w_new * n).astype(o.dtype)

    return jax.tree.map(mix, old, new)


def factor_inverses(
    factors: KroneckerFactors, damping: Any, *, kind: str = "pi", solver: DirectSolver = Cholesky()
) -> KroneckerFactors:
    """``((A + s_A I)^{-1}, (G + s_G I)^{-1})`` per layer by ``solver`` (:class:`fishr.Cholesky` or
    :class:`fishr.Eigh`); non-finite where a damped factor is not positive definite."""
    check_solver(solver, (Cholesky, Eigh), "fishr.kfac", "for the factor inverses")
    a_inv, g_inv = [], []
    for a, g in zip(factors.a, factors.g):
        shift_a, shift_g = damping_shifts(a, g, damping, kind)
        a_inv.append(solver.inverse(a, shift_a))
        g_inv.append(solver.inverse(g, shift_g))
    # diagonal blocks: (F + damping)^{-1}, inf/NaN where F + damping <= 0 (a non-positive block)
    diag_inv = tuple(jnp.where(f + damping > 0, 1.0 / (f + damping), jnp.nan).astype(f.dtype) for f in factors.diag)
    return KroneckerFactors(a=tuple(a_inv), g=tuple(g_inv), diag=diag_inv)


def precondition(grads: Any, plan: LayerPlan, inverses: KroneckerFactors) -> Any:
    """Apply each layer's ``A^{-1} Gamma G^{-1}`` and each norm's diagonal inverse to ``grads``;
    uncovered parameters pass unchanged.

    ``grads`` has the structure of the ``params`` that ``plan`` was discovered on.
    """
    leaves, treedef = jax.tree.flatten(grads)
    if len(leaves) != plan.num_leaves:
        raise ValueError(
            f"fishr.kfac: `grads` must have the structure of `params` ({plan.num_leaves} leaves); "
            f"got {len(leaves)} leaves."
        )
    out = list(leaves)
    shapes, dtypes = [jnp.shape(leaf) for leaf in leaves], [jnp.result_type(leaf) for leaf in leaves]
    for layer, a_inv, g_inv in zip(plan.layers, inverses.a, inverses.g):
        kernel = leaves[layer.kernel_index]
        if jnp.shape(kernel) != layer.kernel_shape:
            raise ValueError(
                f"fishr.kfac: gradient of layer {layer.name!r} kernel has shape {jnp.shape(kernel)}, "
                f"expected {layer.kernel_shape}."
            )
        nat = precondition_matrix(layer_block(leaves, layer), a_inv, g_inv).astype(kernel.dtype)
        put_layer_block(out, layer, nat, shapes, dtypes)
    for norm, inv in zip(plan.norms, inverses.diag):
        offset = 0
        for index in (norm.scale_index, norm.bias_index):
            if index is not None:
                leaf = leaves[index]
                part = inv[offset:offset + norm.features].reshape(jnp.shape(leaf))
                out[index] = (leaf * part).astype(leaf.dtype)
                offset += norm.features
    return jax.tree.unflatten(treedef, out)
