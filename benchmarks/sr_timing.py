"""SR step time: fishr lazy / dense / sample_space vs NetKet's QGTs and SRt, side by side at identical inputs.

For each grid point (a model with ``P`` parameters, ``N`` samples of the TFIM
chain, their local energies ``e``) every method computes the same update

    x = (S + damping I)^{-1} g,   S = Obar^T Obar / N,   g = 2 Re Obar^H (e - mean e) / N

(NetKet's ``diag_shift`` is fishr's ``damping``: both normalise ``S`` by ``N``).
Methods, each jitted and called on the same arrays:

* ``fishr auto``: ``fishr.sr_solve()`` with the default ``mode="auto"``; the table gives its
  time over the fastest exact fishr mode (dense Cholesky, sample_space) and over every
  fishr mode (the CG columns stop after a fixed number of iterations, so they are not
  the same solve), and a third table times ``auto`` against the fastest exact mode alone,
  interleaved over 31 rounds (issue 12's check: within 1.1x), and a fourth each generic
  fishr mode against its NetKet twin in the same way (lazy / ``QGTOnTheFly``, dense CG /
  ``QGTJacobianDense``, dense Cholesky / ``QGTJacobianDense`` with Cholesky, sample_space /
  ``SRt``);
* ``fishr lazy``: ``fishr.sr_solve(mode="lazy")`` (CG, ``jax.linearize``, no Jacobian);
* ``fishr dense cg`` / ``fishr dense chol``: per-sample Jacobian, CG / ``P x P`` Cholesky;
* ``fishr sample_space``: ``N x N`` Cholesky (``jacobian="auto"``: for these Flax Dense
  models, the structured kernel from captured layer statistics) and
  ``fishr sample_space generic`` (explicit per-sample Jacobian rows);
* ``netket QGTOnTheFly`` / ``netket QGTJacobianDense``: ``QGT(...).solve(cg)``;
* ``netket QGTJacobianDense chol``: the same with ``netket.optimizer.solver.cholesky``;
* ``netket SRt``: ``netket._src.ngd.sr_srt_common.srt`` (what ``VMC_SR(use_ntk=True)`` runs:
  dense Jacobian, ``N x N`` Cholesky) and ``netket srt_onthefly`` (its Jacobian-free variant);
* ``jacobian``: the bare per-sample Jacobian ``vmap(grad)`` (``N x P``), and ``gradient``: one
  plain VJP of ``log psi``, the lower bounds.

Every CG runs a fixed number of iterations from ``x0 = 0`` (fishr ``CG(rtol=0, max_steps=cg_iters,
initial_guess="zeros")``, NetKet's ``tol = 0, maxiter = cg_iters`` and its default ``x0``) in both
libraries, so that per-call times compare the same work. Before timing, each result is compared
with a float64 NumPy solve of the same system (the column ``rel. err`` in the JSON and the
printed check); that first call of each method is timed on its own (trace, compile and run: the
``first_s`` of each row and the second table). Timing: then ``repeats`` rounds in which every
method is called once, interleaved so that machine noise hits all alike; the median and the
min-max spread are reported, in milliseconds.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import fishr
from benchmarks.spin_chains import MLP, RBM, local_energies, random_spins
from benchmarks.vmc import energy_gradient, netket_available

# (N samples, model description); P follows from the model. Chain length 16 throughout.
LENGTH = 16
GRIDS = {
    "tiny": [(128, ("rbm", 2))],  # one point: the notebook test runs it
    "quick": [(256, ("rbm", 16)), (1024, ("rbm", 4)), (2048, ("rbm", 1)), (512, ("mlp-complex", 64))],
    "full": [(256, ("rbm", 16)), (1024, ("rbm", 16)), (512, ("rbm", 64)), (1024, ("rbm", 4)),
             (4096, ("rbm", 4)), (2048, ("rbm", 1)), (8192, ("rbm", 1)),
             (512, ("mlp-complex", 64)), (2048, ("mlp-complex", 64))],
}
DAMPING, CG_ITERS = 1e-3, 50
# the fishr modes that solve exactly (the CG columns stop after CG_ITERS iterations); mode="auto" picks among these
EXACT_FISHR = ("fishr dense chol", "fishr sample_space", "fishr sample_space generic")
AUTO_PAIRED_REPEATS = 31  # the auto check: auto and the fastest exact mode alone, interleaved, this many rounds
AUTO_TARGET = 1.1  # issue 12: auto within 1.1x of the fastest exact fishr mode at every grid point
# issue 12: each generic fishr mode at or below its NetKet twin (same solve, same tolerance), checked in pairs
TWINS = (("fishr lazy", "netket QGTOnTheFly"), ("fishr dense cg", "netket QGTJacobianDense"),
         ("fishr dense chol", "netket QGTJacobianDense chol"), ("fishr sample_space", "netket SRt"))
DENSE_CHOL_MAX_P = {"tiny": 2000, "quick": 2000, "full": 5000}  # P x P Cholesky beyond: slow, not a sensible choice
COLUMNS = ["gradient", "jacobian", "fishr auto", "fishr lazy", "fishr dense cg", "fishr dense chol",
           "fishr sample_space", "fishr sample_space generic", "netket QGTOnTheFly", "netket QGTJacobianDense",
           "netket QGTJacobianDense chol", "netket SRt", "netket srt_onthefly"]


def make_model(spec, dtype=jnp.float32):
    kind, size = spec
    if kind == "rbm":
        return RBM(alpha=size, param_dtype=dtype), f"RBM alpha={size}"
    if kind == "mlp-complex":
        return MLP(widths=(size, size), complex_output=True, param_dtype=dtype), f"MLP {size}-{size} complex"
    raise ValueError(spec)


def inputs(spec, n, seed=0, dtype=jnp.float32):
    """Model, parameters, samples, local energies and gradient of one grid point (``dtype``: float32 or
    float64, which needs ``jax_enable_x64``)."""
    model, label = make_model(spec, dtype)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    s = random_spins(k1, n, LENGTH, dtype=dtype)
    params = model.init(k2, s)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(k2, p.shape, p.dtype), params)  # off the init point
    e_loc = jax.jit(lambda p, s: local_energies("ising", model.apply, p, s))(params, s)
    _, grad = jax.jit(lambda p, s, e: energy_gradient(model.apply, p, s, e))(params, s, e_loc)
    return model, label, params, s, e_loc, grad


def reference_solution(model, params, s, grad):
    """float64 NumPy solve of ``(S + damping) x = g`` from the float32 Jacobian (real parameters)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    one = lambda p, x: model.apply(unravel(p), x[None])[0]
    jac = np.asarray(jax.jit(jax.vmap(lambda x: jax.jacrev(lambda p: jnp.stack([jnp.real(one(p, x)),
                                                                           jnp.imag(one(p, x))]))(flat)))(s),
                     np.float64)  # (N, 2, P)
    jac = jac - jac.mean(axis=0)
    n = jac.shape[0]
    o = jac.reshape(-1, jac.shape[-1])
    g = np.asarray(jax.flatten_util.ravel_pytree(grad)[0], np.float64)
    if o.shape[1] <= 6000:
        x = np.linalg.solve(o.T @ o / n + DAMPING * np.eye(o.shape[1]), g)
    else:  # Woodbury in sample space, exact as well
        x = (g - o.T @ np.linalg.solve(n * DAMPING * np.eye(o.shape[0]) + o @ o.T, o @ g)) / DAMPING
    return x


