"""``python -m benchmarks [--quick]``: every benchmark side by side, results to ``benchmarks/results/``.

Sections: (1) VMC convergence on the Ising chain, (2) exact SR per call, structured
vs generic vs NetKet, (3) K-FAC step time and loss vs kfac-jax and Adam. Each
section prints a Markdown table; all tables and the raw numbers (JSON) are
written to the output folder, with a plot of the VMC energies.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small preset (a few minutes on 2 cores)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["vmc", "structured_sr", "kfac"])
    args = parser.parse_args(argv)

    import jax  # after benchmarks/__init__ pinned OpenBLAS to one thread

    from benchmarks import kfac, structured_sr, vmc

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"fishr benchmarks ({'quick' if args.quick else 'full'}), {stamp}, "
              f"{platform.processor() or platform.machine()} x{os.cpu_count()}, jax {jax.__version__}")
    print(header, flush=True)
    report, tables = {"header": header}, [f"# {header}"]
    t_start = time.time()

    if "vmc" not in args.skip:
        rows = vmc.run(quick=args.quick)
        report["vmc"] = rows
        tables += ["## VMC convergence, transverse-field Ising chain", vmc.markdown(rows)]
        _plot_vmc(rows, os.path.join(args.out, "vmc_energy.png"))
    if "structured_sr" not in args.skip:
        rows = structured_sr.run(quick=args.quick, out_dir=args.out)
        report["structured_sr"] = rows
        tables += ["## Exact SR per call (ms)", structured_sr._markdown(rows)]
    if "kfac" not in args.skip:
        result = kfac.run(quick=args.quick)
        report["kfac"] = result
        tables += ["## K-FAC", kfac.format_table(result)]

    report["seconds"] = time.time() - t_start
    text = "\n\n".join(tables) + f"\n\n(total {report['seconds']:.0f} s)\n"
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(report, fh, indent=1, default=float)
    print("\n" + text)
    print(f"Results, tables and plots in {os.path.abspath(args.out)}")
    return 0


def _plot_vmc(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        err = np.abs(np.asarray(r["energies"]) - r["exact"]) / abs(r["exact"])
        ax.semilogy(err, label=r["method"])
    ax.set_xlabel("step")
    ax.set_ylabel("|E - E0| / |E0|")
    ax.set_title(f"TFIM L={rows[0]['length']}, RBM")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
