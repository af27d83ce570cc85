"""Unmodified Flax log-psi models for the structured-SR and capture tests."""

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """A plain MLP log psi: Dense-tanh-Dense-tanh-Dense."""

    width: int = 8

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(self.width)(x))
        x = nn.tanh(nn.Dense(self.width)(x))
        return nn.Dense(1)(x)[..., 0]


class RBM(nn.Module):
    """log psi = sum_j log cosh(W s + b)_j + a . s, written with flax.linen.Dense."""

    hidden: int = 6

    @nn.compact
    def __call__(self, s):
        theta = nn.Dense(self.hidden)(s)
        visible = nn.Dense(1, use_bias=False)(s)[..., 0]
        return jnp.sum(jnp.log(jnp.cosh(theta)), axis=-1) + visible


class PerPosition(nn.Module):
    """A dense layer applied at every position (site/particle), then pooled; plus an uncaptured scale."""

    features: int = 5

    @nn.compact
    def __call__(self, x):  # x: (n, sites * 2)
        n = x.shape[0]
        h = nn.tanh(nn.Dense(self.features)(x.reshape(n, -1, 2)))  # (n, sites, features)
        pooled = jnp.sum(h, axis=1)
        scale = self.param("scale", nn.initializers.ones, (self.features,))  # not in any Dense
        return nn.Dense(1)(pooled * scale)[..., 0]


class Mixed(nn.Module):
    """Captured Dense layers plus uncaptured parameters (an elementwise gate and a Conv-free extra term)."""

    @nn.compact
    def __call__(self, x):
        gate = self.param("gate", nn.initializers.normal(0.5), (x.shape[-1],))
        h = nn.tanh(nn.Dense(7)(x * gate))
        return nn.Dense(1)(h)[..., 0] + jnp.sum(jnp.sin(x * gate), axis=-1)


class ComplexOut(nn.Module):
    """Real parameters, complex log psi: amplitude and phase heads on a shared Dense trunk."""

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(6)(x))
        return nn.Dense(1)(h)[..., 0] + 1j * jnp.pi * jnp.tanh(nn.Dense(1)(h)[..., 0])


class Holomorphic(nn.Module):
    """Complex parameters, holomorphic log psi (an RBM with complex weights)."""

    hidden: int = 5

    @nn.compact
    def __call__(self, s):
        theta = nn.Dense(self.hidden, param_dtype=jnp.complex128)(s)
        return jnp.sum(jnp.log(jnp.cosh(theta)), axis=-1)
