"""Stochastic reconfiguration as an optax transformation: :func:`sr` and :class:`SRState`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fishr._metric import MARCH_MODES, march_diff_update, march_var_update, metric_fn
from fishr._precision import DEFAULT_MATMUL_PRECISION
from fishr._sr_solve import (
    MODES,
    ApplyFn,
    JacobianKind,
    Mode,
    runs_lazy,
    solve_with_config,
    sr_config,
)
from fishr._validate import ScalarOrSchedule, check_choice, check_real, next_count, shared_damping, tree_all_finite
from fishr.distributed import AxisName
from fishr.linalg import SolveInfo, solve_info

__all__ = ["SRState", "sr"]



class SRState(NamedTuple):
    """State of :func:`sr`.

    Attributes:
      count: number of accepted (finite) updates so far; the damping schedule's step.
      previous: the last finite solution ``x`` (zeros before the first step); used
        by momentum and by ``CG(initial_guess="previous")``.
      mode: the mode that ran, as an index into ``fishr.SR_MODES``
        (``("lazy", "dense", "sample_space")``); -1 before the first step of
        ``mode="auto"`` (which picks one when it sees the batch).
      info: :class:`fishr.SolveInfo` of the last accepted solve (iterations, residual,
        convergence, fallback).
      damping: the damping the last accepted solve used (the schedule's or the chain's
        value, raised by ``max_cond_num`` where that was needed); 0 before the first step.
      march: MARCH's accumulator ``v`` (a real pytree like the parameters, ones at the
        start), or ``()`` without MARCH.
    """

    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  (optax states name it count too)
    previous: Any
    mode: jax.Array
    info: SolveInfo
    damping: jax.Array
    march: Any


def sr(
    apply_fn: ApplyFn,
    damping: ScalarOrSchedule = 1e-3,
    *,
    mode: Mode = "auto",
    solver: Any | None = None,
    momentum: float = 0.0,
    holomorphic: bool = False,
    jacobian: JacobianKind = "auto",
    axis_name: AxisName = None,
    gamma: Any = None,
    max_cond_num: float | None = None,
    trace_damping: float = 0.0,
    diag_damping: float = 0.0,
    march: str | None = None,
    march_decay: float = 0.995,
    march_eps: float = 1e-8,
    solve_dtype: Any | None = None,
    score_clip: float | None = None,
    prune: bool = False,
    chunk_size: int | None = None,
    factored_metric: bool = False,
    matmul_precision: str | None = DEFAULT_MATMUL_PRECISION,
) -> optax.GradientTransformationExtraArgs:
    """Stochastic reconfiguration as an optax transformation.

    ``update(grads, state, params, *, batch, local_energies=None, weights=None)`` returns
    ``x = (S + damping I)^{-1} (grads + damping * momentum * x_prev)`` (see
    :func:`fishr.sr_solve` for ``S``, the modes, SPRING momentum and the local
    energies, which make the sample-space solve as accurate as a direct one, and for the
    per-sample ``weights`` of reweighted or enumerated samples). The sign
    and the learning rate are left to the chain, as in optax::

        opt = optax.chain(fishr.sr(log_psi, damping=1e-3), optax.sgd(1e-2))
        updates, state = opt.update(grads, state, params, batch=samples, local_energies=e_loc)

    Args:
      apply_fn: ``(params, batch) -> log psi`` of shape ``(n_local,)``.
      damping: float ``>= 0`` (``> 0`` for sample_space) or an ``optax.Schedule`` of the
        accepted-step count.
      mode: ``"auto"`` (default; see :func:`fishr.sr_solve`), ``"lazy"``, ``"dense"`` or
        ``"sample_space"``.
      solver: a solver object the mode accepts (:mod:`fishr.solvers`): ``fishr.CG(...)``
        (lazy, dense), ``fishr.Cholesky()`` or ``fishr.Eigh()`` (dense, sample_space);
        ``None`` for the mode's default (with ``mode="auto"``: a CG runs lazy; see :func:`fishr.sr_solve`).
      momentum: SPRING momentum in ``[0, 1)``.
      holomorphic: complex parameters with a holomorphic ``log psi``.
      jacobian: ``"auto"``, ``"structured"`` or ``"generic"`` (see :func:`fishr.sr_solve`).
      axis_name: mapped axis name(s) under ``jax.pmap``/``jax.shard_map``; ``None`` for one device.
      gamma: robust SR: ``None`` (plain SR), a float ``> 0`` or ``"sqrt"`` (``damping^{-1/2}``):
        ``x = G(S) b`` with ``G(sigma) = (sigma + gamma d^2) / (sigma + d)^2`` per
        eigenvalue of ``S``, a gradient step of size ``gamma`` where ``S`` has no curvature
        instead of ``1 / d`` (see :func:`fishr.sr_solve`).
      max_cond_num: ``None`` or ``kappa > 1``: raise the damping so that
        ``cond(S + damping) <= kappa`` (see :func:`fishr.sr_solve`); ``state.damping`` says
        what was used.
      trace_damping: ``t >= 0``: the damping used is ``damping + t * tr S`` (quantax's
        ``ashift + rshift Tr S``); not in lazy mode.
      diag_damping: ``rho >= 0``: solve with ``S + damping I + rho diag S`` (NetKet's
        ``diag_scale``); needs ``damping > 0`` and modes dense or sample_space.
      march: MARCH's diagonal metric, ``None`` (off), ``"var"`` (from the score variance,
        updated before each solve; modes dense and sample_space) or ``"diff"`` (from the
        squared change of the update, used from the next step; any mode). Solves
        ``(S + d M)^{-1} (g + d mu M x_prev)`` with ``M = (v + march_eps)^{1/2}`` (JaQMC's
        conventions; see :mod:`fishr._metric`). ``march_decay`` is ``beta`` of the average.
      factored_metric: with ``march`` or ``diag_damping``, each captured layer's block of the
        metric is replaced by its rank-one factorisation (row and column sums), which the
        structured Jacobian carries: MARCH at the cost of plain sample-space SR instead of
        the per-sample rows' (see :func:`fishr.sr_solve`); the accumulator stays per entry.
      solve_dtype: ``None`` or ``"float64"``: float32 inputs are solved in float64 (needs
        ``jax_enable_x64``; the update keeps the gradient's dtype; see :func:`fishr.sr_solve`).
      score_clip: ``None`` or ``c > 0``: clip each sample's score row to a mean absolute
        entry of at most ``c`` before centring (JaQMC's; see :func:`fishr.sr_solve`).
      prune: zero update for parameter leaves ``log psi`` does not use (found at trace time).
      chunk_size: ``None`` or the number of samples per pass over the batch, to bound peak
        memory (:func:`fishr.sr_solve`; lazy CG then recomputes the forward pass per product).
      matmul_precision: ``"highest"`` (default: true float32 products inside the solve on
        GPUs and TPUs, whose defaults round to TF32 / bfloat16), another name that
        :func:`jax.default_matmul_precision` accepts, or ``None`` for JAX's setting (see
        :func:`fishr.sr_solve`).

    Non-finite values: if the solution has any NaN/inf (from a non-finite gradient,
    sample or ``log psi``, a negative or non-finite traced damping or schedule value,
    or a CG that diverged), the NaN update is returned (so that
    ``optax.apply_if_finite`` skips it and counts it) and the state is left exactly as
    it was: the count, the previous solution and the diagnostics never take
    non-finite values from a bad step.

    Damping from the chain: ``update(..., damping=value)`` overrides ``damping`` for that
    step (as :func:`fishr.levenberg_marquardt` passes its adapted value).

    Examples:
      One SR step on a small real wave function; ``mode="auto"`` picks the exact solve
      of least arithmetic and the state says which ran:

      >>> import jax.numpy as jnp, optax, fishr
      >>> log_psi = lambda p, s: jnp.tanh(s @ p["w"]).sum(-1)
      >>> params = {"w": 0.1 * jnp.ones((4, 3))}
      >>> sigma = jnp.where(jnp.arange(32).reshape(8, 4) % 3 == 0, 1.0, -1.0)
      >>> opt = optax.chain(fishr.sr(log_psi, damping=1e-2), optax.sgd(0.05))
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.ones((4, 3))}, state, params, batch=sigma)
      >>> updates["w"].shape, int(state[0].count), fishr.SR_MODES[int(state[0].mode)]
      ((4, 3), 1, 'sample_space')
    """
    who = "fishr.sr"
    config = sr_config(who, damping=damping, mode=mode, solver=solver, jacobian=jacobian, momentum=momentum,
                       holomorphic=holomorphic, axis_name=axis_name, gamma=gamma, max_cond_num=max_cond_num,
                       trace_damping=trace_damping, diag_damping=diag_damping, solve_dtype=solve_dtype,
                       score_clip=score_clip, prune=prune, chunk_size=chunk_size, factored_metric=factored_metric,
                       matmul_precision=matmul_precision)
    check_choice(march, (None,) + MARCH_MODES, who, "march")
    check_real(march_decay, who, "march_decay", 0.0, 1.0, high_open=True)
    check_real(march_eps, who, "march_eps", 0.0, float("inf"), high_open=True)
    if march == "var" and runs_lazy(mode, solver):
        raise ValueError(f"{who}: march='var' needs the per-sample rows (modes 'dense', 'sample_space' or 'auto' "
                         "without a CG solver); use march='diff' in mode 'lazy'.")

    def init_fn(params):
        residual_dtype = jnp.real(jnp.zeros((), jax.tree.leaves(params)[0].dtype)).dtype
        return SRState(
            count=jnp.zeros((), jnp.int32),
            previous=optax.tree.zeros_like(params),
            mode=jnp.asarray(MODES.index(config.mode) if config.mode in MODES else -1, jnp.int32),
            info=solve_info(jnp.zeros((), residual_dtype), False),
            damping=jnp.zeros((), residual_dtype),
            march=() if march is None else jax.tree.map(
                lambda p: jnp.ones(p.shape, jnp.real(jnp.zeros((), p.dtype)).dtype), params),
        )

    def update_fn(updates, state, params=None, *, batch=None, local_energies=None, weights=None, **extra_args):
        if params is None:
            raise ValueError(f"{who}: `params` must be passed to update (S is evaluated at params).")
        if batch is None:
            raise ValueError(f"{who}: `batch=` must be passed to update (the Monte Carlo samples).")
        damping_now = shared_damping(extra_args, damping, state.count, who)
        accumulator = state.march
        root = lambda acc: jax.tree.map(lambda v: jnp.sqrt(v + march_eps), acc)
        def var_base(variance):  # the accumulator is updated before it is used
            nonlocal accumulator
            accumulator = march_var_update(accumulator, variance(), march_decay, march_eps)
            return root(accumulator)

        base = var_base if march == "var" else root(accumulator) if march == "diff" else None
        metric = metric_fn(base, diag_damping, damping_now)
        x, info, ran, used, _ = solve_with_config(config, apply_fn, updates, params, batch, damping_now, state.previous,
                                                  who, local_energies=local_energies, metric=metric, weights=weights)
        x = jax.tree.map(lambda xi, g: xi.astype(g.dtype), x, updates)
        if march == "diff":
            accumulator = march_diff_update(accumulator, x, state.previous, march_decay)
        new_state = SRState(
            march=accumulator,
            count=next_count(state.count),
            previous=x,
            mode=jnp.asarray(MODES.index(ran), jnp.int32),
            info=jax.tree.map(lambda new, old: new.astype(old.dtype), info, state.info),
            damping=jnp.real(used).astype(state.damping.dtype),
        )
        new_state = optax.tree.where(tree_all_finite(x), new_state, state)
        return x, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
