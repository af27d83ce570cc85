"""fishr.linalg against NumPy/SciPy float64 references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fishr
from fishr import _sample_space, linalg


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


def _from_slabs(factor):
    """The lower factor ``L`` assembled from a :class:`fishr.linalg.SlabFactor` (zero above its diagonal blocks)."""
    edges = np.cumsum([0] + [d.shape[0] for d in factor.diag])
    low = np.zeros((edges[-1],) * 2, np.asarray(factor.diag[0]).dtype)
    for b, block in enumerate(factor.diag):
        low[edges[b]:edges[b + 1], edges[b]:edges[b + 1]] = np.asarray(block)
        if b:
            low[edges[b]:edges[b + 1], :edges[b]] = np.asarray(factor.below[b - 1])
    return low


def _padded_tiles(a, ts):
    """``a`` padded with identity rows to a multiple of ``ts``, as tiles; and its size."""
    n = a.shape[0]
    nb = -(-n // ts)
    full = np.eye(nb * ts, dtype=a.dtype)
    full[:n, :n] = a
    return linalg.to_tiles(jnp.asarray(full), ts), n


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("n, ts", [(45, 48), (45, 16), (64, 8), (100, 8)],
                         ids=["one_tile", "uneven_padded", "unrolled_tiles", "looped_tiles"])
def test_tiled_cholesky_and_solve(complex_, n, ts):
    a = _spd(n, complex_, seed=20)
    tiles, _ = _padded_tiles(a, ts)
    factor = linalg.tiled_cholesky(tiles, 0.3)
    full = np.asarray(linalg.from_tiles(factor.tiles))
    np.testing.assert_array_equal(np.triu(full, 1), 0)  # lower triangular, tiles above the diagonal zero
    np.testing.assert_allclose((full @ full.conj().T)[:n, :n], a + 0.3 * np.eye(n), atol=1e-12)
    for k, inv in enumerate(np.asarray(factor.inv_diag)):
        np.testing.assert_allclose(inv @ full[k * ts:(k + 1) * ts, k * ts:(k + 1) * ts], np.eye(ts), atol=1e-10)
    rng = np.random.default_rng(21)
    b = rng.normal(size=(n, 3)) + (1j * rng.normal(size=(n, 3)) if complex_ else 0)
    padded = np.zeros((full.shape[0], 3), b.dtype)
    padded[:n] = b
    expected = np.linalg.solve(a + 0.3 * np.eye(n), b)
    np.testing.assert_allclose(np.asarray(linalg.tiled_cholesky_solve(factor, jnp.asarray(padded)))[:n], expected,
                               rtol=1e-10)
    np.testing.assert_allclose(np.asarray(linalg.tiled_cholesky_solve(factor, jnp.asarray(padded[:, 0])))[:n],
                               expected[:, 0], rtol=1e-10)


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("n, ts", [(45, 48), (45, 16), (64, 8), (40, 8)],
                         ids=["one_tile", "uneven_padded", "eight_tiles", "five_tiles"])
def test_slab_factor_is_the_tiled_factor_and_solves_like_lapack(complex_, n, ts):
    """:func:`tiled_cholesky_slabs` holds :func:`tiled_cholesky`'s factor by block rows (a diagonal
    block, then the slab left of it; one tile row per block up to 4, two for 5-8 tile rows), and
    :func:`slab_cholesky_solve` solves with it to LAPACK's accuracy (float64; 45 rows padded to 48 in
    tiles of 16: uneven; one tile; the most tile rows allowed)."""
    a = _spd(n, complex_, seed=40)
    tiles, _ = _padded_tiles(a, ts)
    nb = tiles.shape[0]
    factor, finite = jax.jit(lambda t: linalg.tiled_cholesky_slabs(t, 0.3))(tiles)
    rows = linalg.slab_block_rows(nb, ts)
    assert rows == ([ts] * nb if nb <= 4 else [2 * ts] * (nb // 2) + [ts] * (nb % 2))
    assert bool(finite) and len(factor.diag) == len(rows) and len(factor.below) == len(rows) - 1
    full = np.asarray(linalg.from_tiles(linalg.tiled_cholesky(tiles, 0.3).tiles))
    edges = np.cumsum([0, *rows])
    for b in range(len(rows)):
        block = slice(edges[b], edges[b + 1])
        np.testing.assert_array_equal(np.asarray(factor.diag[b]), full[block, block])
        if b:
            assert factor.below[b - 1].shape == (rows[b], edges[b])
            np.testing.assert_array_equal(np.asarray(factor.below[b - 1]), full[block, :edges[b]])
    rng = np.random.default_rng(41)
    b = rng.normal(size=(n, 3)) + (1j * rng.normal(size=(n, 3)) if complex_ else 0)
    padded = np.zeros((nb * ts, 3), b.dtype)
    padded[:n] = b
    expected = np.asarray(jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a + 0.3 * np.eye(n)), b))
    solve = jax.jit(linalg.slab_cholesky_solve)
    np.testing.assert_allclose(np.asarray(solve(factor, jnp.asarray(padded)))[:n], expected, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(solve(factor, jnp.asarray(padded[:, 0])))[:n], expected[:, 0], rtol=1e-10)


@pytest.mark.parametrize("complex_", [False, True])
def test_column_tiles_read_and_factor_like_the_tile_array(complex_):
    """:class:`fishr.linalg.ColumnTiles` (the lower tiles by tile columns, nothing above the diagonal)
    reads as the :func:`to_tiles` array it stands for: tile by tile, assembled (zero above the
    diagonal), its diagonal and trace, and :func:`tiled_cholesky_slabs` gives the same factor from it
    (float64, 4 tile rows of 8, uneven: 29 rows)."""
    a = _spd(29, complex_, seed=43)
    tiles, _ = _padded_tiles(a, 8)
    nb = tiles.shape[0]
    lower = np.asarray(tiles) * np.tril(np.ones((nb, nb)))[:, :, None, None]
    columns = linalg.ColumnTiles(tuple(jnp.asarray(lower[j:, j]) for j in range(nb)))
    assert columns.shape == tiles.shape and columns.dtype == tiles.dtype
    np.testing.assert_array_equal(np.asarray(linalg.tile_array(columns)), lower)
    for i in range(nb):
        for j in range(i + 1):
            np.testing.assert_array_equal(np.asarray(linalg.lower_tile(columns, i, j)), lower[i, j])
    np.testing.assert_array_equal(np.asarray(linalg.tiled_diagonal(columns, 29)),
                                  np.asarray(linalg.tiled_diagonal(tiles, 29)))
    assert float(linalg.tiled_trace(columns, 29)) == pytest.approx(float(np.real(np.trace(a))), rel=1e-14)
    by_columns = jax.jit(lambda c: linalg.tiled_cholesky_slabs(c, 0.3))(columns)
    by_tiles = jax.jit(lambda t: linalg.tiled_cholesky_slabs(t, 0.3))(tiles)
    for got, want in zip(jax.tree.leaves(by_columns), jax.tree.leaves(by_tiles)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_slab_factor_finiteness_and_its_tile_limit():
    """The last diagonal tile's test catches a non-finite entry anywhere on or below the diagonal
    (of a diagonal tile, in the triangle read) and a matrix that is not positive definite in any
    column; more tile rows than the factorisation unrolls, or a right-hand side of other rows than
    the factor's, is an error naming the argument."""
    a = _spd(64, False, seed=42)
    tiles, _ = _padded_tiles(a, 16)
    nb = tiles.shape[0]
    assert bool(linalg.tiled_cholesky_slabs(tiles, 0.3)[1])
    for i, j in [(0, 0), (1, 0), (nb - 1, 0), (2, 1), (nb - 1, nb - 2), (nb - 1, nb - 1)]:
        bad = np.asarray(tiles).copy()
        bad[i, j, 1 if i != j else 0, 2 if i != j else 1] = np.nan
        assert not bool(linalg.tiled_cholesky_slabs(jnp.asarray(bad), 0.3)[1]), (i, j)
    for k in range(nb):  # column k alone not positive definite
        bad = np.asarray(tiles).copy()
        bad[k, k, 0, 0] = -10.0
        assert not bool(linalg.tiled_cholesky_slabs(jnp.asarray(bad), 0.3)[1]), k
    factor, _ = linalg.tiled_cholesky_slabs(tiles, 0.3)
    for shape in [(nb * 16 - 1,), (nb * 16 + 16, 2), (nb * 16, 2, 1)]:
        with pytest.raises(ValueError, match=r"`b` must have shape \(64,\) or \(64, k\)"):
            linalg.slab_cholesky_solve(factor, jnp.zeros(shape))
    many = jnp.zeros((linalg.UNROLL_FACTOR_MAX_TILES + 1,) * 2 + (2, 2))
    with pytest.raises(ValueError, match="`tiles` may have at most UNROLL_FACTOR_MAX_TILES"):
        linalg.tiled_cholesky_slabs(many)


