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

The kernel solve. ``K`` is computed by tiles (:meth:`kernel_tiles`, a loop of fixed
program size), factored by :func:`fishr.linalg.tiled_cholesky` (also loops) and used
as the *preconditioner* of a conjugate-gradient solve of ``(K + N damping) y = u``
whose products ``Obar (Obar^H y)`` are exact (the Jacobian's own ``matvec`` /
``rmatvec``, which centre on the sample vector). So the computed kernel need only be
close to ``K``: its rounding (single precision for double-precision input on the CPU,
for speed; the centring of the layers' kernel through its row means, which cancels
digits when the mean score is large next to its spread) costs CG iterations, not
accuracy. CG reports convergence when the backward error of a direct solve in the
working precision (LAPACK ``dsposv``'s test) is met. With a factor in the working
precision it stops there (its first step is the direct solve, optimally scaled). With
a single-precision factor of double-precision input it iterates on until its residual
stops halving (the rounding floor of the products): the backward-error test alone
allows forward errors of ``cond(K) eps``, and stopping at it left 100x the error of
a direct solve on a transformer (7.5e-11 against NetKet ``srt``'s 6.5e-13; 7.6e-13
when iterated, 11 steps).

Fallbacks, reported in ``SolveInfo.fallback`` (never a silent NaN): the attempts
below run in order until one gives a finite factor and a converged solve.

0. the kernel in the factor precision (single precision on the CPU; the input's on
   accelerators), shifted by ``N damping``;
1. for double-precision input on the CPU, the kernel in double precision, factored by
   LAPACK (a non-positive single-precision pivot, or a factor too rough to converge);
2. the shift of the *preconditioner* raised by ``10^j eps_f ||K||_inf`` (``j = 0, 2, 4``;
   ``eps_f`` the factor precision's unit roundoff), which makes a numerically
   indefinite kernel positive definite; the solve is still of ``K + N damping``.

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
from fishr.linalg import (SolveInfo, cg, cholesky_factor, cholesky_factor_solve, eigh_solve,
                          hermitian_from_lower_tiles, solve_info, tiled_cholesky, tiled_cholesky_solve,
                          tiled_factor_from_cholesky, tiled_inf_norm, tree_inner)
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


def _factor(tiles: jax.Array, shift: Any, kind: str):
    """The factor of ``A + shift I`` from the lower tiles of ``A`` (padded), and whether it is finite."""
    if kind == "lapack":
        factor = cholesky_factor(hermitian_from_lower_tiles(tiles), shift)
        return factor, jnp.all(jnp.isfinite(factor))
    factor = tiled_cholesky(tiles, shift)
    return factor, jnp.all(jnp.isfinite(factor.tiles))


def _apply_factor(factor, u: jax.Array, kind: str, rows: int) -> jax.Array:
    """``(A + shift I)^{-1} u`` from :func:`_factor`, for ``u`` whose leading axes hold ``rows`` rows."""
    n_pad = factor.shape[0] if kind == "lapack" else factor.tiles.shape[0] * factor.tiles.shape[2]
    dtype = factor.dtype if kind == "lapack" else factor.tiles.dtype
    flat = jnp.pad(u.reshape(rows, -1).astype(dtype), ((0, n_pad - rows), (0, 0)))
    x = cholesky_factor_solve(factor, flat) if kind == "lapack" else tiled_cholesky_solve(factor, flat)
    return x[:rows].reshape(u.shape).astype(u.dtype)


def _ladder_factor(tiles: jax.Array, shift: Any, raise_by: jax.Array, kind: str):
    """The first finite factor of ``A + (shift + raise_by[j]) I``, ``j = 0, 1, ...`` (a ``while_loop``).

    Returns ``(factor, j)``; ``j == len(raise_by)`` when none was finite (the factor is then NaN).
    The factorisation appears once in the program (the loop's body), which halves the
    compile time of this step against a first attempt outside the loop.
    """
    shapes = jax.eval_shape(lambda t: _factor(t, shift, kind)[0], tiles)
    empty = jax.tree.map(lambda sd: jnp.full(sd.shape, jnp.nan, sd.dtype), shapes)

    def cond(carry):
        _, ok, j = carry
        return ~ok & (j + 1 < raise_by.shape[0])

    def body(carry):
        _, _, j = carry
        factor, ok = _factor(tiles, shift + raise_by[j + 1], kind)
        return factor, ok, j + 1

    factor, ok, j = lax.while_loop(cond, body, (empty, jnp.asarray(False), jnp.int32(-1)))
    return factor, jnp.where(ok, j, raise_by.shape[0])


def kernel_solve(jac, shift: Any, solver, rhs: jax.Array) -> tuple[jax.Array, SolveInfo, Callable]:
    """``y = (K + shift I)^{-1} rhs`` for ``rhs`` ``(N, C)`` or ``(N, C, R)`` (see the module docstring).

    Returns ``(y, info, approx)``: ``approx(u)`` applies the factor that was used (no CG),
    for a correction step.
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
        return y, solve_info(jnp.sqrt(tree_inner(r, r)), jnp.all(jnp.isfinite(y))), direct

    kind = kernel_factorisation()
    single = kind == "tiled" and not _single_precision(rhs)  # double input on the CPU: factor in single
    tiles = (jac.single_precision() if single else jac).kernel_tiles()
    k_norm = tiled_inf_norm(tiles).astype(real)
    a_norm = k_norm + shift

    def ladder(tiles, kind):
        eps = jnp.finfo(tiles.dtype).eps / 2
        raise_by = jnp.asarray([0.0, 1.0, 1e2, 1e4], real) * eps * k_norm
        return _ladder_factor(tiles, shift, raise_by, kind)

    def pcg(factor, u, kind):
        precondition = lambda r: _apply_factor(factor, r, kind, rows)
        return cg(operator, u, None, rtol=0.0, atol=0.0, max_steps=MAX_STEPS,
                  preconditioner=precondition, backward_error=a_norm, stop_on_stagnation=True,
                  to_rounding_floor=single)

    factor, steps_up = ladder(tiles, kind)
    y, info = pcg(factor, rhs, kind)
    fallback = jnp.where(steps_up > 0, 2, 0)
    if not single:
        return y, info._replace(fallback=fallback.astype(jnp.int32)), lambda u: _apply_factor(factor, u, kind, rows)

    # double-precision input, single-precision factor: if that needed a raised shift or did not
    # converge, factor the double-precision kernel instead (computed only then: lax.cond), with
    # LAPACK on the assembled kernel (a rare path: it compiles in a fraction of the tiled loop)
    def high(_):
        factor_hi, up_hi = ladder(jac.kernel_tiles(), "lapack")
        factor_hi = tiled_factor_from_cholesky(factor_hi, tiles.shape[2])
        y_hi, info_hi = pcg(factor_hi, rhs, kind)
        return y_hi, info_hi._replace(fallback=jnp.where(up_hi > 0, 2, 1).astype(jnp.int32)), factor_hi

    def low(_):
        return y, info._replace(fallback=fallback.astype(jnp.int32)), jax.tree.map(lambda t: t.astype(work), factor)

    redo = (steps_up > 0) | ~info.converged
    y, info, used = lax.cond(redo, high, low, None)
    return y, info, lambda u: _apply_factor(used, u, kind, rows)


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
        y, info, approx = kernel_solve(jac, shift, solver, u)
        x = optax.tree.scale(1.0 / damping, optax.tree.sub(b, jac.rmatvec(y)))
        r = residual(x)  # one step of refinement in parameter space, with the factor alone
        x = optax.tree.add(x, optax.tree.scale(1.0 / damping, optax.tree.sub(r, jac.rmatvec(approx(jac.matvec(r))))))
    else:
        coeffs = energy_coefficients(local_energies, c, holomorphic, n, axis_name).astype(
            jnp.result_type(jac.matvec(b)))
        if momentum_term is None:
            y, info, _ = kernel_solve(jac, shift, solver, n * coeffs)
            x = jac.rmatvec(y)
        else:  # (S + damping)^{-1} damping v = v - Obar^H (K + N damping)^{-1} Obar v: no division either
            rhs = jnp.stack([n * coeffs, jac.matvec(momentum_term)], axis=-1)
            y, info, _ = kernel_solve(jac, shift, solver, rhs)
            x = optax.tree.add(jac.rmatvec(y[..., 0]), optax.tree.sub(momentum_term, jac.rmatvec(y[..., 1])))
    r = residual(x)
    return x, info._replace(residual_norm=jnp.sqrt(tree_inner(r, r)))
