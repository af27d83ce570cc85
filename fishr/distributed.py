"""Batch reductions that know about devices.

Every reduction over samples in fishr goes through this module; it is the only
place that calls ``lax.pmean`` / ``lax.psum`` / ``lax.all_gather``.

``axis_name`` conventions
-------------------------
* ``None``: one device; the local batch is the whole batch and every function
  here is the plain single-device reduction.
* ``str`` or ``tuple[str, ...]``: the samples are split along the leading axis
  over the devices of that (those) named mapped axes, as inside ``jax.pmap`` or
  ``jax.shard_map``. Every device must hold the same number of local samples
  (which both ``pmap`` and ``shard_map`` guarantee); the global mean is then
  the ``pmean`` of the local means, and the result is identical on all devices.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

AxisName = Hashable | Sequence[Hashable] | None

__all__ = [
    "AxisName",
    "all_gather_batch",
    "batch_mean",
    "batch_size",
    "device_count",
    "device_index",
    "pmean",
    "psum",
]


def _normalize(axis_name: AxisName):
    if axis_name is None:
        return None
    if isinstance(axis_name, list):
        return tuple(axis_name)
    return axis_name


def pmean(tree: Any, axis_name: AxisName) -> Any:
    """Mean of ``tree`` over the devices of ``axis_name`` (identity for ``None``)."""
    axis_name = _normalize(axis_name)
    if axis_name is None:
        return tree
    return lax.pmean(tree, axis_name)


def psum(tree: Any, axis_name: AxisName) -> Any:
    """Sum of ``tree`` over the devices of ``axis_name`` (identity for ``None``)."""
    axis_name = _normalize(axis_name)
    if axis_name is None:
        return tree
    return lax.psum(tree, axis_name)


def device_count(axis_name: AxisName) -> int:
    """Number of devices along ``axis_name`` (1 for ``None``); a static int under tracing."""
    axis_name = _normalize(axis_name)
    if axis_name is None:
        return 1
    return lax.psum(1, axis_name)


def batch_size(local_size: int, axis_name: AxisName) -> int:
    """Global number of samples ``N`` given the local one (equal split assumed)."""
    return local_size * device_count(axis_name)


def batch_mean(tree: Any, axis_name: AxisName, axis: int = 0, keepdims: bool = False) -> Any:
    """Mean over the batch ``axis`` of every leaf, across all devices of ``axis_name``.

    ``mean_i x_i`` with ``i`` running over the global batch of ``N = n_local *
    n_devices`` samples. The local mean is taken first and then ``pmean``'d,
    which is exact because every device holds ``n_local`` samples.
    """
    local = jax.tree.map(lambda x: jnp.mean(x, axis=axis, keepdims=keepdims), tree)
    return pmean(local, axis_name)


def all_gather_batch(tree: Any, axis_name: AxisName) -> Any:
    """Concatenate every leaf's leading (batch) axis over the devices of ``axis_name``.

    The result holds the global batch in device order and is identical on
    all devices; with ``axis_name=None`` it is the input.
    """
    axis_name = _normalize(axis_name)
    if axis_name is None:
        return tree
    return jax.tree.map(lambda x: lax.all_gather(x, axis_name, axis=0, tiled=True), tree)


def device_index(axis_name: AxisName) -> jax.Array:
    """Position of this device along ``axis_name`` (``0`` for ``None``), as an int32 scalar.

    Device ``k`` holds the global samples ``k * n_local ... (k + 1) * n_local - 1``
    (the order :func:`all_gather_batch` concatenates in), so ``device_index *
    n_local + local_index`` is a sample's global index, e.g. to draw the same
    per-sample random numbers on any number of devices.
    """
    axis_name = _normalize(axis_name)
    if axis_name is None:
        return jnp.zeros((), jnp.int32)
    return lax.axis_index(axis_name)