@pytest.mark.parametrize("segments", [1, 3, 6, 13])
def test_tiled_solve_by_row_groups_equals_lapack(monkeypatch, segments):
    """The looped solve with its tile rows in any number of groups (13 tile rows; 1 group reads
    whole rows, 13 would be one row each and is raised to groups of 2) solves the system."""
    groups = linalg._row_segments(13, segments)
    assert groups[0][0] == 0 and groups[-1][1] == 13 and all(hi - lo >= 2 for lo, hi in groups[:-1])
    assert all(a[1] == b[0] for a, b in itertools.pairwise(groups))
    monkeypatch.setattr(linalg._row_segments, "__defaults__", (segments,))
    a = _spd(100, True, seed=25)
    tiles, _ = _padded_tiles(a, 8)
    b = np.random.default_rng(26).normal(size=(104, 2)) + 1j
    b[100:] = 0
    x = jax.jit(lambda t, b: linalg.tiled_cholesky_solve(linalg.tiled_cholesky(t, 0.3), b))(tiles, jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(x)[:100], np.linalg.solve(a + 0.3 * np.eye(100), b[:100]), rtol=1e-10)


@pytest.mark.parametrize("complex_", [False, True])
def test_lapack_factor_as_tiles_equals_the_tiled_factor(complex_):
    """The LAPACK factor (of ``conj(A)``) converted to tiles is the tiled factor of ``A``, and
    solves with the same routine."""
    a = _spd(32, complex_, seed=22)
    tiles = linalg.to_tiles(jnp.asarray(a), 8)
    tiled = linalg.tiled_cholesky(tiles, 0.2)
    converted = linalg.tiled_factor_from_cholesky(linalg.cholesky_factor(jnp.asarray(a), 0.2), 8)
    np.testing.assert_allclose(np.asarray(converted.tiles), np.asarray(tiled.tiles), atol=1e-12)
    np.testing.assert_allclose(np.asarray(converted.inv_diag), np.asarray(tiled.inv_diag), atol=1e-10)
    b = jnp.asarray(np.random.default_rng(23).normal(size=(32, 2)))
    np.testing.assert_allclose(np.asarray(linalg.tiled_cholesky_solve(converted, b)),
                               np.linalg.solve(a + 0.2 * np.eye(32), np.asarray(b)), rtol=1e-10)


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("n, ts", [(30, 10), (100, 8)], ids=["unrolled_tiles", "looped_tiles"])
def test_tiled_cholesky_reads_only_the_lower_tiles(complex_, n, ts):
    """Tiles above the diagonal are never read; of a diagonal tile the Cholesky factorisations
    read the upper triangle (a row-major tile is LAPACK's column-major transpose) and
    :func:`hermitian_from_lower_tiles` the lower one."""
    a = _spd(n, complex_, seed=22)
    tiles, _ = _padded_tiles(a, ts)
    nb = tiles.shape[0]
    t = np.asarray(tiles).copy()
    for i in range(nb):
        for j in range(i + 1, nb):
            t[i, j] = np.nan
    upper_only, lower_only = t.copy(), t.copy()
    for i in range(nb):
        upper_only[i, i][np.tril_indices(ts, -1)] = np.nan
        lower_only[i, i][np.triu_indices(ts, 1)] = np.nan
    b = np.random.default_rng(23).normal(size=nb * ts)
    b[n:] = 0
    x = linalg.tiled_cholesky_solve(linalg.tiled_cholesky(jnp.asarray(upper_only), 0.1), jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(x)[:n], np.linalg.solve(a + 0.1 * np.eye(n), b[:n]), rtol=1e-10)
    if nb <= linalg.UNROLL_FACTOR_MAX_TILES:  # the row slabs of the unrolled factorisation read the same
        factor, finite = linalg.tiled_cholesky_slabs(jnp.asarray(upper_only), 0.1)
        low = _from_slabs(factor)
        assert bool(finite)
        np.testing.assert_array_equal(np.triu(low, 1), 0)
        np.testing.assert_allclose((low @ low.conj().T)[:n, :n], a + 0.1 * np.eye(n), atol=1e-12)
    full = np.asarray(linalg.hermitian_from_lower_tiles(jnp.asarray(lower_only)))
    np.testing.assert_allclose(full[:n, :n], a, atol=1e-14)


