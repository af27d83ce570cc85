"""Sharded jax.Array inputs under plain jax.jit (no axis_name): every transform equals one device.

The samples are placed with a ``NamedSharding`` over 4 simulated CPU devices and the
parameters replicated; ``jax.jit`` partitions the computation (GSPMD) and fishr's batch
means are ordinary means over the global array, so no ``axis_name`` is passed. The
results must equal the same call on unsharded arrays to 1e-12 (float64).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sr_models import flat, mlp_complex_log_psi, mlp_log_psi, mlp_params, random_like, rel_err

import fishr

NDEV = 4


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= NDEV, "tests/conftest.py should simulate 4 CPU devices"
    return jax.sharding.Mesh(np.array(jax.devices()[:NDEV]), ("batch",))


def _shard(mesh, x):
    return jax.device_put(x, NamedSharding(mesh, P("batch")))


def _replicate(mesh, tree):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _update(opt, grad, params, **extra):
    @jax.jit
    def step(grad, params, extra):
        return opt.update(grad, opt.init(params), params, **extra)[0]

    return step(grad, params, extra)


@pytest.mark.parametrize("log_psi,mode,solver", [
    (mlp_log_psi, "lazy", fishr.CG(rtol=1e-14, max_steps=2000)),
    (mlp_log_psi, "dense", fishr.Cholesky()),
    (mlp_complex_log_psi, "sample_space", None),
    (mlp_complex_log_psi, "auto", None),
], ids=["real-lazy", "real-dense", "complex-sample_space", "complex-auto"])
def test_sr_under_jit_with_sharded_samples(mesh, log_psi, mode, solver):
    params = mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 3))
    grad = random_like(jax.random.PRNGKey(2), params)
    e_loc = jax.random.normal(jax.random.PRNGKey(3), (32,))
    opt = fishr.sr(log_psi, 1e-3, mode=mode, solver=solver)
    extra = {"local_energies": e_loc} if mode in ("sample_space", "auto") else {}
    one = _update(opt, grad, params, batch=x, **extra)
    sharded_extra = {k: _shard(mesh, v) for k, v in extra.items()}
    many = _update(opt, _replicate(mesh, grad), _replicate(mesh, params), batch=_shard(mesh, x), **sharded_extra)
    assert rel_err(flat(many), flat(one)) <= 1e-12


def test_lazy_layer_statistics_under_jit_with_sharded_samples(mesh):
    """Lazy mode's products from a Flax model's captured statistics (jacobian="auto"), samples sharded."""
    from flax_models import MLP

    model = MLP()
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 4))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), jax.jit(model.init)(jax.random.PRNGKey(0), x))
    grad = random_like(jax.random.PRNGKey(2), params)
    opt = fishr.sr(model.apply, 1e-3, mode="lazy", solver=fishr.CG(rtol=1e-14, max_steps=2000))
    one = _update(opt, grad, params, batch=x)
    many = _update(opt, _replicate(mesh, grad), _replicate(mesh, params), batch=_shard(mesh, x))
    generic = _update(fishr.sr(model.apply, 1e-3, mode="lazy", solver=fishr.CG(rtol=1e-14, max_steps=2000),
                               jacobian="generic"), grad, params, batch=x)
    assert rel_err(flat(many), flat(one)) <= 1e-12
    assert rel_err(flat(one), flat(generic)) <= 1e-10


def _mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def test_kfac_and_adaptive_kfac_under_jit_with_sharded_batch(mesh):
    from kfac_models import DenseNormNet as Net

    x = jax.random.normal(jax.random.PRNGKey(1), (32, 4))
    y = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 3)
    params = Net().init(jax.random.PRNGKey(0), x)
    grad = random_like(jax.random.PRNGKey(3), params)
    for opt in (fishr.kfac(Net().apply, 1e-2, likelihood="categorical", example_batch=(x, y)),
                fishr.adaptive_kfac(Net().apply, "categorical", example_batch=(x, y))):
        one = _update(opt, grad, params, batch=(x, y))
        many = _update(opt, _replicate(mesh, grad), _replicate(mesh, params),
                       batch=(_shard(mesh, x), _shard(mesh, y)))
        assert rel_err(flat(many), flat(one)) <= 1e-12


def test_branch_natgrad_under_jit_with_sharded_branches(mesh):
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (5,))}
    branches = jax.random.normal(jax.random.PRNGKey(1), (16, 5))
    grad = random_like(jax.random.PRNGKey(2), params)
    for opt in (fishr.branch_natgrad(1e-2, solver=fishr.Cholesky()), fishr.branch_kfac(1e-2)):
        one = _update(opt, grad, params, branches=branches)
        many = _update(opt, _replicate(mesh, grad), _replicate(mesh, params), branches=_shard(mesh, branches))
        assert rel_err(flat(many), flat(one)) <= 1e-12
