"""``python -m benchmarks [--quick]``: every benchmark side by side, results to ``benchmarks/results/``.

Sections (each prints progress and a Markdown table):

1. ``sr_timing``: SR time per call, fishr lazy / dense / sample_space vs NetKet's
   QGTOnTheFly, QGTJacobianDense and SRt at identical inputs, with the bare per-sample
   Jacobian and one gradient as the lower bounds (:mod:`benchmarks.sr_timing`);
2. ``vmc``: VMC convergence on the TFIM chain (and the Heisenberg chain in the full
   preset): fishr SR modes with and without SPRING vs NetKet's VMC_SR vs Adam
   (:mod:`benchmarks.vmc`);
3. ``hydrogen``: the continuum workload, fishr SR vs Adam (:mod:`benchmarks.continuum`);
4. ``structured_sr``: exact SR, structured vs generic vs NetKet (:mod:`benchmarks.structured_sr`);
5. ``kfac``: fishr.kfac vs kfac_jax.Optimizer vs optax.adam (:mod:`benchmarks.kfac`);
6. ``adaptive_kfac``: fishr.adaptive_kfac vs kfac-jax's adaptive mode vs fixed-step
   fishr.kfac vs Adam on the regression and a CNN (:mod:`benchmarks.adaptive_kfac`);
7. ``trust_region``: trust-region SR vs hand-tuned SR learning rates on the TFIM and
   Heisenberg chains (:mod:`benchmarks.trust_region`);
8. ``layers``: a CNN with fishr.kfac vs kfac_jax.Optimizer (fixed steps) and the vision
   transformer with structured / generic / default SR vs NetKet (:mod:`benchmarks.layers`);
9. ``sr_accuracy``: sample-space SR error against an exact float64 reference and first/warm
   call times, fishr vs NetKet's ``srt``, on a vision transformer, an MLP and an RBM, in
   float64 and float32 (:mod:`benchmarks.sr_accuracy`; runs last: it enables float64).

Writes ``summary.md`` (all tables), ``summary.json`` (raw numbers) and the PNG plots
``sr_timing.png``, ``vmc_energy.png``, ``hydrogen_energy.png`` to ``--out``.
NetKet and kfac-jax are optional: without them their rows are skipped with a message.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time

SECTIONS = ("sr_timing", "vmc", "hydrogen", "structured_sr", "kfac", "adaptive_kfac", "trust_region", "layers",
            "sr_accuracy")


def machine() -> str:
    """CPU model and core count, for the report header."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small preset (a few minutes on 2 cores)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    parser.add_argument("--only", nargs="*", default=None, choices=SECTIONS)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")  # files only
    import jax  # after benchmarks/__init__ pinned OpenBLAS to one thread

    from benchmarks import adaptive_kfac, continuum, layers, sr_accuracy, sr_timing, structured_sr, trust_region, vmc

    try:
        from benchmarks import kfac
    except ImportError as err:  # benchmarks/kfac.py is optional for this runner
        kfac = None
        print(f"[kfac] benchmarks.kfac not importable ({err}); the K-FAC rows are skipped.")

    sections = [s for s in (args.only or SECTIONS) if s not in args.skip]
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = f"jax {jax.__version__}"
    for peer in ("netket", "kfac-jax"):
        # the installed version without importing: importing NetKet turns on float64 (jax_enable_x64)
        # for the whole process, which would run every later "float32" section in float64
        try:
            versions += f", {peer} {importlib.metadata.version(peer)}"
        except importlib.metadata.PackageNotFoundError as err:
            versions += f", {peer} absent ({type(err).__name__})"
    header = f"fishr benchmarks ({'quick' if args.quick else 'full'} preset), {stamp}, {machine()}, {versions}, float32"
    print(header, flush=True)
    report, tables = {"header": header, "sections": {}}, [f"# {header}"]
    t_start = time.time()

    def section(name, title, fn):
        t0 = time.time()
        print(f"\n== {title}", flush=True)
        result, table = fn()
        report["sections"][name] = {"result": result, "seconds": time.time() - t0}
        tables.extend([f"## {title}", table])
        print(table, flush=True)

    if "sr_timing" in sections:
        def do():
            rows = sr_timing.run(quick=args.quick)
            sr_timing.plot(rows, os.path.join(args.out, "sr_timing.png"))
            return rows, (f"median ms per call (min-max over {rows[0]['repeats']} interleaved repetitions); "
                          f"CG: {sr_timing.CG_ITERS} iterations; damping {sr_timing.DAMPING}; TFIM L={sr_timing.LENGTH}"
                          " samples\n\n" + sr_timing.markdown(rows))
        section("sr_timing", "SR time per call (ms)", do)
    for name, title, module, png in (
        ("vmc", "VMC convergence (same ansatz, samples, step budget)", vmc, "vmc_energy.png"),
        ("hydrogen", "Continuum VMC: hydrogen atom (E0 = -0.5 Ha)", continuum, "hydrogen_energy.png"),
    ):
        if name in sections:
            def do(module=module, png=png):
                rows = module.run(quick=args.quick)
                vmc.plot(rows, os.path.join(args.out, png))
                return rows, vmc.markdown(rows)
            section(name, title, do)
    if "structured_sr" in sections:
        def do():
            rows = structured_sr.run(quick=args.quick, out_dir=args.out)
            return rows, structured_sr._markdown(rows)
        section("structured_sr", "Exact SR per call, structured vs generic vs NetKet (ms)", do)
    if "kfac" in sections and kfac is not None:
        def do():
            result = kfac.run(quick=args.quick)
            return result, "```\n" + kfac.format_table(result) + "\n```"
        section("kfac", "K-FAC: teacher-MLP regression", do)
    if "adaptive_kfac" in sections:
        def do():
            result = adaptive_kfac.run(quick=args.quick)
            return result, "```\n" + adaptive_kfac.format_table(result) + "\n```"
        section("adaptive_kfac", "Adaptive K-FAC (no learning rate) vs kfac-jax's adaptive mode", do)
    if "trust_region" in sections:
        def do():
            result = trust_region.run("quick" if args.quick else "full")
            return result, trust_region.markdown(result)
        section("trust_region", "Trust-region SR vs hand-tuned SR learning rates", do)
    if "layers" in sections:
        def do():
            result = layers.run("quick" if args.quick else "full")
            return result, "```\n" + layers.format_report(result) + "\n```"
        section("layers", "Captured conv and attention layers: CNN K-FAC vs kfac-jax, ViT SR vs NetKet", do)
    if "sr_accuracy" in sections:
        def do():
            rows = sr_accuracy.run(quick=args.quick)
            return rows, (f"damping {sr_accuracy.DAMPING}; error = max|x - x_ref| / max|x_ref| against an exact "
                          "float64 eigendecomposition; times in s (first call) and ms (warm, median and min-max)\n\n"
                          + sr_accuracy.markdown(rows))
        section("sr_accuracy", "Sample-space SR accuracy, fishr vs NetKet srt", do)

    report["seconds"] = time.time() - t_start
    text = "\n\n".join(tables) + f"\n\n(total {report['seconds']:.0f} s)\n"
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(report, fh, indent=1, default=float)
    print("\n" + "=" * 80 + "\n" + text)
    print(f"Tables: {os.path.join(os.path.abspath(args.out), 'summary.md')}")
    print(f"Raw numbers: {os.path.join(os.path.abspath(args.out), 'summary.json')}")
    print("Plots: " + ", ".join(os.path.join(os.path.abspath(args.out), f) for f in sorted(os.listdir(args.out))
                                if f.endswith(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
