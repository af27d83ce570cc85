"""K-FAC layer capture and factor math against explicit float64 formulas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kfac_models import MLP, init, random_like, sin_score

import fishr
from fishr import kronecker as F
from fishr._validate import tree_all_finite
from fishr.capture import capture as capture_layers
from fishr.capture import discover_layers

TOL = 1e-10


def captured(fn, params, x):
    """(plan, inputs, output_grads), the arrays computed under one jit (eager Flax is slow)."""
    inputs, grads = jax.jit(lambda p, x: capture_layers(fn, p, x)[2:4])(params, x)
    return discover_layers(fn, params, x), inputs, grads


def statistics(fn, params, x, **kw):
    fac = jax.jit(lambda p, x: F.factor_statistics(fn, p, x, **kw)[1])(params, x)
    return discover_layers(fn, params, x), fac


def per_sample_grads(fn, params, x):
    return jax.jit(jax.vmap(jax.grad(lambda p, xi: fn(p, xi[None])[0]), in_axes=(None, 0)))(params, x)


def close(x, y, tol=TOL):
    x, y = np.asarray(x), np.asarray(y)
    return np.max(np.abs(x - y)) <= tol * max(1.0, np.max(np.abs(y)))


@pytest.fixture(scope="module")
def mlp():
    model = MLP(features=(4, 2))
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 3), jnp.float64)
    return model, init(model, x), x


def manual_mlp(params, x):
    """Forward and backward of the MLP by hand: inputs a_l and d_l = d score / d z_l per sample."""
    p = params["params"]
    z0 = x @ p["dense0"]["kernel"] + p["dense0"]["bias"]
    h = jnp.tanh(z0)
    z1 = h @ p["dense1"]["kernel"] + p["dense1"]["bias"]
    d1 = jnp.cos(z1)
    d0 = (d1 @ p["dense1"]["kernel"].T) * (1 - h**2)
    return (x, h), (d0, d1)


def test_capture_matches_hand_derivatives(mlp):
    model, params, x = mlp
    plan, inputs, grads = captured(sin_score(model), params, x)
    (a0, a1), (d0, d1) = manual_mlp(params, x)
    assert [l.name for l in plan.layers] == ["dense0", "dense1"]
    assert plan.uncovered == ()
    for got, want in zip(inputs + grads, (a0, a1, d0, d1)):
        assert got.shape == want.shape[:1] + (1,) + want.shape[1:]
        assert close(got[:, 0], want)


def test_factor_statistics_explicit_formulas(mlp):
    model, params, x = mlp
    _plan, fac = statistics(sin_score(model), params, x)
    (a0, a1), (d0, d1) = manual_mlp(params, x)
    n = x.shape[0]
    for a, d, A, G in zip((a0, a1), (d0, d1), fac.a, fac.g):
        a1s = np.concatenate([np.asarray(a), np.ones((n, 1))], axis=1)
        assert close(A, sum(np.outer(r, r) for r in a1s) / n)
        assert close(G, sum(np.outer(r, r) for r in np.asarray(d)) / n)


def test_per_sample_gradient_is_outer_product(mlp):
    """d score_i / d W = a_i d_i^T: the captured statistics are the per-sample gradients' factors."""
    model, params, x = mlp
    score = sin_score(model)
    per_sample = per_sample_grads(score, params, x)
    plan, inputs, grads = captured(score, params, x)
    for layer, a, d in zip(plan.layers, inputs, grads):
        g_kernel = jax.tree.leaves(per_sample)[layer.kernel_index]
        assert close(g_kernel, jnp.einsum("nti,nto->nio", a, d))


class PerPosition(nn.Module):
    """A dense layer over positions, a DenseGeneral contracting a middle axis, a shared layer called twice,
    an uncovered scalar parameter and a 1-D Conv (captured as patches, one position per output pixel)."""

    @nn.compact
    def __call__(self, x):  # x: (n, T, 3)
        h = jnp.tanh(nn.Dense(4, name="per_pos")(x))  # (n, T, 4)
        g = nn.DenseGeneral((2, 3), axis=1, name="general")(h)  # contracts T: (n, 4, 2, 3)
        g = jnp.tanh(g.reshape(g.shape[0], 4, 6))
        shared = nn.Dense(1, name="shared")
        s = shared(g)[..., 0].sum(-1) + shared(g[:, 0])[..., 0]
        conv = nn.Conv(2, (2,), name="conv")(x).sum((1, 2))
        return self.param("scale", nn.initializers.ones, ()) * s + conv


def test_extra_axes_dense_general_shared_and_uncovered():
    model = PerPosition()
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 3, 3), jnp.float64)
    params = init(model, x)
    fn = lambda p, x: model.apply(p, x)
    plan, inputs, grads = captured(fn, params, x)
    names = [l.name for l in plan.layers]
    assert names == ["per_pos", "general", "shared", "conv"]
    assert [l.positions for l in plan.layers] == [3, 4, 5, 3]  # T; shared: 4 + 1 calls' positions
    assert plan.layers[3].d_in == 2 * 3  # kernel size 2 x 3 input channels
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert [paths[i] for i in plan.uncovered] == ["['params']['scale']"]
    # Per-sample kernel gradients are sum_t a_t d_t^T for every captured layer (incl. the shared one).
    leaves = jax.tree.leaves(per_sample_grads(fn, params, x))
    for layer, a, d in zip(plan.layers, inputs, grads):
        want = leaves[layer.kernel_index].reshape(x.shape[0], layer.d_in, layer.d_out)
        assert close(jnp.einsum("nti,nto->nio", a, d), want)
        if layer.has_bias:
            assert close(d.sum(1), leaves[layer.bias_index].reshape(x.shape[0], layer.d_out))
    # K-FAC-expand normalisation: A over (N T), G over N.
    _, fac = statistics(fn, params, x)
    for a, d, A, G in zip(inputs, grads, fac.a, fac.g):
        n, t = a.shape[:2]
        ab = np.concatenate([np.asarray(a), np.ones((n, t, 1))], -1).reshape(n * t, -1)
        db = np.asarray(d).reshape(n * t, -1)
        assert close(A, ab.T @ ab / (n * t)) and close(G, db.T @ db / n)


