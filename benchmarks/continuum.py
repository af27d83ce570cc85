"""Continuum VMC workload: the hydrogen atom (exact ground-state energy -1/2 Hartree).

One electron at ``r`` in 3-D around a proton at the origin, atomic units:
``H = -1/2 nabla^2 - 1/|r|``. The ansatz is a small network of the distance,

    log psi(r) = MLP(|r|) - softplus(c) |r|,

(the envelope keeps ``psi`` normalisable; the MLP must fix its decay rate, which starts
at ``softplus(c) = 0.5`` instead of the exact 1). Local energy

    E_loc(r) = -1/2 (nabla^2 log psi + |nabla log psi|^2) - 1/|r|,

by forward-over-reverse autodiff (the Laplacian as the trace of the 3 x 3 Hessian).
Samples come from Metropolis with Gaussian moves on ``|psi|^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

EXACT_ENERGY = -0.5  # Hartree: -1/(2 n^2) with n = 1, the textbook Rydberg formula, not a fit


class HydrogenNet(nn.Module):
    """``log psi(r) = MLP(|r|) - softplus(c) |r|`` for positions ``(..., 3)``."""

    width: int = 16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        r = jnp.sqrt(jnp.sum(x**2, axis=-1, keepdims=True) + 1e-12)
        h = nn.tanh(nn.Dense(self.width, param_dtype=self.param_dtype)(r))
        h = nn.tanh(nn.Dense(self.width, param_dtype=self.param_dtype)(h))
        out = nn.Dense(1, param_dtype=self.param_dtype, kernel_init=nn.initializers.normal(0.01))(h)[..., 0]
        # softplus(c) starts at 0.5, half the exact decay rate: the optimiser has to find it.
        c = self.param("c", lambda _: jnp.log(jnp.expm1(jnp.asarray(0.5, self.param_dtype))))
        return out - jax.nn.softplus(c) * r[..., 0]


def local_energies(log_psi, params, x):
    """``E_loc`` for positions ``x`` of shape ``(n, 3)``."""
    one = lambda r: log_psi(params, r[None])[0]
    grad = jax.vmap(jax.grad(one))(x)
    lap = jax.vmap(lambda r: jnp.trace(jax.hessian(one)(r)))(x)
    r = jnp.sqrt(jnp.sum(x**2, axis=-1))
    return -0.5 * (lap + jnp.sum(grad**2, axis=-1)) - 1.0 / r


def metropolis(log_psi, params, x, key, steps: int = 10, step_size: float = 0.5):
    """``steps`` Gaussian Metropolis moves on each walker of ``x`` (``(n, 3)``); returns (x, acceptance)."""
    n = x.shape[0]

    def step(carry, key):
        x, log_p = carry
        k_prop, k_acc = jax.random.split(key)
        proposal = x + step_size * jax.random.normal(k_prop, x.shape, x.dtype)
        log_q = 2 * log_psi(params, proposal)
        accept = jnp.log(jax.random.uniform(k_acc, (n,))) < log_q - log_p
        return (jnp.where(accept[:, None], proposal, x), jnp.where(accept, log_q, log_p)), accept

    (x, _), accepted = jax.lax.scan(step, (x, 2 * log_psi(params, x)), jax.random.split(key, steps))
    return x, jnp.mean(accepted)


@dataclass(frozen=True)
class Hydrogen:
    """The hydrogen workload with the interface of :class:`benchmarks.spin_chains.SpinChain`."""

    name: str = "hydrogen atom"

    def exact_energy(self) -> float:
        return EXACT_ENERGY

    def init_samples(self, key, n: int):
        return jax.random.normal(key, (n, 3), jnp.float32)

    def sample(self, log_psi, params, x, key, sweeps: int = 2):
        return metropolis(log_psi, params, x, key, steps=5 * sweeps)

    def local_energies(self, log_psi, params, x):
        return local_energies(log_psi, params, x)


PRESETS = {"tiny": dict(n_samples=128, steps=40), "quick": dict(n_samples=512, steps=150),
           "full": dict(n_samples=1024, steps=400)}


def run(quick: bool = True, preset: str | None = None, log=print):
    """fishr SR (lazy, sample_space, SPRING) vs Adam on the hydrogen atom; rows as :func:`benchmarks.vmc.run`."""
    from benchmarks import vmc

    cfg = PRESETS[preset or ("quick" if quick else "full")]
    system, model = Hydrogen(), HydrogenNet()
    log(f"[hydrogen] exact E0 = {EXACT_ENERGY} Ha; network 1-{model.width}-{model.width}-1 of |r| with an "
        f"exponential envelope; N={cfg['n_samples']} walkers, {cfg['steps']} steps")
    wanted = ("fishr SR lazy", "fishr SR sample_space", "fishr SR sample_space + SPRING", "optax adam")
    rows = []
    for name, make in vmc.fishr_methods(lr_sr=0.05, lr_adam=0.02).items():
        if name not in wanted:
            continue
        energies, times, params = vmc.train(system, model, make, cfg["n_samples"], cfg["steps"],
                                            progress=vmc.prog(f"hydrogen {name}", log))
        rows.append(vmc.summarise(name, system, model, EXACT_ENERGY, energies, times, params))
        log(f"[hydrogen] {name:32s} rel. error {rows[-1]['rel_error']:.2e}  {rows[-1]['ms_per_step']:.1f} ms/step")
    return rows
