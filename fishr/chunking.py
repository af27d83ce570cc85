r"""Evaluating a per-batch function over chunks of the local batch, to bound peak memory.

``chunk_size = m`` splits the ``n`` local samples into ``ceil(n / m)`` chunks of ``m``
samples and runs the function on one chunk at a time in a ``lax.map`` (a loop in the
compiled program, so neither the program nor its intermediates grow with ``n``). The
last chunk is padded by repeating the last sample (a real input, so the model sees no
out-of-distribution zeros); the padded rows are cut from :func:`map_chunks`'s output and
get zero weight in :func:`sum_chunks`. The results equal the unchunked ones up to the
order of floating-point sums (tested to 1e-12 in float64).

``chunk_size=None`` (or ``>= n``) runs the function once on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fishr._validate import check_int

__all__ = ["check_chunk_size", "map_chunks", "num_chunks", "sum_chunks"]


def check_chunk_size(chunk_size: Any, who: str) -> int | None:
    """``None`` (the whole local batch at once) or a positive int, else a ``ValueError`` naming ``chunk_size``."""
    check_int(chunk_size, who, "chunk_size", 1, allow_none=True)
    return None if chunk_size is None else int(chunk_size)


def num_chunks(n: int, chunk_size: int | None) -> int:
    """How many chunks ``n`` samples take (1 without chunking)."""
    return 1 if chunk_size is None or chunk_size >= n else -(-n // chunk_size)


def _split(tree: Any, n: int, chunk_size: int, pad: str) -> Any:
    """Leading axis ``n`` -> ``(chunks, chunk_size)``, padded by ``pad`` ("edge": the last row; "zero")."""
    total = num_chunks(n, chunk_size) * chunk_size

    def split(x):
        x = jnp.asarray(x)
        if total > n:
            x = jnp.pad(x, [(0, total - n)] + [(0, 0)] * (x.ndim - 1), mode="edge" if pad == "edge" else "constant")
        return x.reshape((total // chunk_size, chunk_size) + x.shape[1:])

    return jax.tree.map(split, tree)


def map_chunks(fn: Callable[[Any], Any], batch: Any, chunk_size: int | None) -> Any:
    """``fn(batch)`` computed chunk by chunk: every output leaf has the batch as its leading axis.

    ``fn`` maps a batch of ``m`` samples to a pytree of arrays of leading size ``m``; the
    chunks' outputs are concatenated (padding removed), so the result has the shapes of
    ``fn(batch)``.
    """
    n = jax.tree.leaves(batch)[0].shape[0]
    if chunk_size is None or num_chunks(n, chunk_size) == 1:
        return fn(batch)
    out = lax.map(fn, _split(batch, n, chunk_size, "edge"))
    return jax.tree.map(lambda y: y.reshape((y.shape[0] * y.shape[1],) + y.shape[2:])[:n], out)


def sum_chunks(fn: Callable[[Any, Any], Any], batch: Any, per_sample: Any, chunk_size: int | None) -> Any:
    """``sum over chunks of fn(batch_chunk, per_sample_chunk)``, e.g. a VJP of a linear map.

    ``per_sample`` (leading axis ``n``) is padded with zeros, so for ``fn`` linear in it the
    padded samples add nothing; the sum runs in a ``lax.scan`` with one chunk live at a time.
    """
    n = jax.tree.leaves(batch)[0].shape[0]
    if chunk_size is None or num_chunks(n, chunk_size) == 1:
        return fn(batch, per_sample)
    chunks = (_split(batch, n, chunk_size, "edge"), _split(per_sample, n, chunk_size, "zero"))
    shapes = jax.eval_shape(fn, *jax.tree.map(lambda x: x[0], chunks))  # fn appears once, inside the scan
    total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def step(acc, chunk):
        return jax.tree.map(jnp.add, acc, fn(*chunk)), None

    total, _ = lax.scan(step, total, chunks)
    return total
