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
  (:func:`branch_covariance`).
* Projection ``P`` (``n x D``), parameters to states: by default
  ``P_ij ~ N(0, 1) / sqrt(D)``, drawn afresh at every step from a
  ``jax.random`` key; or a fixed user matrix, or a user *linear map*
  ``v (D,) -> P v (n,)`` (``P^T`` is then its ``jax.linear_transpose``).
* Branch natural gradient (:func:`branch_natgrad_solve`)::

      update = P (C + damping I)^{-1} P^T g

  with the ``D x D`` solve by conjugate gradient (``solver="cg"``, the seed's) or
  by a Cholesky factorisation (``solver="cholesky"``). The CG follows qmlhc's
  ``cg_solve``: start at ``x = 0``, at most ``cg_iters`` iterations, at least
  one, stop after an update once ``||r||_2 <= tol`` (an *absolute* tolerance on
  the state-space residual), denominators floored at ``1e-12``.
* Branch-factored blocks (:func:`branch_kfac_solve`): ``C + damping I`` is cut
  into ``blocks`` diagonal blocks (``blocks`` clamped to ``[1, D]``; sizes
  ``D // blocks``, the first ``D % blocks`` of them one larger), the
  off-diagonal blocks are dropped, and each block is solved exactly
  (Cholesky)::

      update = P blockdiag(C + damping I)^{-1} P^T g

  Blocks of equal size are solved in one batched Cholesky, so there are at
  most two solves per step whatever ``blocks`` is.
* Without branches (``branches`` is ``None`` or not 2-D) the gradient is
  returned unchanged and no projection is drawn, as in the seeds.

The sign and the learning rate are left to the chain, as in optax; the seeds'
parameter clip is :func:`clip_params`. qmlhc's ``HCNaturalGrad`` is::

    optax.chain(fishr.branch_natgrad(fisher_damp, cg_iters=cg_iters, key=key),
                optax.scale(-lr), fishr.clip_params(clip))    # clip: optional

and ``HCKFACLike`` the same with ``fishr.branch_kfac(damp, blocks=blocks, key=key)``.
These chains draw ``P`` from JAX's random stream; :mod:`fishr.compat.qmlhc`
draws it from the seeds' NumPy stream and reproduces their numbers.

Non-finite values: a NaN/inf in ``g`` or ``B`` gives a NaN update (the solves
never hide it); the transforms then leave their state (step count and key)
exactly as it was, so that ``optax.apply_if_finite`` can skip the step.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax

from fishr import distributed
from fishr.checks import check_damping, damping_at, tree_all_finite
from fishr.distributed import AxisName
from fishr.linalg import CGInfo, cg, cholesky_solve

__all__ = [
    "BranchKFACState",
    "BranchNatGradState",
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

Projection = Union[jax.Array, np.ndarray, Callable[[jax.Array], jax.Array]]
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

SOLVERS = ("cg", "cholesky")
CG_DENOMINATOR_FLOOR = 1e-12  # qmlhc's cg_solve guards both CG divisions with max(1e-12, .)


# --------------------------------------------------------------------------- checks


def has_branches(branches: Any) -> bool:
    """Whether ``branches`` is usable: not ``None`` and 2-D (``(K, D)``); static under ``jit``."""
    return branches is not None and jnp.ndim(branches) == 2


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"fishr.branch_natgrad: `solver` must be one of {SOLVERS}, got {solver!r}.")


def _check_cg(cg_iters: Any, tol: Any) -> None:
    if not isinstance(cg_iters, numbers.Integral) or cg_iters < 0:
        raise ValueError(f"fishr.branch_natgrad: `cg_iters` must be an int >= 0, got {cg_iters!r}.")
    if not isinstance(tol, numbers.Real) or tol < 0:
        raise ValueError(f"fishr.branch_natgrad: `tol` must be a float >= 0, got {tol!r}.")


def _check_blocks(blocks: Any) -> None:
    if not isinstance(blocks, numbers.Integral):
        raise ValueError(f"fishr.branch_kfac: `blocks` must be an int, got {blocks!r}.")


def _check_key(key: Any, projection: Any, name: str) -> jax.Array:
    if key is None:
        if projection is None:
            raise ValueError(
                f"fishr.{name}: the random projection needs `key=` (a jax.random key or an int seed); "
                "or pass `projection=` (an (n_params, D) matrix or a linear map)."
            )
        return jax.random.key(0)  # unused: the projection is the user's
    if isinstance(key, numbers.Integral):
        return jax.random.key(key)
    return key


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
    k = distributed.batch_size(branches.shape[0], axis_name)
    centred = branches - distributed.batch_mean(branches, axis_name)
    return distributed.psum(centred.T @ centred, axis_name) / max(1, k - 1)


def gaussian_projection(key: jax.Array, num_params: int, state_dim: int, dtype: Any = float) -> jax.Array:
    """The default projection: an ``(num_params, state_dim)`` matrix of ``N(0, 1) / sqrt(state_dim)``."""
    normal = jax.random.normal(key, (num_params, state_dim), dtype=dtype)
    return normal / jnp.sqrt(jnp.asarray(state_dim, dtype=normal.dtype))


def block_sizes(state_dim: int, blocks: int) -> tuple[int, ...]:
    """Sizes of the diagonal blocks: ``blocks`` clamped to ``[1, D]``, ``D // blocks`` each, the first ``D % blocks`` one larger."""
    blocks = max(1, min(int(blocks), int(state_dim)))
    base, extra = divmod(int(state_dim), blocks)
    return (base + 1,) * extra + (base,) * (blocks - extra)


def _projection_maps(projection: Projection, num_params: int, state_dim: int, dtype: Any, name: str):
    """``(v -> P v, g -> P^T g)`` for a matrix or a linear map, checked at trace time."""
    if callable(projection):
        v_spec = jax.ShapeDtypeStruct((state_dim,), dtype)
        out = jax.eval_shape(projection, v_spec)
        if getattr(out, "shape", None) != (num_params,):
            raise ValueError(
                f"fishr.{name}: a callable `projection` must map a state vector of shape ({state_dim},) "
                f"to a raveled parameter vector of shape ({num_params},); got {getattr(out, 'shape', out)}."
            )
        transpose = jax.linear_transpose(projection, v_spec)
        try:  # trace the transpose now, so a non-linear map fails here with a clear message
            jax.eval_shape(transpose, jax.ShapeDtypeStruct((num_params,), out.dtype))
        except (NotImplementedError, TypeError, ValueError) as err:
            raise ValueError(
                f"fishr.{name}: a callable `projection` must be a linear map v -> P v "
                f"(its transpose gives P^T g); transposing it failed: {err}"
            ) from err
        return projection, lambda g: transpose(g.astype(out.dtype))[0]
    matrix = jnp.asarray(projection)
    if matrix.shape != (num_params, state_dim):
        raise ValueError(
            f"fishr.{name}: `projection` must have shape (n_params, D) = ({num_params}, {state_dim}); "
            f"got {matrix.shape}."
        )
    return (lambda v: matrix @ v), (lambda g: matrix.T @ g)


def _no_branches_info(dtype: Any) -> CGInfo:
    return CGInfo(iterations=jnp.zeros((), jnp.int32), residual_norm=jnp.zeros((), dtype))


def _state_space_solve(c, b, damping, solver, cg_iters, tol):
    def matvec(v):
        return c @ v + damping * v

    if solver == "cholesky":
        x = cholesky_solve(c, b, damping)
        residual = jnp.linalg.norm(b - matvec(x))
        return x, CGInfo(iterations=jnp.zeros((), jnp.int32), residual_norm=residual)
    return cg(
        matvec, b, None, tol=0.0, atol=tol, maxiter=cg_iters,
        denominator_floor=CG_DENOMINATOR_FLOOR, min_iterations=1,
    )


def _block_diagonal_solve(c, b, damping, sizes):
    """``blockdiag(c + damping I)^{-1} b``, one batched Cholesky per distinct block size (at most two)."""
    pieces, offset = [], 0
    for size in sorted(set(sizes), reverse=True):  # the larger blocks come first
        count = sizes.count(size)
        idx = offset + size * np.arange(count)[:, None] + np.arange(size)[None, :]  # static (count, size)
        if size > 0:
            diag_blocks = c[idx[:, :, None], idx[:, None, :]]  # (count, size, size)
            pieces.append(cholesky_solve(diag_blocks, b[idx][..., None], damping)[..., 0].reshape(-1))
        offset += count * size
    return jnp.concatenate(pieces) if pieces else jnp.zeros_like(b)


def _prepare(grad, branches, projection, name):
    flat_g, unravel = ravel_pytree(grad)
    branches = jnp.asarray(branches)
    state_dim = branches.shape[1]
    dtype = jnp.result_type(flat_g, branches)
    forward, transpose = _projection_maps(projection, flat_g.shape[0], state_dim, dtype, name)
    return flat_g, unravel, branches, forward, transpose


def branch_natgrad_solve(
    grad: Any,
    branches: Optional[jax.Array],
    projection: Projection,
    *,
    damping: Any = 1e-3,
    solver: str = "cg",
    cg_iters: int = 8,
    tol: float = 1e-6,
    axis_name: AxisName = None,
) -> tuple[Any, CGInfo]:
    r"""``P (C + damping I)^{-1} P^T g``, the branch natural gradient (see the module docs).

    A pure, jit-able function.

    Args:
      grad: gradient pytree ``g`` (raveled with ``ravel_pytree`` to ``n`` entries).
      branches: ``(K_local, D)`` states, or ``None`` / not 2-D for no preconditioning.
      projection: ``(n, D)`` matrix ``P``, or a linear map ``v (D,) -> P v (n,)``.
      damping: ``damping >= 0`` added to ``C``.
      solver: ``"cg"`` (qmlhc's CG, see the module docs) or ``"cholesky"`` (exact).
      cg_iters: maximum CG iterations (at least one is taken when ``cg_iters >= 1``).
      tol: absolute tolerance on the state-space residual norm ``||r||_2``.
      axis_name: mapped axis the branches are split over (``None``: one device).

    Returns:
      ``(update, CGInfo)``; the update has the structure of ``grad``. Without
      branches it is ``grad`` itself with 0 iterations and residual 0; the
      Cholesky solve reports 0 iterations and its explicit residual norm.
    """
    check_damping(damping, "fishr.branch_natgrad_solve")
    _check_solver(solver)
    _check_cg(cg_iters, tol)
    if not has_branches(branches):
        return grad, _no_branches_info(ravel_pytree(grad)[0].dtype)
    flat_g, unravel, branches, forward, transpose = _prepare(grad, branches, projection, "branch_natgrad_solve")
    c = branch_covariance(branches, axis_name)
    v, info = _state_space_solve(c, transpose(flat_g), damping, solver, cg_iters, tol)
    return unravel(forward(v).astype(flat_g.dtype)), info


def branch_kfac_solve(
    grad: Any,
    branches: Optional[jax.Array],
    projection: Projection,
    *,
    damping: Any = 1e-3,
    blocks: int = 4,
    axis_name: AxisName = None,
) -> Any:
    r"""``P blockdiag(C + damping I)^{-1} P^T g``, the branch-factored update (see the module docs).

    A pure, jit-able function; arguments as :func:`branch_natgrad_solve`, with
    ``blocks`` the number of diagonal blocks (clamped to ``[1, D]``, sizes from
    :func:`block_sizes`). Without branches returns ``grad`` unchanged.
    """
    check_damping(damping, "fishr.branch_kfac_solve")
    _check_blocks(blocks)
    if not has_branches(branches):
        return grad
    flat_g, unravel, branches, forward, transpose = _prepare(grad, branches, projection, "branch_kfac_solve")
    c = branch_covariance(branches, axis_name)
    sizes = block_sizes(branches.shape[1], blocks)
    v = _block_diagonal_solve(c, transpose(flat_g), damping, sizes)
    return unravel(forward(v).astype(flat_g.dtype))


# --------------------------------------------------------------------------- optax


class BranchNatGradState(NamedTuple):
    """State of :func:`branch_natgrad`.

    Attributes:
      count: number of finite updates so far (the damping schedule's step).
      key: ``jax.random`` key of the next projection (split on every step that draws one).
      cg_iterations: iterations of the last finite solve (0: Cholesky or no branches).
      residual_norm: state-space residual norm of the last finite solve.
    """

    count: jax.Array
    key: jax.Array
    cg_iterations: jax.Array
    residual_norm: jax.Array


class BranchKFACState(NamedTuple):
    """State of :func:`branch_kfac`: finite-update ``count`` and the projection ``key``."""

    count: jax.Array
    key: jax.Array


def _step_projection(projection, key, updates, branches):
    """The projection of this step and the key to keep: a fresh Gaussian ``P`` from ``split(key)`` if none is given."""
    if projection is not None:
        return projection, key
    key, sub = jax.random.split(key)
    flat_g, _ = ravel_pytree(updates)
    dtype = jnp.result_type(flat_g, jnp.asarray(branches))
    return gaussian_projection(sub, flat_g.shape[0], jnp.shape(branches)[1], dtype), key


def _branch_transform(name, solve, init_extra, make_state, damping, projection, key):
    """The optax transform shared by :func:`branch_natgrad` and :func:`branch_kfac`."""
    check_damping(damping, "fishr." + name)
    key = _check_key(key, projection, name)

    def init_fn(params):
        del params
        return make_state(jnp.zeros((), jnp.int32), key, *init_extra())

    def update_fn(updates, state, params=None, *, branches=None, **extra_args):
        del params, extra_args
        damping_now = damping_at(damping, state.count)
        new_key, extra = state.key, init_extra()
        if has_branches(branches):
            matrix, new_key = _step_projection(projection, state.key, updates, branches)
            updates, extra = solve(updates, branches, matrix, damping_now)
        new_state = make_state(optax.safe_increment(state.count), new_key, *extra)
        new_state = optax.tree.where(tree_all_finite(updates), new_state, state)
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def branch_natgrad(
    damping: ScalarOrSchedule = 1e-3,
    *,
    key: Any = None,
    projection: Optional[Projection] = None,
    solver: str = "cg",
    cg_iters: int = 8,
    tol: float = 1e-6,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Branch-covariance natural gradient as an optax transformation.

    ``update(grads, state, params=None, *, branches=None)`` returns
    ``P (C + damping I)^{-1} P^T grads`` (see :mod:`fishr.branch`), or ``grads``
    unchanged when ``branches`` is ``None`` or not 2-D::

        opt = optax.chain(fishr.branch_natgrad(1e-3, key=jax.random.key(0)), optax.sgd(5e-3))
        updates, state = opt.update(grads, state, params, branches=B)

    Args:
      damping: float ``>= 0`` or an ``optax.Schedule`` of the finite-step count.
      key: ``jax.random`` key (or int seed) of the Gaussian projections; the
        state's key is split on every step with branches, so a run is
        reproducible from ``key``. Needed unless ``projection`` is given.
      projection: fixed ``(n_params, D)`` matrix or linear map ``v -> P v``
        used instead of the random projection.
      solver: ``"cg"`` (qmlhc's CG) or ``"cholesky"``.
      cg_iters, tol: CG iterations and absolute residual tolerance.
      axis_name: mapped axis the branches are split over under ``pmap``/``shard_map``.

    A non-finite update (from a non-finite gradient or branch) is returned as
    is and the state is left unchanged (count, key and diagnostics).
    """
    _check_solver(solver)
    _check_cg(cg_iters, tol)

    def solve(updates, branches, matrix, damping_now):
        x, info = branch_natgrad_solve(
            updates, branches, matrix, damping=damping_now, solver=solver, cg_iters=cg_iters, tol=tol,
            axis_name=axis_name,
        )
        return x, (info.iterations.astype(jnp.int32), info.residual_norm.astype(jnp.result_type(float)))

    def init_extra():
        return jnp.zeros((), jnp.int32), jnp.zeros((), jnp.result_type(float))

    return _branch_transform("branch_natgrad", solve, init_extra, BranchNatGradState, damping, projection, key)


def branch_kfac(
    damping: ScalarOrSchedule = 1e-3,
    *,
    blocks: int = 4,
    key: Any = None,
    projection: Optional[Projection] = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Branch-factored block preconditioner as an optax transformation.

    ``update(grads, state, params=None, *, branches=None)`` returns
    ``P blockdiag(C + damping I)^{-1} P^T grads`` with ``blocks`` diagonal
    blocks (see :mod:`fishr.branch`), or ``grads`` unchanged without branches.
    Other arguments and the non-finite behaviour as :func:`branch_natgrad`.
    """
    _check_blocks(blocks)

    def solve(updates, branches, matrix, damping_now):
        x = branch_kfac_solve(updates, branches, matrix, damping=damping_now, blocks=blocks, axis_name=axis_name)
        return x, ()

    return _branch_transform("branch_kfac", solve, tuple, BranchKFACState, damping, projection, key)


class ClipParamsState(NamedTuple):
    """:func:`clip_params` is stateless."""


def clip_params(bound: float) -> optax.GradientTransformation:
    """Make the *new* parameters lie in ``[-bound, bound]``: the seeds' parameter clip.

    ``update(u, state, params)`` returns ``clip(params + u, -bound, bound) - params``,
    so that ``optax.apply_updates(params, .)`` gives the clipped parameters (up to
    one rounding of ``params + (clipped - params)``). Put it last in the chain,
    after the learning rate.
    """
    if not isinstance(bound, numbers.Real) or not bound >= 0:
        raise ValueError(f"fishr.clip_params: `bound` must be a float >= 0, got {bound!r}.")

    def init_fn(params):
        del params
        return ClipParamsState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("fishr.clip_params: `params` must be passed to update (the clip acts on params + updates).")
        new_params = jax.tree.map(lambda p, u: jnp.clip(p + u, -bound, bound), params, updates)
        return jax.tree.map(lambda n, p: (n - p).astype(p.dtype), new_params, params), state

    return optax.GradientTransformation(init_fn, update_fn)
