"""Captured layers at work: K-FAC on a CNN (vs kfac-jax, Adam) and sample-space SR on a ViT (vs NetKet).

:mod:`fishr.capture` finds the layers of an unmodified Flax model: ``nn.Conv`` (as input
patches, one position per output pixel), ``nn.Dense``, ``nn.DenseGeneral`` with any axes
(attention's projections) and LayerNorm / RMSNorm (K-FAC diagonal blocks). This benchmark
runs the two workloads that need the new kinds, side by side with the peer libraries, in one
process, and prints :func:`fishr.capture.format_report` for both models (what is captured,
``T`` = positions per sample).

(a) CNN classification, fixed step sizes (no adaptive modes)
------------------------------------------------------------
The task of :mod:`benchmarks.adaptive_kfac` (imported, :func:`benchmarks.adaptive_kfac.cnn_task`):
10-class shifted-template ``8 x 8 x 3`` images, two ``3 x 3`` ``nn.Conv`` layers (ReLU,
``SAME``), global average pooling, a ``Dense`` head; mean softmax cross-entropy
(``likelihood="categorical"``), batches of 256 from 8,192 samples in a fixed order, float32,
the same initial parameters and batches for every method. Channels ``8, 16`` (1,562
parameters); the full preset adds ``16, 32`` (5,418; on the quick ``lr`` grid only, since
kfac-jax's conv statistics take about 1 s per step there on 2 CPU cores: the full preset runs
for about an hour and a half, the quick one 6-8 minutes). Methods:

* ``fishr.kfac``: ``optax.chain(fishr.kfac(model.apply, damping, likelihood="categorical",
  example_batch=b), optax.sgd(lr))`` in the user's ``jax.jit`` step (true Fisher with
  sampled labels, pi damping, Cholesky inverses every step, bias-corrected EMA 0.95);
* ``kfac_jax.Optimizer``: the same ``lr`` and damping, ``curvature_ema=0.95``,
  ``inverse_update_period=1``, ``estimation_mode="fisher_gradients"``, ``l2_reg=0``,
  momentum 0, ``use_adaptive_learning_rate / momentum / damping = False``,
  ``num_burnin_steps=0``, the loss registered with ``register_softmax_cross_entropy_loss``;
  its ``step`` is jitted by kfac-jax;
* ``optax.adam``: the best ``lr`` of a small grid (quick ``0.1, 0.03, 0.01``).

The two K-FAC methods run every point of the same grid ``lr x damping`` (damping ``1e-3`` and
``1e-2``; ``lr`` quick ``0.03, 0.01``, the two best of ``0.3 .. 0.003`` for fishr.kfac in a wider
sweep; full ``0.1 .. 0.003``); each method's row is its best point (lowest loss
on all 8,192 samples after ``train_steps`` steps, quick 200, full 500), and the grid table
gives both methods' final loss at every point, so they can be compared at equal settings.
The grid runs pass ``lr`` and the damping as traced scalars so that one compilation serves
the whole grid: fishr as ``fishr.kfac(...).update(..., damping=d)`` and ``p - lr * u`` (the
arithmetic of ``optax.sgd(lr)``), kfac-jax through ``step(..., learning_rate=, momentum=0,
damping=)`` (its schedules ``None``). The timed runs (below) use the plain constructions
above, with the best point's constants.

Reported: loss and accuracy on all samples after ``train_steps`` steps; the first call
(construction, ``init``, compilation and the first step, ``block_until_ready``) in seconds;
the median warm time per step with (min-max) over interleaved repetitions (quick: 5
repetitions of 10 steps, full: 11 of 20, the methods interleaved repetition by repetition
so that machine noise hits them alike); the ratio fishr.kfac / kfac-jax of the medians.
The first calls are measured after the grid runs, so tracing caches of the model are warm
for every method alike; the table also checks that the plain construction's first step equals
the grid run's (max abs difference of the parameters). Section (a) runs with
``jax_enable_x64`` off (importing NetKet turns it on, so NetKet is imported only in (b)).

(b) ViT wave function, sample-space SR (vs NetKet's SRt)
--------------------------------------------------------
:class:`benchmarks.vit.ViT` with its defaults (8 x 8 spins, 2 x 2 patches, embedding 32,
2 pre-LayerNorm blocks of 4-head ``nn.MultiHeadDotProductAttention`` and a GELU MLP;
``P = 17,345``, 16 positions per sample): real parameters, flax's initialisation perturbed
by ``0.1 N(0, 1)``, ``N`` uniformly random ``+-1`` samples (quick: 256, full: 256 and 1024),
synthetic local energies ``E ~ N(-10, 3^2)`` (NumPy draws, seed 0; the set-up of
:mod:`benchmarks.sr_accuracy` with NumPy's generator instead of ``jax.random``, whose ops
compile one by one) and the VMC force ``g = Obar^T c``, ``c = 2 (E - <E>) / N``, in float32
and float64 (the float32 problem is the float64 one cast).
Every method computes ``x = Obar^T (Obar Obar^T / N + damping)^{-1} c`` (damping
``1e-3``, NetKet's ``diag_shift``) from the same samples and energies:

* ``fishr structured`` / ``fishr generic``: ``fishr.sr_solve(model.apply, g, params, s,
  damping=1e-3, mode="sample_space", jacobian="structured" / "generic", local_energies=E)``
  (the kernel from captured layer statistics / from explicit per-sample Jacobian rows);
* ``fishr auto``: the same call with fishr's defaults (``mode="auto"``, ``jacobian="auto"``);
  the table says what they resolve to;
* ``netket srt_onthefly``: NetKet's Jacobian-free SRt, ``srt_onthefly(model.apply, E, params,
  {}, s, diag_shift=1e-3, solver_fn=netket.optimizer.solver.cholesky, mode="real")`` under
  ``jax.jit``; ``netket srt``: the explicit-Jacobian SRt (what ``VMC_SR(use_ntk=True)`` runs),
  jitted by NetKet itself (as in :mod:`benchmarks.sr_accuracy`).

Each result is checked against the update evaluated in float64 by an eigendecomposition of
the kernel (``err = max |x - x_ref| / max |x_ref|``); for fishr the table gives
``fishr.SolveInfo``'s ``iterations`` (CG steps after the kernel's factorisation) and
``fallback`` (0: the common path; 1: the single-precision factor of float64 input failed or
its CG did not converge, the kernel was factored in float64; 2: a factor with a raised shift
as CG preconditioner; see :mod:`fishr._sample_space`). Timing: each method's first call
(``jax.jit`` of a fresh function: trace, compile and run, ``block_until_ready``), then
``repeats`` rounds (quick 5, full 11) in which every method is called once, interleaved;
median and (min-max) in milliseconds. Ratios: ``fishr structured`` and the fastest fishr
column over the fastest NetKet column (medians).

kfac-jax and NetKet are optional (``/work/bench-venv``-style environment: jax 0.9.1, kfac-jax
0.0.8, NetKet 3.23); without them their rows are skipped with the reason. Section (b) enables
``jax_enable_x64``; :func:`run` restores the caller's setting at the end. Run ``python -m
benchmarks.layers [--full] [--json FILE] [--sections cnn vit]``; ``OPENBLAS_NUM_THREADS=1``
(``benchmarks/__init__.py`` sets it when NumPy is not loaded yet): threaded OpenBLAS is up
to 100x slower on the small Cholesky solves of every method on a busy machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fishr
from benchmarks import adaptive_kfac as ak
from benchmarks.kfac import BATCH, DATA, _block, batch_at

SR_DAMPING = 1e-3
PRESETS = {
    # CI-sized: the same code paths on small models (tests/test_layers_benchmark.py)
    "tiny": dict(train_steps=4, lrs=(0.01,), dampings=(1e-3,), adam_lrs=(1e-3,), reps=2, steps_per_rep=2,
                 cnn_features=((4, 8),), vit="tiny", vit_ns=(16,), dtypes=("float64",), vit_repeats=2),
    "quick": dict(train_steps=200, lrs=(0.03, 0.01), dampings=(1e-3, 1e-2), adam_lrs=(1e-1, 3e-2, 1e-2),
                  reps=5, steps_per_rep=10, cnn_features=((8, 16),), vit="full", vit_ns=(256,),
                  dtypes=("float32", "float64"), vit_repeats=5),
    # 16-32 CNN: the quick lr grid only (kfac-jax takes about 1 s per step there on 2 cores)
    "full": dict(train_steps=500, lrs=(0.1, 0.03, 0.01, 0.003), dampings=(1e-3, 1e-2),
                 adam_lrs=(1e-1, 3e-2, 1e-2, 3e-3, 1e-3), reps=11, steps_per_rep=20, cnn_features=((8, 16), (16, 32)),
                 cnn_lrs={(16, 32): (0.03, 0.01)}, vit="full", vit_ns=(256, 1024), dtypes=("float32", "float64"),
                 vit_repeats=11),
}
FISHR, KFAC_JAX, ADAM = "fishr.kfac", "kfac_jax.Optimizer", "optax.adam"


def _print(message: str) -> None:
    print(message, flush=True)


def _skip_reason(err: Exception) -> str:
    if isinstance(err, ImportError):
        return f"not importable: {err}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _stats(ts: list[float], scale: float = 1e3) -> dict:
    return dict(median=scale * statistics.median(ts), min=scale * min(ts), max=scale * max(ts), n=len(ts))


def _fresh(tree):
    return jax.tree.map(jnp.copy, tree)  # every run its own copy: kfac-jax donates its inputs


# =========================================================================== (a) CNN, fixed step sizes


def _kfac_jax_loss(task):
    import kfac_jax  # optional

    model = task.model

    def loss_fn(p, batch):
        x, y = batch
        out = model.apply(p, x)
        kfac_jax.register_softmax_cross_entropy_loss(out, y)
        logp = jax.nn.log_softmax(out, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    return loss_fn


def kfac_jax_optimizer(task, lr: float | None = None, damping: float | None = None):
    """``kfac_jax.Optimizer`` without adaptive modes; ``lr=None``: lr and damping passed to ``step``."""
    import kfac_jax  # optional

    schedules = {} if lr is None else dict(learning_rate_schedule=lambda step: lr,
                                           momentum_schedule=lambda step: 0.0,
                                           damping_schedule=lambda step: damping)
    return kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(_kfac_jax_loss(task)),
        l2_reg=0.0,
        use_adaptive_learning_rate=False,
        use_adaptive_momentum=False,
        use_adaptive_damping=False,
        curvature_ema=0.95,
        inverse_update_period=1,
        estimation_mode="fisher_gradients",
        num_burnin_steps=0,
        multi_device=False,
        **schedules,
    )


def kfac_jax_runner(task, params, opt, hyper: dict | None = None) -> ak.Runner:
    """``step(carry, batch)`` of a kfac-jax optimizer; ``hyper``: the traced lr / momentum / damping."""
    rng = jax.random.PRNGKey(42)
    state = opt.init(params, rng, batch_at(task.data, 0))
    hyper = hyper or {}

    def step(carry, batch):
        p, s, k = carry
        # global_step_int: the state's step counter as a Python int (no device sync)
        p, s, _ = opt.step(p, s, jax.random.fold_in(rng, k), batch=batch, global_step_int=k, **hyper)
        return p, s, k + 1

    return ak.Runner((params, state, 0), step, lambda carry: carry[0], lambda carry: {})


class GridRunners:
    """Per method, ``make(params, lr, damping) -> Runner``: one compilation for the whole grid."""

    def __init__(self, task):
        self.task = task
        self._fishr_step = None
        self._kfac_jax = None

    def fishr(self, params, lr, damping) -> ak.Runner:
        task = self.task
        if self._fishr_step is None:
            opt = fishr.kfac(task.model.apply, 1.0, likelihood=task.likelihood, example_batch=batch_at(task.data, 0))

            @jax.jit
            def step(carry, batch, lr, damping):
                p, s = carry
                grads = jax.grad(task.loss)(p, batch)
                u, s = opt.update(grads, s, p, batch=batch, damping=damping)  # the damping for this step
                return optax.apply_updates(p, jax.tree.map(lambda a: -lr * a, u)), s  # = optax.sgd(lr)

            self._fishr_step, self._fishr_init = step, opt.init
        dtype = jax.tree.leaves(params)[0].dtype
        lr_, d_ = jnp.asarray(lr, dtype), jnp.asarray(damping, dtype)
        return ak.Runner((params, self._fishr_init(params)), lambda c, b: self._fishr_step(c, b, lr_, d_),
                         lambda carry: carry[0], lambda carry: {})

    def kfac_jax(self, params, lr, damping) -> ak.Runner:
        if self._kfac_jax is None:
            self._kfac_jax = kfac_jax_optimizer(self.task)
        dtype = jax.tree.leaves(params)[0].dtype
        hyper = dict(learning_rate=jnp.asarray(lr, dtype), momentum=jnp.asarray(0.0, dtype),
                     damping=jnp.asarray(damping, dtype))
        return kfac_jax_runner(self.task, params, self._kfac_jax, hyper)

    def adam(self, params, lr, damping=None) -> ak.Runner:
        return ak.adam_runner(self.task, params, lr)


def plain_runner(task, method: str, params, lr, damping) -> ak.Runner:
    """The plain constructions (constants), as a user writes them: the timed runs."""
    if method == FISHR:
        opt = optax.chain(fishr.kfac(task.model.apply, damping, likelihood=task.likelihood,
                                     example_batch=batch_at(task.data, 0)), optax.sgd(lr))
        return ak.optax_runner(task.loss, params, opt, needs_batch=True)
    if method == KFAC_JAX:
        return kfac_jax_runner(task, params, kfac_jax_optimizer(task, lr, damping))
    return ak.adam_runner(task, params, lr)


def _train(task, runner: ak.Runner, steps: int) -> tuple[dict, Any]:
    """``steps`` steps on the fixed batches: the final metrics and the parameters after the first step."""
    t0 = time.perf_counter()
    carry = runner.step(runner.carry, batch_at(task.data, 0))
    first = _fresh(runner.params(carry))  # kfac-jax donates its inputs: a copy
    for k in range(1, steps):
        carry = runner.step(carry, batch_at(task.data, k))
    _block(carry)
    wall = time.perf_counter() - t0
    metrics = task.metrics(runner.params(carry))
    return dict(loss=metrics["loss"], accuracy=metrics.get("accuracy"), wall_s=wall), first


def _max_abs_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def capture_blocks(task) -> dict:
    """What fishr's K-FAC builds for the task: the capture report and the Kronecker block sizes."""
    x = batch_at(task.data, 0)[0]
    rows = fishr.capture.report(task.model.apply, task.params, x)
    info = ak.fishr_kfac_blocks(task)
    return dict(report=fishr.capture.format_report(rows), **info,
                captured_kernels=sorted({r.layer for r in rows if r.role == "kernel" and r.kind is not None}),
                conv_positions=sorted({r.positions for r in rows if r.kind == "Conv"}))