def test_centring():
    model = MLP(features=(3,))
    x = jax.random.normal(jax.random.PRNGKey(4), (9, 2), jnp.float64) + 1.0
    params = init(model, x)
    score = sin_score(model)
    _, fac = statistics(score, params, x, centre=True)
    _, inputs, grads = captured(score, params, x)
    a = np.asarray(inputs[0][:, 0]) - np.asarray(inputs[0][:, 0]).mean(0)
    d = np.asarray(grads[0][:, 0]) - np.asarray(grads[0][:, 0]).mean(0)
    ab = np.concatenate([a, np.ones((9, 1))], 1)
    assert close(fac.a[0], ab.T @ ab / 9) and close(fac.g[0], d.T @ d / 9)
    assert close(fac.a[0][-1], np.eye(3)[-1])  # bias block stays 1, cross terms vanish


def test_vmapped_layers_are_not_captured():
    """A layer applied inside jax.vmap over samples cannot hand out its per-sample inputs: it is left uncovered."""
    dense = nn.Dense(1)
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 3), jnp.float64)
    params = init(dense, x)
    fn = lambda p, x: jax.vmap(lambda xi: dense.apply(p, xi)[0])(x)
    plan = discover_layers(fn, params, x)
    assert plan.layers == () and len(plan.uncovered) == 2
    g = random_like(jax.random.PRNGKey(0), params)
    _, fac = statistics(fn, params, x)
    assert fac.a == () and jax.tree.all(
        jax.tree.map(lambda u, v: bool(jnp.all(u == v)), F.precondition(g, plan, fac), g))


def test_ema_first_update_replaces_then_mixes():
    old = F.KroneckerFactors(a=(jnp.full((2, 2), 7.0),), g=(jnp.full((1, 1), 7.0),))
    new = F.KroneckerFactors(a=(jnp.eye(2),), g=(jnp.ones((1, 1)),))
    first = F.ema_update(old, new, 0.95, 0, debias=False)
    assert close(first.a[0], np.eye(2)) and close(first.g[0], np.ones((1, 1)))
    later = F.ema_update(old, new, 0.95, 3, debias=False)
    assert close(later.a[0], 0.95 * 7.0 + 0.05 * np.eye(2))


@pytest.mark.parametrize("ema", [0.95, 0.5, 1.0])
def test_debiased_ema_is_the_normalised_weighted_average(ema):
    news = [F.KroneckerFactors(a=(jnp.full((1, 1), float(v)),), g=()) for v in (3.0, -1.0, 5.0, 2.0)]
    x = F.KroneckerFactors(a=(jnp.zeros((1, 1)),), g=())
    for count, n in enumerate(news):
        x = F.ema_update(x, n, ema, count, debias=True)
        w = np.array([ema ** (count - k) for k in range(count + 1)])
        want = sum(wk * float(nk.a[0][0, 0]) for wk, nk in zip(w, news)) / w.sum()
        assert close(x.a[0][0, 0], want)


def test_damping_kinds():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(6, 4)), rng.normal(size=(6, 3))
    a, g = jnp.asarray(m1.T @ m1), jnp.asarray(m2.T @ m2)
    sa, sg = F.damping_shifts(a, g, 0.1, "trace")
    assert close(sa, 0.1 * np.trace(a) / 4) and close(sg, 0.1 * np.trace(g) / 3)
    sa0, _ = F.damping_shifts(jnp.zeros((4, 4)), g, 0.1, "trace")
    assert float(sa0) == F.SEED_EPS  # the seed's floor
    pa, pg = F.damping_shifts(a, g, 0.1, "pi")
    pi = np.sqrt((np.trace(a) / 4) / (np.trace(g) / 3))
    assert close(pa, pi * np.sqrt(0.1)) and close(pg, np.sqrt(0.1) / pi)
    with pytest.raises(ValueError, match="damping_kind"):
        F.damping_shifts(a, g, 0.1, "tikhonov")


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_inverses_and_non_pd_factor(method):
    rng = np.random.default_rng(1)
    m = rng.normal(size=(5, 3))
    a = jnp.asarray(m.T @ m)
    fac = F.KroneckerFactors(a=(a,), g=(jnp.eye(2),))
    solver = {"cholesky": fishr.Cholesky(), "eigh": fishr.Eigh()}[method]
    inv = F.factor_inverses(fac, 0.01, kind="trace", solver=solver)
    shift = 0.01 * np.trace(a) / 3
    assert close(inv.a[0], np.linalg.inv(np.asarray(a) + shift * np.eye(3)))
    bad = F.KroneckerFactors(a=(-a,), g=(jnp.eye(2),))
    assert not bool(tree_all_finite(F.factor_inverses(bad, 0.01, kind="trace", solver=solver)))
    with pytest.raises(TypeError, match="`solver`"):
        F.factor_inverses(fac, 0.01, solver="lu")
