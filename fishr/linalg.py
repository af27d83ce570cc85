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
* :func:`tiled_cholesky_factor` / :func:`tiled_cholesky_factor_solve`: the same
  for a matrix given as tiles (its blocks on and below the diagonal), factored
  tile by tile so that the work is many independent matrix products.
* :func:`mixed_precision_refine`: a single-precision solve refined to the
  accuracy of a double-precision one (LAPACK ``dsposv``'s scheme).
* :func:`eigh_solve` / :func:`psd_inverse`: the damped solve by ``eigh``, and the
  explicit damped inverse by Cholesky or by ``eigh``.
* :func:`trace_damping` / :func:`pi_damping`: the diagonal shifts used by
  Kronecker-factored methods.

Non-finite inputs: every routine here propagates NaN instead of hiding it (a
NaN right-hand side gives a NaN solution, never a silently finite one), so a
caller can detect the bad step with ``optax.apply_if_finite`` or its own check.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import optax

__all__ = [
    "SolveInfo",
    "solve_info",
    "cg",
    "tree_inner",
    "cholesky_factor",
    "cholesky_factor_solve",
    "cholesky_solve",
    "tiled_cholesky_factor",
    "tiled_cholesky_factor_solve",
    "tiled_inf_norm",
    "mixed_precision_refine",
    "eigh_solve",
    "psd_inverse",
    "trace_damping",
    "pi_damping",
]


class SolveInfo(NamedTuple):
    """Diagnostics of one linear solve, the same for every solver and method.

    Attributes:
      iterations: CG iterations, or the refinement steps of a direct solve (``int32``;
        0 for a plain direct solve).
      residual_norm: ``||b - A x||_2`` at exit, recomputed from ``x`` (not CG's
        recursive estimate); the system ``A`` includes the damping.
      converged: whether the solve met its stopping test (CG: the tolerance within
        ``max_steps``; a direct solve: a finite factorisation and solution).
      fallback: which safer path produced ``x`` (``int32``): 0 none; 1 a
        double-precision factorisation after the single-precision one failed or did
        not refine; 2 the damping raised after both failed (see the sample-space solve).
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


def cg(
    matvec: Callable[[Any], Any],
    b: Any,
    x0: Optional[Any] = None,
    *,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_steps: Optional[int] = None,
    denominator_floor: float = 0.0,
    min_iterations: int = 0,
) -> tuple[Any, SolveInfo]:
    r"""Conjugate gradient for ``A x = b`` with ``A`` Hermitian positive definite.

    ``b`` and ``x0`` are pytrees of the same structure; ``matvec(v)`` returns
    ``A v`` with that structure. Inner products are ``Re sum conj(u) v``, so
    complex Hermitian operators are handled as well as real symmetric ones.

    The iteration stops when ``||r||_2 <= max(rtol * ||b||_2, atol)`` or after
    ``max_steps`` iterations (default ``10 * size(b)``, as in ``jax.scipy``).
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
      denominator_floor: lower bound on the CG denominators (see above).
      min_iterations: iterations taken regardless of the residual (see above).

    Returns:
      ``(x, SolveInfo)``.
    """
    if max_steps is None:
        max_steps = 10 * _tree_size(b)
    if rtol < 0 or atol < 0:
        raise ValueError(f"cg: `rtol` and `atol` must be >= 0, got rtol={rtol}, atol={atol}.")

    if x0 is None:
        x0 = optax.tree.zeros_like(b)
        r0 = b
    else:
        r0 = optax.tree.sub(b, matvec(x0))
    gamma0 = tree_inner(r0, r0)
    b_norm2 = tree_inner(b, b)
    threshold2 = jnp.maximum(rtol**2 * b_norm2, atol**2)
    floor = jnp.asarray(denominator_floor, dtype=gamma0.dtype)

    eps = jnp.finfo(gamma0.dtype).eps

    def cond(carry):
        _, _, _, gamma, k, _, broke = carry
        return ((gamma > threshold2) | (k < min_iterations)) & (k < max_steps) & ~broke

    def body(carry):
        x, r, p, gamma, k, curvature_max, _ = carry
        ap = matvec(p)
        pap, pp = tree_inner(p, ap), tree_inner(p, p)
        curvature_max = jnp.maximum(curvature_max, pap / pp)
        # breakdown: no curvature left along p (A singular to working precision there); stop before the step
        broke = ~(pap > eps * curvature_max * pp)
        alpha = gamma / jnp.maximum(pap, floor)
        x_new = _axpy(alpha, p, x)
        r_new = _axpy(-alpha, ap, r)
        gamma_new = tree_inner(r_new, r_new)
        beta = gamma_new / jnp.maximum(gamma, floor)
        p_new = _axpy(beta, p, r_new)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(broke, o, n), new, old)
        return (keep(x_new, x), keep(r_new, r), keep(p_new, p), jnp.where(broke, gamma, gamma_new),
                k + (~broke).astype(k.dtype), curvature_max, broke)

    init = (x0, r0, r0, gamma0, jnp.int32(0), jnp.zeros((), gamma0.dtype), jnp.asarray(False))
    x, _, _, gamma, k, _, broke = lax.while_loop(cond, body, init)
    converged = gamma <= threshold2
    r = optax.tree.sub(b, matvec(x))
    r_norm2 = tree_inner(r, r)
    grown = r_norm2 * eps > jnp.maximum(b_norm2, gamma0)
    usable = jnp.isfinite(r_norm2) & ~grown & ~(broke & ~converged)
    x = jax.tree.map(lambda v: jnp.where(usable, v, jnp.nan), x)
    return x, solve_info(jnp.sqrt(r_norm2), usable & converged, k)


def _add_to_diagonal(a: jax.Array, shift) -> jax.Array:
    return a + shift * jnp.eye(a.shape[-1], dtype=a.dtype)


def cholesky_factor(a: jax.Array, damping=0.0) -> jax.Array:
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


def cholesky_solve(a: jax.Array, b: jax.Array, damping=0.0) -> jax.Array:
    """``(a + damping I)^{-1} b`` for Hermitian PSD ``a`` by a Cholesky factorisation.

    ``b`` may be a vector ``(n,)`` or a matrix ``(n, k)`` (with ``a`` and ``b`` batched
    over leading axes alike). Reads only the upper triangle of ``a``; a matrix
    that is not positive definite gives NaN in the result (see :func:`cholesky_factor`).
    """
    return cholesky_factor_solve(cholesky_factor(a, damping), b)


Tiles = tuple  # tuple of tuples: tiles[i][j], j <= i, the (i, j) block of a lower block triangle


def tiled_cholesky_factor(tiles: Sequence[Sequence[jax.Array]], damping=0.0) -> Tiles:
    r"""The Cholesky factor, by tiles, of a Hermitian PSD matrix given by its lower tiles.

    ``tiles[i][j]`` for ``j <= i`` is the block of ``A`` with the rows of range ``i``
    and the columns of range ``j`` (ranges of any sizes, the same for rows and
    columns); the blocks above the diagonal are ``A_ji^H`` and are not passed.
    Of a diagonal tile only the upper triangle is read (:func:`cholesky_factor`).
    Returns the lower tiles ``L[i][j]`` of ``A + damping I = L L^H``.

    Right-looking, one tile column ``k`` at a time:

        L_kk = chol(A_kk),   L_ik = A_ik L_kk^{-H}  (i > k),   A_ij -= L_ik L_jk^H  (i >= j > k),

    where ``L_kk^{-H}`` is formed once per column (a triangular solve against the
    identity), so that everything but the ``nb`` small diagonal factorisations
    is a matrix product of two tiles. For ``nb`` tiles that is about
    ``nb^3 / 6`` independent products, which XLA runs on all cores at once,
    whereas LAPACK's factorisation of the assembled ``n x n`` matrix runs on one
    core. On the 2-core CPU of ``benchmarks/structured_sr.py`` (jax 0.9.1,
    float32, ``n = 4096``, tiles of 256) the factorisation and solve took 290 to
    310 ms against 420 to 540 ms for LAPACK on the whole matrix; in float64,
    where XLA's matrix product is slower than OpenBLAS's, the two are level.

    A tile column that is not positive definite after damping gives NaN in its
    factor and in every tile computed from it, so a solve with the factor is NaN
    (never silently finite).
    """
    nb = len(tiles)
    for i, row in enumerate(tiles):
        if len(row) != i + 1:
            raise ValueError(f"tiled_cholesky_factor: `tiles[{i}]` must hold the {i + 1} tiles on and below the "
                             f"diagonal of row {i}, got {len(row)}.")
    work = {(i, j): tiles[i][j] for i in range(nb) for j in range(i + 1)}
    out = {}
    for k in range(nb):
        lkk = cholesky_factor(work[(k, k)], damping).conj()  # cholesky_factor factors conj(A_kk)
        out[(k, k)] = lkk
        if k + 1 == nb:
            break
        inv_h = lax.linalg.triangular_solve(lkk, jnp.eye(lkk.shape[0], dtype=lkk.dtype), left_side=True,
                                            lower=True).conj().T  # L_kk^{-H}
        for i in range(k + 1, nb):
            out[(i, k)] = work[(i, k)] @ inv_h
        for i in range(k + 1, nb):
            for j in range(k + 1, i + 1):
                work[(i, j)] = work[(i, j)] - out[(i, k)] @ out[(j, k)].conj().T
    return tuple(tuple(out[(i, j)] for j in range(i + 1)) for i in range(nb))


def tiled_cholesky_factor_solve(factor: Tiles, b: jax.Array) -> jax.Array:
    """``(A + damping I)^{-1} b`` from ``factor = tiled_cholesky_factor(tiles, damping)``.

    ``b`` is a vector ``(n,)`` or a matrix ``(n, k)`` split into the tiles' row
    ranges; forward substitution ``L y = b`` then back substitution
    ``L^H x = y``, a tile at a time.
    """
    sizes = [row[-1].shape[0] for row in factor]
    if b.shape[0] != sum(sizes):
        raise ValueError(f"tiled_cholesky_factor_solve: `b` must have {sum(sizes)} rows (the factor's), "
                         f"got shape {b.shape}.")
    vector = b.ndim == 1
    rhs = (b[:, None] if vector else b).astype(jnp.result_type(b, factor[0][0]))
    edges = [0]
    for size in sizes:
        edges.append(edges[-1] + size)
    nb = len(factor)
    y = []
    for i in range(nb):
        r = rhs[edges[i]:edges[i + 1]]
        for k in range(i):
            r = r - factor[i][k] @ y[k]
        y.append(lax.linalg.triangular_solve(factor[i][i], r, left_side=True, lower=True))
    x = [None] * nb
    for i in reversed(range(nb)):
        r = y[i]
        for k in range(i + 1, nb):
            r = r - (x[k].conj().T @ factor[k][i]).conj().T  # L_ki^H x_k, without transposing the tile
        x[i] = lax.linalg.triangular_solve(factor[i][i], r, left_side=True, lower=True, transpose_a=True,
                                           conjugate_a=True)
    out = jnp.concatenate(x, axis=0) if nb > 1 else x[0]
    return out[:, 0] if vector else out


def tiled_inf_norm(tiles: Sequence[Sequence[jax.Array]]) -> jax.Array:
    """``||A||_inf`` (largest absolute row sum) of the Hermitian matrix given by lower tiles.

    The layout of :func:`tiled_cholesky_factor`: of a diagonal tile only the upper
    triangle is read; tile ``[i][j]`` (``j < i``) adds its row sums to the rows of
    range ``i`` and its column sums to those of range ``j`` (its mirror ``A_ji``).
    """
    nb = len(tiles)
    sums = []
    for i in range(nb):
        d = jnp.abs(tiles[i][i])
        upper = jnp.triu(d)
        sums.append(upper.sum(axis=1) + upper.sum(axis=0) - jnp.diagonal(d))
    for i in range(nb):
        for j in range(i):
            t = jnp.abs(tiles[i][j])
            sums[i] = sums[i] + t.sum(axis=1)
            sums[j] = sums[j] + t.sum(axis=0)
    return jnp.max(jnp.concatenate(sums))


def mixed_precision_refine(matvec: Callable[[jax.Array], jax.Array], approx_solve: Callable[[jax.Array], jax.Array],
                           b: jax.Array, a_norm, maxiter: int = 30) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Iterative refinement of a low-precision solve of ``A x = b``, as LAPACK's ``dsposv``.

    ``approx_solve(r)`` applies an approximate inverse of ``A`` (in fishr: a
    float32 Cholesky factor of a float64 matrix), ``matvec`` applies ``A`` in
    the working precision of ``b``. Starting from ``x = approx_solve(b)``:

        r = b - A x;   stop if ||r||_inf <= ||x||_inf * a_norm * eps * sqrt(n);   x += approx_solve(r)

    with ``a_norm = ||A||_inf``, ``n = b.size`` (``b`` and ``x`` may have any shape;
    the norms run over all their entries) and ``eps`` the working precision's unit
    roundoff, at most ``maxiter`` refinements (``dsposv``'s test and its 30).
    The test is the backward error a direct solve in the working precision
    attains, so a converged ``x`` is as accurate as that solve; each step
    gains about ``-log10(cond(A) eps_low)`` digits. It cannot converge when
    ``cond(A) eps_low`` is near 1 or above (the low-precision factor failed or
    is too rough); the caller then solves directly (:func:`fishr.sr` does).

    Returns:
      ``(x, converged, refinements)``: ``converged`` is False (and the loop stops
      at once) when the residual is not finite.
    """
    eps = jnp.finfo(b.dtype).eps / 2  # unit roundoff, LAPACK's dlamch('Epsilon')
    tol = jnp.asarray(a_norm, jnp.finfo(b.dtype).dtype) * eps * jnp.sqrt(jnp.asarray(b.size, eps.dtype))

    def state(x, k):
        r = b - matvec(x)
        r_norm, x_norm = jnp.max(jnp.abs(r)), jnp.max(jnp.abs(x))
        return x, r, k, r_norm <= x_norm * tol, jnp.isfinite(r_norm)

    def cond(carry):
        _, _, k, done, finite = carry
        return ~done & finite & (k < maxiter)

    def body(carry):
        x, r, k, _, _ = carry
        return state(x + approx_solve(r).astype(b.dtype), k + 1)

    x, _, k, done, finite = lax.while_loop(cond, body, state(approx_solve(b).astype(b.dtype), jnp.int32(0)))
    return x, done & finite, k


def eigh_solve(a: jax.Array, b: jax.Array, damping=0.0, return_eigenvalues: bool = False):
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


def psd_inverse(a: jax.Array, damping=0.0, method: str = "cholesky") -> jax.Array:
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


def trace_damping(a: jax.Array, damping, minimum: float = 0.0) -> jax.Array:
    """Diagonal shift ``max(damping * tr(a) / n, minimum)`` for an ``n x n`` factor."""
    n = a.shape[-1]
    return jnp.maximum(damping * jnp.real(jnp.trace(a)) / n, minimum)


def pi_damping(a: jax.Array, g: jax.Array, damping, minimum: float = 1e-12) -> tuple[jax.Array, jax.Array]:
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
