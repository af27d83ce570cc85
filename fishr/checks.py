"""Argument checks (and the damping-schedule evaluation) shared by fishr's solvers and transforms.

Each raises ``ValueError`` naming the argument and what was expected, at trace
time (the values checked are Python numbers or static tree structures and
shapes). ``who`` is the public name the message starts with, e.g. ``"fishr.sr"``.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["check_damping", "check_tree_matches_params", "damping_at", "tree_all_finite"]


def check_damping(damping: Any, who: str) -> None:
    """``damping`` must be a real number >= 0; schedules (callables) and traced values pass."""
    if callable(damping) or not isinstance(damping, numbers.Real):
        return
    if not damping >= 0:  # also rejects NaN
        raise ValueError(f"{who}: `damping` must be >= 0 or an optax schedule, got {damping!r}.")


def damping_at(damping: Any, count: jax.Array) -> Any:
    """The damping for step ``count``: ``damping(count)`` for an optax schedule, else ``damping``.

    The transforms keep ``count`` as int32 (optax's convention); optax schedules
    evaluated on an int32 count return float32 even with ``jax_enable_x64``, which
    would round a float64 user's damping. The count is therefore passed as the
    default integer type (int64 under x64), so the schedule computes in the
    default float type.
    """
    if not callable(damping):
        return damping
    return damping(jnp.asarray(count, dtype=jax.dtypes.canonicalize_dtype(jnp.int64)))


def check_tree_matches_params(tree: Any, params: Any, who: str, name: str = "the gradient (`updates`)") -> None:
    """``tree`` must have the tree structure of ``params`` and the same leaf shapes."""
    t_def, p_def = jax.tree.structure(tree), jax.tree.structure(params)
    if t_def != p_def:
        raise ValueError(
            f"{who}: {name} must have the tree structure of `params`; got {t_def} and {p_def} for params."
        )
    for (path, leaf), p in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(params)):
        if jnp.shape(leaf) != jnp.shape(p):
            raise ValueError(
                f"{who}: {name} leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)} "
                f"but the matching `params` leaf has shape {jnp.shape(p)}."
            )


def tree_all_finite(tree: Any) -> jax.Array:
    """Scalar ``True`` iff every entry of every leaf of ``tree`` is finite (no NaN, no inf).

    The transforms use it to leave their state unchanged after a non-finite step.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))
