"""qmlhc's ``HCNaturalGrad`` and ``HCKFACLike``, with their interface and numbers, on :mod:`fishr._branch`.

A drop-in for ``qmlhc.optim.numpy_optim``: same constructors and defaults,
``initialize(params) -> state`` and ``step_params(model, params, context) ->
(new_params, state)``, same errors, same returned state keys (``steps``,
``precond_norm``). Given the same ``seed`` the projections are drawn from the
same NumPy stream (``numpy.random.default_rng(seed).normal(size=(n, D)) /
sqrt(D)``, one draw per step that has branches), so a run gives qmlhc's numbers
(float64; the solves run in JAX under ``jax.enable_x64``).

Conventions reproduced from qmlhc:

* ``params`` is a flat mapping ``name -> array-like``; the parameter vector
  ``theta`` is the values raveled as float64 in *sorted key order*
  (``ravel_pytree`` of the dict), and new parameters come back as NumPy arrays of
  the original shapes.
* The gradient is ``grad_estimator(model, params, context)`` (reshaped to
  ``theta``'s shape) when given, else ``context["grads"`` ] (a mapping with a value
  for every key whose *size* matches; a missing key raises ``KeyError``).
* ``context["info"]["branches"]``: a ``(K, D)`` array; anything else (missing,
  ``None``, not 2-D) means no preconditioning and no projection is drawn.
* ``theta_new = theta - lr * precond``, then ``clip(theta_new, -clip, clip)`` if
  ``clip`` is not ``None``.

``HCNaturalGrad`` is fishr's projected branch solve with qmlhc's own CG loop
(``cg_iters`` iterations from zero, at least one, the absolute tolerance ``1e-6``
tested after each update, denominators floored at ``1e-12``; fishr's public
:class:`fishr.CG` tests before each iteration); ``HCKFACLike`` is
:func:`fishr.branch_kfac_solve` (blocks solved by Cholesky where qmlhc uses LU,
equal to rounding). Deviations, where the seeds would silently compute garbage: a
negative or non-finite ``fisher_damp`` / ``damp`` raises ``ValueError`` at
construction, as does ``cg_iters < 0`` (``blocks`` is clamped to ``[1, D]`` as in qmlhc); where the seeds would raise
``LinAlgError`` or return garbage for a singular block (``damp = 0``) or a diverged CG,
these return NaN parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fishr import linalg
from fishr._branch import branch_kfac_solve, projected_solve
from fishr._validate import check_damping, check_int

__all__ = ["HCKFACLike", "HCNaturalGrad"]

GradEstimator = Callable[[Any, Mapping[str, Any], Mapping[str, Any]], np.ndarray]


QMLHC_CG_TOL = 1e-6  # qmlhc's cg_solve: absolute tolerance on ||r||, tested after each update
QMLHC_CG_FLOOR = 1e-12  # qmlhc's cg_solve guards both CG divisions with max(1e-12, .)


def _qmlhc_cg(cg_iters: int):
    """qmlhc's ``cg_solve`` on ``C + damping I``: from zero, at most ``cg_iters`` iterations and at least one."""

    def state_solve(c, b, damping):
        return linalg.cg(lambda v: c @ v + damping * v, b, None, rtol=0.0, atol=QMLHC_CG_TOL, max_steps=cg_iters,
                         denominator_floor=QMLHC_CG_FLOOR, min_iterations=1)

    return state_solve


_kfac_preconditioner = jax.jit(
    lambda g, branches, projection, damping, blocks: branch_kfac_solve(
        g, branches, projection, damping=damping, blocks=blocks, matmul_precision=None)[0],  # the seed's products
    static_argnums=4,
)
_natgrad_preconditioner = jax.jit(
    lambda g, branches, projection, damping, cg_iters: projected_solve(
        g, branches, projection, damping, None, _qmlhc_cg(cg_iters), "HCNaturalGrad")[0],
    static_argnums=4,
)


