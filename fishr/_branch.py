r"""Branch-covariance natural gradient and branch-factored blocks.

The setting (qmlhc's hypercausal optimizers): besides the gradient ``g`` of the
loss with respect to the parameters (a pytree, raveled to ``n`` entries by
``jax.flatten_util.ravel_pytree``), the model reports ``K`` *branches*, ``K``
sampled states of dimension ``D`` stacked as a ``(K, D)`` array ``B``. The
metric lives in state space and is mapped to parameter space by a projection.

The math and its conventions
----------------------------
* State covariance, centred and normalised by ``K - 1`` (floored at 1)::

      C = (B - mean_k B_k)^T (B - mean_k B_k) / max(1, K - 1)        (D x D)

  ``K`` counts the branches of *all* devices: with ``axis_name`` set, each
  device holds ``K / n_devices`` rows, the mean is the global one and the sum of
  outer products is ``psum``'d before dividing by the global ``K - 1``
  (:func:`~fishr.branch_covariance`).
* Projection ``P`` (``n x D``), parameters to states: by default
  ``P_ij ~ N(0, 1) / sqrt(D)``, drawn afresh at every step from a
  ``jax.random`` key; or a fixed user matrix, or a user *linear map*
  ``v (D,) -> P v (n,)`` (``P^T`` is then its ``jax.linear_transpose``).
* Branch natural gradient (:func:`~fishr.branch_natgrad_solve`)::

      update = P (C + damping I)^{-1} P^T g

  with the ``D x D`` solve by a solver object (:mod:`fishr.solvers`): conjugate
  gradient, ``fishr.CG(rtol=0.0, atol=1e-6, max_steps=8, initial_guess="zeros")`` by
  default (qmlhc's iteration count and absolute tolerance, with fishr's CG semantics:
  the test ``||r||_2 <= max(rtol ||b||, atol)`` before each iteration), or a direct
  ``fishr.Cholesky()`` / ``fishr.Eigh()``. (qmlhc's own loop tests only after an update
  and floors its denominators at ``1e-12``; :mod:`fishr.compat.qmlhc` keeps that.)
* Branch-factored blocks (:func:`~fishr.branch_kfac_solve`): ``C + damping I`` is cut
  into ``blocks`` diagonal blocks (``blocks`` clamped to ``[1, D]``; sizes
  ``D // blocks``, the first ``D % blocks`` of them one larger), the
  off-diagonal blocks are dropped, and each block is solved exactly
  (Cholesky)::

      update = P blockdiag(C + damping I)^{-1} P^T g

  Blocks of equal size are solved in one batched solve (``fishr.Cholesky()`` or
  ``fishr.Eigh()``), so there are at most two solves per step whatever ``blocks`` is.
* Without branches (``branches`` is ``None`` or not 2-D) the gradient is
  returned unchanged and no projection is drawn, as in the seeds.

The sign and the learning rate are left to the chain, as in optax; the seeds'
parameter clip is :func:`~fishr.clip_params`. qmlhc's ``HCNaturalGrad`` is::

    optax.chain(fishr.branch_natgrad(fisher_damp, solver=fishr.CG(rtol=0.0, atol=1e-6,
                max_steps=cg_iters, initial_guess="zeros"), key=key),
                optax.scale(-lr), fishr.clip_params(clip))    # clip: optional

(up to qmlhc's test-after-update and denominator floor, which matter only when
``||P^T g|| <= 1e-6`` or a direction has no curvature), and ``HCKFACLike`` is the same
with ``fishr.branch_kfac(damp, blocks=blocks, key=key)``. These chains draw ``P`` from
JAX's random stream; :mod:`fishr.compat.qmlhc` draws it from the seeds' NumPy stream
and reproduces their numbers.

Non-finite values: a NaN/inf in ``g`` or ``B``, a negative or non-finite traced
damping or schedule value, or a CG that diverged (its residual above ``||P^T g||``)
gives a NaN update (the solves never hide it); the transforms then leave their state
(step count, key, diagnostics) exactly as it was, so that ``optax.apply_if_finite``
can skip the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from fishr import distributed
from fishr._precision import DEFAULT_MATMUL_PRECISION, check_matmul_precision, precision_scope
from fishr._validate import (
    ScalarOrSchedule,
    check_damping,
    check_int,
    check_key,
    damping_at,
    damping_ok,
    next_count,
    poison,
    tree_all_finite,
)
from fishr.distributed import AxisName
from fishr.linalg import SolveInfo, solve_info
from fishr.solvers import CG, Cholesky, DirectSolver, Eigh, check_solver

__all__ = [
    "BranchState",
    "block_sizes",
    "branch_covariance",
    "branch_kfac",
    "branch_kfac_solve",
    "branch_natgrad",
    "branch_natgrad_solve",
    "clip_params",
    "gaussian_projection",
    "has_branches",
]

Projection = jax.Array | np.ndarray | Callable[[jax.Array], jax.Array]

DEFAULT_CG = CG(rtol=0.0, atol=1e-6, max_steps=8, initial_guess="zeros")  # qmlhc's cg_iters=8, tol=1e-6


# --------------------------------------------------------------------------- checks


def has_branches(branches: Any) -> bool:
    """Whether ``branches`` is usable: not ``None`` and 2-D (``(K, D)``); static under ``jit``."""
    return branches is not None and jnp.ndim(branches) == 2


def _check_natgrad_solver(solver: Any, who: str) -> None:
    check_solver(solver, (CG, Cholesky, Eigh), who, "for the D x D state-space solve")
    if isinstance(solver, CG) and solver.initial_guess == "previous":
        raise ValueError(f"{who}: CG(initial_guess='previous') does not apply: each step's projection is new, "
                         "so the last state-space solution is no guess for this one.")


def _check_blocks(blocks: Any, who: str) -> None:
    check_int(blocks, who, "blocks", 1)


# --------------------------------------------------------------------------- pure functions


def branch_covariance(branches: jax.Array, axis_name: AxisName = None) -> jax.Array:
    r"""``C = (B - mean B)^T (B - mean B) / max(1, K - 1)`` of real branches ``B`` (``K x D``).

    With ``axis_name`` the ``K`` rows are split equally over the devices of that
    mapped axis; the mean and the sum run over all ``K`` rows and the result is
    identical on every device.
    """
    if not has_branches(branches):
        raise ValueError(
            f"fishr.branch_covariance: `branches` must be a 2-D (K, D) array, got shape {jnp.shape(branches)}."
        )
    branches = jnp.asarray(branches)
    if branches.shape[0] == 0:
        raise ValueError("fishr.branch_covariance: `branches` holds no branches (K = 0).")
    k = distributed.batch_size(branches.shape[0], axis_name)
    centred = branches - distributed.batch_mean(branches, axis_name)
    return distributed.psum(centred.T @ centred, axis_name) / max(1, k - 1)


def gaussian_projection(key: jax.Array, num_params: int, state_dim: int, dtype: Any = float) -> jax.Array:
    """The default projection: an ``(num_params, state_dim)`` matrix of ``N(0, 1) / sqrt(state_dim)``."""
    normal = jax.random.normal(key, (num_params, state_dim), dtype=dtype)
    return normal / jnp.sqrt(jnp.asarray(state_dim, dtype=normal.dtype))


def block_sizes(state_dim: int, blocks: int) -> tuple[int, ...]:
    """Sizes of the diagonal blocks: ``blocks`` clamped to ``[1, D]``, ``D // blocks`` each, the first
    ``D % blocks`` one larger."""
    blocks = max(1, min(int(blocks), int(state_dim)))
    base, extra = divmod(int(state_dim), blocks)
    return (base + 1,) * extra + (base,) * (blocks - extra)


def _projection_maps(projection: Projection, num_params: int, state_dim: int, dtype: Any, who: str):
    """``(v -> P v, g -> P^T g)`` for a matrix or a linear map, checked at trace time."""
    if callable(projection):
        v_spec = jax.ShapeDtypeStruct((state_dim,), dtype)
        out = jax.eval_shape(projection, v_spec)
        if getattr(out, "shape", None) != (num_params,):
            raise ValueError(
                f"{who}: a callable `projection` must map a state vector of shape ({state_dim},) "
                f"to a raveled parameter vector of shape ({num_params},); got {getattr(out, 'shape', out)}."
            )
        transpose = jax.linear_transpose(projection, v_spec)
        try:  # trace the transpose now, so a non-linear map fails here with a clear message
            jax.eval_shape(transpose, jax.ShapeDtypeStruct((num_params,), out.dtype))
        except (NotImplementedError, TypeError, ValueError) as err:
            raise ValueError(
                f"{who}: a callable `projection` must be a linear map v -> P v "
                f"(its transpose gives P^T g); transposing it failed: {err}"
            ) from err
        return projection, lambda g: transpose(g.astype(out.dtype))[0]
    matrix = jnp.asarray(projection)
    if matrix.shape != (num_params, state_dim):
        raise ValueError(
            f"{who}: `projection` must have shape (n_params, D) = ({num_params}, {state_dim}); got {matrix.shape}."
        )
    return (lambda v: matrix @ v), (lambda g: matrix.T @ g)


def _no_branches_info(dtype: Any) -> SolveInfo:
    return solve_info(jnp.zeros((), dtype), True)


def _block_mask(sizes) -> np.ndarray:
    """The static boolean mask of the diagonal blocks of sizes ``sizes``."""
    owner = np.repeat(np.arange(len(sizes)), sizes)
    return owner[:, None] == owner[None, :]


def _block_diagonal_solve(c, b, damping, sizes, solver: DirectSolver):
    """``blockdiag(c + damping I)^{-1} b``, one batched solve per distinct block size (at most two)."""
    pieces, offset = [], 0
    for size in sorted(set(sizes), reverse=True):  # the larger blocks come first
        count = sizes.count(size)
        idx = offset + size * np.arange(count)[:, None] + np.arange(size)[None, :]  # static (count, size)
        if size > 0:
            diag_blocks = c[idx[:, :, None], idx[:, None, :]]  # (count, size, size)
            pieces.append(solver.apply_inverse(diag_blocks, b[idx][..., None], damping)[..., 0].reshape(-1))
        offset += count * size
    x = jnp.concatenate(pieces) if pieces else jnp.zeros_like(b)
    r = b - (jnp.where(_block_mask(sizes), c, 0.0) @ x + damping * x)  # the block-diagonal system's residual
    return x, solve_info(jnp.linalg.norm(r), jnp.all(jnp.isfinite(x)))


def _prepare(grads, branches, projection, who):
    flat_g, unravel = ravel_pytree(grads)
    branches = jnp.asarray(branches)
    state_dim = branches.shape[1]
    dtype = jnp.result_type(flat_g, branches)
    forward, transpose = _projection_maps(projection, flat_g.shape[0], state_dim, dtype, who)
    return flat_g, unravel, branches, forward, transpose


def projected_solve(grads, branches, projection, damping, axis_name, state_solve, who):
    """``P A^{-1} P^T g`` with ``A^{-1} b = state_solve(C, b, damping) -> (v, info)``.

    What :func:`branch_natgrad_solve` and :func:`branch_kfac_solve` share (and the qmlhc
    adapter, with qmlhc's own CG as ``state_solve``). A traced damping that is negative
    or not finite gives a NaN update.
    """
    if not has_branches(branches):
        return grads, _no_branches_info(ravel_pytree(grads)[0].dtype)
    flat_g, unravel, branches, forward, transpose = _prepare(grads, branches, projection, who)
    c = branch_covariance(branches, axis_name)
    ok = damping_ok(damping)
    v, info = state_solve(c, transpose(flat_g), jnp.where(ok, damping, jnp.nan))
    return poison(unravel(forward(v).astype(flat_g.dtype)), ok), info


def branch_natgrad_solve(
    grads: Any,
    branches: jax.Array | None,
    projection: Projection,
    *,
    damping: Any = 1e-3,
    solver: CG | Cholesky | Eigh = DEFAULT_CG,
    axis_name: AxisName = None,
    matmul_precision: str | None = DEFAULT_MATMUL_PRECISION,
) -> tuple[Any, SolveInfo]:
    r"""``P (C + damping I)^{-1} P^T g``, the branch natural gradient (see the module docs).

    A pure, jit-able function.

    Args:
      grads: gradient pytree ``g`` (raveled with ``ravel_pytree`` to ``n`` entries).
      branches: ``(K_local, D)`` states, or ``None`` / not 2-D for no preconditioning.
      projection: ``(n, D)`` matrix ``P``, or a linear map ``v (D,) -> P v (n,)``.
      damping: ``damping >= 0`` added to ``C``.
      solver: ``fishr.CG(...)`` (default ``CG(rtol=0.0, atol=1e-6, max_steps=8,
        initial_guess="zeros")``), ``fishr.Cholesky()`` or ``fishr.Eigh()``.
      axis_name: mapped axis the branches are split over (``None``: one device).
      matmul_precision: the precision of the products traced in the solve (``P^T g``, ``C``,
        ``P y``): ``"highest"`` (default: true float32 on GPUs, whose default is TF32),
        any name :func:`jax.default_matmul_precision` accepts, or ``None`` (JAX's setting).

    Returns:
      ``(update, fishr.SolveInfo)``; the update has the structure of ``grads``. Without
      branches it is ``grads`` itself with 0 iterations and residual 0.
    """
    who = "fishr.branch_natgrad_solve"
    check_damping(damping, who)
    _check_natgrad_solver(solver, who)
    check_matmul_precision(matmul_precision, who)

    def state_solve(c, b, d):
        if isinstance(solver, CG):
            return solver.solve(lambda v: c @ v + d * v, b, solver.start(b))
        return solver.solve(c, b, d)

    with precision_scope(matmul_precision):
        return projected_solve(grads, branches, projection, damping, axis_name, state_solve, who)


def branch_kfac_solve(
    grads: Any,
    branches: jax.Array | None,
    projection: Projection,
    *,
    damping: Any = 1e-3,
    blocks: int = 4,
    solver: DirectSolver = Cholesky(),
    axis_name: AxisName = None,
    matmul_precision: str | None = DEFAULT_MATMUL_PRECISION,
) -> tuple[Any, SolveInfo]:
    r"""``P blockdiag(C + damping I)^{-1} P^T g``, the branch-factored update (see the module docs).

    A pure, jit-able function; arguments as :func:`branch_natgrad_solve`, with
    ``blocks`` the number of diagonal blocks (an int ``>= 1``, clamped to ``D``; sizes
    from ``fishr._branch.block_sizes``) and ``solver`` ``fishr.Cholesky()`` or ``fishr.Eigh()``
    for the blocks (``matmul_precision`` too). Returns ``(update, fishr.SolveInfo)``; without branches ``grads``
    unchanged. The reported residual is that of the block-diagonal system.
    """
    who = "fishr.branch_kfac_solve"
    check_damping(damping, who)
    _check_blocks(blocks, who)
    check_solver(solver, (Cholesky, Eigh), who, "for the diagonal blocks")
    check_matmul_precision(matmul_precision, who)

    def state_solve(c, b, d):
        return _block_diagonal_solve(c, b, d, block_sizes(c.shape[0], blocks), solver)

    with precision_scope(matmul_precision):
        return projected_solve(grads, branches, projection, damping, axis_name, state_solve, who)


# --------------------------------------------------------------------------- optax


class BranchState(NamedTuple):
    """State of :func:`branch_natgrad` and :func:`branch_kfac`.

    Attributes:
      count: number of finite updates so far (the damping schedule's step).
      key: data (``jax.random.key_data``, uint32) of the key of the next projection,
        split on every step that draws one; stored as data so that the state serialises.
      info: :class:`fishr.SolveInfo` of the last finite solve with branches.
    """

    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  (optax states name it count too)
    key: jax.Array
    info: SolveInfo


def _step_projection(projection, key, updates, branches):
    """The projection of this step and the key to keep: a fresh Gaussian ``P`` from ``split(key)`` if none is given."""
    if projection is not None:
        return projection, key
    key, sub = jax.random.split(key)
    flat_g, _ = ravel_pytree(updates)
    dtype = jnp.result_type(flat_g, jnp.asarray(branches))
    return gaussian_projection(sub, flat_g.shape[0], jnp.shape(branches)[1], dtype), key


def _branch_transform(who, solve, damping, projection, key):
    """The optax transform shared by :func:`branch_natgrad` and :func:`branch_kfac`."""
    check_damping(damping, who)
    if key is not None and projection is not None:
        raise ValueError(f"{who}: `key` draws the random projection; with a fixed `projection=` it has no use.")
    key_data, key_impl = check_key(key, who)

    def init_fn(params):
        del params
        return BranchState(jnp.zeros((), jnp.int32), key_data, solve_info(jnp.zeros((), jnp.result_type(float)), False))

    def update_fn(updates, state, params=None, *, branches=None, **extra_args):
        del params, extra_args
        damping_now = damping_at(damping, state.count)
        new_key, info = state.key, state.info
        if has_branches(branches):
            matrix, key = _step_projection(projection, jax.random.wrap_key_data(state.key, impl=key_impl), updates,
                                           branches)
            new_key = jax.random.key_data(key)
            updates, info = solve(updates, branches, matrix, damping_now)
            info = jax.tree.map(lambda new, old: new.astype(old.dtype), info, state.info)
        new_state = BranchState(next_count(state.count), new_key, info)
        new_state = optax.tree.where(tree_all_finite(updates), new_state, state)
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def branch_natgrad(
    damping: ScalarOrSchedule = 1e-3,
    *,
    solver: CG | Cholesky | Eigh = DEFAULT_CG,
    projection: Projection | None = None,
    key: jax.Array | None = None,
    axis_name: AxisName = None,
    matmul_precision: str | None = DEFAULT_MATMUL_PRECISION,
) -> optax.GradientTransformationExtraArgs:
    """Branch-covariance natural gradient as an optax transformation.

    ``update(grads, state, params=None, *, branches=None)`` returns
    ``P (C + damping I)^{-1} P^T grads`` (see :func:`fishr.branch_natgrad_solve`), or
    ``grads`` unchanged when ``branches`` is ``None`` or not 2-D::

        opt = optax.chain(fishr.branch_natgrad(1e-3, key=jax.random.key(0)), optax.sgd(5e-3))
        updates, state = opt.update(grads, state, params, branches=B)

    Args:
      damping: float ``>= 0`` or an ``optax.Schedule`` of the finite-step count.
      solver: ``fishr.CG(...)`` (default ``CG(rtol=0.0, atol=1e-6, max_steps=8,
        initial_guess="zeros")``), ``fishr.Cholesky()`` or ``fishr.Eigh()``.
      projection: fixed ``(n_params, D)`` matrix or linear map ``v -> P v``
        used instead of the random projection.
      key: ``jax.random`` key of the Gaussian projections (default ``jax.random.key(0)``);
        the state's key is split on every step with branches, so a run is
        reproducible from ``key``. Not accepted with a fixed ``projection``.
      axis_name: mapped axis the branches are split over under ``pmap``/``shard_map``.
      matmul_precision: as for :func:`fishr.branch_natgrad_solve` (default ``"highest"``).

    A non-finite update (from a non-finite gradient or branch, a bad traced damping, a
    diverged CG) is returned as is and the state is left unchanged (count, key and
    diagnostics).
    """
    who = "fishr.branch_natgrad"
    _check_natgrad_solver(solver, who)
    check_matmul_precision(matmul_precision, who)

    def solve(updates, branches, matrix, damping_now):
        return branch_natgrad_solve(updates, branches, matrix, damping=damping_now, solver=solver,
                                    axis_name=axis_name, matmul_precision=matmul_precision)

    return _branch_transform(who, solve, damping, projection, key)


def branch_kfac(
    damping: ScalarOrSchedule = 1e-3,
    *,
    blocks: int = 4,
    solver: DirectSolver = Cholesky(),
    projection: Projection | None = None,
    key: jax.Array | None = None,
    axis_name: AxisName = None,
    matmul_precision: str | None = DEFAULT_MATMUL_PRECISION,
) -> optax.GradientTransformationExtraArgs:
    """Branch-factored block preconditioner as an optax transformation.

    ``update(grads, state, params=None, *, branches=None)`` returns
    ``P blockdiag(C + damping I)^{-1} P^T grads`` with ``blocks`` diagonal
    blocks (see :func:`fishr.branch_kfac_solve`), or ``grads`` unchanged without
    branches. ``solver`` is ``fishr.Cholesky()`` or ``fishr.Eigh()``; other arguments
    (``matmul_precision`` too) and the non-finite behaviour as :func:`branch_natgrad`.
    """
    who = "fishr.branch_kfac"
    _check_blocks(blocks, who)
    check_solver(solver, (Cholesky, Eigh), who, "for the diagonal blocks")
    check_matmul_precision(matmul_precision, who)

    def solve(updates, branches, matrix, damping_now):
        return branch_kfac_solve(updates, branches, matrix, damping=damping_now, blocks=blocks, solver=solver,
                                 axis_name=axis_name, matmul_precision=matmul_precision)

    return _branch_transform(who, solve, damping, projection, key)


class ClipParamsState(NamedTuple):
    """:func:`clip_params` is stateless."""


def clip_params(bound: float) -> optax.GradientTransformation:
    """Make the *new* parameters lie in ``[-bound, bound]``: the seeds' parameter clip.

    ``update(u, state, params)`` returns ``clip(params + u, -bound, bound) - params``,
    so that ``optax.apply_updates(params, .)`` gives the clipped parameters (up to
    one rounding of ``params + (clipped - params)``). Put it last in the chain,
    after the learning rate.
    """
    check_damping(bound, "fishr.clip_params", name="bound")

    def init_fn(params):
        del params
        return ClipParamsState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "fishr.clip_params: `params` must be passed to update (the clip acts on params + updates)."
            )
        new_params = jax.tree.map(lambda p, u: jnp.clip(p + u, -bound, bound), params, updates)
        return jax.tree.map(lambda n, p: (n - p).astype(p.dtype), new_params, params), state

    return optax.GradientTransformation(init_fn, update_fn)
