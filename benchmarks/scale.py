"""Exact SR at scale: time (first call included) and peak memory, fishr against NetKet, per process.

Every workload runs in a fresh Python process, so that its peak resident set size (RSS,
``VmHWM`` on Linux; device memory statistics on accelerators) is its own and the first
call pays its whole compile. The parent polls the child's RSS and stops it when it
passes ``--budget-gb`` ("over budget") or runs past ``--time-limit`` ("time limit"), so
the machine never swaps. For each tool the table gives, per problem: first call (trace,
compile and one solve), one warm call, peak RSS, and at the end the largest problem it
solved under the budget. Warm calls: the median and min-max of 3 in the same process.

The problem: an MLP ``log psi`` (16 inputs, three tanh ``Dense`` layers of width ``w``,
one output; ``w = 512`` is ``P = 534,529``), ``N`` Gaussian samples and synthetic local
energies; every tool computes the same exact SR update
``x = Obar^T (Obar Obar^T + N damping)^{-1} 2 (e - mean e)`` (damping 1e-3):

* ``fishr``: ``fishr.sr_solve(mode="sample_space", local_energies=e)`` with its default
  (structured) Jacobian, no chunking;
* ``fishr chunked``: the same with ``chunk_size=--chunk``;
* ``netket srt_onthefly``: ``netket._src.ngd.srt_onthefly`` with ``chunk_size=--chunk`` and
  a Cholesky solve (NetKet's memory-bounded MinSR; optional, ``pip install -e ".[bench]"``).

Run: ``python -m benchmarks.scale [--quick]`` (quick: ``N`` up to 1,024, ``w = 64``, a
minute); the full preset is ``N = 4,096 ... 16,384`` at ``w = 128`` (``P = 35,329``) and
``w = 512`` (``P = 534,529``) in float32, chunks of 256, tens of minutes on 2 cores. Results go to
``benchmarks/results/scale_{quick,full}.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

TOOLS = ("fishr", "fishr chunked", "netket srt_onthefly")
QUICK = {"sizes": (256, 1024), "widths": (64,), "chunk": 256, "time_limit": 300.0}
FULL = {"sizes": (4096, 8192, 16384), "widths": (128, 512), "chunk": 256, "time_limit": 900.0}


def num_params(width: int, d_in: int = 16) -> int:
    """Parameters of the MLP ``d_in -> width -> width -> width -> 1`` with biases."""
    return d_in * width + width + 2 * (width * width + width) + width + 1


# --------------------------------------------------------------------------- one workload (child process)


def worker(tool: str, n: int, width: int, chunk: int, f64: bool, repeats: int = 3) -> dict:
    """Build the problem, time the first call and ``repeats`` warm calls of ``tool``; returns the measurements."""
    import jax

    if f64:
        jax.config.update("jax_enable_x64", True)
    import flax.linen as nn
    import jax.numpy as jnp

    dtype = jnp.float64 if f64 else jnp.float32
    damping = 1e-3

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(3):
                x = nn.tanh(nn.Dense(width, param_dtype=dtype)(x))
            return nn.Dense(1, param_dtype=dtype)(x)[..., 0]

    model = MLP()
    x = jax.random.normal(jax.random.PRNGKey(1), (n, 16), dtype)
    params = model.init(jax.random.PRNGKey(0), x[:2])
    energies = jax.random.normal(jax.random.PRNGKey(2), (n,), dtype)
    grads = jax.tree.map(jnp.zeros_like, params)  # the energies define the force; grads only give the residual

    if tool.startswith("fishr"):
        import fishr

        kw = {"chunk_size": chunk} if tool == "fishr chunked" else {}
        solve = jax.jit(lambda p, s, e: fishr.sr_solve(model.apply, grads, p, s, damping=damping, mode="sample_space",
                                                       local_energies=e, **kw)[0])
    elif tool == "netket srt_onthefly":
        import netket as nk
        from netket._src.ngd.srt_onthefly import srt_onthefly

        solve = jax.jit(lambda p, s, e: srt_onthefly(model.apply, e, p["params"], {}, s, diag_shift=damping,
                                                     solver_fn=nk.optimizer.solver.cholesky, mode="real",
                                                     chunk_size=chunk)[0])
    else:
        raise ValueError(f"unknown tool {tool!r}; expected one of {TOOLS}")
    t0 = time.perf_counter()
    out = jax.block_until_ready(solve(params, x, energies))
    first = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(solve(params, x, energies))
        warm.append(time.perf_counter() - t0)
    device_peak = None
    stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
    if stats:
        device_peak = stats.get("peak_bytes_in_use")
    norm = float(sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in jax.tree.leaves(out)) ** 0.5)
    return {"first_s": first, "warm_s": float(np.median(warm)), "warm_min_s": min(warm), "warm_max_s": max(warm),
            "device_peak_bytes": device_peak, "update_norm": norm,
            "finite": bool(jnp.isfinite(norm))}


# --------------------------------------------------------------------------- parent: processes and budget


def _rss_peak_bytes(pid: int) -> int:
    """The process's peak resident set size so far (``VmHWM``), 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(tool: str, n: int, width: int, chunk: int, f64: bool, budget_bytes: float, time_limit: float) -> dict:
    """Run one workload in a child process under the memory budget and time limit."""
    cmd = [sys.executable, "-m", "benchmarks.scale", "--worker", tool, str(n), str(width), str(chunk)]
    if f64:
        cmd.append("--f64")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, status = 0, None
    while True:  # reap with wait4 ourselves: its rusage holds the child's exact peak RSS
        pid, wait_status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, _rss_peak_bytes(child.pid))
        if peak > budget_bytes:
            status = "over budget"
        elif time.perf_counter() - t0 > time_limit:
            status = "time limit"
        if status:
            child.kill()
            _, wait_status, usage = os.wait4(child.pid, 0)
            break
        time.sleep(0.1)
    child.returncode = os.waitstatus_to_exitcode(wait_status)
    peak = max(peak, usage.ru_maxrss * 1024)
    stdout, stderr = child.communicate()
    row = {"tool": tool, "N": n, "P": num_params(width), "chunk": chunk, "dtype": "float64" if f64 else "float32",
           "peak_rss_gb": peak / 2**30, "wall_s": time.perf_counter() - t0}
    if status is None:
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if child.returncode == 0 and lines:
            row.update(json.loads(lines[-1]))
            status = "ok" if row["finite"] else "non-finite"
        else:
            missing = "ModuleNotFoundError" in stderr
            status = (
                "not installed" if missing
                else f"failed ({stderr.strip().splitlines()[-1][:80] if stderr else child.returncode})"
            )
    row["status"] = status
    return row


