"""The workloads of benchmarks/layers.py at CI size, without kfac-jax and NetKet.

The CNN section (fishr.kfac and Adam on narrow convs, a few steps) and the ViT section (the
structured sample-space SR solve on :func:`benchmarks.vit.tiny`) run through the benchmark's
own functions; the results must be finite and the capture must cover the conv kernels and the
attention projections.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import layers

# tests of the benchmark harness (workloads, tables, runners), not of fishr: marked slow (CI runs
# them; -m "not slow" leaves them out)
pytestmark = pytest.mark.slow

TINY = layers.PRESETS["tiny"]


@pytest.fixture(scope="module")
def cnn():
    return layers.run_cnn((4, 8), TINY, log=lambda *a, **k: None, peers=False)


def test_cnn_results_finite(cnn):
    assert set(cnn["results"]) == {layers.FISHR, layers.ADAM}
    for name, r in cnn["results"].items():
        assert math.isfinite(r["loss"]) and 0.0 <= r["accuracy"] <= 1.0, name
        s = r["step_ms"]
        assert 0 < s["min"] <= s["median"] <= s["max"] < math.inf and s["n"] == TINY["reps"]
        assert r["first_call_s"] > 0
        # the grid's traced lr / damping and the plain optax.chain construction take the same first step
        assert r["plain_vs_grid_first_step"] <= 1e-6, name
    assert len(cnn["results"][layers.FISHR]["grid"]) == len(TINY["lrs"]) * len(TINY["dampings"])
    # a few steps of K-FAC at lr 0.01 lower the loss from log(10)
    assert cnn["results"][layers.FISHR]["loss"] < math.log(10)
    text = layers.format_cnn(cnn)
    assert "fishr.kfac" in text and "nan" not in text


def test_cnn_capture_covers_the_convs(cnn):
    capture = cnn["capture"]
    assert capture["captured_kernels"] == ["Conv_0", "Conv_1", "Dense_0"]
    assert capture["conv_positions"] == [8 * 8]  # SAME padding: one position per output pixel
    # Kronecker blocks: A over the 3 x 3 patches (+ bias), G over the output channels
    assert capture["blocks"] == [[3 * 3 * 3 + 1, 4], [3 * 3 * 4 + 1, 8], [8 + 1, 10]]
    assert "captured: 498 of 498 parameters (100.0%)" in capture["report"]


def test_vit_capture_covers_attention():
    c = layers.vit_capture("tiny")
    assert c["uncaptured"] == []
    # 2 blocks x (query, key, value, out) DenseGeneral, embed / 2 x (mlp_in, mlp_out) / head Dense, 5 LayerNorms
    assert c["layer_kinds"] == {"DenseGeneral": 8, "Dense": 6, "LayerNorm": 5}
    assert c["positions"] == [4]  # 4 x 4 spins in 2 x 2 patches
    assert "['params']['attn_0']['out']['kernel']" in c["report"]


def test_vit_structured_sr_finite_and_solved():
    # The structured (captured-layer) solve only, without the float64 reference (its per-sample
    # Jacobian would double the compile time); the solve's own residual checks the result.
    rows = layers.run_vit("tiny", 16, ("float64",), repeats=1, have_nk=False, log=lambda *a, **k: None,
                          methods=("fishr structured",), reference=False)
    [row] = rows
    assert row["P"] == 1265 and row["dtype"] == "float64" and row["grad_norm"] > 0
    m = row["methods"]["fishr structured"]
    assert m["finite"] and m["err"] is None
    info = m["solve_info"]
    assert info["converged"] and info["residual_norm"] <= 1e-8 * row["grad_norm"]
    w = m["warm_ms"]
    assert np.isfinite([w["median"], w["min"], w["max"], m["first_call_s"]]).all()
    assert "fishr structured" in layers.format_vit(rows)
    assert row["auto"].startswith("sample_space")  # what fishr's defaults pick for this model


def test_presets_have_the_briefs_sizes():
    quick, full = layers.PRESETS["quick"], layers.PRESETS["full"]
    assert quick["train_steps"] == 200 and quick["dampings"] == full["dampings"] == (1e-3, 1e-2)
    assert quick["cnn_features"] == ((8, 16),) and full["cnn_features"] == ((8, 16), (16, 32))
    assert quick["vit"] == full["vit"] == "full" and quick["vit_ns"] == (256,) and full["vit_ns"] == (256, 1024)
    assert quick["dtypes"] == full["dtypes"] == ("float32", "float64")
    assert jnp.dtype(quick["dtypes"][0]) == jnp.float32