def run_cnn(features: tuple, preset: dict, log: Callable = _print, peers: bool = True) -> dict:
    """Grid, best points, first calls and interleaved step times of the three methods on one CNN size."""
    task = ak.cnn_task(features=features)
    steps = preset["train_steps"]
    grids = GridRunners(task)
    lrs = preset.get("cnn_lrs", {}).get(tuple(features), preset["lrs"])
    k_grid = [(lr, d) for d in preset["dampings"] for lr in lrs]
    methods = {FISHR: (grids.fishr, k_grid), KFAC_JAX: (grids.kfac_jax, k_grid),
               ADAM: (grids.adam, [(lr, None) for lr in preset["adam_lrs"]])}
    if not peers:
        methods.pop(KFAC_JAX)
    tag = f"[layers cnn {'-'.join(map(str, features))}]"
    results: dict[str, dict] = {}
    for name, (make, grid) in methods.items():
        points, first_steps = [], []
        try:
            for lr, d in grid:
                r, first = _train(task, make(_fresh(task.params), lr, d), steps)
                points.append(dict(lr=lr, damping=d, **r))
                first_steps.append(first)
                log(f"{tag} {name} lr={lr:g}{'' if d is None else f' damping={d:g}'}: loss {r['loss']:.4g}, "
                    f"accuracy {r['accuracy']:.3f} ({r['wall_s']:.1f} s)")
        except Exception as err:  # kfac-jax absent, or failing on this jax version
            results[name] = {"skipped": _skip_reason(err)}
            log(f"{tag} {name}: skipped ({results[name]['skipped']})")
            continue
        finite = [p for p in points if math.isfinite(p["loss"])] or points
        best = min(finite, key=lambda p: p["loss"] if math.isfinite(p["loss"]) else math.inf)
        results[name] = dict(lr=best["lr"], damping=best["damping"], loss=best["loss"], accuracy=best["accuracy"],
                             grid=points)
        results[name]["_grid_first_step"] = first_steps[points.index(best)]

    # First calls of the plain constructions at the best points, then interleaved warm steps.
    runners = {}
    for name, r in results.items():
        if "skipped" in r:
            continue
        t0 = time.perf_counter()
        runner = plain_runner(task, name, _fresh(task.params), r["lr"], r["damping"])
        carry = runner.step(runner.carry, batch_at(task.data, 0))
        _block(carry)
        r["first_call_s"] = time.perf_counter() - t0
        # the plain construction against the grid's traced-hyperparameter run: the same first step
        r["plain_vs_grid_first_step"] = _max_abs_diff(runner.params(carry), r.pop("_grid_first_step"))
        runners[name] = runner._replace(carry=carry)
    times = ak.interleaved_step_times(runners, task.data, 1, preset["reps"], preset["steps_per_rep"])
    for name, ts in times.items():
        results[name]["step_ms"] = _stats(ts)
    out = dict(features=list(features), task=task.description, train_steps=steps, repetitions=preset["reps"],
               steps_per_repetition=preset["steps_per_rep"], capture=capture_blocks(task), results=results)
    if all("step_ms" in results.get(k, {}) for k in (FISHR, KFAC_JAX)):
        out["fishr_over_kfac_jax_step"] = results[FISHR]["step_ms"]["median"] / results[KFAC_JAX]["step_ms"]["median"]
        out["fishr_over_kfac_jax_first_call"] = results[FISHR]["first_call_s"] / results[KFAC_JAX]["first_call_s"]
    return out


