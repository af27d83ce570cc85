"""The cost and the accuracy of ``matmul_precision``: fishr's default ``"highest"`` against ``None`` (JAX's).

On recent NVIDIA GPUs JAX's default float32 product rounds its factors to TF32 (TPUs: to
bfloat16). Every fishr preconditioner traces its products at ``matmul_precision="highest"``
by default; this benchmark measures, in one process, what that buys and costs:

* **SR** (``fishr.sr_solve(mode="sample_space", local_energies=...)``, float32) on the
  workloads of :mod:`benchmarks.sr_accuracy` (a vision transformer, an MLP, an RBM): the
  error ``max |x - x_ref| / max |x_ref|`` against the exact float64 update, the first call
  (trace, compile and run) and the warm call (median and range over interleaved rounds);
* **K-FAC** (``fishr.kfac``, Gaussian likelihood, empirical Fisher so that both runs see
  the same labels): the float32 step against the float64 step of the same method, for an
  MLP and a two-convolution CNN, and the warm step.

Each row runs ``"highest"`` and ``None`` on the same inputs; ``highest / None`` is the
ratio of the warm medians. On a CPU both settings compute the same products (the
errors agree); the differences appear on GPUs and TPUs. The first calls are each the
first of its program in the process; on a GPU the ``"highest"`` one includes XLA's GEMM
autotuning of the new product shapes (run ``highest`` first or second with ``--order``).

Run: ``python -m benchmarks.precision [--preset tiny|quick] [--rounds R] [--order highest-first|none-first]``;
writes ``benchmarks/results/precision.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

PRESETS = {
    # (workload, N) for SR; (model, batch, width) for K-FAC
    "tiny": {"sr": [("RBM", 64)], "kfac": [("MLP", 32, 16), ("CNN", 8, 4)]},
    "quick": {"sr": [("ViT", 256), ("ViT", 1024), ("MLP", 4096), ("RBM", 1024)],
              "kfac": [("MLP", 1024, 512), ("CNN", 256, 32)]},
}
SETTINGS = ("highest", None)


def _timed(fns, rounds):
    """Each setting's result and first call (s), then its warm calls (median, min, max ms) over
    ``rounds`` interleaved rounds (:func:`benchmarks.sr_timing.time_interleaved`)."""
    from benchmarks.sr_timing import time_interleaved

    out, first = {}, {}
    for key, f in fns.items():
        t0 = time.perf_counter()
        out[key] = f()
        first[key] = time.perf_counter() - t0
    return out, first, time_interleaved(fns, rounds, warm_up=False)


def _row(kind, label, errors, first, warm, order):
    row = {"kind": kind, "workload": label}
    for k in order:
        name = "None" if k is None else k
        row[f"error {name}"] = errors[k]
        row[f"first {name} s"] = first[k]
        row[f"warm {name} ms"] = list(warm[k])
    row["highest / None warm"] = warm["highest"][0] / warm[None][0]
    return row


def sr_rows(points, rounds, order, log=print):
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import fishr
    from benchmarks.sr_accuracy import DAMPING, _problem

    rows = []
    for name, n in points:
        model, params, s, energies, grad, ref, _, p_count = _problem(name, n)
        cast = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
        args = (cast(grad), cast(params), s.astype(jnp.float32), jnp.asarray(energies, jnp.float32))
        fns = {}
        for prec in order:
            solve = jax.jit(lambda g, p, x, e, prec=prec: fishr.sr_solve(
                model.apply, g, p, x, damping=DAMPING, mode="sample_space", local_energies=e,
                matmul_precision=prec)[0])
            fns[prec] = lambda solve=solve: jax.block_until_ready(solve(*args))
        out, first, warm = _timed(fns, rounds)
        errors = {k: float(np.abs(np.asarray(ravel_pytree(x)[0], np.float64) - ref).max() / np.abs(ref).max())
                  for k, x in out.items()}
        rows.append(_row("SR sample_space", f"{name} N = {n:,}, P = {p_count:,}", errors, first, warm, order))
        log(f"[precision] {rows[-1]}")
    return rows


def kfac_models(name, width):
    """The K-FAC workloads: (model class of a param dtype, input shape of one sample).

    ``MLP``: tanh, three hidden layers of ``width``, 10 outputs, 256 inputs; ``CNN``: two
    3x3 convolutions of ``width`` channels (the second of stride 2), a dense layer of
    ``8 width``, 10 outputs, 16x16x3 inputs."""
    import flax.linen as nn
    import jax.numpy as jnp

    class MLP(nn.Module):
        dtype: object = jnp.float32

        @nn.compact
        def __call__(self, x):
            for _ in range(3):
                x = jnp.tanh(nn.Dense(width, param_dtype=self.dtype, dtype=self.dtype)(x))
            return nn.Dense(10, param_dtype=self.dtype, dtype=self.dtype)(x)

    class CNN(nn.Module):
        dtype: object = jnp.float32

        @nn.compact
        def __call__(self, x):
            conv = lambda f, s: nn.Conv(f, (3, 3), strides=s, param_dtype=self.dtype, dtype=self.dtype)
            x = nn.relu(conv(width, 1)(x))
            x = nn.relu(conv(width, 2)(x))
            x = nn.relu(nn.Dense(8 * width, param_dtype=self.dtype, dtype=self.dtype)(x.reshape(x.shape[0], -1)))
            return nn.Dense(10, param_dtype=self.dtype, dtype=self.dtype)(x)

    return {"MLP": (MLP, (256,)), "CNN": (CNN, (16, 16, 3))}[name]


def kfac_rows(points, rounds, order, log=print):
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import fishr

    rows = []
    for name, batch, width in points:
        cls, shape = kfac_models(name, width)
        rng = np.random.default_rng(0)
        x64 = jnp.asarray(rng.standard_normal((batch, *shape)))
        y64 = jnp.asarray(rng.standard_normal((batch, 10)))
        p64 = jax.jit(cls(jnp.float64).init)(jax.random.key(0), x64[:2])

        def step(dtype, prec):
            model = cls(dtype)
            cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)
            params, x, y = cast(p64), x64.astype(dtype), y64.astype(dtype)
            loss = lambda p: 0.5 * jnp.mean(jnp.sum((model.apply(p, x) - y) ** 2, -1))
            tx = fishr.kfac(model.apply, 1e-3, likelihood="gaussian", fisher="empirical", example_batch=(x, y),
                            matmul_precision=prec)
            grads = jax.jit(jax.grad(loss))(params)
            state = tx.init(params)
            update = jax.jit(lambda g, s, p, x, y: tx.update(g, s, p, batch=(x, y))[0])
            return lambda: jax.block_until_ready(update(grads, state, params, x, y))

        ref = np.asarray(ravel_pytree(step(jnp.float64, None)())[0], np.float64)
        out, first, warm = _timed({prec: step(jnp.float32, prec) for prec in order}, rounds)
        errors = {k: float(np.abs(np.asarray(ravel_pytree(u)[0], np.float64) - ref).max() / np.abs(ref).max())
                  for k, u in out.items()}
        count = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(p64))
        label = f"{name} width {width}, batch {batch:,}, P = {count:,}"
        rows.append(_row("K-FAC step", label, errors, first, warm, order))
        log(f"[precision] {rows[-1]}")
    return rows


def run(preset: str = "quick", rounds: int = 15, order=SETTINGS, log=print) -> list:
    """Every row of ``preset``: SR, then K-FAC (float64 enabled for the references)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    points = PRESETS[preset]
    return sr_rows(points["sr"], rounds, order, log) + kfac_rows(points["kfac"], rounds, order, log)


