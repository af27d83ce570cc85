"""Spin-chain VMC workloads: Hamiltonians, exact energies, local energies, Metropolis, models.

Periodic chains of ``L`` spins ``s_i = +-1`` (sigma^z eigenvalues), Pauli-matrix convention:

* transverse-field Ising ("ising"):  ``H = -J sum_i s^z_i s^z_{i+1} - h sum_i sigma^x_i``, ``J = h = 1``
  (the critical point);
* Heisenberg ("heisenberg"):  ``H = J sum_i (sigma^x_i sigma^x_{i+1} + sigma^y_i sigma^y_{i+1}
  + sigma^z_i sigma^z_{i+1})``, ``J = 1`` (antiferromagnet). With ``marshall=True`` (default)
  the Hamiltonian is rotated by Marshall's sign rule (``sigma^{x,y}`` on odd sites change sign),
  which flips the sign of the hopping term: the same spectrum, a positive ground state that a
  real ``log psi`` can represent.

* :func:`sparse_hamiltonian`: the ``2^L x 2^L`` scipy CSR matrix; basis index bit ``i`` = 1 means ``s_i = -1``.
* :func:`exact_ground_energy`: its lowest eigenvalue by Lanczos (``scipy.sparse.linalg.eigsh``),
  computed by the benchmark, not pasted.
* :func:`local_energies`: ``E_loc(s) = sum_s' <s|H|s'> psi(s') / psi(s)``, batched, for real or
  complex ``log psi``; :meth:`SpinChain.variational_energy`: the exact ``<H>`` of a model by
  enumerating the basis (no sampling error).
* :func:`metropolis`: Metropolis on ``|psi|^2`` for many chains at once, jitted (``lax.scan``):
  single-spin flips (Ising) or exchanges of two spins (Heisenberg; conserves the magnetisation,
  the ground state lies in the ``sum s = 0`` sector).
* :class:`RBM` and :class:`MLP`: Flax ``log psi`` models with real parameters, real or complex output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("ising", "heisenberg")


def _basis_spins(length: int) -> np.ndarray:
    """``(2^L, L)`` array of +-1: row ``k`` is the configuration of basis state ``k``."""
    states = np.arange(2**length)
    return 1 - 2 * ((states[:, None] >> np.arange(length)) & 1)


def sparse_hamiltonian(kind: str, length: int, coupling: float = 1.0, field: float = 1.0, marshall: bool = True):
    """The Hamiltonian of a periodic chain as a scipy CSR matrix (see the module docstring)."""
    import scipy.sparse as sp

    if kind not in KINDS:
        raise ValueError(f"unknown chain {kind!r}; expected one of {KINDS}")
    dim = 2**length
    states = np.arange(dim)
    spins = _basis_spins(length)
    zz = np.sum(spins * np.roll(spins, -1, axis=1), axis=1).astype(float)
    rows, cols, vals = [states], [states], []
    if kind == "ising":
        vals.append(-coupling * zz)
        for i in range(length):
            rows.append(states)
            cols.append(states ^ (1 << i))
            vals.append(np.full(dim, -field))
    else:
        vals.append(coupling * zz)
        hop = -2.0 * coupling if marshall else 2.0 * coupling
        for i in range(length):
            j = (i + 1) % length
            anti = spins[:, i] != spins[:, j]  # sigma^x sigma^x + sigma^y sigma^y = 2 (sigma^+ sigma^- + h.c.)
            rows.append(states[anti])
            cols.append(states[anti] ^ ((1 << i) | (1 << j)))
            vals.append(np.full(int(anti.sum()), hop))
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(dim, dim))


def exact_ground_energy(kind: str, length: int, **couplings) -> float:
    """Ground-state energy by Lanczos on the sparse Hamiltonian (``eigsh``, smallest algebraic)."""
    from scipy.sparse.linalg import eigsh

    h = sparse_hamiltonian(kind, length, **couplings)
    return float(eigsh(h, k=1, which="SA", return_eigenvectors=False, tol=1e-10)[0])


def local_energies(kind: str, log_psi, params, s, coupling: float = 1.0, field: float = 1.0, marshall: bool = True):
    """``E_loc(s)`` for a batch ``s`` of shape ``(n, L)`` (same conventions as :func:`sparse_hamiltonian`)."""
    n, length = s.shape
    log_s = log_psi(params, s)
    zz = jnp.sum(s * jnp.roll(s, -1, axis=1), axis=1)
    if kind == "ising":
        flip = 1 - 2 * jnp.eye(length, dtype=s.dtype)  # row i flips spin i
        connected = (s[:, None, :] * flip[None]).reshape(n * length, length)
        ratio = jnp.exp(log_psi(params, connected).reshape(n, length) - log_s[:, None])
        return -coupling * zz - field * jnp.sum(ratio, axis=1)
    if kind == "heisenberg":
        eye = jnp.eye(length, dtype=s.dtype)
        flip = 1 - 2 * (eye + jnp.roll(eye, 1, axis=1))  # row i flips spins i and i+1
        connected = (s[:, None, :] * flip[None]).reshape(n * length, length)
        ratio = jnp.exp(log_psi(params, connected).reshape(n, length) - log_s[:, None])
        anti = s != jnp.roll(s, -1, axis=1)  # bond (i, i+1) can exchange
        hop = -2.0 * coupling if marshall else 2.0 * coupling
        return coupling * zz + hop * jnp.sum(jnp.where(anti, ratio, 0.0), axis=1)
    raise ValueError(f"unknown chain {kind!r}; expected one of {KINDS}")


def random_spins(key, n: int, length: int, zero_magnetisation: bool = False, dtype=jnp.float32):
    """``n`` random configurations; with ``zero_magnetisation`` each has ``L/2`` up spins."""
    if not zero_magnetisation:
        return jnp.where(jax.random.bernoulli(key, 0.5, (n, length)), 1.0, -1.0).astype(dtype)
    base = jnp.where(jnp.arange(length) < length // 2, 1.0, -1.0).astype(dtype)
    keys = jax.random.split(key, n)
    return jax.vmap(lambda k: jax.random.permutation(k, base))(keys)


def metropolis(log_psi, params, s, key, sweeps: int = 2, move: str = "flip"):
    """``sweeps * L`` Metropolis moves on every chain of ``s`` (``(n, L)``); returns (samples, acceptance).

    ``move="flip"`` flips one random spin; ``"exchange"`` swaps two random sites (a no-op, and
    accepted, when they are equal), which keeps the magnetisation.
    """
    n, length = s.shape

    def propose(key, s):
        if move == "flip":
            site = jax.random.randint(key, (n,), 0, length)
            return s * (1 - 2 * jax.nn.one_hot(site, length, dtype=s.dtype))
        k1, k2 = jax.random.split(key)
        i = jax.random.randint(k1, (n,), 0, length)
        j = jax.random.randint(k2, (n,), 0, length)
        si = jnp.take_along_axis(s, i[:, None], axis=1)
        sj = jnp.take_along_axis(s, j[:, None], axis=1)
        oi = jax.nn.one_hot(i, length, dtype=s.dtype)
        oj = jax.nn.one_hot(j, length, dtype=s.dtype)
        return s + (sj - si) * oi + (si - sj) * oj

    def step(carry, key):
        s, log_p = carry
        k_prop, k_acc = jax.random.split(key)
        proposal = propose(k_prop, s)
        log_q = 2 * jnp.real(log_psi(params, proposal))
        accept = jnp.log(jax.random.uniform(k_acc, (n,))) < log_q - log_p
        return (jnp.where(accept[:, None], proposal, s), jnp.where(accept, log_q, log_p)), accept

    init = (s, 2 * jnp.real(log_psi(params, s)))
    (s, _), accepted = jax.lax.scan(step, init, jax.random.split(key, sweeps * length))
    return s, jnp.mean(accepted)


def _log_cosh(x):
    """``log cosh x`` without overflow: ``|x| + log1p(exp(-2|x|)) - log 2``
    (real or complex via the principal branch)."""
    if jnp.iscomplexobj(x):
        return jnp.log(jnp.cosh(x))
    ax = jnp.abs(x)
    return ax + jnp.log1p(jnp.exp(-2.0 * ax)) - jnp.log(2.0).astype(x.dtype)


class RBM(nn.Module):
    """Restricted Boltzmann machine ``log psi(s) = sum_j log cosh(W s + b)_j + a . s``, ``alpha L`` hidden units.

    Real parameters; with ``complex_output`` a second RBM gives the phase: ``log psi = RBM_1 + i RBM_2``.
    """

    alpha: int = 1
    complex_output: bool = False
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s):
        def rbm(name):
            theta = nn.Dense(self.alpha * s.shape[-1], param_dtype=self.param_dtype,
                             kernel_init=nn.initializers.normal(0.01), name=f"{name}_hidden")(s)
            visible = nn.Dense(1, use_bias=False, param_dtype=self.param_dtype,
                               kernel_init=nn.initializers.normal(0.01), name=f"{name}_visible")(s)[..., 0]
            return jnp.sum(_log_cosh(theta), axis=-1) + visible

        out = rbm("modulus")
        return out + 1j * rbm("phase") if self.complex_output else out


class MLP(nn.Module):
    """Small MLP ``log psi``: ``tanh`` hidden layers of ``widths``; complex output as ``(re, im)`` heads."""

    widths: tuple = (32, 32)
    complex_output: bool = False
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s):
        x = s
        for w in self.widths:
            x = nn.tanh(nn.Dense(w, param_dtype=self.param_dtype)(x))
        out = nn.Dense(2 if self.complex_output else 1, param_dtype=self.param_dtype,
                       kernel_init=nn.initializers.normal(0.01))(x)
        return out[..., 0] + 1j * out[..., 1] if self.complex_output else out[..., 0]


@partial(jax.jit, static_argnums=(0, 1))
def _amplitudes_and_local_energies(kind: str, log_psi, params, s):
    """``(log psi(s), E_loc(s))`` for a chunk of configurations; compiled once per chain kind and model
    (``log psi`` is static: a benchmark scores many final states of one model)."""
    return log_psi(params, s), local_energies(kind, log_psi, params, s)


def enumerated_energy(evaluate, spins: np.ndarray, chunk: int = 4096, with_variance: bool = False):
    """``sum_s |psi(s)|^2 E_loc(s) / sum_s |psi(s)|^2`` over the configurations ``spins`` (a whole basis or
    the sector that holds the state), in float64; ``evaluate(s) -> (log psi(s), E_loc(s))`` for a chunk.

    Equal to ``<psi|H|psi> / <psi|psi>`` when ``H`` does not leave the span of ``spins``. The
    configurations are padded to whole chunks, so ``evaluate`` compiles once. ``with_variance``:
    ``(energy, variance of Re E_loc under |psi|^2)``.
    """
    count = len(spins)
    spins = np.concatenate([spins, np.repeat(spins[:1], -count % chunk, axis=0)])
    logs, energies = zip(*(evaluate(spins[i:i + chunk]) for i in range(0, len(spins), chunk)))
    log_w = 2 * np.real(np.concatenate([np.asarray(x) for x in logs])[:count]).astype(np.float64)
    e_loc = np.real(np.concatenate([np.asarray(x) for x in energies])[:count]).astype(np.float64)
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    energy = float(np.sum(w * e_loc))
    return (energy, float(np.sum(w * (e_loc - energy) ** 2))) if with_variance else energy


@dataclass(frozen=True)
class SpinChain:
    """One chain workload, the interface :mod:`benchmarks.vmc` trains on."""

    kind: str
    length: int

    @property
    def name(self) -> str:
        return f"{'TFIM' if self.kind == 'ising' else 'Heisenberg'} L={self.length}"

    def exact_energy(self) -> float:
        return exact_ground_energy(self.kind, self.length)

    def init_samples(self, key, n: int):
        return random_spins(key, n, self.length, zero_magnetisation=self.kind == "heisenberg")

    def sample(self, log_psi, params, s, key, sweeps: int = 2):
        return metropolis(log_psi, params, s, key, sweeps, move="flip" if self.kind == "ising" else "exchange")

    def local_energies(self, log_psi, params, s):
        return local_energies(self.kind, log_psi, params, s)

    def variational_energy(self, log_psi, params, chunk: int = 4096, with_variance: bool = False):
        """``<psi|H|psi> / <psi|psi>`` exactly, by enumerating the basis (:func:`enumerated_energy`) over
        all ``2^L`` configurations (Ising) or the ``sum s = 0`` sector (Heisenberg: the sector of the
        ground state, which the sampler's exchanges never leave). No Monte Carlo error, so final
        states compare to the digit."""
        spins = _basis_spins(self.length).astype(np.float32)
        if self.kind == "heisenberg":
            spins = spins[spins.sum(axis=1) == 0]
        return enumerated_energy(partial(_amplitudes_and_local_energies, self.kind, log_psi, params), spins, chunk,
                                 with_variance)
