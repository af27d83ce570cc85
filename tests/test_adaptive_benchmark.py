"""The workloads of benchmarks/adaptive_kfac.py: both tasks train with fishr.adaptive_kfac and fixed-step fishr.kfac."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import adaptive_kfac as bench
from benchmarks.kfac import DATA

# tests of the benchmark harness (workloads, tables, runners), not of fishr: marked slow (CI runs
# them; -m "not slow" leaves them out)
pytestmark = pytest.mark.slow

STEPS = 5


@pytest.fixture(scope="module")
def tasks():
    # The benchmark's regression task as is; the CNN task with its sizes and data, narrower convs.
    return {"regression": bench.regression_task(), "cnn": bench.cnn_task(features=(4, 8))}


def test_cnn_task_is_balanced_and_most_parameters_are_conv_kernels(tasks):
    task = tasks["cnn"]
    x, y = task.data
    assert x.shape == (DATA, bench.SIZE, bench.SIZE, bench.CHANNELS) and x.dtype == jnp.float32
    assert y.shape == (DATA,) and y.dtype == jnp.int32
    counts = np.bincount(np.asarray(y), minlength=bench.CLASSES)
    assert counts.min() >= DATA // bench.CLASSES - 1
    # The benchmark's CNN (abstract init: shapes only).
    params = jax.eval_shape(bench.CNN().init, jax.random.PRNGKey(0), x[:1])["params"]
    sizes = {k: sum(a.size for a in jax.tree.leaves(v)) for k, v in params.items()}
    assert sum(n for k, n in sizes.items() if k.startswith("Conv")) > 0.8 * sum(sizes.values())


@pytest.mark.parametrize("task_name", ["regression", "cnn"])
@pytest.mark.parametrize("method", ["fishr.adaptive_kfac", "fishr.kfac"])
def test_loss_finite_and_decreasing(tasks, task_name, method):
    task = tasks[task_name]
    params = jax.tree.map(jnp.copy, task.params)
    make = ((lambda: bench.fishr_adaptive_runner(task, params)) if method == "fishr.adaptive_kfac"
            else (lambda: bench.fishr_kfac_runner(task, params, 0.01)))  # 0.03: the CNN's loss jumps at first
    _runner, result = bench._train(task, make, STEPS)  # the benchmark's training loop, STEPS steps
    curve = [point["loss"] for point in result["curve"]]
    assert [point["step"] for point in result["curve"]] == [0, STEPS]
    assert all(math.isfinite(v) for v in curve)
    assert curve[-1] < curve[0]
    assert result["loss_after"] == pytest.approx(curve[-1])
    if task_name == "cnn":
        assert 0.0 <= result["accuracy_after"] <= 1.0
    if method == "fishr.adaptive_kfac":
        # The adapted values the table reports: a positive step size, a damping in LM's range.
        assert result["learning_rate"] > 0 and math.isfinite(result["momentum"])
        assert 1e-8 <= result["damping"] <= bench.INITIAL_DAMPING / 0.9**5 + 1e-6
