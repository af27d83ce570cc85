"""Sample-space SR accuracy and cost, fishr vs NetKet's ``srt``, against an exact reference.

For each workload (the vision transformer of issue 19, P = 17,345; an MLP 16-64-64-64-1;
an RBM on 64 spins, alpha 2), random +-1 samples, parameters perturbed from the
initialisation by 0.1 N(0, 1) and synthetic local energies ``E ~ N(-10, 3^2)``, every
method computes

    x = Obar^T (Obar Obar^T / N + damping)^{-1} c,   c = 2 (E - <E>) / N,

the SR update of the VMC force ``g = Obar^T c``, and is compared with the same formula
evaluated in float64 by an eigendecomposition of the kernel. The error is
``max |x - x_ref| / max |x_ref|``. Columns:

* ``fishr``: ``fishr.sr_solve(mode="sample_space", local_energies=E)`` with the default
  ``jacobian="auto"`` (the recommended VMC call);
* ``fishr generic`` / ``fishr structured``: the same with the Jacobian form forced
  (``auto / generic warm``: the default's warm time over the generic form's);
* ``fishr g-only``: the call from the gradient alone (Woodbury form, divides by the damping);
* ``netket srt`` / ``netket srt_onthefly``: NetKet 3.23's ``srt`` (explicit Jacobian,
  Cholesky) and ``srt_onthefly`` with ``solver_fn=cholesky``, on the same inputs.

Times: the first call (trace + compile + run) and the median warm call (min-max over
``--repeats``), for ``fishr`` and ``netket srt``, measured in this process.

``--matmul-precision`` sets fishr's ``matmul_precision`` (default ``"highest"``; ``none``
leaves JAX's setting, TF32 products on recent NVIDIA GPUs); NetKet runs at JAX's setting
(``JAX_DEFAULT_MATMUL_PRECISION`` changes both). The header names the device.

Run: ``python -m benchmarks.sr_accuracy [--quick] [--repeats R] [--matmul-precision P]``; writes
``benchmarks/results/sr_accuracy.{md,json}``. NetKet is optional (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

QUICK = [("ViT", 256), ("MLP", 1024), ("RBM", 1024)]
FULL = [("ViT", 256), ("ViT", 1024), ("ViT", 4096), ("MLP", 256), ("MLP", 1024), ("MLP", 4096),
        ("RBM", 256), ("RBM", 1024), ("RBM", 4096)]
DAMPING = 1e-3


def _model(name, dtype):
    from benchmarks.spin_chains import MLP, RBM
    from benchmarks.vit import ViT

    if name == "ViT":
        return ViT(param_dtype=dtype), 64
    if name == "MLP":
        return MLP(widths=(64, 64, 64), param_dtype=dtype), 16
    return RBM(alpha=2, param_dtype=dtype), 64


def _problem(name, n):
    """float64 parameters, samples, local energies, and the exact reference update."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    model, sites = _model(name, jnp.float64)
    s = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(1), 0.5, (n, sites)), 1.0, -1.0)
    params = model.init(jax.random.PRNGKey(0), s[:2])
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(3), p.shape, p.dtype), params)
    flat, unravel = ravel_pytree(params)
    o = np.asarray(jax.jit(jax.vmap(jax.grad(lambda f, x: model.apply(unravel(f), x[None])[0]), (None, 0)))(flat, s))
    ob = o - o.mean(0)
    energies = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (n,)) * 3.0 - 10.0)
    c = 2 * (energies - energies.mean()) / n
    w, v = np.linalg.eigh(ob @ ob.T / n)
    ref = ob.T @ (v @ ((v.T @ c) / (w + DAMPING)))
    grad = unravel(jnp.asarray(ob.T @ c))
    return model, params, s, energies, grad, ref, (float(w.min()), float(w.max())), flat.size


def _time(fn, repeats):
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        warm.append(time.perf_counter() - t0)
    return out, first, (float(np.median(warm)), float(min(warm)), float(max(warm)))


