r"""Stochastic reconfiguration (SR) as a pure function: ``(S + damping I)^{-1} g`` on pytree parameters.

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
* Complex parameters with ``holomorphic=False`` (a ``log psi`` that is not holomorphic in
  them): each complex entry ``a + i b`` is the real pair ``(a, b)`` and SR runs on those
  ``2 P`` real coordinates as above (:mod:`fishr._complex_params`); the gradient is
  ``dL/da + i dL/db`` (the conjugate of ``jax.grad``), the solution ``x_a + i x_b``.
  Generic Jacobian; no diagonal metric.

Modes (``mode=``) and solvers (``solver=``, :mod:`fishr.solvers`)
-----------------------------------------------------------------
``"lazy"``
    ``S`` is never formed. ``log psi`` of the whole local batch is linearised
    once per call (``jax.linearize``); ``S v = Obar^H (O v - mean(O v)) / N`` uses
    that linearisation and its transpose, so a CG iteration costs one JVP and
    one VJP and no forward pass. Where the captured Flax layers cover every
    parameter (``jacobian="auto"``; :func:`fishr.jacobian.layers_cover_model`), the
    products come from the layers' statistics instead (two matrix products per
    layer, none of the model's elementwise or attention code). Solver: :class:`fishr.CG`.
``"dense"`` (the seed's DEBUG)
    The per-sample Jacobian ``O`` (``N x P``) is formed with ``vmap`` of the
    per-sample gradient. Solver: :class:`fishr.CG` on the rows, or
    :class:`fishr.Cholesky` / :class:`fishr.Eigh` / :class:`fishr.Spectral` on the
    ``P x P`` matrix ``S``. A Cholesky factor that is not finite (``S + damping`` not
    positive definite to working precision, e.g. a singular ``S`` at damping 0) falls
    back to the spectral pseudo-inverse ``Spectral(rtol=P eps)`` (``info.fallback = 3``).
``"sample_space"``
    The Woodbury identity on the ``N x N`` kernel ``Obar Obar^H``
    (``fishr._sample_space``). Solver: :class:`fishr.Cholesky` (default),
    :class:`fishr.Eigh` or :class:`fishr.Spectral`. Needs ``damping > 0`` (or a
    ``Spectral`` cutoff).
``"auto"`` (default)
    One of the three, chosen at trace time from ``N`` (global), ``P``, the number of
    score components and the captured layers (:func:`auto_mode`): the exact solve
    (dense Cholesky or sample_space) of least arithmetic, lazy only where neither
    matrix fits in memory.

Momentum (SPRING, Goldshlager, Abrahamsen & Lin 2024)
-----------------------------------------------------
With ``mu = momentum`` in ``[0, 1)`` and the previous solution ``x_{k-1}``:

    x_k = (S + damping I)^{-1} (g + damping * mu * x_{k-1});   mu = 0 is plain SR.

Writing ``x_k = mu x_{k-1} + y`` gives ``(S + damping) y = g - mu S x_{k-1}``;
for ``g = Obar^H e / N`` the push-through identity turns this into SPRING's
sample-space update

    x_k = mu x_{k-1} + Obar^H (Obar Obar^H + N damping I)^{-1} (e - mu Obar x_{k-1}),

(SPRING writes it with ``Obar / sqrt(N)`` and ``e / sqrt(N)``, which absorbs the ``N``).
``tests/test_sr.py`` checks the two forms agree.

SR variants (:mod:`fishr.spectral`)
-----------------------------------
* Robust SR, ``gamma=``: ``x = G(S) b`` with ``G(sigma) = (sigma + gamma d^2) / (sigma + d)^2``
  per eigenvalue of ``S`` (``gamma = 1 / d`` is plain SR; ``"sqrt"`` is ``d^{-1/2}``), by
  one factorisation as ``(S + d)^{-1} + (gamma d^2 - d) (S + d)^{-2}`` (lazy and dense
  CG: two CG solves; sample_space from ``grads`` alone: two kernel factorisations, so
  pass the local energies), or as the gain of a :class:`fishr.Spectral` solve.
* Damping relative to the trace, ``trace_damping=t``: the damping used is
  ``damping + t tr S`` (quantax's ``ashift + rshift Tr S``; ``tr S`` is exact and cheap in
  every formed mode).
* Conditioning control, ``max_cond_num=kappa``: the damping used is raised to the least
  ``d' >= damping`` with ``(h_max + d') / (h_min + d') <= kappa``. With
  :class:`fishr.Spectral` / :class:`fishr.Eigh` from the exact eigenvalues; with a
  factorisation or CG from the cheap bounds ``h_max <= tr S`` and ``h_min >= 0`` (so the
  bound always holds, at the price of more damping when the spectrum is flat). Not in
  lazy mode (no bound without forming something). :func:`fishr.sr` reports the damping
  used in its state.
* Spectral solves, ``solver=fishr.Spectral(rtol, rtol_smooth, snr)``: cutoffs and the
  signal-to-noise weight (needs ``local_energies``) in dense and sample_space modes.

Diagonal metrics (:mod:`fishr._metric`)
---------------------------------------
``(S + damping M)^{-1}`` for a positive diagonal ``M``: ``metric=`` (a pytree), the shift
relative to the diagonal ``diag_damping=rho`` (``M = 1 + (rho / damping) diag S``) and
MARCH (:func:`fishr.sr`'s ``march=``). Solved exactly as SR in the coordinates
``theta~ = M^{1/2} theta`` (the Jacobian's columns scaled by ``M^{-1/2}``, so the generic
Jacobian); the damping rules, robust SR and the spectral cutoffs act on ``S`` in those
coordinates, and ``info.residual_norm`` is measured there. With ``factored_metric=True``
each captured layer's block of ``M`` is first replaced by its rank-one factorisation
``u w^T`` (same row and column sums), which the structured Jacobian carries by scaling
the layer's inputs by ``u^{-1/2}`` and its output gradients by ``w^{-1/2}``: the solve
is exact for that metric at the cost of plain structured SR.

Bad damping at run time
-----------------------
A concrete damping is checked when the solve is traced (finite, ``>= 0``, ``> 0`` for
``sample_space``). A traced damping or a schedule's value that is negative or not
finite makes the solution NaN (the transform then keeps its state).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from fishr import distributed
from fishr._complex_params import has_complex, join_pairs, split_pairs
from fishr._metric import kronecker_factored, metric_fn
from fishr._precision import DEFAULT_MATMUL_PRECISION, check_matmul_precision, precision_scope
from fishr._sample_space import energy_coefficients, sample_weight_ratios, solve_sample_space
from fishr._validate import (
    check_choice,
    check_damping,
    check_positive,
    check_real,
    check_tree_matches_params,
    damping_ok,
    local_batch_size,
    poison,
)
from fishr.capture import LayerPlan, discover_layers
from fishr.chunking import check_chunk_size, num_chunks
from fishr.distributed import AxisName
from fishr.jacobian import (
    ChunkedLinearizedJacobian,
    DenseJacobian,
    LayerJacobian,
    LinearizedJacobian,
    ScaledJacobian,
    ShardedRowsJacobian,
    kernel_cost_per_pair,
    layers_cover_model,
    layers_pay_off,
)
from fishr.linalg import (
    SolveInfo,
    cholesky_factor,
    cholesky_factor_solve,
    hermitian_from_upper,
    solve_info,
    upper_gram,
)
from fishr.scores import inactive_leaves, log_psi_one_sample, log_psi_rows
from fishr.solvers import CG, Cholesky, Eigh, Spectral, check_solver
from fishr.spectral import DampingRule, robust_correction, snr_weights, spectral_filter

__all__ = ["JACOBIANS", "MODES", "MODE_CHOICES", "SRConfig", "auto_mode", "sr_config", "sr_solve"]

Mode = Literal["auto", "lazy", "dense", "sample_space"]
JacobianKind = Literal["auto", "structured", "generic"]
ApplyFn = Callable[[Any, Any], jax.Array]

MODES = ("lazy", "dense", "sample_space")  # what runs; mode="auto" picks one of them (auto_mode)
MODE_CHOICES = ("auto",) + MODES
AUTO_MAX_DENSE_P = 16_384  # mode="auto" forms the P x P matrix only up to here (1 GiB in float32)
AUTO_MAX_SAMPLE_SPACE_N = 32_768  # ... and the N x N kernel only up to here (4 GiB in float32)
JACOBIANS = ("auto", "structured", "generic")
_SOLVERS = {"lazy": (CG,), "dense": (CG, Cholesky, Eigh, Spectral), "sample_space": (Cholesky, Eigh, Spectral)}
_DEFAULT_SOLVERS = {"lazy": CG(), "dense": CG(), "sample_space": Cholesky()}


@dataclasses.dataclass(frozen=True)
class SRConfig:
    """The static choices of one SR solve, validated once (:func:`sr_config`)."""

    mode: str
    solver: Any
    jacobian: str
    momentum: float
    holomorphic: bool
    axis_name: AxisName
    sample_space_ok: bool = True  # for mode="auto": False when the damping is a concrete 0
    gamma: Any = None  # robust SR (None: plain SR)
    damping_rule: DampingRule = DampingRule()
    diag_damping: float = 0.0
    solve_dtype: str | None = None
    score_clip: float | None = None
    prune: bool = False
    chunk_size: int | None = None  # samples per chunk of the score passes (fishr.chunking)
    factored_metric: bool = False  # a diagonal metric's layer blocks by their Kronecker factorisation
    matmul_precision: str | None = DEFAULT_MATMUL_PRECISION  # jax.default_matmul_precision inside the solve


def runs_lazy(mode: str, solver: Any) -> bool:
    """Whether SR with these options runs lazy CG whatever the shapes (nothing is formed)."""
    return mode == "lazy" or (mode == "auto" and isinstance(solver, CG))


def _check_solve_dtype(solve_dtype: Any, who: str) -> str | None:
    """``None``, or ``"float64"`` given as a string or a dtype."""
    if solve_dtype is None:
        return None
    try:
        ok = np.dtype(solve_dtype) == np.float64
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{who}: `solve_dtype` must be None (the inputs' precision) or 'float64', got "
                         f"{solve_dtype!r}.")
    return "float64"


def sr_config(who: str, *, damping: Any, mode: Any, solver: Any, jacobian: Any, momentum: Any, holomorphic: Any,
              axis_name: AxisName, gamma: Any = None, max_cond_num: Any = None,
              trace_damping: Any = 0.0, diag_damping: Any = 0.0, solve_dtype: Any = None, score_clip: Any = None,
              prune: Any = False, chunk_size: Any = None, factored_metric: Any = False,
              matmul_precision: Any = DEFAULT_MATMUL_PRECISION) -> SRConfig:
    """Validate SR's options (naming ``who`` in every error) and fill in the mode's default solver."""
    check_choice(mode, MODE_CHOICES, who, "mode")
    pseudo_inverse = isinstance(solver, Spectral) and solver.has_cutoff
    check_real(diag_damping, who, "diag_damping", 0.0, float("inf"), high_open=True)
    check_damping(damping, who, positive=(mode == "sample_space" and not pseudo_inverse) or gamma is not None
                  or diag_damping > 0)
    if mode == "auto":
        if solver is not None:
            check_solver(solver, (CG, Cholesky, Eigh, Spectral), who, "in mode='auto'")
    else:
        if solver is None:
            solver = _DEFAULT_SOLVERS[mode]
        check_solver(solver, _SOLVERS[mode], who, f"in mode={mode!r}")
    check_choice(jacobian, JACOBIANS, who, "jacobian")
    if jacobian == "structured" and mode == "dense":
        raise ValueError(
            f"{who}: jacobian='structured' applies to modes 'lazy' and 'sample_space'; "
            "mode='dense' forms the explicit Jacobian by definition."
        )
    check_real(momentum, who, "momentum", 0.0, 1.0, high_open=True)
    if not isinstance(holomorphic, bool):
        raise ValueError(f"{who}: `holomorphic` must be True or False, got {holomorphic!r}.")
    if gamma != "sqrt":
        gamma = check_positive(gamma, who, "gamma", expected="None (plain SR), 'sqrt' (damping^-1/2) or a finite "
                               "float > 0")
    max_cond_num = check_positive(max_cond_num, who, "max_cond_num", above=1.0)
    if max_cond_num is not None and runs_lazy(mode, solver):
        raise ValueError(f"{who}: `max_cond_num` needs a formed matrix (modes 'dense', 'sample_space' or 'auto' "
                         "without a CG solver); mode 'lazy' has no cheap bound on the eigenvalues.")
    check_real(trace_damping, who, "trace_damping", 0.0, float("inf"), high_open=True)
    score_clip = check_positive(score_clip, who, "score_clip")
    if score_clip is not None:
        if mode == "lazy" or jacobian == "structured":
            raise ValueError(f"{who}: `score_clip` needs the per-sample rows: modes 'dense', 'sample_space' or 'auto', "
                             "jacobian 'generic' or 'auto'.")
    if not isinstance(prune, bool):
        raise ValueError(f"{who}: `prune` must be True or False, got {prune!r}.")
    if not isinstance(factored_metric, bool):
        raise ValueError(f"{who}: `factored_metric` must be True or False, got {factored_metric!r}.")
    if trace_damping > 0 and runs_lazy(mode, solver):
        raise ValueError(f"{who}: `trace_damping` needs tr S from a formed matrix (modes 'dense', 'sample_space' or "
                         "'auto' without a CG solver); mode 'lazy' forms nothing.")
    zero_damping = isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping == 0
    return SRConfig(mode, solver, jacobian, float(momentum), holomorphic, axis_name,
                    not zero_damping or pseudo_inverse, gamma, DampingRule(float(trace_damping), max_cond_num),
                    float(diag_damping), _check_solve_dtype(solve_dtype, who), score_clip, prune,
                    check_chunk_size(chunk_size, who), factored_metric, check_matmul_precision(matmul_precision, who))


def auto_mode(n: int, num_params: int, kernel_per_pair: int, components: int = 1,
              sample_space_ok: bool = True) -> str:
    """The mode ``mode="auto"`` runs: the exact solve of least arithmetic whose matrix fits.

    With ``R = C N`` score rows (``C = 2`` for a complex ``log psi`` of real parameters):
    ``"dense"`` (Cholesky of the ``P x P`` matrix ``S``) costs ``R P^2`` to form ``S`` and
    ``P^3 / 3`` to factor it; ``"sample_space"`` costs ``N^2 k`` to form the kernel
    (``k`` = :func:`fishr.jacobian.kernel_cost_per_pair`, which counts the captured
    layers' cheaper forms) and ``R^3 / 3`` to factor it. The cheaper one runs, where
    its matrix fits (``P <= AUTO_MAX_DENSE_P``, ``N <= AUTO_MAX_SAMPLE_SPACE_N``);
    ``"lazy"`` (CG, nothing formed) only when neither does. ``sample_space_ok=False``
    (a damping of 0) excludes the sample-space solve. ``N`` is the global batch.
    """
    rows = components * n
    dense = rows * num_params**2 + num_params**3 / 3
    sample = n * n * kernel_per_pair + rows**3 / 3
    fits_dense = num_params <= AUTO_MAX_DENSE_P
    fits_sample = sample_space_ok and n <= AUTO_MAX_SAMPLE_SPACE_N
    if fits_sample and (sample <= dense or not fits_dense):
        return "sample_space"
    return "dense" if fits_dense else "lazy"


def _layer_plan_of(apply_fn, params, batch) -> Callable[[], LayerPlan]:
    """``() -> discover_layers(apply_fn, params, batch, norms=True)``, traced at most once.

    The plan is static (fixed at trace time); ``mode="auto"`` and ``jacobian="auto"`` both read it,
    and one abstract trace of the model per call is what they cost (each trace is ~0.05 s of a
    first call on the grid's models).
    """
    found: list[LayerPlan] = []

    def plan() -> LayerPlan:
        if not found:  # the norms' rows come from the capture too
            found.append(discover_layers(apply_fn, params, batch, norms=True))
        return found[0]

    return plan


def _resolve_auto(config: SRConfig, apply_fn, params, batch, n_local: int, mean_fn,
                  layer_plan: Callable[[], LayerPlan] | None = None) -> SRConfig:
    """``config`` with ``mode="auto"`` replaced by :func:`auto_mode`'s choice and its default solver.

    ``layer_plan``: the call's :func:`_layer_plan_of` (one is made if not given)."""
    if config.mode != "auto":
        return config
    if isinstance(config.solver, CG):  # an iterative solve was asked for: nothing is formed
        return dataclasses.replace(config, mode="lazy")
    num_params = sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(params))
    out = jax.eval_shape(lambda p: apply_fn(p, batch), params)
    components = 2 if (jnp.issubdtype(out.dtype, jnp.complexfloating) and not config.holomorphic) else 1
    plan = None
    if mean_fn is None and config.jacobian != "generic":
        plan = (layer_plan or _layer_plan_of(apply_fn, params, batch))()
        if config.jacobian == "auto" and not layers_pay_off(plan, num_params, components):
            plan = None
    n = distributed.batch_size(n_local, config.axis_name)
    mode = auto_mode(n, num_params, kernel_cost_per_pair(plan, num_params, components), components,
                     config.sample_space_ok)
    if mode == "dense" and config.jacobian == "structured":
        mode = "sample_space" if config.sample_space_ok else "lazy"
    solver = config.solver if config.solver is not None else (Cholesky() if mode == "dense" else
                                                              _DEFAULT_SOLVERS[mode])
    if mode == "lazy":
        solver = CG()
    return dataclasses.replace(config, mode=mode, solver=solver)


def _check_holomorphic(params: Any, holomorphic: bool, who: str) -> None:
    complex_leaves = [jnp.iscomplexobj(p) for p in jax.tree.leaves(params)]
    if holomorphic and not all(complex_leaves):
        raise ValueError(
            f"{who}: holomorphic=True needs complex `params` (every leaf complex); "
            "for real parameters with a complex log psi use holomorphic=False."
        )


# --------------------------------------------------------------------------- Jacobian representations


def _wants_layers(config: SRConfig, mean_fn, n_local: int, params, layer_plan: Callable[[], LayerPlan]) -> bool:
    """Whether ``Obar`` is the layers' statistics: ``jacobian="structured"``, or ``"auto"`` with no
    ``mean_fn`` where they pay for the mode: sample_space where :func:`fishr.jacobian.layers_pay_off`
    holds (the kernel), lazy where :func:`fishr.jacobian.layers_cover_model` does (the products) and the
    batch is one chunk (``chunk_size`` bounds the memory that the statistics of every sample would take);
    dense mode never."""
    if config.mode == "dense":
        return False
    if config.jacobian != "auto" or mean_fn is not None:
        return config.jacobian == "structured"
    if config.mode == "lazy":
        return num_chunks(n_local, config.chunk_size) <= 1 and layers_cover_model(layer_plan())
    return layers_pay_off(layer_plan(), sum(jnp.size(leaf) for leaf in jax.tree.leaves(params)))


def _scores_of(apply_fn, config: SRConfig, who: str) -> Callable[[Any, Any], jax.Array]:
    """``(params, samples) -> (n, C)`` score rows, with the samples an argument (for capture and chunks)."""
    return lambda p, s: log_psi_rows(apply_fn, s, config.holomorphic, who)(p)


def _build_jacobian(structured: bool, apply_fn, params, batch, config: SRConfig, who: str, mean_fn=None,
                    fold_for: str = "kernel"):
    """The Jacobian representation: the layers' statistics or the explicit (optionally clipped) rows
    (``fold_for``: :meth:`fishr.jacobian.LayerJacobian.build`'s)."""
    rows = log_psi_rows(apply_fn, batch, config.holomorphic, who)
    jax.eval_shape(rows, params)  # trace-time checks of the output shape on the whole batch
    one_sample = log_psi_one_sample(apply_fn, config.holomorphic, who)
    if structured:
        return LayerJacobian.build(_scores_of(apply_fn, config, who), one_sample, params, batch, config.holomorphic,
                                   config.axis_name, config.chunk_size, fold_for)
    return DenseJacobian.build(one_sample, params, batch, config.holomorphic, config.axis_name, mean_fn,
                               config.score_clip, config.chunk_size)


# --------------------------------------------------------------------------- parameter-space solves


def _cg_twice(config: SRConfig, operator_of, b, x0, damping):
    """``(S + d)^{-1} b`` by ``config.solver`` (CG), or robust SR's ``G(S) b`` by two CG solves."""
    x, info = config.solver.solve(operator_of(damping), b, x0)
    if config.gamma is None:
        return x, info
    x2, info2 = config.solver.solve(operator_of(damping), x, x)
    scale = robust_correction(config.gamma, damping)
    info = info._replace(iterations=info.iterations + info2.iterations, converged=info.converged & info2.converged)
    return optax.tree.add_scale(x, scale, x2), info


def _solve_lazy(jac, n_local, b, x0, damping, config: SRConfig):
    if isinstance(jac, LayerJacobian):
        jac = jac.for_products()

    def s_matvec(v):
        w = jac.rmatvec(jac.matvec(v))
        return distributed.pmean(optax.tree.scale(1.0 / n_local, w), config.axis_name)

    x, info = _cg_twice(config, lambda d: lambda v: optax.tree.add_scale(s_matvec(v), d, v), b, x0, damping)
    return x, info, damping


def _local_energy_coefficients(local_energies, c: int, holomorphic: bool, axis_name: AxisName,
                               ratios=None) -> jax.Array:
    """``N c_i`` of the local samples (``(n_local, C)``): the per-sample force ``Obar_i^H (N c_i)``."""
    return energy_coefficients(local_energies, c, holomorphic, 1, None, ratios,
                               mean=lambda e: distributed.batch_mean(e, axis_name))


def _solve_dense_spectral(jac: DenseJacobian, s, rhs, damping, solver, config: SRConfig, local_energies,
                          ratios=None):
    """``x = f(S) b`` from ``S = U diag(sigma) U^H`` (:mod:`fishr.spectral`; SNR from the local rows);
    ``b = rhs(d)`` for the damping ``d`` used. Returns ``(x, d, b)`` (flat)."""
    sigma, u = jnp.linalg.eigh(s)
    sigma = jnp.maximum(sigma, 0)
    damping = config.damping_rule(damping, jnp.sum(sigma), jnp.max(sigma), jnp.min(sigma))
    b_flat = rhs(damping)[1]
    weights = None
    if solver.snr is not None:
        if local_energies is None:
            raise ValueError("fishr.sr: Spectral(snr=...) needs `local_energies=` (the SNR is that of the force).")
        rows = jac.rows  # (n_local, C, P), centred
        nc = _local_energy_coefficients(local_energies, rows.shape[1], config.holomorphic, config.axis_name, ratios)
        # Q_ik = sum_c conj(Obar_ic u_k) N c_ic: sample i's share of rho_k = u_k^H g
        q = jnp.einsum("icp,pk,ic->ik", rows.reshape(rows.shape[0], rows.shape[1], -1).conj(), u.conj(),
                       nc.astype(u.dtype))
        weights = snr_weights(q, solver.snr, config.axis_name)
    f = spectral_filter(sigma, damping, gamma=config.gamma, rtol=solver.rtol, rtol_smooth=solver.rtol_smooth,
                        weights=weights)
    x = u @ (f * (u.conj().T @ b_flat))
    return x, damping, b_flat


def _solve_dense(jac: DenseJacobian, grads, momentum_term, previous, damping, config: SRConfig,
                 local_energies=None, ratios=None):
    """``(S + d)^{-1} (grads + d momentum_term)`` (or its variants) with ``d`` the damping used."""
    n_local = jac.rows_shape[0]
    rows = jac.flat_rows

    def rhs(d):
        b = grads if momentum_term is None else optax.tree.add_scale(grads, d, momentum_term)
        return b, ravel_pytree(b)[0]

    def s_times(v):  # S v from the rows, flat
        return distributed.pmean(jac.rmatvec_flat(jac.matvec_flat(v)) / n_local, config.axis_name)

    if isinstance(config.solver, CG):
        if config.damping_rule.active:  # tr S = mean_i |Obar_i|^2 (>= h_max), h_min >= 0
            trace = distributed.pmean(jnp.sum(jnp.abs(rows) ** 2) / n_local, config.axis_name)
            damping = config.damping_rule(damping, trace)
        b, b_flat = rhs(damping)
        x0 = config.solver.start(b, previous)
        x0_flat = None if x0 is None else ravel_pytree(x0)[0]
        x, info = _cg_twice(config, lambda d: lambda v: s_times(v) + d * v, b_flat, x0_flat, damping)
        return jac.unravel(x), info, damping
    solver = config.solver
    if isinstance(solver, Eigh) and (config.gamma is not None or config.damping_rule.active):
        solver = Spectral()
    # a Cholesky factor reads the upper triangle alone: only those blocks are formed (linalg.upper_gram), and
    # its residuals take the exact products instead of S
    cholesky = isinstance(solver, Cholesky)
    s = distributed.pmean((upper_gram(rows) if cholesky else rows.conj().T @ rows) / n_local, config.axis_name)

    if isinstance(solver, Spectral):
        x, damping, b_flat = _solve_dense_spectral(jac, s, rhs, damping, solver, config, local_energies, ratios)
        finite = jnp.all(jnp.isfinite(x))
        info = solve_info(jnp.linalg.norm(b_flat - (s @ x + damping * x)), finite)
        return jac.unravel(x), info, damping
    if config.damping_rule.active:  # Cholesky: h_max <= tr S, h_min >= 0
        damping = config.damping_rule(damping, jnp.real(jnp.trace(s)))
    b_flat = rhs(damping)[1]
    residual_norm = lambda v: jnp.linalg.norm(b_flat - (s_times(v) + damping * v))  # of (S + d) v = b
    if cholesky and config.gamma is not None:
        factor = cholesky_factor(s, damping)
        x1 = cholesky_factor_solve(factor, b_flat)
        x = x1 + robust_correction(config.gamma, damping) * cholesky_factor_solve(factor, x1)
        x = jnp.where(jnp.all(jnp.isfinite(factor)), x, jnp.nan)
        info = solve_info(residual_norm(x1), jnp.all(jnp.isfinite(x)))
    elif cholesky:
        x = solver.apply_inverse(s, b_flat, damping)
        info = solve_info(residual_norm(x), jnp.all(jnp.isfinite(x)))
    else:
        x, info = solver.solve(s, b_flat, damping)
    if cholesky:  # fallback 3: the spectral pseudo-inverse where the factor failed
        def pseudo_inverse(_):
            rtol = s.shape[0] * float(jnp.finfo(s.dtype).eps)
            plain = dataclasses.replace(config, damping_rule=DampingRule())  # the damping is final already
            y, _, _ = _solve_dense_spectral(jac, hermitian_from_upper(s), lambda d: (None, b_flat), damping,
                                            Spectral(rtol=rtol), plain, None)
            return y, solve_info(residual_norm(y), jnp.all(jnp.isfinite(y)), fallback=3)

        good = jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(s)) | ~damping_ok(damping)
        x, info = jax.lax.cond(good, lambda _: (x, info), pseudo_inverse, None)
    return jac.unravel(x), info, damping


