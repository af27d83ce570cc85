"""Trust-region SR vs hand-tuned SR learning rates on the TFIM and Heisenberg chains, side by side in one run.

Question: does :func:`fishr.trust_region` (``eta = m min(lr, sqrt(max_norm / x^T S x))``,
FermiNet's norm constraint with the exact metric, scaled by the Kesten factor ``m`` that
adapts to the metric cosine of successive directions) remove the learning-rate search
of SR? Every run trains the same RBM (alpha = 1) from the same initial parameters,
with the same samples per step (``N``, one per Metropolis chain, ``2 L`` moves between
steps), the same step budget and SR damping 1e-2 (sample_space with local energies,
fishr's recommended VMC call; :func:`benchmarks.vmc.train`):

* **plain SR**: ``optax.chain(fishr.sr(...), optax.sgd(lr))`` for every ``lr`` of
  ``PLAIN_LRS``; the best of them is "the best hand-tuned learning rate";
* **trust-region SR** (fishr's default, adaptive):
  ``optax.chain(fishr.sr(...), fishr.trust_region(fishr.curvature.fisher(log_psi),
  learning_rate=lr, max_norm=b))`` over a 100x span of each of its two settings: every
  bound of ``TR_BOUNDS`` at the default learning rate ``TR_LR``, and every learning rate
  of ``TR_LRS`` at the default bound ``TR_BOUND``;
* **fixed trust region** (``adapt_rate=0``, ``m = 1``: FermiNet's rule) at the
  settings of ``FIXED``, for comparison.

Reported per run and seed: the final state's relative error ``|E - E_0| / |E_0|`` with
``E`` its exact variational energy (:meth:`benchmarks.spin_chains.SpinChain.variational_energy`,
every configuration of the chain enumerated: no Monte Carlo error of its own, where an estimate
from 4,096 fresh samples carries a standard error comparable to the differences measured), whether
it diverged (non-finite energy), the median ms per step; per setting the mean
over seeds; per system the ratio of each trust-region setting's error to the best
plain learning rate's. Run ``python -m benchmarks.trust_region [--full]``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import optax

import fishr
from benchmarks.spin_chains import RBM, SpinChain
from benchmarks.vmc import train

DAMPING = 1e-2
PLAIN_LRS = (0.01, 0.03, 0.1, 0.3)
TR_LR, TR_BOUND = 0.05, 1e-3  # fishr.trust_region's defaults (FermiNet's)
TR_BOUNDS = (1e-4, 1e-3, 1e-2)
TR_LRS = (0.01, 0.1, 1.0)
FIXED = ((TR_LR, TR_BOUND), (1.0, TR_BOUND))  # adapt_rate=0, for comparison
PRESETS = {
    "tiny": dict(systems=[("ising", 8)], n_samples=128, steps=20, seeds=(0,)),
    "quick": dict(systems=[("ising", 16), ("heisenberg", 16)], n_samples=512, steps=200, seeds=(0, 1)),
    "full": dict(systems=[("ising", 16), ("heisenberg", 16)], n_samples=512, steps=300, seeds=(0, 1, 2)),
}


def methods():
    """name -> (setting, factory(log_psi_apply) of the optax transformation)."""
    out = {}
    for lr in PLAIN_LRS:
        out[f"plain SR lr={lr:g}"] = ("plain", lambda f, lr=lr: optax.chain(
            fishr.sr(f, DAMPING, mode="sample_space"), optax.sgd(lr)))

    def trust(f, lr, b, **kw):
        return optax.chain(fishr.sr(f, DAMPING, mode="sample_space"),
                           fishr.trust_region(fishr.curvature.fisher(f), learning_rate=lr, max_norm=b, **kw))

    for b in TR_BOUNDS:
        out[f"trust region lr={TR_LR:g} max_norm={b:g}"] = ("trust_region bound", lambda f, b=b: trust(f, TR_LR, b))
    for lr in TR_LRS:
        out[f"trust region lr={lr:g} max_norm={TR_BOUND:g}"] = ("trust_region lr",
                                                                lambda f, lr=lr: trust(f, lr, TR_BOUND))
    for lr, b in FIXED:
        out[f"fixed trust region lr={lr:g} max_norm={b:g}"] = ("fixed", lambda f, lr=lr, b=b: trust(
            f, lr, b, adapt_rate=0.0))
    return out


def run(preset: str = "quick", log=print) -> dict:
    cfg = PRESETS[preset]
    rows = []
    for kind, length in cfg["systems"]:
        system = SpinChain(kind, length)
        e0 = system.exact_energy()
        model = RBM(alpha=1)
        for name, (setting, make) in methods().items():
            for seed in cfg["seeds"]:
                t0 = time.perf_counter()
                energies, times, params = train(system, model, make, cfg["n_samples"], cfg["steps"], seed=seed,
                                                pass_energies=True)
                diverged = not np.all(np.isfinite(energies))
                if diverged:
                    rel = float("nan")
                else:
                    e_final = system.variational_energy(model.apply, params)
                    rel = float(abs(e_final - e0) / abs(e0))
                rows.append(dict(system=system.name, method=name, setting=setting, seed=seed, rel_error=rel,
                                 diverged=diverged, ms_per_step=float(1e3 * np.median(times[1:])),
                                 seconds=float(time.perf_counter() - t0)))
                log(f"[trust_region] {system.name} {name:30s} seed {seed}: rel. error {rel:.2e}"
                    f"{' (diverged)' if diverged else ''}, {rows[-1]['ms_per_step']:.1f} ms/step")
    return dict(preset=preset, settings=dict(damping=DAMPING, plain_lrs=PLAIN_LRS, tr_lr=TR_LR, tr_bound=TR_BOUND,
                                             tr_bounds=TR_BOUNDS, tr_lrs=TR_LRS, fixed=FIXED,
                                             **{k: v for k, v in cfg.items() if k != "systems"}),
                rows=rows, summary=summarise(rows))


def summarise(rows) -> list[dict]:
    """Per system and method: mean relative error over seeds (NaN if any seed diverged)
    and the ratio to the best plain lr."""
    out = []
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        means = {}
        for name in dict.fromkeys(r["method"] for r in mine):
            rs = [r for r in mine if r["method"] == name]
            means[name] = (float(np.mean([r["rel_error"] for r in rs])), sum(r["diverged"] for r in rs), len(rs),
                           rs[0]["setting"], float(np.median([r["ms_per_step"] for r in rs])))
        plain = {n: m for n, m in means.items() if m[3] == "plain" and m[1] == 0}
        best_name = min(plain, key=lambda n: plain[n][0]) if plain else None
        best = plain[best_name][0] if best_name else float("nan")
        for name, (mean, div, count, setting, ms) in means.items():
            out.append(dict(system=system, method=name, setting=setting, mean_rel_error=mean, diverged=div, runs=count,
                            ms_per_step=ms, best_plain=best_name,
                            vs_best_plain=mean / best if best_name else float("nan")))
    return out


def markdown(report) -> str:
    lines = ["| system | method | mean rel. error | diverged runs | vs best plain lr | ms / step |",
             "|---|---|---|---|---|---|"]
    for r in report["summary"]:
        lines.append(f"| {r['system']} | {r['method']}{' (best plain)' if r['method'] == r['best_plain'] else ''} | "
                     f"{r['mean_rel_error']:.2e} | {r['diverged']}/{r['runs']} | {r['vs_best_plain']:.2f} | "
                     f"{r['ms_per_step']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="three seeds, 300 steps")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="overrides --full")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    report = run(args.preset or ("full" if args.full else "quick"))
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
