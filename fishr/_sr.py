"""Stochastic reconfiguration as an optax transformation: :func:`sr` and :class:`SRState`."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from fishr._sr_solve import MODES, ApplyFn, JacobianKind, Mode, solve_with_config, sr_config
from fishr._validate import shared_damping, tree_all_finite
from fishr.distributed import AxisName
from fishr.linalg import SolveInfo, solve_info

__all__ = ["SRState", "sr"]

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


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
    """

    count: jax.Array
    previous: Any
    mode: jax.Array
    info: SolveInfo


def sr(
    apply_fn: ApplyFn,
    damping: ScalarOrSchedule = 1e-3,
    *,
    mode: Mode = "auto",
    solver: Optional[Any] = None,
    momentum: float = 0.0,
    holomorphic: bool = False,
    jacobian: JacobianKind = "auto",
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Stochastic reconfiguration as an optax transformation.

    ``update(grads, state, params, *, batch, local_energies=None)`` returns
    ``x = (S + damping I)^{-1} (grads + damping * momentum * x_prev)`` (see
    :func:`fishr.sr_solve` for ``S``, the modes, SPRING momentum and the local
    energies, which make the sample-space solve as accurate as a direct one). The sign
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

    Non-finite values: if the solution has any NaN/inf (from a non-finite gradient,
    sample or ``log psi``, a negative or non-finite traced damping or schedule value,
    or a CG that diverged), the NaN update is returned (so that
    ``optax.apply_if_finite`` skips it and counts it) and the state is left exactly as
    it was: the count, the previous solution and the diagnostics never take
    non-finite values from a bad step.

    Damping from the chain: ``update(..., damping=value)`` overrides ``damping`` for that
    step (as :func:`fishr.levenberg_marquardt` passes its adapted value).
    """
    who = "fishr.sr"
    config = sr_config(who, damping=damping, mode=mode, solver=solver, jacobian=jacobian, momentum=momentum,
                       holomorphic=holomorphic, axis_name=axis_name)

    def init_fn(params):
        residual_dtype = jnp.real(jnp.zeros((), jax.tree.leaves(params)[0].dtype)).dtype
        return SRState(
            count=jnp.zeros((), jnp.int32),
            previous=optax.tree.zeros_like(params),
            mode=jnp.asarray(MODES.index(config.mode) if config.mode in MODES else -1, jnp.int32),
            info=solve_info(jnp.zeros((), residual_dtype), False),
        )

    def update_fn(updates, state, params=None, *, batch=None, local_energies=None, **extra_args):
        if params is None:
            raise ValueError(f"{who}: `params` must be passed to update (S is evaluated at params).")
        if batch is None:
            raise ValueError(f"{who}: `batch=` must be passed to update (the Monte Carlo samples).")
        damping_now = shared_damping(extra_args, damping, state.count, who)
        x, info, ran = solve_with_config(config, apply_fn, updates, params, batch, damping_now, state.previous, who,
                                         local_energies=local_energies)
        x = jax.tree.map(lambda xi, g: xi.astype(g.dtype), x, updates)
        new_state = SRState(
            count=optax.safe_increment(state.count),
            previous=x,
            mode=jnp.asarray(MODES.index(ran), jnp.int32),
            info=jax.tree.map(lambda new, old: new.astype(old.dtype), info, state.info),
        )
        new_state = optax.tree.where(tree_all_finite(x), new_state, state)
        return x, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