def methods(model, params, s, e_loc, grad, have_nk: bool, dense_chol_max_p: int = 5000):
    """name -> zero-argument callable returning the update as a flat vector."""
    flat = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
    p_count = flat(params).size
    apply = model.apply
    out = {}

    def fishr_fn(**kw):
        return partial(jax.jit(lambda g, p, x: flat(fishr.sr_solve(apply, g, p, x, damping=DAMPING, **kw)[0])),
                       grad, params, s)

    one = lambda p, x: apply(p, x[None])[0]
    jac = jax.jit(jax.vmap(lambda x: jax.grad(lambda p: jnp.real(one(p, x)))(params), in_axes=0))
    if jnp.iscomplexobj(e_loc):  # both parts of the complex score: what every complex-mode method needs
        jac = jax.jit(jax.vmap(lambda x: jax.jacrev(lambda p: jnp.stack([jnp.real(one(p, x)),
                                                                        jnp.imag(one(p, x))]))(params)))
    out["gradient"] = partial(jax.jit(lambda p, x, e: flat(energy_gradient(apply, p, x, e)[1])), params, s, e_loc)
    out["jacobian"] = partial(lambda x: jac(x), s)
    cg = fishr.CG(rtol=0.0, max_steps=CG_ITERS, initial_guess="zeros")  # x0 = 0 as NetKet: the same iterates
    out["fishr lazy"] = fishr_fn(mode="lazy", solver=cg)
    out["fishr dense cg"] = fishr_fn(mode="dense", solver=cg)
    if p_count <= dense_chol_max_p:
        out["fishr dense chol"] = fishr_fn(mode="dense", solver=fishr.Cholesky())
    out["fishr sample_space"] = fishr_fn(mode="sample_space")
    out["fishr sample_space generic"] = fishr_fn(mode="sample_space", jacobian="generic")
    out["fishr auto"] = fishr_fn()  # the default, mode="auto"
    if not have_nk:
        return out

    import netket as nk
    from netket._src.ngd.sr_srt_common import srt
    from netket._src.ngd.srt_onthefly import srt_onthefly
    from netket.optimizer.qgt.qgt_jacobian import QGTJacobian_DefaultConstructor
    from netket.optimizer.qgt.qgt_onthefly import QGTOnTheFly_DefaultConstructor

    mode = "complex" if jnp.iscomplexobj(e_loc) else "real"
    inner, g_inner = params["params"], grad["params"]
    nk_cg = partial(jax.scipy.sparse.linalg.cg, tol=0.0, maxiter=CG_ITERS)

    def qgt(constructor, solver, **kw):
        def solve(p, x, g):
            q = constructor(apply, p, {}, x, diag_shift=DAMPING, **kw)
            return flat(q.solve(solver, g)[0])
        return partial(jax.jit(solve), inner, s, g_inner)

    out["netket QGTOnTheFly"] = qgt(QGTOnTheFly_DefaultConstructor, nk_cg)
    out["netket QGTJacobianDense"] = qgt(QGTJacobian_DefaultConstructor, nk_cg, dense=True, mode=mode)
    if p_count <= dense_chol_max_p:
        out["netket QGTJacobianDense chol"] = qgt(QGTJacobian_DefaultConstructor, nk.optimizer.solver.cholesky,
                                                  dense=True, mode=mode)
    # srt is jitted by NetKet itself (and breaks under an outer jit); only the ravel is outside it
    out["netket SRt"] = partial(lambda p, x, e: flat(srt(
        apply, e, p, {}, x, diag_shift=DAMPING, solver_fn=nk.optimizer.solver.cholesky, mode=mode)[0]),
        inner, s, e_loc)
    out["netket srt_onthefly"] = partial(jax.jit(lambda p, x, e: flat(srt_onthefly(
        apply, e, p, {}, x, diag_shift=DAMPING, solver_fn=nk.optimizer.solver.cholesky, mode=mode)[0])),
        inner, s, e_loc)
    return out


