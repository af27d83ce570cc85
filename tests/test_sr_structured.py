"""Structured exact SR (captured layer statistics) equals the generic Jacobian path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import fishr
from fishr import _sample_space as sample_space_mod
from fishr import _sr_solve as sr_solve_mod
from fishr import jacobian as jac_mod
from fishr.capture import discover_layers
from flax_models import MLP, RBM, ComplexOut, Holomorphic, Mixed, PerPosition
from sr_models import flat, random_like, rel_err

NDEV = 4
TIGHT = fishr.CG(rtol=1e-14, max_steps=3000)


def _f64(tree):
    return jax.tree.map(lambda p: p.astype(jnp.promote_types(p.dtype, jnp.float64)), tree)


@functools.lru_cache(maxsize=None)
def _case(name, n=16):
    key = jax.random.PRNGKey(0)
    spins = lambda d: jnp.sign(jax.random.normal(key, (n, d)))
    model, x, holo = {
        "mlp": (MLP(), jax.random.normal(key, (n, 4)), False),
        "rbm": (RBM(), spins(6), False),
        "per_position": (PerPosition(), jax.random.normal(key, (n, 8)), False),
        "mixed": (Mixed(), jax.random.normal(key, (n, 4)), False),
        "complex_out": (ComplexOut(), jax.random.normal(key, (n, 4)), False),
        "holomorphic": (Holomorphic(), spins(6), True),
    }[name]
    params = _f64(model.init(jax.random.PRNGKey(1), x))
    grad = random_like(jax.random.PRNGKey(2), params)
    return model.apply, params, x, grad, holo


CASES = ["mlp", "rbm", "per_position", "mixed", "complex_out", "holomorphic"]


def _jacobian(structured, log_psi, params, x, holo):
    """The Jacobian representation SR's sample-space path builds (structured or explicit rows)."""
    config = sr_solve_mod.sr_config("test", damping=1e-3, mode="sample_space", solver=None, jacobian="auto",
                                    momentum=0.0, holomorphic=holo, axis_name=None)
    return sr_solve_mod._build_jacobian(structured, log_psi, params, x, config, "test")


def _sr_plan(name):
    """The layer plan that SR's structured path really uses (not just what discovery could find)."""
    log_psi, params, x, _, holo = _case(name)
    return _jacobian(True, log_psi, params, x, holo).plan


def test_models_exercise_what_they_claim():
    plan = _sr_plan
    assert len(plan("mlp").layers) == 3 and plan("mlp").uncovered == ()
    assert plan("per_position").layers[0].positions == 4  # one dense layer at 4 positions
    assert len(plan("mixed").uncovered) == 1  # the gate is in no Dense layer
    assert len(plan("per_position").uncovered) == 1  # the scale
    for name in CASES:  # the SR path captures every layer that discovery finds
        assert _sr_plan(name).layers == discover_layers(*_case(name)[:3]).layers


@pytest.mark.parametrize("mode", ["lazy", "sample_space"])
@pytest.mark.parametrize("name", CASES)
def test_structured_equals_generic(name, mode):
    log_psi, params, x, grad, holo = _case(name)
    kw = dict(damping=1e-3, mode=mode, holomorphic=holo, solver=TIGHT if mode == "lazy" else None)
    solve = lambda jacobian: jax.jit(lambda g, p, s: fishr.sr_solve(log_psi, g, p, s, jacobian=jacobian, **kw))
    generic, _ = solve("generic")(grad, params, x)
    structured, info = solve("structured")(grad, params, x)
    assert rel_err(flat(structured), flat(generic)) <= 1e-10
    assert float(info.residual_norm) <= 1e-8 * np.linalg.norm(flat(grad))


@pytest.mark.parametrize("name", CASES)
def test_layer_products_and_kernel_equal_explicit_rows(name):
    log_psi, params, x, grad, holo = _case(name)
    layer = _jacobian(True, log_psi, params, x, holo)
    dense = _jacobian(False, log_psi, params, x, holo)
    np.testing.assert_allclose(layer.gram(), dense.gram(), rtol=1e-10, atol=1e-10 * np.abs(dense.gram()).max())
    np.testing.assert_allclose(layer.matvec(grad), dense.matvec(grad), rtol=1e-10, atol=1e-12)
    u = jax.random.normal(jax.random.PRNGKey(4), dense.rows.shape[:2])
    np.testing.assert_allclose(flat(layer.rmatvec(u)), flat(dense.rmatvec(u)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "per_position", "complex_out"])
