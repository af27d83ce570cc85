r"""Sample-space SR: ``(S + damping I)^{-1} b`` through the ``N x N`` kernel ``K = Obar Obar^H``.

The Woodbury identity, exact for any ``b``:

    x = (b - Obar^H (K + N damping I)^{-1} Obar b) / damping,

one factorisation of the kernel (``2N x 2N`` for a complex ``log psi`` of real
parameters). Cheapest when ``N << P``. When ``b = Obar^H e / N`` (the VMC energy
gradient) this is MinSR: ``x = Obar^H (K + N damping I)^{-1} e``. Needs ``damping > 0``.

With several devices the statistics of all samples are gathered
(:meth:`gather`) and every device solves the same ``N x N`` system.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import optax

from fishr.linalg import (cholesky_factor, cholesky_factor_solve, eigh_solve, mixed_precision_refine,
                          solve_info, tiled_cholesky_factor, tiled_cholesky_factor_solve, tiled_inf_norm, tree_inner)
from fishr.solvers import Eigh

__all__ = ["kernel_factorisation", "solve_sample_space"]


def _residual(s_matvec, b, x, damping):
    """``b - (S + damping) x``."""
    return optax.tree.sub(b, optax.tree.add_scale(s_matvec(x), damping, x))


def solve_sample_space(jac, b, damping, solver) -> tuple:
    """Woodbury on the gathered batch: ``x = (b - Obar^H (Obar Obar^H + N damping)^{-1} Obar b) / damping``.

    In single precision one step of iterative refinement follows, reusing the
    factor: ``x += W(b - (S + damping) x)`` (``W`` the Woodbury solve above).
    The subtraction in ``W`` cancels most of ``b`` when ``b`` lies mostly in
    the row space of ``Obar`` (the VMC gradient does), which costs float32 about
    ``log10(1 / damping)`` digits; the refinement step brings them back (on the
    MLP of ``tests/test_sr_structured.py``, 1.4e-4 -> 8e-6 relative to the
    float64 solution at damping 1e-3).
    """
    jac = jac.gather()  # every device now holds the statistics of all N samples
    n_total = jax.eval_shape(jac.matvec, b).shape[0]
    single = _single_precision(b)
    kernel_solve, kernel_info = _kernel_solver(jac, n_total * damping, single, solver)

    def woodbury(rhs):
        u = jac.matvec(rhs)  # (N, C)
        y = kernel_solve(u)
        return optax.tree.scale(1.0 / damping, optax.tree.sub(rhs, jac.rmatvec(y)))

    def s_matvec(v):
        return optax.tree.scale(1.0 / n_total, jac.rmatvec(jac.matvec(v)))

    x = woodbury(b)
    steps = jnp.int32(0)
    if single:
        x = optax.tree.add(x, woodbury(_residual(s_matvec, b, x, damping)))
        steps = jnp.int32(1)
    r = _residual(s_matvec, b, x, damping)
    iterations, fallback = kernel_info()
    finite = jnp.isfinite(tree_inner(x, x))
    return x, solve_info(jnp.sqrt(tree_inner(r, r)), finite, steps + iterations, fallback)


def _kernel_solver(jac, shift, single_precision: bool, solver) -> tuple:
    """``(u -> (Obar Obar^H + shift I)^{-1} u, info)`` for ``u`` of shape ``(N, C)``.

    ``info()`` returns ``(refinement steps, fallback code)`` of the last call. With
    :class:`fishr.Eigh` the assembled kernel is diagonalised. With :class:`fishr.Cholesky`,
    by what is fastest where (:func:`kernel_factorisation`):

    * ``"tiled"`` (single precision on the CPU): the kernel's tiles
      (:meth:`gram_tiles`) factored by :func:`fishr.linalg.tiled_cholesky_factor`,
      whose tile products run on all cores where LAPACK factors a whole matrix on
      one (``N = 4096``, float32, 2-core CPU: the whole solve 498-521 -> 382-404 ms).
    * ``"mixed"`` (double precision on the CPU): the same tiled factor of the
      kernel rounded to single precision, refined in double precision with the
      exact kernel products ``Obar (Obar^H y)`` (:func:`fishr.linalg.mixed_precision_refine`,
      LAPACK ``dsposv``'s scheme and stopping test), which gives the accuracy of a
      double-precision Cholesky solve. If the refinement does not converge
      (``cond(K + shift) * 6e-8`` near 1 or above, or a failed single-precision
      factor), the double-precision path below runs instead (``lax.cond``: only one
      branch runs, except under ``vmap``, where both do); ``fallback = 1`` then.
    * ``"lapack"`` (accelerators; the CPU fallback): LAPACK (or the accelerator's
      solver) on the double- or single-precision kernel assembled above the
      diagonal (``gram(upper_only=True)``).
    """
    no_info = lambda: (jnp.int32(0), jnp.int32(0))
    if isinstance(solver, Eigh):
        kernel = jac.gram()
        return (lambda u: eigh_solve(kernel, u.reshape(-1), shift).reshape(u.shape)), no_info
    kind = kernel_factorisation(single_precision)

    def lapack_solver():
        factor = cholesky_factor(jac.gram(upper_only=True), shift)  # once per solver, reused by every call
        return lambda u: cholesky_factor_solve(factor, u.reshape(-1)).reshape(u.shape)

    def tiled_solver(tiles):
        factor = tiled_cholesky_factor(tiles, shift)
        return lambda u: tiled_cholesky_factor_solve(factor, u.reshape(-1)).reshape(u.shape)

    if kind == "lapack":
        return lapack_solver(), no_info
    if kind == "tiled":
        return tiled_solver(jac.gram_tiles()), no_info
    tiles = jac.single_precision().gram_tiles()
    low_solve, low_dtype = tiled_solver(tiles), tiles[0][0].dtype
    a_norm = tiled_inf_norm(tiles) + shift
    last = {}

    def solve(u):
        x, converged, steps = mixed_precision_refine(lambda y: jac.matvec(jac.rmatvec(y)) + shift * y,
                                                     lambda r: low_solve(r.astype(low_dtype)), u, a_norm)
        last["info"] = (steps, jnp.where(converged, 0, 1).astype(jnp.int32))
        return lax.cond(converged, lambda u: x, lambda u: lapack_solver()(u), u)

    return solve, lambda: last["info"]


def kernel_factorisation(single_precision: bool) -> str:
    """How :func:`_kernel_solver` factors the kernel: ``"tiled"`` (single precision
    on the CPU), ``"mixed"`` (double precision on the CPU) or ``"lapack"`` (elsewhere)."""
    if jax.default_backend() != "cpu":
        return "lapack"
    return "tiled" if single_precision else "mixed"


def _single_precision(tree) -> bool:
    return any(jnp.finfo(leaf.dtype).bits < 64 for leaf in jax.tree.leaves(tree))
