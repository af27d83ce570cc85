"""fishr.kfac vs kfac_jax.Optimizer vs optax.adam on a teacher-MLP regression, side by side in one run.

The task (generated here, deterministic): inputs ``x ~ N(0, I_16)``, targets from a
fixed random tanh teacher MLP 16-128-128-1; the student is an MLP of width 128
with 3 dense layers (16-128-128-1, tanh), loss ``0.5 mean (f(x) - y)^2`` (a unit-variance
Gaussian likelihood), batches of 256 drawn in a fixed order from a data set of
8,192 samples, float32.

Every optimizer takes one full training step per call (loss, gradient,
preconditioner, parameter update) from the same initial parameters:

* ``fishr.kfac``: ``optax.chain(fishr.kfac(..., likelihood="gaussian"), optax.sgd(lr))``
  inside the user's ``jax.jit`` step (true Fisher with sampled targets, pi damping,
  Cholesky inverses, the bias-corrected EMA 0.95: fishr's defaults);
* ``fishr.kfac seed EMA``: the same with the seed's EMA rule (``ema_debias=False``:
  first update replaces, then ``ema * old + (1 - ema) * new``);
* ``kfac_jax.Optimizer``: the same learning rate, damping, EMA and inverse period,
  ``estimation_mode="fisher_gradients"`` (sampled targets), no adaptive learning
  rate / momentum / damping; its ``step`` is jitted by kfac-jax itself;
* ``optax.adam``.

Timing: after a warm-up call (compilation), each repetition times ``steps_per_rep``
consecutive steps (``block_until_ready`` at the end); the methods are interleaved
repetition by repetition so that machine noise hits them alike. Reported: the
median time per step over repetitions and its spread (min, max), and the loss on
the whole data set after ``train_steps`` steps.

kfac-jax is optional (0.0.8 needs jax 0.9.1): if it cannot be imported its row
is skipped with the reason. Run ``python -m benchmarks.kfac [--full]``; set
``OPENBLAS_NUM_THREADS=1`` in the environment when calling :func:`run` from a
process that imported NumPy already (``benchmarks/__init__.py`` sets it, which
takes effect only before NumPy is loaded).
"""

from __future__ import annotations

# One OpenBLAS thread (benchmarks/__init__.py sets it before this module runs): on a busy
# 2-core machine, OpenBLAS's threaded small LAPACK calls (the 129 x 129 Cholesky solves of
# every K-FAC method here) run up to 100x slower than single-threaded ones; it applies to all
# three optimizers alike.
import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import fishr

IN, WIDTH, OUT = 16, 128, 1
BATCH, DATA = 256, 8192


class MLP(nn.Module):
    features: tuple = (WIDTH, WIDTH, OUT)

    @nn.compact
    def __call__(self, x):
        for k, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if k < len(self.features) - 1:
                x = jnp.tanh(x)
        return x


def make_task(seed: int = 0):
    """Teacher-MLP regression data ``(x, y)`` of ``DATA`` samples and the student's initial parameters."""
    kx, kt, ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (DATA, IN), jnp.float32)
    teacher = MLP()
    y = teacher.apply(teacher.init(kt, x[:1]), x)
    student = MLP()
    return student, student.init(ks, x[:1]), (x, y)


def batch_at(data, step: int):
    start = (step * BATCH) % DATA
    return jax.tree.map(lambda a: a[start : start + BATCH], data)


def mse(model, params, batch):
    x, y = batch
    return 0.5 * jnp.mean(jnp.sum((model.apply(params, x) - y) ** 2, axis=-1))


# --------------------------------------------------------------------------- optimizers as step functions


def optax_runner(model, params, data, opt: optax.GradientTransformation, needs_batch: bool):
    """``step(carry, batch) -> carry`` of an optax optimizer inside one user ``jax.jit``."""

    @jax.jit
    def step(carry, batch):
        p, s = carry
        grads = jax.grad(lambda q: mse(model, q, batch))(p)
        extra = {"batch": batch} if needs_batch else {}
        updates, s = opt.update(grads, s, p, **extra)
        return optax.apply_updates(p, updates), s

    return (params, opt.init(params)), step, lambda carry: carry[0]


def kfac_jax_runner(model, params, data, lr: float, damping: float, inverse_every: int):
    import kfac_jax  # optional

    def loss_fn(p, batch):
        x, y = batch
        pred = model.apply(p, x)
        # kfac-jax's squared-error loss is sum (pred - y)^2 with a variance-1/2 Gaussian's curvature;
        # weight 0.5 gives 0.5 |pred - y|^2, the unit-variance Gaussian fishr uses (same Fisher, same scale).
        kfac_jax.register_squared_error_loss(pred, y, weight=0.5)
        return 0.5 * jnp.mean(jnp.sum((pred - y) ** 2, axis=-1))

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn),
        l2_reg=0.0,
        use_adaptive_learning_rate=False,
        use_adaptive_momentum=False,
        use_adaptive_damping=False,
        learning_rate_schedule=lambda step: lr,
        momentum_schedule=lambda step: 0.0,
        damping_schedule=lambda step: damping,
        curvature_ema=0.95,
        inverse_update_period=inverse_every,
        estimation_mode="fisher_gradients",
        multi_device=False,
    )
    rng = jax.random.PRNGKey(42)
    state = opt.init(params, rng, batch_at(data, 0))
    counter = {"k": 0}

    def step(carry, batch):
        p, s = carry
        counter["k"] += 1
        p, s, _ = opt.step(p, s, jax.random.fold_in(rng, counter["k"]), batch=batch, global_step_int=counter["k"])
        return p, s

    return (params, state), step, lambda carry: carry[0]


