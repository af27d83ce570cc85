"""The workloads of benchmarks/sr_variants.py at tiny sizes: the J1-J2 model (bonds, exact energy, local
energies against the sparse Hamiltonian) and the report of both parts (structure, finite numbers)."""

import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import sr_variants as bench
from benchmarks.spin_chains import MLP

# tests of the benchmark harness (workloads, tables, runners), not of fishr: marked slow (CI runs
# them; -m "not slow" leaves them out)
pytestmark = pytest.mark.slow


def test_square_lattice_bonds():
    nn, nnn = bench.square_bonds(4, 4)
    assert len(nn) == 32 and len(nnn) == 32 and not set(nn) & set(nnn)
    for bonds in (nn, nnn):  # every site has 4 neighbours of each kind
        assert np.all(np.bincount(np.ravel(bonds), minlength=16) == 4)
    assert (0, 1) in nn and (0, 4) in nn and (0, 5) in nnn and (1, 4) in nnn


@pytest.mark.parametrize("j2,per_site", [(0.0, -0.7017802), (0.5, -0.5286202)])
def test_exact_energy_matches_the_literature(j2, per_site):
    # 4 x 4 periodic J1-J2 ground energies per site in S.S units (Pauli matrices: 4x)
    system = bench.J1J2(4, 4, j2)
    assert system.sector_basis().size == 12870
    assert system.exact_energy() / (4 * 16) == pytest.approx(per_site, abs=2e-7)


@pytest.mark.parametrize("marshall", [True, False])
def test_local_energies_are_h_psi_over_psi(marshall):
    system = bench.J1J2(4, 4, 0.5, marshall=marshall)
    model = MLP(widths=(8,), complex_output=True, param_dtype=jnp.float64)
    basis = system.sector_basis()
    spins = jnp.asarray(1 - 2 * ((basis[:, None] >> np.arange(16)) & 1), jnp.float64)
    rng = np.random.default_rng(0)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), spins[:2])
    params = jax.tree.map(lambda p: p + 0.5 * rng.standard_normal(p.shape), params)  # a non-trivial phase
    psi = np.exp(np.asarray(jax.jit(model.apply)(params, spins)))
    h_psi = system.sparse_hamiltonian() @ psi
    pick = rng.choice(basis.size, 200, replace=False)
    e_loc = np.asarray(jax.jit(lambda p, s: system.local_energies(model.apply, p, s))(params, spins[pick]))
    np.testing.assert_allclose(e_loc, h_psi[pick] / psi[pick], rtol=1e-10, atol=1e-10)


def test_variational_energy_is_the_sparse_expectation():
    """<psi|H|psi> / <psi|psi> over the S^z = 0 sector with the sparse Hamiltonian and a complex
    MLP's amplitudes, against the enumerated local-energy average (float64 model)."""
    system = bench.J1J2(4, 2, 0.5)
    model = MLP(widths=(8,), complex_output=True, param_dtype=jnp.float64)
    basis = system.sector_basis()
    spins = jnp.asarray(1 - 2 * ((basis[:, None] >> np.arange(8)) & 1), jnp.float64)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), spins[:2])
    params = jax.tree.map(lambda p: p + 0.5 * np.random.default_rng(1).standard_normal(p.shape), params)
    psi = np.exp(np.asarray(jax.jit(model.apply)(params, spins)))
    expected = np.real(np.vdot(psi, system.sparse_hamiltonian() @ psi) / np.vdot(psi, psi))
    assert system.variational_energy(model.apply, params, chunk=16) == pytest.approx(expected, rel=1e-6)


def test_tiny_report_structure_and_finite_numbers():
    have_nk = importlib.util.find_spec("netket") is not None
    # a subset of each part (compilation dominates at tiny sizes); NetKet's rows skip cleanly without it
    report = bench.run("tiny", log=lambda *a, **k: None, netket=True, methods=("Spectral smooth+snr",),
                       cost_rows=("Spectral()",))
    assert report["netket"] is have_nk
    (row,) = report["cost"]
    expected = {"plain", "Spectral()"} | ({"netket srt chol", "netket srt pinv_smooth"} if have_nk else set())
    assert set(row["warm_ms"]) == expected
    assert row["N"] == bench.PRESETS["tiny"]["cost_sizes"][0] and row["P"] > 0
    for name in expected:
        med, lo, hi = row["warm_ms"][name]
        assert 0 < lo <= med <= hi and math.isfinite(hi)
        assert row["first_s"][name] > 0 and row["finite"][name] and math.isfinite(row["rel_diff_vs_plain"][name])
        assert row["dtypes"][name] == "float32"
    assert row["rel_diff_vs_plain"]["plain"] == 0.0
    assert row["rel_diff_vs_plain"]["Spectral()"] < 1e-3  # the same plain SR update, by eigh
    assert set(row["ratios"]) >= {"Spectral() / plain"} and set(row["ratios_min"]) == set(row["ratios"])
    assert [t["ratio"] for t in report["targets"]] == ["Spectral() / plain"]
    q = report["quality"]
    assert q["exact"] == pytest.approx(-33.8316934, abs=1e-6)
    (r,) = q["rows"]
    assert r["method"] == "Spectral smooth+snr" and not r["diverged"]
    assert len(r["energies"]) == bench.PRESETS["tiny"]["steps"]
    for key in ("rel_error", "variance", "ms_per_step", "seconds_total", "first_step_s"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert q["exact"] < r["final_energy"] < 0 and r["damping_used_last"] == pytest.approx(bench.DAMPING_B)
    text = bench.markdown(report)
    assert "### A." in text and "### B." in text and "| Spectral() |" in text and "| Spectral smooth+snr |" in text
