"""VMC convergence: fishr SR (each mode, with and without SPRING momentum) vs NetKet's VMC with SR vs Adam.

Every method trains the same ansatz from the same initial parameters with the
same number of Monte Carlo samples per step (one sample per Metropolis chain,
``2 L`` moves between steps), the same step budget and the same SR damping and
learning rate; the energy gradient is ``g = 2 Re mean[(E_loc - <E_loc>) conj(O)]``.
Reported per method: the relative error ``|E - E_0| / |E_0|`` of the final
state's energy, exact for the chains (every configuration enumerated:
:meth:`benchmarks.spin_chains.SpinChain.variational_energy`) and for the
continuum estimated by one evaluator for all methods (:func:`evaluate`: 8,192
fresh Metropolis samples, with its standard error), against the
ground-state energy ``E_0`` that the benchmark computes by Lanczos
(:func:`benchmarks.spin_chains.exact_ground_energy`), the variance of ``E_loc``,
the median wall-clock time per step (sampling, local energies, gradient,
preconditioner, update; min and max after the first step), the first step's time
apart (trace, compile and run: what a user waits before anything happens), and the
time to a target energy with that first step included (:func:`time_to_target`: the
trailing mean of 10 per-step energies within the preset's relative error of ``E_0``).

NetKet (optional) runs ``netket.driver.VMC_SR`` (``use_ntk=False``: its dense
``QGTJacobianDense`` + Cholesky path; ``use_ntk=True``: MinSR/SRt) with
``optax.sgd`` and ``MetropolisLocal`` (``n_chains = N``, ``sweep_size = 2 L``,
no discarded samples), the same Flax module and initial parameters.
"""

from __future__ import annotations

import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fishr
from benchmarks.spin_chains import RBM, SpinChain

PRESETS = {
    "tiny": dict(systems=[("ising", 8)], n_samples=256, steps=60, target=1e-2),
    "quick": dict(systems=[("ising", 16)], n_samples=512, steps=200, target=1e-3),
    "full": dict(systems=[("ising", 16), ("heisenberg", 16)], n_samples=1024, steps=600, target=1e-3),
}
TARGET_WINDOW = 10  # steps in the trailing mean of the per-step energy that time_to_target tests
LR_SR, LR_ADAM, DAMPING, SPRING_MU = 0.02, 0.01, 1e-2, 0.9


def fishr_methods(lr_sr: float = LR_SR, lr_adam: float = LR_ADAM, damping: float = DAMPING, mu: float = SPRING_MU):
    """name -> factory(log_psi_apply) of an optax transformation (extra arg ``batch=``)."""
    cg = fishr.CG(rtol=1e-4, max_steps=100)
    warm = fishr.CG(rtol=1e-4, max_steps=100, initial_guess="previous")
    sgd = optax.sgd(lr_sr)
    return {
        "fishr SR lazy": lambda f: optax.chain(fishr.sr(f, damping, mode="lazy", solver=cg), sgd),
        "fishr SR lazy + SPRING": lambda f: optax.chain(
            fishr.sr(f, damping, mode="lazy", momentum=mu, solver=warm), sgd),
        "fishr SR dense (cholesky)": lambda f: optax.chain(
            fishr.sr(f, damping, mode="dense", solver=fishr.Cholesky()), sgd),
        "fishr SR sample_space": lambda f: optax.chain(fishr.sr(f, damping, mode="sample_space"), sgd),
        "fishr SR sample_space + SPRING": lambda f: optax.chain(
            fishr.sr(f, damping, mode="sample_space", momentum=mu), sgd),
        "optax adam": lambda f: optax.adam(lr_adam),
    }


def netket_available(enabled: bool = True, log=print, tag: str = "") -> bool:
    """Whether NetKet (an optional peer, ``bench`` extra) can be used; says why not once."""
    try:
        if not enabled:
            raise ImportError("disabled by the caller")
        importlib.import_module("netket")
        return True
    except Exception as err:
        log(f"{tag} NetKet not available ({type(err).__name__}: {err}); its rows are skipped.")
        return False