def format_cnn(r: dict) -> str:
    blocks = r["capture"]["blocks"]
    lines = [f"[CNN conv {'-'.join(map(str, r['features']))}] {r['task']}",
             f"fishr K-FAC: Kronecker blocks for {len(blocks)} of {r['capture']['kernel_layers']} kernel layers "
             f"(A x G: {', '.join(f'{a}x{g}' for a, g in blocks)}; conv positions T = "
             f"{', '.join(map(str, r['capture']['conv_positions']))})",
             f"{'method':<20} {'lr':>6} {'damping':>8} {'loss':>9} {'acc':>6} {'ms/step':>8} {'(min-max)':>17} "
             f"{'1st call s':>10}"]
    for name, m in r["results"].items():
        if "skipped" in m:
            lines.append(f"{name:<20} skipped: {m['skipped']}")
            continue
        s = m["step_ms"]
        spread = f"({s['min']:.2f}-{s['max']:.2f})"
        damping = "-" if m["damping"] is None else f"{m['damping']:g}"
        lines.append(f"{name:<20} {m['lr']:>6g} {damping:>8} {m['loss']:>9.4f} {m['accuracy']:>6.3f} "
                     f"{s['median']:>8.2f} {spread:>17} {m['first_call_s']:>10.2f}")
    if "fishr_over_kfac_jax_step" in r:
        lines.append(f"fishr.kfac / kfac-jax: time per step {r['fishr_over_kfac_jax_step']:.3f}x, "
                     f"first call {r['fishr_over_kfac_jax_first_call']:.2f}x")
    checks = [f"{name} {m['plain_vs_grid_first_step']:.1e}" for name, m in r["results"].items()
              if "plain_vs_grid_first_step" in m]
    if checks:
        lines.append("plain construction vs grid run, first step, max |dparams|: " + ", ".join(checks))
    lines.append(f"(loss and accuracy on all {DATA} samples after {r['train_steps']} steps of batch {BATCH}; "
                 f"ms/step: median (min-max) over {r['repetitions']} interleaved repetitions of "
                 f"{r['steps_per_repetition']} warm steps)")
    # the grid: final loss (accuracy) of both K-FAC methods at every point
    k_methods = [k for k in (FISHR, KFAC_JAX) if "grid" in r["results"].get(k, {})]
    if k_methods:
        lines.append(f"grid, loss (accuracy) after {r['train_steps']} steps:  "
                     + "  ".join(f"{k:>24}" for k in k_methods))
        for i, point in enumerate(r["results"][k_methods[0]]["grid"]):
            cells = []
            for k in k_methods:
                p = r["results"][k]["grid"][i]
                cells.append(f"{p['loss']:.4f} ({p['accuracy']:.3f})")
            lines.append(f"  lr {point['lr']:<6g} damping {point['damping']:<6g}{'':>14}"
                         + "  ".join(f"{c:>24}" for c in cells))
    if "grid" in r["results"].get(ADAM, {}):
        lines.append("adam lr grid, loss: " + ", ".join(f"{p['lr']:g}: {p['loss']:.4f}"
                                                        for p in r["results"][ADAM]["grid"]))
    return "\n".join(lines)


