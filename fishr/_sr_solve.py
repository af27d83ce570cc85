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

Modes (``mode=``) and solvers (``solver=``, :mod:`fishr.solvers`)
-----------------------------------------------------------------
``"lazy"``
    ``S`` is never formed. ``log psi`` of the whole local batch is linearised
    once per call (``jax.linearize``); ``S v = Obar^H (O v - mean(O v)) / N`` uses
    that linearisation and its transpose, so a CG iteration costs one JVP and
    one VJP and no forward pass. Solver: :class:`fishr.CG`.
``"dense"`` (the seed's DEBUG)
    The per-sample Jacobian ``O`` (``N x P``) is formed with ``vmap`` of the
    per-sample gradient. Solver: :class:`fishr.CG` on the rows, or
    :class:`fishr.Cholesky` / :class:`fishr.Eigh` on the ``P x P`` matrix ``S``.
``"sample_space"``
    The Woodbury identity on the ``N x N`` kernel ``Obar Obar^H``
    (:mod:`fishr._sample_space`). Solver: :class:`fishr.Cholesky` (default) or
    :class:`fishr.Eigh`. Needs ``damping > 0``.
``"auto"`` (default)
    One of the three, chosen at trace time from ``N`` (global), ``P``, the number of
    score components and the captured layers (:func:`auto_mode`): the exact solve
    (dense Cholesky or sample_space) of least arithmetic, lazy only where neither
    matrix fits in memory.

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

Bad damping at run time
-----------------------
A concrete damping is checked when the solve is traced (finite, ``>= 0``, ``> 0`` for
``sample_space``). A traced damping or a schedule's value that is negative or not
finite makes the solution NaN (the transform then keeps its state).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import optax

from fishr import distributed
from fishr._sample_space import solve_sample_space
from fishr._validate import (check_choice, check_damping, check_real, check_tree_matches_params, damping_ok,
                             local_batch_size, poison)
from fishr.capture import discover_layers
from fishr.distributed import AxisName
from fishr.jacobian import DenseJacobian, LayerJacobian, LinearizedJacobian, kernel_cost_per_pair, layers_pay_off
from fishr.linalg import SolveInfo
from fishr.scores import log_psi_one_sample, log_psi_rows
from fishr.solvers import CG, Cholesky, Eigh, check_solver

__all__ = ["JACOBIANS", "MODES", "MODE_CHOICES", "SRConfig", "auto_mode", "sr_config", "sr_solve"]

Mode = Literal["auto", "lazy", "dense", "sample_space"]
JacobianKind = Literal["auto", "structured", "generic"]
ApplyFn = Callable[[Any, Any], jax.Array]

MODES = ("lazy", "dense", "sample_space")  # what runs; mode="auto" picks one of them (auto_mode)
MODE_CHOICES = ("auto",) + MODES
AUTO_MAX_DENSE_P = 16_384  # mode="auto" forms the P x P matrix only up to here (1 GiB in float32)
AUTO_MAX_SAMPLE_SPACE_N = 32_768  # ... and the N x N kernel only up to here (4 GiB in float32)
JACOBIANS = ("auto", "structured", "generic")
_SOLVERS = {"lazy": (CG,), "dense": (CG, Cholesky, Eigh), "sample_space": (Cholesky, Eigh)}
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


def sr_config(who: str, *, damping: Any, mode: Any, solver: Any, jacobian: Any, momentum: Any, holomorphic: Any,
              axis_name: AxisName) -> SRConfig:
    """Validate SR's options (naming ``who`` in every error) and fill in the mode's default solver."""
    check_choice(mode, MODE_CHOICES, who, "mode")
    check_damping(damping, who, positive=mode == "sample_space")
    if mode == "auto":
        if solver is not None:
            check_solver(solver, (CG, Cholesky, Eigh), who, "in mode='auto'")
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
    zero_damping = isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping == 0
    return SRConfig(mode, solver, jacobian, float(momentum), holomorphic, axis_name, not zero_damping)


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


def _resolve_auto(config: SRConfig, apply_fn, params, batch, n_local: int, mean_fn) -> SRConfig:
    """``config`` with ``mode="auto"`` replaced by :func:`auto_mode`'s choice and its default solver."""
    if config.mode != "auto":
        return config
    if isinstance(config.solver, CG):  # an iterative solve was asked for: nothing is formed
        return dataclasses.replace(config, mode="lazy")
    num_params = sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(params))
    out = jax.eval_shape(lambda p: apply_fn(p, batch), params)
    components = 2 if (jnp.issubdtype(out.dtype, jnp.complexfloating) and not config.holomorphic) else 1
    plan = None
    if mean_fn is None and config.jacobian != "generic":
        plan = discover_layers(apply_fn, params, batch)
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
    if not holomorphic and any(complex_leaves):
        raise ValueError(
            f"{who}: complex `params` need holomorphic=True (a holomorphic log psi); "
            "for a non-holomorphic model split each complex parameter into real and imaginary parts."
        )


