"""SR variants (robust SR, MARCH, spectral cutoffs, conditioning control): per-call cost and VMC quality.

Two parts, each side by side in one process.

**A. Per-call cost** (float32). One jitted ``tx.update(grads, state, params, batch=samples,
local_energies=e)`` of ``fishr.sr(log_psi, damping=1e-3, mode="sample_space", ...)`` for
the MLP ``log psi`` 16-64-64-64-1 (tanh, real output, P = 9,473; the one of
:mod:`benchmarks.sr_accuracy`) on ``N`` random +-1 samples of 16 spins, parameters
perturbed off the initialisation by 0.1 N(0, 1), synthetic local energies
``E ~ N(-10, 3^2)``. Rows (:func:`cost_methods`):

* ``plain``: plain SR, the default Cholesky solve, ``jacobian="auto"`` (for this Dense
  network the structured kernel from the captured layers' statistics);
* ``plain generic``: the same with ``jacobian="generic"`` (explicit per-sample rows);
* ``robust sqrt`` / ``robust 1.0``: ``gamma="sqrt"`` / ``gamma=1.0`` (robust SR: one factor,
  two solves);
* ``max_cond_num 1e7``: conditioning control, bounded by ``tr S`` with the Cholesky solve;
* ``MARCH var`` / ``MARCH diff``: ``march=``; a diagonal metric needs the generic rows,
  so these compare with ``plain generic`` as well as with ``plain``;
* ``MARCH var factored`` / ``MARCH diff factored``: ``march=``, ``factored_metric=True``
  (each layer's block of the metric by its rank-one factorisation, carried by the
  structured Jacobian), compared with ``plain``;
* ``Spectral()``: ``solver=fishr.Spectral()`` (eigendecomposition of the ``N x N`` kernel);
* ``Spectral smooth+snr``: ``fishr.Spectral(rtol_smooth=1e-8, snr=2.0)``;
* ``netket srt chol`` / ``netket srt pinv_smooth`` (when NetKet is installed): NetKet's
  ``srt`` (``netket._src.ngd.sr_srt_common.srt``, what ``VMC_SR(use_ntk=True)`` runs: the
  explicit Jacobian and the ``N x N`` kernel) on the same arrays with
  ``solver_fn=nk.optimizer.solver.cholesky`` and with
  ``partial(nk.optimizer.solver.pinv_smooth, rtol_smooth=1e-8)`` (eigh).

Timing: the first call of each (trace + compile + run) is reported on its own; then
``repeats`` rounds in which every method is called once, interleaved so that machine
noise hits all alike; the median warm call and its min-max. Ratios at each ``N``, of the
medians and (in brackets) of the fastest calls: robust / plain and MARCH / plain
(against both plain rows), spectral / Cholesky (``Spectral()`` over ``plain``, and over
``plain generic``). The targets of the issue: robust SR and MARCH at most 1.1x plain
sample_space per warm call, the spectral sample-space solve at most 3x the Cholesky solve
at ``N = 4,096`` (:func:`targets` says which hold, by the medians). The column ``rel. diff
vs plain`` is ``||x - x_plain|| / ||x_plain||``: ~1e-5 (float32 rounding) for the rows that
solve the same system (generic, MARCH diff at its first step, where ``M = 1``, max_cond_num
when it does not bind, NetKet's Cholesky), larger for the variants that change the update.

**B. Quality: the J1-J2 Heisenberg model on a 4 x 4 periodic square lattice**
(:class:`J1J2`), ``H = J1 sum_<ij> sigma_i . sigma_j + J2 sum_<<ij>> sigma_i . sigma_j``
(Pauli matrices, ``J1 = 1``, ``J2 = 0.5``: the frustrated point, where Marshall's sign
rule is not exact), written in the Marshall-rotated basis (``sigma^{x,y}`` change sign on
one sublattice: the nearest-neighbour hopping changes sign, the next-nearest does not; same
spectrum). The exact ground energy is computed here by sparse Lanczos
(``scipy.sparse.linalg.eigsh``) in the ``S^z = 0`` sector (12,870 states). The ansatz, an
MLP 16-64-64 (tanh) with a complex output ``log|psi| + i phase`` (real parameters,
P = 5,378), has to learn the sign structure the rotation leaves. Metropolis with
exchanges of two random sites (``S^z`` conserved), one sample per chain, ``2 L = 32``
moves between steps. Every method trains from the same initial parameters and samples
with the same number of samples per step, the same ``optax.sgd`` learning rate and
damping, all ``mode="sample_space"`` with ``local_energies=``; the methods are stepped in
lockstep (one step of each in turn), so that machine noise hits all alike:

* ``plain SR``; ``SPRING`` (``momentum=0.9``); ``robust SR + SPRING`` (``gamma="sqrt"``);
  ``MARCH var + SPRING``; ``MARCH var factored + SPRING`` (``factored_metric=True``); ``Spectral smooth+snr``
  (``Spectral(rtol_smooth=1e-8, snr=2.0)``);
  ``max_cond_num`` (plain SR with ``max_cond_num=KAPPA_B``); ``trust region (defaults)``: plain SR
  followed by ``fishr.trust_region(fishr.curvature.fisher(log_psi))`` with its defaults in place of
  ``optax.sgd`` (no learning rate chosen for this problem).

Settings (:data:`DAMPING_B`, :data:`LR_B`, :data:`MU_B`, :data:`KAPPA_B`): damping 1e-3, learning
rate 0.005 (at 0.02 and 0.01 plain SR trained but SPRING with ``momentum=0.9`` drifted up after
~50 steps; at 0.005 all train), ``max_cond_num=1e5`` (with the Cholesky solve the bound uses
``h_max <= tr S``, about 200 here, so ``1e7`` would ask for ``2e-5 < damping`` and never bind:
its run was step-for-step identical to plain SR; ``1e5`` raises the damping to about 2e-3).
Burn-in: 40 sweeps before the first step.

Reported per method: the final state's exact variational energy and variance of ``E_loc``
(:meth:`J1J2.variational_energy`: the ``S^z = 0`` sector enumerated, no Monte Carlo error;
earlier versions used an estimate from fresh samples, whose standard error of ~1e-3
relative was as large as some of the differences), the relative error against the exact
ground energy, the damping the last step used
(``state.damping``, which ``max_cond_num`` raises), the first step (compile + run), the
median warm step (min-max) and the total wall time of the training steps. One seed per run (``--seed``).

Run ``python -m benchmarks.sr_variants [--preset tiny|quick|full] [--json FILE]``;
``OPENBLAS_NUM_THREADS=1`` (set by ``benchmarks/__init__.py`` before NumPy loads). NetKet
is optional: without it its rows are skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fishr
from benchmarks.spin_chains import MLP, enumerated_energy, metropolis
from benchmarks.sr_timing import time_interleaved
from benchmarks.vmc import energy_gradient, netket_available

DAMPING_A = 1e-3
DAMPING_B, LR_B, MU_B, KAPPA_B = 1e-3, 0.005, 0.9, 1e5
PRESETS = {
    "tiny": dict(cost_sizes=(64,), cost_widths=(8, 8), cost_repeats=2,
                 lattice=(4, 4), j2=0.5, widths=(8,), n_samples=32, steps=2),
    "quick": dict(cost_sizes=(1024, 4096), cost_widths=(64, 64, 64), cost_repeats=(5, 3),
                  lattice=(4, 4), j2=0.5, widths=(64, 64), n_samples=512, steps=300),
    "full": dict(cost_sizes=(1024, 2048, 4096), cost_widths=(64, 64, 64), cost_repeats=(11, 7, 5),
                 lattice=(4, 4), j2=0.5, widths=(64, 64), n_samples=1024, steps=600),
}


# --------------------------------------------------------------------------- the J1-J2 workload


def square_bonds(lx: int, ly: int):
    """Nearest- and next-nearest-neighbour bonds ``(i, j)`` of an ``lx x ly`` periodic square lattice.

    Site ``(x, y)`` is ``x + lx * y``. Bonds are deduplicated (on a lattice of width 2 the
    two directions of a bond coincide, and both diagonals of a plaquette join the same pair).
    """
    site = lambda x, y: (x % lx) + lx * (y % ly)
    nn, nnn = set(), set()
    for x in range(lx):
        for y in range(ly):
            for dx, dy in ((1, 0), (0, 1)):
                a, b = site(x, y), site(x + dx, y + dy)
                if a != b:
                    nn.add((min(a, b), max(a, b)))
            for dx, dy in ((1, 1), (1, -1)):
                a, b = site(x, y), site(x + dx, y + dy)
                if a != b:
                    nnn.add((min(a, b), max(a, b)))
    nnn -= nn
    return sorted(nn), sorted(nnn)


@dataclass(frozen=True)
class J1J2:
    """The J1-J2 Heisenberg model on a periodic square lattice
    (the interface of :class:`benchmarks.spin_chains.SpinChain`).

    Pauli matrices; ``marshall=True`` rotates by Marshall's sign rule (the nearest-neighbour
    hopping changes sign; exact sign structure at ``J2 = 0``, a prior at ``J2 > 0``). A
    configuration is ``s_i = +-1``; basis index bit ``i`` = 1 means ``s_i = -1``.
    """

    lx: int = 4
    ly: int = 4
    j2: float = 0.5
    j1: float = 1.0
    marshall: bool = True

    @property
    def length(self) -> int:
        return self.lx * self.ly

    @property
    def name(self) -> str:
        return f"J1-J2 {self.lx}x{self.ly} J2/J1={self.j2:g}"

    def bonds(self):
        """``(i, j, J, hop)`` arrays: the sites, ``J`` of ``s_i s_j`` and the matrix element of the exchange."""
        nn, nnn = square_bonds(self.lx, self.ly)
        pairs = np.asarray(nn + nnn, np.int32).reshape(-1, 2)
        coupling = np.asarray([self.j1] * len(nn) + [self.j2] * len(nnn))
        sign = np.asarray([-1.0 if self.marshall else 1.0] * len(nn) + [1.0] * len(nnn))
        # sigma^x sigma^x + sigma^y sigma^y = 2 (sigma^+ sigma^- + h.c.): exchanges an antiparallel pair
        return pairs[:, 0], pairs[:, 1], coupling, 2.0 * coupling * sign

    def sector_basis(self) -> np.ndarray:
        """The basis states (integers, sorted) with ``sum s = 0``."""
        states = np.arange(2**self.length, dtype=np.int64)
        ups = np.zeros(states.shape, np.int64)
        for i in range(self.length):
            ups += (states >> i) & 1
        return states[ups == self.length // 2]

    def sparse_hamiltonian(self):
        """``H`` in the ``S^z = 0`` sector as a scipy CSR matrix, rows in the order of :meth:`sector_basis`."""
        import scipy.sparse as sp

        basis = self.sector_basis()
        dim = basis.size
        spins = 1 - 2 * ((basis[:, None] >> np.arange(self.length)) & 1)
        bi, bj, coupling, hop = self.bonds()
        diag = np.sum(coupling[None, :] * spins[:, bi] * spins[:, bj], axis=1)
        rows, cols, vals = [np.arange(dim)], [np.arange(dim)], [diag]
        for i, j, h in zip(bi, bj, hop):
            anti = spins[:, i] != spins[:, j]
            src = np.nonzero(anti)[0]
            dst = np.searchsorted(basis, basis[src] ^ ((1 << int(i)) | (1 << int(j))))
            rows.append(src)
            cols.append(dst)
            vals.append(np.full(src.size, h))
        return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(dim, dim))

    def exact_energy(self) -> float:
        """Ground-state energy by Lanczos (``eigsh``, smallest algebraic) in the ``S^z = 0`` sector."""
        from scipy.sparse.linalg import eigsh

        h = self.sparse_hamiltonian()
        if h.shape[0] <= 64:
            return float(np.linalg.eigvalsh(h.toarray())[0])
        return float(eigsh(h, k=1, which="SA", return_eigenvectors=False, tol=1e-10)[0])

    def variational_energy(self, log_psi, params, chunk: int = 4096, with_variance: bool = False):
        """``<psi|H|psi> / <psi|psi>`` exactly, over the ``S^z = 0`` sector (:meth:`sector_basis`, which the
        sampler's exchanges never leave), by :func:`benchmarks.spin_chains.enumerated_energy`."""
        spins = (1 - 2 * ((self.sector_basis()[:, None] >> np.arange(self.length)) & 1)).astype(np.float32)
        return enumerated_energy(partial(_amplitudes_and_local_energies, self, log_psi, params), spins, chunk,
                                 with_variance)

    def init_samples(self, key, n: int):
        """``n`` random configurations with ``L / 2`` up spins (NumPy, seeded by ``key``: outside ``jit``)."""
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
        base = np.where(np.arange(self.length) < self.length // 2, 1.0, -1.0)
        return jnp.asarray(rng.permuted(np.tile(base, (n, 1)), axis=1), jnp.float32)

    def sample(self, log_psi, params, s, key, sweeps: int = 2):
        return metropolis(log_psi, params, s, key, sweeps, move="exchange")

    def local_energies(self, log_psi, params, s):
        """``E_loc(s) = sum_s' <s|H|s'> psi(s') / psi(s)`` for a batch ``s`` of shape ``(n, L)``."""
        n, length = s.shape
        bi, bj, coupling, hop = self.bonds()
        nb = bi.size
        flips = np.ones((nb, length), np.float32)
        flips[np.arange(nb), bi] = -1
        flips[np.arange(nb), bj] = -1
        flips = jnp.asarray(flips, s.dtype)
        si, sj = s[:, bi], s[:, bj]
        diag = jnp.sum(jnp.asarray(coupling, s.dtype) * si * sj, axis=1)
        connected = (s[:, None, :] * flips[None]).reshape(n * nb, length)
        ratio = jnp.exp(log_psi(params, connected).reshape(n, nb) - log_psi(params, s)[:, None])
        return diag + jnp.sum(jnp.where(si != sj, jnp.asarray(hop, s.dtype) * ratio, 0.0), axis=1)


@partial(jax.jit, static_argnums=(0, 1))
def _amplitudes_and_local_energies(system, log_psi, params, s):
    """``(log psi(s), E_loc(s))`` for a chunk; compiled once per lattice and model."""
    return log_psi(params, s), system.local_energies(log_psi, params, s)


def quality_methods(damping: float = DAMPING_B, lr: float = LR_B, mu: float = MU_B, kappa: float = KAPPA_B):
    """name -> factory(log_psi_apply) of the optax transformation (all sample_space, with local energies)."""
    sgd = optax.sgd(lr)
    sr = lambda f, **kw: optax.chain(fishr.sr(f, damping, mode="sample_space", **kw), sgd)
    return {
        "plain SR": lambda f: sr(f),
        "SPRING": lambda f: sr(f, momentum=mu),
        "robust SR + SPRING": lambda f: sr(f, momentum=mu, gamma="sqrt"),
        "MARCH var + SPRING": lambda f: sr(f, momentum=mu, march="var"),
        "MARCH var factored + SPRING": lambda f: sr(f, momentum=mu, march="var", factored_metric=True),
        "Spectral smooth+snr": lambda f: sr(f, solver=fishr.Spectral(rtol_smooth=1e-8, snr=2.0)),
        f"max_cond_num {kappa:g}": lambda f: sr(f, max_cond_num=kappa),
        # no learning rate: fishr.trust_region's defaults (lr 0.05, max_norm 1e-3, Kesten factor) after plain SR
        "trust region (defaults)": lambda f: optax.chain(fishr.sr(f, damping, mode="sample_space"),
                                                         fishr.trust_region(fishr.curvature.fisher(f))),
    }


@cache
def _sampler(system, model, sweeps: int):
    """``(params, s, key) -> s`` after ``sweeps`` Metropolis sweeps, jitted once per workload (burn-in)."""
    return jax.jit(lambda p, s, k: system.sample(model.apply, p, s, k, sweeps)[0])


def _sr_state(opt_state):
    """The :class:`fishr.SRState` inside an ``optax.chain`` state."""
    return next(s for s in opt_state if isinstance(s, fishr.SRState))


def train_lockstep(system, model, makers: dict, n_samples: int, steps: int, seed: int = 0, sweeps: int = 2,
                   log=None):
    """Train every method of ``makers`` from the same parameters and samples, one step of each in turn.

    Returns name -> dict(energies, seconds per step, params, damping used per step). The
    methods share the random keys of each step (their samples differ as their states do).
    """
    k_init, k_s, k_burn, key = jax.random.split(jax.random.PRNGKey(seed), 4)
    s0 = system.init_samples(k_s, n_samples)
    params0 = jax.jit(model.init)(k_init, s0)
    burn_in = _sampler(system, model, 20)
    for k in jax.random.split(k_burn, 2):  # burn-in: 40 sweeps
        s0 = burn_in(params0, s0, k)

    def make_step(opt):
        @jax.jit
        def step(params, opt_state, s, key):
            s, _ = system.sample(model.apply, params, s, key, sweeps)
            e_loc = system.local_energies(model.apply, params, s)
            e_mean, grad = energy_gradient(model.apply, params, s, e_loc)
            updates, opt_state = opt.update(grad, opt_state, params, batch=s, local_energies=e_loc)
            return optax.apply_updates(params, updates), opt_state, s, e_mean, _sr_state(opt_state).damping
        return step

    runs = {}
    for name, make in makers.items():
        opt = make(model.apply)
        runs[name] = dict(step=make_step(opt), carry=(params0, opt.init(params0), s0), energies=[], seconds=[],
                          damping=[])
    for t in range(steps):
        key, sub = jax.random.split(key)
        for run_ in runs.values():
            params, opt_state, s = run_["carry"]
            t0 = time.perf_counter()
            params, opt_state, s, e, d = run_["step"](params, opt_state, s, sub)
            e = float(e)  # blocks
            run_["seconds"].append(time.perf_counter() - t0)
            run_["energies"].append(e)
            run_["damping"].append(float(d))
            run_["carry"] = (params, opt_state, s)
        if log and (t + 1) % max(1, steps // 5) == 0:
            log(f"[sr_variants]   step {t + 1}: " + ", ".join(f"{n} {r['energies'][-1]:.3f}" for n, r in runs.items()),
                flush=True)
    return {name: dict(energies=np.asarray(r["energies"]), seconds=np.asarray(r["seconds"]), params=r["carry"][0],
                       damping=np.asarray(r["damping"])) for name, r in runs.items()}


# --------------------------------------------------------------------------- part A: per-call cost


def cost_problem(n: int, widths=(64, 64, 64), sites: int = 16, seed: int = 0):
    """float32 MLP ``log psi``, parameters off the initialisation, samples, local energies and their gradient."""
    model = MLP(widths=tuple(widths), param_dtype=jnp.float32)
    # NumPy's generator for the data (XLA compiles a program of many jax.random calls slowly: seconds)
    rng = np.random.default_rng(seed)
    s = jnp.asarray(np.where(rng.random((n, sites)) < 0.5, 1.0, -1.0), jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), s[:2])
    params = jax.tree.map(lambda p: p + jnp.asarray(0.1 * rng.standard_normal(p.shape), jnp.float32), params)
    energies = jnp.asarray(3.0 * rng.standard_normal(n) - 10.0, jnp.float32)
    _, grad = jax.jit(lambda p, s, e: energy_gradient(model.apply, p, s, e))(params, s, energies)
    return model, params, s, energies, grad


COST_ROWS = ("plain", "plain generic", "robust sqrt", "robust 1.0", "max_cond_num 1e7", "MARCH var", "MARCH diff",
             "MARCH var factored", "MARCH diff factored", "Spectral()", "Spectral smooth+snr", "netket srt chol",
             "netket srt pinv_smooth")


def cost_methods(model, params, s, energies, grad, have_nk: bool, only=None) -> dict:
    """name -> zero-argument callable returning the update (a pytree like ``params``), see the module docstring."""
    options = {
        "plain": {},
        "plain generic": dict(jacobian="generic"),
        "robust sqrt": dict(gamma="sqrt"),
        "robust 1.0": dict(gamma=1.0),
        "max_cond_num 1e7": dict(max_cond_num=1e7),
        "MARCH var": dict(march="var"),
        "MARCH diff": dict(march="diff"),
        "MARCH var factored": dict(march="var", factored_metric=True),
        "MARCH diff factored": dict(march="diff", factored_metric=True),
        "Spectral()": dict(solver=fishr.Spectral()),
        "Spectral smooth+snr": dict(solver=fishr.Spectral(rtol_smooth=1e-8, snr=2.0)),
    }
    if only is not None:
        options = {k: v for k, v in options.items() if k in only or k == "plain"}  # plain: the reference
    out = {}
    for name, kw in options.items():
        tx = fishr.sr(model.apply, DAMPING_A, mode="sample_space", **kw)
        state = tx.init(params)
        update = jax.jit(lambda g, st, p, x, e, tx=tx: tx.update(g, st, p, batch=x, local_energies=e)[0])
        out[name] = partial(update, grad, state, params, s, energies)
    if have_nk:
        import netket as nk
        from netket._src.ngd.sr_srt_common import srt

        inner = params["params"]
        # srt is jitted by NetKet itself (its solver_fn is static: one object per solver, made once)
        for name, solver in (("netket srt chol", nk.optimizer.solver.cholesky),
                             ("netket srt pinv_smooth", partial(nk.optimizer.solver.pinv_smooth, rtol_smooth=1e-8))):
            out[name] = partial(lambda p, x, e, solver=solver: {"params": srt(
                model.apply, e, p, {}, x, diag_shift=DAMPING_A, solver_fn=solver, mode="real")[0]},
                inner, s, energies)
    return out


def _flat64(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)])


