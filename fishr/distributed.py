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

import math
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
    "local_mean",
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
    local = jax.tree.map(lambda x: local_mean(x, axis=axis, keepdims=keepdims), tree)
    return pmean(local, axis_name)


PRODUCT_MEAN_MIN_WIDTH = 1024  # entries per sample from which the CPU's mean over samples is a product


def local_mean(x: Any, axis: int = 0, keepdims: bool = False) -> jax.Array:
    """``mean_i x_i`` over ``axis`` of one array on this device (no devices: see :func:`batch_mean`).

    On the CPU, over axis 0 of a floating array with at least ``PRODUCT_MEAN_MIN_WIDTH``
    entries per sample, the mean is the product ``(1/n, ..., 1/n) @ x`` (at the highest
    precision), which runs as a library matrix-vector product: XLA's CPU reduction over
    the leading axis is far slower on some shapes and versions (jax 0.10.2, 2-core AVX2,
    float32: ``(256, 17,345)`` 26 ms against 0.8 ms for the product, ``(512, 17,345)`` 75
    against 1.5 ms, ``(1,024, 9,473)`` 3.7 against 1.5 ms; on jax 0.9.1 1.0 / 0.5, 2.1 / 1.8
    and 2.8 / 2.1 ms). Everywhere else ``jnp.mean``.
    """
    x = jnp.asarray(x)
    product = (
        x.ndim >= 2 and axis in (0, -x.ndim) and x.dtype in _PRODUCT_MEAN_DTYPES
        and math.prod(x.shape[1:]) >= PRODUCT_MEAN_MIN_WIDTH and jax.default_backend() == "cpu"
    )
    if not product:
        return jnp.mean(x, axis=axis, keepdims=keepdims)
    n = x.shape[0]
    weights = jnp.full((n,), 1.0 / n, x.dtype)
    mean = jnp.matmul(weights, x.reshape(n, -1), precision=lax.Precision.HIGHEST).reshape(x.shape[1:])
    return mean[None] if keepdims else mean


_PRODUCT_MEAN_DTYPES = tuple(jnp.dtype(t) for t in ("float32", "float64", "complex64", "complex128"))


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
