"""Diagonal metrics factored per layer (``factored_metric=True``): the factorisation, the layers' score
variance, and the structured solve against the generic rows and a dense float64 reference."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P
from sr_models import flat, jacobian_rows, rel_err, slow
from test_sr_structured import _case as _structured_case
from test_sr_structured import _f64, _jacobian

import fishr
from fishr import jacobian as jac_mod
from fishr._metric import kronecker_factored
from fishr.capture import discover_layers

CASES = ["mlp", "rbm", "per_position", "mixed", "complex_out", "holomorphic", "two_positions"]
# CI's default run: a complex output, a holomorphic model and a layer at several positions (T > 1)
# cover the paths of the other cases, which run with -m slow
DEFAULT_CASES = [name if name in ("complex_out", "holomorphic", "two_positions") else slow(name) for name in CASES]


class TwoPositions(nn.Module):
    """A wide Dense layer at two positions: kept structured at T = 2 (its kernel is cheaper than the rows')."""

    @nn.compact
    def __call__(self, x):  # x: (n, 16) seen as 2 positions of 8 features
        h = nn.tanh(nn.Dense(16)(x.reshape(x.shape[0], 2, 8)))
        return nn.Dense(1)(h.reshape(x.shape[0], -1))[..., 0]


@functools.cache
def _case(name, n=16):
    if name != "two_positions":
        return _structured_case(name, n)
    x = jax.random.normal(jax.random.PRNGKey(0), (n, 16))
    model = TwoPositions()
    params = _f64(jax.jit(model.init)(jax.random.PRNGKey(1), x))
    grad = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(2), p.shape, p.dtype), params)
    return model.apply, params, x, grad, False


def _positive_metric(params, seed=0):
    flat_m = np.random.default_rng(seed).uniform(0.5, 2.0, size=ravel_pytree(params)[0].size)
    real = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.real(p).dtype), params)
    return ravel_pytree(real)[1](jnp.asarray(flat_m))


@pytest.mark.parametrize("name", CASES)
def test_layer_score_variance_equals_the_per_sample_rows(name, monkeypatch):
    """diag S from the layers' statistics (T = 1 and, chunked, T > 1) equals the explicit rows'."""
    monkeypatch.setattr(jac_mod, "VARIANCE_CHUNK_ELEMENTS", 40)  # several chunks at T > 1
    log_psi, params, x, _, holo = _case(name)
    plans = []

    def variances(p, s):  # one compiled program, not op by op
        structured = _jacobian(True, log_psi, p, s, holo)
        plans.append(structured.plan)
        return ravel_pytree(structured.score_variance())[0], _jacobian(False, log_psi, p, s, holo).score_variance()

    got, want = jax.jit(variances)(params, x)
    if name == "two_positions":  # the T > 1 form is what is tested here
        assert [layer.positions for layer in plans[0].layers] == [2, 1]
    assert np.isrealobj(got) and rel_err(got, np.real(want)) < 1e-12


def test_kronecker_factorisation_keeps_row_and_column_sums():
    log_psi, params, x, _, _ = _case("mixed")
    layers = discover_layers(log_psi, params, x).layers
    metric = _positive_metric(params)
    factored, factors = kronecker_factored(metric, layers)
    leaves, new = jax.tree.leaves(metric), jax.tree.leaves(factored)
    covered = set()
    for layer in layers:
        block = lambda ls: np.concatenate([np.asarray(ls[layer.kernel_index]).reshape(layer.d_in, layer.d_out)] + (
            [np.asarray(ls[layer.bias_index]).reshape(1, -1)] if layer.has_bias else []))
        b, f = block(leaves), block(new)
        u, w = factors[layer.kernel_index]
        np.testing.assert_allclose(f, np.outer(u, w), rtol=1e-14)
        np.testing.assert_allclose(f.sum(0), b.sum(0), rtol=1e-13)
        np.testing.assert_allclose(f.sum(1), b.sum(1), rtol=1e-13)
        assert np.linalg.matrix_rank(f) == 1
        covered |= {layer.kernel_index, layer.bias_index}
    for i, (a, b) in enumerate(zip(leaves, new)):
        if i not in covered:  # the gate: not in a layer, kept entry by entry
            np.testing.assert_array_equal(a, b)
    assert len(covered - {None}) < len(leaves)
    again, _ = kronecker_factored(factored, layers)  # a factored metric is its own factorisation
    assert rel_err(flat(again), flat(factored)) < 1e-14


