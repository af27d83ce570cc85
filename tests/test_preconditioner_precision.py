"""K-FAC's and the branch preconditioners' ``matmul_precision``: the products they trace take it.

On an H200 JAX's default float32 product (TF32) put the float32 K-FAC step 4e-3 (MLP) and
6e-2 (CNN) away from the float64 one; at ``"highest"`` 7e-6 and 4e-5. The CPU computes the
same either way, so these tests check the program (every ``dot_general`` the update traces
carries the precision; ``None`` leaves JAX's setting) and that the seeds' adapters keep
JAX's setting.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sr_models import dot_precisions

import fishr
from fishr.compat import qmlhc

HIGHEST = jax.lax.Precision.HIGHEST


def _all(precisions, want) -> bool:
    return bool(precisions) and all(p is not None and all(q == want for q in p) for p in precisions)


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(3, (3, 3))(x))
        x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
        return nn.Dense(2)(x)


def _kfac_problem():
    model = _ConvNet()
    x = jax.random.normal(jax.random.key(0), (6, 5, 5, 2))
    y = jax.random.normal(jax.random.key(1), (6, 2))
    params = model.init(jax.random.key(2), x)
    grads = jax.grad(lambda p: 0.5 * jnp.mean(jnp.sum((model.apply(p, x) - y) ** 2, -1)))(params)
    return model, params, grads, (x, y)


def _kfac_products(build, **options):
    model, params, grads, batch = _kfac_problem()
    tx = build(model.apply, likelihood="gaussian", example_batch=batch, **options)
    extra = {"value": jnp.float32(1.0)} if build is fishr.adaptive_kfac else {}
    jaxpr = jax.make_jaxpr(lambda g, p: tx.update(g, tx.init(p), p, batch=batch, **extra)[0])(grads, params)
    return dot_precisions(jaxpr.jaxpr)


@pytest.mark.parametrize("build", [fishr.kfac, fishr.adaptive_kfac], ids=["kfac", "adaptive_kfac"])
def test_every_kfac_product_takes_the_precision(build):
    highest = _kfac_products(build)
    assert len(highest) >= 6  # the model's passes (conv and dense), the factors, the preconditioned gradient
    assert _all(highest, HIGHEST), highest
    assert _all(_kfac_products(build, matmul_precision="default"), jax.lax.Precision.DEFAULT)
    assert all(p is None for p in _kfac_products(build, matmul_precision=None))


def _branch_problem():
    grads = {"w": jax.random.normal(jax.random.key(0), (7,)), "b": jax.random.normal(jax.random.key(1), (3,))}
    branches = jax.random.normal(jax.random.key(2), (16, 4))
    return grads, branches


@pytest.mark.parametrize("build", [fishr.branch_natgrad, fishr.branch_kfac])
def test_every_branch_product_takes_the_precision(build):
    grads, branches = _branch_problem()

    def products(**options):
        tx = build(1e-2, solver=fishr.Cholesky(), **options)
        run = lambda g, b: tx.update(g, tx.init(g), branches=b)[0]
        return dot_precisions(jax.make_jaxpr(run)(grads, branches).jaxpr)

    assert _all(products(), HIGHEST)
    assert len(products()) >= 3  # P^T g, C, P y
    assert all(p is None for p in products(matmul_precision=None))


@pytest.mark.parametrize("solve", [fishr.branch_natgrad_solve, fishr.branch_kfac_solve])
def test_the_branch_solves_take_the_precision(solve):
    grads, branches = _branch_problem()
    matrix = jax.random.normal(jax.random.key(3), (10, 4))
    products = lambda **o: dot_precisions(jax.make_jaxpr(
        lambda g, b: solve(g, b, matrix, damping=1e-2, solver=fishr.Cholesky(), **o)[0])(grads, branches).jaxpr)
    assert _all(products(), HIGHEST)
    assert all(p is None for p in products(matmul_precision=None))


def test_the_qmlhc_adapter_keeps_the_seeds_products():
    grads, branches = _branch_problem()
    flat = jnp.concatenate([grads["b"], grads["w"]])
    matrix = jax.random.normal(jax.random.key(3), (flat.shape[0], 4))
    fn = qmlhc._kfac_preconditioner  # the jitted solve HCKFACLike calls
    jaxpr = jax.make_jaxpr(fn, static_argnums=4)(flat, branches, matrix, 1e-2, 2)
    products = dot_precisions(jaxpr.jaxpr)
    assert products and all(p is None for p in products)


def test_kfac_results_do_not_depend_on_the_setting_on_this_backend():
    if jax.default_backend() != "cpu":
        pytest.skip("on accelerators the settings differ by design")
    model, params, grads, batch = _kfac_problem()

    def step(precision):
        tx = optax.chain(fishr.kfac(model.apply, 1e-3, likelihood="gaussian", fisher="empirical",
                                    example_batch=batch, matmul_precision=precision), optax.sgd(0.1))
        return jax.jit(lambda g, p: tx.update(g, tx.init(p), p, batch=batch)[0])(grads, params)

    for u, v in zip(jax.tree.leaves(step("highest")), jax.tree.leaves(step(None))):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", ["fastest", 3])
def test_a_bad_precision_is_named(bad):
    model, _, _, batch = _kfac_problem()
    for build, who in ((fishr.kfac, "fishr.kfac"), (fishr.adaptive_kfac, "fishr.adaptive_kfac")):
        with pytest.raises(ValueError, match=f"{who}: `matmul_precision`"):
            build(model.apply, likelihood="gaussian", example_batch=batch, matmul_precision=bad)
    for build, who in ((fishr.branch_natgrad, "fishr.branch_natgrad"), (fishr.branch_kfac, "fishr.branch_kfac")):
        with pytest.raises(ValueError, match=f"{who}: `matmul_precision`"):
            build(1e-2, matmul_precision=bad)
    grads, branches = _branch_problem()
    for solve, who in ((fishr.branch_natgrad_solve, "fishr.branch_natgrad_solve"),
                       (fishr.branch_kfac_solve, "fishr.branch_kfac_solve")):
        with pytest.raises(ValueError, match=f"{who}: `matmul_precision`"):
            solve(grads, branches, jnp.ones((10, 4)), matmul_precision=bad)
