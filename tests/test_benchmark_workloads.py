"""The benchmark workloads' physics: exact energies, local energies, samplers (spin chains and hydrogen)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import continuum
from benchmarks.spin_chains import (
    MLP,
    RBM,
    SpinChain,
    _basis_spins,
    exact_ground_energy,
    local_energies,
    random_spins,
    sparse_hamiltonian,
)

# tests of the benchmark harness (workloads, tables, runners), not of fishr: marked slow (CI runs
# them; -m "not slow" leaves them out)
pytestmark = pytest.mark.slow


def _visible(params, scale):
    """Rescale random initial parameters so that amplitudes vary visibly across the basis."""
    return jax.tree.map(lambda p: scale * p / jnp.maximum(jnp.abs(p).max(), 1e-6), params)


@pytest.mark.parametrize("kind", ["ising", "heisenberg"])
@pytest.mark.parametrize("length", [4, 6])
def test_lanczos_energy_equals_dense_diagonalisation(kind, length):
    dense = sparse_hamiltonian(kind, length).toarray()
    np.testing.assert_allclose(dense, dense.T)
    assert exact_ground_energy(kind, length) == pytest.approx(np.linalg.eigvalsh(dense)[0], rel=1e-10)


@pytest.mark.parametrize("length", [8, 12])
def test_ising_energy_equals_closed_form_at_criticality(length):
    # Periodic TFIM at J = h = 1 maps to free fermions: E0 = -2 / sin(pi / (2 L)) for even L.
    assert exact_ground_energy("ising", length) == pytest.approx(-2.0 / np.sin(np.pi / (2 * length)), rel=1e-10)


def test_heisenberg_energy_closed_forms():
    # Pauli matrices (4x the spin-1/2 S.S convention): L = 4 ring E0 = -8; Marshall's rotation keeps the spectrum.
    assert exact_ground_energy("heisenberg", 4) == pytest.approx(-8.0, rel=1e-12)
    a = np.linalg.eigvalsh(sparse_hamiltonian("heisenberg", 6, marshall=True).toarray())
    b = np.linalg.eigvalsh(sparse_hamiltonian("heisenberg", 6, marshall=False).toarray())
    np.testing.assert_allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("kind,marshall", [("ising", True), ("heisenberg", True), ("heisenberg", False)])
@pytest.mark.parametrize("model", [RBM(alpha=2, param_dtype=jnp.float64),
                                   RBM(alpha=1, complex_output=True, param_dtype=jnp.float64),
                                   MLP(widths=(8,), complex_output=True, param_dtype=jnp.float64)],
                         ids=["rbm", "rbm-complex", "mlp-complex"])
@pytest.mark.parametrize("length", [4, 5])
def test_local_energies_equal_h_psi_over_psi(kind, marshall, model, length):
    s = jnp.asarray(_basis_spins(length), jnp.float64)
    params = _visible(model.init(jax.random.PRNGKey(length), s), 0.3)
    psi = np.exp(np.asarray(model.apply(params, s)).astype(np.complex128))
    h_psi = sparse_hamiltonian(kind, length, marshall=marshall) @ psi
    e_loc = np.asarray(local_energies(kind, model.apply, params, s, marshall=marshall))
    np.testing.assert_allclose(e_loc, h_psi / psi, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["ising", "heisenberg"])
def test_metropolis_samples_psi_squared(kind):
    length, n = 4, 4096
    chain = SpinChain(kind, length)
    model = RBM(alpha=1, param_dtype=jnp.float64)
    key = jax.random.PRNGKey(1)
    s0 = jnp.asarray(_basis_spins(length), jnp.float64)
    params = _visible(model.init(key, s0), 1.0)
    s = chain.init_samples(key, n).astype(jnp.float64)
    s, acceptance = jax.jit(lambda p, s, k: chain.sample(model.apply, p, s, k, 30))(params, s, key)
    assert 0.01 < float(acceptance) <= 1.0  # peaked |psi|^2: few moves accepted, the histogram is the test
    p_exact = np.exp(2 * np.asarray(model.apply(params, s0)))
    if kind == "heisenberg":  # exchange moves stay in the sector of the initial magnetisation (zero)
        assert np.all(np.asarray(s).sum(axis=1) == 0)
        p_exact = p_exact * (np.asarray(s0).sum(axis=1) == 0)
    p_exact /= p_exact.sum()
    index = np.asarray(((1 - s) / 2) @ (2 ** np.arange(length))).astype(int)
    p_emp = np.bincount(index, minlength=2**length) / n
    assert np.abs(p_emp - p_exact).max() < 0.03


def test_random_spins_zero_magnetisation():
    s = random_spins(jax.random.PRNGKey(0), 64, 10, zero_magnetisation=True)
    assert s.shape == (64, 10) and np.all(np.asarray(s).sum(axis=1) == 0)


def test_hydrogen_local_energy_of_exact_ground_state_is_constant():
    # log psi = -|r| (network output zeroed, envelope rate softplus(c) = 1): E_loc = -1/2 everywhere.
    model = continuum.HydrogenNet(param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(0), (32, 3), jnp.float64) * 2.0
    params = model.init(jax.random.PRNGKey(1), x)
    params = jax.tree.map(jnp.zeros_like, params)
    params["params"]["c"] = jnp.log(jnp.expm1(1.0))
    e_loc = jax.jit(lambda p, x: continuum.local_energies(model.apply, p, x))(params, x)
    np.testing.assert_allclose(np.asarray(e_loc), -0.5, atol=1e-9)


def test_hydrogen_local_energy_matches_finite_differences():
    model = continuum.HydrogenNet(param_dtype=jnp.float64)
    x = jnp.asarray([[0.3, -0.7, 1.1], [1.5, 0.2, -0.4]], jnp.float64)
    params = _visible(model.init(jax.random.PRNGKey(2), x), 0.8)
    e_loc = np.asarray(jax.jit(lambda p, x: continuum.local_energies(model.apply, p, x))(params, x))
    h = 1e-4
    shifts = np.concatenate([np.zeros((1, 3)), h * np.eye(3), -h * np.eye(3)])  # r, r + h e_k, r - h e_k
    points = (np.asarray(x)[:, None, :] + shifts[None]).reshape(-1, 3)
    psi = np.exp(np.asarray(jax.jit(model.apply)(params, jnp.asarray(points)))).reshape(len(x), 7)
    lap = (psi[:, 1:4] + psi[:, 4:7] - 2 * psi[:, :1]).sum(axis=1) / h**2
    expected = -0.5 * lap / psi[:, 0] - 1.0 / np.linalg.norm(np.asarray(x), axis=1)
    np.testing.assert_allclose(e_loc, expected, rtol=1e-5)


@pytest.mark.parametrize("kind", ["ising", "heisenberg"])
def test_variational_energy_is_the_dense_expectation(kind):
    """<psi|H|psi> / <psi|psi> with the dense Hamiltonian and the model's amplitudes on every basis
    state (zero outside the sum s = 0 sector for Heisenberg, where the sampler stays)."""
    length = 6
    model = RBM(alpha=1)
    params = _visible(model.init(jax.random.PRNGKey(0), jnp.ones((1, length))), 0.5)
    spins = _basis_spins(length)
    psi = np.exp(np.asarray(model.apply(params, jnp.asarray(spins, jnp.float32)), np.float64))
    if kind == "heisenberg":
        psi = np.where(spins.sum(axis=1) == 0, psi, 0.0)
    h = sparse_hamiltonian(kind, length).toarray()
    expected = psi @ h @ psi / (psi @ psi)
    assert SpinChain(kind, length).variational_energy(model.apply, params, chunk=16) == pytest.approx(expected,
                                                                                                      rel=1e-6)


def test_trust_region_summary_compares_with_the_best_plain_rate():
    from benchmarks import trust_region

    row = lambda method, setting, seed, err, div=False: dict(system="S", method=method, setting=setting, seed=seed,
                                                             rel_error=err, diverged=div, ms_per_step=1.0, seconds=1.0)
    rows = [row("plain a", "plain", 0, 2e-4), row("plain a", "plain", 1, 4e-4),
            row("plain b", "plain", 0, 1e-4), row("plain b", "plain", 1, 1e-4),
            row("plain c", "plain", 0, float("nan"), True), row("plain c", "plain", 1, 1e-5),
            row("tr", "trust_region bound", 0, 2e-4), row("tr", "trust_region bound", 1, 4e-4)]
    summary = {r["method"]: r for r in trust_region.summarise(rows)}
    assert summary["tr"]["best_plain"] == "plain b"  # c diverged once: not a candidate
    assert summary["tr"]["vs_best_plain"] == pytest.approx(3.0)
    assert summary["plain c"]["diverged"] == 1
    assert "best plain" in trust_region.markdown({"summary": trust_region.summarise(rows)})
    assert set(trust_region.methods()) >= {"plain SR lr=0.03", "trust region lr=0.05 max_norm=0.001"}


def test_time_to_target_counts_the_compiling_step_and_a_trailing_mean():
    from benchmarks.vmc import time_to_target

    e0 = -10.0
    energies = e0 * (1 + 0.1 * 0.5 ** np.arange(40))  # relative error 0.1 * 2^-t
    times = np.r_[5.0, np.ones(39)]  # a 5 s first (compiling) step, then 1 s steps
    window = 4
    # the trailing mean over steps t-3..t has relative error 0.1 * 2^-t * (1 + 2 + 4 + 8) / 4 = 0.375 * 2^-t
    t_hit = next(t for t in range(window - 1, 40) if 0.375 * 0.5 ** t <= 1e-3)
    assert time_to_target(energies, times, e0, 1e-3, window) == pytest.approx(5.0 + t_hit)
    assert time_to_target(energies, times, e0, 1e-14, window) is None
    noisy = energies.copy()
    noisy[5] = e0  # one exact step early on does not reach the target on its own
    assert time_to_target(noisy, times, e0, 1e-6, window) == time_to_target(energies, times, e0, 1e-6, window) > 10