# --------------------------------------------------------------------------- the pure function


class SolveOutcome(NamedTuple):
    """What :func:`solve_with_config` returns: the solution, its diagnostics, the mode that ran, the
    damping used (:class:`fishr.spectral.DampingRule`) and the diagonal metric used (or ``None``)."""

    x: Any
    info: SolveInfo
    mode: str
    damping: jax.Array
    metric: Any


def _times(scale: Any, tree: Any, divide: bool = False) -> Any:
    """``scale * tree`` (or ``tree / scale``) leaf by leaf, in ``tree``'s dtypes."""
    op = (lambda s, x: x / s.astype(x.dtype)) if divide else (lambda s, x: s.astype(x.dtype) * x)
    return jax.tree.map(op, scale, tree)


def _to_double(x: Any) -> Any:
    """A float32 / complex64 array in double precision (other arrays as they are)."""
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.asarray(x, jnp.complex128)
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(x, jnp.float64)
    return x


def solve_with_config(config: SRConfig, apply_fn: ApplyFn, grads: Any, params: Any, batch: Any, damping: Any,
                      previous: Any | None, who: str, mean_fn=None, local_energies: jax.Array | None = None,
                      metric: Callable[[Callable[[], Any]], Any] | None = None,
                      weights: jax.Array | None = None) -> SolveOutcome:
    """:func:`sr_solve` for validated options (the transform's entry point).

    ``metric``: ``None`` or a function that, given a thunk computing ``diag S`` (a pytree),
    returns the diagonal metric ``M`` (a positive pytree like the parameters); the solve is
    then SR in the coordinates ``theta~ = M^{1/2} theta`` (module docs, "Diagonal metrics").
    With ``config.solve_dtype = "float64"`` single-precision inputs are promoted (the model
    is evaluated, the scores formed and the system solved in double precision) and the
    solution is returned in the gradient's dtype. Everything traced here (the model's
    passes included) runs under ``jax.default_matmul_precision(config.matmul_precision)``
    (unless it is ``None``)."""
    precision = precision_scope(config.matmul_precision)
    single = any(jnp.finfo(jnp.result_type(leaf)).bits < 64 for leaf in jax.tree.leaves(params)
                 if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact))
    if config.solve_dtype is None or not single:
        with precision:
            return _solve_with_config(config, apply_fn, grads, params, batch, damping, previous, who, mean_fn,
                                      local_energies, metric, weights)
    if not jax.config.read("jax_enable_x64"):
        raise ValueError(f"{who}: solve_dtype='float64' needs double precision in JAX: "
                         "jax.config.update('jax_enable_x64', True) before building arrays.")
    up = lambda tree: jax.tree.map(_to_double, tree)
    with precision:
        out = _solve_with_config(config, apply_fn, up(grads), up(params), up(batch), damping, up(previous), who,
                                 mean_fn, up(local_energies), metric, up(weights))
    return out._replace(x=jax.tree.map(lambda x, g: x.astype(g.dtype), out.x, grads))