def time_methods(fns: dict, repeats: int) -> tuple[dict, dict, dict, dict]:
    """First call of each (trace + compile + run, s), then ``repeats`` interleaved rounds of warm calls.

    Returns (first seconds, name -> (median, min, max) warm ms, name -> the update as a float64 vector,
    name -> the update's dtypes).
    """
    first, outputs, dtypes = {}, {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        x = jax.block_until_ready(fn())
        first[name] = time.perf_counter() - t0
        outputs[name] = _flat64(x)
        dtypes[name] = ",".join(sorted({str(leaf.dtype) for leaf in jax.tree.leaves(x)}))
    return first, time_interleaved(fns, repeats, warm_up=False), outputs, dtypes


def cost_ratios(warm: dict) -> dict:
    """The ratios of median warm calls the issue's targets are about (those whose rows ran)."""
    pairs = {
        "robust sqrt / plain": ("robust sqrt", "plain"),
        "robust 1.0 / plain": ("robust 1.0", "plain"),
        "max_cond_num / plain": ("max_cond_num 1e7", "plain"),
        "MARCH var / plain": ("MARCH var", "plain"),
        "MARCH diff / plain": ("MARCH diff", "plain"),
        "MARCH var / plain generic": ("MARCH var", "plain generic"),
        "MARCH diff / plain generic": ("MARCH diff", "plain generic"),
        "MARCH var factored / plain": ("MARCH var factored", "plain"),
        "MARCH diff factored / plain": ("MARCH diff factored", "plain"),
        "Spectral() / plain": ("Spectral()", "plain"),
        "Spectral() / plain generic": ("Spectral()", "plain generic"),
        "Spectral smooth+snr / plain": ("Spectral smooth+snr", "plain"),
        "plain / netket srt chol": ("plain", "netket srt chol"),
        "Spectral() / netket srt pinv_smooth": ("Spectral()", "netket srt pinv_smooth"),
        "netket pinv_smooth / netket chol": ("netket srt pinv_smooth", "netket srt chol"),
    }
    return {k: warm[a][0] / warm[b][0] for k, (a, b) in pairs.items() if a in warm and b in warm}


def cost_ratios_min(warm: dict) -> dict:
    """:func:`cost_ratios` of the fastest warm calls (less sensitive to a busy machine than the medians)."""
    return cost_ratios({k: (v[1],) for k, v in warm.items()})


def run_cost(cfg: dict, have_nk: bool, log=print, only=None) -> list[dict]:
    rows = []
    repeats = cfg["cost_repeats"]
    for i, n in enumerate(cfg["cost_sizes"]):
        reps = repeats[i] if isinstance(repeats, (tuple, list)) else repeats
        model, params, s, energies, grad = cost_problem(n, cfg["cost_widths"])
        p_count = sum(int(p.size) for p in jax.tree.leaves(params))
        widths = "-".join(str(w) for w in (s.shape[1],) + tuple(cfg["cost_widths"]) + (1,))
        log(f"[sr_variants] A: MLP {widths}, N={n}, P={p_count}, float32, damping {DAMPING_A}, {reps} repeats ...",
            flush=True)
        fns = cost_methods(model, params, s, energies, grad, have_nk, only)
        first, warm, outputs, dtypes = time_methods(fns, reps)
        ref = outputs["plain"]
        diff = {k: float(np.linalg.norm(v - ref) / np.linalg.norm(ref)) for k, v in outputs.items()}
        finite = {k: bool(np.all(np.isfinite(v))) for k, v in outputs.items()}
        row = dict(N=n, P=p_count, model=f"MLP {widths}", repeats=reps, dtypes=dtypes, first_s=first,
                   warm_ms=warm, rel_diff_vs_plain=diff, finite=finite, ratios=cost_ratios(warm),
                   ratios_min=cost_ratios_min(warm))
        rows.append(row)
        log("[sr_variants]   warm ms: " + ", ".join(f"{k} {v[0]:.1f}" for k, v in warm.items()), flush=True)
    return rows


def targets(cost_rows: list[dict]) -> list[dict]:
    """The issue's targets against the largest ``N`` measured (4,096 in quick and full)."""
    row = max(cost_rows, key=lambda r: r["N"])
    ratios = row["ratios"]
    out = []
    for key, limit in (("robust sqrt / plain", 1.1), ("robust 1.0 / plain", 1.1), ("MARCH var / plain", 1.1),
                       ("MARCH diff / plain", 1.1), ("MARCH var / plain generic", 1.1),
                       ("MARCH diff / plain generic", 1.1), ("MARCH var factored / plain", 1.1),
                       ("MARCH diff factored / plain", 1.1), ("Spectral() / plain", 3.0),
                       ("Spectral() / plain generic", 3.0)):
        if key in ratios:
            out.append(dict(N=row["N"], ratio=key, value=ratios[key], value_min=row["ratios_min"][key], target=limit,
                            met=bool(ratios[key] <= limit)))
    return out


# --------------------------------------------------------------------------- part B: VMC quality


def run_quality(cfg: dict, log=print, methods=None, seed: int = 0) -> dict:
    system = J1J2(*cfg["lattice"], j2=cfg["j2"])
    t0 = time.perf_counter()
    e0 = system.exact_energy()
    lanczos_s = time.perf_counter() - t0
    model = MLP(widths=tuple(cfg["widths"]), complex_output=True, param_dtype=jnp.float32)
    makers = quality_methods()
    if methods is not None:
        makers = {k: v for k, v in makers.items() if k in methods}
    n, steps = cfg["n_samples"], cfg["steps"]
    p_count = sum(int(p.size) for p in jax.tree.leaves(jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, system.length), jnp.float32))))
    log(f"[sr_variants] B: {system.name} (periodic, Marshall-rotated), exact E0 = {e0:.6f} (Lanczos in S^z = 0, "
        f"{lanczos_s:.1f} s); MLP {'-'.join(str(w) for w in (system.length,) + tuple(cfg['widths']))} complex "
        f"output, P={p_count}, float32; N={n} samples, {steps} steps, sgd lr {LR_B}, damping {DAMPING_B}", flush=True)
    t0 = time.perf_counter()
    runs = train_lockstep(system, model, makers, n, steps, seed=seed, log=log)
    train_s = time.perf_counter() - t0
    rows = []
    for name, r in runs.items():
        energies, seconds = r["energies"], r["seconds"]
        if np.all(np.isfinite(energies)):  # exact: the S^z = 0 sector enumerated (12,870 states on 4 x 4)
            e_mean, e_var = system.variational_energy(model.apply, r["params"], with_variance=True)
        else:
            e_mean = e_var = float("nan")
        after = seconds[1:] if len(seconds) > 1 else seconds
        rows.append(dict(
            method=name, final_energy=e_mean, rel_error=abs(e_mean - e0) / abs(e0), variance=e_var,
            diverged=not bool(np.all(np.isfinite(energies))),
            last_train_energy=float(energies[-1]), damping_used_last=float(r["damping"][-1]),
            damping_used_max=float(np.max(r["damping"])), first_step_s=float(seconds[0]),
            ms_per_step=float(1e3 * np.median(after)), ms_min=float(1e3 * np.min(after)),
            ms_max=float(1e3 * np.max(after)), seconds_total=float(np.sum(seconds)),
            energies=[float(e) for e in energies]))
        log(f"[sr_variants]   {name:24s} E = {e_mean:.5f}, rel. error {rows[-1]['rel_error']:.2e}, "
            f"{rows[-1]['ms_per_step']:.1f} ms/step", flush=True)
    return dict(system=system.name, exact=e0, seed=seed, n_samples=n, steps=steps, lr=LR_B, damping=DAMPING_B,
                momentum=MU_B, max_cond_num=KAPPA_B, params=p_count, train_seconds=train_s, rows=rows)