def _reference(log_psi, params, x, holo, grad, metric_flat, damping):
    """(S + d M)^{-1} g with S from the explicit float64 rows (S = Re(Obar^H Obar) / N for real parameters)."""
    o = jacobian_rows(log_psi, params, x, holo)
    ob = o - o.mean(0)
    s = ob.conj().T @ ob / len(x)
    if not holo:
        s = s.real
    return np.linalg.solve(s + damping * np.diag(metric_flat), flat(grad))


@pytest.mark.parametrize("name", DEFAULT_CASES)
def test_factored_metric_solve_equals_the_dense_reference(name):
    """sample_space on the layers' statistics and on the rows, and dense, all solve (S + d M^) x = g."""
    log_psi, params, x, grad, holo = _case(name)
    metric = _positive_metric(params)
    factored, _ = kronecker_factored(metric, discover_layers(log_psi, params, x).layers)
    want = _reference(log_psi, params, x, holo, grad, flat(factored), 1e-2)
    for mode, jacobian in [("sample_space", "structured"), ("sample_space", "generic"), ("dense", "generic")]:
        solve = jax.jit(lambda g, p, s, m, mode=mode, jacobian=jacobian: fishr.sr_solve(
            log_psi, g, p, s, damping=1e-2, mode=mode, jacobian=jacobian, holomorphic=holo, metric=m,
            factored_metric=True, solver=fishr.Cholesky())[0])
        got = flat(solve(grad, params, x, metric))
        assert rel_err(got, want) < 1e-10, (mode, jacobian, rel_err(got, want))


@pytest.mark.parametrize("name", [slow("mlp"), "two_positions", "complex_out"])
def test_factored_march_structured_equals_generic(name):
    """Three MARCH "var" steps with SPRING momentum: the same updates and accumulator from the layers'
    statistics as from the per-sample rows (the structured Jacobian is what auto picks for these)."""
    log_psi, params, x, grad, holo = _case(name)
    energies = jax.random.normal(jax.random.PRNGKey(5), (x.shape[0],), jnp.float64)
    out = {}
    for jacobian in ("structured", "generic"):
        tx = fishr.sr(log_psi, damping=1e-2, mode="sample_space", jacobian=jacobian, momentum=0.5, march="var",
                      march_decay=0.9, factored_metric=True, holomorphic=holo)
        step = jax.jit(lambda g, st, p, s, e, tx=tx: tx.update(g, st, p, batch=s, local_energies=e))
        state, xs = tx.init(params), []
        for _ in range(3):
            upd, state = step(grad, state, params, x, energies)
            xs.append(flat(upd))
        out[jacobian] = (xs, flat(state.march))
    for a, b in zip(out["structured"][0], out["generic"][0]):
        assert rel_err(a, b) < 1e-9
    assert rel_err(out["structured"][1], out["generic"][1]) < 1e-12


def test_factored_metric_options():
    log_psi, params, x, grad, _ = _case("mlp")
    with pytest.raises(ValueError, match="factored_metric"):
        fishr.sr(log_psi, damping=1e-2, march="var", factored_metric="yes")
    with pytest.raises(ValueError, match="factored_metric=True"):  # per entry: the rows, not the statistics
        fishr.sr_solve(log_psi, grad, params, x, damping=1e-2, mode="sample_space", jacobian="structured",
                       metric=_positive_metric(params))
    # a non-positive metric entry gives NaN (the transform keeps its state), factored or not
    bad = jax.tree.map(lambda m: -m, _positive_metric(params))
    x_bad, _ = jax.jit(lambda g, p, m: fishr.sr_solve(log_psi, g, p, x, damping=1e-2, mode="sample_space",
                                                      jacobian="structured", metric=m, factored_metric=True))(
        grad, params, bad)
    assert not np.isfinite(flat(x_bad)).all()


def test_factored_metric_on_four_devices_equals_one_device():
    """The layers' score variance (diag_damping) and the factored scaling with samples split over 4 devices."""
    log_psi, params, x, grad, _ = _case("two_positions", n=32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("devices",))
    kw = dict(damping=1e-2, mode="sample_space", jacobian="structured", diag_damping=0.1, factored_metric=True,
              metric=_positive_metric(params))
    single = jax.jit(lambda g, p, s: fishr.sr_solve(log_psi, g, p, s, **kw)[0])(grad, params, x)
    solve = lambda g, p, s: fishr.sr_solve(log_psi, g, p, s, axis_name="devices", **kw)[0]
    sharded = jax.jit(jax.shard_map(solve, mesh=mesh, in_specs=(P(), P(), P("devices")), out_specs=P(),
                                    check_vma=False))(grad, params, x)
    assert np.all(np.isfinite(flat(single))) and rel_err(flat(sharded), flat(single)) < 1e-10
