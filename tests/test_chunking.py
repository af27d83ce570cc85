"""``chunk_size``: SR computed chunk by chunk equals the unchunked solve (float64, 1e-12), in every mode
and Jacobian, for chunks that do and do not divide the batch, and on 4 devices; bad values are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_models import ComplexOut, Holomorphic, Mixed, PerPosition
from jax.sharding import PartitionSpec as P
from sr_models import flat, random_like, rel_err, slow

import fishr
from fishr.chunking import map_chunks, num_chunks, sum_chunks

N = 20
TIGHT = fishr.CG(rtol=1e-14, max_steps=2000)
MODELS = {"mixed": (Mixed(), 4, False), "positions": (PerPosition(), 6, False),
          "complex": (ComplexOut(), 4, False), "holomorphic": (Holomorphic(), 4, True)}


def _problem(name, n=N):
    model, d, holomorphic = MODELS[name]
    x = jax.random.normal(jax.random.PRNGKey(1), (n, d))
    params = jax.tree.map(lambda p: p.astype(jnp.promote_types(p.dtype, jnp.float64)),
                          model.init(jax.random.PRNGKey(0), x[:2]))
    grads = random_like(jax.random.PRNGKey(2), params)
    energies = jax.random.normal(jax.random.PRNGKey(3), (n,))
    return model.apply, params, x, grads, energies, holomorphic


def test_map_and_sum_chunks_equal_whole_batch():
    x = jnp.arange(21.0).reshape(7, 3)
    u = jnp.arange(7.0)
    fn = lambda xs: {"sq": xs ** 2, "sum": xs.sum(1)}
    for chunk in (1, 2, 3, 7, 100):
        got = map_chunks(fn, x, chunk)
        np.testing.assert_array_equal(got["sq"], x ** 2)
        np.testing.assert_array_equal(got["sum"], x.sum(1))
        np.testing.assert_allclose(sum_chunks(lambda xs, us: us @ xs, x, u, chunk), u @ x, rtol=1e-15)
    assert [num_chunks(7, c) for c in (None, 1, 2, 3, 7, 8)] == [1, 7, 4, 3, 1, 1]


def _chunked_cases():
    """Every model in every mode; the generic lazy solve (CG over chunked linearisations, the costliest
    to compile) on the complex-output model only in CI's default run."""
    for name in MODELS:
        for mode, jacobian in [("lazy", "generic"), ("lazy", "structured"), ("dense", "generic"),
                               ("sample_space", "generic"), ("sample_space", "structured")]:
            case_id = f"{mode}-{jacobian}-{name}"
            heavy = (mode, jacobian) == ("lazy", "generic") and name != "complex"
            yield slow(name, mode, jacobian, id=case_id) if heavy else pytest.param(name, mode, jacobian, id=case_id)


@pytest.mark.parametrize("name,mode,jacobian", list(_chunked_cases()))
def test_chunked_solve_equals_unchunked(name, mode, jacobian):
    apply_fn, params, x, grads, energies, holomorphic = _problem(name)
    solver = TIGHT if mode != "sample_space" else None
    if mode == "dense":
        solver = fishr.Cholesky()
    kw = dict(damping=1e-3, mode=mode, jacobian=jacobian, holomorphic=holomorphic, solver=solver)
    if mode == "sample_space":
        kw["local_energies"] = energies
    solve = jax.jit(lambda g, p, b, chunk: fishr.sr_solve(apply_fn, g, p, b, chunk_size=chunk, **kw)[0],
                    static_argnums=3)
    whole = flat(solve(grads, params, x, None))
    # 20 = 3 x 6 + 2: the last chunk padded (chunks that divide the batch: test_map_and_sum_chunks...)
    assert rel_err(flat(solve(grads, params, x, 6)), whole) < 1e-12


def test_chunked_transform_with_momentum_and_robust_sr():
    apply_fn, params, x, grads, energies, _ = _problem("mixed")

    def run(chunk):
        tx = fishr.sr(apply_fn, 1e-3, mode="sample_space", momentum=0.5, gamma=1.0, chunk_size=chunk)
        state = tx.init(params)
        update = jax.jit(lambda g, s: tx.update(g, s, params, batch=x, local_energies=energies))
        for _ in range(2):
            u, state = update(grads, state)
        return flat(u)

    assert rel_err(run(3), run(None)) < 1e-12


def test_chunked_multidevice_equals_one_device():
    apply_fn, params, x, grads, energies, _ = _problem("mixed", n=32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("d",))
    for mode in ("lazy", "sample_space"):
        kw = dict(damping=1e-3, mode=mode, solver=TIGHT if mode == "lazy" else None)
        one = flat(jax.jit(lambda xs, es: fishr.sr_solve(apply_fn, grads, params, xs, local_energies=es, **kw)[0])(
            x, energies))

        def local(xs, es):
            return fishr.sr_solve(apply_fn, grads, params, xs, local_energies=es, axis_name="d", chunk_size=3,
                                  **kw)[0]

        many = jax.jit(jax.shard_map(lambda xs, es: jax.tree.map(lambda a: a[None], local(xs, es)), mesh=mesh,
                                     in_specs=(P("d"), P("d")), out_specs=P("d"), check_vma=False))(x, energies)
        for device in range(4):
            assert rel_err(flat(jax.tree.map(lambda a: a[device], many)), one) < 1e-12, (mode, device)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_bad_chunk_size_is_refused(bad):
    apply_fn, params, x, grads, _, _ = _problem("mixed")
    with pytest.raises(ValueError, match="chunk_size"):
        fishr.sr_solve(apply_fn, grads, params, x, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        fishr.sr(apply_fn, chunk_size=bad)


@pytest.mark.parametrize("solver", [None, fishr.Spectral(rtol=1e-10)], ids=["cholesky", "spectral"])
def test_sharded_rows_kernel_by_column_slabs_equals_one_device(monkeypatch, solver):
    """Generic sample-space rows stay on their device; the kernel comes from gathered column slabs
    (3 columns per slab here, so 15 full slabs and a remainder) and equals one device's solve."""
    monkeypatch.setattr(fishr.jacobian, "GATHER_ELEMENTS", 100)
    apply_fn, params, x, grads, energies, _ = _problem("mixed", n=8)
    kw = dict(damping=1e-3, mode="sample_space", jacobian="generic", solver=solver)
    one = flat(jax.jit(lambda g, p: fishr.sr_solve(apply_fn, g, p, x, local_energies=energies, **kw)[0])(
        grads, params))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("d",))

    def local(xs, es):
        jac = fishr.jacobian.DenseJacobian.build(lambda p, s: apply_fn(p, s[None])[:1], params, xs, False, "d")
        assert isinstance(jac.gather(), fishr.jacobian.ShardedRowsJacobian)  # the path under test
        x_local = fishr.sr_solve(apply_fn, grads, params, xs, local_energies=es, axis_name="d", **kw)[0]
        return jax.tree.map(lambda a: a[None], x_local)

    many = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d"),
                                 check_vma=False))(x, energies)
    for device in range(4):
        assert rel_err(flat(jax.tree.map(lambda a: a[device], many)), one) < 1e-12, device