# --------------------------------------------------------------------------- the report


def run(preset: str = "quick", log=print, netket: bool = True, parts=("quality", "cost"), methods=None,
        cost_rows=None, seed: int = 0) -> dict:
    """Both parts (quality first: importing NetKet for part A switches jax to float64 by default).

    ``methods``: a subset of :func:`quality_methods` for part B, ``cost_rows`` of the fishr rows
    of :data:`COST_ROWS` for part A (``"plain"`` always runs); ``None``: all (the tests take subsets).
    ``seed``: part B's initial parameters, samples and Monte Carlo keys.
    """
    cfg = PRESETS[preset]
    t0 = time.perf_counter()
    report = dict(preset=preset, settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()})
    if "quality" in parts:
        report["quality"] = run_quality(cfg, log, methods, seed)
    if "cost" in parts:
        have_nk = netket_available(netket, log, "[sr_variants]")
        report["netket"] = have_nk
        report["cost"] = run_cost(cfg, have_nk, log, cost_rows)
        report["targets"] = targets(report["cost"])
    report["seconds"] = time.perf_counter() - t0
    return report


def _ms(v) -> str:
    med, lo, hi = v
    return f"{med:.1f} ({lo:.1f}-{hi:.1f})" if med < 100 else f"{med:.0f} ({lo:.0f}-{hi:.0f})"