# =========================================================================== (b) ViT, sample-space SR


def vit_model(kind: str, dtype):
    from benchmarks.vit import ViT, tiny

    model = tiny(dtype) if kind == "tiny" else ViT(param_dtype=dtype)
    return model, model.side * model.side


def vit_problem(kind: str, n: int, seed: int = 0, reference: bool = True) -> dict:
    """float64 parameters, samples, energies, the VMC force and the exact float64 update (x64 enabled).

    ``reference=False``: no per-sample Jacobian and no exact update (``ref`` is ``None``); the
    force ``Obar^T c = O^T c`` (the ``c`` sum to 0) from one VJP.
    """
    from jax.flatten_util import ravel_pytree

    model, sites = vit_model(kind, jnp.float64)
    # NumPy draws and one compilation (flax's init): jax.random ops compile one by one on CPU
    rng = np.random.default_rng(seed)
    s = jnp.asarray(np.where(rng.random((n, sites)) < 0.5, 1.0, -1.0))
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), s[:2])
    params = jax.tree.map(lambda p: p + jnp.asarray(0.1 * rng.standard_normal(p.shape), p.dtype), params)
    energies = rng.standard_normal(n) * 3.0 - 10.0
    c = 2 * (energies - energies.mean()) / n
    flat, unravel = ravel_pytree(params)
    out = dict(model_kind=kind, params=params, samples=s, energies=energies, P=int(flat.size), ref=None,
               kernel_eig=None)
    if not reference:
        force = jax.jit(lambda p, x, c: jax.vjp(lambda q: model.apply(q, x), p)[1](c)[0])
        return dict(out, grad=force(params, s, jnp.asarray(c)))
    o = np.asarray(jax.jit(jax.vmap(jax.grad(lambda f, x: model.apply(unravel(f), x[None])[0]), (None, 0)))(flat, s))
    ob = o - o.mean(0)
    w, v = np.linalg.eigh(ob @ ob.T / n)
    ref = ob.T @ (v @ ((v.T @ c) / (w + SR_DAMPING)))
    return dict(out, grad=unravel(jnp.asarray(ob.T @ c)), ref=ref, kernel_eig=(float(w.min()), float(w.max())))