@pytest.mark.parametrize("n, ts", [(64, 8), (100, 8)], ids=["unrolled_tiles", "looped_tiles"])
def test_tiled_cholesky_upper_zero_and_the_finiteness_tests(n, ts):
    """With zero tiles above the diagonal, ``upper_zero=True`` gives the same factor without clearing
    them; a non-finite entry anywhere on or below the diagonal, or a matrix that is not positive
    definite, leaves ``inv_diag`` non-finite (what the sample-space solve tests instead of the factor),
    and, for few tiles, the row slabs' test (their last diagonal tile) false."""
    a = _spd(n, False, seed=24)
    tiles, _ = _padded_tiles(a, ts)
    nb = tiles.shape[0]
    upper = np.triu(np.ones((nb, nb), bool), 1)[:, :, None, None]
    zeroed = jnp.where(upper, 0, tiles)
    ref = linalg.tiled_cholesky(zeroed, 0.3)
    lean = jax.jit(lambda t: linalg.tiled_cholesky(t, 0.3, upper_zero=True))(zeroed)
    np.testing.assert_array_equal(np.asarray(lean.tiles), np.asarray(ref.tiles))
    assert np.isfinite(np.asarray(lean.inv_diag)).all()
    unrolled = nb <= linalg.UNROLL_FACTOR_MAX_TILES
    if unrolled:  # the row slabs of the unrolled factorisation: the same numbers, their finiteness test
        factor, finite = linalg.tiled_cholesky_slabs(zeroed, 0.3)
        assert bool(finite)
        np.testing.assert_array_equal(_from_slabs(factor), np.asarray(linalg.from_tiles(ref.tiles)))
    for i, j in [(1, 0), (nb - 1, 0), (nb - 1, nb - 2), (nb - 1, nb - 1)]:  # below the diagonal and on it
        bad = np.asarray(zeroed).copy()
        bad[i, j, 1 if i != j else 0, 2 if i != j else 1] = np.nan  # of a diagonal tile, the triangle read
        factor = linalg.tiled_cholesky(jnp.asarray(bad), 0.3, upper_zero=True)
        assert not np.isfinite(np.asarray(factor.inv_diag)).all(), (i, j)
        assert not (unrolled and bool(linalg.tiled_cholesky_slabs(jnp.asarray(bad), 0.3)[1])), (i, j)
    indefinite_shift = -2 * float(np.linalg.eigvalsh(a).max())
    indefinite = linalg.tiled_cholesky(zeroed, indefinite_shift, upper_zero=True)
    assert not np.isfinite(np.asarray(indefinite.inv_diag)).all()
    assert not (unrolled and bool(linalg.tiled_cholesky_slabs(zeroed, indefinite_shift)[1]))


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("kind", ["tiled", "lapack"])
@pytest.mark.parametrize("by_tiles", [True, False], ids=["by_tiles", "assembled"])
@pytest.mark.parametrize("n, ts", [(45, 16), (37, 8)], ids=["three_tiles", "five_tiles_short_block"])
def test_sample_space_factor_assembled_or_by_tiles_solves_the_system(monkeypatch, complex_, kind, by_tiles, n, ts):
    """The sample-space kernel factor is kept assembled (LAPACK's, up to ``ASSEMBLED_MAX_ROWS``
    padded rows; applied by two triangular solves) or in row slabs (the tiled factorisation's, up to
    ``UNROLL_FACTOR_MAX_TILES`` tile rows) and as tiles beyond, with a NaN placeholder of the same
    structure; each solves ``(A + shift) x = b`` for the unpadded rows (3 tile rows of 16, 45 rows
    padded to 48; 5 tile rows of 8, 37 rows padded to 40, in row slabs of 16, 16 and 8 rows).
    ``by_tiles`` sets both limits to 0."""
    if by_tiles:
        monkeypatch.setattr(_sample_space, "ASSEMBLED_MAX_ROWS", 0)
        monkeypatch.setattr(_sample_space, "UNROLL_FACTOR_MAX_TILES", 0)
    a = _spd(n, complex_, seed=27)
    tiles, _ = _padded_tiles(a, ts)
    factor, finite = jax.jit(lambda t: _sample_space._factor(t, 0.3, kind))(tiles)
    assert bool(finite) and isinstance(factor, linalg.TiledFactor) == by_tiles
    # within the limits: LAPACK's assembled factor, or the tiled factorisation's row slabs
    assert isinstance(factor, linalg.SlabFactor) == (not by_tiles and kind == "tiled")
    placeholder = _sample_space._nan_factor(tiles, kind)
    assert jax.tree.structure(placeholder) == jax.tree.structure(factor)
    assert all(p.shape == f.shape for p, f in zip(jax.tree.leaves(placeholder), jax.tree.leaves(factor), strict=True))
    rng = np.random.default_rng(28)
    b = rng.normal(size=(n, 2)) + (1j * rng.normal(size=(n, 2)) if complex_ else 0)
    x = jax.jit(lambda f, b: _sample_space._apply_factor(f, b, n))(factor, jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a + 0.3 * np.eye(n), b), rtol=1e-10)


