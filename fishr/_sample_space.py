r"""Sample-space SR: ``(S + damping I)^{-1} g`` through the ``N x N`` kernel ``K = Obar Obar^H``.

Two exact forms, both through ``y = (K + N damping I)^{-1} u``:

* from the local energies (recommended for VMC): with the coefficients ``c`` of the
  VMC force ``g_E = Obar^H c`` (:func:`energy_coefficients`),

      x = Obar^H (K + N damping I)^{-1} (N c),

  plus, with SPRING momentum, ``v - Obar^H (K + N damping I)^{-1} Obar v`` for the
  term ``damping v`` (``v = momentum * x_prev``). Nothing is divided by the damping,
  so the error of ``x`` is that of the kernel solve (MinSR's and NetKet's ``srt``
  form). The gradient passed alongside is *not* solved for: its own rounding
  (``eps ||O|| ||c||`` where the force cancels) would come back divided by the
  damping. It only gives the reported residual.
* from ``g`` alone, the Woodbury identity, exact for any ``g``:

      W(g) = (g - Obar^H (K + N damping I)^{-1} Obar g) / damping,

  followed by one step of iterative refinement in parameter space,
  ``x += W(g - (S + damping) x)``. The subtraction cancels the part of ``g`` in the
  row space of ``Obar`` (all of the VMC force), so its rounding error is amplified
  by about ``||g|| / (damping ||x||)``: measured on the attention + LayerNorm model of
  ``tests/test_sr_accuracy.py``, see the README for the numbers. Here a factor in the
  working precision is applied without the kernel solve's own refinement (below): the
  step in parameter space corrects ``y`` too, and the Woodbury subtraction's rounding
  bounds the accuracy either way (float32, errors against an exact update with and without it:
  transformer 3.4e-3 / 2.3e-3, MLP 5.7e-6 / 9.6e-6, RBM 9.5e-4 / 1.2e-3; the MLP
  32-200-200-1 at ``N = 1,024``: 16-20 -> 12-13 ms). In this form (without robust SR)
  ``converged`` also needs, in every precision, LAPACK's backward-error test on the
  residual in parameter space, ``||S + damping||`` bounded by ``||K + N damping||_inf / N``;
  the cancellation above can fail it where the kernel solve met its own test (the
  transformer in float64, ``g`` alone, damping 1e-4 / 1e-5: errors 4.5e-12 / 1.0e-10,
  ``converged`` False). The factor of a raised shift (fallback 2 below) serves
  that step as well, which then removes less of the raised shift than the refinement does:
  started on the raised rung on well-posed float32 problems (``tests/test_sr_structured.py``),
  2.1e-7 to 4.4e-5 from an exact update where the first rung gives 1.9e-7 to 8.5e-7 (with
  the energies, refined: 4.5e-6 to 1.2e-4 from the first rung); the refinement in the
  program, for this rare path, cost 0.25 s of compile at ``N = 4,096``.

The kernel solve. ``K`` is computed by tiles (:meth:`kernel_tiles`; for captured layers one
block per tile column up to 4 tile rows, :class:`fishr.linalg.ColumnTiles`; explicit rows one
block per tile up to 8; a loop of fixed program size beyond), factored by tiles,
kept in row slabs up to ``UNROLL_FACTOR_MAX_TILES`` = 8 tile rows, that is up to 8,192 rows
(:func:`fishr.linalg.tile_size`; :func:`fishr.linalg.tiled_cholesky_slabs`, unrolled, at most 4
block rows; applied by a triangular solve per diagonal block and a matrix-vector product per row
slab), and as tiles of 512 beyond (:func:`fishr.linalg.tiled_cholesky`, applied by tile products;
both in loops of fixed program size). The computed kernel need only be close to ``K``: its rounding (the
centring of the layers' kernel through its row means cancels digits when the mean score
is large next to its spread; a single-precision factor of double-precision input on the
CPU, for speed) is corrected on the *exact* products ``Obar (Obar^H y)`` (the Jacobian's
own ``matvec`` / ``rmatvec``, which centre on the sample vector):

* a factor ``F`` in the working precision (single-precision input on the CPU; any input
  on accelerators): the factor's solve and iterative refinement, unrolled
  (``_refined_solve``): ``y0 = F u``, ``y_{k+1} = y_k + F (u - A y_k)`` with
  ``A = K + N damping`` applied exactly. Two steps for the layers' kernel (centred through
  row means: the first residual carries the cancellation; the second step only if the
  first reduced the residual, else ``y0``, never a diverging iterate), one for explicit
  rows (centred exactly; each product costs ``N P``). Refinement recomputes the true
  residual at each step, where CG's recurrences drift in single precision: on the float32
  transformer of ``tests/test_sr_accuracy.py`` the error against an exact float64 update
  is 9.5e-6 (explicit rows) where NetKet ``srt``'s direct float32 solve gives 8.0e-4 and
  this module's earlier direct solve 7.2e-4 (its CG to the rounding floor on a layers'
  kernel: 5.9e-4; the refinement 1.9e-5 to 2.1e-5). The cost: one product pair per step
  (the transformer at ``N = 256``: 49 -> 53 ms warm, float32). No loop in the program but
  the ladder below (2026-12-04: RBM ``N = 256`` first call 1.75-2.6 -> 1.45-1.6 s, warm
  3.7-4.5 -> 2.7-3.8 ms). ``converged`` is LAPACK ``dsposv``'s backward-error test on the
  residual of the iterate before the last correction.
* a single-precision factor of double-precision input (the CPU, unless :func:`double_factor_pays`:
  wide layers at moderate ``N``, whose CG steps cost more than factoring in double precision,
  take the form above with a double-precision factor): CG on the exact products,
  preconditioned by the factor, from zero (its first step is the factor's solve), until
  its residual is four digits past the backward-error test (``FLOOR_MARGIN``) or stops
  halving (the rounding floor of the products): the backward-error test alone allows
  forward errors of ``cond(K) eps`` (a transformer: 7.5e-11 against NetKet ``srt``'s 6.5e-13
  when stopped at it; 7.6e-13 when iterated, 11 steps; 4.9e-13 in 5 steps with the margin,
  the error CG to stagnation reaches in 12: CG's recursive residual keeps falling
  long after the true one has stopped, :func:`fishr.linalg.cg`).

Fallbacks, reported in ``SolveInfo.fallback`` (never a silent NaN). If the factor is not
finite (a non-positive pivot: the computed kernel plus the shift is numerically
indefinite):

1. for double-precision input on the CPU (or when its CG does not converge), the
   kernel in double precision, under ``lax.cond`` (only then), factored by LAPACK on the
   assembled kernel and solved by CG on that assembled kernel (one matrix product per
   step: the fallback solves the kernel as computed, in its precision, instead of
   compiling the Jacobian's products again);
2. the shift of the *factor* raised by ``10^j eps_f ||K||`` (``j = 0, 2, 4``; ``eps_f``
   the factor precision's unit roundoff) until it is finite: a ladder of factorisations in
   one ``lax.while_loop`` (``_first_finite_factor``; the common case runs it once), so the
   program holds one factorisation. The system solved is still ``K + N damping``: the
   refinement (or CG) on the exact products removes the raised shift (the rank-4 kernel of
   mean-100 features at damping 1e-7 in float32: error 4.1e-5, where CG to the floor gave
   1.5e-3).

If no factor is finite the update is NaN (the transform then keeps its state).
With several devices the layers' statistics of all samples are gathered (:meth:`gather`);
generic rows stay on their device and only the kernel's blocks are gathered
(:class:`fishr.jacobian.ShardedRowsJacobian`). Every device solves the same ``N x N`` system.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fishr import distributed
from fishr.distributed import AxisName
from fishr.jacobian import LayerJacobian, kernel_cost_per_pair, kernel_from_tiles
from fishr.linalg import (
    UNROLL_FACTOR_MAX_TILES,
    SlabFactor,
    SolveInfo,
    TiledFactor,
    Tiles,
    cg,
    cholesky_factor,
    cholesky_factor_solve,
    eigh_solve,
    hermitian_from_lower_tiles,
    meets_backward_error,
    psd_inf_norm_bound,
    slab_block_rows,
    slab_cholesky_solve,
    solve_info,
    tile_array,
    tiled_cholesky,
    tiled_cholesky_slabs,
    tiled_cholesky_solve,
    tiled_factor_from_cholesky,
    tiled_trace,
    tree_inner,
)
from fishr.solvers import Eigh, Spectral
from fishr.spectral import DampingRule, robust_gamma, snr_weights, spectral_filter

__all__ = ["double_factor_pays", "energy_coefficients", "kernel_factorisation", "sample_weight_ratios",
           "solve_sample_space"]

MAX_STEPS = 50  # CG steps (a single-precision factor of double input); a good factor needs 3-5 (FLOOR_MARGIN)
# the CG behind a single-precision factor stops four digits past the backward-error test, or at stagnation
# (fishr.linalg.cg's floor_margin): the forward error had stopped changing there (float64, damping 1e-3: ViT
# N = 256, MLP and RBM N = 1,024 of benchmarks.sr_accuracy, 5 / 4 / 4 steps where the stagnation of CG's
# recursive residual alone took 12 / 10 / 8, the same errors 4.9e-13 / 1.2e-13 / 7.2e-15)
FLOOR_MARGIN = 1e-4
CG_STEPS_TYPICAL = 4  # CG steps behind a single-precision factor (those three: 4-5)
# A product pair's skinny matrix products run well below the matrix-multiply peak: float64, N = 1,024, jax
# 0.10.2, 41 / 53 GFLOP/s at P = 5,313 / 47,001 against 204; about a quarter
PAIR_SLOWDOWN = 4
# 1 - (double / single precision matrix-multiply throughput): what a factorisation and a kernel cost more in
# double precision, as a share of their double-precision cost (the benchmark CPU: 104-117 against 440-458
# GFLOP/s on jax 0.9.1, 0.73-0.77; 204 against 458 on jax 0.10.2, 0.55: the larger keeps the single factor more)
DOUBLE_PRECISION_PREMIUM = 0.73


def double_factor_pays(rows: int, n: int, kernel_cost: int, num_params: int) -> bool:
    """Whether double-precision input is solved faster with a double-precision factor, refined in two
    steps, than with the single-precision factor and its CG (about ``CG_STEPS_TYPICAL`` steps).

    Each CG step beyond the refinement's two is a product pair, ``4 R P`` flops (``R = N C``
    kernel rows, ``P`` parameters) at ``1 / PAIR_SLOWDOWN`` of the matrix-multiply peak; the
    double-precision factor costs its factorisation and kernel, ``R^3 / 3 + N^2 c`` flops
    (``c``: :func:`fishr.jacobian.kernel_cost_per_pair`) at the peak, with the premium
    ``DOUBLE_PRECISION_PREMIUM`` over single precision. So wide layers at moderate ``N`` take the
    double factor: float64, MLP 32-200-200-1 (``P = 47,001``) at ``N = 1,024``, in one process
    against the single factor's CG, 41.0 -> 31.9 ms on jax 0.10.2 (0.1.0: 29.0 ms; the CG to
    stagnation before ``FLOOR_MARGIN``: 57.9 -> 28.8 ms); on jax 0.9.1, with CG to stagnation,
    54.5 -> 42.7 ms (0.1.0: 28.5 ms); first call 2.4 -> 1.5-1.7 s. The MLP 16-64-64-1
    (``P = 5,313``) keeps the single factor (13.4 against 18.4 ms with the double one).
    ``num_params`` 0 (unknown) keeps it too.
    """
    factor = rows**3 / 3 + n * n * kernel_cost
    return DOUBLE_PRECISION_PREMIUM * factor < (CG_STEPS_TYPICAL - 2) * PAIR_SLOWDOWN * 4 * rows * num_params


def kernel_factorisation() -> str:
    """How the kernel is factored: ``"tiled"`` (the loop of :func:`fishr.linalg.tiled_cholesky`,
    on the CPU) or ``"lapack"`` (the backend's solver on the assembled kernel, on accelerators)."""
    return "tiled" if jax.default_backend() == "cpu" else "lapack"


def _single_precision(tree) -> bool:
    return any(jnp.finfo(leaf.dtype).bits < 64 for leaf in jax.tree.leaves(tree))


def sample_weight_ratios(weights: jax.Array, axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
    """``r_i = N w_i / sum_j w_j`` over all samples (mean 1), and whether the weights are usable
    (finite, ``>= 0``, positive sum); unusable weights make the update NaN."""
    weights = jnp.real(weights)
    total = distributed.psum(jnp.sum(weights), axis_name)
    n_total = distributed.batch_size(weights.shape[0], axis_name)
    ok = jnp.all(jnp.isfinite(weights)) & jnp.all(weights >= 0) & (total > 0)
    ok = distributed.pmean(ok.astype(weights.dtype), axis_name) == 1
    return n_total * weights / total, ok


def energy_coefficients(local_energies: jax.Array, num_components: int, holomorphic: bool, n_total: int,
                        axis_name: AxisName, ratios: Any = None, mean: Any = None) -> jax.Array:
    r"""The coefficients ``c`` (``(N, C)``, all samples) with ``Obar^H c`` the VMC force.

    ``e = E_loc - mean(E_loc)`` over all samples. Real ``log psi``: ``c = 2 Re(e) / N``
    (``g = 2 Re mean_i conj(Obar_i) e_i``); complex ``log psi`` of real parameters,
    whose rows stack ``Re O`` and ``Im O``: ``c = (2 Re e, 2 Im e) / N``; holomorphic:
    ``c = e / N`` (``g = Obar^H e / N``, the force without the factor 2 of real
    parameters). With sample weights (``ratios`` ``r_i``, mean 1; the rows are then
    ``sqrt(r_i) Obar_i`` centred by the weighted mean): ``e`` is centred by the weighted
    mean ``mean_i r_i E_i`` and ``c_i`` carries a factor ``sqrt(r_i)``, so that
    ``Obar^H c = 2 Re sum_i p_i conj(Obar_i) e_i`` with ``p_i = r_i / N``.
    ``mean``: a local mean (instead of gathering all samples) for the per-device coefficients.
    """
    e = local_energies if mean is not None else distributed.all_gather_batch(local_energies, axis_name)
    r = None
    if ratios is not None:
        r = ratios if mean is not None else distributed.all_gather_batch(ratios, axis_name)
    centre = mean if mean is not None else jnp.mean
    e = e - centre(e if r is None else r * e)
    if holomorphic:
        c = (e / n_total)[:, None]
    elif num_components == 2:
        c = jnp.stack([2 * jnp.real(e), 2 * jnp.imag(e)], axis=-1) / n_total
    else:
        c = (2 * jnp.real(e) / n_total)[:, None]
    return c if r is None else c * jnp.sqrt(r).astype(c.dtype)[:, None]


def _over_columns(fn: Callable, y: jax.Array) -> Any:
    """``fn`` of each column ``y[..., k]`` of an ``(N, C, R)`` array, stacked along a last axis."""
    return jax.vmap(fn, in_axes=-1, out_axes=-1)(y)


def _rows(jac) -> tuple[int, int]:
    """``(N, C)`` of a gathered Jacobian."""
    return jac.rows_shape


ASSEMBLED_MAX_ROWS = 2048  # padded kernel rows up to which LAPACK's factor is kept whole, not as tiles

# in row slabs (the tiled factorisation, few tiles), by tiles, or assembled (LAPACK's): the transpose
# U = L'^T of cholesky_factor's lower factor L' of conj(A), that is the upper factor L^H of A, row-major
Factor = SlabFactor | TiledFactor | jax.Array


def _factor_layout(nb: int, ts: int, kind: str, assembled: bool | None = None) -> str:
    """How :func:`_factor` holds the factor of ``nb`` tile rows of ``ts``: ``"assembled"`` (LAPACK's, up to
    ``ASSEMBLED_MAX_ROWS`` padded rows unless ``assembled`` says), ``"slabs"`` (the tiled factorisation, up to
    ``UNROLL_FACTOR_MAX_TILES`` tile rows) or ``"tiles"``; :func:`_nan_factor` builds the same structure."""
    if kind == "lapack":
        return "assembled" if (nb * ts <= ASSEMBLED_MAX_ROWS if assembled is None else assembled) else "tiles"
    return "slabs" if nb <= UNROLL_FACTOR_MAX_TILES else "tiles"


def _factor(tiles: Tiles, shift: Any, kind: str, assembled: bool | None = None) -> tuple[Factor, jax.Array]:
    """The factor of ``A + shift I`` from the lower tiles of ``A`` (padded; :func:`fishr.jacobian.tiled_kernel`'s,
    zero above the diagonal, or its :class:`fishr.linalg.ColumnTiles`), and whether it is finite.

    ``kind="tiled"``: up to ``UNROLL_FACTOR_MAX_TILES`` = 8 tile rows (up to 8,192 rows with
    :func:`fishr.linalg.tile_size`'s tiles) :func:`fishr.linalg.tiled_cholesky_slabs`, applied by
    :func:`fishr.linalg.slab_cholesky_solve` (a triangular solve per diagonal block, a
    matrix-vector product per row slab); beyond, :func:`fishr.linalg.tiled_cholesky`, applied by
    :func:`fishr.linalg.tiled_cholesky_solve` (loops of fixed program size). The slabs replaced
    an assembled upper factor and LAPACK's two triangular solves on it, which read one column at
    about a third of the speed of the products. Float32 structured update from ``g``
    (interleaved in one process, 2-core CPU, jax 0.9.1, medians of 60-400 calls, two runs): MLP
    16-64-64-64-1 at ``N = 1,024`` 8.05-8.10 -> 6.96-7.00 ms, at ``N = 2,048`` 42.6-44.1 ->
    34.5-34.9 ms; MLP 16-200-200-1 at ``N = 1,024`` 11.95-12.04 -> 10.93-10.95 ms; with local
    energies 8.9 -> 7.4 ms; float64 (the single-precision factor preconditions CG) 33.7 -> 28.9
    ms. The program holds ``2 B`` triangular solves and ``2 (B - 1)`` products per solve
    (``B <= 4`` block rows) where it held two: the first call (fresh processes, 3 each) 1.17-1.23 ->
    1.21-1.47 s at ``N = 1,024`` (4 block rows), 1.57-1.72 -> 1.62-2.02 s at 2,048 (4 block rows
    of two tiles; 35.8 ms warm). From 2,048 to 8,192 rows the tiles grow so that the matrix stays 8
    tile rows (:func:`fishr.linalg.tile_size`), factored unrolled into the slabs, where 9 or more
    tiles of 256 (512 from 6,144 rows) were factored and applied in loops (interleaved in one
    process, median of 7-40): ``N = 4,096`` 191-195 -> 156-157 ms (P = 5,313; 0.96-0.98x of 0.1.0's
    16 unrolled tiles, which compiled in 7-9 s), 222-232 -> 186-198 ms (P = 47,001), generic rows
    750 -> 718 ms, float64 310 -> 239 ms; ``N = 2,100`` (tiles of 288) 61.0 -> 48.6 ms; 3,000 (384)
    109.0 -> 86.7 ms; 6,144 500 -> 419 ms; 8,192 971 -> 946 ms; the first call within 0.1-0.4 s of
    the loops' (1.7-2.9 s).

    ``kind="lapack"``: the backend's Cholesky of the assembled matrix (accelerators, and the
    CPU's rare double-precision fallback). Up to ``ASSEMBLED_MAX_ROWS`` padded rows the factor
    is returned assembled, as :func:`fishr.linalg.cholesky_factor` gives it (the factor
    of ``conj(A)``), and applied by two triangular solves: one operation in the program
    (compiled once wherever the factor is applied: the CG preconditioner, the refinement, the
    fallback); beyond, as tiles for :func:`fishr.linalg.tiled_cholesky_solve`. ``assembled=True``
    keeps any size assembled (the fallback's factor: rare, so its program size counts,
    not its speed). It is held as ``U = L'^T`` (``L'`` :func:`fishr.linalg.cholesky_factor`'s
    factor of ``conj(A)``; ``U = L^H``, the upper factor of ``A``), row-major:
    the bytes of ``L'`` column-major, which LAPACK's triangular solve reads, so
    :func:`_apply_factor` passes ``U^T`` without a copy. Held as ``L'``, the factor
    leaves the shift ladder's loop row-major and XLA transposes it before the first solve
    (``N = 1,024``, float32: 1.7 ms of a 17 ms call).
    """
    nb, _, ts, _ = tiles.shape
    layout = _factor_layout(nb, ts, kind, assembled)
    factor: Factor
    if kind == "lapack":
        lower = cholesky_factor(hermitian_from_lower_tiles(tile_array(tiles)), shift)
        factor = jnp.swapaxes(lower, 0, 1) if layout == "assembled" else tiled_factor_from_cholesky(lower, ts)
        return factor, jnp.all(jnp.isfinite(factor.tiles if isinstance(factor, TiledFactor) else factor))
    if layout == "slabs":
        return tiled_cholesky_slabs(tiles, shift)
    # tiled_kernel leaves the tiles above the diagonal zero; the diagonal tiles' inverses are finite
    # exactly when the whole factor is (tiled_cholesky): no n x n pass or buffer for either
    tiled = tiled_cholesky(tile_array(tiles), shift, upper_zero=True)
    return tiled, jnp.all(jnp.isfinite(tiled.inv_diag))


def _nan_factor(tiles: Tiles, kind: str) -> Factor:
    """A NaN :class:`Factor` of the structure :func:`_factor` gives for ``tiles`` and ``kind``."""
    nb, _, ts, _ = tiles.shape
    nan = lambda *shape: jnp.full(shape, jnp.nan, tiles.dtype)
    layout = _factor_layout(nb, ts, kind)
    if layout == "assembled":
        return nan(nb * ts, nb * ts)
    if layout == "slabs":
        rows = slab_block_rows(nb, ts)
        return SlabFactor(tuple(nan(m, m) for m in rows), tuple(nan(m, sum(rows[:b])) for b, m in
                                                               enumerate(rows) if b))
    return TiledFactor(nan(*tiles.shape), nan(nb, ts, ts))


def _apply_factor(factor: Factor, u: jax.Array, rows: int) -> jax.Array:
    """``(A + shift I)^{-1} u`` from :func:`_factor`, for ``u`` whose leading axes hold ``rows`` rows."""
    def padded(dtype, n_pad):  # u as (n_pad, k) columns, zero past its rows
        return jnp.pad(u.reshape(rows, -1).astype(dtype), ((0, n_pad - rows), (0, 0)))

    if isinstance(factor, SlabFactor):  # the last block row may be short
        solved = slab_cholesky_solve(factor, padded(factor.diag[0].dtype, sum(d.shape[0] for d in factor.diag)))
    elif isinstance(factor, TiledFactor):
        solved = tiled_cholesky_solve(factor, padded(factor.tiles.dtype, factor.tiles.shape[0] * factor.tiles.shape[2]))
    else:
        solved = cholesky_factor_solve(jnp.swapaxes(factor, 0, 1), padded(factor.dtype, factor.shape[0]))
    return solved[:rows].reshape(u.shape).astype(u.dtype)


def _first_finite_factor(make: Callable, placeholder: Factor, count: int, start: int):
    """The first finite ``make(j)`` for ``j = start, start + 1, ... < count`` (a ladder of shifts).

    One ``lax.while_loop`` whose body holds the factorisation once (the common case runs it
    once), from ``placeholder``, a factor of ``make``'s structure (:func:`_nan_factor`).
    Returns ``(factor, finite, j)``: the last factor tried, whether it is finite, its rung.
    """
    def cond(carry):
        _, ok, j = carry
        return ~ok & (j + 1 < count)

    def body(carry):
        _, _, j = carry
        factor, ok = make(j + 1)
        return factor, ok, j + 1

    return lax.while_loop(cond, body, (placeholder, jnp.asarray(False), jnp.int32(start - 1)))


def _raised_shift_factor(tiles: jax.Array, shift: Any, raise_by: jax.Array, start: int):
    """The first finite LAPACK factor of ``A + (shift + raise_by[j]) I``, ``j = start, start + 1, ...``,
    kept assembled at every size (a rare path: LAPACK compiles in a fraction of the tiled loop's
    time). Returns ``(factor, j)``; ``j == len(raise_by)`` when none was finite (the factor is then NaN).
    """
    n_pad = tiles.shape[0] * tiles.shape[2]
    factor, ok, j = _first_finite_factor(lambda j: _factor(tiles, shift + raise_by[j], "lapack", assembled=True),
                                         jnp.full((n_pad, n_pad), jnp.nan, tiles.dtype), raise_by.shape[0], start)
    return factor, jnp.where(ok, j, raise_by.shape[0])


FIRST_ATTEMPT = 0  # the ladder's first rung (tests force the raised shift with 1)


def _refined_solve(apply: Callable, operator: Callable, u: jax.Array, finite: jax.Array, a_norm: Any, rows: int,
                   steps: int, follow: Callable | None = None):
    """``A^{-1} u`` by the factor's solve and ``steps`` (1 or 2) corrections on the exact products, unrolled.

    ``y0 = F u``, ``y1 = y0 + F (u - A y0)``, ``y2 = y1 + F (u - A y1)`` (``F = apply``, the
    factor of the computed kernel; ``A = operator``, the Jacobian's products). With two steps
    the second is taken only if the first reduced the residual (``||r1|| <= ||r0||``): a factor
    too far from ``A`` for the iteration to contract keeps the direct solve ``y0``, never a
    diverging iterate. Returns ``(y, info, good)``: ``info.converged`` is the LAPACK ``dsposv``
    backward-error test (:func:`fishr.linalg.meets_backward_error`) on the last residual
    computed (of ``y0`` for one step; of ``y1``, or of ``y0`` when it was kept, for two) and
    finite; ``info.iterations`` the corrections taken (0 when ``y0`` was kept).

    ``follow`` (robust SR's ``(S + d)^{-2}``): ``u`` is one column and ``y`` the pair
    ``(A^{-1} u, A^{-1} follow(A^{-1} u))``, refined as the two columns of one iteration whose
    second right-hand side follows the first column, ``[u, follow(y_k[0])]`` (``follow`` is
    affine; its start ``F follow(F u)``; after a single step the second column is corrected by
    ``F (follow(y1[0]) - follow(y0[0]))``, after two the lag is of second order): the factor is
    applied once or twice more than for one column, the products run on both columns at once.
    """
    if follow is None:
        target = lambda y: u
        y0 = apply(u)
    else:
        target = lambda y: jnp.stack([u, follow(y[..., 0])], axis=-1)
        first = apply(u)
        y0 = jnp.stack([first, apply(follow(first))], axis=-1)
    r0 = target(y0) - operator(y0)
    norm0 = jnp.sqrt(tree_inner(r0, r0))
    y1 = y0 + apply(r0)
    if steps == 1:
        if follow is not None:  # the second right-hand side moved with the first column's correction
            y1 = y1.at[..., 1].add(apply(follow(y1[..., 0]) - follow(y0[..., 0])))
        good = finite & jnp.all(jnp.isfinite(y1)) & meets_backward_error(r0, y0, a_norm, rows)
        return y1, solve_info(norm0, good, iterations=1), good
    r1 = target(y1) - operator(y1)
    norm1 = jnp.sqrt(tree_inner(r1, r1))
    contracts = norm1 <= norm0
    y = jnp.where(contracts, y1 + apply(r1), y0)
    tested, residual = jnp.where(contracts, y1, y0), jnp.where(contracts, r1, r0)
    good = finite & jnp.all(jnp.isfinite(y)) & meets_backward_error(residual, tested, a_norm, rows)
    return y, solve_info(jnp.where(contracts, norm1, norm0), good, iterations=jnp.where(contracts, 2, 0)), good


def kernel_solve(jac, shift: Any, solver, rhs: jax.Array, follow: Callable | None = None, refine: bool = True,
                 num_params: int = 0):
    """``y = (K + shift I)^{-1} rhs`` for ``rhs`` ``(N, C)`` or ``(N, C, R)`` (see the module docstring).

    ``shift`` is a number or a function of the kernel's trace ``tr K`` giving it (for
    conditioning control). ``follow(y, shift)``, if given, is a second right-hand side
    made from the first solution; it is solved with the same factor (robust SR's
    ``(S + d)^{-2}``) and ``y`` is then the pair ``(y1, y2)``.

    ``num_params`` (``P``; 0 unknown): with it, double-precision input on the CPU is factored in double
    precision where :func:`double_factor_pays`, else in single precision.

    ``refine=False`` (a caller that refines in parameter space next, the Woodbury form):
    a factor in the working precision, of the shift or of a raised one, is applied once,
    without the refinement on the exact products (``info.iterations`` 0; ``info.converged``
    only says the factor and ``y`` are finite: the caller tests its own residual); ``approx_ok``
    then holds for a raised shift too. Other factors ignore it.

    Returns ``(y, info, approx, approx_ok, shift, a_norm)``: ``approx(u)`` applies the factor
    (no refinement, no CG), for a correction step, usable where ``approx_ok`` (the factor is
    finite and, unless ``refine=False``, of the unraised shift, and its solve converged or
    its refinement contracted; otherwise a fallback ran); ``shift`` the shift used;
    ``a_norm`` a bound on ``||K + shift I||_inf`` (the backward-error tests').
    """
    n, c = _rows(jac)
    rows = n * c
    work = rhs.dtype
    real = jnp.finfo(work).dtype

    # the exact products run in loops (CG, refinement steps): the layers' inputs transposed once, outside
    products = jac.for_products() if isinstance(jac, LayerJacobian) else jac

    def operator(y):
        product = lambda v: products.matvec(products.rmatvec(v)).astype(work)
        ky = product(y) if y.ndim == 2 else _over_columns(product, y)
        return ky + shift * y

    def twice(solve_one):
        """Apply ``solve_one`` (``u -> (y, info, good)``) to ``rhs`` and, with ``follow``, to its follow-up."""
        y1, info1, good1 = solve_one(rhs)
        if follow is None:
            return y1, info1, good1
        y2, info2, good2 = solve_one(follow(y1, shift).astype(work))
        info = info1._replace(iterations=info1.iterations + info2.iterations,
                              residual_norm=jnp.maximum(info1.residual_norm, info2.residual_norm),
                              converged=info1.converged & info2.converged)
        return (y1, y2), info, good1 & good2

    if isinstance(solver, Eigh):
        kernel = jac.gram()
        if callable(shift):
            shift = shift(jnp.real(jnp.trace(kernel)).astype(real))
        direct = lambda u: eigh_solve(kernel, u.reshape(rows, -1), shift).reshape(u.shape)

        def eigh_one(u):
            y = direct(u)
            r = u - operator(y)
            ok = jnp.all(jnp.isfinite(y))
            return y, solve_info(jnp.sqrt(tree_inner(r, r)), ok), ok

        y, info, _ = twice(eigh_one)
        return y, info, direct, jnp.asarray(True), shift, psd_inf_norm_bound(kernel[None, None], rows) + shift

    kind = kernel_factorisation()
    # double input on the CPU: factor in single precision, unless the CG behind it would cost more
    single = kind == "tiled" and not _single_precision(rhs) and not double_factor_pays(
        rows, n, kernel_cost_per_pair(getattr(jac, "plan", None), num_params, c), num_params)
    tiles = (jac.single_precision() if single else jac).kernel_tiles(columns=kind == "tiled")
    if callable(shift):
        shift = shift(tiled_trace(tiles, rows).astype(real))
    k_norm = psd_inf_norm_bound(tiles, rows).astype(real)  # for the tests and the ladder: a bound suffices
    a_norm = k_norm + shift

    def raise_by(dtype):
        eps = jnp.finfo(dtype).eps / 2  # the unit roundoff of the factor's precision
        return jnp.asarray([0.0, 1.0, 1e2, 1e4], real) * eps * k_norm

    def pcg(factor, u, product=operator):
        precondition = lambda r: _apply_factor(factor, r, rows)
        return cg(product, u, None, rtol=0.0, atol=0.0, max_steps=MAX_STEPS,
                  preconditioner=precondition, backward_error=a_norm, stop_on_stagnation=True,
                  to_rounding_floor=True, floor_margin=FLOOR_MARGIN)

    if not single:
        # a factor in the working precision: the factor's solve refined on the exact products, no loop
        # but the ladder of shifts for a factor that is not finite (module docstring)
        shifts = shift + raise_by(tiles.dtype)
        factor, finite, j = _first_finite_factor(lambda j: _factor(tiles, shifts[j], kind), _nan_factor(tiles, kind),
                                                 shifts.shape[0], FIRST_ATTEMPT)
        apply = lambda u: _apply_factor(factor, u, rows)
        if not refine:
            # the factor's solve alone: the caller's step in parameter space corrects it, with the factor of
            # a raised shift as well (no refinement in the program: at N = 4,096 it cost 0.25 s of compile;
            # module docstring for that rare path's accuracy)
            y = apply(rhs)
            good = finite & jnp.all(jnp.isfinite(y))
            info = solve_info(jnp.asarray(jnp.nan, real), good, fallback=jnp.where(j > 0, 2, 0))
            return y, info, apply, good, shift, a_norm
        # two steps for the layers' kernel, centred through row means (the first step's residual carries
        # the cancellation); one for explicit rows, centred exactly, whose products cost N P each
        layers = getattr(jac, "plan", None) is not None and bool(jac.plan.layers)
        steps = 2 if layers else 1
        if follow is None or rhs.ndim != 2:
            y, info, good = twice(lambda u: _refined_solve(apply, operator, u, finite, a_norm, rows, steps))
        else:  # robust SR's two right-hand sides as two columns of one refinement
            pair, info, good = _refined_solve(apply, operator, rhs, finite, a_norm, rows, steps,
                                              lambda y1: follow(y1, shift).astype(work))
            y = (pair[..., 0], pair[..., 1])
        info = info._replace(fallback=jnp.where(j > 0, 2, 0).astype(jnp.int32))
        # the factor serves a correction step where it is the first rung's and the refinement contracted
        close = finite & (j == 0) & ((info.iterations > 0) | info.converged)
        return y, info, apply, close, shift, a_norm

    # a single-precision factor of double-precision input (the CPU): CG on the exact
    # products, preconditioned by the factor; the rare fallback runs under lax.cond and returns vectors only
    factor, finite = _factor(tiles, shift, kind)

    def cg_one(u):
        y, info = pcg(factor, u)
        return y, info, finite & info.converged

    y, info, good = twice(cg_one)

    def fallback(_):
        # 1: the double-precision kernel (2 if its shift had to be raised as well)
        f_tiles = jac.kernel_tiles(compact=True)  # a rare path: its program size counts, not its speed
        assert isinstance(f_tiles, jax.Array)  # compact tiles are never ColumnTiles
        f, j = _raised_shift_factor(f_tiles, shift, raise_by(work), 0)
        code = jnp.where(j > 0, 2, 1)
        # CG on the assembled kernel the factor was made from (one matrix product, not the
        # Jacobian's products again: the fallback's share of the program, see the module docs)
        kernel = kernel_from_tiles(f_tiles, rows).astype(work)

        def assembled(y):
            flat = y.reshape(rows, -1)
            return (kernel @ flat).reshape(y.shape) + shift * y

        y_f, info_f, _ = twice(lambda u: pcg(f, u, assembled) + (jnp.asarray(True),))
        return y_f, info_f._replace(fallback=code.astype(jnp.int32))

    def first(_):
        return y, info._replace(fallback=jnp.asarray(0, jnp.int32))

    y, info = lax.cond(good, first, fallback, None)
    return y, info, lambda u: _apply_factor(factor, u, rows), good, shift, a_norm


def _spectral_coefficients(jac, kernel_eig, coeffs, solver, damping, gamma, rule, num_params):
    """The filter ``f(sigma)`` on the kernel's eigenvalues, ``f(0)``, and the damping used (:mod:`fishr.spectral`)."""
    lam, vecs = kernel_eig
    n, c = _rows(jac)
    rows = n * c
    lam = jnp.maximum(lam, 0)
    sigma = lam / n
    sigma_max = jnp.max(sigma)
    # S has P eigenvalues: those of K / N, and zeros when P exceeds the kernel's size
    h_min = jnp.zeros((), sigma.dtype) if num_params > rows else jnp.sort(sigma)[rows - num_params]
    damping = rule(damping, jnp.sum(sigma), sigma_max, h_min)
    weights = None
    if solver.snr is not None:
        # Q_ik = sqrt(lambda_k) sum_c conj(V[(i, c), k]) N c_ic: sample i's share of rho_k = u_k^H g_E
        q = jnp.sqrt(lam) * jnp.einsum("ick,ic->ik", vecs.reshape(n, c, rows).conj(), n * coeffs)
        weights = snr_weights(q, solver.snr)
    options = dict(gamma=gamma, rtol=solver.rtol, rtol_smooth=solver.rtol_smooth, sigma_max=sigma_max)
    f = spectral_filter(sigma, damping, weights=weights, **options)
    f0 = spectral_filter(jnp.zeros((), sigma.dtype), damping, **options)
    return f, f0, lam, damping


def _spectral_sample_space(jac, b, damping, solver, local_energies, axis_name, holomorphic, momentum_term,
                           gamma, rule, num_params, ratios=None):
    """``x = f(S) b`` through the kernel's eigendecomposition ``K = V diag(lambda) V^H`` (``sigma = lambda / N``).

    For ``b = Obar^H c + d w`` (the force of the energies, SPRING's term ``w``) and for any
    ``b`` (no energies), with ``h(lambda) = (f(lambda / N) - f(0)) / lambda`` (0 where
    ``lambda = 0``):

        f(S) Obar^H c = Obar^H V diag(f(sigma)) V^H c,
        f(S) v = f(0) v + Obar^H V diag(h(lambda)) V^H Obar v,

    exact because ``S Obar^H = Obar^H K / N``; nothing is divided by the damping or by a
    small eigenvalue (``h`` multiplies components of size ``sqrt(lambda)`` twice).
    """
    n, c = _rows(jac)
    rows = n * c
    work = jax.eval_shape(jac.matvec, b).dtype
    kernel = jac.gram().astype(work)
    lam, vecs = jnp.linalg.eigh(kernel)
    coeffs = None
    if local_energies is not None:
        coeffs = energy_coefficients(local_energies, c, holomorphic, n, axis_name, ratios).astype(work)
    elif solver.snr is not None:
        raise ValueError("fishr.sr: Spectral(snr=...) needs `local_energies=` (the SNR is that of the force).")
    f, f0, lam, damping = _spectral_coefficients(jac, (lam, vecs), coeffs, solver, damping, gamma, rule,
                                                 num_params)
    h = jnp.where(lam > 0, (f - f0) / jnp.where(lam > 0, lam, 1), 0)

    def through(weights, u):  # Obar^H V diag(weights) V^H u for u of shape (N, C)
        z = vecs @ (weights * (vecs.conj().T @ u.reshape(rows)))
        return jac.rmatvec(z.reshape(n, c))

    def of_vector(v):  # f(S) v for any v
        return optax.tree.add(optax.tree.scale(f0, v), through(h, jac.matvec(v)))

    if coeffs is None:
        x = of_vector(b)
        if momentum_term is not None:
            x = optax.tree.add(x, optax.tree.scale(damping, of_vector(momentum_term)))
    else:
        x = through(f, coeffs)
        if momentum_term is not None:
            x = optax.tree.add(x, optax.tree.scale(damping, of_vector(momentum_term)))
    return x, solve_info(0.0, jnp.all(jnp.isfinite(lam))), damping


def solve_sample_space(jac, b, damping, solver, local_energies=None, axis_name: AxisName = None,
                       holomorphic: bool = False, momentum_term=None, gamma=None,
                       rule: DampingRule = DampingRule(),
                       num_params: int = 0, ratios: Any = None) -> tuple[Any, SolveInfo, Any]:
    """``(S + d I)^{-1} (b + d w)`` (or robust SR's ``G(S) (b + d w)``) by the sample-space forms of the
    module docstring, ``w = momentum_term`` (SPRING's term; ``None`` for none) and ``d`` the damping used
    (after ``rule``), so that the momentum term follows a raised damping.

    With ``local_energies`` the right-hand side is the VMC force they define in place of
    ``b``, and ``b`` serves only to measure ``info.residual_norm``: a ``b`` that is not that
    force (a regulariser added to the gradient, say) shows there as a residual of its size.

    ``gamma``: robust SR (:func:`fishr.spectral.sr_gain`; ``None`` plain SR), applied as
    ``G(S) = (S + d)^{-1} + (gamma d^2 - d) (S + d)^{-2}`` with one factor;
    ``rule``: the damping used (:class:`fishr.spectral.DampingRule`; with a factorisation
    ``h_max`` is bounded by ``tr S``, with :class:`fishr.Spectral` it is exact);
    ``num_params``: ``P``.

    Returns ``(x, info, damping_used)``: ``info.iterations`` counts the kernel solve's
    refinement steps (a factor in the working precision) or preconditioned CG steps,
    ``info.fallback`` its fallback (module docstring),
    ``info.residual_norm`` is ``||b - (S + damping) x||`` in parameter space and
    ``info.converged`` whether the kernel solve met the backward-error test (the Woodbury
    form without robust SR: and whether that residual in parameter space meets it too; a
    factor in the working precision is not refined there, so that test alone); a kernel
    solve that broke down, or whose factors were all non-finite, gives a NaN ``x``.
    """
    jac = jac.gather()  # every device now holds the statistics of all N samples
    n, c = _rows(jac)
    w_input = momentum_term
    tested_norm = None  # a bound on ||S + d||_inf where the last residual decides `converged`

    def s_matvec(v):
        return optax.tree.scale(1.0 / n, jac.rmatvec(jac.matvec(v)))

    if isinstance(solver, Spectral):
        x, info, damping = _spectral_sample_space(jac, b, damping, solver, local_energies, axis_name, holomorphic,
                                                  momentum_term, gamma, rule, num_params, ratios)
    else:
        shift = (lambda trace: n * rule(damping, trace / n)) if rule.active else n * damping

        def woodbury(v, y, d):  # (S + d)^{-1} v = (v - Obar^H y) / d with y = (K + N d)^{-1} Obar v
            return optax.tree.scale(1.0 / d, optax.tree.sub(v, jac.rmatvec(y)))

        if local_energies is None:
            # (S + d)^{-1} (b + d w) = W(b) + w - Obar^H (K + N d)^{-1} Obar w: both columns in one solve
            u = jac.matvec(b)
            if momentum_term is not None:
                u = jnp.stack([u, jac.matvec(momentum_term)], axis=-1)
            # no refinement of the kernel solve: the step in parameter space below corrects it
            y, info, approx, approx_ok, shift, a_norm = kernel_solve(jac, shift, solver, u, refine=False,
                                                                     num_params=num_params)
            assert not isinstance(y, tuple)  # one right-hand side (no follow-up)
            damping = shift / n
            x = woodbury(b, y if momentum_term is None else y[..., 0], damping)
            if momentum_term is not None:
                x = optax.tree.add(x, optax.tree.sub(momentum_term, jac.rmatvec(y[..., 1])))
            rhs = b if momentum_term is None else optax.tree.add_scale(b, damping, momentum_term)
            r = optax.tree.sub(rhs, optax.tree.add_scale(s_matvec(x), damping, x))  # one step of refinement
            step = woodbury(r, approx(jac.matvec(r)), damping)
            x = optax.tree.add(x, optax.tree.where(approx_ok, step, optax.tree.zeros_like(step)))
            if gamma is None:  # the system solved is (S + d) x = rhs: its residual decides `converged`
                tested_norm = a_norm / n
            else:  # G(S) b = x + (gamma d - 1) d (S + d)^{-1} x: a second factor (pass energies)
                y2, info2, *_ = kernel_solve(jac, shift, solver, jac.matvec(x), num_params=num_params)
                scale = robust_gamma(gamma, damping) * damping - 1
                x = optax.tree.add(x, optax.tree.scale(scale, optax.tree.sub(x, jac.rmatvec(y2))))
                info = info._replace(iterations=info.iterations + info2.iterations,
                                     converged=info.converged & info2.converged,
                                     fallback=jnp.maximum(info.fallback, info2.fallback))
        else:
            coeffs = energy_coefficients(local_energies, c, holomorphic, n, axis_name, ratios).astype(
                jax.eval_shape(jac.matvec, b).dtype)
            # (S + d)^{-1} (Obar^H c + d w) = Obar^H y1 + w, y1 = (K + N d)^{-1} (N c - Obar w): no division
            w_rows = None if momentum_term is None else jac.matvec(momentum_term)
            rhs = n * coeffs if w_rows is None else n * coeffs - w_rows
            follow = None
            if gamma is not None:  # (S + d)^{-2} term: y2 = (K + N d)^{-1} (N d y1 - Obar w)
                follow = lambda y1, sh: sh * y1 if w_rows is None else sh * y1 - w_rows
            y, info, _, _, shift, _ = kernel_solve(jac, shift, solver, rhs, follow, num_params=num_params)
            damping = shift / n
            if gamma is None:
                x = jac.rmatvec(y)
            else:  # G(S) b = Obar^H (y1 + (gamma d - 1) y2) + gamma d w
                y1, y2 = y
                g = robust_gamma(gamma, damping)
                x = jac.rmatvec(y1 + (g * damping - 1) * y2)
                if momentum_term is not None:
                    momentum_term = optax.tree.scale(g * damping, momentum_term)
            if momentum_term is not None:
                x = optax.tree.add(x, momentum_term)
    if momentum_term is not None:  # the system solved: b + d w with the damping used
        b = optax.tree.add_scale(b, damping, w_input)
    r = optax.tree.sub(b, optax.tree.add_scale(s_matvec(x), damping, x))
    if tested_norm is not None:  # the Woodbury form: LAPACK's backward-error test on the system solved
        info = info._replace(converged=info.converged & meets_backward_error(r, x, tested_norm))
    return x, info._replace(residual_norm=jnp.sqrt(tree_inner(r, r))), damping