# --------------------------------------------------------------------------- Jacobian representations


def _wants_layers(jacobian: str, apply_fn, params, batch) -> bool:
    if jacobian == "generic":
        return False
    if jacobian == "structured":
        return True
    plan = discover_layers(apply_fn, params, batch)
    return bool(plan.layers) and layers_pay_off(plan, sum(jnp.size(leaf) for leaf in jax.tree.leaves(params)))


def _build_jacobian(structured: bool, apply_fn, params, batch, config: SRConfig, who: str, mean_fn=None):
    rows = log_psi_rows(apply_fn, batch, config.holomorphic, who)
    jax.eval_shape(rows, params)  # trace-time checks of the output shape on the whole batch
    one_sample = log_psi_one_sample(apply_fn, config.holomorphic, who)
    if structured:
        rows_of = lambda p, s: log_psi_rows(apply_fn, s, config.holomorphic, who)(p)
        return LayerJacobian.build(rows_of, one_sample, params, batch, config.holomorphic, config.axis_name)
    return DenseJacobian.build(one_sample, params, batch, config.holomorphic, config.axis_name, mean_fn)


# --------------------------------------------------------------------------- parameter-space solves


def _solve_lazy(jac, n_local, b, x0, damping, config: SRConfig):
    def s_matvec(v):
        w = jac.rmatvec(jac.matvec(v))
        return distributed.pmean(optax.tree.scale(1.0 / n_local, w), config.axis_name)

    return config.solver.solve(lambda v: optax.tree.add_scale(s_matvec(v), damping, v), b, x0)


def _solve_dense(jac: DenseJacobian, b, x0, damping, config: SRConfig):
    n_local = jac.rows.shape[0]
    b_flat, _ = ravel_pytree(b)
    if isinstance(config.solver, CG):
        def s_matvec(v):
            return distributed.pmean(jac.rmatvec_flat(jac.matvec_flat(v)) / n_local, config.axis_name)

        x0_flat = None if x0 is None else ravel_pytree(x0)[0]
        x, info = config.solver.solve(lambda v: s_matvec(v) + damping * v, b_flat, x0_flat)
        return jac.unravel(x), info
    rows = jac.flat_rows
    s = distributed.pmean(rows.conj().T @ rows / n_local, config.axis_name)
    x, info = config.solver.solve(s, b_flat, damping)
    return jac.unravel(x), info


# --------------------------------------------------------------------------- the pure function