def auto_choice(apply_fn, params, s) -> str:
    """What ``fishr.sr_solve``'s defaults resolve to here (fishr internals; 'unknown' if they moved)."""
    try:
        from fishr._sr_solve import _layer_plan_of, _resolve_auto, _wants_layers, sr_config

        config = sr_config("benchmark", damping=SR_DAMPING, mode="auto", solver=None, jacobian="auto", momentum=0.0,
                           holomorphic=False, axis_name=None)
        plan = _layer_plan_of(apply_fn, params, s)  # one discovery for both choices, as sr_solve
        config = _resolve_auto(config, apply_fn, params, s, s.shape[0], None, plan)
        if config.mode == "dense":
            return "dense (explicit Jacobian)"
        structured = _wants_layers(config, None, s.shape[0], params, plan)
        return f"{config.mode}, {'structured' if structured else 'generic'} Jacobian"
    except Exception as err:
        return f"unknown ({type(err).__name__})"


def sr_methods(model, params, s, energies, grad, have_nk: bool) -> dict[str, Callable[[], Callable[[], Any]]]:
    """name -> factory of a zero-argument call returning ``(update, fishr.SolveInfo or None)`` (a fresh jit each)."""
    apply = model.apply

    def fishr_factory(**kw):
        def make():
            f = jax.jit(lambda g, p, x, e: fishr.sr_solve(apply, g, p, x, damping=SR_DAMPING, local_energies=e,
                                                          **kw))
            return lambda: f(grad, params, s, energies)  # (x, fishr.SolveInfo)
        return make

    out = {"fishr structured": fishr_factory(mode="sample_space", jacobian="structured"),
           "fishr generic": fishr_factory(mode="sample_space", jacobian="generic"),
           "fishr auto": fishr_factory()}
    if not have_nk:
        return out
    import netket as nk
    from netket._src.ngd.sr_srt_common import srt
    from netket._src.ngd.srt_onthefly import srt_onthefly

    inner, chol = params["params"], nk.optimizer.solver.cholesky

    def otf():
        f = jax.jit(lambda p, x, e: srt_onthefly(apply, e, p, {}, x, diag_shift=SR_DAMPING, solver_fn=chol,
                                                 mode="real")[0])
        return lambda: ({"params": f(inner, s, energies)}, None)

    def explicit():
        # srt is jitted by NetKet itself (and breaks under an outer jit); a fresh closure per factory
        fn = lambda p, x, e: ({"params": srt(apply, e, p, {}, x, diag_shift=SR_DAMPING, solver_fn=chol,
                                             mode="real")[0]}, None)
        return lambda: fn(inner, s, energies)

    out["netket srt_onthefly"] = otf
    out["netket srt"] = explicit
    return out


