"""SR's ``matmul_precision``: every matrix product traced inside the solve takes it.

On GPUs JAX's default float32 product rounds its factors to TF32 (10-bit mantissa): the
float32 sample-space update on an H200 then had errors of 6e-4 to 1e-2 against the float64
reference instead of 1e-5. The CPU computes the same either way, so these tests check the
program: every ``dot_general`` (the model's forward and backward passes included) carries
the requested precision, and ``None`` leaves JAX's setting alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax_models import MLP
from sr_models import dot_precisions, mlp_log_psi, mlp_params, random_like

import fishr


def _is(precision, want) -> bool:
    return precision is not None and all(p == want for p in precision)


def _flax_problem():
    model = MLP(width=6)
    x = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(0), 0.5, (16, 4)), 1.0, -1.0).astype(jnp.float32)
    params = model.init(jax.random.PRNGKey(1), x[:2])
    return model.apply, params, x


@pytest.mark.parametrize("mode,jacobian", [("sample_space", "structured"), ("sample_space", "generic"),
                                           ("dense", "auto"), ("lazy", "auto")])
def test_every_product_in_the_solve_takes_the_precision(mode, jacobian):
    apply, params, x = _flax_problem()
    grads = random_like(jax.random.PRNGKey(2), params)
    energies = jnp.linspace(-1.0, 1.0, x.shape[0], dtype=jnp.float32)

    def solve(precision):
        kw = {} if precision == "default-arg" else {"matmul_precision": precision}
        return jax.make_jaxpr(lambda g, p, b, e: fishr.sr_solve(
            apply, g, p, b, damping=1e-2, mode=mode, jacobian=jacobian,
            local_energies=e if mode == "sample_space" else None, **kw)[0])(grads, params, x, energies).jaxpr

    highest = dot_precisions(solve("default-arg"))
    assert len(highest) >= 4  # the model's passes and the solve's products
    assert all(_is(p, jax.lax.Precision.HIGHEST) for p in highest), highest
    # None leaves JAX's setting: the products fishr and the model write carry none (optax's
    # tree_vdot sets HIGHEST itself); "default" is set on all of those
    unset = dot_precisions(solve(None))
    assert sum(p is None for p in unset) >= len(highest) - sum(_is(p, jax.lax.Precision.HIGHEST) for p in unset) > 0
    default = dot_precisions(solve("default"))
    assert not any(p is None for p in default) and any(_is(p, jax.lax.Precision.DEFAULT) for p in default)


def test_the_transform_takes_the_precision_and_leaves_the_callers_products():
    params = mlp_params(jax.random.PRNGKey(0), n_in=4, hidden=5, dtype=jnp.float32)
    x = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(1), 0.5, (12, 4)), 1.0, -1.0).astype(jnp.float32)
    gradient = lambda p, b: jax.grad(lambda q: mlp_log_psi(q, b).mean())(p)  # the caller's own products

    def step(precision):
        opt = optax.chain(fishr.sr(mlp_log_psi, damping=1e-2, mode="sample_space", matmul_precision=precision),
                          optax.sgd(0.1))
        run = lambda p, b: opt.update(gradient(p, b), opt.init(p), p, batch=b)[0]
        return dot_precisions(jax.make_jaxpr(run)(params, x).jaxpr)

    callers = dot_precisions(jax.make_jaxpr(gradient)(params, x).jaxpr)
    assert callers and all(p is None for p in callers)
    every = step("highest")
    assert sum(p is None for p in every) == len(callers)  # only the caller's products keep JAX's setting
    assert sum(_is(p, jax.lax.Precision.HIGHEST) for p in every) == len(every) - len(callers) > 0
    assert sum(p is None for p in step(None)) > len(callers)


def test_float32_results_do_not_depend_on_the_setting_on_this_backend():
    if jax.default_backend() != "cpu":
        pytest.skip("on accelerators the settings differ by design")
    apply, params, x = _flax_problem()
    grads = random_like(jax.random.PRNGKey(2), params)
    energies = jnp.linspace(-1.0, 1.0, x.shape[0], dtype=jnp.float32)
    run = lambda prec: jax.jit(lambda g, p: fishr.sr_solve(apply, g, p, x, damping=1e-2, mode="sample_space",
                                                           local_energies=energies, matmul_precision=prec)[0])(
        grads, params)
    a, b = run("highest"), run(None)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert jnp.allclose(u, v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", ["fastest", 3, "HIGHEST!"])
def test_a_bad_precision_is_named(bad):
    with pytest.raises(ValueError, match="matmul_precision"):
        fishr.sr(mlp_log_psi, matmul_precision=bad)
    with pytest.raises(ValueError, match="fishr.sr_solve: `matmul_precision`"):
        fishr.sr_solve(mlp_log_psi, {"w": jnp.ones(2)}, {"w": jnp.ones(2)}, jnp.ones((3, 2)), damping=1e-2,
                       matmul_precision=bad)