def _inverse_root(m: jax.Array) -> jax.Array:
    """``m^{-1/2}`` of a metric's entries, NaN where an entry is not positive and finite."""
    m = jnp.real(m)
    return jnp.where((m > 0) & jnp.isfinite(m), jax.lax.rsqrt(jnp.maximum(m, jnp.finfo(m.dtype).tiny)), jnp.nan)


def _solve_with_config(config: SRConfig, apply_fn: ApplyFn, grads: Any, params: Any, batch: Any, damping: Any,
                       previous: Any | None, who: str, mean_fn=None, local_energies: jax.Array | None = None,
                       metric: Callable[[Callable[[], Any]], Any] | None = None,
                       weights: jax.Array | None = None) -> SolveOutcome:
    """:func:`solve_with_config` in the inputs' own precision."""
    check_tree_matches_params(grads, params, who)
    if not config.holomorphic and has_complex(params):  # non-holomorphic: SR on the real pairs (a, b)
        if metric is not None:
            raise ValueError(f"{who}: a diagonal metric (march, diag_damping, metric=) is not supported with complex "
                             "`params` and holomorphic=False; split the parameters into real ones yourself.")
        if config.jacobian == "structured":
            raise ValueError(f"{who}: jacobian='structured' needs real `params` or holomorphic=True; complex "
                             "parameters of a non-holomorphic log psi take the generic Jacobian.")
        if previous is not None:
            check_tree_matches_params(previous, params, who, "`previous`")
        pairs = lambda tree: None if tree is None else split_pairs(tree, params)
        out = _solve_with_config(dataclasses.replace(config, jacobian="generic"),
                                 lambda p, b: apply_fn(join_pairs(p, params), b), pairs(grads), pairs(params), batch,
                                 damping, pairs(previous), who, mean_fn, local_energies, None, weights)
        return out._replace(x=join_pairs(out.x, params))
    _check_holomorphic(params, config.holomorphic, who)
    n_local = local_batch_size(batch, who)
    if local_energies is not None and jnp.shape(local_energies) != (n_local,):
        raise ValueError(f"{who}: `local_energies` must hold one value per sample of `batch`, shape ({n_local},); "
                         f"got shape {jnp.shape(local_energies)}.")
    if mean_fn is not None and config.jacobian == "structured":
        raise ValueError(f"{who}: `mean_fn` needs jacobian='generic' or 'auto' (the structured Jacobian centres "
                         "itself).")
    if previous is not None:
        check_tree_matches_params(previous, params, who, "`previous`")
    if config.momentum > 0.0 and previous is None:
        raise ValueError(f"{who}: `momentum` > 0 needs `previous`, the last solution.")

    if config.score_clip is not None:  # clipped rows: the generic per-sample rows
        config = dataclasses.replace(config, jacobian="generic")
    if weights is not None:  # weighted rows: the generic per-sample rows
        if jnp.shape(weights) != (n_local,) or jnp.iscomplexobj(weights):
            raise ValueError(f"{who}: `weights` must be real, one per sample of `batch`, shape ({n_local},); got "
                             f"shape {jnp.shape(weights)}, dtype {jnp.result_type(weights)}.")
        if mean_fn is not None or config.jacobian == "structured" or config.mode == "lazy":
            raise ValueError(f"{who}: `weights` need the generic per-sample rows: mode 'dense', 'sample_space' or "
                             "'auto', jacobian 'generic' or 'auto', and no `mean_fn`.")
        config = dataclasses.replace(config, jacobian="generic")
    if metric is not None and not config.factored_metric:  # a per-entry diagonal metric: the generic Jacobian
        if config.jacobian == "structured":
            raise ValueError(f"{who}: a diagonal metric (march, diag_damping, metric=) needs jacobian='generic' or "
                             "'auto' (it rescales every column, which the layers' statistics cannot; "
                             "with factored_metric=True they can).")
        config = dataclasses.replace(config, jacobian="generic")
    requested_solver = config.solver
    layer_plan = _layer_plan_of(apply_fn, params, batch)
    config = _resolve_auto(config, apply_fn, params, batch, n_local, mean_fn, layer_plan)
    ok = damping_ok(damping)
    damping = jnp.where(ok, damping, jnp.nan)  # a traced bad damping gives NaN, never an anti-damped solve
    if config.mode == "lazy" and (config.damping_rule.active or isinstance(requested_solver, Spectral)):
        raise ValueError(f"{who}: mode='auto' picked 'lazy' (neither matrix fits), which has no `max_cond_num`, "
                         "`trace_damping` or spectral solve: pass mode='dense' or 'sample_space' explicitly.")
    ratios = None
    if weights is not None:
        if config.mode == "lazy":
            raise ValueError(f"{who}: `weights` need mode 'dense' or 'sample_space'; mode='auto' picked 'lazy' "
                             "(neither matrix fits): pass mode= explicitly.")
        ratios, weights_ok = sample_weight_ratios(weights, config.axis_name)
        ok = ok & weights_ok
        mean_fn = lambda u: distributed.batch_mean(ratios.reshape((-1,) + (1,) * (u.ndim - 1)) * u,
                                                   config.axis_name)

    structured = _wants_layers(config, mean_fn, n_local, params, layer_plan)
    if config.mode == "lazy" and structured:
        # layers folded into explicit rows only where that keeps lazy mode's memory near the statistics'
        jac = _build_jacobian(True, apply_fn, params, batch, config, who, fold_for="products")
    elif config.mode == "lazy" and num_chunks(n_local, config.chunk_size) > 1:
        assert config.chunk_size is not None  # more than one chunk
        jac = ChunkedLinearizedJacobian(_scores_of(apply_fn, config, who), params, batch, config.chunk_size,
                                        config.holomorphic, config.axis_name, mean_fn)
    elif config.mode == "lazy":
        jac = LinearizedJacobian(log_psi_rows(apply_fn, batch, config.holomorphic, who), params,
                                 config.holomorphic, config.axis_name, mean_fn)
    else:
        jac = _build_jacobian(structured, apply_fn, params, batch, config, who, mean_fn)
        if ratios is not None:  # weights took the generic rows
            assert isinstance(jac, DenseJacobian | ShardedRowsJacobian)
            jac = jac.scaled_samples(jnp.sqrt(ratios))

    scale, metric_values = None, None
    if metric is not None:  # theta = s theta~ with s = M^{-1/2}: SR in theta~ is (S + d M)^{-1} in theta
        def score_variance():
            if isinstance(jac, LayerJacobian):
                return jac.score_variance()
            if not isinstance(jac, DenseJacobian):
                raise ValueError(f"{who}: a metric from the score variance (march='var', diag_damping) needs the "
                                 "per-sample rows or the layers' statistics: mode 'dense' or 'sample_space' (not "
                                 "'lazy').")
            return jax.tree.map(jnp.real, jac.unravel(jac.score_variance()))

        metric_values = metric(score_variance)
        factors = {}
        if config.factored_metric:  # each layer's block u w^T: carried by the layers' statistics
            metric_values, factors = kronecker_factored(metric_values, discover_layers(apply_fn, params, batch).layers)
        # a metric entry that is not positive and finite gives NaN (the transform keeps its state)
        scale = jax.tree.map(_inverse_root, metric_values)
        if isinstance(jac, LayerJacobian):
            jac = jac.scaled(scale, {k: (_inverse_root(u), _inverse_root(w)) for k, (u, w) in factors.items()})
        elif isinstance(jac, DenseJacobian):
            jac = jac.scaled(scale)
        else:
            jac = ScaledJacobian(jac, scale)
        grads = _times(scale, grads)
        previous = None if previous is None else _times(scale, previous, divide=True)

    # SPRING's term damping * momentum * previous, with the damping used (after the damping rule)
    momentum_term = optax.tree.scale(config.momentum, previous) if config.momentum > 0.0 else None
    if config.mode == "lazy":
        b = grads if momentum_term is None else optax.tree.add_scale(grads, damping, momentum_term)
        x, info, used = _solve_lazy(jac, n_local, b, config.solver.start(b, previous), damping, config)
    elif config.mode == "dense":
        assert isinstance(jac, DenseJacobian)  # dense mode: the generic rows on one device
        x, info, used = _solve_dense(jac, grads, momentum_term, previous, damping, config, local_energies, ratios)
    else:
        num_params = sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(params))
        x, info, used = solve_sample_space(jac, grads, damping, config.solver, local_energies, config.axis_name,
                                           config.holomorphic, momentum_term, config.gamma, config.damping_rule,
                                           num_params, ratios)
    if scale is not None:
        x = _times(scale, x)
    if config.prune:  # leaves log psi does not depend on (found at trace time) get a zero update
        x = jax.tree.map(lambda dead, xi: jnp.zeros_like(xi) if dead else xi,
                         inactive_leaves(apply_fn, params, batch), x)
    return SolveOutcome(poison(x, ok), info, config.mode, jnp.asarray(used), metric_values)


