"""Structured exact SR (captured layer statistics) equals the generic Jacobian path."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_models import MLP, RBM, ComplexOut, Holomorphic, Mixed, PerPosition
from jax.sharding import PartitionSpec as P
from sr_models import flat, random_like, rel_err, slow

import fishr
from fishr import _sample_space as sample_space_mod
from fishr import _sr_solve as sr_solve_mod
from fishr import jacobian as jac_mod
from fishr.capture import discover_layers

NDEV = 4
TIGHT = fishr.CG(rtol=1e-14, max_steps=3000)


def _f64(tree):
    return jax.tree.map(lambda p: p.astype(jnp.promote_types(p.dtype, jnp.float64)), tree)


@functools.cache
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
    params = _f64(jax.jit(model.init)(jax.random.PRNGKey(1), x))  # jit: Flax's init op by op takes ~1 s
    grad = random_like(jax.random.PRNGKey(2), params)
    return model.apply, params, x, grad, holo


CASES = ["mlp", "rbm", "per_position", "mixed", "complex_out", "holomorphic"]


def heavy(name):
    """``complex_out`` in the expensive checks: slow (CI's time budget); its structured-equals-generic
    solves in both modes stay in the default run (test_structured_equals_generic)."""
    return slow(name) if name == "complex_out" else name


def _jacobian(structured, log_psi, params, x, holo):
    """The Jacobian representation SR's sample-space path builds (structured or explicit rows)."""
    config = sr_solve_mod.sr_config("test", damping=1e-3, mode="sample_space", solver=None, jacobian="auto",
                                    momentum=0.0, holomorphic=holo, axis_name=None)
    return sr_solve_mod._build_jacobian(structured, log_psi, params, x, config, "test")


@functools.cache
def _sr_plan(name):
    """The layer plan that SR's structured path really uses (not just what discovery could find).

    The plan is fixed at trace time, so an abstract trace (``jax.eval_shape``) finds it
    without running the capture passes op by op."""
    log_psi, params, x, _, holo = _case(name)
    found = {}

    def build(p, s):
        found["plan"] = _jacobian(True, log_psi, p, s, holo).plan
        return jnp.zeros(())

    jax.eval_shape(build, params, x)
    return found["plan"]


def test_models_exercise_what_they_claim():
    plan = _sr_plan
    assert len(plan("mlp").layers) == 3 and plan("mlp").uncovered == ()
    assert len(plan("mixed").uncovered) == 1  # the gate is in no Dense layer
    # per_position: its dense layer at 4 positions (k = 3, m = 5) is cheaper as explicit rows G = sum_t a_t^T d_t,
    # so the SR path folds it into the rows (with the uncovered scale) and keeps only the head as a layer
    found = discover_layers(*_case("per_position")[:3]).layers
    assert found[0].positions == 4 and found[0] not in plan("per_position").layers
    assert plan("per_position").layers == found[1:]
    assert {found[0].kernel_index, found[0].bias_index} < set(plan("per_position").uncovered)
    assert len(plan("per_position").uncovered) == 3
    for name in set(CASES) - {"per_position"}:  # the SR path captures every layer that discovery finds
        assert _sr_plan(name).layers == discover_layers(*_case(name)[:3]).layers


class _TwoPositions(nn.Module):
    """A wide dense layer at 2 positions: its structured kernel (T^2 (k + m) per pair) beats G G^H (k m)."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(16)(x.reshape(x.shape[0], 2, 16)))
        return nn.Dense(1)(h.reshape(x.shape[0], -1))[..., 0]


def test_layer_at_few_positions_keeps_its_structured_kernel():
    model = _TwoPositions()
    x = jax.random.normal(jax.random.PRNGKey(0), (24, 32))
    params = _f64(model.init(jax.random.PRNGKey(1), x))
    grad = random_like(jax.random.PRNGKey(2), params)
    jac = _jacobian(True, model.apply, params, x, False)
    assert [layer.positions for layer in jac.plan.layers] == [2, 1] and jac.plan.uncovered == ()
    assert [kind for kind, _, _ in jac._kernel_factors()] == ["positions", "gram-hadamard"]
    solve = lambda jacobian, mode="sample_space", **kw: jax.jit(functools.partial(  # jit: eager runs op by op
        fishr.sr_solve, model.apply, damping=1e-3, mode=mode, jacobian=jacobian, **kw))(grad, params, x)[0]
    assert rel_err(flat(solve("structured")), flat(solve("generic"))) <= 1e-10
    # lazy mode keeps it as statistics too (its rows, k m = 272 per sample, would take more than twice the
    # statistics' 2 (k + m) = 66): the products at T = 2 positions
    assert not jac_mod.layer_folds("products", 24, 1, 2, 17, 16) and jac_mod.layer_folds("products", 24, 1, 4, 4, 5)
    with pytest.raises(ValueError, match="`fold_for`.*'kernel' or 'products'"):
        jac_mod.layer_folds("rows", 24, 1, 2, 17, 16)
    lazy = lambda jacobian: solve(jacobian, "lazy", solver=TIGHT)
    assert rel_err(flat(lazy("structured")), flat(lazy("generic"))) <= 1e-10


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


@pytest.mark.parametrize("name", [heavy(c) for c in CASES])
def test_layer_products_and_kernel_equal_explicit_rows(name):
    log_psi, params, x, grad, holo = _case(name)

    @jax.jit  # one program: op by op the capture and the products take several times longer
    def both(p, s, g):
        layer, dense = _jacobian(True, log_psi, p, s, holo), _jacobian(False, log_psi, p, s, holo)
        u = jax.random.normal(jax.random.PRNGKey(4), dense.rows.shape[:2])
        transposed = layer.for_products()  # the inputs transposed once, as the CG loops use them
        return [(j.gram(), j.matvec(g), j.rmatvec(u)) for j in (layer, dense)] + [transposed.rmatvec(u)]

    (layer_gram, layer_mv, layer_rmv), (dense_gram, dense_mv, dense_rmv), transposed_rmv = both(params, x, grad)
    np.testing.assert_allclose(layer_gram, dense_gram, rtol=1e-10, atol=1e-10 * np.abs(dense_gram).max())
    np.testing.assert_allclose(layer_mv, dense_mv, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(flat(layer_rmv), flat(dense_rmv), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(flat(transposed_rmv), flat(dense_rmv), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "per_position", heavy("complex_out")])
def test_kernel_tiles_equal_the_full_kernel(name):
    """``kernel_tiles()`` against the kernel of the explicit rows: n = 650 samples in tiles
    of 256 rows (uneven: padded to 768 or 1536 rows, the pad rows an identity block); the layers'
    ``kernel_tiles(columns=True)`` (the sample-space solve's) too, as :class:`fishr.linalg.ColumnTiles`
    up to 4 tile rows (3 here; 6 with two score components: an array)."""
    n = 650
    log_psi, params, x, _grad, holo = _case(name, n=n)
    by_columns = []

    @jax.jit  # one program: op by op the capture and the tiles take several times longer
    def kernels(p, s):
        layer, dense = _jacobian(True, log_psi, p, s, holo), _jacobian(False, log_psi, p, s, holo)
        columns = layer.kernel_tiles(columns=True)
        by_columns.append(isinstance(columns, fishr.linalg.ColumnTiles))
        parts = [(j.kernel_tiles(), j.gram()) for j in (layer, dense)]
        return parts + [(fishr.linalg.tile_array(columns), layer.gram())], dense.flat_rows

    parts, ob = kernels(params, x)
    assert by_columns == [ob.shape[0] <= 4 * 256]
    ob = np.asarray(ob)
    rows = ob.shape[0]
    full = ob @ ob.conj().T
    tol = dict(rtol=1e-10, atol=1e-10 * np.abs(full).max())
    for tiles, gram in parts:
        tiles = np.asarray(tiles)
        nb, _, ts, _ = tiles.shape
        assert ts == 256 and nb == -(-rows // 256)
        padded = np.eye(nb * ts, dtype=full.dtype)
        padded[:rows, :rows] = full
        for i in range(nb):
            for j in range(i + 1):
                np.testing.assert_allclose(tiles[i, j], padded[i * ts:(i + 1) * ts, j * ts:(j + 1) * ts], **tol)
            for j in range(i + 1, nb):
                np.testing.assert_array_equal(tiles[i, j], 0)
        np.testing.assert_allclose(np.asarray(gram), full, **tol)


@pytest.mark.parametrize("name", ["mlp", heavy("complex_out"), slow("holomorphic")])
@pytest.mark.parametrize("jacobian", ["structured", "generic"])
def test_kernel_factorisations_agree(monkeypatch, name, jacobian):
    """The sample-space solve by the tiled loop (the CPU's path; a float32 factor refined by
    preconditioned CG in float64) and by LAPACK on the assembled float64 kernel (accelerators)
    give the same update to 1e-10 (uneven tiles: 300 samples, 256-row tiles)."""
    log_psi, params, x, grad, holo = _case(name, n=300)
    out = {}
    for kind in ("tiled", "lapack"):
        monkeypatch.setattr(sample_space_mod, "kernel_factorisation", lambda kind=kind: kind)
        out[kind], info = jax.jit(functools.partial(  # jit: the eager tiled loop is 3-5x slower
            fishr.sr_solve, log_psi, damping=1e-3, mode="sample_space", holomorphic=holo, jacobian=jacobian))(
            grad, params, x)
        assert float(info.residual_norm) <= 1e-8 * np.linalg.norm(flat(grad))
        assert bool(info.converged) and int(info.fallback) == 0
    assert rel_err(flat(out["tiled"]), flat(out["lapack"])) <= 1e-10


def test_single_precision_factor_falls_back_to_the_float64_factor():
    """At damping 1e-7 the float32 factorisation of the rank-deficient kernel (N = 650 > P = 121)
    breaks down (or refines too slowly); the float64 kernel is factored instead (fallback 1,
    or 2 where its shift had to be raised too), and the update is finite and accurate."""
    log_psi, params, x, grad, holo = _case("mlp", n=650)
    out, info = jax.jit(functools.partial(fishr.sr_solve, log_psi, damping=1e-7, mode="sample_space"))(
        grad, params, x)
    assert int(info.fallback) in (1, 2) and np.isfinite(flat(out)).all()
    o = np.asarray(_jacobian(False, log_psi, params, x, holo).flat_rows)
    ref = np.linalg.solve(o.T @ o / 650 + 1e-7 * np.eye(o.shape[1]), flat(grad))
    assert rel_err(flat(out), ref) <= 1e-6


@pytest.mark.parametrize("name", ["mlp", "complex_out", "holomorphic"])
def test_forced_fallback_equals_the_first_path(name, monkeypatch):
    """The fallback branch (LAPACK factor of the assembled kernel, CG on that kernel) run in
    place of the first path on a well-posed problem: the same update to double-precision
    rounding, for real, complex-output and holomorphic models (the conjugation conventions of
    the assembled kernel's product), and it reports which fallback ran."""
    log_psi, params, x, grad, holo = _case(name, n=300)
    solve = lambda: jax.jit(functools.partial(fishr.sr_solve, log_psi, damping=1e-3, mode="sample_space",
                                              holomorphic=holo))(grad, params, x)
    first, info = solve()
    assert int(info.fallback) == 0
    lax = sample_space_mod.lax

    class TakeFallback:  # lax with cond(pred, true_fn, false_fn) always taking the fallback branch
        def __getattr__(self, key):
            return getattr(lax, key)

        @staticmethod
        def cond(pred, true_fn, false_fn, operand):
            return false_fn(operand)

    monkeypatch.setattr(sample_space_mod, "lax", TakeFallback())
    forced, info = solve()
    assert int(info.fallback) == 1 and bool(info.converged)  # float64 input: the double-precision kernel
    assert rel_err(flat(forced), flat(first)) <= 1e-13


@pytest.mark.parametrize("with_energies", [True, False], ids=["energies", "woodbury"])
@pytest.mark.parametrize("name, jacobian", [("mlp", "structured"), ("complex_out", "structured"),
                                            ("holomorphic", "structured"), ("mlp", "generic")])
def test_forced_raised_shift_attempt_equals_the_first_path_in_float32(name, jacobian, with_energies, monkeypatch):
    """Single-precision input: the fallback is the next rung of the factor's ladder (its shift raised
    by ``eps ||K||``). Started there on a well-posed problem it reports fallback 2 and gives the first
    path's update: with the energies the refinement on the exact products removes most of the
    raised shift (measured 4.5e-6 to 1.3e-4 from the first path; bound 3e-4), in the Woodbury form (no
    refinement of the kernel solve) the one correction step in parameter space does (2.8e-7 to 4.4e-5;
    bound 1e-4)."""
    log_psi, params, x, grad, holo = _case(name, n=300)
    single = lambda t: jax.tree.map(lambda a: a.astype(jnp.complex64 if jnp.iscomplexobj(a) else jnp.float32), t)
    params, grad, x = single(params), single(grad), x.astype(jnp.float32)
    energies = jax.random.normal(jax.random.PRNGKey(5), (x.shape[0],), jnp.float32) if with_energies else None
    solve = lambda: jax.jit(functools.partial(fishr.sr_solve, log_psi, damping=1e-3, mode="sample_space",
                                              holomorphic=holo, jacobian=jacobian))(
        grad, params, x, local_energies=energies)
    first, info = solve()
    # the energies: refined on the exact products; the Woodbury form: the factor's solve alone
    steps = (2 if jacobian == "structured" else 1) if with_energies else 0
    assert int(info.fallback) == 0 and bool(info.converged) and int(info.iterations) == steps
    monkeypatch.setattr(sample_space_mod, "FIRST_ATTEMPT", 1)
    forced, info = solve()
    assert int(info.fallback) == 2 and bool(info.converged)
    assert rel_err(flat(forced), flat(first)) <= (3e-4 if with_energies else 1e-4)


@pytest.mark.parametrize("c", [1, 2])
def test_tiled_kernel_paths_give_the_same_tiles(monkeypatch, c):
    """The kernel's lower tiles from one block mapped over the tile pairs, from blocks unrolled at
    static starts and from the loop over pairs (more tile rows than are unrolled) all equal the
    dense ``Obar Obar^T`` (uneven: 150 samples in tiles of 32 rows, zero-padded); the tiles above
    the diagonal are zero (``tiled_cholesky(upper_zero=True)`` relies on it) and the padded rows
    hold the identity."""
    n, p = 150, 40
    rows = jax.random.normal(jax.random.PRNGKey(0), (n * c, p), jnp.float64)
    want = np.asarray(rows @ rows.T)

    def make_block(m, n_pad):
        padded = jnp.pad(rows, ((0, n_pad * c - n * c), (0, 0)))
        take = lambda i0: jax.lax.dynamic_slice_in_dim(padded, i0 * c, m * c, axis=0)
        return lambda i0, j0: take(i0) @ take(j0).T

    def kernel(map_blocks, max_unrolled=None):
        tiles = np.asarray(jax.jit(lambda: jac_mod.tiled_kernel(n, c, jnp.float64, make_block, 32,
                                                                map_blocks=map_blocks, max_unrolled=max_unrolled))())
        nb = tiles.shape[0]
        assert not np.any(tiles[np.triu_indices(nb, 1)])  # the tiles above the diagonal are zero
        full = np.asarray(fishr.linalg.from_tiles(jnp.asarray(tiles)))
        np.testing.assert_array_equal(full[n * c:, n * c:], np.eye(nb * tiles.shape[2] - n * c))
        return np.asarray(jac_mod.kernel_from_tiles(jnp.asarray(tiles), n * c))

    monkeypatch.setattr(jac_mod, "UNROLL_KERNEL_MAX_TILES", 5)  # 5 tile rows: mapped or unrolled
    for map_blocks in (True, False):
        np.testing.assert_allclose(kernel(map_blocks), want, rtol=1e-13, atol=1e-12)
    monkeypatch.setattr(jac_mod, "UNROLL_KERNEL_MAX_TILES", 2)  # the loop over the tile pairs
    np.testing.assert_allclose(kernel(True), want, rtol=1e-13, atol=1e-12)
    # max_unrolled moves the limit past UNROLL_KERNEL_MAX_TILES: unrolled again
    np.testing.assert_allclose(kernel(False, max_unrolled=5), want, rtol=1e-13, atol=1e-12)


def test_wide_statistics_unroll_the_structured_kernel(monkeypatch):
    """A structured Jacobian whose statistics (layer inputs, output gradients, explicit rows) would make
    the mapped block gather more than MAPPED_MAX_BYTES fills its few kernel blocks unrolled (static slices:
    fewer gathers in the program), else mapped (its slices are gathers), and mapped whatever the size with
    ``compact=True``; all give the generic rows' kernel."""
    log_psi, params, x, _, holo = _case("mixed", n=80)
    monkeypatch.setattr(jac_mod, "UNROLL_KERNEL_MAX_TILES", 8)  # few tile rows: mapped or unrolled, no loop
    generic = np.asarray(jac_mod.kernel_from_tiles(jax.jit(lambda p, s: _jacobian(False, log_psi, p, s, holo)
                                                            .kernel_tiles(32))(params, x), 80))
    gathers = {}
    for limit, compact in [(10**9, False), (1, False), (1, True)]:  # mapped, unrolled, mapped (compact)
        monkeypatch.setattr(jac_mod, "MAPPED_MAX_BYTES", limit)

        def layer_tiles(p, s):  # a new function each time: jax caches traces by function
            return _jacobian(True, log_psi, p, s, holo).kernel_tiles(32, compact=compact)

        gathers[limit, compact] = str(jax.make_jaxpr(layer_tiles)(params, x)).count(" gather[")
        layer = jax.jit(layer_tiles)(params, x)
        np.testing.assert_allclose(np.asarray(jac_mod.kernel_from_tiles(layer, 80)), generic, rtol=1e-10,
                                   atol=1e-12 * np.abs(generic).max())
    # the mapped block's slices are gathers, unrolled they are static; compact maps whatever the size
    assert gathers[10**9, False] == gathers[1, True] > gathers[1, False]


def test_kernel_factorisation_rule():
    rule = sample_space_mod.kernel_factorisation
    assert rule() == ("tiled" if jax.default_backend() == "cpu" else "lapack")


def test_double_factor_rule_at_the_measured_points():
    """Float64 input is factored in float64 where the single factor's CG would cost more (wide
    layers at moderate N), in float32 otherwise: the benchmark's MLPs at N = 1,024, and N = 4,096."""
    pays = sample_space_mod.double_factor_pays
    cost = lambda widths: sum(k + 1 + m for k, m in itertools.pairwise(widths))  # the layers' Gram widths
    assert pays(1024, 1024, cost((32, 200, 200, 1)), 47001)
    assert not pays(1024, 1024, cost((16, 64, 64, 1)), 5313)
    assert not pays(4096, 4096, cost((32, 200, 200, 1)), 47001)
    assert not pays(1024, 1024, cost((32, 200, 200, 1)), 0)  # P unknown: the single factor


@pytest.mark.parametrize("with_energies", [True, False], ids=["energies", "woodbury"])
def test_double_factor_equals_the_single_factors_cg(monkeypatch, with_energies):
    """Float64 input on the double-precision factor (refined on the exact products, no CG) and on the
    single-precision factor with its CG to the rounding floor: the same update to 1e-11, and the
    double factor took at most the refinement's two steps and no fallback."""
    log_psi, params, x, grad, _ = _case("mlp", n=200)
    energies = jax.random.normal(jax.random.PRNGKey(5), (200,), jnp.float64) if with_energies else None
    solve = lambda: jax.jit(lambda g, p, s, e: fishr.sr_solve(log_psi, g, p, s, damping=1e-3, mode="sample_space",
                                                              jacobian="structured", local_energies=e))(
        grad, params, x, energies)
    monkeypatch.setattr(sample_space_mod, "double_factor_pays", lambda *args: True)
    double, info_double = solve()
    monkeypatch.setattr(sample_space_mod, "double_factor_pays", lambda *args: False)
    single, info_single = solve()
    assert int(info_double.fallback) == 0 and bool(info_double.converged)
    assert int(info_double.iterations) <= 2 and int(info_single.iterations) >= 1
    assert rel_err(flat(double), flat(single)) <= 1e-11


@pytest.mark.parametrize("name", ["mlp", heavy("complex_out"), slow("holomorphic")])
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
    solve = lambda jacobian: jax.jit(functools.partial(
        fishr.sr_solve, log_psi, damping=1e-3, mode="sample_space", jacobian=jacobian))(grad, params, x)[0]
    generic, structured = solve("generic"), solve("structured")
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
    jax.jit(functools.partial(fishr.sr_solve, log_psi, mode="sample_space"))(grad, params, x)
    assert calls == [1]
    from sr_models import mlp_log_psi, mlp_params  # a plain-jnp model: nothing to capture
    p = mlp_params(jax.random.PRNGKey(0))
    jax.jit(functools.partial(fishr.sr_solve, mlp_log_psi, mode="sample_space"))(
        p, p, jax.random.normal(jax.random.PRNGKey(1), (8, 3)))
    assert calls == [1]


def test_auto_uses_layers_for_lazy_where_they_cover_the_model(monkeypatch):
    """``jacobian="auto"`` in lazy mode: the layers' statistics where the capture covers every parameter
    (the products then skip the model's JVPs), the linearisation otherwise, in chunks, or when asked."""
    calls = []
    original = jac_mod.LayerJacobian.build
    monkeypatch.setattr(jac_mod.LayerJacobian, "build", classmethod(
        lambda cls, *a, **k: calls.append(1) or original.__func__(cls, *a, **k)))

    def solve(name, **kw):
        log_psi, params, x, grad, holo = _case(name)
        return jax.jit(functools.partial(fishr.sr_solve, log_psi, mode="lazy", damping=1e-3, holomorphic=holo,
                                         solver=TIGHT, **kw))(grad, params, x)[0]

    for name in ("mlp", "rbm", "complex_out", "holomorphic"):
        calls.clear()
        auto = solve(name)
        assert calls == [1], name
        assert rel_err(flat(auto), flat(solve(name, jacobian="generic"))) <= 1e-10
        assert calls == [1], name  # "generic" builds no statistics
    calls.clear()
    solve("mixed")  # a parameter outside every Dense layer: its rows would need per-sample passes
    solve("per_position")  # (folded layers count as uncovered too)
    solve("mlp", chunk_size=8)  # two chunks: the statistics of all samples are what chunks avoid holding
    assert calls == []
    assert jac_mod.layers_cover_model(_sr_plan("mlp"))
    assert not jac_mod.layers_cover_model(_sr_plan("mixed"))


def test_structured_rejected_for_dense_mode():
    with pytest.raises(ValueError, match="jacobian='structured' applies to modes"):
        fishr.sr(MLP().apply, mode="dense", jacobian="structured")
    with pytest.raises(ValueError, match="`jacobian` must be one of"):
        fishr.sr(MLP().apply, jacobian="layers")


@pytest.mark.parametrize("mode", ["lazy", "sample_space"])
@pytest.mark.parametrize("name", ["mixed", heavy("complex_out")])
def test_structured_multidevice(name, mode):
    log_psi, params, x, grad, holo = _case(name, n=32)
    kw = dict(damping=1e-3, mode=mode, holomorphic=holo, jacobian="structured",
              solver=TIGHT if mode == "lazy" else None)
    single, _ = jax.jit(functools.partial(fishr.sr_solve, log_psi, **kw))(grad, params, x)
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


@pytest.mark.parametrize("jacobian", ["structured", "generic"])
def test_sample_space_program_size_is_bounded_in_n(jacobian):
    """The compiled program does not grow with N (issue 12): the lowered float32 sample-space update
    has the same ops at N = 2,048, 4,096 and 8,192 (the kernel in 8 tile rows, factored unrolled and
    kept in row slabs) and at N = 12,288, 16,384 and 32,768 (tiles of 512 in loops of fixed size);
    below 2,048 rows there are fewer tile rows, so fewer ops."""
    model = MLP()
    params = jax.eval_shape(model.init, jax.random.PRNGKey(1), jnp.zeros((1, 4)))
    grad = params

    def ops(n):
        x = jax.ShapeDtypeStruct((n, 4), jnp.float32)
        fn = jax.jit(lambda g, p, s: fishr.sr_solve(model.apply, g, p, s, damping=1e-3, mode="sample_space",
                                                    jacobian=jacobian)[0])
        return sum(1 for line in fn.lower(grad, params, x).as_text().splitlines() if " = " in line)

    counts = {n: ops(n) for n in (512, 2048, 4096, 8192, 12288, 16384, 32768)}
    assert counts[2048] == counts[4096] == counts[8192], counts
    assert counts[12288] == counts[16384] == counts[32768], counts
    assert counts[512] < counts[2048], counts
