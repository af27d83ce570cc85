"""fishr.linalg against NumPy/SciPy float64 references."""

import jax.numpy as jnp
import numpy as np
import pytest

import fishr
from fishr import linalg


def _spd(n, complex_=False, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n + 3))
    if complex_:
        x = x + 1j * rng.normal(size=(n, n + 3))
    return x @ x.conj().T / n + 0.1 * np.eye(n)


def test_cholesky_solve_not_positive_definite_gives_nan():
    a = _spd(40)
    a[30, 30] = -5.0
    assert np.isnan(np.asarray(linalg.cholesky_solve(jnp.asarray(a), jnp.ones(40)))).any()


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
@pytest.mark.parametrize("complex_", [False, True])
def test_psd_inverse(method, complex_):
    a = _spd(30, complex_, seed=2)
    inv = linalg.psd_inverse(jnp.asarray(a), 0.3, method=method)
    np.testing.assert_allclose(np.asarray(inv), np.linalg.inv(a + 0.3 * np.eye(30)), rtol=1e-9, atol=1e-12)


def test_cholesky_solve_with_damping():
    a = _spd(600, seed=3)
    b = np.random.default_rng(4).normal(size=(600, 2))
    x = linalg.cholesky_solve(jnp.asarray(a), jnp.asarray(b), 0.5)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a + 0.5 * np.eye(600), b), rtol=1e-10)


@pytest.mark.parametrize("complex_", [False, True])
def test_cholesky_solve_batched_and_complex(complex_):
    # The factorisation runs on a^T = conj(a) (see cholesky_solve): check the
    # complex conjugations and that leading batch axes are left alone.
    a = np.stack([_spd(50, complex_, seed=s) for s in (6, 7, 8)])
    rng = np.random.default_rng(9)
    b = rng.normal(size=(3, 50)) + (1j * rng.normal(size=(3, 50)) if complex_ else 0)
    x = linalg.cholesky_solve(jnp.asarray(a), jnp.asarray(b)[..., None], 0.2)[..., 0]
    expected = np.linalg.solve(a + 0.2 * np.eye(50), b[..., None])[..., 0]
    np.testing.assert_allclose(np.asarray(x), expected, rtol=1e-10)


@pytest.mark.parametrize("complex_", [False, True])
def test_cholesky_solve_reads_only_the_upper_triangle(complex_):
    a = _spd(60, complex_, seed=10)
    b = np.random.default_rng(11).normal(size=60)
    garbage = np.where(np.tril(np.ones((60, 60)), -1) > 0, np.nan, a)
    x = linalg.cholesky_solve(jnp.asarray(garbage), jnp.asarray(b), 0.1)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a + 0.1 * np.eye(60), b), rtol=1e-10)


@pytest.mark.parametrize("complex_", [False, True])
def test_cholesky_factor_is_the_factor_of_conj_a_and_is_reusable(complex_):
    a = _spd(40, complex_, seed=16)
    factor = np.asarray(linalg.cholesky_factor(jnp.asarray(a), 0.3))
    np.testing.assert_array_equal(np.triu(factor, 1), 0)  # lower triangular
    np.testing.assert_allclose(factor @ factor.conj().T, np.conj(a) + 0.3 * np.eye(40), atol=1e-12)
    rng = np.random.default_rng(17)
    for _ in range(2):  # one factor, several right-hand sides
        b = rng.normal(size=40) + (1j * rng.normal(size=40) if complex_ else 0)
        x = linalg.cholesky_factor_solve(jnp.asarray(factor), jnp.asarray(b))
        np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a + 0.3 * np.eye(40), b), rtol=1e-10)


