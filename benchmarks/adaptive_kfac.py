"""Adaptive K-FAC, fishr vs kfac-jax, against fixed-step fishr.kfac and Adam, on a regression and a CNN task.

Tasks (generated here, deterministic, float32, batches of ``BATCH = 256`` drawn in a fixed
order from ``DATA = 8,192`` samples, :func:`benchmarks.kfac.batch_at`):

1. ``regression``: :mod:`benchmarks.kfac`'s teacher-MLP regression (16-128-128-1 tanh MLP,
   loss ``0.5 mean |f(x) - y|^2``, the unit-variance Gaussian likelihood ``"gaussian"``).
2. ``cnn``: 10-class classification of synthetic ``8 x 8 x 3`` images. Each class has a fixed
   random template; an image is its class template circularly shifted by a random offset in
   ``[-2, 2]^2`` and scaled by a random amplitude in ``[0.5, 1.5]``, plus ``N(0, 1)`` pixel
   noise (balanced classes; learnable by a translation-invariant CNN). Student: two ``3 x 3``
   ``nn.Conv`` layers (3 -> 8 -> 16 channels, ReLU, ``SAME`` padding), global average
   pooling and a ``Dense`` head to 10 logits; 1,392 of its 1,562 parameters are in the conv
   layers (``--cnn-features 16,32``: 5,088 of 5,418; kfac-jax's conv statistics then take
   0.5-1 s per step on 2 CPU cores, too slow for the quick preset). Loss: mean softmax
   cross-entropy with integer labels (``"categorical"``). kfac-jax registers the convs
   (KFC blocks); ``fishr.kfac`` captures them too (input patches, :mod:`fishr.capture`);
   the table states how many of the model's kernel layers fishr's K-FAC builds blocks for,
   and their sizes.

Methods, from the same initial parameters on the same batches, ``train_steps`` steps each
(quick: 200, full: 500):

* ``fishr.adaptive_kfac``: ``fishr.adaptive_kfac(model.apply, likelihood, example_batch=...,
  initial_damping=1.0)`` and its defaults (true Fisher with sampled labels, pi damping,
  Cholesky inverses every step, bias-corrected EMA 0.95; step size and momentum from the
  exact Gauss-Newton quadratic model; Levenberg-Marquardt damping every 5 steps, decay 0.9,
  thresholds 0.25 / 0.75); ``update(grads, state, params, batch=, value=loss)`` inside the
  user's ``jax.jit`` step, applied with ``optax.apply_updates``;
* ``kfac_jax adaptive``: ``kfac_jax.Optimizer`` with ``use_adaptive_learning_rate``,
  ``use_adaptive_momentum`` and ``use_adaptive_damping`` (``initial_damping=1.0``,
  ``l2_reg=0``, ``curvature_ema=0.95``, ``inverse_update_period=1``,
  ``estimation_mode="fisher_gradients"``, ``num_burnin_steps=0``, its other defaults: the
  same damping interval, decay and thresholds as fishr's), the loss registered with
  ``register_squared_error_loss(weight=0.5)`` (regression) or
  ``register_softmax_cross_entropy_loss`` (CNN); its ``step`` is jitted by kfac-jax;
* ``fishr.kfac``: ``optax.chain(fishr.kfac(model.apply, 1e-3, likelihood=...), optax.sgd(lr))``
  with the ``lr`` of :data:`KFAC_LRS` that gives the lowest final loss (``0.01`` and
  ``0.003`` are in the grid because on the CNN the best was at its low edge);
* ``optax.adam``: the ``lr`` of :data:`ADAM_LRS` with the lowest final loss (``1e-2`` is in
  the grid because on the CNN the best of ``3e-3, 1e-3, 3e-4`` was ``3e-3``, at its edge).

Reported per method: the loss (CNN: and the accuracy) on all ``DATA`` samples after
``train_steps`` steps; the first call (the optimizer's construction and ``init``, compilation
and the first step) in seconds; the
median time per warm step with its (min-max) over interleaved repetitions, and its ratio to
fixed-step ``fishr.kfac``; the wall time to reach the task's target loss (:data:`TARGETS`)
including the first call, and the step at which it was reached.

Timing. Training: each method runs on its own (the first call timed with
``block_until_ready``); every ``EVAL_EVERY`` steps the parameters are blocked on and the
loss on the whole data set is evaluated outside the clock, so the wall time to the target
is first call + warm steps up to the first evaluation at or under the target (resolution
``EVAL_EVERY`` steps; the kfac-jax step compiles a second variant, for its damping-update
steps, at step 5: that compilation is inside this wall time but not in "first call").
Step times: after training, each repetition times ``steps_per_rep`` consecutive steps (a
multiple of the damping interval 5, ``block_until_ready`` at the end), the methods
interleaved repetition by repetition so that machine noise hits them alike (quick: 5
repetitions of 10 steps, full: 11 of 20).

kfac-jax is optional (0.0.8 needs jax 0.9.1): if it cannot be imported its rows are skipped
with the reason. Run ``python -m benchmarks.adaptive_kfac [--full] [--json FILE]``; set
``OPENBLAS_NUM_THREADS=1`` in the environment when calling :func:`run` from a process that
imported NumPy already (``benchmarks/__init__.py`` sets it, which takes effect only before
NumPy is loaded).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fishr
from benchmarks.kfac import BATCH, DATA, IN, OUT, WIDTH, _block, batch_at, make_task, mse

SIZE, CHANNELS, CLASSES, CONV_FEATURES, NOISE = 8, 3, 10, (8, 16), 1.0
INITIAL_DAMPING, FIXED_DAMPING = 1.0, 1e-3
KFAC_LRS, ADAM_LRS = (0.3, 0.1, 0.03, 0.01, 0.003), (1e-2, 3e-3, 1e-3, 3e-4)
EVAL_EVERY = 10
TARGETS = {"regression": 5e-3, "cnn": 1.0}  # loss on the whole data set


# --------------------------------------------------------------------------- the CNN task


class CNN(nn.Module):
    """Two 3 x 3 convolutions (ReLU), global average pooling, a dense head to ``classes`` logits."""

    features: tuple = CONV_FEATURES
    classes: int = CLASSES

    @nn.compact
    def __call__(self, x):
        for f in self.features:
            x = nn.relu(nn.Conv(f, (3, 3), padding="SAME")(x))
        return nn.Dense(self.classes)(jnp.mean(x, axis=(-3, -2)))


def make_cnn_task(seed: int = 0, n: int = DATA, size: int = SIZE, channels: int = CHANNELS,
                  classes: int = CLASSES, features: tuple = CONV_FEATURES, noise: float = NOISE):
    """Shifted-template image classification ``(x, y)`` of ``n`` samples and the student CNN's initial parameters.

    The data and the parameters come from NumPy's generator seeded with ``seed`` (no
    compilation; flax's ``nn.Conv.init`` alone takes seconds to compile on CPU): kernels
    LeCun normal (``N(0, 1 / fan_in)``, flax's default without its truncation), biases 0.
    """
    rng = np.random.default_rng(seed)
    templates = rng.standard_normal((classes, size, size, channels), np.float32)
    y = rng.permutation(np.arange(n) % classes).astype(np.int32)
    shifts = rng.integers(-2, 3, (n, 2))
    amplitude = rng.uniform(0.5, 1.5, (n, 1, 1, 1)).astype(np.float32)
    rows, cols = ((np.arange(size)[None, :] - shifts[:, k : k + 1]) % size for k in (0, 1))  # circular shifts
    clean = templates[y[:, None, None], rows[:, :, None], cols[:, None, :]]
    x = amplitude * clean + noise * rng.standard_normal(clean.shape, np.float32)
    student = CNN(features, classes)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
    shapes = jax.eval_shape(student.init, jax.random.PRNGKey(seed), x[:1])

    def draw(path, leaf):
        if getattr(path[-1], "key", None) != "kernel":
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = math.prod(leaf.shape[:-1])
        return jnp.asarray(rng.standard_normal(leaf.shape) / math.sqrt(fan_in), leaf.dtype)

    return student, jax.tree_util.tree_map_with_path(draw, shapes), (x, y)


def cross_entropy(model, params, batch):
    x, y = batch
    logp = jax.nn.log_softmax(model.apply(params, x), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def accuracy(model, params, batch):
    x, y = batch
    return jnp.mean(jnp.argmax(model.apply(params, x), axis=-1) == y)


class Task(NamedTuple):
    name: str
    description: str
    model: nn.Module
    params: Any
    data: Any
    likelihood: str
    loss: Callable[[Any, Any], jax.Array]  # (params, batch) -> mean loss: the likelihood's
    metrics: Callable[[Any], dict]  # params -> {"loss": ..., ["accuracy": ...]} on the whole data set
    target: float


def regression_task(seed: int = 0) -> Task:
    model, params, data = make_task(seed)
    loss = lambda p, b: mse(model, p, b)
    full = jax.jit(loss)  # the data as an argument, not a constant folded into the program
    return Task("regression", f"teacher-MLP regression, MLP {IN}-{WIDTH}-{WIDTH}-{OUT} tanh, gaussian likelihood",
                model, params, data, "gaussian", loss, lambda p: {"loss": float(full(p, data))},
                TARGETS["regression"])


def cnn_task(seed: int = 0, **options) -> Task:
    model, params, data = make_cnn_task(seed, **options)
    loss = lambda p, b: cross_entropy(model, p, b)
    full = jax.jit(lambda p, d: (loss(p, d), accuracy(model, p, d)))

    def metrics(p):
        value, acc = full(p, data)
        return {"loss": float(value), "accuracy": float(acc)}

    x = data[0]
    n_params = sum(a.size for a in jax.tree.leaves(params))
    n_conv = sum(a.size for k, sub in params["params"].items() if k.startswith("Conv") for a in jax.tree.leaves(sub))
    return Task("cnn", f"CNN classification, {x.shape[1]}x{x.shape[2]}x{x.shape[3]} images, {model.classes} classes, "
                f"conv {model.features} + dense head ({n_conv}/{n_params} params in convs), categorical likelihood",
                model, params, data, "categorical", loss, metrics, TARGETS["cnn"])


# --------------------------------------------------------------------------- optimizers as step functions


class Runner(NamedTuple):
    carry: Any
    step: Callable[[Any, Any], Any]  # (carry, batch) -> carry
    params: Callable[[Any], Any]  # carry -> params
    info: Callable[[Any], dict]  # carry -> adapted values (learning rate, momentum, damping)


def optax_runner(loss_fn, params, opt: optax.GradientTransformation, *, needs_batch: bool = False,
                 needs_value: bool = False) -> Runner:
    """``step(carry, batch) -> carry`` of an optax optimizer inside one user ``jax.jit``.

    :func:`benchmarks.kfac.optax_runner` with the loss as an argument (that one is fixed to
    the MSE); ``needs_value`` passes ``value=loss`` (:func:`fishr.adaptive_kfac`).
    """

    @jax.jit
    def step(carry, batch):
        p, s = carry
        value, grads = jax.value_and_grad(loss_fn)(p, batch)
        extra = {"batch": batch} if needs_batch else {}
        if needs_value:
            extra["value"] = value
        updates, s = opt.update(grads, s, p, **extra)
        return optax.apply_updates(p, updates), s

    return Runner((params, opt.init(params)), step, lambda carry: carry[0], lambda carry: {})


def fishr_adaptive_runner(task: Task, params, initial_damping: float = INITIAL_DAMPING) -> Runner:
    opt = fishr.adaptive_kfac(task.model.apply, task.likelihood, example_batch=batch_at(task.data, 0),
                              initial_damping=initial_damping)
    runner = optax_runner(task.loss, params, opt, needs_batch=True, needs_value=True)

    def info(carry):
        state = carry[1]
        step = fishr.quadratic_step_state(state)
        return {"learning_rate": float(step.learning_rate), "momentum": float(step.momentum),
                "damping": float(state.damping)}

    return runner._replace(info=info)


def fishr_kfac_runner(task: Task, params, lr: float) -> Runner:
    opt = optax.chain(fishr.kfac(task.model.apply, FIXED_DAMPING, likelihood=task.likelihood,
                                 example_batch=batch_at(task.data, 0)), optax.sgd(lr))
    return optax_runner(task.loss, params, opt, needs_batch=True)


def adam_runner(task: Task, params, lr: float) -> Runner:
    return optax_runner(task.loss, params, optax.adam(lr))


def kfac_jax_adaptive_runner(task: Task, params, initial_damping: float = INITIAL_DAMPING) -> Runner:
    import kfac_jax  # optional

    model = task.model

    def loss_fn(p, batch):
        x, y = batch
        out = model.apply(p, x)
        if task.likelihood == "gaussian":
            # kfac-jax's squared-error loss is sum (out - y)^2 with a variance-1/2 Gaussian's curvature; weight 0.5
            # gives 0.5 |out - y|^2, the unit-variance Gaussian fishr uses (as in benchmarks.kfac).
            kfac_jax.register_squared_error_loss(out, y, weight=0.5)
            return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))
        kfac_jax.register_softmax_cross_entropy_loss(out, y)
        logp = jax.nn.log_softmax(out, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn),
        l2_reg=0.0,
        use_adaptive_learning_rate=True,
        use_adaptive_momentum=True,
        use_adaptive_damping=True,
        initial_damping=initial_damping,
        num_burnin_steps=0,  # fishr has no burn-in either (and a burn-in needs a data iterator)
        curvature_ema=0.95,
        inverse_update_period=1,
        estimation_mode="fisher_gradients",
        multi_device=False,
    )
    rng = jax.random.PRNGKey(42)
    state = opt.init(params, rng, batch_at(task.data, 0))

    def step(carry, batch):
        p, s, _, k = carry
        # global_step_int: the state's step counter (0 first) as a Python int, kept here to avoid a device sync;
        # kfac-jax adapts the damping on steps with (k + 1) % 5 == 0, as fishr does.
        p, s, stats = opt.step(p, s, jax.random.fold_in(rng, k), batch=batch, global_step_int=k)
        return p, s, stats, k + 1

    def info(carry):
        stats = carry[2]
        if stats is None:
            return {}
        return {"learning_rate": float(stats["learning_rate"]), "momentum": float(stats["momentum"]),
                "damping": float(carry[1].damping)}

    return Runner((params, state, None, 0), step, lambda carry: carry[0], info)


# --------------------------------------------------------------------------- the benchmark


def _train(task: Task, make: Callable[[], Runner], train_steps: int) -> tuple[Runner, dict]:
    """``train_steps`` steps of ``make()``'s runner, the loss on the whole data set every ``EVAL_EVERY`` steps.

    The first call is timed from ``make()`` (the optimizer's construction and ``init``, which
    traces the model) to the end of the first step (compilation included).
    """
    t0 = time.perf_counter()
    runner = make()
    carry = runner.step(runner.carry, batch_at(task.data, 0))
    _block(carry)
    first_call = time.perf_counter() - t0
    wall, curve = first_call, [(0, 0.0, task.metrics(task.params)["loss"])]
    to_target = None
    t0 = time.perf_counter()
    for k in range(1, train_steps):
        carry = runner.step(carry, batch_at(task.data, k))
        if (k + 1) % EVAL_EVERY == 0 or k == train_steps - 1:
            _block(carry)
            wall += time.perf_counter() - t0
            value = task.metrics(runner.params(carry))["loss"]
            curve.append((k + 1, wall, value))
            if to_target is None and value <= task.target:
                to_target = (k + 1, wall)
            t0 = time.perf_counter()
    metrics = task.metrics(runner.params(carry))
    result = dict(
        loss_after=metrics["loss"], train_steps=train_steps, first_call_s=first_call,
        train_wall_s=wall, target_loss=task.target,
        target_step=None if to_target is None else to_target[0],
        target_wall_s=None if to_target is None else to_target[1],
        curve=[dict(step=s, wall_s=w, loss=v) for s, w, v in curve],
        **runner.info(carry),
    )
    if "accuracy" in metrics:
        result["accuracy_after"] = metrics["accuracy"]
    return runner._replace(carry=carry), result


def _skip_reason(err: Exception) -> str:
    if isinstance(err, ImportError):
        return f"not importable: {err}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def fishr_kfac_blocks(task: Task) -> dict:
    """The Kronecker blocks (sizes of ``A`` and ``G``) ``fishr.kfac`` builds for the model, and its kernel count."""
    state = fishr.kfac(task.model.apply, FIXED_DAMPING, likelihood=task.likelihood,
                       example_batch=batch_at(task.data, 0)).init(task.params)
    kernels = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(task.params)
               if getattr(path[-1], "key", None) == "kernel"]
    return {"blocks": [[a.shape[-1], g.shape[-1]] for a, g in zip(state.factors.a, state.factors.g)],
            "kernel_layers": len(kernels)}


def interleaved_step_times(runners: dict[str, Runner], data, start: int, reps: int,
                           steps_per_rep: int) -> dict[str, list[float]]:
    """Seconds per warm step of every runner: ``reps`` repetitions of ``steps_per_rep`` steps on the batches
    from ``start`` on, the runners interleaved repetition by repetition so that machine noise hits them alike.

    ``runners`` is updated in place: each carry continues from where its timed steps left it.
    """
    times: dict[str, list[float]] = {name: [] for name in runners}
    done = start
    for _ in range(reps):
        batches = [batch_at(data, done + k) for k in range(steps_per_rep)]
        _block(batches)
        for name, runner in runners.items():
            carry = runner.carry
            t0 = time.perf_counter()
            for b in batches:
                carry = runner.step(carry, b)
            _block(carry)
            times[name].append((time.perf_counter() - t0) / steps_per_rep)
            runners[name] = runner._replace(carry=carry)
        done += steps_per_rep
    return times


def run_task(task: Task, train_steps: int, reps: int, steps_per_rep: int, log: Callable[[str], None] = print) -> dict:
    fresh = lambda: jax.tree.map(jnp.copy, task.params)  # every runner its own copy: kfac-jax donates its inputs
    methods: list[tuple[str, tuple | None, Callable]] = [
        ("fishr.adaptive_kfac", None, lambda _: fishr_adaptive_runner(task, fresh())),
        ("kfac_jax adaptive", None, lambda _: kfac_jax_adaptive_runner(task, fresh())),
        ("fishr.kfac", KFAC_LRS, lambda lr: fishr_kfac_runner(task, fresh(), lr)),
        ("optax.adam", ADAM_LRS, lambda lr: adam_runner(task, fresh(), lr)),
    ]
    results: dict[str, dict] = {}
    runners: dict[str, Runner] = {}
    for name, grid, make in methods:
        best = None
        grid_results = {}
        for lr in grid or (None,):
            try:
                runner, result = _train(task, lambda: make(lr), train_steps)
            except Exception as err:  # kfac-jax absent, or failing on this jax version
                results[name] = {"skipped": _skip_reason(err)}
                log(f"[{task.name}] {name}: skipped ({results[name]['skipped']})")
                break
            if lr is not None:
                result["lr"] = lr
                grid_results[str(lr)] = result["loss_after"]
            log(f"[{task.name}] {name}{'' if lr is None else f' lr={lr:g}'}: loss {result['loss_after']:.4g}, "
                f"first call {result['first_call_s']:.2f} s, train {result['train_wall_s']:.2f} s")
            loss = result["loss_after"] if math.isfinite(result["loss_after"]) else math.inf
            if best is None or loss < best[0]:
                best = (loss, runner, result)
        else:
            _, runners[name], results[name] = best
            if grid:
                results[name]["lr_grid"] = grid_results

    # Step times of warm steps, interleaved repetition by repetition (continuing from the trained states).
    times = interleaved_step_times(runners, task.data, train_steps, reps, steps_per_rep)
    for name, ts in times.items():
        results[name].update(median_step_ms=1e3 * statistics.median(ts), min_step_ms=1e3 * min(ts),
                             max_step_ms=1e3 * max(ts), repetitions=reps, steps_per_repetition=steps_per_rep)
    base = results.get("fishr.kfac", {}).get("median_step_ms")
    for name in times:
        if base:
            results[name]["step_time_vs_fishr_kfac"] = results[name]["median_step_ms"] / base
    return {"task": task.description, "target_loss": task.target, "fishr_kfac": fishr_kfac_blocks(task),
            "results": results}


def run(quick: bool = True, tasks: tuple = ("regression", "cnn"), cnn_features: tuple = CONV_FEATURES,
        log: Callable[[str], None] = print) -> dict:
    """Train and time the four methods on each task; returns a JSON-able dict of results."""
    train_steps, reps, steps_per_rep = (200, 5, 10) if quick else (500, 11, 20)
    jax.jit(lambda a: a + 1)(jnp.ones(())).block_until_ready()  # the backend's start-up, charged to nobody
    makers = {"regression": regression_task, "cnn": lambda: cnn_task(features=cnn_features)}
    try:
        import kfac_jax

        kfac_jax_version = kfac_jax.__version__
    except Exception as err:
        kfac_jax_version = f"absent ({type(err).__name__})"
    report = {
        "settings": dict(batch=BATCH, data=DATA, train_steps=train_steps, repetitions=reps,
                         steps_per_repetition=steps_per_rep, initial_damping=INITIAL_DAMPING,
                         fixed_kfac_damping=FIXED_DAMPING, kfac_lr_grid=KFAC_LRS, adam_lr_grid=ADAM_LRS,
                         ema=0.95, inverse_every=1, eval_every=EVAL_EVERY, dtype="float32"),
        "jax": jax.__version__,
        "kfac_jax": kfac_jax_version,
        "device": str(jax.devices()[0]),
        "tasks": {},
    }
    for name in tasks:
        report["tasks"][name] = run_task(makers[name](), train_steps, reps, steps_per_rep, log)
    return report


def _fmt(value, spec, missing="-"):
    return missing if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def format_table(report: dict) -> str:
    s = report["settings"]
    lines = [f"jax {report['jax']}, kfac-jax {report['kfac_jax']}, on {report['device']}; batch {s['batch']}, "
             f"{s['train_steps']} steps, float32; step times: median (min-max) over {s['repetitions']} interleaved "
             f"repetitions of {s['steps_per_repetition']} warm steps"]
    for task_name, t in report["tasks"].items():
        blocks = t["fishr_kfac"]["blocks"]
        lines += ["", f"[{task_name}] {t['task']}",
                  f"fishr K-FAC blocks for {len(blocks)} of {t['fishr_kfac']['kernel_layers']} kernel layers "
                  f"(A x G: {', '.join(f'{a}x{g}' for a, g in blocks)})",
                  f"{'method':<20} {'lr':>7} {'ms/step':>8} {'(min-max)':>15} {'vs kfac':>7} {'1st call s':>10} "
                  f"{'loss':>10} {'acc':>6} {'to target s (step)':>18}  {'final lr / mom / damping':>24}"]
        for name, r in t["results"].items():
            if "skipped" in r:
                lines.append(f"{name:<20} skipped: {r['skipped']}")
                continue
            spread = f"({r['min_step_ms']:.2f}-{r['max_step_ms']:.2f})"
            target = ("not reached" if r["target_step"] is None else
                      f"{r['target_wall_s']:.2f} ({r['target_step']})")
            adapted = (f"{r['learning_rate']:.3g} / {r['momentum']:.3g} / {r['damping']:.2g}"
                       if "damping" in r else "")
            lines.append(
                f"{name:<20} {_fmt(r.get('lr'), 'g', 'adapt'):>7} {r['median_step_ms']:>8.2f} {spread:>15} "
                f"{_fmt(r.get('step_time_vs_fishr_kfac'), '.2f'):>7} {r['first_call_s']:>10.2f} "
                f"{r['loss_after']:>10.3e} {_fmt(r.get('accuracy_after'), '.3f'):>6} {target:>18}  {adapted:>24}")
        grids = [f"{name} {', '.join(f'{lr}: {v:.3e}' for lr, v in r['lr_grid'].items())}"
                 for name, r in t["results"].items() if "lr_grid" in r]
        lines.append(f"(loss on all {s['data']} samples; target loss {t['target_loss']:g}, wall time incl. first call, "
                     f"checked every {s['eval_every']} steps; lr grids, final loss: {'; '.join(grids)})")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more steps and repetitions")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--tasks", nargs="*", default=["regression", "cnn"], choices=["regression", "cnn"])
    parser.add_argument("--cnn-features", default=",".join(map(str, CONV_FEATURES)),
                        help="channels of the two conv layers, e.g. 16,32")
    args = parser.parse_args(argv)
    features = tuple(int(f) for f in args.cnn_features.split(","))
    report = run(quick=not args.full, tasks=tuple(args.tasks), cnn_features=features)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
