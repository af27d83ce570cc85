r"""Solver objects: how a damped system ``(A + damping I) x = b`` is solved, with their options.

In the style of lineax: a solver is a small frozen (hashable, jit-static) object that
holds exactly the options that apply to it, so an option that means nothing for a
solve cannot be written, and every option is validated once, when the object is built.
Every solve returns ``(x, fishr.SolveInfo)``.

* :class:`CG`: conjugate gradient on an operator ``v -> A v`` (no matrix is formed).
  Stops when ``||b - A x||_2 <= max(rtol ||b||_2, atol)`` or after ``max_steps``;
  ``initial_guess`` is the right-hand side (vmcnet's choice), the previous solution
  of a transform, or zero. The same tolerance semantics everywhere in fishr.
* :class:`Cholesky`: a direct solve by the Cholesky factorisation of the damped
  matrix (fails, with NaN, when it is not positive definite).
* :class:`Eigh`: a direct solve by the eigendecomposition ``A = U diag(w) U^H``:
  ``x = U diag(1 / (w + damping)) U^H b`` (NaN where ``w + damping <= 0``).
* :class:`Spectral`: SR's eigendecomposition solve ``x = f(S) b`` with cutoffs (hard,
  smooth, signal-to-noise) and robust SR's gain (:mod:`fishr.spectral`).

Which methods take which solver: :func:`fishr.sr` takes :class:`CG` in
``mode="lazy"``, :class:`CG`, :class:`Cholesky` or :class:`Eigh` in ``mode="dense"``
(on the ``P x P`` matrix), :class:`Cholesky` or :class:`Eigh` in
``mode="sample_space"`` (on the ``N x N`` kernel), and :class:`Spectral` in both of
the latter; :func:`fishr.branch_natgrad`
takes :class:`CG`, :class:`Cholesky` or :class:`Eigh` (on the ``D x D`` covariance);
:func:`fishr.kfac` takes :class:`Cholesky` or :class:`Eigh` (for the factor inverses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from fishr import linalg
from fishr._validate import check_choice, check_int, check_positive, check_real
from fishr.linalg import SolveInfo, solve_info

__all__ = ["CG", "Cholesky", "DirectSolver", "Eigh", "Solver", "Spectral"]

InitialGuess = Literal["rhs", "previous", "zeros"]
_INITIAL_GUESSES = ("rhs", "previous", "zeros")


def _check_tolerance(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise ValueError(f"fishr.CG: `{name}` must be a finite float >= 0, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class CG:
    """Conjugate gradient (see the module docstring).

    Attributes:
      rtol: tolerance on ``||b - A x||_2`` relative to ``||b||_2`` (``>= 0``).
      atol: absolute tolerance on ``||b - A x||_2`` (``>= 0``).
      max_steps: iteration cap (``>= 1``); ``None`` is ``10 * size(b)``, as in
        ``jax.scipy.sparse.linalg.cg``.
      initial_guess: ``"rhs"`` (start from ``b``, vmcnet's choice), ``"previous"`` (the
        transform's last solution; in a pure solve, the ``previous`` argument) or ``"zeros"``.

    A solve that stops at ``max_steps`` above the tolerance reports
    ``converged=False``; one whose result is worse than zero (divergence) or not
    finite returns NaN (see :func:`fishr.linalg.cg`).

    Examples:
      >>> import fishr
      >>> fishr.CG(rtol=1e-8, max_steps=50)
      CG(rtol=1e-08, atol=0.0, max_steps=50, initial_guess='rhs')
      >>> tx = fishr.sr(lambda p, s: s @ p, 1e-3, mode="lazy", solver=fishr.CG(rtol=1e-8, max_steps=50))
      >>> fishr.CG(max_steps=-5)
      Traceback (most recent call last):
      ...
      ValueError: fishr.CG: `max_steps` must be an int >= 1 or None, got -5.
    """

    rtol: float = 1e-5
    atol: float = 0.0
    max_steps: int | None = None
    initial_guess: InitialGuess = "rhs"

    def __post_init__(self):
        _check_tolerance(self.rtol, "rtol")
        _check_tolerance(self.atol, "atol")
        check_int(self.max_steps, "fishr.CG", "max_steps", 1, allow_none=True)
        check_choice(self.initial_guess, _INITIAL_GUESSES, "fishr.CG", "initial_guess")

    def start(self, b: Any, previous: Any | None = None) -> Any | None:
        """The initial guess for right-hand side ``b`` (``None`` means zeros)."""
        if self.initial_guess == "rhs":
            return b
        if self.initial_guess == "previous":
            if previous is None:
                raise ValueError("fishr.CG: initial_guess='previous' needs the previous solution (`previous=`).")
            return previous
        return None

    def solve(self, matvec: Callable[[Any], Any], b: Any, x0: Any | None = None) -> tuple[Any, SolveInfo]:
        """``A^{-1} b`` for the operator ``matvec = v -> A v`` (damping included), from ``x0``."""
        return linalg.cg(matvec, b, x0, rtol=self.rtol, atol=self.atol, max_steps=self.max_steps)


def _singular_undamped(damping: Any, smallest: jax.Array, largest: jax.Array, n: int) -> jax.Array:
    """Whether an undamped (``damping == 0``) ``n x n`` matrix is singular to working precision.

    ``smallest`` / ``largest`` are its smallest and largest eigenvalues (or squared Cholesky
    pivots, per batch element). Below ``n * eps * largest`` (the rank tolerance of
    ``numpy.linalg.matrix_rank``) the matrix is rank-deficient to working precision, the
    system has no solution worth the name, and a direct solve would return a huge finite
    vector (3e17 for a rank-deficient branch covariance before this check). With
    ``damping > 0`` the damped matrix is the one asked for and is solved as it is.
    """
    eps = jnp.finfo(jnp.real(smallest).dtype).eps
    return (jnp.asarray(damping) == 0) & ~(jnp.real(smallest) > n * eps * jnp.real(largest))


def _nan_where(flag: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` with NaN in every batch element whose ``flag`` (one per leading batch index) is set."""
    return jnp.where(flag.reshape(flag.shape + (1,) * (x.ndim - flag.ndim)), jnp.nan, x)


class DirectSolver:
    """A direct solve of a damped Hermitian PSD matrix (:class:`Cholesky`, :class:`Eigh`).

    With ``damping == 0`` a matrix that is singular to working precision gives NaN
    (there is no solution; see ``_singular_undamped``); a matrix that is not positive
    definite after damping gives NaN too.
    """

    method: str = ""

    def solve(self, a: jax.Array, b: jax.Array, damping: Any) -> tuple[jax.Array, SolveInfo]:
        """``(a + damping I)^{-1} b`` for a Hermitian PSD ``a`` (``b`` of shape ``(n,)`` or ``(n, k)``)."""
        x = self.apply_inverse(a, b, damping)
        r = b - (a @ x + damping * x)
        finite = jnp.all(jnp.isfinite(x))
        return x, solve_info(jnp.linalg.norm(r), finite)

    def inverse(self, a: jax.Array, damping: Any) -> jax.Array:
        """The explicit ``(a + damping I)^{-1}`` (non-finite when the damped ``a`` is not PD)."""
        return linalg.psd_inverse(a, damping, self.method)

    def apply_inverse(self, a: jax.Array, b: jax.Array, damping: Any) -> jax.Array:
        """``(a + damping I)^{-1} b`` without diagnostics; ``a`` and ``b`` may be batched alike."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Cholesky(DirectSolver):
    """Direct solve by a Cholesky factorisation of ``a + damping I`` (NaN if it is not positive definite)."""

    method = "cholesky"

    def apply_inverse(self, a, b, damping):
        factor = linalg.cholesky_factor(a, damping)
        x = linalg.cholesky_factor_solve(factor, b)
        pivots = jnp.abs(jnp.diagonal(factor, axis1=-2, axis2=-1)) ** 2
        return _nan_where(_singular_undamped(damping, pivots.min(axis=-1), pivots.max(axis=-1), a.shape[-1]), x)


@dataclasses.dataclass(frozen=True)
class Eigh(DirectSolver):
    """Direct solve by ``a = U diag(w) U^H``: ``U diag(1 / (w + damping)) U^H b`` (NaN where ``w + damping <= 0``)."""

    method = "eigh"

    def apply_inverse(self, a, b, damping):
        x, w = linalg.eigh_solve(a, b, damping, return_eigenvalues=True)
        return _nan_where(_singular_undamped(damping, w.min(axis=-1), w.max(axis=-1), a.shape[-1]), x)


@dataclasses.dataclass(frozen=True)
class Spectral:
    """SR's spectral solve: ``x = f(S) b`` from an eigendecomposition (math in :mod:`fishr.spectral`).

    On the ``N x N`` kernel in ``mode="sample_space"`` and on the ``P x P`` matrix in
    ``mode="dense"`` of :func:`fishr.sr`; the damping is the diagonal shift and may be 0
    when a cutoff is set (the pseudo-inverse).

    Attributes:
      rtol: hard cutoff: directions whose shifted eigenvalue ``sigma + d`` is at most
        ``rtol`` times the largest are dropped (``f = 0``); 0 keeps every direction.
      rtol_smooth: smooth cutoff: each direction is weighted by
        ``1 / (1 + (rtol_smooth h_max / h)^6)``, ``h = sigma + d`` (NetKet's ``pinv_smooth``).
      snr: signal-to-noise cutoff: each direction is weighted by ``1 / (1 + (snr / SNR_k)^6)``
        with the SNR of the force along it (:func:`fishr.spectral.snr_weights`); needs the
        local energies at update time. ``None`` for none.

    Eigenvalues below zero (rounding of a PSD matrix) are taken as zero; never NaN
    from an indefinite matrix, unlike :class:`Eigh`.
    """

    rtol: float = 0.0
    rtol_smooth: float = 0.0
    snr: float | None = None

    def __post_init__(self):
        for name in ("rtol", "rtol_smooth"):
            check_real(getattr(self, name), "fishr.Spectral", name, 0.0, 1.0, high_open=True)
        check_positive(self.snr, "fishr.Spectral", "snr")

    @property
    def has_cutoff(self) -> bool:
        """Whether a cutoff makes an undamped (``damping = 0``) solve well defined."""
        return self.rtol > 0 or self.rtol_smooth > 0


Solver = CG | Cholesky | Eigh | Spectral


def check_solver(solver: Any, allowed: tuple, who: str, context: str) -> None:
    """``solver`` must be an instance of one of ``allowed`` (a clear error naming ``context`` otherwise)."""
    if not isinstance(solver, allowed):
        names = ", ".join(f"fishr.{cls.__name__}()" for cls in allowed)
        raise TypeError(f"{who}: `solver` must be one of {names} {context}; got {solver!r}.")