def _tiles(a, sizes):
    edges = np.cumsum([0] + list(sizes))
    return [[jnp.asarray(a[edges[i]:edges[i + 1], edges[j]:edges[j + 1]]) for j in range(i + 1)]
            for i in range(len(sizes))]


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("sizes", [(45,), (7, 13, 10, 15)], ids=["one_tile", "uneven_tiles"])
def test_tiled_cholesky_factor_and_solve(complex_, sizes):
    n = sum(sizes)
    a = _spd(n, complex_, seed=20)
    factor = linalg.tiled_cholesky_factor(_tiles(a, sizes), 0.3)
    # the factor's tiles are the blocks of the lower-triangular L with L L^H = a + 0.3 I
    edges = np.cumsum([0] + list(sizes))
    full = np.zeros((n, n), a.dtype)
    for i, row in enumerate(factor):
        for j, tile in enumerate(row):
            full[edges[i]:edges[i + 1], edges[j]:edges[j + 1]] = np.asarray(tile)
    np.testing.assert_array_equal(np.triu(full, 1), 0)
    np.testing.assert_allclose(full @ full.conj().T, a + 0.3 * np.eye(n), atol=1e-12)
    rng = np.random.default_rng(21)
    b = rng.normal(size=(n, 3)) + (1j * rng.normal(size=(n, 3)) if complex_ else 0)
    expected = np.linalg.solve(a + 0.3 * np.eye(n), b)
    np.testing.assert_allclose(np.asarray(linalg.tiled_cholesky_factor_solve(factor, jnp.asarray(b))), expected,
                               rtol=1e-10)
    np.testing.assert_allclose(np.asarray(linalg.tiled_cholesky_factor_solve(factor, jnp.asarray(b[:, 0]))),
                               expected[:, 0], rtol=1e-10)


@pytest.mark.parametrize("complex_", [False, True])
def test_tiled_cholesky_reads_only_the_upper_triangle_of_diagonal_tiles(complex_):
    sizes = (9, 11, 10)
    a = _spd(30, complex_, seed=22)
    tiles = _tiles(a, sizes)
    for i in range(3):
        d = np.asarray(tiles[i][i]).copy()
        d[np.tril_indices(sizes[i], -1)] = np.nan
        tiles[i][i] = jnp.asarray(d)
    b = np.random.default_rng(23).normal(size=30)
    x = linalg.tiled_cholesky_factor_solve(linalg.tiled_cholesky_factor(tiles, 0.1), jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a + 0.1 * np.eye(30), b), rtol=1e-10)


def test_tiled_cholesky_not_positive_definite_gives_nan_everywhere():
    a = _spd(30, seed=24)
    a[12, 12] = -5.0  # in the second of three tiles
    x = linalg.tiled_cholesky_factor_solve(linalg.tiled_cholesky_factor(_tiles(a, (10, 10, 10))), jnp.ones(30))
    assert np.isnan(np.asarray(x)).all()


def test_tiled_cholesky_rejects_bad_input():
    a = _spd(20, seed=25)
    tiles = _tiles(a, (10, 10))
    with pytest.raises(ValueError, match=r"`tiles\[1\]` must hold the 2 tiles"):
        linalg.tiled_cholesky_factor([tiles[0], tiles[1][:1]])
    factor = linalg.tiled_cholesky_factor(tiles)
    with pytest.raises(ValueError, match="`b` must have 20 rows"):
        linalg.tiled_cholesky_factor_solve(factor, jnp.ones(19))


@pytest.mark.parametrize("complex_", [False, True])
def test_tiled_inf_norm(complex_):
    sizes = (9, 11, 10)
    a = _spd(30, complex_, seed=26)
    tiles = _tiles(a, sizes)
    d = np.asarray(tiles[1][1]).copy()
    d[np.tril_indices(11, -1)] = np.nan  # only the upper triangle of a diagonal tile is read
    tiles[1][1] = jnp.asarray(d)
    np.testing.assert_allclose(float(linalg.tiled_inf_norm(tiles)), np.abs(a).sum(axis=1).max(), rtol=1e-13)


def _float32_solver(a):
    factor = linalg.cholesky_factor(jnp.asarray(a).astype(jnp.complex64 if np.iscomplexobj(a) else jnp.float32))
    return lambda r: linalg.cholesky_factor_solve(factor, r.astype(factor.dtype))


@pytest.mark.parametrize("complex_", [False, True])
def test_mixed_precision_refine_reaches_float64_accuracy(complex_):
    a = _spd(200, complex_, seed=27)
    rng = np.random.default_rng(28)
    b = rng.normal(size=200) + (1j * rng.normal(size=200) if complex_ else 0)
    x, converged, k = linalg.mixed_precision_refine(lambda v: jnp.asarray(a) @ v, _float32_solver(a), jnp.asarray(b),
                                                    np.abs(a).sum(axis=1).max())
    expected = np.linalg.solve(a, b)
    assert bool(converged) and 1 <= int(k) <= 10
    assert x.dtype == b.dtype
    assert np.linalg.norm(np.asarray(x) - expected) <= 1e-13 * np.linalg.norm(expected)
    unrefined = np.asarray(_float32_solver(a)(jnp.asarray(b)))
    assert np.linalg.norm(unrefined - expected) > 1e-9 * np.linalg.norm(expected)  # float32 alone is not enough