def sr_solve(
    apply_fn: ApplyFn,
    grads: Any,
    params: Any,
    batch: Any,
    *,
    damping: Any = 1e-3,
    mode: Mode = "auto",
    solver: Any | None = None,
    momentum: float = 0.0,
    previous: Any | None = None,
    holomorphic: bool = False,
    jacobian: JacobianKind = "auto",
    axis_name: AxisName = None,
    mean_fn: Callable[[jax.Array], jax.Array] | None = None,
    local_energies: jax.Array | None = None,
    gamma: Any = None,
    max_cond_num: float | None = None,
    trace_damping: float = 0.0,
    diag_damping: float = 0.0,
    metric: Any | None = None,
    weights: jax.Array | None = None,
    solve_dtype: Any | None = None,
    score_clip: float | None = None,
    prune: bool = False,
    chunk_size: int | None = None,
    factored_metric: bool = False,
    matmul_precision: str | None = DEFAULT_MATMUL_PRECISION,
) -> tuple[Any, SolveInfo]:
    """Solve ``(S + damping I) x = grads + damping * momentum * previous`` (see the module docs).

    A pure, jit-able function of arrays and pytrees; the building block of :func:`fishr.sr`.

    Args:
      apply_fn: ``(params, batch) -> log psi``, batched over the leading axis of
        ``batch``, returning shape ``(n_local,)`` (real or complex).
      grads: gradient pytree with the structure and shapes of ``params``.
      params: parameters at which ``S`` is evaluated.
      batch: the local samples (array or pytree with a common leading batch axis).
      damping: ``damping >= 0`` (``> 0`` for ``"sample_space"``), a float or a scalar array.
      mode: ``"auto"`` (default: the cheaper exact solve, dense Cholesky or
        sample_space, by :func:`~fishr._sr_solve.auto_mode`'s documented rule; lazy only where neither
        matrix fits), ``"lazy"``, ``"dense"`` or ``"sample_space"``. :func:`fishr.sr`'s
        state records which ran.
      solver: a solver object (:mod:`fishr.solvers`) the mode accepts; ``None`` is the
        mode's default: ``fishr.CG()`` for lazy and dense, ``fishr.Cholesky()`` for
        sample_space (and for dense when ``"auto"`` picked it). With ``"auto"``, a
        ``fishr.CG`` runs lazy (the iterative solve it asks for), ``fishr.Cholesky`` or
        ``fishr.Eigh`` the dense or sample-space solve the rule picks, with that solver.
      momentum: SPRING momentum ``mu`` in ``[0, 1)``; needs ``previous`` when > 0.
      previous: the previous solution ``x_{k-1}`` (pytree like ``params``), for momentum
        and for ``CG(initial_guess="previous")``.
      holomorphic: complex parameters and a holomorphic ``log psi``. Complex parameters with
        ``holomorphic=False`` are solved as real pairs (module docs; pass the gradient
        ``dL/da + i dL/db``, the conjugate of ``jax.grad``).
      jacobian: how ``Obar`` is represented (modes ``"lazy"`` and ``"sample_space"``):
        ``"structured"`` from the statistics of the Flax Dense/DenseGeneral layers that
        :mod:`fishr.capture` finds in ``apply_fn`` (exact; see :mod:`fishr.jacobian`),
        ``"generic"`` (``jax.linearize`` for lazy, explicit rows for sample_space), or
        ``"auto"``: structured for sample_space when the captured layers make the
        kernel at least twice cheaper than the generic one (Dense networks, RBMs) or
        cover every parameter, so that no per-sample pass runs (a transformer of Dense,
        attention and LayerNorm layers; :func:`fishr.jacobian.layers_pay_off`), generic
        otherwise; structured for lazy when the captured layers cover every parameter with no
        convolution (:func:`fishr.jacobian.layers_cover_model`: each CG product then skips the
        model's JVPs) and the batch is one chunk, generic otherwise.
      axis_name: mapped axis (or axes) the samples are split over; ``None`` for one device.
      mean_fn: the centring mean ``u -> mean_i u_i`` over axis 0 of the score rows
        (``(n_local, C)`` or ``(n_local, C, P)``), including any reduction over devices;
        ``None`` is ``fishr.distributed.batch_mean(u, axis_name)``. Its output must have
        shape ``u.shape[1:]`` (checked at trace time). For adapters whose users supply
        their own mean (vmcnet's ``mean_grad_fn``); generic Jacobians only
        (``jacobian="structured"`` is refused, ``"auto"`` picks generic).
      local_energies: the local energies ``E_loc(x_i)`` of the local samples, shape
        ``(n_local,)`` (real or complex), whose centred values give the sample-space
        coefficients of the VMC force (``fishr._sample_space.energy_coefficients``):
        ``mode="sample_space"`` then forms ``x = Obar^H (K + N damping)^{-1} (N c)`` with no
        division by the damping, the recommended VMC call. It solves for the force
        the energies define (and the momentum term), not for ``grads``:
        ``info.residual_norm`` is ``||grads - (S + damping) x||``, so a gradient that
        is not that force (a regulariser added) shows there. The lazy and dense modes
        solve from ``grads`` alone and use them only for ``Spectral(snr=...)``.
      gamma: robust SR (module docs): ``None`` (plain SR), a float ``> 0`` or ``"sqrt"``
        (``damping^{-1/2}``); needs ``damping > 0``.
      max_cond_num: ``None`` or ``kappa > 1``: the damping is raised so that the condition
        number of ``S + damping`` is at most ``kappa`` (module docs; not in lazy mode).
      trace_damping: ``t >= 0``: the damping used is ``damping + t * tr S`` (quantax's
        ``ashift + rshift Tr S``; before ``max_cond_num``; not in lazy mode).
      diag_damping: ``rho >= 0``: solve with ``S + damping I + rho diag S`` (NetKet's
        ``diag_scale``; needs ``damping > 0`` and the per-sample rows, modes dense and
        sample_space); see "Diagonal metrics" in the module docs.
      metric: ``None`` or a positive pytree ``M`` like ``params``: solve with
        ``S + damping diag(M)`` (SPRING's term becomes ``damping mu M x_prev``), e.g. a
        MARCH metric (:func:`fishr.sr` keeps one in its state).
      weights: ``None`` or one real weight ``w_i >= 0`` per local sample (normalised over
        all samples, ``p_i = w_i / sum_j w_j``): ``S = sum_i p_i (O_i - Obar_p)^H (O_i - Obar_p)``
        with ``Obar_p = sum_i p_i O_i``, and the energies' force
        ``2 Re sum_i p_i conj(O_i - Obar_p) (E_i - sum_j p_j E_j)`` (reweighted samples,
        or an exactly enumerated state with ``w = |psi|^2``). Generic rows, modes dense and
        sample_space; ``grads`` should be the weighted gradient.
      solve_dtype: ``None`` (the inputs' precision) or ``"float64"``: single-precision
        inputs are promoted, and the model, the scores and the solve run in double
        precision (needs ``jax_enable_x64``); ``x`` comes back in the gradient's dtype
        (quantax's default).
      score_clip: ``None`` or ``c > 0``: each sample's raw score row is scaled by
        ``min(1, c / a_i)``, ``a_i`` the mean absolute entry of the row, before centring
        (JaQMC's ``score_norm_clip``); the energies' force is then that of the clipped
        rows. Generic rows, modes dense and sample_space.
      prune: give the parameter leaves that ``log psi`` does not depend on (found at trace
        time, :func:`fishr.scores.inactive_leaves`; listed by :func:`fishr.capture.report`)
        a zero update instead of ``g / damping``. They still take part in the solve (as zero
        columns, which change nothing else).
      chunk_size: ``None`` (the whole local batch in one pass) or ``m >= 1``: the passes over
        the samples run ``m`` samples at a time (:mod:`fishr.chunking`), so the model's
        intermediates are held for one chunk only. Lazy: each product recomputes the
        forward pass chunk by chunk instead of keeping the batch's linearisation (about 2x
        the arithmetic, memory independent of ``N``); dense and sample_space: the
        per-sample Jacobian and the layer statistics are built chunk by chunk (what they
        keep is the same: ``N x P`` rows for the generic Jacobian, ``N x (k + m)`` per
        layer for the structured one). Equal to the unchunked solve up to rounding.
      factored_metric: with a diagonal metric (``metric``, ``diag_damping``, MARCH), replace
        each captured layer's block of ``M`` by its rank-one factorisation ``u w^T`` (row
        and column sums, ``fishr._metric.kronecker_factored``; other leaves keep their
        entries). The solve is then exact for that factored metric, and the structured
        Jacobian can carry it (the layers' inputs and output gradients scaled), so
        ``mode="sample_space"`` keeps the cost of plain SR instead of taking the per-sample
        rows (module docs, "Diagonal metrics").
      matmul_precision: the precision of every matrix product traced inside the solve, the
        model's forward and backward passes included: a name that
        :func:`jax.default_matmul_precision` accepts, or ``None`` to leave JAX's setting.
        The default ``"highest"`` gives true float32 products for float32 inputs on GPUs
        and TPUs, whose defaults round the factors to TF32 / bfloat16 (on an H200 the
        float32 sample-space update then had errors of 6e-4 to 1e-2 against the float64
        reference, NetKet's too, instead of 1e-5); it changes nothing on CPUs and for
        float64 inputs. The caller's own gradient and energies keep their precision.

    Returns:
      ``(x, fishr.SolveInfo)``: the solution with the structure of ``params`` and the
      solve's diagnostics.

    Examples:
      The dense Cholesky solve equals ``(S + damping I)^{-1} g`` with ``S`` the covariance
      of the per-sample scores ``O_i = d log psi(s_i) / d theta``:

      >>> import jax, jax.numpy as jnp, fishr
      >>> log_psi = lambda p, s: jnp.tanh(s @ p["w"]).sum(-1)
      >>> params = {"w": 0.1 * jnp.arange(12.0).reshape(4, 3)}
      >>> sigma = jnp.where(jnp.arange(32).reshape(8, 4) % 3 == 0, 1.0, -1.0)
      >>> g = {"w": jnp.ones((4, 3))}
      >>> x, info = fishr.sr_solve(log_psi, g, params, sigma, damping=1e-2, mode="dense",
      ...                          solver=fishr.Cholesky())
      >>> score = lambda s: jax.grad(lambda p: log_psi(p, s[None])[0])(params)["w"].ravel()
      >>> o = jax.vmap(score)(sigma)
      >>> s_matrix = (o - o.mean(0)).T @ (o - o.mean(0)) / 8
      >>> want = jnp.linalg.solve(s_matrix + 1e-2 * jnp.eye(12), g["w"].ravel())
      >>> bool(jnp.allclose(x["w"].ravel(), want, rtol=1e-4, atol=1e-6)), bool(info.converged)
      (True, True)
    """
    who = "fishr.sr_solve"
    config = sr_config(who, damping=damping, mode=mode, solver=solver, jacobian=jacobian, momentum=momentum,
                       holomorphic=holomorphic, axis_name=axis_name, gamma=gamma, max_cond_num=max_cond_num,
                       trace_damping=trace_damping, diag_damping=diag_damping, solve_dtype=solve_dtype,
                       score_clip=score_clip, prune=prune, chunk_size=chunk_size, factored_metric=factored_metric,
                       matmul_precision=matmul_precision)
    if metric is not None:
        check_tree_matches_params(metric, params, who, "`metric`")
    out = solve_with_config(config, apply_fn, grads, params, batch, damping, previous, who, mean_fn, local_energies,
                            metric_fn(metric, config.diag_damping, damping), weights)
    return out.x, out.info