def run_vit(kind: str, n: int, dtypes, repeats: int, have_nk: bool, log: Callable = _print,
            methods: tuple | None = None, reference: bool = True) -> list[dict]:
    """First call, interleaved warm calls and error of every method (``methods``: a subset) per dtype.

    ``reference=False`` skips the exact float64 update (and the per-sample Jacobian it needs):
    no ``err`` (``None``).
    """
    from jax.flatten_util import ravel_pytree

    problem = vit_problem(kind, n, reference=reference)
    rows = []
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        model, _ = vit_model(kind, dtype)
        cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)
        params, grad, s, e = (cast(problem[k]) for k in ("params", "grad", "samples", "energies"))
        ref = problem["ref"]
        factories = sr_methods(model, params, s, e, grad, have_nk)
        if methods is not None:
            factories = {k: v for k, v in factories.items() if k in methods}
        tag = f"[layers vit N={n} {dtype_name}]"
        calls, first, errors, infos, finite_out = {}, {}, {}, {}, {}
        for name, make in factories.items():
            try:
                t0 = time.perf_counter()
                call = make()
                x, info = jax.block_until_ready(call())
                first[name] = time.perf_counter() - t0
            except Exception as err:
                log(f"{tag} {name}: skipped ({_skip_reason(err)})")
                continue
            flat = np.asarray(ravel_pytree(x)[0], np.float64)
            finite = bool(np.all(np.isfinite(flat)))
            errors[name] = (None if ref is None else
                            float(np.abs(flat - ref).max() / np.abs(ref).max()) if finite else math.inf)
            finite_out[name] = finite
            if info is not None:  # refinement steps and fallback of fishr's direct solve (fishr.SolveInfo)
                infos[name] = dict(iterations=int(info.iterations), fallback=int(info.fallback),
                                   converged=bool(info.converged), residual_norm=float(info.residual_norm))
            calls[name] = call
            log(f"{tag} {name}: first call {first[name]:.2f} s, err {_fmt(errors[name], '.1e')}"
                + (f", solve info {infos[name]}" if name in infos else ""))
        times = {name: [] for name in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                t0 = time.perf_counter()
                jax.block_until_ready(call())
                times[name].append(time.perf_counter() - t0)
        row = dict(model="ViT" if kind == "full" else "ViT tiny", N=n, P=problem["P"], dtype=dtype_name,
                   damping=SR_DAMPING, repeats=repeats, kernel_eig=problem["kernel_eig"],
                   grad_norm=float(np.linalg.norm(np.asarray(ravel_pytree(grad)[0], np.float64))),
                   auto=auto_choice(model.apply, params, s),
                   methods={name: dict(first_call_s=first[name], warm_ms=_stats(times[name]), err=errors[name],
                                       finite=finite_out[name],
                                       **({"solve_info": infos[name]} if name in infos else {}))
                            for name in calls})
        med = {name: m["warm_ms"]["median"] for name, m in row["methods"].items()}
        fishr_names = [k for k in med if k.startswith("fishr")]
        nk_names = [k for k in med if k.startswith("netket")]
        if fishr_names:
            row["fishr_best"] = min(fishr_names, key=med.get)
        if nk_names:
            row["netket_best"] = min(nk_names, key=med.get)
            if "fishr structured" in med:
                row["structured_over_netket"] = med["fishr structured"] / med[row["netket_best"]]
            if fishr_names:
                row["best_fishr_over_netket"] = med[row["fishr_best"]] / med[row["netket_best"]]
        log(f"{tag} warm ms: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
        rows.append(row)
    return rows


def vit_capture(kind: str = "full") -> dict:
    model, sites = vit_model(kind, jnp.float32)
    s = jnp.ones((4, sites), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), s)
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params)
    rows = fishr.capture.report(model.apply, params, s)
    kinds: dict[str, int] = {}
    for r in rows:
        if r.role in ("kernel", "scale") and r.kind is not None:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
    return dict(report=fishr.capture.format_report(rows), layer_kinds=kinds,
                positions=sorted({r.positions for r in rows if r.positions is not None}),
                uncaptured=[r.path for r in rows if r.kind is None])


