r"""Diagonal metrics for SR: ``(S + d M)^{-1}`` with a positive diagonal ``M`` (MARCH, a shift relative to ``diag S``).

SR with a diagonal metric ``M`` is plain SR in the coordinates ``theta~ = M^{1/2} theta``:
with ``s = M^{-1/2}`` the Jacobian's columns are scaled, ``Obar~ = Obar diag(s)``, and

    x = s * solve(S~ = Obar~^H Obar~ / N, b~ = s * g + d mu (x_prev / s)),

which is ``x = (S + d M)^{-1} (g + d mu M x_prev)`` for plain SR with SPRING momentum
(the momentum is projected in the metric's geometry, as JaQMC composes MARCH with
SPRING); robust SR, the spectral cutoffs and the damping rules act on ``S~``.
Every solve stays exact; the layers' statistics cannot carry a per-column scale, so a
metric uses the generic Jacobian, unless it is *factored*: with ``factored_metric=True``
each captured layer's ``(k, m)`` block of ``M`` (kernel rows, then the bias row) is
replaced by the rank-one ``u w^T`` with the same row and column sums
(``kronecker_factored`` below), so ``s = u^{-1/2} (x) w^{-1/2}`` scales the layer's inputs
and output gradients and the structured Jacobian carries it (the solve is exact for the
factored metric; leaves in no captured layer keep their own entries). ``diag S`` then
comes from the layers' statistics as well (:meth:`fishr.jacobian.LayerJacobian.score_variance`).

* ``diag_damping = rho``: ``S + d I + rho diag S`` (NetKet's ``diag_scale``; jVMC's
  ``diagonalShift`` is ``d = 0``, which fishr does not take: ``d > 0`` is needed), i.e.
  ``M = 1 + (rho / d) diag S``.
* MARCH (JaQMC's conventions): an accumulator ``v`` (ones at the start) and
  ``M = (v + eps)^{1/2}``. ``"var"``: before the solve, ``v <- beta v + (1 - beta) diag S /
  mean(diag S)`` where ``diag S > eps`` (the mean over those entries; the others keep
  ``v``). ``"diff"``: after the step, ``v <- beta v + (1 - beta) (x_k - x_{k-1})^2`` with ``x``
  the transform's output (momentum included), used from the next step on. With
  ``diag_damping`` as well, ``M = (v + eps)^{1/2} + (rho / d) diag S``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fishr.capture import layer_block, put_layer_block

__all__ = ["MARCH_MODES", "kronecker_factored", "march_diff_update", "march_var_update", "metric_fn"]

MARCH_MODES = ("var", "diff")


def march_var_update(accumulator: Any, variance: Any, decay: float, eps: float) -> Any:
    """MARCH ``"var"``: ``v <- decay v + (1 - decay) diag S / mean(diag S)`` where ``diag S > eps``."""
    leaves = jax.tree.leaves(variance)
    total = sum(jnp.sum(jnp.where(leaf > eps, leaf, 0)) for leaf in leaves)
    count = sum(jnp.sum(leaf > eps) for leaf in leaves)
    mean = total / jnp.maximum(count, 1)
    mean = jnp.where(mean > 0, mean, 1.0)
    return jax.tree.map(lambda v, var: jnp.where(var > eps, decay * v + (1 - decay) * var / mean, v).astype(v.dtype),
                        accumulator, variance)


def march_diff_update(accumulator: Any, x: Any, previous: Any, decay: float) -> Any:
    """MARCH ``"diff"``: ``v <- decay v + (1 - decay) |x - previous|^2``."""
    return jax.tree.map(lambda v, a, b: (decay * v + (1 - decay) * jnp.abs(a - b) ** 2).astype(v.dtype),
                        accumulator, x, previous)


def metric_fn(base: Any, diag_damping: float, damping: Any) -> Callable[[Callable[[], Any]], Any] | None:
    """The ``metric`` argument of :func:`fishr._sr_solve.solve_with_config`: ``M = base + (rho / d) diag S``.

    ``base``: a positive pytree, a function of a thunk computing ``diag S`` that returns
    one (MARCH ``"var"``), or ``None`` for ones; ``None`` is returned when there is no
    metric at all (no ``base`` and ``diag_damping = 0``). ``diag S`` is computed once.
    """
    if base is None and not diag_damping:
        return None

    def metric(score_variance: Callable[[], Any]) -> Any:
        cache = []

        def variance():
            if not cache:
                cache.append(score_variance())
            return cache[0]

        m = base(variance) if callable(base) else base
        if diag_damping:
            extra = optax.tree.scale(diag_damping / damping, variance())
            m = jax.tree.map(lambda e: 1.0 + e, extra) if m is None else jax.tree.map(
                lambda a, e: a + e.astype(a.dtype), m, extra)
        return m

    return metric


def kronecker_factored(metric: Any, layers: Any) -> tuple[Any, dict]:
    """``metric`` with each captured layer's block replaced by its rank-one (Kronecker) factorisation.

    For a layer whose parameters form the ``(k, m)`` block ``B`` (kernel rows ``d_in``, then
    the bias row, as :class:`fishr.jacobian.LayerJacobian` orders them), ``B`` (positive)
    becomes ``B^ = r c^T / sum(B)`` with ``r = B 1`` and ``c = B^T 1`` its row and column
    sums (Adafactor's factorisation of a positive matrix, which keeps every row and column
    sum of ``B``), i.e. ``B^ = u w^T`` with ``u = r / sqrt(sum B)``, ``w = c / sqrt(sum B)``:
    a per-input times a per-output factor, which the layers' statistics carry (inputs
    scaled by ``u^{-1/2}``, output gradients by ``w^{-1/2}``). Leaves in no captured layer
    keep their entries. ``layers``: the :class:`fishr.capture.LayerInfo` tuple of
    :func:`fishr.capture.discover_layers`.

    Returns ``(metric^, factors)`` with ``factors[kernel_index] = (u, w)``.
    """
    original = jax.tree.leaves(metric)
    shapes, dtypes = [jnp.shape(leaf) for leaf in original], [leaf.dtype for leaf in original]
    leaves, factors = list(original), {}
    for layer in layers:
        block = layer_block(original, layer)
        root = jnp.sqrt(block.sum())
        u, w = block.sum(axis=1) / root, block.sum(axis=0) / root
        factors[layer.kernel_index] = (u, w)
        put_layer_block(leaves, layer, jnp.outer(u, w), shapes, dtypes)
    return jax.tree.unflatten(jax.tree.structure(metric), leaves), factors
