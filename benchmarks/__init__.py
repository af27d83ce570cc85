"""fishr's benchmarks and workloads (not part of the ``fishr`` package).

Workloads (importable by the notebooks and tests):

* :mod:`benchmarks.spin_chains`: transverse-field Ising and Heisenberg chains (Lanczos ground-state
  energies, local energies, a jitted many-chain Metropolis sampler), RBM and MLP ``log psi`` models;
* :mod:`benchmarks.continuum`: the hydrogen atom with a small network of ``|r|``.

Benchmarks (side by side in one process, medians of interleaved repetitions after a warm-up):

* :mod:`benchmarks.sr_timing`: SR time per call, fishr's modes vs NetKet's QGTs and SRt;
* :mod:`benchmarks.vmc`: VMC convergence, fishr SR (with and without SPRING) vs NetKet VMC_SR vs Adam;
* :mod:`benchmarks.structured_sr`: exact SR per call, structured vs generic vs NetKet;
* :mod:`benchmarks.kfac`: fishr.kfac vs kfac_jax.Optimizer vs optax.adam on a teacher MLP.

Run everything with ``python -m benchmarks [--quick]``; results go to ``benchmarks/results/``.
"""
import os

# Threaded OpenBLAS spins on the small LAPACK calls of every exact solver on a busy
# 2-core machine (a 1024 x 1024 Cholesky took 1.2 s instead of 16 ms); set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