def markdown(rows) -> str:
    lines = ["| method | workload | error `highest` / `None` | first call `highest` / `None` | "
             "warm `highest` / `None` (median, min-max) | highest / None warm |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        w_h, w_n = r["warm highest ms"], r["warm None ms"]
        lines.append(f"| {r['kind']} | {r['workload']} | {r['error highest']:.1e} / {r['error None']:.1e} | "
                     f"{r['first highest s']:.2f} / {r['first None s']:.2f} s | "
                     f"{w_h[0]:.2f} ({w_h[1]:.2f}-{w_h[2]:.2f}) / {w_n[0]:.2f} ({w_n[1]:.2f}-{w_n[2]:.2f}) ms | "
                     f"{r['highest / None warm']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved warm rounds")
    parser.add_argument("--order", choices=("highest-first", "none-first"), default="highest-first",
                        help="which setting's program is compiled (and autotuned) first in the process")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    order = SETTINGS if args.order == "highest-first" else SETTINGS[::-1]
    rows = run(args.preset, args.rounds, order)
    from benchmarks.sr_accuracy import device_label, report

    head = f"float32 against float64; {device_label()}; {args.rounds} interleaved warm rounds; order {args.order}"
    report(args.out, "precision", head, markdown(rows), rows)


if __name__ == "__main__":
    main()
