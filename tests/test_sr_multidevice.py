"""SR with samples split over 4 simulated CPU devices equals SR on one device with all samples."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from sr_models import flat, mlp_complex_log_psi, mlp_log_psi, mlp_params, random_like

import fishr

NDEV = 4
TIGHT = fishr.CG(rtol=1e-14, max_steps=2000)
MODES = [("lazy", TIGHT), ("dense", TIGHT), ("dense", fishr.Cholesky()), ("sample_space", None)]


@pytest.fixture(scope="module")
def problem():
    assert jax.device_count() >= NDEV, "tests/conftest.py should simulate 4 CPU devices"
    params = mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 3))
    grad = random_like(jax.random.PRNGKey(2), params)
    return params, x, grad


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:NDEV]), ("devices",))


def _split(x):
    return x.reshape(NDEV, x.shape[0] // NDEV, *x.shape[1:])


def _per_device_results_identical(tree):
    for leaf in jax.tree.leaves(tree):
        leaf = np.asarray(leaf)
        for d in range(1, NDEV):
            np.testing.assert_array_equal(leaf[d], leaf[0])


def _assert_close(a, b, tol=1e-10):
    a, b = flat(a), flat(b)
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b)))


@pytest.mark.parametrize("log_psi", [mlp_log_psi, mlp_complex_log_psi], ids=["real", "complex"])
@pytest.mark.parametrize("mode,solver", MODES, ids=["lazy", "dense-cg", "dense-cholesky", "sample_space"])
def test_pmap_and_shard_map_equal_single_device(problem, log_psi, mode, solver):
    params, x, grad = problem
    kw = dict(damping=1e-3, mode=mode, solver=solver)
    single = jax.jit(lambda g, p, s: fishr.sr_solve(log_psi, g, p, s, **kw)[0])(grad, params, x)

    solve = lambda g, p, s: fishr.sr_solve(log_psi, g, p, s, axis_name="devices", **kw)[0]

    pmapped = jax.pmap(solve, axis_name="devices", in_axes=(None, None, 0))(grad, params, _split(x))
    _per_device_results_identical(pmapped)
    _assert_close(jax.tree.map(lambda a: a[0], pmapped), single)

    mesh = _mesh()
    sharded = jax.jit(jax.shard_map(
        lambda g, p, s: jax.tree.map(lambda a: a[None], solve(g, p, s)),
        mesh=mesh, in_specs=(P(), P(), P("devices")), out_specs=P("devices"), check_vma=False,
    ))(grad, params, x)
    _per_device_results_identical(sharded)
    _assert_close(jax.tree.map(lambda a: a[0], sharded), single)


@pytest.mark.parametrize("mode,solver", MODES, ids=["lazy", "dense-cg", "dense-cholesky", "sample_space"])
def test_transform_in_chain_under_pmap_and_shard_map(problem, mode, solver):
    params, x, grad = problem
    make = lambda axis_name: optax.chain(
        fishr.sr(mlp_log_psi, damping=1e-3, mode=mode, solver=solver, momentum=0.5, axis_name=axis_name),
        optax.sgd(0.1),
    )
    single = make(None)
    s_state = single.init(params)
    single_update = jax.jit(single.update)
    for _ in range(2):  # two steps, so the momentum state is exercised
        s_upd, s_state = single_update(grad, s_state, params, batch=x)

    multi = make("devices")
    state = multi.init(params)

    def two_steps(g, st, p, s):
        for _ in range(2):
            u, st = multi.update(g, st, p, batch=s)
        return u, st

    upd, st = jax.pmap(two_steps, axis_name="devices", in_axes=(None, None, None, 0))(grad, state, params, _split(x))
    _per_device_results_identical(upd)
    _assert_close(jax.tree.map(lambda a: a[0], upd), s_upd)
    assert int(st[0].count[0]) == 2

    mesh = _mesh()
    upd, _ = jax.jit(jax.shard_map(
        two_steps, mesh=mesh, in_specs=(P(), P(), P(), P("devices")), out_specs=P(), check_vma=False,
    ))(grad, state, params, x)
    _assert_close(upd, s_upd)
