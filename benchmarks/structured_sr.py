"""Structured exact SR vs the generic Jacobian path vs NetKet, side by side in one run.

For MLP log-psi models (tanh, Flax ``nn.Dense``) and synthetic local energies
``e``, every method computes the same exact SR update

    x = (S + damping)^{-1} g,  g = 2 Obar^T (e - mean e) / N
      = Obar^T (Obar Obar^T + N damping)^{-1} 2 (e - mean e)

(NetKet's ``srt_onthefly`` form), and the results are checked against each other
before anything is timed. Columns (median ms per call over ``--repeats`` calls
after a warm-up, with min-max):

* ``fishr structured``: ``fishr.sr_solve(mode="sample_space", jacobian="structured")``;
* ``fishr generic``: the same with the explicit per-sample Jacobian;
* ``fishr lazy``: ``mode="lazy"`` (CG, ``--cg-iters`` iterations);
* ``netket srt_onthefly``: ``netket._src.ngd.srt_onthefly`` with a Cholesky solve;
* ``netket QGTOnTheFly``: ``QGTOnTheFly(...).solve(cg)`` with the same iterations;
* ``bound``: ``N^3 / (3 peak) + stats``: the Cholesky of the ``N x N`` kernel at the
  matrix-multiply peak measured in this run, plus one forward+backward pass
  (the captured statistics), the least a sample-space method that factors the
  kernel in the working precision can cost. fishr's float64 path on the CPU
  factors in float32 and refines in float64 (same accuracy), so in float64 it
  can come in under this bound.
* ``work``: ``bound`` plus the kernel's products at the same peak, ``N (N + 1) c`` flops
  with ``c`` the multiply-adds per pair of samples of ``fishr.jacobian.kernel_cost_per_pair``
  (per layer the cheaper exact form: ``k_l + m_l`` for its two Gram products ``a a^T`` and
  ``d d^T`` on and below the diagonal, ``k_l`` the input width with its bias and ``m_l`` the
  output width, or ``k_l m_l`` through its per-sample gradients; ``N^2 P`` through the
  explicit Jacobian):
  the least a method that forms the kernel from the layers' statistics, the cheapest
  exact route, and factors it can cost. Where ``work`` exceeds twice ``bound`` (the
  float32 MLP 32-200-200-1 at ``N = 1,024``), no such method comes within 2x of ``bound``.
* ``floor``: measured, not computed: the captured statistics, the kernel
  ``sum_l (a_l a_l^T) * (d_l d_l^T)`` by plain products and the backend's Cholesky
  of the ``N x N`` kernel (``jnp.linalg.cholesky``), jitted as one program: what any
  sample-space method that forms and factors the kernel with the standard operations
  pays before its solve. ``chol`` is that Cholesky alone. At ``N = 1,024`` both sit far
  above ``bound``: LAPACK's Cholesky of that size runs well below the GEMM peak, and
  forming the kernel (``N^2`` times the layers' widths) costs about as much as factoring
  it; ``bound`` leaves both out.

Run: ``python -m benchmarks.structured_sr [--quick] [--f64]``. NetKet is optional
(``pip install -e ".[bench]"``); without it its columns are skipped.
``OPENBLAS_NUM_THREADS`` defaults to 1 (``benchmarks/__init__.py``); ``OPENBLAS_NUM_THREADS=2 python -m
benchmarks.structured_sr`` lets LAPACK's Cholesky (every method's) use two
cores, faster on an idle machine and far slower on a busy one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

# OPENBLAS_NUM_THREADS defaults to 1 (benchmarks/__init__.py): threaded OpenBLAS makes the
# N x N Cholesky (LAPACK, used by every exact sample-space method here) up to ~70x slower
# on a loaded 2-core machine.
import numpy as np

GRID_QUICK = [(1024, (16, 64, 64))]
GRID_FULL = [(1024, (16, 64, 64)), (4096, (16, 64, 64)), (1024, (32, 200, 200)), (4096, (32, 200, 200))]


def _median_ms(fn, repeats):
    import jax

    jax.block_until_ready(fn())  # warm-up (compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1e3 * (time.perf_counter() - t0))
    return float(np.median(times)), float(min(times)), float(max(times))


def _peak_gflops(dtype, repeats):
    import jax

    n = 2048
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    mm = jax.jit(lambda a: a @ a)
    _med, lo, _ = _median_ms(lambda: mm(a), repeats)
    return 2 * n**3 / (lo * 1e-3) / 1e9  # best of the repeats: the machine's peak


def run(quick: bool = True, f64: bool = False, repeats: int = 5, cg_iters: int = 100, out_dir: str | None = None):
    import jax

    if f64:
        jax.config.update("jax_enable_x64", True)
    import flax.linen as nn
    import jax.numpy as jnp

    import fishr
    from fishr.capture import augment_bias, capture, discover_layers
    from fishr.jacobian import kernel_cost_per_pair

    try:
        import netket as nk
        from netket._src.ngd.srt_onthefly import srt_onthefly
        from netket.optimizer.qgt.qgt_onthefly import QGTOnTheFly_DefaultConstructor
    except Exception as err:  # optional peer
        nk = None
        print(f"[structured_sr] NetKet not available ({type(err).__name__}: {err}); its columns are skipped.")

    dtype = jnp.float64 if f64 else jnp.float32
    damping = 1e-3
    peak = _peak_gflops(dtype, repeats)
    print(f"[structured_sr] {jnp.dtype(dtype).name}, jax {jax.__version__}, matmul peak {peak:.0f} GFLOP/s")

    class MLP(nn.Module):
        widths: tuple

        @nn.compact
        def __call__(self, x):
            for w in self.widths:
                x = nn.tanh(nn.Dense(w, param_dtype=dtype)(x))
            return nn.Dense(1, param_dtype=dtype)(x)[..., 0]

    rows = []
    for n, (d_in, *widths) in (GRID_QUICK if quick else GRID_FULL):
        model = MLP(tuple(widths))
        x = jax.random.normal(jax.random.PRNGKey(1), (n, d_in), dtype)
        params = model.init(jax.random.PRNGKey(0), x)
        p_count = sum(p.size for p in jax.tree.leaves(params))
        energies = jax.random.normal(jax.random.PRNGKey(2), (n,), dtype)
        _, vjp = jax.vjp(lambda p: model.apply(p, x), params)
        (grad,) = vjp(2 * (energies - energies.mean()) / n)
        print(f"[structured_sr] N={n} P={p_count} ...", flush=True)

        def fishr_fn(mode, jacobian, **kw):
            return jax.jit(lambda g, p, s: fishr.sr_solve(model.apply, g, p, s, damping=damping, mode=mode,
                                                         jacobian=jacobian, **kw)[0])

        methods = {
            "fishr structured": partial(fishr_fn("sample_space", "structured"), grad, params, x),
            "fishr generic": partial(fishr_fn("sample_space", "generic"), grad, params, x),
            "fishr lazy": partial(fishr_fn("lazy", "generic", solver=fishr.CG(rtol=0.0, max_steps=cg_iters)), grad,
                                  params, x),
        }
        stats = jax.jit(lambda p, s: capture(model.apply, p, s)[2:4])

        def kernel_and_factor(p, s):  # the floor: statistics, kernel by plain products, LAPACK Cholesky
            captured = capture(model.apply, p, s)
            kernel = 0
            for a, d in zip(captured.inputs, captured.output_grads):
                a = augment_bias(a.reshape(n, -1), True)
                d = d.reshape(n, -1)
                kernel = kernel + (a @ a.T) * (d @ d.T)
            return jnp.linalg.cholesky(kernel + n * damping * jnp.eye(n, dtype=dtype))

        floor = partial(jax.jit(kernel_and_factor), params, x)
        spd = jnp.eye(n, dtype=dtype) * 2 + 0.01
        chol = partial(jax.jit(jnp.linalg.cholesky), spd)
        if nk is not None:
            srt = jax.jit(lambda p, s, e: srt_onthefly(  # returns (updates, old_updates, info)
                model.apply, e, p["params"], {}, s, diag_shift=damping,
                solver_fn=nk.optimizer.solver.cholesky, mode="real")[0])
            methods["netket srt_onthefly"] = partial(srt, params, x, energies)

            def qgt_solve(p, s, g):
                qgt = QGTOnTheFly_DefaultConstructor(
                    model.apply, p["params"], {}, s, diag_shift=damping)
                cg = partial(jax.scipy.sparse.linalg.cg, tol=0.0, maxiter=cg_iters)
                return qgt.solve(cg, g["params"])[0]

            methods["netket QGTOnTheFly"] = partial(jax.jit(qgt_solve), params, x, grad)

        # Same inputs, same update: check before timing.
        reference = np.concatenate([np.ravel(l) for l in jax.tree.leaves(methods["fishr structured"]())])
        agree = {}
        for name in ("fishr generic", "netket srt_onthefly"):
            if name in methods:
                out = methods[name]()  # NetKet's trees lack the outer "params" key; leaf order is the same
                flat = np.concatenate([np.ravel(l) for l in jax.tree.leaves(out)])
                agree[name] = float(np.linalg.norm(flat - reference) / np.linalg.norm(reference))
        print(f"[structured_sr]   relative difference to fishr structured: {agree}")

        row = {"N": n, "P": p_count, "dtype": jnp.dtype(dtype).name, "agreement": agree}
        for name, fn in methods.items():
            row[name] = _median_ms(fn, repeats)
            print(f"[structured_sr]   {name:22s} {row[name][0]:9.1f} ms", flush=True)
        stats_ms = _median_ms(partial(stats, params, x), repeats)[0]
        row["bound"] = n**3 / 3 / (peak * 1e9) * 1e3 + stats_ms
        pair_cost = kernel_cost_per_pair(discover_layers(model.apply, params, x), p_count)  # multiply-adds
        row["work"] = row["bound"] + n * (n + 1) * pair_cost / (peak * 1e9) * 1e3
        row["floor"] = _median_ms(floor, repeats)
        row["chol"] = _median_ms(chol, repeats)
        print(f"[structured_sr]   floor (stats, kernel, LAPACK Cholesky) {row['floor'][0]:.1f} ms, Cholesky alone "
              f"{row['chol'][0]:.1f} ms, bound {row['bound']:.1f} ms, work {row['work']:.1f} ms", flush=True)
        exact_peers = [row[k][0] for k in ("netket srt_onthefly",) if k in row]
        if exact_peers:
            row["structured / netket fastest exact"] = row["fishr structured"][0] / min(exact_peers)
        rows.append(row)

    table = _markdown(rows)
    print(table)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        tag = "f64" if f64 else "f32"
        with open(os.path.join(out_dir, f"structured_sr_{tag}.json"), "w") as fh:
            json.dump({"peak_gflops": peak, "jax": jax.__version__, "rows": rows}, fh, indent=1)
        with open(os.path.join(out_dir, f"structured_sr_{tag}.md"), "w") as fh:
            fh.write(table + "\n")
    return rows


def _markdown(rows):
    cols = ["fishr structured", "fishr generic", "fishr lazy", "netket srt_onthefly", "netket QGTOnTheFly"]
    head = ("| N | P | dtype | " + " | ".join(cols)
            + " | bound | work | floor (measured) | chol | structured / bound | structured / work | structured / floor"
            + " | structured / NetKet srt |")
    lines = [head, "|" + "---|" * (len(cols) + 11)]
    for r in rows:
        cells = [f"{r[c][0]:.1f}" if c in r else "n/a" for c in cols]
        ratio = f"{r['structured / netket fastest exact']:.2f}x" if "structured / netket fastest exact" in r else "n/a"
        lines.append(f"| {r['N']} | {r['P']} | {r['dtype']} | " + " | ".join(cells)
                     + f" | {r['bound']:.1f} | {r['work']:.1f} | {r['floor'][0]:.1f} | {r['chol'][0]:.1f}"
                     + f" | {r['fishr structured'][0] / r['bound']:.2f}x | {r['fishr structured'][0] / r['work']:.2f}x"
                     + f" | {r['fishr structured'][0] / r['floor'][0]:.2f}x | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the MLP 16-64-64-1 at N=1024")
    parser.add_argument("--f64", action="store_true", help="float64 (default float32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cg-iters", type=int, default=100)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    run(quick=args.quick, f64=args.f64, repeats=args.repeats, cg_iters=args.cg_iters, out_dir=args.out)


if __name__ == "__main__":
    sys.exit(main())