def time_interleaved(fns: dict, repeats: int, warm_up: bool = True) -> dict:
    """Warm up each callable (unless the caller did), then ``repeats`` interleaved rounds;
    name -> (median, min, max) ms."""
    for fn in fns.values() if warm_up else ():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: (float(np.median(t)), float(np.min(t)), float(np.max(t))) for name, t in times.items()}


def _paired(fns: dict, ours: str, theirs: str) -> dict:
    """``ours`` and ``theirs`` alone, interleaved over ``AUTO_PAIRED_REPEATS`` rounds: their (median, min, max) ms
    and the ratio of the medians and of the fastest calls."""
    pair = time_interleaved({ours: fns[ours], theirs: fns[theirs]}, AUTO_PAIRED_REPEATS, warm_up=False)
    return dict(ours_ms=pair[ours], theirs_ms=pair[theirs], ratio=pair[ours][0] / pair[theirs][0],
                ratio_fastest=pair[ours][1] / pair[theirs][1])


def _ms(t) -> str:
    """``median (min-max)`` ms, one decimal below 100 ms."""
    return f"{t[0]:.1f} ({t[1]:.1f}-{t[2]:.1f})" if t[0] < 100 else f"{t[0]:.0f} ({t[1]:.0f}-{t[2]:.0f})"