def energy_gradient(log_psi_apply, params, samples, e_loc):
    """``(mean E_loc, 2 Re mean[(E_loc - <E>) conj(O)])`` for real parameters, real or complex log psi."""
    n = e_loc.shape[0]
    e_mean = jnp.mean(e_loc)
    out, vjp = jax.vjp(lambda p: log_psi_apply(p, samples), params)
    de = jnp.conj(e_loc - e_mean) if jnp.iscomplexobj(out) else jnp.real(e_loc - e_mean)
    (grad,) = vjp((2.0 / n) * de.astype(out.dtype))
    return jnp.real(e_mean), jax.tree.map(jnp.real, grad)


def train(system, model, make_opt, n_samples: int, steps: int, seed: int = 0, sweeps: int = 2, progress=None,
          pass_energies: bool = False):
    """Run VMC with an optax transform; returns (energies per step, seconds per step, final parameters).

    ``pass_energies``: also pass ``local_energies=`` to ``update`` (the recommended SR call, and what
    an energy-dependent :func:`fishr.trust_region` bound reads).
    """
    key = jax.random.PRNGKey(seed)
    k_init, k_s, key = jax.random.split(key, 3)
    s = system.init_samples(k_s, n_samples)
    params = model.init(k_init, s)
    opt = make_opt(model.apply)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, s, key):
        s, _ = system.sample(model.apply, params, s, key, sweeps)
        e_loc = system.local_energies(model.apply, params, s)
        e_mean, grad = energy_gradient(model.apply, params, s, e_loc)
        extra = {"local_energies": e_loc} if pass_energies else {}
        updates, opt_state = opt.update(grad, opt_state, params, batch=s, **extra)
        return optax.apply_updates(params, updates), opt_state, s, e_mean

    s, _ = jax.jit(lambda p, s, k: system.sample(model.apply, p, s, k, 20))(params, s, key)  # burn-in
    energies, times = [], []
    for t in range(steps):
        key, sub = jax.random.split(key)
        t0 = time.perf_counter()
        params, opt_state, s, e = step(params, opt_state, s, sub)
        energies.append(float(e))  # blocks
        times.append(time.perf_counter() - t0)
        if progress and (t + 1) % max(1, steps // 4) == 0:
            progress(t + 1, energies[-1])
    return np.asarray(energies), np.asarray(times), params


def train_netket(system, model, n_samples: int, steps: int, use_ntk: bool, seed: int = 0, sweeps: int = 2,
                 lr: float = LR_SR, damping: float = DAMPING, progress=None):
    """The same run with ``netket.driver.VMC_SR``; returns (energies, seconds per step, final parameters)."""
    import netket as nk

    length = system.length
    hilbert = nk.hilbert.Spin(0.5, N=length, total_sz=0 if system.kind == "heisenberg" else None)
    graph = nk.graph.Chain(length, pbc=True)
    if system.kind == "ising":
        ham = nk.operator.Ising(hilbert, graph, h=1.0, J=-1.0)  # NetKet: -h sum sx + J sum sz sz
        sampler = nk.sampler.MetropolisLocal(hilbert, n_chains=n_samples, sweep_size=sweeps * length, dtype=jnp.float32)
    else:
        ham = nk.operator.Heisenberg(hilbert, graph, J=1.0, sign_rule=True)  # Pauli matrices, Marshall-rotated
        sampler = nk.sampler.MetropolisExchange(hilbert, graph=graph, n_chains=n_samples,
                                                sweep_size=sweeps * length, dtype=jnp.float32)
    key = jax.random.PRNGKey(seed)
    k_init, k_s, _ = jax.random.split(key, 3)
    params = model.init(k_init, system.init_samples(k_s, n_samples))
    vstate = nk.vqs.MCState(sampler, model, n_samples=n_samples, n_discard_per_chain=0, seed=seed, sampler_seed=seed)
    vstate.parameters = params["params"]
    vstate.sample(n_discard_per_chain=10)  # burn-in: 10 x 2L moves, as fishr's 20 L
    driver = nk.driver.VMC_SR(ham, optax.sgd(lr), diag_shift=damping, variational_state=vstate, use_ntk=use_ntk)
    log = nk.logging.RuntimeLog()
    stamps = [time.perf_counter()]

    def callback(step, log_data, driver):
        stamps.append(time.perf_counter())
        if progress and (step + 1) % max(1, steps // 4) == 0:
            progress(step + 1, float(np.real(log_data["Energy"].mean)))
        return True

    driver.run(n_iter=steps, out=log, callback=callback, show_progress=False)
    energies = np.real(np.asarray(log.data["Energy"]["Mean"]))
    return energies, np.diff(np.asarray(stamps)), {"params": vstate.parameters}


def evaluate(system, model, params, n_eval: int = 8192, sweeps: int = 20, seed: int = 123):
    """Energy of the final state from ``n_eval`` fresh samples (same evaluator for every method).

    Returns ``(mean, standard error, variance of E_loc)``; chains start random and thermalise for
    ``10 x sweeps`` sweeps, samples are taken ``sweeps`` sweeps apart, 4 batches of ``n_eval / 4``.
    """
    key = jax.random.PRNGKey(seed)
    k0, key = jax.random.split(key)
    s = system.init_samples(k0, n_eval // 4)
    sample = jax.jit(lambda p, s, k, n: system.sample(model.apply, p, s, k, n)[0], static_argnums=3)
    e_loc = jax.jit(lambda p, s: system.local_energies(model.apply, p, s))
    s = sample(params, s, key, 10 * sweeps)
    values = []
    for _ in range(4):
        key, sub = jax.random.split(key)
        s = sample(params, s, sub, sweeps)
        values.append(np.real(np.asarray(e_loc(params, s))))
    values = np.concatenate(values)
    return float(values.mean()), float(values.std() / np.sqrt(values.size)), float(values.var())


def time_to_target(energies, times, e0: float, target: float, window: int = TARGET_WINDOW):
    """Wall-clock seconds from the start of the first step (compilation included) until the trailing
    mean of the last ``window`` per-step energies is within ``target`` relative error of ``e0``;
    ``None`` if the run never gets there. The mean damps the Monte Carlo noise of one step's
    estimate, so a single lucky batch does not count as reaching the target."""
    energies, elapsed = np.asarray(energies, float), np.cumsum(np.asarray(times, float))
    for t in range(window - 1, len(energies)):
        if abs(energies[t - window + 1:t + 1].mean() - e0) <= target * abs(e0):
            return float(elapsed[t])
    return None


def summarise(name, system, model, e0, energies, times, params, n_eval: int = 8192, target: float = 1e-3) -> dict:
    """One result row: the final state's energy, its relative error, step times (the first, compiling,
    step reported apart), and the time to ``target`` relative error.

    The energy is exact where the system can enumerate its basis (``system.variational_energy``: the
    spin chains; standard error 0) and else from :func:`evaluate` (the continuum)."""
    after = times[1:] if len(times) > 1 else times
    if hasattr(system, "variational_energy") and np.all(np.isfinite(energies)):
        (e_final, e_var), e_err = system.variational_energy(model.apply, params, with_variance=True), 0.0
    else:
        e_final, e_err, e_var = evaluate(system, model, params, n_eval)
    return dict(
        method=name, system=system.name, exact=e0, final_energy=e_final, final_energy_err=e_err,
        variance=e_var, rel_error=float(abs(e_final - e0) / abs(e0)), rel_error_err=float(e_err / abs(e0)),
        steps=len(energies), first_step_s=float(times[0]), target=target,
        seconds_to_target=time_to_target(energies, times, e0, target),
        ms_per_step=float(1e3 * np.median(after)), ms_min=float(1e3 * np.min(after)), ms_max=float(1e3 * np.max(after)),
        seconds_total=float(np.sum(times)), energies=[float(e) for e in energies], seconds=[float(t) for t in times],
    )


def run(quick: bool = True, preset: str | None = None, only=None, log=print, netket: bool = True):
    """Train every method on each chain of the preset; returns the list of result rows."""
    cfg = PRESETS[preset or ("quick" if quick else "full")]
    n, steps = cfg["n_samples"], cfg["steps"]
    have_nk = netket_available(netket, log, "[vmc]")
    rows = []
    for kind, length in cfg["systems"]:
        system = SpinChain(kind, length)
        t0 = time.perf_counter()
        e0 = system.exact_energy()
        log(f"[vmc] {system.name} (periodic), exact E0 = {e0:.6f} (Lanczos, {time.perf_counter() - t0:.1f} s); "
            f"RBM alpha=1, N={n} samples, {steps} steps, lr {LR_SR} (Adam {LR_ADAM}), damping {DAMPING}")
        model = RBM(alpha=1)
        runs = {name: (lambda make=make, name=name: train(system, model, make, n, steps, progress=prog(name, log)))
                for name, make in fishr_methods().items()}
        if have_nk:
            runs["netket VMC_SR"] = lambda: train_netket(system, model, n, steps, False,
                                                         progress=prog("netket VMC_SR", log))
            runs["netket VMC_SR ntk"] = lambda: train_netket(system, model, n, steps, True,
                                                             progress=prog("netket VMC_SR ntk", log))
        for name, fn in runs.items():
            if only and name not in only:
                continue
            energies, times, params = fn()
            rows.append(summarise(name, system, model, e0, energies, times, params, target=cfg["target"]))
            r = rows[-1]
            log(f"[vmc] {system.name}: {name:32s} rel. error {r['rel_error']:.2e}  {r['ms_per_step']:.1f} ms/step")
    return rows


def prog(name, log=print):
    """A progress callback ``(step, energy)`` that prints one line."""
    return lambda t, e: log(f"[vmc]   {name}: step {t}, E = {e:.5f}")


def markdown(rows) -> str:
    target = rows[0]["target"] if rows else 1e-3
    lines = ["| system | method | steps | final E (± s.e.) | relative error | var E_loc | first step s (compile) "
             f"| median ms / step (min-max) | s to rel. err. {target:g} (compile incl.) | total s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = "not reached" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}"
        lines.append(f"| {r['system']} | {r['method']} | {r['steps']} | "
                     + (f"{r['final_energy']:.5f} (exact) | " if r["final_energy_err"] == 0 else
                        f"{r['final_energy']:.5f} ± {r['final_energy_err']:.5f} | ")
                     + f"{r['rel_error']:.1e} | {r['variance']:.2e} | {r['first_step_s']:.2f} | "
                       f"{r['ms_per_step']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | {reach} | "
                     f"{r['seconds_total']:.1f} |")
    return "\n".join(lines)


def plot(rows, path):
    """Relative energy error vs step and vs wall-clock seconds, one panel pair per system."""
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, axes = plt.subplots(len(systems), 2, figsize=(11, 3.8 * len(systems)), squeeze=False)
    for (ax_s, ax_t), system in zip(axes, systems):
        for r in (r for r in rows if r["system"] == system):
            err = np.maximum(np.abs(np.asarray(r["energies"]) - r["exact"]) / abs(r["exact"]), 1e-7)
            ax_s.semilogy(err, label=r["method"], lw=1)
            ax_t.semilogy(np.cumsum(r["seconds"]), err, lw=1)  # from the start: the compiling step included
        for ax, xl in ((ax_s, "step"), (ax_t, "wall-clock seconds, first (compiling) step included")):
            ax.set_xlabel(xl)
            ax.set_ylabel("|E - E0| / |E0|")
            ax.set_title(f"{system}, RBM")
        ax_s.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
