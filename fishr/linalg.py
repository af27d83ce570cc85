"""Damped linear solves shared by every preconditioner in fishr.

* :class:`SolveInfo`: the diagnostics every solve returns (iterations, residual,
  convergence, fallback).
* :func:`cg`: pytree-aware conjugate gradient for a Hermitian positive-definite
  operator given as a function, returning diagnostics (iterations, the final
  residual norm, convergence) that ``jax.scipy.sparse.linalg.cg`` does not report,
  and NaN where its result is worse than zero (divergence).
* :func:`cholesky_solve`: ``(A + damping I)^{-1} B`` for a dense Hermitian PSD
  matrix by one Cholesky factorisation (:func:`cholesky_factor` and
  :func:`cholesky_factor_solve` when the factor is reused).
* :func:`tiled_cholesky` / :func:`tiled_cholesky_solve`: the same for a matrix given
  as tiles (its blocks on and below the diagonal), factored tile by tile in loops of a
  fixed program size, so compile time does not grow with the matrix.
* :func:`eigh_solve` / :func:`psd_inverse`: the damped solve by ``eigh``, and the
  explicit damped inverse by Cholesky or by ``eigh``.
* :func:`trace_damping` / :func:`pi_damping`: the diagonal shifts used by
  Kronecker-factored methods.

Non-finite inputs: every routine here propagates NaN instead of hiding it (a
NaN right-hand side gives a NaN solution, never a silently finite one), so a
caller can detect the bad step with ``optax.apply_if_finite`` or its own check.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

__all__ = [
    "FEW_TILES_MAX_N",
    "SLAB_MAX_BLOCKS",
    "SOLVE_SEGMENTS",
    "UNROLL_FACTOR_MAX_TILES",
    "UNROLL_SOLVE_MAX_TILES",
    "ColumnTiles",
    "SlabFactor",
    "SolveInfo",
    "TiledFactor",
    "cg",
    "cholesky_factor",
    "cholesky_factor_solve",
    "cholesky_solve",
    "eigh_solve",
    "from_tiles",
    "hermitian_from_lower_tiles",
    "lower_pair",
    "lower_tile",
    "meets_backward_error",
    "pi_damping",
    "psd_inf_norm_bound",
    "psd_inverse",
    "slab_block_rows",
    "slab_cholesky_solve",
    "solve_info",
    "tile_array",
    "tile_size",
    "tiled_cholesky",
    "tiled_cholesky_slabs",
    "tiled_cholesky_solve",
    "tiled_diagonal",
    "tiled_factor_from_cholesky",
    "tiled_inf_norm",
    "tiled_trace",
    "to_tiles",
    "trace_damping",
    "tree_inner",
]


class SolveInfo(NamedTuple):
    """Diagnostics of one linear solve, the same for every solver and method.

    Attributes:
      iterations: CG iterations, or the refinement steps of a direct solve (``int32``;
        0 for a plain direct solve).
      residual_norm: ``||b - A x||_2`` at exit, recomputed from ``x`` (not CG's
        recursive estimate); the system ``A`` includes the damping.
      converged: whether the solve met its stopping test (CG: the tolerance within
        ``max_steps``; a direct solve: a finite factorisation and solution, and for the
        sample-space solve LAPACK's backward-error test on its residual, see
        ``fishr._sample_space``).
      fallback: which safer path produced ``x`` (``int32``): 0 none; 1 a
        double-precision factorisation after the single-precision one failed or did
        not refine; 2 the damping raised after both failed (see the sample-space solve);
        3 the spectral pseudo-inverse after a dense SR Cholesky factor was not finite.
    """

    iterations: jax.Array
    residual_norm: jax.Array
    converged: jax.Array
    fallback: jax.Array


def solve_info(residual_norm: Any, converged: Any, iterations: Any = 0, fallback: Any = 0) -> SolveInfo:
    """A :class:`SolveInfo` with the canonical dtypes (``int32``, real, ``bool``, ``int32``)."""
    residual_norm = jnp.asarray(residual_norm)
    return SolveInfo(
        iterations=jnp.asarray(iterations, jnp.int32),
        residual_norm=jnp.real(residual_norm),
        converged=jnp.asarray(converged, bool),
        fallback=jnp.asarray(fallback, jnp.int32),
    )


def tree_inner(x: Any, y: Any) -> jax.Array:
    """Real part of the Hermitian inner product ``sum conj(x) * y`` over all leaves."""
    return jnp.real(optax.tree.vdot(x, y))


def _axpy(alpha: jax.Array, x: Any, y: Any) -> Any:
    """``alpha * x + y`` leaf by leaf, keeping each leaf of ``y`` in its own dtype."""
    return jax.tree.map(lambda xi, yi: (yi + alpha * xi).astype(yi.dtype), x, y)


def _tree_size(tree: Any) -> int:
    return sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(tree))


def _max_abs(tree: Any) -> jax.Array:
    return jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)) for leaf in jax.tree.leaves(tree)]))


def meets_backward_error(r: Any, x: Any, a_norm: Any, size: int | None = None) -> jax.Array:
    """LAPACK ``dsposv``'s test: ``||r||_inf <= ||x||_inf ||A||_inf eps sqrt(size)``.

    ``r = b - A x`` for a system of ``size`` unknowns (default: the entries of ``x``); ``eps``
    is the working precision's (of ``r``'s leaves, promoted). True when ``x`` has the backward
    error of a direct solve in that precision.
    """
    if size is None:
        size = _tree_size(x)
    real = jnp.finfo(jnp.result_type(*jax.tree.leaves(r))).dtype
    bound = jnp.asarray(a_norm, real) * jnp.finfo(real).eps * jnp.sqrt(jnp.asarray(size, real))
    return _max_abs(r) <= _max_abs(x) * bound


def cg(
    matvec: Callable[[Any], Any],
    b: Any,
    x0: Any | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_steps: Any | None = None,
    preconditioner: Callable[[Any], Any] | None = None,
    backward_error: Any | None = None,
    stop_on_stagnation: bool = False,
    to_rounding_floor: bool = False,
    denominator_floor: float = 0.0,
    min_iterations: int = 0,
    floor_margin: float | None = None,
) -> tuple[Any, SolveInfo]:
    r"""(Preconditioned) conjugate gradient for ``A x = b`` with ``A`` Hermitian positive definite.

    ``b`` and ``x0`` are pytrees of the same structure; ``matvec(v)`` returns
    ``A v`` with that structure. Inner products are ``Re sum conj(u) v``, so
    complex Hermitian operators are handled as well as real symmetric ones.
    ``preconditioner(r)`` applies an approximate inverse ``M^{-1}`` of ``A``
    (Hermitian positive definite); CG then minimises the error in the ``A`` norm over
    the Krylov space of ``M^{-1} A``, and converges in few iterations when ``M`` is close
    to ``A`` (a factor of a nearby matrix: fishr's sample-space solve).

    The iteration stops when ``||r||_2 <= max(rtol * ||b||_2, atol)``, or, with
    ``backward_error = ||A||_inf``, also when ``||r||_inf <= ||x||_inf ||A||_inf eps
    sqrt(n)`` (LAPACK ``dsposv``'s test: the backward error of a direct solve in the
    working precision), or after ``max_steps`` iterations (default ``10 * size(b)``,
    as in ``jax.scipy``; it may be a traced value). With ``stop_on_stagnation`` it also
    stops once an iteration no longer halves ``||r||_2`` (the rounding floor of the
    products has been reached; ``converged`` is then whether the tests above hold).
    With ``to_rounding_floor`` (which needs ``stop_on_stagnation``) the tolerance tests
    only decide ``converged``, and the iteration runs on to stagnation: the backward
    error of a direct solve allows forward errors of ``cond(A) eps``, while a few more
    steps of a well-preconditioned CG reach the attainable accuracy of the products.
    The recursive residual CG tests is not ``b - A x``: once the true residual has reached
    its rounding floor, the recursion's keeps falling at the preconditioner's rate (on
    fishr's float64 sample-space solves behind a float32 factor, 3-5 orders of magnitude a
    step, for 5-8 steps after the true residual stopped: the ViT, MLP and RBM of
    ``benchmarks.sr_accuracy``), so stagnation alone runs steps that change nothing.
    ``floor_margin`` (with ``to_rounding_floor`` and ``backward_error``) also stops once the
    residual meets the backward-error test ``floor_margin`` times tightened: four digits
    (``1e-4``) past that test the forward error had stopped changing on those solves.
    ``denominator_floor`` bounds the two divisions of each iteration from below
    (``alpha = |r|^2 / max(floor, p.Ap)``, ``beta = |r_new|^2 / max(floor, |r|^2)``),
    which reproduces guarded variants of CG; 0 means unguarded.
    ``min_iterations`` iterations are taken before the stopping test is first
    applied (capped by ``max_steps``): 1 reproduces loops that test only after an
    update, such as qmlhc's ``cg_solve`` (which thus never returns ``x0`` itself).

    Breakdown and divergence. A search direction ``p`` with no curvature left,
    ``p.Ap <= eps * max_k(p_k.Ap_k / |p_k|^2) * |p|^2`` (``eps`` the working
    precision's), lies in the null space of ``A`` to working precision; a step along
    it would grow ``x`` without bound (the 1e33 "solutions" of a singular ``A`` with
    ``b`` outside its range), so the iteration stops before it. After the loop the
    residual is recomputed from ``x`` (one more ``matvec``). In exact arithmetic every
    CG iterate on a positive-definite ``A`` has ``||b - A x_k|| <= sqrt(cond(A))
    ||b - A x0||``, and ``cond(A) > 1 / eps`` makes ``A`` singular to working
    precision. The result is unusable, and returned as NaN so that a caller's
    finiteness check rejects it, when it is not finite, when CG broke down before
    meeting its tolerance (no solution: ``b`` has a part in the null space), or when
    ``||b - A x|| > max(||b||, ||b - A x0||) / sqrt(eps)``. A truncated solve
    (``max_steps`` reached above the tolerance) is returned with ``converged=False``.

    Args:
      matvec: the linear operator ``v -> A v``.
      b: right-hand side.
      x0: initial guess; ``None`` means zeros (and saves one ``matvec``).
      rtol: tolerance on the residual norm relative to ``||b||``.
      atol: absolute tolerance on the residual norm.
      max_steps: maximum number of iterations (``>= 0``).
      preconditioner: ``r -> M^{-1} r``; ``None`` for plain CG.
      backward_error: ``||A||_inf`` for the backward-error stopping test; ``None`` for none.
      stop_on_stagnation: stop when an iteration does not halve the residual norm.
      to_rounding_floor: iterate until stagnation even once the tolerance is met.
      denominator_floor: lower bound on the CG denominators (see above).
      min_iterations: iterations taken regardless of the residual (see above).
      floor_margin: with ``to_rounding_floor``, stop once the backward-error test holds with
        its bound scaled by this factor (see above); ``None`` iterates to stagnation.

    Returns:
      ``(x, SolveInfo)``.
    """
    if max_steps is None:
        max_steps = 10 * _tree_size(b)
    if rtol < 0 or atol < 0:
        raise ValueError(f"cg: `rtol` and `atol` must be >= 0, got rtol={rtol}, atol={atol}.")
    if floor_margin is not None and not (0 < floor_margin <= 1):
        raise ValueError(f"cg: `floor_margin` must be in (0, 1], got {floor_margin}.")
    if floor_margin is not None and not (to_rounding_floor and backward_error is not None):
        raise ValueError("cg: `floor_margin` needs `to_rounding_floor=True` and `backward_error` (the test it "
                         "tightens); without them it would be ignored.")
    if to_rounding_floor and not stop_on_stagnation:
        raise ValueError("cg: `to_rounding_floor` needs `stop_on_stagnation=True` (it would never stop early).")
    precondition = (lambda r: r) if preconditioner is None else preconditioner

    if x0 is None:
        x0 = optax.tree.zeros_like(b)
        r0 = b
    else:
        r0 = optax.tree.sub(b, matvec(x0))
    rr0 = tree_inner(r0, r0)
    b_norm2 = tree_inner(b, b)
    threshold2 = jnp.maximum(rtol**2 * b_norm2, atol**2)
    floor = jnp.asarray(denominator_floor, dtype=rr0.dtype)
    eps = jnp.finfo(rr0.dtype).eps

    def met(x, r, rr):
        done = rr <= threshold2
        if backward_error is not None:
            done = done | meets_backward_error(r, x, backward_error, _tree_size(b))
        return done

    # Each scalar of the loop body is a kernel of its own on XLA's CPU backend (~1-2 us, against
    # ~110 us for the whole iteration of a small lazy SR product), so the body computes only what
    # the next iteration needs: the breakdown, stopping and stagnation tests are evaluated in
    # `cond` from carried scalars, and a breakdown zeroes the step (x and r stay exactly as
    # they were) instead of selecting between old and new vectors.
    guarded = denominator_floor != 0.0
    bounded = (lambda d: jnp.maximum(d, floor)) if guarded else (lambda d: d)
    # breakdown: no curvature left along p (A singular to working precision there)
    no_curvature = lambda pap, pp, curvature_max: ~(pap > eps * curvature_max * pp)

    def cond(carry):
        x, r, _, _, rr, rr_last, pap, pp, curvature_max, k = carry
        broke = no_curvature(pap, pp, curvature_max)
        go = (k < max_steps) & ~broke
        if not to_rounding_floor:
            go = go & (~met(x, r, rr) | (k < min_iterations))
        if stop_on_stagnation:
            go = go & (rr <= 0.25 * rr_last)
        if floor_margin is not None and backward_error is not None:  # with to_rounding_floor (checked above)
            go = go & ~meets_backward_error(r, x, backward_error * floor_margin, _tree_size(b))
        return go

    def body(carry):
        # the preconditioner and the operator appear once each in the program: the search
        # direction is updated at the start of an iteration (p = 0 before the first)
        x, r, p, rz, rr, _, _, pp, curvature_max, k = carry
        z = precondition(r)
        rz_new = rr if preconditioner is None else tree_inner(r, z)  # plain CG: r.z = r.r, already known
        beta = rz_new / bounded(rz)
        p_new = _axpy(beta, p, z)
        ap = matvec(p_new)
        pap = tree_inner(p_new, ap)
        # |p|^2 for the breakdown test: plain CG keeps r orthogonal to the last direction, so
        # |r + beta p|^2 = |r|^2 + beta^2 |p|^2 (one reduction less per iteration); the test
        # only compares it with eps-sized quantities
        pp = rr + beta**2 * pp if preconditioner is None else tree_inner(p_new, p_new)
        curvature_max = jnp.maximum(curvature_max, pap / pp)
        alpha = jnp.where(no_curvature(pap, pp, curvature_max), 0, rz_new / bounded(pap))
        x = _axpy(alpha, p_new, x)
        r = _axpy(-alpha, ap, r)
        return (x, r, p_new, rz_new, tree_inner(r, r), rr, pap, pp, curvature_max, k + 1)

    # rz = 1: any finite value (it multiplies p = 0 in the first iteration); the last |r|^2 of
    # 4 |r0|^2 passes the stagnation test, and pAp = 1 with |p|^2 = 0 the breakdown test
    one = jnp.ones((), rr0.dtype)
    zero = jnp.zeros((), rr0.dtype)
    init = (x0, r0, optax.tree.zeros_like(r0), one, rr0, 4 * rr0, one, zero, zero, jnp.int32(0))
    x, r, _, _, rr, _, pap, pp, curvature_max, k = lax.while_loop(cond, body, init)
    broke = no_curvature(pap, pp, curvature_max)
    k = k - broke.astype(jnp.int32)  # the iteration that broke down took no step
    converged = met(x, r, rr)
    r = optax.tree.sub(b, matvec(x))
    r_norm2 = tree_inner(r, r)
    grown = r_norm2 * eps > jnp.maximum(b_norm2, rr0)
    usable = jnp.isfinite(r_norm2) & ~grown & ~(broke & ~converged)
    x = jax.tree.map(lambda v: jnp.where(usable, v, jnp.nan), x)
    return x, solve_info(jnp.sqrt(r_norm2), usable & converged, k)


def _add_to_diagonal(a: jax.Array, shift) -> jax.Array:
    return a + shift * jnp.eye(a.shape[-1], dtype=a.dtype)


def cholesky_factor(a: jax.Array, damping: Any = 0.0) -> jax.Array:
    """The Cholesky factor of ``a + damping I`` that :func:`cholesky_factor_solve` uses.

    For Hermitian PSD ``a``, batched over leading axes. Only the upper triangle of
    ``a`` (``a[..., i, j]`` with ``i <= j``) is read; it defines the Hermitian
    matrix, and what lies below the diagonal does not matter (callers may leave
    it unset: :meth:`fishr.jacobian.LayerJacobian.gram` with ``upper_only=True``).

    The factorisation is of ``a^T = conj(a) = L' L'^H`` and ``L'`` is returned:
    LAPACK wants a column-major operand, and ``a^T`` of a row-major ``a`` is that
    operand without a copy, whereas factoring ``a`` itself makes XLA write a
    transposed copy first, a strided pass that cost more than the factorisation
    (17 of ~35 ms for ``n = 1024`` in float32 on a 2-core CPU). A matrix that is
    not positive definite gives a NaN factor (never a silently finite one).
    """
    return jax.lax.linalg.cholesky(jnp.swapaxes(_add_to_diagonal(a, damping), -1, -2), symmetrize_input=False)


def cholesky_factor_solve(factor: jax.Array, b: jax.Array) -> jax.Array:
    """``(a + damping I)^{-1} b`` from ``factor = cholesky_factor(a, damping)``.

    ``b`` may be a vector ``(n,)`` or a matrix ``(n, k)`` (batched like the factor).
    The factor is of ``conj(a)``, so ``x = conj(cho_solve(L', conj(b)))``.
    """
    if jnp.iscomplexobj(factor):
        return jax.scipy.linalg.cho_solve((factor, True), b.conj()).conj()
    return jax.scipy.linalg.cho_solve((factor, True), b)


GRAM_BLOCKS = 2  # upper_gram: column blocks of the rows (each product at least 32 columns wide)


def upper_gram(rows: jax.Array) -> jax.Array:
    """``rows^H rows`` (``P x P`` from ``N x P`` rows) with only its upper triangle valid.

    The columns in ``GRAM_BLOCKS`` blocks, the products ``R_i^H R_j`` for ``i <= j`` alone
    (zeros below the block diagonal): 3 of 4 blocks' arithmetic, what
    :func:`cholesky_factor` reads. Measured (RBM rows, factor and solve included, 2-core
    CPU, jax 0.10.2, medians of 41 calls interleaved with NetKet's ``QGTJacobianDense``
    Cholesky solve): float64 ``N = 1,024``, ``P = 1,104`` 0.87x of NetKet's time (one product:
    1.01x), ``N = 2,048``, ``P = 288`` 0.83x (0.95x); float32 0.65x (0.70x) and 0.74x (0.82x).
    Four blocks (10 of 16) were 3-5% faster still in float64 but compiled 0.05 s longer
    (0.31 -> 0.36 s, fresh processes; two blocks 0.31-0.32 s): two repay no compile time.
    """
    p = rows.shape[-1]
    if p < 32 * GRAM_BLOCKS:
        return rows.conj().T @ rows
    edges = np.linspace(0, p, GRAM_BLOCKS + 1).astype(int)
    cols = [rows[:, lo:hi] for lo, hi in itertools.pairwise(edges)]
    block_rows = [jnp.concatenate([cols[i].conj().T @ cols[j] if j >= i else
                                   jnp.zeros((cols[i].shape[1], cols[j].shape[1]), rows.dtype)
                                   for j in range(GRAM_BLOCKS)], axis=1) for i in range(GRAM_BLOCKS)]
    return jnp.concatenate(block_rows, axis=0)


def hermitian_from_upper(a: jax.Array) -> jax.Array:
    """The Hermitian matrix whose upper triangle is ``a``'s (what lies below the diagonal ignored)."""
    upper = jnp.triu(a)
    return upper + jnp.triu(a, 1).conj().swapaxes(-1, -2)


def cholesky_solve(a: jax.Array, b: jax.Array, damping: Any = 0.0) -> jax.Array:
    """``(a + damping I)^{-1} b`` for Hermitian PSD ``a`` by a Cholesky factorisation.

    ``b`` may be a vector ``(n,)`` or a matrix ``(n, k)`` (with ``a`` and ``b`` batched
    over leading axes alike). Reads only the upper triangle of ``a``; a matrix
    that is not positive definite gives NaN in the result (see :func:`cholesky_factor`).
    """
    return cholesky_factor_solve(cholesky_factor(a, damping), b)


# --------------------------------------------------------------------------- tiled Cholesky, fixed program size

UNROLL_FACTOR_MAX_TILES = 8  # tiled_cholesky unrolls up to this many tile rows (n <= 8,192, tile_size), loops beyond
FEW_TILES_MAX_N = 8192  # tile_size keeps matrices up to this size in UNROLL_FACTOR_MAX_TILES tile rows


def tile_size(n: int) -> int:
    """Rows per tile of :func:`tiled_cholesky` for an ``n x n`` matrix.

    ``n`` rounded up to a multiple of 8 up to 256 (one tile); 256 up to ``n = 2,048``; above,
    up to ``FEW_TILES_MAX_N`` = 8,192, ``n / 8`` rounded up to a multiple of 32, so that the
    matrix stays ``UNROLL_FACTOR_MAX_TILES`` = 8 tile rows (the unrolled factorisation, whose
    program has the same operations for every such ``n``, and the factor in row slabs); 512
    beyond (the factorisation's loops). Float32 factorisation alone, 2-core CPU, jax 0.9.1,
    interleaved in one process (median of 6-15): ``n = 4,096`` 8 unrolled tiles of 512
    95-103 ms against 114-124 ms for the loop over tiles of 256 (0.1.0's 16 unrolled tiles
    of 256: 103 ms, first call 1.6 s against 0.7); ``n = 6,144`` 8 of 768 292 against 319 ms;
    ``n = 8,192`` 8 of 1,024 680 against 714 ms (the loop over 512); ``n = 16,384`` 8 of
    2,048 5.7 s against 4.2 s: the chain of 8 diagonal factorisations by LAPACK on one core
    takes over, hence the loop there. Earlier, in the loop alone (jax 0.10.2): ``n = 8,192``
    1,303 ms with 512-row tiles, ~1,500 with 256 (a 512^3 product runs at 164 GFLOP/s there,
    a 256^3 one at 117).
    """
    if n <= 256:
        return max(8, -(-n // 8) * 8)
    if n <= 256 * UNROLL_FACTOR_MAX_TILES:
        return 256
    if n <= FEW_TILES_MAX_N:
        return -(-n // (32 * UNROLL_FACTOR_MAX_TILES)) * 32
    return 512


@overload
def to_tiles(a: np.ndarray, ts: int) -> np.ndarray:
    ...


@overload
def to_tiles(a: jax.Array, ts: int) -> jax.Array:
    ...


def to_tiles(a: Any, ts: int) -> Any:
    """An ``(nb ts) x (nb ts)`` matrix as its tiles ``t[i, j]``, shape ``(nb, nb, ts, ts)``.

    A NumPy matrix stays NumPy (a static matrix is tiled at trace time, not in the program)."""
    nb = a.shape[0] // ts
    return a.reshape(nb, ts, nb, ts).transpose(0, 2, 1, 3)


def from_tiles(t: jax.Array) -> jax.Array:
    """The inverse of :func:`to_tiles`."""
    nb, _, ts, _ = t.shape
    return t.transpose(0, 2, 1, 3).reshape(nb * ts, nb * ts)


def hermitian_from_lower_tiles(t: jax.Array) -> jax.Array:
    """The Hermitian matrix whose tiles on and below the diagonal are those of ``t``.

    Of a diagonal tile only its lower triangle is used (the upper one is its mirror);
    the tiles above the diagonal of ``t`` are ignored.
    """
    nb, _, _ts, _ = t.shape
    block_lower = np.tril(np.ones((nb, nb), bool), -1)
    low = jnp.where(block_lower[:, :, None, None], t, 0) + jnp.where(
        np.eye(nb, dtype=bool)[:, :, None, None], jnp.tril(t), 0)
    full = from_tiles(low)
    return full + jnp.tril(full, -1).conj().T


class ColumnTiles(NamedTuple):
    """The tiles on and below the diagonal of an ``(nb ts) x (nb ts)`` matrix, held by tile columns.

    ``columns[j]`` has shape ``(nb - j, ts, ts)``: the tiles ``(j, j), (j + 1, j), ..., (nb - 1, j)``,
    which is how the product of the rows ``j ts ..`` with the ``ts`` rows of tile ``j`` comes out
    of one matrix product, row-major, without a copy (:func:`fishr.jacobian.tiled_kernel` with
    ``columns=True``). The tiles above the diagonal are not held (they read as zero). Read by
    :func:`lower_tile`, :func:`tiled_diagonal` and the unrolled factorisation
    (:func:`tiled_cholesky_slabs`); :func:`tile_array` assembles the ``(nb, nb, ts, ts)`` layout of
    :func:`to_tiles` for the other routines.
    """

    columns: tuple

    @property
    def shape(self) -> tuple[int, int, int, int]:
        nb, ts = len(self.columns), self.columns[0].shape[-1]
        return nb, nb, ts, ts

    @property
    def dtype(self) -> Any:
        return self.columns[0].dtype


Tiles = jax.Array | ColumnTiles


def lower_tile(tiles: Tiles, i: int, j: int) -> jax.Array:
    """Tile ``(i, j)``, ``j <= i``, of a tile array (:func:`to_tiles` layout) or of :class:`ColumnTiles`."""
    return tiles.columns[j][i - j] if isinstance(tiles, ColumnTiles) else tiles[i, j]


def tile_array(tiles: Tiles) -> jax.Array:
    """The ``(nb, nb, ts, ts)`` array of :func:`to_tiles` (zero above the diagonal for :class:`ColumnTiles`)."""
    if not isinstance(tiles, ColumnTiles):
        return tiles
    nb, _, ts, _ = tiles.shape
    upper = jnp.zeros((nb, ts, ts), tiles.dtype)
    return jnp.stack([jnp.concatenate([upper[:j], col]) for j, col in enumerate(tiles.columns)], axis=1)


class TiledFactor(NamedTuple):
    """The Cholesky factor of a Hermitian positive-definite matrix ``A = L L^H``, by tiles.

    Attributes:
      tiles: ``(nb, nb, ts, ts)``, ``tiles[i, j] = L_ij`` on and below the diagonal;
        the tiles above it are zero.
      inv_diag: ``(nb, ts, ts)``, ``L_kk^{-1}``, so that the solves are all matrix products.
    """

    tiles: jax.Array
    inv_diag: jax.Array


SLAB_MAX_BLOCKS = 4  # tiled_cholesky_slabs groups tile rows into at most this many block rows


def slab_block_rows(nb: int, ts: int) -> list[int]:
    """The rows of each block row of :func:`tiled_cholesky_slabs`'s factor for ``nb`` tile rows of ``ts``:
    ``g = ceil(nb / SLAB_MAX_BLOCKS)`` tile rows per block (the last may have fewer)."""
    g = -(-nb // SLAB_MAX_BLOCKS)
    return [min(g, nb - lo) * ts for lo in range(0, nb, g)]


class SlabFactor(NamedTuple):
    """The Cholesky factor ``A = L L^H`` by block rows (few tiles; :func:`tiled_cholesky_slabs`).

    Block row ``b`` holds rows ``r_b .. r_{b+1} - 1`` (:func:`slab_block_rows`).

    Attributes:
      diag: the diagonal blocks ``L_bb``, ``(m_b, m_b)``, zero above their diagonals.
      below: for ``b = 1 ..``, the slab left of ``L_bb``: rows ``r_b .. r_{b+1} - 1``, columns
        ``0 .. r_b - 1`` of ``L``, ``(m_b, r_b)`` (nothing above the diagonal blocks).
    """

    diag: tuple
    below: tuple


def tiled_factor_from_cholesky(factor: jax.Array, ts: int) -> TiledFactor:
    """A :func:`cholesky_factor` (LAPACK's, of ``conj(A)``) as the :class:`TiledFactor` of ``A``.

    So that one solve, :func:`tiled_cholesky_solve`, serves factors from either
    route. ``L = conj(L')`` (``L'`` the factor of ``conj(A)``); the inverses of its
    diagonal tiles cost ``n ts^2``.
    """
    tiles = to_tiles(factor.conj(), ts)
    nb = tiles.shape[0]
    diag = tiles[jnp.arange(nb), jnp.arange(nb)]
    eye = jnp.broadcast_to(jnp.eye(ts, dtype=diag.dtype), diag.shape)
    return TiledFactor(tiles, lax.linalg.triangular_solve(diag, eye, left_side=True, lower=True))


def _times_h(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x @ y^H`` for two tiles, without forming the transpose (a copy that cost 30% of the factorisation)."""
    return lax.dot_general(x, y.conj(), (((1,), (1,)), ((), ())))


def lower_pair(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The ``p``-th pair ``(r, c)``, ``0 <= c <= r``, in row-major order of a lower triangle."""
    r = jnp.floor((jnp.sqrt(8.0 * p.astype(jnp.float32) + 1.0) - 1.0) / 2.0).astype(jnp.int32)
    r = jnp.where((r + 1) * (r + 2) // 2 <= p, r + 1, r)  # correct the float square root either way
    r = jnp.where(r * (r + 1) // 2 > p, r - 1, r)
    return r, p - r * (r + 1) // 2


def _tile_cholesky(a: jax.Array) -> jax.Array:
    """The lower Cholesky factor ``L`` of one Hermitian tile ``a``, read from its upper triangle.

    LAPACK reads a column-major matrix, and XLA hands it one by transposing a row-major tile
    in a copy, fused with whatever made the tile (the trailing updates): that copy read the
    update products across their rows, 0.04, 0.13, 0.20 and 0.32 ms for the four diagonal
    tiles of ``n = 1,024`` (float32, profiled), each on the factorisation's serial chain.
    ``a^T`` of a row-major tile is column-major for free, and ``a^T = conj(a)`` for a
    Hermitian tile, so ``L = conj(chol(a^T))``, read from the upper triangle of ``a``.
    """
    return lax.linalg.cholesky(jnp.swapaxes(a, -1, -2), symmetrize_input=False).conj()


def _tiled_cholesky_unrolled(tiles: Tiles, shift, slabs: bool = False) -> Any:
    """:func:`tiled_cholesky` unrolled over tiles: ``nb^3 / 6`` independent tile products that XLA
    schedules on every core at once (a program that grows like ``nb^3``; for few tiles only).

    A :class:`TiledFactor`, or with ``slabs=True`` ``(SlabFactor, finite)`` (see
    :func:`tiled_cholesky_slabs`), ``finite`` whether the factor is finite.
    """
    nb, _, ts, _ = tiles.shape
    eye = jnp.eye(ts, dtype=tiles.dtype)
    work = {(i, j): lower_tile(tiles, i, j) for i in range(nb) for j in range(i + 1)}
    out, inv = {}, []
    for k in range(nb):
        lkk = _tile_cholesky(work[(k, k)] + (shift * eye).astype(tiles.dtype))
        out[(k, k)] = lkk
        if slabs and k + 1 == nb:
            break  # the last inverse serves only the solve by tiles
        inv_k = lax.linalg.triangular_solve(lkk, eye, left_side=True, lower=True)
        inv.append(inv_k)
        for i in range(k + 1, nb):
            out[(i, k)] = _times_h(work[(i, k)], inv_k)
        for i in range(k + 1, nb):
            for j in range(k + 1, i + 1):
                work[(i, j)] = work[(i, j)] - _times_h(out[(i, k)], out[(j, k)])
    zero = jnp.zeros((ts, ts), tiles.dtype)
    if slabs:
        # block row b of the solve: tile rows `rows`; its slab is complete once tile column rows[0] - 1 is,
        # and XLA copies it while the later columns are factored
        groups = np.split(np.arange(nb), np.cumsum(slab_block_rows(nb, 1))[:-1])
        block = lambda rows, cols: jnp.block([[out[(i, j)] if j <= i else zero for j in cols] for i in rows])
        diag = tuple(block(rows, rows) for rows in groups)
        below = tuple(block(rows, range(rows[0])) for rows in groups[1:])
        # a failed column k < nb - 1 is NaN in L_kk, its inverse and every panel tile L_ik, so in the last
        # update of the last diagonal tile too: its test alone, once, off the chain of columns (checking every
        # diagonal tile as it was factored put a reduction on that chain: 3% of the call at N = 1,024)
        return SlabFactor(diag, below), jnp.all(jnp.isfinite(out[(nb - 1, nb - 1)]))
    rows = [jnp.stack([out[(i, j)] if j <= i else zero for j in range(nb)]) for i in range(nb)]
    return TiledFactor(jnp.stack(rows), jnp.stack(inv))


def tiled_cholesky_slabs(tiles: Tiles, shift: Any = 0.0) -> tuple[SlabFactor, jax.Array]:
    r"""``(factor, finite)``: the Cholesky factor of ``A + shift I`` (``A`` as for
    :func:`tiled_cholesky`, up to ``UNROLL_FACTOR_MAX_TILES`` tile rows, or as :class:`ColumnTiles`)
    as a :class:`SlabFactor` for :func:`slab_cholesky_solve`, and whether it is finite.

    The factorisation is :func:`tiled_cholesky`'s, unrolled; its tiles are copied into at
    most ``SLAB_MAX_BLOCKS`` = 4 block rows (a diagonal block and the slab left of it), each
    as soon as its tiles are factored (off the serial chain of diagonal factorisations, while
    later columns are factored; no transposed copy, where an assembled upper factor ``L^H``
    transposed every tile).
    Blocks of two tile rows for 5-8 tile rows halve the operations in the program: float32
    sample-space update at ``N = 2,048`` (8 tiles of 256), first call 2.07-2.24 -> 1.83-1.99 s
    (fresh processes, 3 each) for a warm call 1.03x (36.7 against 35.4 ms); at ``N = 1,024``
    blocks of two would cost the warm call 7% (6.98 against 6.54 ms) for 0.04 s of first call,
    so four tile rows stay four blocks. ``finite`` checks the last diagonal
    tile: a column that failed (a non-finite input, or a matrix that is not positive definite
    there) is NaN in its diagonal tile, the tile's inverse and every tile below it, and each
    of those enters the last diagonal tile's updates.
    """
    nb = tiles.shape[0]
    if nb > UNROLL_FACTOR_MAX_TILES:
        raise ValueError(f"tiled_cholesky_slabs: `tiles` may have at most UNROLL_FACTOR_MAX_TILES = "
                         f"{UNROLL_FACTOR_MAX_TILES} tile rows (its factorisation is unrolled), got {nb}; "
                         f"use tiled_cholesky.")
    return _tiled_cholesky_unrolled(tiles, shift, slabs=True)


def slab_cholesky_solve(factor: SlabFactor, b: jax.Array) -> jax.Array:
    r"""``(L L^H)^{-1} b`` from a :class:`SlabFactor`, for ``b`` of shape ``(n, k)`` (or ``(n,)``).

    Forward substitution ``y_b = L_bb^{-1} (b_b - S_b y_{<b})`` (``S_b`` the slab left of
    block ``b``), one product and one triangular solve per block row; then back substitution,
    right looking: ``x_b = L_bb^{-H} r_b`` and ``r_{<b} -= S_b^H x_b`` (the slab read where it
    lies). For one column the products are matrix-vector products, which XLA compiles to its
    own kernels; LAPACK's triangular solve of one column reads at about a third of their
    speed, so it is left only the diagonal blocks.
    Float32, 2-core CPU, jax 0.9.1, two solves in one program, median of 200: ``n = 1,024``
    (tiles of 256) 0.33-0.36 ms against 0.88-0.94 ms for two triangular solves on the assembled
    upper factor, ``n = 2,048`` 0.86 against 3.44 ms. The price is
    program size: ``2 nb`` triangular solves and ``2 (nb - 1)`` products per solve, against two
    operations (compile of the two solves 0.2 / 0.5 s against 0.05 s at ``n = 1,024`` / 2,048,
    tiles of 256 as block rows).
    """
    lower, below = factor
    nb = len(lower)
    edges = np.cumsum([0] + [d.shape[0] for d in lower]).tolist()
    if b.ndim not in (1, 2) or b.shape[0] != edges[-1]:
        raise ValueError(f"slab_cholesky_solve: `b` must have shape ({edges[-1]},) or ({edges[-1]}, k), the "
                         f"factor's rows, got {b.shape}.")
    vector = b.ndim == 1
    rhs = (b[:, None] if vector else b).astype(jnp.result_type(b, lower[0]))
    y: list = []
    for i in range(nb):
        r = rhs[edges[i]:edges[i + 1]]
        if i:
            r = r - below[i - 1] @ (jnp.concatenate(y, axis=0) if i > 1 else y[0])
        y.append(lax.linalg.triangular_solve(lower[i], r, left_side=True, lower=True))
    r = jnp.concatenate(y, axis=0)
    x: list = [None] * nb
    for k in reversed(range(nb)):
        x[k] = lax.linalg.triangular_solve(lower[k], r[edges[k]:edges[k + 1]], left_side=True, lower=True,
                                           transpose_a=True, conjugate_a=True)
        if k:  # S_k^H x_k, the slab read where it lies
            r = r.at[:edges[k]].add(-lax.dot_general(below[k - 1].conj(), x[k], (((0,), (0,)), ((), ()))))
    out = jnp.concatenate(x, axis=0)
    return out[:, 0] if vector else out


def tiled_cholesky(tiles: jax.Array, shift: Any = 0.0, upper_zero: bool = False) -> TiledFactor:
    r"""The Cholesky factor of ``A + shift I``, ``A`` Hermitian PSD given by its tiles on and below the diagonal.

    ``tiles`` has shape ``(nb, nb, ts, ts)`` (:func:`to_tiles` layout); only the tiles
    ``tiles[i, j]``, ``j <= i``, are read, and of a diagonal tile its upper triangle (LAPACK's column-major
    view of the row-major tile, taken without a copy; the diagonal tiles are whole, as :func:`to_tiles` and
    :func:`fishr.jacobian.tiled_kernel` give them). Right-looking,
    one tile column ``k`` at a time:

        L_kk = chol(A_kk),   L_ik = A_ik L_kk^{-H}  (i > k),   A_ij -= L_ik L_jk^H  (i >= j > k),

    with ``L_kk^{-1}`` formed once per column, so that everything but the ``nb`` diagonal
    factorisations is a product of two tiles. Up to ``UNROLL_FACTOR_MAX_TILES`` = 8 tile rows
    (``n <= 8,192`` with :func:`tile_size`'s tiles, up to 1,024 rows each) the tiles are
    unrolled: ``nb^3 / 6`` independent products that XLA runs on every core at once, a program
    whose operations depend on ``nb`` alone. Beyond, the loops are ``lax.fori_loop`` s, one
    tile product per iteration: the compiled program is the same for every ``nb``, so its
    compile time does not grow with the matrix either (16 unrolled tiles took 4.5-5 s to
    compile at ``n = 4,096`` on the 2-core benchmark CPU, a program growing like ``nb^3``).
    Float32 at ``n = 4,096``: 95-103 ms unrolled in 8 tiles, 114-124 ms looped over 16, 320 ms
    for LAPACK on the whole matrix (one core); see :func:`tile_size` for other sizes.

    A matrix that is not positive definite gives NaN in the factor's tiles from the
    failing column on (never a silently finite factor). Then the diagonal tiles' inverses
    (``inv_diag``) are not finite either: every tile ``L_ik`` below the diagonal enters the
    update of ``A_ii``, so checking ``inv_diag`` (``nb ts^2`` numbers) checks the whole factor.

    ``upper_zero=True`` says that the tiles above the diagonal of ``tiles`` are zero already
    (:func:`fishr.jacobian.tiled_kernel` leaves them so); the loop never writes them, so the
    factor's are then zero without the final pass that clears them, a second ``n x n`` buffer
    in the program (``N = 4,096``, float32 sample-space call: working memory 219 -> 144 MB,
    minor page faults per call 56,100 -> 36,900, 477 -> 447 ms).
    """
    nb, _, ts, _ = tiles.shape
    eye = jnp.eye(ts, dtype=tiles.dtype)
    if nb <= UNROLL_FACTOR_MAX_TILES:
        return _tiled_cholesky_unrolled(tiles, shift)
    t = tiles.at[jnp.arange(nb), jnp.arange(nb)].add((shift * eye).astype(tiles.dtype))
    inv = jnp.zeros((nb, ts, ts), tiles.dtype)

    def column(k, carry):
        t, inv = carry
        lkk = _tile_cholesky(t[k, k])
        inv_k = lax.linalg.triangular_solve(lkk, eye, left_side=True, lower=True)  # L_kk^{-1}
        t, inv = t.at[k, k].set(lkk), inv.at[k].set(inv_k)
        m = nb - k - 1

        def panel(i, t):
            return t.at[i, k].set(_times_h(t[i, k], inv_k))

        def trailing(p, t):
            r, c = lower_pair(p)
            i, j = k + 1 + r, k + 1 + c
            return t.at[i, j].add(-_times_h(t[i, k], t[j, k]))

        t = lax.fori_loop(k + 1, nb, panel, t)
        return lax.fori_loop(0, m * (m + 1) // 2, trailing, t), inv

    t, inv = lax.fori_loop(0, nb, column, (t, inv))
    if upper_zero:
        return TiledFactor(t, inv)
    upper = np.triu(np.ones((nb, nb), bool), 1)
    return TiledFactor(jnp.where(upper[:, :, None, None], 0, t), inv)


UNROLL_SOLVE_MAX_TILES = 4  # tiled_cholesky_solve unrolls up to this many tile rows, loops beyond
SOLVE_SEGMENTS = 2  # tiled_cholesky_solve's loops: tile rows in this many groups, each reading only its columns


def _row_segments(nb: int, segments: int = SOLVE_SEGMENTS) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]``: the tile rows ``0 .. nb - 1`` in at most ``segments`` consecutive groups of at least
    2 rows (the last may be short). A loop of one row is slower: XLA then sees static slices and fuses them
    into the product (n = 4,096 with 16 groups of one row: 30 ms against 11 ms with 8 groups of 2)."""
    m = max(2, -(-nb // segments))
    return [(lo, min(lo + m, nb)) for lo in range(0, nb, m)]


def tiled_cholesky_solve(factor: TiledFactor, b: jax.Array) -> jax.Array:
    """``(L L^H)^{-1} b`` for ``b`` of shape ``(nb ts, k)`` (or ``(nb ts,)``).

    Forward substitution ``y_i = L_ii^{-1} (b_i - sum_{k<i} L_ik y_k)``, then back
    substitution with ``L^H``, with the inverses of the diagonal tiles, so that every
    step is a matrix product; every tile is read where it lies (no transposed copy).
    Up to ``UNROLL_SOLVE_MAX_TILES`` tile rows the ``nb^2`` tile products are unrolled;
    beyond, ``lax.fori_loop`` s (a program of fixed size): step ``i`` of the forward sweep
    takes tile row ``i`` against ``y`` (zero where not yet computed), step ``k`` of the
    backward sweep subtracts ``L_kj^H x_k`` from every ``j < k`` with tile row ``k``. The
    rows are split into ``SOLVE_SEGMENTS`` groups, one loop each, and a row of group
    ``[lo, hi)`` reads only its first ``hi`` tiles: the sweeps read ``(S + 1) / 2S`` of the
    factor (3/4 for 2 groups) instead of all of it, zero tiles above the diagonal included.
    The solve is bound by reading the factor (a matrix-vector product per tile for one
    column). Float32, 2-core CPU, median of 21, against whole rows (jax 0.10.2 / 0.9.1):
    ``n = 4,096`` one column 18.0 / 13.8 ms against 22.9 / 17.5, two columns 20.4 / 17.9
    against 26.7 / 23.4; ``n = 8,192`` one column 100 against 136 ms (0.10.2). More groups
    read less (4: 15.3 / 12.1 ms; 8: 11.4 / 12.9 ms at ``n = 4,096``) but each group is a
    loop in the program, and the solve appears in it several times (CG preconditioner,
    start, correction, fallback): the float32 sample-space program at ``N = 4,096``
    compiles in 2.9 s with whole rows, 3.2 s with 2 groups, 4.1 s with 4. XLA's CPU
    triangular solves on the assembled factor (both sweeps, one column, float32, jax 0.9.1 /
    0.10.2) take 2.4 / 1.9 ms at ``n = 1,024`` against 1.0 here, 9.2 / 9.6 against 5.2 / 6.7 at
    2,048 and 63 / 66 against 18 / 23 at 4,096; the sample-space solve applies LAPACK's assembled
    factor (accelerators, up to 2,048 rows) by them, where they compile to one operation each,
    and the CPU's factor of up to 8 tile rows by :func:`slab_cholesky_solve`.
    """
    t, inv = factor
    nb, _, ts, _ = t.shape
    vector = b.ndim == 1
    rhs = (b[:, None] if vector else b).astype(jnp.result_type(b, t)).reshape(nb, ts, -1)
    if nb <= UNROLL_SOLVE_MAX_TILES:
        y = []
        for i in range(nb):
            r = rhs[i]
            for k in range(i):
                r = r - t[i, k] @ y[k]
            y.append(inv[i] @ r)
        x: list[Any] = [None] * nb
        for i in reversed(range(nb)):
            r = y[i]
            for k in range(i + 1, nb):
                r = r - (x[k].conj().T @ t[k, i]).conj().T  # L_ki^H x_k without transposing the tile
            x[i] = inv[i].conj().T @ r
        out = jnp.concatenate(x, axis=0)
    else:
        segments = _row_segments(nb)
        y = jnp.zeros_like(rhs)
        for lo, hi in segments:
            def forward(i, y, hi=hi):
                row = lax.dynamic_index_in_dim(t, i, 0, keepdims=False)[:hi]  # tiles L_i0 .. L_i,hi-1
                prod = lax.dot_general(row, y[:hi], (((2,), (1,)), ((0,), (0,))))  # [k] = L_ik y_k
                return y.at[i].set(inv[i] @ (rhs[i] - prod.sum(0)))

            y = lax.fori_loop(lo, hi, forward, y)
        r, sol = y, jnp.zeros_like(rhs)
        for lo, hi in reversed(segments):
            earlier = jnp.arange(hi)

            def backward(step, carry, hi=hi, earlier=earlier):
                r, x = carry
                k = hi - 1 - step
                xk = inv[k].conj().T @ r[k]
                row = lax.dynamic_index_in_dim(t, k, 0, keepdims=False)[:hi]
                prod = lax.dot_general(row.conj(), xk, (((1,), (0,)), ((), ())))  # [j] = L_kj^H x_k
                return r.at[:hi].add(-jnp.where((earlier < k)[:, None, None], prod, 0)), x.at[k].set(xk)

            r, sol = lax.fori_loop(0, hi - lo, backward, (r, sol))
        out = sol.reshape(nb * ts, -1)
    return out[:, 0] if vector else out


def psd_inf_norm_bound(tiles: Tiles, size: int | None = None) -> jax.Array:
    """An upper bound on ``||A||_inf`` of a Hermitian PSD matrix from its diagonal alone, ``O(n)``.

    ``|A_ij| <= sqrt(A_ii A_jj)`` for PSD ``A``, so every row sum is at most
    ``max_i sqrt(A_ii) * sum_j sqrt(A_jj) <= n max_i A_ii <= n ||A||_inf``; equal to the
    norm for a rank-one ``A`` with entries of one sign. It
    reads ``n`` numbers where :func:`tiled_inf_norm` reads ``n^2`` (4 ms at ``n = 2,048``).
    ``size``: only the leading ``size x size`` block (the rest is padding).
    """
    diag = jnp.sqrt(jnp.maximum(tiled_diagonal(tiles, size), 0))
    return jnp.max(diag) * jnp.sum(diag)


def tiled_diagonal(tiles: Tiles, size: int | None = None) -> jax.Array:
    """The (real part of the) diagonal of the matrix given by its tiles; ``size``: its leading entries only."""
    nb = tiles.shape[0]
    if isinstance(tiles, ColumnTiles):
        diag = jnp.stack([lower_tile(tiles, k, k) for k in range(nb)])
    else:
        diag = tiles[jnp.arange(nb), jnp.arange(nb)]
    return jnp.real(jnp.diagonal(diag, axis1=1, axis2=2)).reshape(-1)[:size]


def tiled_trace(tiles: Tiles, size: int | None = None) -> jax.Array:
    """The real trace of the matrix given by its tiles (its leading ``size x size`` block)."""
    return jnp.sum(tiled_diagonal(tiles, size))


def tiled_inf_norm(tiles: jax.Array) -> jax.Array:
    """``||A||_inf`` (largest absolute row sum) of the Hermitian matrix given by its lower tiles.

    The layout of :func:`tiled_cholesky`: of a diagonal tile its lower triangle is read,
    and tile ``[i, j]`` (``j < i``) adds its row sums to the rows of ``i`` and its column
    sums to those of ``j`` (its mirror ``A_ji``).
    """
    nb = tiles.shape[0]
    lower = np.tril(np.ones((nb, nb), bool), -1)[:, :, None, None]
    diag = jnp.abs(jnp.tril(tiles[jnp.arange(nb), jnp.arange(nb)]))
    off = jnp.abs(jnp.where(lower, tiles, 0))
    rows = off.sum(axis=(1, 3)) + off.sum(axis=(0, 2)) + diag.sum(axis=2) + diag.sum(axis=1) \
        - jnp.diagonal(diag, axis1=1, axis2=2)
    return jnp.max(rows)


@overload
def eigh_solve(a: jax.Array, b: jax.Array, damping: Any = 0.0, return_eigenvalues: Literal[False] = False) -> jax.Array:
    ...


@overload
def eigh_solve(a: jax.Array, b: jax.Array, damping: Any = 0.0, *,
               return_eigenvalues: Literal[True]) -> tuple[jax.Array, jax.Array]:
    ...


def eigh_solve(
    a: jax.Array, b: jax.Array, damping: Any = 0.0, return_eigenvalues: bool = False
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``(a + damping I)^{-1} b`` for Hermitian ``a`` by ``a = U diag(w) U^H``.

    ``x = U diag(1 / (w + damping)) U^H b``; NaN wherever ``w + damping <= 0`` enters
    (a matrix that is not positive definite after damping never gives a silently
    finite result). ``b`` may be ``(n,)`` or ``(n, k)``, ``a`` and ``b`` batched alike.
    With ``return_eigenvalues`` returns ``(x, w)``.
    """
    w, u = jnp.linalg.eigh(a)
    w = w + damping
    w_inv = jnp.where(w > 0, 1.0 / w, jnp.nan)
    vector = b.ndim == a.ndim - 1
    rhs = b[..., None] if vector else b
    x = u @ (w_inv[..., :, None] * (jnp.swapaxes(u, -1, -2).conj() @ rhs))
    x = x[..., 0] if vector else x
    return (x, w - damping) if return_eigenvalues else x


def psd_inverse(a: jax.Array, damping: Any = 0.0, method: str = "cholesky") -> jax.Array:
    """Explicit ``(a + damping I)^{-1}`` of a Hermitian PSD matrix.

    ``method="cholesky"`` factors ``a + damping I = L L^H`` and returns
    ``L^{-H} L^{-1}``; ``method="eigh"`` uses ``a = U diag(w) U^H`` and returns
    ``U diag(1 / (w + damping)) U^H``. A matrix that is not positive definite
    after damping gives NaN entries with Cholesky; with ``eigh`` the result is
    NaN wherever ``w + damping <= 0``.
    """
    eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
    if method == "cholesky":
        return cholesky_solve(a, eye, damping)
    if method == "eigh":
        return eigh_solve(a, eye, damping)
    raise ValueError(f"psd_inverse: `method` must be 'cholesky' or 'eigh', got {method!r}.")


def trace_damping(a: jax.Array, damping: Any, minimum: float = 0.0) -> jax.Array:
    """Diagonal shift ``max(damping * tr(a) / n, minimum)`` for an ``n x n`` factor."""
    n = a.shape[-1]
    return jnp.maximum(damping * jnp.real(jnp.trace(a)) / n, minimum)


def pi_damping(a: jax.Array, g: jax.Array, damping: Any, minimum: float = 1e-12) -> tuple[jax.Array, jax.Array]:
    r"""Martens & Grosse (2015) factored Tikhonov damping for ``a (x) g``.

    ``pi = sqrt((tr a / dim a) / (tr g / dim g))``; the shifts are
    ``pi * sqrt(damping)`` for ``a`` and ``sqrt(damping) / pi`` for ``g``, so that
    their Kronecker product adds exactly ``damping * I`` plus cross terms. Traces
    are floored at ``minimum`` to keep ``pi`` finite for an all-zero factor.

    Returns:
      ``(shift_a, shift_g)``.
    """
    ta = jnp.maximum(jnp.real(jnp.trace(a)) / a.shape[-1], minimum)
    tg = jnp.maximum(jnp.real(jnp.trace(g)) / g.shape[-1], minimum)
    pi = jnp.sqrt(ta / tg)
    root = jnp.sqrt(damping)
    return pi * root, root / pi