def format_vit(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        eig = (f"kernel eigenvalues {r['kernel_eig'][0]:.1e} .. {r['kernel_eig'][1]:.1e}; " if r["kernel_eig"]
               else "")
        lines += ["", f"[{r['model']} N={r['N']} P={r['P']:,} {r['dtype']}] damping {r['damping']:g}; {eig}"
                      f"fishr auto -> {r['auto']}",
                  f"{'method':<22} {'1st call s':>10} {'warm ms':>9} {'(min-max)':>15} {'err':>9} {'/ NetKet best':>13}"
                  f"  {'refine / fallback':>17}"]
        best_nk = r["methods"].get(r.get("netket_best"), {}).get("warm_ms", {}).get("median")
        for name, m in r["methods"].items():
            w = m["warm_ms"]
            spread = f"({w['min']:.0f}-{w['max']:.0f})" if w["median"] >= 100 else f"({w['min']:.1f}-{w['max']:.1f})"
            ratio = f"{w['median'] / best_nk:.2f}x" if best_nk else "-"
            info = m.get("solve_info")
            solve = f"{info['iterations']} / {info['fallback']}" if info else "-"
            lines.append(f"{name:<22} {m['first_call_s']:>10.2f} {w['median']:>9.1f} {spread:>15} "
                         f"{_fmt(m['err'], '.1e'):>9} {ratio:>13}  {solve:>17}")
        if "structured_over_netket" in r:
            lines.append(f"structured / NetKet best ({r['netket_best']}): {r['structured_over_netket']:.2f}x; "
                         f"best fishr ({r['fishr_best']}) / NetKet best: {r['best_fishr_over_netket']:.2f}x")
    if rows:
        lines.append(f"(warm ms: median (min-max) over {rows[0]['repeats']} interleaved rounds; first call = trace + "
                     "compile + run; err = max|x - x_ref| / max|x_ref|, x_ref in float64 by eigh; refine / fallback: "
                     "fishr.SolveInfo iterations (CG steps after the factorisation) and fallback (0 common path; "
                     "1 float64 kernel after the float32 factor of float64 input failed; 2 raised-shift factor))")
    return "\n".join(lines[1:] if lines and lines[0] == "" else lines)


# =========================================================================== driver


def run(preset: str = "quick", sections=("cnn", "vit"), log: Callable = _print, peers: bool = True) -> dict:
    """Both sections with the preset's sizes; returns a JSON-able dict (``peers=False``: no kfac-jax / NetKet)."""
    p = PRESETS[preset]
    jax.jit(lambda a: a + 1)(jnp.ones(())).block_until_ready()  # the backend's start-up, charged to nobody
    versions = {"jax": jax.__version__}
    for peer, dist in (("kfac_jax", "kfac-jax"), ("netket", "netket")):
        try:  # the installed version, without importing it: importing netket turns jax_enable_x64 on
            versions[peer] = importlib.metadata.version(dist) if peers else "disabled"
        except Exception as err:
            versions[peer] = f"absent ({type(err).__name__})"
    settings = dict(p, cnn_lrs={"-".join(map(str, f)): g for f, g in p.get("cnn_lrs", {}).items()})
    report = dict(preset=preset, settings=settings, versions=versions, device=str(jax.devices()[0]),
                  sr_damping=SR_DAMPING)
    x64 = bool(jax.config.jax_enable_x64)
    try:
        if "cnn" in sections:
            # float32 throughout, as a float32 user runs it: x64 off (importing netket turns it on)
            jax.config.update("jax_enable_x64", False)
            report["cnn"] = []
            for features in p["cnn_features"]:
                report["cnn"].append(run_cnn(features, p, log, peers=peers))
        if "vit" in sections:
            jax.config.update("jax_enable_x64", True)  # the float64 rows
            from benchmarks.vmc import netket_available

            have_nk = peers and netket_available(True, log, "[layers vit]")
            report["vit_capture"] = vit_capture(p["vit"])
            report["vit"] = []
            for n in p["vit_ns"]:
                report["vit"] += run_vit(p["vit"], n, p["dtypes"], p["vit_repeats"], have_nk, log)
    finally:
        jax.config.update("jax_enable_x64", x64)
    return report


def format_report(report: dict) -> str:
    v = report["versions"]
    lines = [f"jax {v['jax']}, kfac-jax {v['kfac_jax']}, netket {v['netket']}, on {report['device']} "
             f"({report['preset']} preset)"]
    if report.get("cnn"):
        lines += ["", "== (a) CNN classification, fixed lr and damping: fishr.kfac vs kfac-jax vs Adam",
                  "fishr.capture.format_report (CNN, conv " + "-".join(map(str, report["cnn"][0]["features"])) + "):",
                  report["cnn"][0]["capture"]["report"]]
        for r in report["cnn"]:
            lines += ["", format_cnn(r)]
    if "vit" in report:
        c = report["vit_capture"]
        lines += ["", "== (b) ViT wave function, sample-space SR: fishr structured / generic / auto vs NetKet SRt",
                  "fishr.capture.format_report (ViT):", c["report"],
                  "captured layers by kind: " + ", ".join(f"{k} {n}" for k, n in c["layer_kinds"].items())
                  + f"; positions T = {', '.join(map(str, c['positions']))}; uncaptured leaves: "
                  + (", ".join(c["uncaptured"]) or "none"), "", format_vit(report["vit"])]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more steps, the 16-32 CNN, N = 1024 for the ViT")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--sections", nargs="*", default=["cnn", "vit"], choices=["cnn", "vit"])
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    report = run("full" if args.full else "quick", tuple(args.sections))
    report["seconds"] = time.perf_counter() - t0
    print("\n" + format_report(report) + f"\n\n(total {report['seconds']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)


if __name__ == "__main__":
    main()