def run(quick: bool = True, preset: str | None = None, repeats: int | None = None, log=print, netket: bool = True,
        dtype=jnp.float32):
    """Time every method at every grid point of the preset; returns the list of rows."""
    preset = preset or ("quick" if quick else "full")
    repeats = repeats or {"tiny": 3, "quick": 7, "full": 11}[preset]
    have_nk = netket_available(netket, log, "[sr_timing]")
    rows = []
    for n, spec in GRIDS[preset]:
        model, label, params, s, e_loc, grad = inputs(spec, n, dtype=dtype)
        p_count = sum(p.size for p in jax.tree.leaves(params))
        log(f"[sr_timing] {label}, N={n}, P={p_count} "
            f"({'N << P' if 4 * n <= p_count else 'N >> P' if n >= 4 * p_count else 'N ~ P'}) ...",
            flush=True)
        fns = methods(model, params, s, e_loc, grad, have_nk, DENSE_CHOL_MAX_P[preset])
        ref = reference_solution(model, params, s, grad)
        errors, first = {}, {}
        for name, fn in fns.items():  # each method's first call: trace, compile and run
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn())
            first[name] = time.perf_counter() - t0
            if name not in ("gradient", "jacobian"):
                x = np.asarray(out, np.float64)
                errors[name] = float(np.linalg.norm(x - ref) / np.linalg.norm(ref))
        log("[sr_timing]   relative error vs float64 solve: "
            + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
        timings = time_interleaved(fns, repeats, warm_up=False)
        row = dict(model=label, N=n, P=p_count, complex=bool(jnp.iscomplexobj(e_loc)), repeats=repeats,
                   cg_iters=CG_ITERS, damping=DAMPING, errors=errors, ms=timings, first_s=first)
        nk_times = [timings[k][0] for k in timings if k.startswith("netket")]
        fishr_times = [timings[k][0] for k in timings if k.startswith("fishr")]
        row["fishr fastest"] = min(timings[k][0] for k in timings if k.startswith("fishr"))
        row["fishr fastest / jacobian"] = row["fishr fastest"] / timings["jacobian"][0]
        exact = [timings[k][0] for k in EXACT_FISHR if k in timings]
        row["auto / fastest exact fishr"] = timings["fishr auto"][0] / min(exact)
        row["auto / fastest fishr"] = timings["fishr auto"][0] / min(
            timings[k][0] for k in timings if k.startswith("fishr") and k != "fishr auto")
        # the auto check: with ~15 methods per round a 3 ms call's median over 7 rounds is noisy, so
        # auto and the fastest exact mode are timed again alone, interleaved, 31 rounds
        best = min((k for k in EXACT_FISHR if k in timings), key=lambda k: timings[k][0])
        row["auto check"] = dict(against=best, repeats=AUTO_PAIRED_REPEATS, **_paired(fns, "fishr auto", best))
        # the same pairing for the NetKet twins
        row["twins"] = {ours: dict(netket=theirs, **_paired(fns, ours, theirs))
                        for ours, theirs in TWINS if ours in fns and theirs in fns}
        if nk_times:
            row["netket fastest"] = min(nk_times)
            row["fishr fastest / netket fastest"] = min(fishr_times) / min(nk_times)
        rows.append(row)
        log("[sr_timing]   " + ", ".join(f"{k} {v[0]:.1f}" for k, v in timings.items()) + " ms", flush=True)
    return rows


def markdown(rows) -> str:
    cols = [c for c in COLUMNS if any(c in r["ms"] for r in rows)]
    short = {c: c.replace("netket ", "nk ").replace("QGTJacobianDense", "QGTJacDense")
             .replace("sample_space", "sample_sp.") for c in cols}
    head = ("| model | N | P | " + " | ".join(short[c] for c in cols)
            + " | auto / best exact fishr | auto / best fishr | fishr best / jacobian | fishr best / NetKet best |")
    lines = [head, "|" + "---|" * (len(cols) + 7)]
    for r in rows:
        cells = []
        best_f = r["fishr fastest"]
        for c in cols:
            if c not in r["ms"]:
                cells.append("-")
                continue
            med, lo, hi = r["ms"][c]
            cell = f"{med:.1f} ({lo:.1f}-{hi:.1f})" if med < 100 else f"{med:.0f} ({lo:.0f}-{hi:.0f})"
            cells.append(f"**{cell}**" if c.startswith("fishr") and med == best_f else cell)
        ratio_nk = f"{r['fishr fastest / netket fastest']:.2f}x" if "fishr fastest / netket fastest" in r else "n/a"
        lines.append(f"| {r['model']} | {r['N']} | {r['P']} | " + " | ".join(cells)
                     + f" | {r['auto / fastest exact fishr']:.2f}x | {r['auto / fastest fishr']:.2f}x"
                     + f" | {r['fishr fastest / jacobian']:.2f}x | {ratio_nk} |")
    if all("auto check" in r for r in rows):
        lines += ["", f"`mode=\"auto\"` against the fastest exact fishr mode of the table, the two alone, "
                  f"{AUTO_PAIRED_REPEATS} interleaved rounds (target: within {AUTO_TARGET}x):", "",
                  "| model | N | P | fastest exact mode | auto ms | that mode ms | ratio of medians (fastest calls) | "
                  "within target |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            a = r["auto check"]
            lines.append(f"| {r['model']} | {r['N']} | {r['P']} | {a['against'].replace('fishr ', '')} | "
                         f"{_ms(a['ours_ms'])} | {_ms(a['theirs_ms'])} | {a['ratio']:.2f}x ({a['ratio_fastest']:.2f}x) "
                         f"| {'yes' if a['ratio'] <= AUTO_TARGET else 'NO'} |")
    if any(r.get("twins") for r in rows):
        lines += ["", f"Each fishr mode against its NetKet twin (the same solve: CG for {CG_ITERS} iterations, or the "
                  f"Cholesky solve), the two alone, {AUTO_PAIRED_REPEATS} interleaved rounds (target: at or below 1x):",
                  "", "| model | N | P | fishr | NetKet | fishr ms | NetKet ms | ratio of medians (fastest calls) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            for ours, t in r.get("twins", {}).items():
                lines.append(f"| {r['model']} | {r['N']} | {r['P']} | {ours.replace('fishr ', '')} | "
                             f"{t['netket'].replace('netket ', '')} | {_ms(t['ours_ms'])} | {_ms(t['theirs_ms'])} | "
                             f"{t['ratio']:.2f}x ({t['ratio_fastest']:.2f}x) |")
    if all("first_s" in r for r in rows):
        lines += ["", "First call (trace, compile and run), seconds, one call per method and grid point:", "",
                  "| model | N | P | " + " | ".join(short[c] for c in cols) + " |", "|" + "---|" * (len(cols) + 3)]
        for r in rows:
            lines.append(f"| {r['model']} | {r['N']} | {r['P']} | "
                         + " | ".join(f"{r['first_s'][c]:.2f}" if c in r["first_s"] else "-" for c in cols) + " |")
    return "\n".join(lines)


def plot(rows, path=None):
    """Median ms per call of every method at each grid point (log scale), spread as error bars.

    Saves to ``path`` (and closes the figure) or, with ``path=None``, returns the figure (notebooks).
    """
    import matplotlib.pyplot as plt

    cols = [c for c in COLUMNS if any(c in r["ms"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(rows)), 4.5))
    width = 0.8 / len(cols)
    cmap = plt.get_cmap("tab20")
    for j, c in enumerate(cols):
        xs, med, lo, hi = [], [], [], []
        for i, r in enumerate(rows):
            if c in r["ms"]:
                m, a, b = r["ms"][c]
                xs.append(i + (j - len(cols) / 2) * width)
                med.append(m)
                lo.append(m - a)
                hi.append(b - m)
        ax.bar(xs, med, width, yerr=[lo, hi], label=c, color=cmap(j), hatch="//" if c.startswith("netket") else None)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['model']}\nN={r['N']} P={r['P']}" for r in rows], fontsize=7)
    ax.set_ylabel("ms per call (median, min-max)")
    ax.set_title(f"SR solve, float32, damping {DAMPING}, CG {CG_ITERS} iterations")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    """``python -m benchmarks.sr_timing [--preset P] [--dtype float64]``: the SR tables, printed."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(GRIDS), default="quick")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    rows = run(preset=args.preset, dtype=jnp.dtype(args.dtype))
    print(f"{args.dtype}, damping {DAMPING}, CG {CG_ITERS} iterations, TFIM L={LENGTH} samples\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