@pytest.mark.parametrize("complex_", [False, True])
def test_refined_solve_contracts_or_keeps_the_factor_solve(complex_):
    """``_refined_solve``: each refinement step with an approximate inverse multiplies the error by
    its contraction factor (here ``rho = 0.3``: ``rho^2`` after one step, ``rho^3`` after two); with
    two steps, an iteration that does not contract (``F = 3 A^-1``: the error operator is ``-2 I``)
    keeps the factor's solve ``y0`` and reports 0 steps; the backward-error test decides ``converged``."""
    a = _spd(24, complex_, seed=31)
    rng = np.random.default_rng(32)
    u = rng.normal(size=(24, 1)) + (1j * rng.normal(size=(24, 1)) if complex_ else 0)
    exact = np.linalg.solve(a, u)
    inv = np.linalg.inv(a)
    op = lambda y: jnp.asarray(a) @ y
    norm = float(np.abs(a).sum(axis=1).max())
    scale = np.abs(exact).max()

    def run(approx_inverse, steps):
        apply = lambda v: jnp.asarray(approx_inverse) @ v
        return _sample_space._refined_solve(apply, op, jnp.asarray(u), jnp.asarray(True), norm, 24, steps)

    for steps in (1, 2):  # y0 = 0.7 exact: each step multiplies the error by 0.3
        y, info, good = run(0.7 * inv, steps)
        err = np.abs(np.asarray(y) - exact).max()
        assert 0.99 * 0.3 ** (steps + 1) * scale <= err <= 1.01 * 0.3 ** (steps + 1) * scale
        assert int(info.iterations) == steps and not bool(info.converged) and not bool(good)
        y, info, good = run(inv, steps)
        np.testing.assert_allclose(np.asarray(y), exact, rtol=1e-12)
        assert int(info.iterations) == steps and bool(info.converged) and bool(good)
    y, info, good = run(3 * inv, 2)  # the refinement would diverge: the factor's solve is kept
    np.testing.assert_allclose(np.asarray(y), 3 * exact, rtol=1e-12)
    assert int(info.iterations) == 0 and not bool(info.converged)