def _block(tree):
    jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)


def run(quick: bool = True) -> dict:
    """Train and time the three optimizers side by side; returns a JSON-able dict of results."""
    train_steps, reps, steps_per_rep = (100, 5, 10) if quick else (400, 11, 20)
    lr_kfac, lr_adam, damping, inverse_every = 0.1, 1e-3, 1e-3, 1
    model, params0, data = make_task()
    fresh = lambda: jax.tree.map(jnp.copy, params0)
    methods: dict[str, Callable[[], Any]] = {
        "fishr.kfac": lambda: optax_runner(
            model, fresh(), data,
            optax.chain(
                fishr.kfac(model.apply, damping, likelihood="gaussian", inverse_every=inverse_every,
                           example_batch=batch_at(data, 0)),
                optax.sgd(lr_kfac),
            ),
            needs_batch=True,
        ),
        "fishr.kfac seed EMA": lambda: optax_runner(
            model, fresh(), data,
            optax.chain(
                fishr.kfac(model.apply, damping, likelihood="gaussian", inverse_every=inverse_every,
                           ema_debias=False, example_batch=batch_at(data, 0)),
                optax.sgd(lr_kfac),
            ),
            needs_batch=True,
        ),
        "kfac_jax.Optimizer": lambda: kfac_jax_runner(model, fresh(), data, lr_kfac, damping, inverse_every),
        "optax.adam": lambda: optax_runner(model, fresh(), data, optax.adam(lr_adam), needs_batch=False),
    }
    results: dict[str, dict] = {name: {} for name in methods}
    runners = {}
    for name, make in methods.items():
        try:
            carry, step, get_params = make()  # each runner gets its own copy: kfac-jax donates its inputs
        except ImportError as err:
            results[name] = {"skipped": f"not importable: {err}"}
            continue
        except Exception as err:  # kfac-jax on an unsupported jax version fails at init or first step
            results[name] = {"skipped": f"{type(err).__name__}: {err}"}
            continue
        try:
            carry = step(carry, batch_at(data, 0))  # warm-up: compilation
            _block(carry)
        except Exception as err:
            results[name] = {"skipped": f"{type(err).__name__}: {err}"}
            continue
        runners[name] = [carry, step, get_params, 1]

    # Loss after the same number of steps (the warm-up step counts as step 1).
    for name, r in runners.items():
        carry, step, get_params, done = r
        for k in range(done, train_steps):
            carry = step(carry, batch_at(data, k))
        _block(carry)
        results[name].update(loss_after=float(mse(model, get_params(carry), data)), train_steps=train_steps)
        r[0], r[3] = carry, train_steps

    # Step times, interleaved repetition by repetition.
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _rep in range(reps):
        for name, r in runners.items():
            carry, step, _, done = r
            batches = [batch_at(data, done + k) for k in range(steps_per_rep)]
            _block(batches)
            t0 = time.perf_counter()
            for b in batches:
                carry = step(carry, b)
            _block(carry)
            times[name].append((time.perf_counter() - t0) / steps_per_rep)
            r[0], r[3] = carry, done + steps_per_rep
    for name, ts in times.items():
        results[name].update(
            median_step_ms=1e3 * statistics.median(ts), min_step_ms=1e3 * min(ts), max_step_ms=1e3 * max(ts),
            repetitions=reps, steps_per_repetition=steps_per_rep,
        )
    base = results.get("fishr.kfac", {}).get("median_step_ms")
    for name in times:
        if base:
            results[name]["step_time_vs_fishr_kfac"] = results[name]["median_step_ms"] / base
    return {
        "task": f"teacher-MLP regression, MLP {IN}-{WIDTH}-{WIDTH}-{OUT}, batch {BATCH}, float32",
        "settings": dict(lr_kfac=lr_kfac, lr_adam=lr_adam, damping=damping, inverse_every=inverse_every, ema=0.95),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "results": results,
    }


def format_table(report: dict) -> str:
    lines = [report["task"], f"jax {report['jax']} on {report['device']}", "",
             f"{'method':<22} {'median ms/step':>15} {'(min-max)':>17} {'vs fishr':>9} {'loss':>11}"]
    for name, r in report["results"].items():
        if "skipped" in r:
            lines.append(f"{name:<22} skipped: {r['skipped']}")
            continue
        spread = f"({r['min_step_ms']:.2f}-{r['max_step_ms']:.2f})"
        lines.append(
            f"{name:<22} {r['median_step_ms']:>15.2f} {spread:>17} "
            f"{r.get('step_time_vs_fishr_kfac', float('nan')):>9.2f} "
            f"{r['loss_after']:>11.3e}"
        )
    lines.append(
        f"(loss on all {DATA} samples after "
        f"{next(iter(r['train_steps'] for r in report['results'].values() if 'train_steps' in r))} steps)"
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more steps and repetitions")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    report = run(quick=not args.full)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
