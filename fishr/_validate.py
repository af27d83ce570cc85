"""Argument validation shared by every fishr solve and transform: one place per check.

Two kinds of check, by when the value is known:

* at construction or trace time (Python numbers, concrete arrays, static shapes, tree
  structures): a ``ValueError`` (``TypeError`` for a wrong type) naming the argument
  and what was expected. The message starts with ``who``, the public name the user
  called, e.g. ``"fishr.sr"``.
* at run time (a traced damping, a schedule's value, labels): the update is made
  non-finite (NaN) instead, and the transforms keep their state when the update is
  non-finite, so ``optax.apply_if_finite`` skips the step. :func:`damping_ok` and
  :func:`poison` implement that.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# A number, a concrete array, or an optax schedule of the step count (damping, learning rates).
ScalarOrSchedule = float | jax.Array | optax.Schedule

__all__ = [
    "ScalarOrSchedule",
    "check_choice",
    "check_damping",
    "check_int",
    "check_key",
    "check_positive",
    "check_real",
    "check_tree_matches_params",
    "concrete_value",
    "damping_at",
    "damping_ok",
    "local_batch_size",
    "next_count",
    "poison",
    "shared_damping",
    "tree_all_finite",
]


def concrete_value(x: Any) -> Any:
    """``x`` as a NumPy value when it is known now (a Python number or a concrete array), else ``None``.

    Schedules (callables) and traced values return ``None``: they are checked at run
    time (:func:`damping_ok`).
    """
    if callable(x) or isinstance(x, jax.core.Tracer):  # pyright: ignore[reportAttributeAccessIssue]
        return None
    try:
        return np.asarray(x)
    except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_damping(damping: Any, who: str, *, positive: bool = False, name: str = "damping") -> None:
    """A concrete ``damping`` must be a finite real scalar ``>= 0`` (``> 0`` with ``positive``).

    A schedule or a traced value is not checked here; its value is checked at run time
    by :func:`damping_ok` (a negative or non-finite value gives a NaN update).
    """
    value = concrete_value(damping)
    if value is None:
        return
    if value.shape != () or not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)) \
            or value.dtype == np.bool_:
        raise ValueError(f"{who}: `{name}` must be a real scalar or an optax schedule, got {damping!r}.")
    bound = "> 0" if positive else ">= 0"
    if not np.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{who}: `{name}` must be finite and {bound} (or an optax schedule), got {damping!r}.")


def damping_ok(damping: Any) -> jax.Array:
    """Scalar ``True`` where a (possibly traced) damping value is finite and ``>= 0``."""
    d = jnp.asarray(damping)
    return jnp.isfinite(d) & (d >= 0)


def poison(tree: Any, ok: Any) -> Any:
    """``tree`` where the scalar ``ok`` is true, the same tree of NaN where it is false."""
    return jax.tree.map(lambda x: jnp.where(ok, x, jnp.full_like(x, jnp.nan)), tree)


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


def shared_damping(extra_args: dict, damping: Any, count: jax.Array, who: str) -> Any:
    """The damping of this step: ``extra_args["damping"]`` when the chain passes one, else :func:`damping_at`.

    An extra argument ``damping=`` is how a wrapper that adapts the damping
    (:func:`fishr.levenberg_marquardt`) hands its one value to every transform of its
    chain. A concrete value is checked like the constructor's (:func:`check_damping`); a
    traced one at run time (:func:`damping_ok`).
    """
    given = extra_args.get("damping")
    if given is None:
        return damping_at(damping, count)
    if callable(given):
        raise ValueError(f"{who}: the extra argument `damping=` must be a number or a scalar array, not a schedule.")
    check_damping(given, who)
    return given


def check_int(value: Any, who: str, name: str, minimum: int, allow_none: bool = False) -> None:
    """``value`` must be a Python int ``>= minimum`` (or ``None`` with ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{who}: `{name}` must be an int >= {minimum}{extra}, got {value!r}.")


def check_real(value: Any, who: str, name: str, low: float, high: float, *, high_open: bool = False) -> None:
    """``value`` must be a real number in ``[low, high]`` (``[low, high)`` with ``high_open``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(float(value))
    ok = ok and low <= float(value)
    ok = ok and (float(value) < high if high_open else float(value) <= high)
    if not ok:
        interval = f"[{low:g}, {high:g})" if high_open else f"[{low:g}, {high:g}]"
        raise ValueError(f"{who}: `{name}` must be a float in {interval}, got {value!r}.")


def check_positive(value: Any, who: str, name: str, above: float = 0.0, expected: str | None = None
                   ) -> float | None:
    """``None``, or ``value`` as a float when it is a finite real number ``> above``; else a
    ``ValueError`` naming ``name`` and ``expected`` (default ``"None or a finite float > above"``)."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(float(value)) \
            and float(value) > above:
        return float(value)
    expected = expected or f"None or a finite float > {above:g}"
    raise ValueError(f"{who}: `{name}` must be {expected}, got {value!r}.")


def check_choice(value: Any, choices: Sequence[Any], who: str, name: str) -> None:
    """``value`` must be one of ``choices``."""
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        raise ValueError(f"{who}: `{name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")


def check_key(key: Any, who: str) -> tuple[jax.Array, Any]:
    """A ``jax.random`` key as ``(key_data, impl)``: uint32 data that serialises, and its PRNG implementation.

    ``None`` is ``jax.random.key(0)``. Typed keys (``jax.random.key``) and legacy
    uint32 keys (``jax.random.PRNGKey``) are accepted; rebuild the typed key with
    ``jax.random.wrap_key_data(data, impl=impl)``.
    """
    if key is None:
        key = jax.random.key(0)
    if isinstance(key, (numbers.Integral, bool)):
        raise TypeError(f"{who}: `key` must be a jax.random key, e.g. jax.random.key({key!r}); got the int {key!r}.")
    if hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if jnp.shape(key) != ():
            raise ValueError(f"{who}: `key` must be a single key (shape ()), got shape {jnp.shape(key)}.")
        return jax.random.key_data(key), jax.random.key_impl(key)
    arr = jnp.asarray(key)
    if arr.dtype != jnp.uint32 or arr.shape != (2,):
        raise TypeError(f"{who}: `key` must be a jax.random key (jax.random.key(seed)), got {key!r}.")
    return arr, jax.random.key_impl(jax.random.wrap_key_data(arr))


def next_count(count: Any) -> jax.Array:
    """``count + 1``, saturating at the int32 maximum (optax's ``safe_increment``), as an array."""
    return jnp.asarray(optax.safe_increment(count))


def local_batch_size(batch: Any, who: str, name: str = "batch") -> int:
    """The common leading size of every leaf of ``batch``; at least one sample."""
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(batch)}
    if not sizes or None in sizes or len(sizes) != 1:
        raise ValueError(
            f"{who}: `{name}` must be an array (or pytree of arrays) with one common leading "
            f"batch axis; got leading sizes {sorted(map(str, sizes))}."
        )
    n = sizes.pop()
    assert n is not None
    if n == 0:
        raise ValueError(f"{who}: `{name}` holds no samples (its leading axis has size 0).")
    return n


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