def test_small_sample_space_programs_apply_the_factor_by_triangular_solves():
    """At N = 64 (one tile) the sample-space update applies its kernel factor by triangular solves
    on the assembled 64 x 64 factor, not by tile products: the program the compiler sees is small."""
    from sr_models import mlp_log_psi, mlp_params, random_like, sub_jaxprs

    params = mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 3))
    grad = random_like(jax.random.PRNGKey(2), params)
    jaxpr = jax.make_jaxpr(lambda g, p, s: fishr.sr_solve(mlp_log_psi, g, p, s, damping=1e-3,
                                                          mode="sample_space")[0])(grad, params, x).jaxpr

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "triangular_solve":
                yield eqn.invars[0].aval.shape
            for _, inner in sub_jaxprs(eqn):
                yield from shapes(inner)

    found = list(shapes(jaxpr))
    assert (64, 64) in found, found  # the kernel factor's solves (the tiles' own inverses are 64 x 64 too: one tile)
    assert sum(shape == (64, 64) for shape in found) >= 4  # forward and backward, in the solve and its refinement


def test_tiled_cholesky_not_positive_definite_gives_nan():
    a = _spd(30, seed=24)
    a[12, 12] = -5.0  # in the second of three tiles
    tiles, _ = _padded_tiles(a, 10)
    x = linalg.tiled_cholesky_solve(linalg.tiled_cholesky(tiles), jnp.ones(30))
    assert np.isnan(np.asarray(x)).all()


