r"""Stochastic reconfiguration (SR): ``(S + damping I)^{-1} g`` on pytree parameters.

The math and its conventions
----------------------------
Samples ``x_i``, ``i = 1..N`` over *all* devices; ``O_i = d log psi(x_i) / d theta``
(one row per sample of the Jacobian ``O``, ``N x P``), ``Obar = O - mean_i O_i``.
SR uses the covariance matrix

    S = Obar^H Obar / N                         (normalised by N, not N - 1)

and returns ``x = (S + damping I)^{-1} g`` for a gradient pytree ``g``.

* ``S`` is the covariance of ``d log|psi|``: for a real ``log psi`` it equals a
  quarter of the Fisher information matrix of the distribution ``|psi|^2``,
  ``F = 4 S``, so ``(S + damping I)^{-1}`` is vmcnet's
  ``(0.25 F + damping I)^{-1}`` (same damping, no rescaling).
* Real parameters with a complex ``log psi`` (e.g. a phase): ``S = Re[Obar^H Obar] / N``,
  equivalently the real Jacobian with the real and imaginary parts of each
  sample's row stacked, still divided by the number of samples ``N``.
* ``holomorphic=True``: complex parameters and a holomorphic ``log psi``;
  ``S = Obar^H Obar / N`` is Hermitian and the solve is complex.

Modes (``mode=``)
-----------------
``"lazy"``
    ``S`` is never formed. ``log psi`` of the whole local batch is linearised
    once per call (``jax.linearize``); ``S v = Obar^H (O v - mean(O v)) / N`` uses
    that linearisation and its transpose, so a CG iteration costs one JVP and
    one VJP and no forward pass. Solved by conjugate gradient.
``"dense"`` (alias ``"debug"``, the seed's DEBUG)
    The per-sample Jacobian ``O`` (``N x P``) is formed with ``vmap`` of the
    per-sample gradient. Solved by CG (``solver="cg"``) or by a Cholesky
    factorisation of the ``P x P`` matrix ``S + damping I`` (``solver="cholesky"``).
``"sample_space"``
    The Woodbury identity, exact for any ``g``:
    ``x = (g - Obar^H (N damping I + Obar Obar^H)^{-1} Obar g) / damping``,
    one Cholesky of the ``N x N`` kernel ``Obar Obar^H`` (``2N x 2N`` for a complex
    ``log psi`` of real parameters). Cheapest when ``N << P``. When
    ``g = Obar^H e / N`` (the VMC energy gradient) this is MinSR:
    ``x = Obar^H (Obar Obar^H + N damping I)^{-1} e``. Needs ``damping > 0``.
    On the CPU the kernel is factored by tiles (all cores), in double precision
    as a single-precision factor refined to double-precision accuracy; on
    accelerators by their solver on the assembled kernel (:func:`_kernel_solver`).
    In single precision one step of iterative refinement (reusing the factor)
    recovers the digits that the subtraction cancels.
    With several devices the centred Jacobian rows of all samples are gathered
    (:func:`fishr.distributed.all_gather_batch`) and every device solves the
    same ``N x N`` system.

Momentum (SPRING, Goldshlager, Abrahamsen & Lin 2024)
----------------------------------------------------
With ``mu = momentum`` in ``[0, 1)`` and the previous solution ``x_{k-1}``:

    x_k = (S + damping I)^{-1} (g + damping * mu * x_{k-1});   mu = 0 is plain SR.

Writing ``x_k = mu x_{k-1} + y`` gives ``(S + damping) y = g - mu S x_{k-1}``;
for ``g = Obar^H e / N`` the push-through identity turns this into SPRING's
sample-space update

    x_k = mu x_{k-1} + Obar^H (Obar Obar^H + N damping I)^{-1} (e - mu Obar x_{k-1}),

(SPRING writes it with ``Obar / sqrt(N)`` and ``e / sqrt(N)``, which absorbs the ``N``).
``tests/test_sr.py`` checks the two forms agree.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree
import optax

from fishr import distributed
from fishr.checks import check_damping, check_tree_matches_params, damping_at, tree_all_finite
from fishr.distributed import AxisName
from fishr.jacobian import DenseJacobian, LayerJacobian, LinearizedJacobian
from fishr.kfac.capture import discover_layers
from fishr.linalg import (CGInfo, cg, cholesky_factor, cholesky_factor_solve, cholesky_solve, mixed_precision_refine,
                          tiled_cholesky_factor, tiled_cholesky_factor_solve, tiled_inf_norm, tree_inner)

__all__ = [
    "MODES",
    "SRState",
    "fisher_inverse_fn",
    "sr",
    "sr_solve",
]

LogPsiApply = Callable[[Any, Any], jax.Array]
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

MODES = ("lazy", "dense", "sample_space")
_MODE_ALIASES = {"lazy": "lazy", "dense": "dense", "debug": "dense", "sample_space": "sample_space"}
_SOLVERS = {"lazy": ("cg",), "dense": ("cg", "cholesky"), "sample_space": ("cholesky",)}
_WARM_STARTS = ("grad", "previous", "zeros")
_JACOBIANS = ("auto", "structured", "generic")


# --------------------------------------------------------------------------- checks


def _canonical_mode(mode: Any) -> str:
    name = getattr(mode, "name", mode)  # accept enums such as vmcnet's SRMode
    if isinstance(name, str) and name.lower() in _MODE_ALIASES:
        return _MODE_ALIASES[name.lower()]
    raise ValueError(
        f"fishr SR: unknown `mode` {mode!r}; expected one of "
        f"{', '.join(repr(m) for m in _MODE_ALIASES)}."
    )


def _canonical_solver(mode: str, solver: Optional[str]) -> str:
    if solver is None:
        return _SOLVERS[mode][0]
    if solver not in _SOLVERS[mode]:
        raise ValueError(
            f"fishr SR: `solver`={solver!r} is not available for mode={mode!r}; "
            f"expected one of {_SOLVERS[mode]}."
        )
    return solver


def _check_damping(damping: Any, mode: str) -> None:
    check_damping(damping, "fishr SR")
    if mode == "sample_space" and isinstance(damping, numbers.Real) and damping == 0:
        raise ValueError(
            "fishr SR: mode='sample_space' needs `damping` > 0 (the Woodbury form divides by it); got 0."
        )


def _check_jacobian(jacobian: Any, mode: str) -> None:
    if jacobian not in _JACOBIANS:
        raise ValueError(f"fishr SR: `jacobian` must be one of {_JACOBIANS}, got {jacobian!r}.")
    if jacobian == "structured" and mode == "dense":
        raise ValueError(
            "fishr SR: jacobian='structured' applies to modes 'lazy' and 'sample_space'; "
            "mode='dense' forms the explicit Jacobian by definition."
        )


def _check_momentum(momentum: Any) -> None:
    if not isinstance(momentum, numbers.Real) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"fishr SR: `momentum` must be a float in [0, 1), got {momentum!r}.")


def _local_batch_size(samples: Any) -> int:
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(samples)}
    if not sizes or None in sizes or len(sizes) != 1:
        raise ValueError(
            "fishr SR: `samples` must be an array (or pytree of arrays) with one common leading "
            f"batch axis; got leading sizes {sorted(map(str, sizes))}."
        )
    return sizes.pop()


def _check_holomorphic(params: Any, holomorphic: bool) -> None:
    leaves = jax.tree.leaves(params)
    complex_leaves = [jnp.iscomplexobj(p) for p in leaves]
    if holomorphic and not all(complex_leaves):
        raise ValueError(
            "fishr SR: holomorphic=True needs complex `params` (every leaf complex); "
            "for real parameters with a complex log psi use holomorphic=False."
        )
    if not holomorphic and any(complex_leaves):
        raise ValueError(
            "fishr SR: complex `params` need holomorphic=True (a holomorphic log psi); "
            "for a non-holomorphic model split each complex parameter into real and imaginary parts."
        )


# --------------------------------------------------------------------------- scores


def _score_fn(log_psi_apply: LogPsiApply, samples: Any, holomorphic: bool) -> Callable[[Any], jax.Array]:
    """``params -> (n_local, C)`` rows whose Jacobian is ``O`` (``C = 2``: Re and Im stacked)."""
    n_local = _local_batch_size(samples)

    def scores(params):
        out = log_psi_apply(params, samples)
        if jnp.shape(out) != (n_local,):
            raise ValueError(
                "fishr SR: `log_psi_apply(params, samples)` must return one value per sample, "
                f"shape ({n_local},); got shape {jnp.shape(out)}."
            )
        if holomorphic:
            if not jnp.iscomplexobj(out):
                raise ValueError("fishr SR: holomorphic=True needs a complex `log_psi_apply` output.")
            return out[:, None]
        if jnp.iscomplexobj(out):
            return jnp.stack([out.real, out.imag], axis=-1)
        return out[:, None]

    return scores


def _one_sample_fn(log_psi_apply: LogPsiApply, holomorphic: bool) -> Callable[[Any, Any], jax.Array]:
    """``(params, x) -> (C,)``: the scores of one sample (a batch of one)."""

    def one_sample(params, x):
        batch_of_one = jax.tree.map(lambda leaf: leaf[None], x)
        return _score_fn(log_psi_apply, batch_of_one, holomorphic)(params)[0]

    return one_sample


def _wants_layers(jacobian: str, log_psi_apply, params, samples) -> bool:
    if jacobian == "generic":
        return False
    if jacobian == "structured":
        return True
    return bool(discover_layers(log_psi_apply, params, samples).layers)


def _build_jacobian(structured, log_psi_apply, params, samples, holomorphic, axis_name, mean_fn=None):
    scores = _score_fn(log_psi_apply, samples, holomorphic)
    scores(params)  # trace-time checks of the output shape on the whole batch
    one_sample = _one_sample_fn(log_psi_apply, holomorphic)
    if structured:
        scores_of = lambda p, s: _score_fn(log_psi_apply, s, holomorphic)(p)
        return LayerJacobian.build(scores_of, one_sample, params, samples, holomorphic, axis_name)
    return DenseJacobian.build(one_sample, params, samples, holomorphic, axis_name, mean_fn)


def _residual(s_matvec, b, x, damping):
    """``b - (S + damping) x``."""
    return optax.tree.sub(b, optax.tree.add_scale(s_matvec(x), damping, x))


def _residual_info(s_matvec, b, x, damping) -> CGInfo:
    r = _residual(s_matvec, b, x, damping)
    return CGInfo(iterations=jnp.int32(0), residual_norm=jnp.sqrt(tree_inner(r, r)))


# --------------------------------------------------------------------------- solves


def _solve_lazy(jac, n_local, b, x0, damping, axis_name, cg_kwargs):
    def s_matvec(v):
        w = jac.rmatvec(jac.matvec(v))
        return distributed.pmean(optax.tree.scale(1.0 / n_local, w), axis_name)

    return cg(lambda v: optax.tree.add_scale(s_matvec(v), damping, v), b, x0, **cg_kwargs)


def _solve_dense(jac: DenseJacobian, b, x0, damping, axis_name, solver, cg_kwargs):
    n_local = jac.rows.shape[0]
    rows = jac.flat_rows
    b_flat, _ = ravel_pytree(b)

    def s_matvec(v):
        return distributed.pmean(jac.rmatvec_flat(jac.matvec_flat(v)) / n_local, axis_name)

    if solver == "cholesky":
        s = distributed.pmean(rows.conj().T @ rows / n_local, axis_name)
        x = cholesky_solve(s, b_flat, damping)
        return jac.unravel(x), _residual_info(s_matvec, b_flat, x, damping)
    x0_flat = None if x0 is None else ravel_pytree(x0)[0]
    x, info = cg(lambda v: s_matvec(v) + damping * v, b_flat, x0_flat, **cg_kwargs)
    return jac.unravel(x), info


def _solve_sample_space(jac, b, damping):
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
    kernel_solve = _kernel_solver(jac, n_total * damping, _single_precision(b))

    def woodbury(rhs):
        u = jac.matvec(rhs)  # (N, C)
        y = kernel_solve(u)
        return optax.tree.scale(1.0 / damping, optax.tree.sub(rhs, jac.rmatvec(y)))

    def s_matvec(v):
        return optax.tree.scale(1.0 / n_total, jac.rmatvec(jac.matvec(v)))

    x = woodbury(b)
    if _single_precision(b):
        x = optax.tree.add(x, woodbury(_residual(s_matvec, b, x, damping)))
    return x, _residual_info(s_matvec, b, x, damping)


def _kernel_solver(jac, shift, single_precision: bool) -> Callable[[jax.Array], jax.Array]:
    """``u -> (Obar Obar^H + shift I)^{-1} u`` (``u`` of shape ``(N, C)``) by a Cholesky factorisation.

    By what is fastest where (:func:`_kernel_factorisation`):

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
      branch runs, except under ``vmap``, where both do).
    * ``"lapack"`` (accelerators; the CPU fallback): LAPACK (or the accelerator's
      solver) on the double- or single-precision kernel assembled above the
      diagonal (``gram(upper_only=True)``).
    """
    kind = _kernel_factorisation(single_precision)

    def lapack_solver():
        factor = cholesky_factor(jac.gram(upper_only=True), shift)  # once per solver, reused by every call
        return lambda u: cholesky_factor_solve(factor, u.reshape(-1)).reshape(u.shape)

    def tiled_solver(tiles):
        factor = tiled_cholesky_factor(tiles, shift)
        return lambda u: tiled_cholesky_factor_solve(factor, u.reshape(-1)).reshape(u.shape)

    if kind == "lapack":
        return lapack_solver()
    if kind == "tiled":
        return tiled_solver(jac.gram_tiles())
    tiles = jac.single_precision().gram_tiles()
    low_solve, low_dtype = tiled_solver(tiles), tiles[0][0].dtype
    a_norm = tiled_inf_norm(tiles) + shift

    def solve(u):
        x, converged, _ = mixed_precision_refine(lambda y: jac.matvec(jac.rmatvec(y)) + shift * y,
                                                 lambda r: low_solve(r.astype(low_dtype)), u, a_norm)
        return lax.cond(converged, lambda u: x, lambda u: lapack_solver()(u), u)

    return solve


def _kernel_factorisation(single_precision: bool) -> str:
    """How :func:`_kernel_solver` factors the kernel: ``"tiled"`` (single precision
    on the CPU), ``"mixed"`` (double precision on the CPU) or ``"lapack"`` (elsewhere)."""
    if jax.default_backend() != "cpu":
        return "lapack"
    return "tiled" if single_precision else "mixed"


def _single_precision(tree) -> bool:
    return any(jnp.finfo(leaf.dtype).bits < 64 for leaf in jax.tree.leaves(tree))


def sr_solve(
    log_psi_apply: LogPsiApply,
    grad: Any,
    params: Any,
    samples: Any,
    *,
    damping: Any = 1e-3,
    mode: str = "lazy",
    solver: Optional[str] = None,
    momentum: float = 0.0,
    previous: Optional[Any] = None,
    x0: Optional[Any] = None,
    maxiter: Optional[int] = None,
    tol: float = 1e-5,
    atol: float = 0.0,
    holomorphic: bool = False,
    jacobian: str = "auto",
    axis_name: AxisName = None,
    mean_fn: Optional[Callable[[jax.Array], jax.Array]] = None,
) -> tuple[Any, CGInfo]:
    """Solve ``(S + damping I) x = grad + damping * momentum * previous`` (see module docs).

    A pure, jit-able function of arrays and pytrees; the building block of
    :func:`fisher_inverse_fn` and :func:`sr`.

    Args:
      log_psi_apply: ``(params, samples) -> log psi``, batched over the leading
        axis of ``samples``, returning shape ``(n_local,)`` (real or complex).
      grad: gradient pytree with the structure and shapes of ``params``.
      params: parameters at which ``S`` is evaluated.
      samples: local samples (array or pytree with a common leading batch axis).
      damping: ``damping >= 0`` (``> 0`` for ``"sample_space"``), a float or a scalar array.
      mode: ``"lazy"``, ``"dense"`` (alias ``"debug"``) or ``"sample_space"``.
      solver: ``"cg"`` or ``"cholesky"`` (dense only); ``None`` picks the mode's default
        (CG for lazy and dense, Cholesky for sample_space).
      momentum: SPRING momentum ``mu`` in ``[0, 1)``; needs ``previous`` when > 0.
      previous: the previous solution ``x_{k-1}`` (pytree like ``params``).
      x0: CG initial guess; ``None`` starts from the right-hand side (the seed's choice).
      maxiter, tol, atol: CG controls (see :func:`fishr.linalg.cg`).
      holomorphic: complex parameters and a holomorphic ``log psi``.
      jacobian: how ``Obar`` is represented (modes ``"lazy"`` and ``"sample_space"``):
        ``"structured"`` from the statistics of the Flax Dense/DenseGeneral layers that
        :mod:`fishr.kfac.capture` finds in ``log_psi_apply`` (exact; see
        :mod:`fishr.jacobian`), ``"generic"`` (``jax.linearize`` for lazy, explicit
        rows for sample_space), or ``"auto"``: structured for sample_space when at
        least one layer is captured, generic otherwise.
      axis_name: mapped axis (or axes) the samples are split over; ``None`` for one device.
      mean_fn: the centring mean ``u -> mean_i u_i`` over axis 0 of the score rows
        (``(n_local, C)`` or ``(n_local, C, P)``), including any reduction over devices;
        ``None`` is ``fishr.distributed.batch_mean(u, axis_name)``. For adapters whose
        users supply their own mean (vmcnet's ``mean_grad_fn``); generic Jacobians only
        (``jacobian="structured"`` is refused, ``"auto"`` picks generic).

    Returns:
      ``(x, CGInfo)``: the solution with the structure of ``params`` and the solve's
      diagnostics (direct solves report 0 iterations and the explicit residual norm).
    """
    mode = _canonical_mode(mode)
    solver = _canonical_solver(mode, solver)
    _check_damping(damping, mode)
    _check_jacobian(jacobian, mode)
    if mean_fn is not None and jacobian == "structured":
        raise ValueError(
            "fishr SR: `mean_fn` needs jacobian='generic' or 'auto' (the structured Jacobian centres itself)."
        )
    _check_momentum(momentum)
    check_tree_matches_params(grad, params, "fishr SR")
    _check_holomorphic(params, holomorphic)

    b = grad
    if momentum > 0.0:
        if previous is None:
            raise ValueError("fishr SR: `momentum` > 0 needs `previous`, the last solution.")
        check_tree_matches_params(previous, params, "fishr SR", "`previous`")
        b = optax.tree.add_scale(grad, damping * momentum, previous)
    if x0 is None:
        x0 = b
    cg_kwargs = dict(tol=tol, atol=atol, maxiter=maxiter)

    if mode == "lazy":
        n_local = _local_batch_size(samples)
        if jacobian == "structured":
            jac = _build_jacobian(True, log_psi_apply, params, samples, holomorphic, axis_name)
        else:
            jac = LinearizedJacobian(_score_fn(log_psi_apply, samples, holomorphic), params, holomorphic, axis_name,
                                     mean_fn)
        return _solve_lazy(jac, n_local, b, x0, damping, axis_name, cg_kwargs)
    if mode == "dense":
        jac = _build_jacobian(False, log_psi_apply, params, samples, holomorphic, axis_name, mean_fn)
        return _solve_dense(jac, b, x0, damping, axis_name, solver, cg_kwargs)
    structured = mean_fn is None and _wants_layers(jacobian, log_psi_apply, params, samples)
    jac = _build_jacobian(structured, log_psi_apply, params, samples, holomorphic, axis_name, mean_fn)
    return _solve_sample_space(jac, b, damping)


def fisher_inverse_fn(
    log_psi_apply: LogPsiApply,
    damping: float = 1e-3,
    maxiter: Optional[int] = None,
    mode: str = "lazy",
    axis_name: AxisName = None,
    *,
    solver: Optional[str] = None,
    tol: float = 1e-5,
    atol: float = 0.0,
    holomorphic: bool = False,
    jacobian: str = "auto",
) -> Callable[..., Any]:
    """The SR preconditioner as a pure function, in the shape of vmcnet's ``get_fisher_inverse_fn``.

    Returns ``precondition(grad, params, samples, *, x0=None) -> x`` with
    ``x = (S + damping I)^{-1} grad`` (``S`` as in the module docstring; this is
    vmcnet's ``(0.25 F + damping I)^{-1} grad``). CG starts from ``grad`` unless
    ``x0`` is given. All checks of arguments whose value is known at trace time
    (mode, solver, damping sign, tree structures, output shape) raise
    ``ValueError`` when the function is traced.
    """
    mode = _canonical_mode(mode)
    solver = _canonical_solver(mode, solver)
    _check_damping(damping, mode)
    _check_jacobian(jacobian, mode)

    def precondition(grad, params, samples, *, x0=None):
        x, _ = sr_solve(
            log_psi_apply, grad, params, samples, damping=damping, mode=mode, solver=solver,
            x0=x0, maxiter=maxiter, tol=tol, atol=atol, holomorphic=holomorphic, jacobian=jacobian,
            axis_name=axis_name,
        )
        return x

    return precondition


# --------------------------------------------------------------------------- optax


class SRState(NamedTuple):
    """State of :func:`sr`.

    Attributes:
      count: number of successful (finite) updates so far; the damping schedule's step.
      previous: the last finite solution ``x`` (zeros before the first step); used
        by momentum and by ``warm_start="previous"``.
      cg_iterations: CG iterations of the last finite solve (0 for direct solves).
      residual_norm: ``||b - (S + damping) x||`` of the last finite solve.
    """

    count: jax.Array
    previous: Any
    cg_iterations: jax.Array
    residual_norm: jax.Array


def sr(
    log_psi_apply: LogPsiApply,
    damping: ScalarOrSchedule = 1e-3,
    *,
    mode: str = "lazy",
    solver: Optional[str] = None,
    momentum: float = 0.0,
    maxiter: Optional[int] = None,
    tol: float = 1e-5,
    atol: float = 0.0,
    warm_start: str = "grad",
    holomorphic: bool = False,
    jacobian: str = "auto",
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Stochastic reconfiguration as an optax transformation.

    ``update(grads, state, params, *, samples)`` returns
    ``x = (S + damping I)^{-1} (grads + damping * momentum * x_prev)`` (see
    :mod:`fishr.sr` for ``S``, the modes and SPRING momentum). The sign and the
    learning rate are left to the chain, as in optax::

        opt = optax.chain(fishr.sr(log_psi, damping=1e-3), optax.sgd(1e-2))
        updates, state = opt.update(grads, state, params, samples=samples)

    Args:
      log_psi_apply: ``(params, samples) -> log psi`` of shape ``(n_local,)``.
      damping: float ``>= 0`` or an ``optax.Schedule`` of the step count.
      mode: ``"lazy"`` (default), ``"dense"``/``"debug"`` or ``"sample_space"``.
      solver: ``"cg"`` or ``"cholesky"`` (dense only); ``None`` for the mode's default.
      momentum: SPRING momentum in ``[0, 1)``.
      maxiter, tol, atol: CG controls.
      warm_start: CG initial guess: ``"grad"`` (the seed's), ``"previous"``
        (last solution) or ``"zeros"``.
      holomorphic: complex parameters with a holomorphic ``log psi``.
      jacobian: ``"auto"``, ``"structured"`` or ``"generic"`` (see :func:`sr_solve`).
      axis_name: mapped axis name(s) under ``jax.pmap``/``jax.shard_map``; ``None`` for one device.

    Non-finite values: if the solution has any NaN/inf (from a non-finite
    gradient, sample or ``log psi``), the NaN update is returned (so that
    ``optax.apply_if_finite`` skips it and counts it) and the state is left
    exactly as it was: the count, the previous solution and the diagnostics
    never take non-finite values from a bad step.
    """
    mode = _canonical_mode(mode)
    solver = _canonical_solver(mode, solver)
    _check_damping(damping, mode)
    _check_jacobian(jacobian, mode)
    _check_momentum(momentum)
    if warm_start not in _WARM_STARTS:
        raise ValueError(f"fishr.sr: `warm_start` must be one of {_WARM_STARTS}, got {warm_start!r}.")

    def init_fn(params):
        residual_dtype = jnp.real(jnp.zeros((), jax.tree.leaves(params)[0].dtype)).dtype
        return SRState(
            count=jnp.zeros((), jnp.int32),
            previous=optax.tree.zeros_like(params),
            cg_iterations=jnp.zeros((), jnp.int32),
            residual_norm=jnp.zeros((), residual_dtype),
        )

    def update_fn(updates, state, params=None, *, samples=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("fishr.sr: `params` must be passed to update (S is evaluated at params).")
        if samples is None:
            raise ValueError("fishr.sr: `samples=` must be passed to update (the Monte Carlo samples).")
        damping_now = damping_at(damping, state.count)
        x0 = {"grad": None, "previous": state.previous, "zeros": optax.tree.zeros_like(updates)}[warm_start]
        x, info = sr_solve(
            log_psi_apply, updates, params, samples, damping=damping_now, mode=mode, solver=solver,
            momentum=momentum, previous=state.previous, x0=x0, maxiter=maxiter, tol=tol, atol=atol,
            holomorphic=holomorphic, jacobian=jacobian, axis_name=axis_name,
        )
        x = jax.tree.map(lambda xi, g: xi.astype(g.dtype), x, updates)
        finite = tree_all_finite(x)
        new_state = SRState(
            count=optax.safe_increment(state.count),
            previous=x,
            cg_iterations=info.iterations.astype(jnp.int32),
            residual_norm=info.residual_norm.astype(state.residual_norm.dtype),
        )
        new_state = optax.tree.where(finite, new_state, state)
        return x, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
