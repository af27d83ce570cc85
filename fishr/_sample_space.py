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
  ``tests/test_sr_accuracy.py``, see the README for the numbers.

The kernel solve. ``K`` is computed by tiles (:meth:`kernel_tiles`; unrolled up to 8
tile rows, a loop of fixed program size beyond), factored by
:func:`fishr.linalg.tiled_cholesky` (likewise) and used as the *preconditioner* of a
conjugate-gradient solve of ``(K + N damping) y = u``
whose products ``Obar (Obar^H y)`` are exact (the Jacobian's own ``matvec`` /
``rmatvec``, which centre on the sample vector). So the computed kernel need only be
close to ``K``: its rounding (single precision for double-precision input on the CPU,
for speed; the centring of the layers' kernel through its row means, which cancels
digits when the mean score is large next to its spread) costs CG iterations, not
accuracy. With a factor in the working precision (single-precision input; any input
on accelerators) of a kernel from centred rows, the factor's solve is used directly, a
direct solve as NetKet's ``srt`` (``converged`` reports LAPACK ``dsposv``'s
backward-error test on its residual). CG iterates on from there until its residual
stops halving (the rounding floor of the products) for the layers' kernel, whose
centring through row means cancels digits (float32 on the transformer: 7.5e-4 direct,
against 1.6e-4 for NetKet's ``srt``), and, from zero, for a single-precision factor of
double-precision input: the backward-error test alone
allows forward errors of ``cond(K) eps``, and stopping at it left 100x the error of
a direct solve on a transformer (7.5e-11 against NetKet ``srt``'s 6.5e-13; 7.6e-13
when iterated, 11 steps).

Fallbacks, reported in ``SolveInfo.fallback`` (never a silent NaN). The common path
is one factor and its direct solve or CG (0). If that factor is not finite (a
non-positive pivot) or its CG does not converge, a fallback runs under ``lax.cond``
(only then), with LAPACK on the assembled kernel and CG to the rounding floor:

1. for double-precision input on the CPU, the kernel in double precision;
2. the shift of the *preconditioner* raised by ``10^j eps_f ||K||`` (``j = 0, 2, 4``;
   ``eps_f`` the factor precision's unit roundoff) until the factor is finite, which
   makes a numerically indefinite kernel positive definite; the solve is still of
   ``K + N damping`` (for double-precision input, after 1 needed it too).

If none converges the update is NaN (the transform then keeps its state).
With several devices the statistics of all samples are gathered (:meth:`gather`)
and every device solves the same ``N x N`` system.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
import optax

from fishr import distributed
from fishr.distributed import AxisName
from fishr.linalg import (SolveInfo, TiledFactor, cg, cholesky_factor, eigh_solve, hermitian_from_lower_tiles,
                          meets_backward_error, psd_inf_norm_bound, solve_info, tiled_cholesky,
                          tiled_cholesky_solve, tiled_factor_from_cholesky, tree_inner)
from fishr.solvers import Eigh

__all__ = ["energy_coefficients", "kernel_factorisation", "solve_sample_space"]

MAX_STEPS = 50  # CG steps per attempt; a good factor needs 1-3


def kernel_factorisation() -> str:
    """How the kernel is factored: ``"tiled"`` (the loop of :func:`fishr.linalg.tiled_cholesky`,
    on the CPU) or ``"lapack"`` (the backend's solver on the assembled kernel, on accelerators)."""
    return "tiled" if jax.default_backend() == "cpu" else "lapack"


def _single_precision(tree) -> bool:
    return any(jnp.finfo(leaf.dtype).bits < 64 for leaf in jax.tree.leaves(tree))


def energy_coefficients(local_energies: jax.Array, num_components: int, holomorphic: bool, n_total: int,
                        axis_name: AxisName) -> jax.Array:
    r"""The coefficients ``c`` (``(N, C)``, all samples) with ``Obar^H c`` the VMC force.

    ``e = E_loc - mean(E_loc)`` over all samples. Real ``log psi``: ``c = 2 Re(e) / N``
    (``g = 2 Re mean_i conj(Obar_i) e_i``); complex ``log psi`` of real parameters,
    whose rows stack ``Re O`` and ``Im O``: ``c = (2 Re e, 2 Im e) / N``; holomorphic:
    ``c = e / N`` (``g = Obar^H e / N``, the force without the factor 2 of real
    parameters).
    """
    e = distributed.all_gather_batch(local_energies, axis_name)
    e = e - jnp.mean(e)
    if holomorphic:
        return (e / n_total)[:, None]
    if num_components == 2:
        return jnp.stack([2 * jnp.real(e), 2 * jnp.imag(e)], axis=-1) / n_total
    return (2 * jnp.real(e) / n_total)[:, None]


def _over_columns(fn: Callable, y: jax.Array) -> Any:
    """``fn`` of each column ``y[..., k]`` of an ``(N, C, R)`` array, stacked along a last axis."""
    return jax.vmap(fn, in_axes=-1, out_axes=-1)(y)


def _rows(jac) -> tuple[int, int]:
    """``(N, C)`` of a gathered Jacobian."""
    stats = jac.rows if hasattr(jac, "rows") else jac.rest
    return stats.shape[0], stats.shape[1]


def _factor(tiles: jax.Array, shift: Any, kind: str) -> tuple[TiledFactor, jax.Array]:
    """The factor of ``A + shift I`` from the lower tiles of ``A`` (padded), and whether it is finite.

    ``kind="tiled"``: :func:`fishr.linalg.tiled_cholesky`; ``"lapack"``: the backend's
    Cholesky of the assembled matrix, converted to tiles, so that both are applied by
    :func:`fishr.linalg.tiled_cholesky_solve` (matrix products only: XLA's CPU
    triangular solve on the whole factor is 10x slower).
    """
    if kind == "lapack":
        factor = tiled_factor_from_cholesky(cholesky_factor(hermitian_from_lower_tiles(tiles), shift),
                                            tiles.shape[2])
    else:
        factor = tiled_cholesky(tiles, shift)
    return factor, jnp.all(jnp.isfinite(factor.tiles))


def _apply_factor(factor: TiledFactor, u: jax.Array, rows: int) -> jax.Array:
    """``(A + shift I)^{-1} u`` from :func:`_factor`, for ``u`` whose leading axes hold ``rows`` rows."""
    n_pad = factor.tiles.shape[0] * factor.tiles.shape[2]
    flat = jnp.pad(u.reshape(rows, -1).astype(factor.tiles.dtype), ((0, n_pad - rows), (0, 0)))
    return tiled_cholesky_solve(factor, flat)[:rows].reshape(u.shape).astype(u.dtype)


def _raised_shift_factor(tiles: jax.Array, shift: Any, raise_by: jax.Array, start: int):
    """The first finite LAPACK factor of ``A + (shift + raise_by[j]) I``, ``j = start, start + 1, ...``.

    A ``while_loop`` on the assembled matrix (a rare path: LAPACK compiles in a fraction
    of the tiled loop's time). Returns ``(factor, j)``; ``j == len(raise_by)`` when none
    was finite (the factor is then NaN).
    """
    factor, ok = _factor(tiles, shift + raise_by[start], "lapack")

    def cond(carry):
        _, ok, j = carry
        return ~ok & (j + 1 < raise_by.shape[0])

    def body(carry):
        _, _, j = carry
        factor, ok = _factor(tiles, shift + raise_by[j + 1], "lapack")
        return factor, ok, j + 1

    factor, ok, j = lax.while_loop(cond, body, (factor, ok, jnp.int32(start)))
    return factor, jnp.where(ok, j, raise_by.shape[0])


def kernel_solve(jac, shift: Any, solver, rhs: jax.Array) -> tuple[jax.Array, SolveInfo, Callable, jax.Array]:
    """``y = (K + shift I)^{-1} rhs`` for ``rhs`` ``(N, C)`` or ``(N, C, R)`` (see the module docstring).

    Returns ``(y, info, approx, approx_ok)``: ``approx(u)`` applies the first factor (no CG),
    for a correction step, usable where ``approx_ok`` (it was finite and its solve
    converged; otherwise a fallback ran).
    """
    n, c = _rows(jac)
    rows = n * c
    work = rhs.dtype
    real = jnp.finfo(work).dtype

    def operator(y):
        product = lambda v: jac.matvec(jac.rmatvec(v)).astype(work)
        ky = product(y) if y.ndim == 2 else _over_columns(product, y)
        return ky + shift * y

    if isinstance(solver, Eigh):
        kernel = jac.gram()
        direct = lambda u: eigh_solve(kernel, u.reshape(rows, -1), shift).reshape(u.shape)
        y = direct(rhs)
        r = rhs - operator(y)
        return y, solve_info(jnp.sqrt(tree_inner(r, r)), jnp.all(jnp.isfinite(y))), direct, jnp.asarray(True)

    kind = kernel_factorisation()
    single = kind == "tiled" and not _single_precision(rhs)  # double input on the CPU: factor in single
    tiles = (jac.single_precision() if single else jac).kernel_tiles()
    k_norm = psd_inf_norm_bound(tiles, rows).astype(real)  # for the tests and the ladder: a bound suffices
    a_norm = k_norm + shift

    def raise_by(dtype):
        eps = jnp.finfo(dtype).eps / 2  # the unit roundoff of the factor's precision
        return jnp.asarray([0.0, 1.0, 1e2, 1e4], real) * eps * k_norm

    def pcg(factor, u, x0=None):
        precondition = lambda r: _apply_factor(factor, r, rows)
        return cg(operator, u, x0, rtol=0.0, atol=0.0, max_steps=MAX_STEPS,
                  preconditioner=precondition, backward_error=a_norm, stop_on_stagnation=True,
                  to_rounding_floor=True)

    # the common path: one factor, then for a factor in the working precision the direct solve
    # (as accurate as NetKet's srt: no CG step), for a single-precision factor of double-precision
    # input CG to the floor; the rare fallback runs under lax.cond and returns vectors only
    factor, finite = _factor(tiles, shift, kind)
    if single:
        y, info = pcg(factor, rhs)
        good = finite & info.converged
    elif hasattr(jac, "plan"):  # layers' kernel centred through row means: CG from the direct solve
        y, info = pcg(factor, rhs, _apply_factor(factor, rhs, rows))
        good = finite & info.converged
    else:
        y = _apply_factor(factor, rhs, rows)
        good = finite & jnp.all(jnp.isfinite(y))
        r = rhs - operator(y)
        info = solve_info(jnp.sqrt(tree_inner(r, r)), good & meets_backward_error(r, y, a_norm, rows))

    def fallback(_):
        if single:  # 1: the double-precision kernel (2 if its shift had to be raised as well)
            f, j = _raised_shift_factor(jac.kernel_tiles(), shift, raise_by(work), 0)
            code = jnp.where(j > 0, 2, 1)
        else:  # 2: the same kernel, factored with a raised shift
            f, j = _raised_shift_factor(tiles, shift, raise_by(tiles.dtype), 1)
            code = jnp.asarray(2)
        y_f, info_f = pcg(f, rhs)
        return y_f, info_f._replace(fallback=code.astype(jnp.int32))

    def first(_):
        return y, info._replace(fallback=jnp.asarray(0, jnp.int32))

    y, info = lax.cond(good, first, fallback, None)
    return y, info, lambda u: _apply_factor(factor, u, rows), good


def solve_sample_space(jac, b, damping, solver, local_energies=None, axis_name: AxisName = None,
                       holomorphic: bool = False, momentum_term=None) -> tuple[Any, SolveInfo]:
    """``(S + damping I)^{-1} b`` by the sample-space forms of the module docstring.

    With ``local_energies`` the right-hand side is the VMC force they define plus
    ``damping * momentum_term`` (SPRING's term; ``None`` for none), and ``b`` serves only
    to measure ``info.residual_norm``: a ``b`` that is not that force (a regulariser
    added to the gradient, say) shows there as a residual of its size.

    Returns ``(x, info)``: ``info.iterations`` counts the preconditioned CG steps of the
    kernel solve, ``info.fallback`` its fallback (module docstring), ``info.residual_norm``
    is ``||b - (S + damping) x||`` in parameter space and ``info.converged`` whether the
    kernel solve met the backward-error test; a kernel solve that diverged or broke
    down, or whose factors were all non-finite, gives a NaN ``x``.
    """
    jac = jac.gather()  # every device now holds the statistics of all N samples
    n, c = _rows(jac)
    shift = n * damping

    def s_matvec(v):
        return optax.tree.scale(1.0 / n, jac.rmatvec(jac.matvec(v)))

    def residual(x):
        return optax.tree.sub(b, optax.tree.add_scale(s_matvec(x), damping, x))

    if local_energies is None:
        u = jac.matvec(b)
        y, info, approx, approx_ok = kernel_solve(jac, shift, solver, u)
        x = optax.tree.scale(1.0 / damping, optax.tree.sub(b, jac.rmatvec(y)))
        r = residual(x)  # one step of refinement in parameter space, with the first factor alone
        step = optax.tree.scale(1.0 / damping, optax.tree.sub(r, jac.rmatvec(approx(jac.matvec(r)))))
        x = optax.tree.add(x, optax.tree.where(approx_ok, step, optax.tree.zeros_like(step)))
    else:
        coeffs = energy_coefficients(local_energies, c, holomorphic, n, axis_name).astype(
            jax.eval_shape(jac.matvec, b).dtype)
        if momentum_term is None:
            y, info, _, _ = kernel_solve(jac, shift, solver, n * coeffs)
            x = jac.rmatvec(y)
        else:  # (S + damping)^{-1} damping v = v - Obar^H (K + N damping)^{-1} Obar v: no division either
            rhs = jnp.stack([n * coeffs, jac.matvec(momentum_term)], axis=-1)
            y, info, _, _ = kernel_solve(jac, shift, solver, rhs)
            x = optax.tree.add(jac.rmatvec(y[..., 0]), optax.tree.sub(momentum_term, jac.rmatvec(y[..., 1])))
    r = residual(x)
    return x, info._replace(residual_norm=jnp.sqrt(tree_inner(r, r)))
