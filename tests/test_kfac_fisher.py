"""Where theory says K-FAC is exact, its block equals the exact Fisher block; its step equals a dense solve."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kfac_models import init, random_like

import fishr
from fishr import kronecker as F
from fishr.scores import make_score_fn

TOL = 1e-10


def exact_fisher_block(score, params, batch):
    """(1/N) sum_i vec(g_i) vec(g_i)^T of the per-sample [kernel; bias] gradients (row-major vec)."""
    def one(p, xi, yi):
        return score(p, (xi[None], yi[None]), jax.random.PRNGKey(0))[0]

    g = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0)))(params, *batch)["params"]
    rows = jnp.concatenate([g["kernel"], g["bias"][:, None, :]], axis=1).reshape(batch[0].shape[0], -1)
    return np.asarray(rows.T @ rows / rows.shape[0])


def kfac_block(score, params, batch):
    fac = jax.jit(lambda p, b: F.factor_statistics(score, p, b, jax.random.PRNGKey(0))[1])(params, batch)
    return np.kron(np.asarray(fac.a[0]), np.asarray(fac.g[0])), fac


def product_batch(inputs, targets):
    """Every input paired with every target: a batch on which a and d are exactly independent."""
    j, k = inputs.shape[0], targets.shape[0]
    return jnp.repeat(inputs, k, axis=0), jnp.tile(targets, (j,) + (1,) * (targets.ndim - 1))


def test_linear_gaussian_block_is_exact():
    """z = W a + b, unit-variance Gaussian: d = y - z; pairing all inputs with all residuals makes F = A (x) G."""
    layer = nn.Dense(2)
    a = jax.random.normal(jax.random.PRNGKey(0), (5, 3), jnp.float64)
    params = init(layer, a)
    residuals = jax.random.normal(jax.random.PRNGKey(1), (4, 2), jnp.float64)
    x, r = product_batch(a, residuals)
    y = layer.apply(params, x) + r  # data labels whose residual at params is exactly r
    score = make_score_fn(layer.apply, "gaussian", "empirical")
    exact = exact_fisher_block(score, params, (x, y))
    approx, _ = kfac_block(score, params, (x, y))
    assert np.max(np.abs(approx - exact)) <= TOL * np.max(np.abs(exact))


def test_softmax_block_is_exact_at_uniform_predictions():
    """Softmax with W = 0, b = 0: p is uniform for every input, so the true Fisher (every label, weight 1/C)
    factorises as E[a a^T] (x) (diag p - p p^T)."""
    classes = 3
    layer = nn.Dense(classes)
    a = jax.random.normal(jax.random.PRNGKey(2), (6, 4), jnp.float64)
    params = jax.tree.map(jnp.zeros_like, init(layer, a))
    x, y = product_batch(a, jnp.arange(classes))
    score = make_score_fn(layer.apply, "categorical", "empirical")
    exact = exact_fisher_block(score, params, (x, y))
    approx, fac = kfac_block(score, params, (x, y))
    p = np.full(classes, 1.0 / classes)
    assert np.max(np.abs(np.asarray(fac.g[0]) - (np.diag(p) - np.outer(p, p)))) <= TOL
    assert np.max(np.abs(approx - exact)) <= TOL * np.max(np.abs(exact))


@pytest.mark.parametrize("kind", ["trace", "pi"])
@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_preconditioned_gradient_is_dense_solve(kind, method):
    layer = nn.Dense(3)
    x = jax.random.normal(jax.random.PRNGKey(3), (10, 4), jnp.float64)
    params = init(layer, x)
    score = lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)), -1)
    grads = random_like(jax.random.PRNGKey(4), params)
    damping = 0.05

    def step(p, x, g):
        plan, fac = F.factor_statistics(score, p, x)
        inv = F.factor_inverses(fac, damping, kind=kind,
                                solver={"cholesky": fishr.Cholesky(), "eigh": fishr.Eigh()}[method])
        return fac, F.precondition(g, plan, inv)

    fac, nat = jax.jit(step)(params, x, grads)
    A, G = np.asarray(fac.a[0]), np.asarray(fac.g[0])
    sa, sg = (float(s) for s in F.damping_shifts(fac.a[0], fac.g[0], damping, kind))
    dense = np.kron(A + sa * np.eye(5), G + sg * np.eye(3))
    gamma = np.concatenate([np.asarray(grads["params"]["kernel"]), np.asarray(grads["params"]["bias"])[None]])
    want = np.linalg.solve(dense, gamma.reshape(-1)).reshape(5, 3)
    got = np.concatenate([np.asarray(nat["params"]["kernel"]), np.asarray(nat["params"]["bias"])[None]])
    assert np.max(np.abs(got - want)) <= TOL * np.max(np.abs(want))
    if kind == "pi":  # the cross terms aside, pi damping adds damping * I to A (x) G exactly
        assert abs(sa * sg - damping) <= TOL