def test_kernel_tiles_and_upper_kernel(name):
    """``gram_tiles()`` and ``gram(upper_only=True)`` against the full kernel.

    n = 650 samples make uneven sample ranges (three of 217, 216, 217 for one
    component); the tiles on and below the diagonal, and the upper triangle that
    the LAPACK path reads (zeros below its tiles), equal the full kernel's.
    """
    n = 650
    log_psi, params, x, grad, holo = _case(name, n=n)
    layer = _jacobian(True, log_psi, params, x, holo)
    dense = _jacobian(False, log_psi, params, x, holo)
    full = np.asarray(dense.gram())
    c = full.shape[0] // n
    tol = dict(rtol=1e-10, atol=1e-10 * np.abs(full).max())
    ranges = jac_mod._sample_ranges(n, c)
    assert len(ranges) == round(n * c / 256) and sum(j - i for i, j in ranges) == n
    if c == 1:
        assert [j - i for i, j in ranges] == [217, 216, 217]
    for jac in (layer, dense):
        tiles = jac.gram_tiles()
        assert [len(row) for row in tiles] == list(range(1, len(ranges) + 1))
        for a, (i0, i1) in enumerate(ranges):
            for b, (j0, j1) in enumerate(ranges[: a + 1]):
                np.testing.assert_allclose(tiles[a][b], full[i0 * c:i1 * c, j0 * c:j1 * c], **tol)
    upper_ranges = jac_mod._sample_ranges(n, c, 8)
    below = np.zeros(full.shape, bool)  # strictly below the diagonal tiles
    for i0, i1 in upper_ranges:
        below[i0 * c:i1 * c, :i0 * c] = True
    for jac in (layer, dense):
        upper = np.asarray(jac.gram(upper_only=True))
        np.testing.assert_array_equal(upper[below], 0)
        np.testing.assert_allclose(upper[~below], full[~below], **tol)


def test_sample_ranges_rule():
    assert jac_mod._sample_ranges(100, 1) == [(0, 100)]
    assert len(jac_mod._sample_ranges(4096, 1)) == 16 and len(jac_mod._sample_ranges(4096, 1, 8)) == 8
    assert len(jac_mod._sample_ranges(4096, 2)) == 32 and len(jac_mod._sample_ranges(4096, 1, 1)) == 1


@pytest.mark.parametrize("name", ["mlp", "complex_out", "holomorphic"])
@pytest.mark.parametrize("jacobian", ["structured", "generic"])
def test_kernel_factorisations_agree(monkeypatch, name, jacobian):
    """The sample-space solve by tiles (the CPU's single-precision path), by a float32
    tiled factor refined in float64 (the CPU's double-precision path) and by LAPACK on
    the assembled kernel (accelerators) give the same update to 1e-10 in float64."""
    log_psi, params, x, grad, holo = _case(name, n=650)
    out = {}
    for kind in ("tiled", "mixed", "lapack"):
        monkeypatch.setattr(sample_space_mod, "kernel_factorisation", lambda single_precision, kind=kind: kind)
        out[kind], info = fishr.sr_solve(log_psi, grad, params, x, damping=1e-3, mode="sample_space",
                                         holomorphic=holo, jacobian=jacobian)
        assert float(info.residual_norm) <= 1e-8 * np.linalg.norm(flat(grad))
    assert rel_err(flat(out["tiled"]), flat(out["lapack"])) <= 1e-10
    assert rel_err(flat(out["mixed"]), flat(out["lapack"])) <= 1e-12  # refined to float64's own accuracy


def test_mixed_precision_falls_back_to_the_float64_factor(monkeypatch):
    """At damping 1e-7 the float32 factorisation of the rank-deficient kernel (N = 650 > P = 121)
    breaks down; the refinement stops unconverged and the float64 LAPACK solve runs instead.
    (The two float64 solves are compiled apart and round differently: cond ~ 1e8 here.)"""
    log_psi, params, x, grad, holo = _case("mlp", n=650)
    seen = []
    real_refine = sample_space_mod.mixed_precision_refine

    def spy(*args, **kwargs):
        x_, converged, k = real_refine(*args, **kwargs)
        jax.debug.callback(lambda c: seen.append(bool(c)), converged)
        return x_, converged, k

    monkeypatch.setattr(sample_space_mod, "mixed_precision_refine", spy)
    out, info = {}, {}
    for kind in ("mixed", "lapack"):
        monkeypatch.setattr(sample_space_mod, "kernel_factorisation", lambda single_precision, kind=kind: kind)
        out[kind], info[kind] = fishr.sr_solve(log_psi, grad, params, x, damping=1e-7, mode="sample_space")
    assert seen == [False]
    assert int(info["mixed"].fallback) == 1 and int(info["lapack"].fallback) == 0
    assert np.isfinite(flat(out["lapack"])).all()
    assert rel_err(flat(out["mixed"]), flat(out["lapack"])) <= 1e-9


