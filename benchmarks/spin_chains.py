"""Transverse-field Ising chain workload: exact energy, local energies, Metropolis sampling, RBM.

Hamiltonian (periodic chain of ``L`` spins ``s_i = +-1`` in the sigma^z basis)

    H = -J sum_i s^z_i s^z_{i+1} - h sum_i sigma^x_i,   J = h = 1 (the critical point).

* :func:`exact_ground_energy`: the lowest eigenvalue of the sparse ``2^L x 2^L``
  matrix by Lanczos (``scipy.sparse.linalg.eigsh``), computed here, not pasted.
* :func:`local_energies`: ``E_loc(s) = <s|H|psi> / <s|psi>
  = -J sum_i s_i s_{i+1} - h sum_i psi(s with s_i flipped) / psi(s)``.
* :func:`metropolis`: single-spin-flip Metropolis on ``|psi|^2`` for many chains
  at once, jitted (``lax.scan`` over sweeps).
* :class:`RBM`: ``log psi(s) = sum_j log cosh(W s + b)_j + a . s`` in Flax.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def tfim_sparse(length: int, j: float = 1.0, h: float = 1.0):
    """The Hamiltonian as a scipy CSR matrix; basis index bit ``i`` = 1 means ``s_i = -1``."""
    import scipy.sparse as sp

    dim = 2**length
    states = np.arange(dim)
    spins = 1 - 2 * ((states[:, None] >> np.arange(length)) & 1)  # (dim, L) of +-1
    diag = -j * np.sum(spins * np.roll(spins, -1, axis=1), axis=1).astype(float)
    rows, cols = [states], [states]
    vals = [diag]
    for i in range(length):
        rows.append(states)
        cols.append(states ^ (1 << i))
        vals.append(np.full(dim, -h))
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(dim, dim))


def exact_ground_energy(length: int, j: float = 1.0, h: float = 1.0) -> float:
    """Ground-state energy by Lanczos on the sparse Hamiltonian."""
    from scipy.sparse.linalg import eigsh

    return float(eigsh(tfim_sparse(length, j, h), k=1, which="SA", return_eigenvectors=False)[0])


def local_energies(log_psi, params, s, j: float = 1.0, h: float = 1.0):
    """``E_loc`` for a batch ``s`` of shape ``(n, L)`` (real or complex ``log psi``)."""
    n, length = s.shape
    flipped = s[:, None, :] * (1 - 2 * jnp.eye(length, dtype=s.dtype))[None]  # (n, L, L): s with s_i flipped
    log_s = log_psi(params, s)
    log_f = log_psi(params, flipped.reshape(n * length, length)).reshape(n, length)
    diagonal = -j * jnp.sum(s * jnp.roll(s, -1, axis=1), axis=1)
    return diagonal - h * jnp.sum(jnp.exp(log_f - log_s[:, None]), axis=1)


def metropolis(log_psi, params, s, key, sweeps: int = 2):
    """``sweeps * L`` single-spin-flip Metropolis moves on every chain of ``s`` (``(n, L)``)."""
    n, length = s.shape

    def move(carry, key):
        s, log_p = carry
        k_site, k_acc = jax.random.split(key)
        site = jax.random.randint(k_site, (n,), 0, length)
        proposal = s * (1 - 2 * jax.nn.one_hot(site, length, dtype=s.dtype))
        log_q = (2 * jnp.real(log_psi(params, proposal))).astype(log_p.dtype)
        accept = jnp.log(jax.random.uniform(k_acc, (n,))) < log_q - log_p
        return (jnp.where(accept[:, None], proposal, s), jnp.where(accept, log_q, log_p)), accept

    init = (s, 2 * jnp.real(log_psi(params, s)))
    (s, _), accepted = jax.lax.scan(move, init, jax.random.split(key, sweeps * length))
    return s, jnp.mean(accepted)


def _log_cosh(x):
    """``log cosh x`` without overflow: ``|x| + log1p(exp(-2|x|)) - log 2``."""
    ax = jnp.abs(x)
    return ax + jnp.log1p(jnp.exp(-2.0 * ax)) - jnp.log(2.0).astype(x.dtype)


class RBM(nn.Module):
    """Restricted Boltzmann machine log psi with ``alpha * L`` hidden units (real parameters)."""

    alpha: int = 1
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s):
        theta = nn.Dense(self.alpha * s.shape[-1], param_dtype=self.param_dtype,
                         kernel_init=nn.initializers.normal(0.01))(s)
        visible = nn.Dense(1, use_bias=False, param_dtype=self.param_dtype,
                           kernel_init=nn.initializers.normal(0.01))(s)[..., 0]
        return jnp.sum(_log_cosh(theta), axis=-1) + visible
