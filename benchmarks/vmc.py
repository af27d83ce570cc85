"""VMC convergence on the transverse-field Ising chain: fishr SR (each mode, SPRING) vs Adam.

Every method trains the same RBM (same initial parameters, same number of
Monte Carlo samples per step, same step budget, same seed) with Metropolis
sampling; the energy gradient is ``g = 2 Re mean[(E_loc - <E_loc>) O]``. The
figure of merit is the relative error ``|E - E_0| / |E_0|`` of the energy
averaged over the last 10% of steps, against the Lanczos ground-state energy
``E_0`` computed by the benchmark (:func:`benchmarks.spin_chains.exact_ground_energy`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fishr
from benchmarks.spin_chains import RBM, exact_ground_energy, local_energies, metropolis

PRESETS = {
    "quick": dict(length=10, n_samples=512, steps=150),
    "full": dict(length=16, n_samples=1024, steps=300),
}


def methods(lr_sr: float = 0.02, lr_adam: float = 0.01, damping: float = 1e-2):
    """name -> factory(log_psi_apply) of an optax transformation (extra arg ``samples=``)."""
    cg = dict(tol=1e-4, maxiter=100)
    return {
        "fishr SR lazy": lambda f: optax.chain(fishr.sr(f, damping, mode="lazy", **cg), optax.sgd(lr_sr)),
        "fishr SR sample_space": lambda f: optax.chain(fishr.sr(f, damping, mode="sample_space"), optax.sgd(lr_sr)),
        "fishr SR dense (cholesky)": lambda f: optax.chain(
            fishr.sr(f, damping, mode="dense", solver="cholesky"), optax.sgd(lr_sr)),
        "fishr SR + SPRING 0.9": lambda f: optax.chain(
            fishr.sr(f, damping, mode="sample_space", momentum=0.9), optax.sgd(lr_sr)),
        "optax adam": lambda f: optax.chain(optax.adam(lr_adam)),
    }


def train(make_opt, length, n_samples, steps, seed=0, sweeps=2, progress=None):
    """Run VMC; returns (energies per step, wall-clock seconds per step after the first)."""
    model = RBM(alpha=1)
    key = jax.random.PRNGKey(seed)
    k_init, k_s, key = jax.random.split(key, 3)
    s = jnp.where(jax.random.bernoulli(k_s, 0.5, (n_samples, length)), 1.0, -1.0)
    params = model.init(k_init, s)
    opt = make_opt(model.apply)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, s, key):
        s, _ = metropolis(model.apply, params, s, key, sweeps)
        e_loc = local_energies(model.apply, params, s)
        e_mean = jnp.mean(e_loc)
        _, vjp = jax.vjp(lambda p: model.apply(p, s), params)
        (grad,) = vjp(2.0 * (e_loc - e_mean) / n_samples)
        updates, opt_state = opt.update(grad, opt_state, params, samples=s)
        return optax.apply_updates(params, updates), opt_state, s, jnp.real(e_mean)

    s, _ = jax.jit(lambda p, s, k: metropolis(model.apply, p, s, k, 20))(params, s, key)  # burn-in
    energies, times = [], []
    for t in range(steps):
        key, sub = jax.random.split(key)
        t0 = time.perf_counter()
        params, opt_state, s, e = step(params, opt_state, s, sub)
        energies.append(float(e))
        times.append(time.perf_counter() - t0)
        if progress and (t + 1) % max(1, steps // 5) == 0:
            progress(t + 1, energies[-1])
    return np.asarray(energies), np.asarray(times[1:])


def run(quick: bool = True, only=None, log=print):
    preset = PRESETS["quick" if quick else "full"]
    length = preset["length"]
    e0 = exact_ground_energy(length)
    log(f"[vmc] TFIM L={length} (J=h=1, periodic), exact E0 = {e0:.6f} (Lanczos); "
        f"N={preset['n_samples']} samples, {preset['steps']} steps")
    rows = []
    for name, make in methods().items():
        if only and name not in only:
            continue
        energies, times = train(make, progress=lambda t, e: log(f"[vmc]   {name}: step {t}, E = {e:.5f}"), **preset)
        tail = energies[-max(1, len(energies) // 10):]
        rows.append(dict(
            method=name, length=length, exact=e0, final_energy=float(np.mean(tail)),
            rel_error=float(abs(np.mean(tail) - e0) / abs(e0)), ms_per_step=float(1e3 * np.median(times)),
            seconds_total=float(np.sum(times)), energies=energies.tolist(),
        ))
        log(f"[vmc] {name:28s} rel. error {rows[-1]['rel_error']:.2e}  {rows[-1]['ms_per_step']:.1f} ms/step")
    return rows


def markdown(rows) -> str:
    lines = ["| method | relative energy error | median ms / step | total s |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['rel_error']:.2e} | {r['ms_per_step']:.1f} | {r['seconds_total']:.1f} |")
    return "\n".join(lines)