def markdown(report) -> str:
    out = []
    if "cost" in report:
        rows = report["cost"]
        out.append("### A. Per-call cost: one jitted `tx.update(..., local_energies=e)`, float32, "
                   f"sample_space, damping {DAMPING_A:g}")
        out.append("")
        head = "| method | " + " | ".join(f"N={r['N']} first call s | N={r['N']} warm ms (min-max) | "
                                          f"N={r['N']} rel. diff vs plain" for r in rows) + " |"
        out += [head, "|---|" + "---|" * (3 * len(rows))]
        for name in COST_ROWS:
            if not any(name in r["warm_ms"] for r in rows):
                continue
            cells = []
            for r in rows:
                if name not in r["warm_ms"]:
                    cells += ["-", "-", "-"]
                    continue
                diff = r["rel_diff_vs_plain"][name]
                cells += [f"{r['first_s'][name]:.1f}", _ms(r["warm_ms"][name]),
                          ("NaN/inf" if not r["finite"][name] else f"{diff:.1e}")]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
        out.append(f"Model: {rows[0]['model']}, P = {rows[0]['P']}; repeats: "
                   + ", ".join(f"N={r['N']}: {r['repeats']}" for r in rows)
                   + ("" if report.get("netket") else "; NetKet not installed (its rows skipped)") + ".")
        out.append("")
        out.append("| ratio of warm calls: median (fastest) | " + " | ".join(f"N={r['N']}" for r in rows) + " |")
        out.append("|---|" + "---|" * len(rows))
        for key in rows[-1]["ratios"]:
            out.append(f"| {key} | " + " | ".join(f"{r['ratios'][key]:.2f}x ({r['ratios_min'][key]:.2f}x)"
                                                  if key in r["ratios"] else "-" for r in rows) + " |")
        out.append("")
        out.append("| target (largest N) | N | measured: median (fastest) | target | met (median) |")
        out.append("|---|---|---|---|---|")
        for t in report["targets"]:
            out.append(f"| {t['ratio']} | {t['N']} | {t['value']:.2f}x ({t['value_min']:.2f}x) | <= {t['target']:g}x | "
                       f"{'yes' if t['met'] else 'NO'} |")
        out.append("")
    if "quality" in report:
        q = report["quality"]
        out.append(f"### B. {q['system']}: exact E0 = {q['exact']:.6f}; N = {q['n_samples']}, {q['steps']} steps, "
                   f"sgd lr {q['lr']:g}, damping {q['damping']:g}, SPRING momentum {q['momentum']:g}, "
                   f"seed {q.get('seed', 0)}")
        out.append("")
        out.append("| method | final E (exact) | rel. error | var E_loc | damping used (last / max) | "
                   "first step s | median ms / step (min-max) | total s |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in q["rows"]:
            out.append(f"| {r['method']}{' (diverged)' if r['diverged'] else ''} | {r['final_energy']:.5f} | "
                       f"{r['rel_error']:.2e} | "
                       f"{r['variance']:.3g} | {r['damping_used_last']:.2g} / {r['damping_used_max']:.2g} | "
                       f"{r['first_step_s']:.1f} | {r['ms_per_step']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | "
                       f"{r['seconds_total']:.1f} |")
        out.append("")
        out.append(f"Final energies and variances exact (the S^z = 0 sector enumerated); P = {q['params']}; "
                   f"lockstep training {q['train_seconds']:.0f} s.")
    out.append("")
    out.append(f"Total {report['seconds']:.0f} s.")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--no-netket", action="store_true", help="skip NetKet's rows")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--seed", type=int, default=0, help="part B's seed (parameters, samples, Monte Carlo)")
    parser.add_argument("--part", choices=("quality", "cost", "both"), default="both")
    args = parser.parse_args(argv)
    parts = ("quality", "cost") if args.part == "both" else (args.part,)
    report = run(args.preset, netket=not args.no_netket, parts=parts, seed=args.seed)
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