def test_mixed_precision_refine_reports_failure():
    a = _spd(50, seed=29)
    b = jnp.ones(50)
    norm = np.abs(a).sum(axis=1).max()
    # a failed low-precision factor (NaN): stops at once, not converged
    _, converged, k = linalg.mixed_precision_refine(lambda v: jnp.asarray(a) @ v, lambda r: r * jnp.nan, b, norm)
    assert not bool(converged) and int(k) == 0
    # an approximate inverse too rough to contract (2.5 A^-1: the error grows 1.5x a step)
    inv = np.linalg.inv(a)
    _, converged, k = linalg.mixed_precision_refine(lambda v: jnp.asarray(a) @ v, lambda r: 2.5 * jnp.asarray(inv) @ r,
                                                    b, norm, maxiter=12)
    assert not bool(converged) and int(k) == 12


def test_cg_matches_solve_and_reports_diagnostics():
    a = _spd(40, seed=5)
    b = np.random.default_rng(6).normal(size=40)
    x, info = linalg.cg(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, b), rtol=1e-9)
    assert 0 < int(info.iterations) <= 400 and bool(info.converged) and int(info.fallback) == 0
    # the reported residual is recomputed from x, not CG's recursion
    np.testing.assert_allclose(float(info.residual_norm), np.linalg.norm(b - a @ np.asarray(x)), rtol=1e-6)
    assert float(info.residual_norm) <= 1e-12 * np.linalg.norm(b)
    x, info = linalg.cg(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), max_steps=3)
    assert int(info.iterations) == 3 and not bool(info.converged) and np.all(np.isfinite(np.asarray(x)))
    x, info = linalg.cg(lambda v: jnp.asarray(a) @ v, jnp.asarray(b).at[0].set(jnp.nan))
    assert np.all(np.isnan(np.asarray(x))) and not bool(info.converged)


def test_cg_divergence_on_a_singular_system_is_nan():
    """A singular A with b outside its range: x grows along the null space (1e33 before this check)."""
    rng = np.random.default_rng(7)
    m = rng.normal(size=(20, 8))
    a = m @ m.T  # rank 8
    b = rng.normal(size=20)
    x, info = linalg.cg(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), rtol=1e-12, max_steps=200)
    assert np.all(np.isnan(np.asarray(x))) and not bool(info.converged)
    # the same operator with b in its range converges
    x, info = linalg.cg(lambda v: jnp.asarray(a) @ v, jnp.asarray(a @ b), rtol=1e-10, max_steps=200)
    assert bool(info.converged) and np.linalg.norm(a @ np.asarray(x) - a @ b) <= 1e-8 * np.linalg.norm(a @ b)


@pytest.mark.parametrize("complex_", [False, True])
def test_eigh_solve_and_direct_solver_objects(complex_):
    a = _spd(30, complex_, seed=31)
    b = np.random.default_rng(32).normal(size=(30, 2))
    expected = np.linalg.solve(a + 0.2 * np.eye(30), b)
    np.testing.assert_allclose(np.asarray(linalg.eigh_solve(jnp.asarray(a), jnp.asarray(b), 0.2)), expected,
                               rtol=1e-10)
    for solver in (fishr.Cholesky(), fishr.Eigh()):
        x, info = solver.solve(jnp.asarray(a), jnp.asarray(b[:, 0]), 0.2)
        np.testing.assert_allclose(np.asarray(x), expected[:, 0], rtol=1e-10)
        assert bool(info.converged) and float(info.residual_norm) <= 1e-10 and int(info.iterations) == 0
        bad, info = solver.solve(-jnp.asarray(a), jnp.asarray(b[:, 0]), 0.2)  # not positive definite
        assert not np.all(np.isfinite(np.asarray(bad))) and not bool(info.converged)
