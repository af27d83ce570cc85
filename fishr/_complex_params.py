r"""Non-holomorphic complex parameters as pairs of real ones.

A complex leaf ``theta = a + i b`` of a ``log psi`` that is not holomorphic in it is
handled as the real pair ``(a, b)``, stacked on a new leading axis of size 2. SR then
runs on real parameters (``S = Re[Obar^H Obar] / N`` over the ``2 P`` real coordinates,
the real-parameter convention of :mod:`fishr._sr_solve`) and the solution comes back
as ``x = x_a + i x_b``.

Gradient convention (NetKet's, and what ``params - lr * update`` needs to descend): the
gradient of a real loss ``L`` is ``dL/da + i dL/db`` per complex entry, i.e. the complex
*conjugate* of ``jax.grad(L)`` (JAX returns ``dL/da - i dL/db``). It is paired as
``(dL/da, dL/db)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["has_complex", "join_pairs", "split_pairs"]


def has_complex(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is complex."""
    return any(jnp.iscomplexobj(leaf) for leaf in jax.tree.leaves(tree))


def split_pairs(tree: Any, like: Any) -> Any:
    """Every leaf of ``tree`` at a complex leaf of ``like`` as ``stack([re, im])`` (real); others as they are."""
    def split(x, ref):
        if not jnp.iscomplexobj(ref):
            return x
        x = jnp.asarray(x)
        return jnp.stack([jnp.real(x), jnp.imag(x)]).astype(jnp.finfo(ref.dtype).dtype)
    return jax.tree.map(split, tree, like)


def join_pairs(tree: Any, like: Any) -> Any:
    """The inverse of :func:`split_pairs`: ``x[0] + i x[1]`` in ``like``'s complex dtype at its complex leaves."""
    return jax.tree.map(lambda x, ref: (x[0] + 1j * x[1]).astype(ref.dtype) if jnp.iscomplexobj(ref) else x,
                        tree, like)
