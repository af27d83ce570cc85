"""Small Flax models and a NumPy float64 re-statement of the ruvector K-FAC seed, for the K-FAC tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SEED_EPS = 1e-10  # ruvector-math utils::EPS


class MLP(nn.Module):
    """tanh MLP; the last layer returns `features[-1]` outputs."""

    features: tuple = (4, 2)

    @nn.compact
    def __call__(self, x):
        for k, f in enumerate(self.features):
            x = nn.Dense(f, name=f"dense{k}")(x)
            if k < len(self.features) - 1:
                x = jnp.tanh(x)
        return x


class DenseNormNet(nn.Module):
    """Dense -> tanh -> LayerNorm -> Dense(3) in float64: a Kronecker block and a norm diagonal block."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(6, param_dtype=jnp.float64)(x))
        x = nn.LayerNorm(param_dtype=jnp.float64)(x)
        return nn.Dense(3, param_dtype=jnp.float64)(x)


def sin_score(model):
    """Per-sample score sum_k sin(z_k) of the model's output: a smooth nonlinear scalar per sample."""
    return lambda params, x: jnp.sum(jnp.sin(model.apply(params, x)), axis=-1)


def init(model, x, seed=0):
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), x)
    return jax.tree.map(lambda p: p.astype(jnp.float64), params)


def random_like(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


# --------------------------------------------------------------------------- the seed, in NumPy


class SeedError(Exception):
    pass


class SeedLayer:
    """Line-by-line NumPy statement of ruvector's KFACLayer (loops, its own Cholesky)."""

    def __init__(self, input_dim, output_dim):
        self.a = np.zeros((input_dim, input_dim))
        self.g = np.zeros((output_dim, output_dim))
        self.damping = 1e-3
        self.ema = 0.95
        self.num_updates = 0

    def with_damping(self, damping):
        self.damping = max(damping, SEED_EPS)
        return self

    def with_ema(self, ema):
        self.ema = min(max(ema, 0.0), 1.0)
        return self

    def update(self, acts, grads):
        if len(acts) == 0 or len(grads) == 0:
            raise SeedError("empty")
        b = len(acts)
        if len(grads) != b:
            raise SeedError(("mismatch", b, len(grads)))
        n_in, n_out = len(self.a), len(self.g)
        new_a = np.zeros((n_in, n_in))
        for act in acts:
            if len(act) != n_in:
                raise SeedError(("mismatch", n_in, len(act)))
            for i in range(n_in):
                for j in range(n_in):
                    new_a[i, j] += act[i] * act[j] / b
        new_g = np.zeros((n_out, n_out))
        for g in grads:
            if len(g) != n_out:
                raise SeedError(("mismatch", n_out, len(g)))
            for i in range(n_out):
                for j in range(n_out):
                    new_g[i, j] += g[i] * g[j] / b
        if self.num_updates == 0:
            self.a, self.g = new_a, new_g
        else:
            self.a = self.ema * self.a + (1.0 - self.ema) * new_a
            self.g = self.ema * self.g + (1.0 - self.ema) * new_g
        self.num_updates += 1

    def _damped(self, m):
        n = len(m)
        shift = max(self.damping * np.trace(m) / n, SEED_EPS)
        return m + shift * np.eye(n)

    @staticmethod
    def _invert(m):
        n = len(m)
        low = np.zeros((n, n))
        for i in range(n):
            for j in range(i + 1):
                s = m[i, j] - sum(low[i, k] * low[j, k] for k in range(j))
                if i == j:
                    if s <= 0.0:
                        raise SeedError("not PD")
                    low[i, j] = np.sqrt(s)
                else:
                    low[i, j] = s / low[j, j]
        linv = np.zeros((n, n))
        for i in range(n):
            linv[i, i] = 1.0 / low[i, i]
            for j in range(i + 1, n):
                linv[j, i] = -sum(low[j, k] * linv[k, i] for k in range(i, j)) / low[j, j]
        return linv.T @ linv

    def natural_gradient(self, w):
        if len(w) != len(self.g):
            raise SeedError(("mismatch", len(self.g), len(w)))
        a_inv = self._invert(self._damped(self.a))
        g_inv = self._invert(self._damped(self.g))
        return g_inv @ (np.asarray(w) @ a_inv)