def test_kernel_factorisation_rule():
    rule = sample_space_mod.kernel_factorisation
    if jax.default_backend() == "cpu":
        assert rule(True) == "tiled" and rule(False) == "mixed"
    else:
        assert rule(True) == rule(False) == "lapack"


@pytest.mark.parametrize("name", ["mlp", "complex_out", "holomorphic"])
def test_structured_equals_generic_over_several_sample_ranges(name):
    log_psi, params, x, grad, holo = _case(name, n=650)
    kw = dict(damping=1e-3, mode="sample_space", holomorphic=holo)
    solve = lambda jacobian: jax.jit(lambda g, p, s: fishr.sr_solve(log_psi, g, p, s, jacobian=jacobian, **kw))
    generic, _ = solve("generic")(grad, params, x)
    structured, info = solve("structured")(grad, params, x)
    assert rel_err(flat(structured), flat(generic)) <= 1e-10
    assert float(info.residual_norm) <= 1e-8 * np.linalg.norm(flat(grad))


@pytest.mark.parametrize("force", [True, False], ids=["gram_hadamard", "via_per_sample_G"])
def test_both_kernel_forms_for_repeated_layers(monkeypatch, force):
    """A per-position layer (T = 4) through each of the two exact kernel forms."""
    monkeypatch.setattr(jac_mod, "layer_kernel_is_structured", lambda *shape: force)
    log_psi, params, x, grad, _ = _case("per_position")
    generic, _ = fishr.sr_solve(log_psi, grad, params, x, damping=1e-3, mode="sample_space", jacobian="generic")
    structured, _ = fishr.sr_solve(log_psi, grad, params, x, damping=1e-3, mode="sample_space", jacobian="structured")
    assert rel_err(flat(structured), flat(generic)) <= 1e-10


def test_kernel_choice_rule():
    # a plain dense layer (T = 1) always takes the Gram-Hadamard form ...
    assert jac_mod.layer_kernel_is_structured(1024, 1, 1, 65, 64)
    assert jac_mod.layer_kernel_is_structured(4096, 2, 1, 257, 256)
    # ... a layer repeated at many positions with few features does not
    assert not jac_mod.layer_kernel_is_structured(1024, 1, 64, 3, 4)


def test_auto_uses_layers_for_sample_space_only_when_some_are_captured(monkeypatch):
    calls = []
    original = jac_mod.LayerJacobian.build
    monkeypatch.setattr(jac_mod.LayerJacobian, "build", classmethod(
        lambda cls, *a, **k: calls.append(1) or original.__func__(cls, *a, **k)))
    log_psi, params, x, grad, _ = _case("mlp")
    fishr.sr_solve(log_psi, grad, params, x, mode="sample_space")
    assert calls == [1]
    from sr_models import mlp_log_psi, mlp_params  # a plain-jnp model: nothing to capture
    p = mlp_params(jax.random.PRNGKey(0))
    fishr.sr_solve(mlp_log_psi, p, p, jax.random.normal(jax.random.PRNGKey(1), (8, 3)), mode="sample_space")
    assert calls == [1]


def test_structured_rejected_for_dense_mode():
    with pytest.raises(ValueError, match="jacobian='structured' applies to modes"):
        fishr.sr(MLP().apply, mode="dense", jacobian="structured")
    with pytest.raises(ValueError, match="`jacobian` must be one of"):
        fishr.sr(MLP().apply, jacobian="layers")


@pytest.mark.parametrize("mode", ["lazy", "sample_space"])
@pytest.mark.parametrize("name", ["mixed", "complex_out"])
def test_structured_multidevice(name, mode):
    log_psi, params, x, grad, holo = _case(name, n=32)
    kw = dict(damping=1e-3, mode=mode, holomorphic=holo, jacobian="structured", solver=TIGHT if mode == "lazy" else None)
    single, _ = fishr.sr_solve(log_psi, grad, params, x, **kw)
    solve = lambda g, p, s: fishr.sr_solve(log_psi, g, p, s, axis_name="d", **kw)[0]

    pmapped = jax.pmap(solve, axis_name="d", in_axes=(None, None, 0))(grad, params, x.reshape(NDEV, -1, x.shape[-1]))
    for leaf in jax.tree.leaves(pmapped):
        for dev in range(1, NDEV):
            np.testing.assert_array_equal(np.asarray(leaf[dev]), np.asarray(leaf[0]))
    assert rel_err(flat(jax.tree.map(lambda a: a[0], pmapped)), flat(single)) <= 1e-10

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:NDEV]), ("d",))
    sharded = jax.jit(jax.shard_map(solve, mesh=mesh, in_specs=(P(), P(), P("d")), out_specs=P(),
                                    check_vma=False))(grad, params, x)
    assert rel_err(flat(sharded), flat(single)) <= 1e-10
