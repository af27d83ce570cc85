"""The benchmark workloads' physics: exact energies and local energies of the Ising chain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.spin_chains import RBM, exact_ground_energy, local_energies, metropolis, tfim_sparse


def _basis(length):
    states = np.arange(2**length)
    return 1.0 - 2.0 * ((states[:, None] >> np.arange(length)) & 1)


@pytest.mark.parametrize("length", [4, 6])
def test_lanczos_energy_equals_dense_diagonalisation(length):
    dense = tfim_sparse(length).toarray()
    np.testing.assert_allclose(dense, dense.T)
    assert exact_ground_energy(length) == pytest.approx(np.linalg.eigvalsh(dense)[0], rel=1e-10)


@pytest.mark.parametrize("length", [8, 12])
def test_lanczos_energy_equals_closed_form_at_criticality(length):
    # Periodic TFIM at J = h = 1 maps to free fermions: E0 = -2 / sin(pi / (2 L)) for even L.
    assert exact_ground_energy(length) == pytest.approx(-2.0 / np.sin(np.pi / (2 * length)), rel=1e-10)


@pytest.mark.parametrize("length", [4, 5])
def test_local_energies_equal_h_psi_over_psi(length):
    model = RBM(alpha=2)
    s = jnp.asarray(_basis(length))
    params = jax.tree.map(lambda p: 0.3 * p / jnp.maximum(jnp.abs(p).max(), 1e-6),
                          model.init(jax.random.PRNGKey(0), s))  # visible amplitudes, not ~1
    psi = np.exp(np.asarray(model.apply(params, s), dtype=np.float64))
    h_psi = tfim_sparse(length) @ psi
    e_loc = np.asarray(local_energies(model.apply, params, s))
    np.testing.assert_allclose(e_loc, h_psi / psi, rtol=1e-9, atol=1e-9)


def test_metropolis_samples_psi_squared():
    length, n = 4, 4096
    model = RBM(alpha=1)
    key = jax.random.PRNGKey(1)
    s0 = jnp.asarray(_basis(length))
    params = jax.tree.map(lambda p: 3.0 * p / jnp.maximum(jnp.abs(p).max(), 1e-6), model.init(key, s0))
    s = jnp.where(jax.random.bernoulli(key, 0.5, (n, length)), 1.0, -1.0)
    s, acceptance = jax.jit(lambda p, s, k: metropolis(model.apply, p, s, k, 30))(params, s, key)
    assert 0.05 < float(acceptance) <= 1.0
    p_exact = np.exp(2 * np.asarray(model.apply(params, s0)))
    p_exact /= p_exact.sum()
    index = np.asarray(((1 - s) / 2) @ (2 ** np.arange(length))).astype(int)
    p_emp = np.bincount(index, minlength=2**length) / n
    assert np.abs(p_emp - p_exact).max() < 0.03