def solve_with_config(config: SRConfig, apply_fn: ApplyFn, grads: Any, params: Any, batch: Any, damping: Any,
                      previous: Optional[Any], who: str, mean_fn=None,
                      local_energies: Optional[jax.Array] = None) -> tuple[Any, SolveInfo, str]:
    """:func:`sr_solve` for validated options (the transform's entry point); also returns the mode that ran."""
    check_tree_matches_params(grads, params, who)
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

    config = _resolve_auto(config, apply_fn, params, batch, n_local, mean_fn)
    ok = damping_ok(damping)
    damping = jnp.where(ok, damping, jnp.nan)  # a traced bad damping gives NaN, never an anti-damped solve
    b = grads
    if config.momentum > 0.0:
        b = optax.tree.add_scale(grads, damping * config.momentum, previous)

    if config.mode == "lazy":
        x0 = config.solver.start(b, previous)
        if config.jacobian == "structured":
            jac = _build_jacobian(True, apply_fn, params, batch, config, who)
        else:
            jac = LinearizedJacobian(log_psi_rows(apply_fn, batch, config.holomorphic, who), params,
                                     config.holomorphic, config.axis_name, mean_fn)
        x, info = _solve_lazy(jac, n_local, b, x0, damping, config)
    elif config.mode == "dense":
        x0 = config.solver.start(b, previous) if isinstance(config.solver, CG) else None
        jac = _build_jacobian(False, apply_fn, params, batch, config, who, mean_fn)
        x, info = _solve_dense(jac, b, x0, damping, config)
    else:
        structured = mean_fn is None and _wants_layers(config.jacobian, apply_fn, params, batch)
        jac = _build_jacobian(structured, apply_fn, params, batch, config, who, mean_fn)
        momentum_term = None
        if local_energies is not None and config.momentum > 0.0:
            momentum_term = optax.tree.scale(config.momentum, previous)
        x, info = solve_sample_space(jac, b, damping, config.solver, local_energies, config.axis_name,
                                     config.holomorphic, momentum_term)
    return poison(x, ok), info, config.mode


def sr_solve(
    apply_fn: ApplyFn,
    grads: Any,
    params: Any,
    batch: Any,
    *,
    damping: Any = 1e-3,
    mode: Mode = "auto",
    solver: Optional[Any] = None,
    momentum: float = 0.0,
    previous: Optional[Any] = None,
    holomorphic: bool = False,
    jacobian: JacobianKind = "auto",
    axis_name: AxisName = None,
    mean_fn: Optional[Callable[[jax.Array], jax.Array]] = None,
    local_energies: Optional[jax.Array] = None,
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
        sample_space, by :func:`auto_mode`'s documented rule; lazy only where neither
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
      holomorphic: complex parameters and a holomorphic ``log psi``.
      jacobian: how ``Obar`` is represented (modes ``"lazy"`` and ``"sample_space"``):
        ``"structured"`` from the statistics of the Flax Dense/DenseGeneral layers that
        :mod:`fishr.capture` finds in ``apply_fn`` (exact; see :mod:`fishr.jacobian`),
        ``"generic"`` (``jax.linearize`` for lazy, explicit rows for sample_space), or
        ``"auto"``: structured for sample_space when the captured layers make the
        kernel at least twice cheaper than the generic one
        (:func:`fishr.jacobian.layers_pay_off`: Dense networks, not transformers whose
        layers all see many positions), generic otherwise.
      axis_name: mapped axis (or axes) the samples are split over; ``None`` for one device.
      mean_fn: the centring mean ``u -> mean_i u_i`` over axis 0 of the score rows
        (``(n_local, C)`` or ``(n_local, C, P)``), including any reduction over devices;
        ``None`` is ``fishr.distributed.batch_mean(u, axis_name)``. Its output must have
        shape ``u.shape[1:]`` (checked at trace time). For adapters whose users supply
        their own mean (vmcnet's ``mean_grad_fn``); generic Jacobians only
        (``jacobian="structured"`` is refused, ``"auto"`` picks generic).
      local_energies: the local energies ``E_loc(x_i)`` of the local samples, shape
        ``(n_local,)`` (real or complex), whose centred values give the sample-space
        coefficients of the VMC force (:func:`fishr._sample_space.energy_coefficients`):
        ``mode="sample_space"`` then forms ``x = Obar^H (K + N damping)^{-1} (N c)`` with no
        division by the damping, the recommended VMC call. It solves for the force
        the energies define (and the momentum term), not for ``grads``:
        ``info.residual_norm`` is ``||grads - (S + damping) x||``, so a gradient that
        is not that force (a regulariser added) shows there. The lazy and dense modes
        solve from ``grads`` alone and ignore them.

    Returns:
      ``(x, fishr.SolveInfo)``: the solution with the structure of ``params`` and the
      solve's diagnostics.
    """
    who = "fishr.sr_solve"
    config = sr_config(who, damping=damping, mode=mode, solver=solver, jacobian=jacobian, momentum=momentum,
                       holomorphic=holomorphic, axis_name=axis_name)
    x, info, _ = solve_with_config(config, apply_fn, grads, params, batch, damping, previous, who, mean_fn,
                                   local_energies)
    return x, info
