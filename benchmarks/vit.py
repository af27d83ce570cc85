"""A vision-transformer ``log psi`` for spins on a square lattice: the ill-conditioned SR workload.

The lattice of ``side x side`` spins (``+-1``) is cut into ``patch x patch`` patches; each
patch is embedded by one ``nn.Dense``; ``depth`` pre-LayerNorm blocks follow, each
``x + MHA(LN(x))`` then ``x + MLP(LN(x))`` with Flax's ``nn.MultiHeadDotProductAttention``
(``heads`` heads) and a two-layer GELU MLP of width ``mlp_ratio * embed``; a final
LayerNorm and a ``Dense(1)`` head per patch, summed over the patches, give the real
``log psi``. Real parameters.

Defaults (``side=8, patch=2, embed=32, depth=2, heads=4, mlp_ratio=2``) give
``P = 17,345``: the model of issue 19, whose SR kernel ``Obar Obar^T`` spans eigenvalues
from about 1e-15 to 1e3 (LayerNorm makes every score invariant to a rescaling of the
embedding, so many directions carry almost no weight), the hard case for sample-space SR.
:func:`tiny` is a CI-sized version with the same layer kinds.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ViT", "random_spins", "tiny"]


class ViT(nn.Module):
    """Vision-transformer ``log psi(s)`` for ``s`` of shape ``(..., side * side)``; see the module docstring."""

    side: int = 8
    patch: int = 2
    embed: int = 32
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s):
        lead = s.shape[:-1]
        p, n = self.patch, self.side // self.patch
        x = s.reshape(*lead, n, p, n, p)
        x = jnp.moveaxis(x, -3, -2).reshape(*lead, n * n, p * p)  # (..., patches, p*p)
        dense = lambda width, name: nn.Dense(width, param_dtype=self.param_dtype, name=name)
        x = dense(self.embed, "embed")(x)
        for b in range(self.depth):
            y = nn.LayerNorm(param_dtype=self.param_dtype, name=f"ln_attn_{b}")(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, param_dtype=self.param_dtype,
                                                    name=f"attn_{b}")(y, y)
            y = nn.LayerNorm(param_dtype=self.param_dtype, name=f"ln_mlp_{b}")(x)
            y = nn.gelu(dense(self.mlp_ratio * self.embed, f"mlp_in_{b}")(y))
            x = x + dense(self.embed, f"mlp_out_{b}")(y)
        x = nn.LayerNorm(param_dtype=self.param_dtype, name="ln_out")(x)
        return jnp.sum(dense(1, "head")(x)[..., 0], axis=-1)


def tiny(param_dtype=jnp.float64) -> ViT:
    """A 4x4-spin ViT with every layer kind of :class:`ViT` (P = 1,265), for the test suite."""
    return ViT(side=4, patch=2, embed=8, depth=2, heads=2, mlp_ratio=2, param_dtype=param_dtype)


def random_spins(key, n: int, sites: int, dtype=jnp.float32) -> jax.Array:
    """``n`` uniformly random configurations of ``sites`` spins ``+-1``."""
    return jax.random.choice(key, jnp.asarray([-1.0, 1.0], dtype), (n, sites))