def run(quick: bool = True, repeats: int = 3, log=print, netket: bool = True, matmul_precision="highest"):
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import fishr
    from benchmarks.vmc import netket_available

    jax.config.update("jax_enable_x64", True)
    have_nk = netket_available(netket, log, "[sr_accuracy]")
    rows = []
    for name, n in (QUICK if quick else FULL):
        model, params, s, energies, grad, ref, eig, p_count = _problem(name, n)
        for dtype in (jnp.float64, jnp.float32):
            cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)
            p_dt, g_dt, s_dt, e_dt = cast(params), cast(grad), s.astype(dtype), jnp.asarray(energies, dtype)
            err = lambda x: float(np.abs(np.asarray(ravel_pytree(x)[0], np.float64) - ref).max() / np.abs(ref).max())
            row = {"workload": name, "N": n, "P": p_count, "dtype": jnp.dtype(dtype).name, "kernel eig": eig}

            def fishr_call(jacobian="auto", energies=True):
                f = jax.jit(lambda g, p, x, e: fishr.sr_solve(
                    model.apply, g, p, x, damping=DAMPING, mode="sample_space", jacobian=jacobian,
                    local_energies=e if energies else None, matmul_precision=matmul_precision)[0])
                return lambda: f(g_dt, p_dt, s_dt, e_dt)

            x, first, warm = _time(fishr_call(), repeats)
            row["fishr"], row["fishr first s"], row["fishr warm s"] = err(x), first, warm
            x, _, warm = _time(fishr_call(jacobian="generic"), repeats)
            row["fishr generic"], row["fishr / generic warm"] = err(x), row["fishr warm s"][0] / warm[0]
            for label, kw in (("fishr structured", dict(jacobian="structured")),
                              ("fishr g-only", dict(energies=False))):
                row[label] = err(jax.block_until_ready(fishr_call(**kw)()))
            if have_nk:
                import netket as nk
                from netket._src.ngd.sr_srt_common import srt
                from netket._src.ngd.srt_onthefly import srt_onthefly

                inner = p_dt["params"]
                chol = nk.optimizer.solver.cholesky
                # srt is jitted by NetKet itself (and breaks under an outer jit)
                x, first, warm = _time(lambda: {"params": srt(model.apply, e_dt, inner, {}, s_dt, diag_shift=DAMPING,
                                                              solver_fn=chol, mode="real")[0]}, repeats)
                row["netket srt"], row["netket srt first s"], row["netket srt warm s"] = err(x), first, warm
                otf = jax.jit(lambda p, x, e: srt_onthefly(model.apply, e, p, {}, x, diag_shift=DAMPING,
                                                           solver_fn=chol, mode="real")[0])
                row["netket srt_onthefly"] = err({"params": jax.block_until_ready(otf(inner, s_dt, e_dt))})
                best = min(row["netket srt"], row["netket srt_onthefly"])
                row["fishr / netket error"] = row["fishr"] / best
                row["fishr / netket first call"] = row["fishr first s"] / row["netket srt first s"]
                row["fishr / netket warm"] = row["fishr warm s"][0] / row["netket srt warm s"][0]
            log(f"[sr_accuracy] {name} N={n} {row['dtype']}: fishr {row['fishr']:.1e}"
                + (f", netket srt {row['netket srt']:.1e}" if have_nk else ""))
            rows.append(row)
    return rows


def markdown(rows) -> str:
    nk = "netket srt" in rows[0]
    head = ["workload", "N", "P", "dtype", "fishr", "fishr generic", "fishr structured", "fishr g-only"]
    if nk:
        head += ["netket srt", "netket srt_onthefly", "fishr / netket error"]
    head += ["fishr first s", "fishr warm ms", "auto / generic warm"]
    if nk:
        head += ["netket srt first s", "netket srt warm ms", "first-call ratio", "warm ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["workload"], f"{r['N']:,}", f"{r['P']:,}", r["dtype"]]
        cells += [f"{r[k]:.1e}" for k in ("fishr", "fishr generic", "fishr structured", "fishr g-only")]
        if nk:
            cells += [f"{r['netket srt']:.1e}", f"{r['netket srt_onthefly']:.1e}", f"{r['fishr / netket error']:.2f}x"]
        w = r["fishr warm s"]
        cells += [f"{r['fishr first s']:.2f}", f"{1e3 * w[0]:.0f} ({1e3 * w[1]:.0f}-{1e3 * w[2]:.0f})",
                  f"{r['fishr / generic warm']:.2f}x"]
        if nk:
            w = r["netket srt warm s"]
            cells += [f"{r['netket srt first s']:.2f}", f"{1e3 * w[0]:.0f} ({1e3 * w[1]:.0f}-{1e3 * w[2]:.0f})",
                      f"{r['fishr / netket first call']:.2f}x", f"{r['fishr / netket warm']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--matmul-precision", default="highest",
                        help="fishr's matmul_precision ('none' for JAX's setting: TF32 products on recent GPUs)")
    args = parser.parse_args(argv)
    precision = None if args.matmul_precision.lower() == "none" else args.matmul_precision
    rows = run(quick=args.quick, repeats=args.repeats, matmul_precision=precision)
    table = markdown(rows)
    head = (f"damping {DAMPING}; error = max|x - x_ref| / max|x_ref| (exact float64 eigh reference); "
            f"{device_label()}; fishr matmul_precision={precision!r}; "
            f"JAX_DEFAULT_MATMUL_PRECISION={os.environ.get('JAX_DEFAULT_MATMUL_PRECISION')!r}")
    report(args.out, "sr_accuracy", head, table, rows)


def device_label() -> str:
    """``jax <version> on <platform> (<device kind>)`` of the first device, for the benchmarks' headers."""
    import jax

    device = jax.devices()[0]
    return f"jax {jax.__version__} on {device.platform} ({device.device_kind})"


def report(out: str, stem: str, head: str, table: str, rows) -> None:
    """Print ``head`` and ``table``; write them to ``out/stem.md`` and ``rows`` to ``out/stem.json``."""
    print(head)
    print(table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.md"), "w") as fh:
        fh.write(f"{head}\n\n{table}\n")
    with open(os.path.join(out, f"{stem}.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