def test_tiled_program_size_does_not_grow_with_the_matrix():
    """From 2,048 to 8,192 rows the matrix is 8 tile rows (tile_size) and the unrolled factorisation
    and row-slab solve have the same ops at every size; beyond, the loops have one compiled body
    (n = 12,288, 16,384 and 32,768 the same ops)."""
    import jax

    def ops(n, slabs):
        ts = linalg.tile_size(n)
        nb = -(-n // ts)
        spec = jax.ShapeDtypeStruct((nb, nb, ts, ts), jnp.float32)
        if slabs:
            solve = lambda t, b: linalg.slab_cholesky_solve(linalg.tiled_cholesky_slabs(t, 1.0)[0], b)
        else:
            solve = lambda t, b: linalg.tiled_cholesky_solve(linalg.tiled_cholesky(t, 1.0), b)
        text = jax.jit(solve).lower(spec, jax.ShapeDtypeStruct((nb * ts, 1), jnp.float32)).as_text()
        return sum(1 for line in text.splitlines() if " = " in line)

    few = {n: ops(n, True) for n in (2048, 3000, 4096, 6144, 8192)}
    assert len(set(few.values())) == 1, few
    many = {n: ops(n, False) for n in (12288, 16384, 32768)}
    assert len(set(many.values())) == 1, many


def test_tile_size_rule():
    assert linalg.tile_size(20) == 24 and linalg.tile_size(256) == 256
    assert linalg.tile_size(257) == linalg.tile_size(2048) == 256
    # up to 8,192 rows: 8 tile rows, their rows a multiple of 32; 512 beyond
    assert linalg.tile_size(2049) == 288 and linalg.tile_size(4096) == 512 and linalg.tile_size(8192) == 1024
    for n in (2049, 3000, 4095, 4100, 6144, 8191):
        ts = linalg.tile_size(n)
        assert ts % 32 == 0 and -(-n // ts) == linalg.UNROLL_FACTOR_MAX_TILES and ts - n / 8 < 32, n
    assert linalg.tile_size(8193) == 512


def test_lower_pair_enumerates_the_lower_triangle():
    pairs = [tuple(int(v) for v in linalg.lower_pair(jnp.int32(p))) for p in range(2080)]  # 64 x 64 tiles
    assert pairs == [(r, c) for r in range(64) for c in range(r + 1)]


@pytest.mark.parametrize("complex_", [False, True])
def test_psd_inf_norm_bound(complex_):
    a = _spd(30, complex_, seed=24)
    bound = float(linalg.psd_inf_norm_bound(linalg.to_tiles(jnp.asarray(a), 10)))
    norm = np.abs(a).sum(axis=1).max()
    assert norm <= bound <= 30 * norm
    ones = np.ones((12, 12))  # rank one, entries of one sign: the bound is the norm
    assert float(linalg.psd_inf_norm_bound(linalg.to_tiles(jnp.asarray(ones), 4))) == pytest.approx(12.0)


@pytest.mark.parametrize("complex_", [False, True])
def test_tiled_inf_norm(complex_):
    a = _spd(30, complex_, seed=26)
    tiles, _ = _padded_tiles(a, 10)
    t = np.asarray(tiles).copy()
    t[1, 1][np.triu_indices(10, 1)] = np.nan  # only the lower triangle of a diagonal tile is read
    t[0, 2] = np.nan  # nor the tiles above the diagonal
    np.testing.assert_allclose(float(linalg.tiled_inf_norm(jnp.asarray(t))), np.abs(a).sum(axis=1).max(), rtol=1e-13)


@pytest.mark.parametrize("complex_", [False, True])
def test_preconditioned_cg_with_a_float32_factor_reaches_float64_accuracy(complex_):
    """A float32 Cholesky factor as preconditioner: float64 accuracy at dsposv's backward-error test."""
    a = _spd(200, complex_, seed=27)
    rng = np.random.default_rng(28)
    b = rng.normal(size=200) + (1j * rng.normal(size=200) if complex_ else 0)
    factor = linalg.cholesky_factor(jnp.asarray(a).astype(jnp.complex64 if complex_ else jnp.float32))
    precondition = lambda r: linalg.cholesky_factor_solve(factor, r.astype(factor.dtype)).astype(r.dtype)
    x, info = linalg.cg(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), precondition(jnp.asarray(b)), rtol=0.0,
                        max_steps=30, preconditioner=precondition, backward_error=np.abs(a).sum(axis=1).max())
    expected = np.linalg.solve(a, b)
    assert bool(info.converged) and 1 <= int(info.iterations) <= 10
    assert np.linalg.norm(np.asarray(x) - expected) <= 1e-13 * np.linalg.norm(expected)
    unrefined = np.asarray(precondition(jnp.asarray(b)))
    assert np.linalg.norm(unrefined - expected) > 1e-9 * np.linalg.norm(expected)  # float32 alone is not enough


def test_meets_backward_error_is_the_dsposv_test():
    a = _spd(20, seed=25)
    b = np.random.default_rng(26).normal(size=20)
    x = np.linalg.solve(a, b)
    a_norm = np.abs(a).sum(axis=1).max()
    r = b - a @ x
    bound = a_norm * np.finfo(np.float64).eps * np.sqrt(20)
    assert np.abs(r).max() <= np.abs(x).max() * bound
    assert bool(linalg.meets_backward_error(jnp.asarray(r), jnp.asarray(x), a_norm, 20))
    r_big = r + 10 * np.abs(x).max() * bound
    assert not bool(linalg.meets_backward_error(jnp.asarray(r_big), jnp.asarray(x), a_norm, 20))


@pytest.mark.parametrize("complex_", [False, True])
def test_cg_floor_margin_stops_where_the_error_stops_changing(complex_):
    """CG's recursive residual keeps falling after the true one has reached its rounding floor; the margin
    stops four digits past the backward-error test with the error that iterating to stagnation reaches."""
    a = _spd(200, complex_, seed=27)
    rng = np.random.default_rng(28)
    b = rng.normal(size=200) + (1j * rng.normal(size=200) if complex_ else 0)
    factor = linalg.cholesky_factor(jnp.asarray(a).astype(jnp.complex64 if complex_ else jnp.float32))
    precondition = lambda r: linalg.cholesky_factor_solve(factor, r.astype(factor.dtype)).astype(r.dtype)
    a_norm = np.abs(a).sum(axis=1).max()
    expected = np.linalg.solve(a, b)
    runs = {}
    for margin in (None, 1e-4):
        x, info = linalg.cg(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), rtol=0.0, max_steps=50,
                            preconditioner=precondition, backward_error=a_norm, stop_on_stagnation=True,
                            to_rounding_floor=True, floor_margin=margin)
        assert bool(info.converged)
        runs[margin] = (int(info.iterations), np.linalg.norm(np.asarray(x) - expected) / np.linalg.norm(expected))
    (steps_floor, err_floor), (steps_margin, err_margin) = runs[None], runs[1e-4]
    assert steps_margin < steps_floor
    assert err_margin <= max(2 * err_floor, 1e-15)
    for bad in (0.0, 2.0, -1e-4):
        with pytest.raises(ValueError, match="floor_margin"):
            linalg.cg(lambda v: v, jnp.asarray(b), to_rounding_floor=True, stop_on_stagnation=True,
                      backward_error=1.0, floor_margin=bad)
    with pytest.raises(ValueError, match="floor_margin"):  # nothing to tighten: it would be ignored
        linalg.cg(lambda v: v, jnp.asarray(b), backward_error=1.0, floor_margin=1e-4)
    with pytest.raises(ValueError, match="floor_margin"):
        linalg.cg(lambda v: v, jnp.asarray(b), to_rounding_floor=True, stop_on_stagnation=True, floor_margin=1e-4)