def largest_under_budget(rows: list, tool: str):
    """``(N, P)`` of the largest problem ``tool`` solved (status ok) in these rows, or ``None``."""
    solved = [(r["N"] * r["P"], r["N"], r["P"]) for r in rows if r["tool"] == tool and r["status"] == "ok"]
    return max(solved)[1:] if solved else None


def markdown(rows: list, budget_gb: float) -> str:
    lines = ["| tool | N | P | chunk | first call (s) | warm call (s), median (min-max) | peak RSS (GiB) | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        first = f"{r['first_s']:.1f}" if "first_s" in r else "-"
        warm = f"{r['warm_s']:.2f} ({r['warm_min_s']:.2f}-{r['warm_max_s']:.2f})" if "warm_s" in r else "-"
        chunk = r["chunk"] if r["tool"] != "fishr" else "-"
        lines.append(f"| {r['tool']} | {r['N']:,} | {r['P']:,} | {chunk} | {first} | {warm} | "
                     f"{r['peak_rss_gb']:.2f} | {r['status']} |")
    lines.append("")
    lines.append(f"Largest problem solved under {budget_gb:g} GiB peak RSS:")
    for tool in dict.fromkeys(r["tool"] for r in rows):
        best = largest_under_budget(rows, tool)
        lines.append(f"- {tool}: " + ("none" if best is None else f"N = {best[0]:,}, P = {best[1]:,}"))
    return "\n".join(lines)


def run(quick: bool = True, sizes=None, widths=None, chunk=None, tools=TOOLS, f64: bool = False,
        budget_gb: float = 8.0, time_limit=None, out_dir=None) -> list:
    preset = QUICK if quick else FULL
    sizes = preset["sizes"] if sizes is None else sizes
    widths = preset["widths"] if widths is None else widths
    chunk = preset["chunk"] if chunk is None else chunk
    time_limit = preset["time_limit"] if time_limit is None else time_limit
    rows = []
    for width in widths:
        for tool in tools:
            for n in sizes:
                row = measure(tool, n, width, chunk, f64, budget_gb * 2**30, time_limit)
                rows.append(row)
                print(f"[scale] {tool:20s} N={n:6d} P={row['P']:,} first={row.get('first_s', float('nan')):7.1f}s "
                      f"warm={row.get('warm_s', float('nan')):7.2f}s peak RSS={row['peak_rss_gb']:.2f} GiB "
                      f"{row['status']}", flush=True)
                if row["status"] in ("not installed", "over budget", "time limit"):  # larger N cannot do better
                    break
    table = markdown(rows, budget_gb)
    print(table)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        tag = "quick" if quick else "full"
        with open(os.path.join(out_dir, f"scale_{tag}.json"), "w") as fh:
            json.dump({"budget_gb": budget_gb, "rows": rows}, fh, indent=1)
        with open(os.path.join(out_dir, f"scale_{tag}.md"), "w") as fh:
            fh.write(table + "\n")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small preset (about a minute)")
    parser.add_argument("--f64", action="store_true", help="float64 (default float32)")
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="N values (default: the preset's)")
    parser.add_argument("--widths", type=int, nargs="*", default=None, help="MLP widths (512: P = 534,529)")
    parser.add_argument("--chunk", type=int, default=None, help="chunk_size of the chunked tools")
    parser.add_argument("--tools", nargs="*", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--budget-gb", type=float, default=8.0, help="peak RSS budget per process (GiB)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per process")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--worker", nargs=4, metavar=("TOOL", "N", "WIDTH", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        tool, n, width, chunk = args.worker
        print(json.dumps(worker(tool, int(n), int(width), int(chunk), args.f64)), flush=True)
        return 0
    run(args.quick, args.sizes, args.widths, args.chunk, tuple(args.tools), args.f64, args.budget_gb,
        args.time_limit, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
