"""The public API: every public module imports by its dotted path, one name per function, and
every state type round-trips through flax.serialization with bit-identical later updates."""

import importlib
import inspect
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization
from kfac_models import MLP, init, random_like
from sr_models import mlp_log_psi, mlp_params

import fishr

PUBLIC_MODULES = [
    "fishr",
    "fishr.capture",
    "fishr.compat",
    "fishr.compat.qmlhc",
    "fishr.compat.ruvector",
    "fishr.compat.vmcnet",
    "fishr.distributed",
    "fishr.jacobian",
    "fishr.kronecker",
    "fishr.linalg",
    "fishr.scores",
    "fishr.solvers",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_module_imports_by_dotted_path(name):
    module = importlib.import_module(name)
    assert isinstance(module, types.ModuleType) and module.__name__ == name
    for attr in getattr(module, "__all__", []):
        assert hasattr(module, attr), f"{name}.__all__ lists {attr!r}, which it does not define"
    if name != "fishr":  # `import fishr.x as m` binds the module, never a function of the same name
        parent, _, child = name.rpartition(".")
        assert getattr(importlib.import_module(parent), child) is module


def test_no_public_function_has_a_second_name():
    """Wherever a public function or class is exported, it is exported under its own name."""
    seen = {}
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                assert attr == obj.__name__, f"{name}.{attr} is {obj.__module__}.{obj.__name__}"
                seen.setdefault(id(obj), set()).add(attr)
    assert all(len(names) == 1 for names in seen.values())


def test_one_vocabulary_across_the_transforms():
    """The per-sample function is apply_fn, the batch extra argument batch=, the key key=."""
    for factory in (fishr.sr, fishr.kfac):
        assert list(inspect.signature(factory).parameters)[:2] == ["apply_fn", "damping"]
    for factory in (fishr.sr_solve,):
        assert list(inspect.signature(factory).parameters)[:4] == ["apply_fn", "grads", "params", "batch"]
    for factory in (fishr.kfac, fishr.branch_natgrad, fishr.branch_kfac):
        assert "key" in inspect.signature(factory).parameters
    for solve in (fishr.branch_natgrad_solve, fishr.branch_kfac_solve, fishr.sr_solve):
        assert "solver" in inspect.signature(solve).parameters
    for factory in (fishr.sr, fishr.kfac, fishr.branch_natgrad, fishr.branch_kfac):
        params = inspect.signature(factory).parameters
        assert not {"seed", "tol", "maxiter", "cg_iters", "warm_start", "inverse_method"} & set(params)


def test_every_solve_returns_x_and_solve_info():
    params = mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    grads = random_like(jax.random.PRNGKey(2), params)
    branches = np.random.default_rng(0).normal(size=(6, 4))
    projection = np.random.default_rng(1).normal(size=(jax.flatten_util.ravel_pytree(grads)[0].size, 4))
    outs = [jax.jit(lambda g, p, m=m: fishr.sr_solve(mlp_log_psi, g, p, x, mode=m))(grads, params)
            for m in fishr.SR_MODES]
    outs.append(fishr.branch_natgrad_solve(grads, branches, projection))
    outs.append(fishr.branch_kfac_solve(grads, branches, projection))
    for out in outs:
        assert isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], fishr.SolveInfo)
        assert out[1].iterations.dtype == jnp.int32 and out[1].converged.dtype == jnp.bool_
        assert jax.tree.structure(out[0]) == jax.tree.structure(grads)


# --------------------------------------------------------------------------- serialisation


def _roundtrip_then_equal(tx, params, grads, extra, steps=3):
    """Run `steps` updates; after the first, serialise the state, restore it into a fresh
    template and continue both: every later update must be bit-identical."""
    update = jax.jit(lambda g, s, p, e: tx.update(g, s, p, **e))
    state = tx.init(params)
    _, state = update(grads, state, params, extra)
    restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for _ in range(steps - 1):
        u1, state = update(grads, state, params, extra)
        u2, restored = update(grads, restored, params, extra)
        for a, b in zip(jax.tree.leaves((u1, state)), jax.tree.leaves((u2, restored))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mode", ["lazy", "dense", "sample_space"])
def test_sr_state_round_trips(mode):
    params = mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    grads = random_like(jax.random.PRNGKey(2), params)
    solver = fishr.CG(initial_guess="previous") if mode != "sample_space" else None
    tx = fishr.sr(mlp_log_psi, 1e-2, mode=mode, solver=solver, momentum=0.5)
    _roundtrip_then_equal(tx, params, grads, dict(batch=x))


def test_kfac_state_round_trips():
    model = MLP(features=(5, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 4), jnp.float64)
    y = jax.random.randint(jax.random.PRNGKey(2), (16,), 0, 3)
    params = init(model, x)
    grads = random_like(jax.random.PRNGKey(3), params)
    tx = fishr.kfac(model.apply, 1e-2, likelihood="categorical", example_batch=(x, y), key=jax.random.key(4),
                    inverse_every=2)
    _roundtrip_then_equal(tx, params, grads, dict(batch=(x, y)))


@pytest.mark.parametrize("factory", [fishr.branch_natgrad, fishr.branch_kfac])
def test_branch_state_round_trips(factory):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=4))}
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    branches = jnp.asarray(rng.normal(size=(6, 5)))
    tx = factory(1e-3, key=jax.random.key(9))
    _roundtrip_then_equal(tx, params, grads, dict(branches=branches))


def test_chain_state_round_trips_in_an_optax_chain():
    params = mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    grads = random_like(jax.random.PRNGKey(2), params)
    tx = optax.chain(fishr.sr(mlp_log_psi, 1e-2), optax.apply_if_finite(optax.adam(1e-2), 3))
    _roundtrip_then_equal(tx, params, grads, dict(batch=x))


def test_a_flax_dense_model_runs_through_every_method():
    """A smoke check of the documented calls on one Flax model: sr (each mode) and kfac."""
    model = nn.Dense(1)
    x = jax.random.normal(jax.random.PRNGKey(0), (12, 3))
    params = model.init(jax.random.PRNGKey(1), x)
    apply = lambda p, s: model.apply(p, s)[:, 0]
    grads = jax.tree.map(jnp.ones_like, params)
    for mode in fishr.SR_MODES:  # jitted: op by op these take several times longer (README examples run eagerly)
        tx = fishr.sr(apply, 1e-2, mode=mode)
        out, _ = jax.jit(tx.update)(grads, tx.init(params), params, batch=x)
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out))
    tx = fishr.kfac(apply, 1e-2, example_batch=x)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params, batch=x)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out))