def test_cg_stops_on_stagnation():
    a = _spd(50, seed=29)
    b = jnp.ones(50)
    # a float32-rounded operator: float64 CG cannot go below its rounding, and stops there
    a32 = jnp.asarray(a, jnp.float32)
    matvec = lambda v: (a32 @ v.astype(jnp.float32)).astype(jnp.float64)
    _, info = linalg.cg(matvec, b, rtol=0.0, max_steps=500, stop_on_stagnation=True)
    assert int(info.iterations) < 500 and not bool(info.converged)


def test_cg_matches_solve_and_reports_diagnostics():
    a = _spd(40, seed=5)
    b = np.random.default_rng(6).normal(size=40)
    x, info = linalg.cg(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, b), rtol=1e-9)
    assert 0 < int(info.iterations) <= 400 and bool(info.converged) and int(info.fallback) == 0
    # the reported residual is recomputed from x, not CG's recursion; at 2e-13 it is at the rounding of
    # the product A x itself (1.5e-14 here), which differs between BLAS and XLA and with FMA contraction
    xn = np.asarray(x)
    np.testing.assert_allclose(float(info.residual_norm), np.linalg.norm(b - a @ xn), rtol=1e-6,
                               atol=np.finfo(float).eps * np.linalg.norm(a, 2) * np.linalg.norm(xn))
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


@pytest.mark.parametrize("p", [40, 130, 301])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.complex128])
def test_upper_gram_forms_the_upper_triangle(p, dtype):
    key = jax.random.split(jax.random.PRNGKey(0), 2)
    rows = jax.random.normal(key[0], (50, p))
    if dtype == jnp.complex128:
        rows = rows + 1j * jax.random.normal(key[1], (50, p))
    full = np.asarray(rows.conj().T @ rows)
    upper = np.asarray(jax.jit(linalg.upper_gram)(rows))
    np.testing.assert_allclose(np.triu(upper), np.triu(full), rtol=1e-12, atol=1e-12 * np.abs(full).max())
    np.testing.assert_allclose(linalg.hermitian_from_upper(jnp.asarray(upper)), full, rtol=1e-12,
                               atol=1e-12 * np.abs(full).max())
    if p >= 32 * linalg.GRAM_BLOCKS:  # the blocks below the diagonal are not formed
        assert np.all(upper[-(p // linalg.GRAM_BLOCKS):, :p // linalg.GRAM_BLOCKS] == 0)