class _BranchOptimizer:
    """What the two qmlhc optimizers share: parameter layout, gradient, projection draw, update."""

    _name = ""
    lr: float
    clip: float | None
    grad_estimator: Callable[..., Any] | None
    _rng: np.random.Generator

    def initialize(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Reset the step counter; returns ``{"steps": 0}``."""
        self._state = {"steps": 0}
        return dict(self._state)

    def _gradient(self, model, params, context, theta, layout) -> np.ndarray:
        if self.grad_estimator is not None:
            return np.asarray(self.grad_estimator(model, params, context), dtype=float).reshape(theta.shape)
        grads = context.get("grads", {})
        if not grads:
            raise ValueError(f"{self._name} expects either grad_estimator or context['grads']")
        chunks = {}
        for key, size in layout:
            value = np.atleast_1d(np.asarray(grads[key], dtype=float)).reshape(-1)
            if value.size != size:
                raise ValueError(f"Gradient size mismatch for key '{key}'")
            chunks[key] = value
        return np.asarray(ravel_pytree(chunks)[0])

    def _precondition(self, g: np.ndarray, branches: np.ndarray, projection: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step_params(
        self, model: Any, params: Mapping[str, Any], context: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One step: ``theta - lr * P A^{-1} P^T g`` (clipped), ``g`` itself without branches."""
        with jax.enable_x64(True):
            arrays = {key: np.asarray(params[key], dtype=float) for key in sorted(params)}
            theta, unravel = ravel_pytree(arrays)
            theta = np.asarray(theta)
            layout = [(key, arrays[key].size) for key in arrays]
            g = self._gradient(model, params, context, theta, layout)
            branches = context.get("info", {}).get("branches", None)
            if branches is None or np.asarray(branches).ndim != 2:
                precond = g
            else:
                branches = np.asarray(branches, dtype=float)
                dim = branches.shape[1]
                projection = self._rng.normal(size=(theta.size, dim)) / np.sqrt(dim)
                precond = np.asarray(self._precondition(g, branches, projection))
            theta_new = theta - self.lr * precond
            if self.clip is not None:
                theta_new = np.clip(theta_new, -self.clip, self.clip)
            new_params = {key: np.asarray(value) for key, value in unravel(jnp.asarray(theta_new)).items()}
        self._state = {
            "steps": self._state.get("steps", 0) + 1,
            "precond_norm": float(np.linalg.norm(precond)),
        }
        return new_params, dict(self._state)


class HCNaturalGrad(_BranchOptimizer):
    """Natural-gradient preconditioning using state covariance (qmlhc), on :func:`fishr.branch_natgrad_solve`.

    ``precond = P (C + fisher_damp I)^{-1} P^T g`` with ``C`` the branch
    covariance (``K - 1``) and the solve by ``cg_iters`` steps of qmlhc's CG.
    """

    _name = "HCNaturalGrad"

    def __init__(
        self,
        lr: float = 5e-3,
        fisher_damp: float = 1e-3,
        cg_iters: int = 8,
        clip: float | None = None,
        grad_estimator: GradEstimator | None = None,
        seed: int = 12345,
    ):
        check_damping(fisher_damp, "HCNaturalGrad", name="fisher_damp")
        check_int(cg_iters, "HCNaturalGrad", "cg_iters", 0)
        self.lr = float(lr)
        self.fisher_damp = float(fisher_damp)
        self.cg_iters = int(cg_iters)
        self.clip = clip
        self.grad_estimator = grad_estimator
        self._rng = np.random.default_rng(seed)
        self._state: dict[str, Any] = {}

    def _precondition(self, g, branches, projection):
        return _natgrad_preconditioner(g, branches, projection, self.fisher_damp, self.cg_iters)


class HCKFACLike(_BranchOptimizer):
    """Branch-factored curvature preconditioning (qmlhc), on :func:`fishr.branch_kfac_solve`.

    ``precond = P blockdiag(C + damp I)^{-1} P^T g`` with ``blocks`` diagonal blocks.
    """

    _name = "HCKFACLike"

    def __init__(
        self,
        lr: float = 5e-3,
        damp: float = 1e-3,
        blocks: int = 4,
        grad_estimator: GradEstimator | None = None,
        clip: float | None = None,
        seed: int = 2027,
    ):
        check_damping(damp, "HCKFACLike", name="damp")
        self.lr = float(lr)
        self.damp = float(damp)
        self.blocks = int(blocks)
        self.grad_estimator = grad_estimator
        self.clip = clip
        self._rng = np.random.default_rng(seed)
        self._state: dict[str, Any] = {}

    def _precondition(self, g, branches, projection):
        return _kfac_preconditioner(g, branches, projection, self.damp, max(1, self.blocks))
