"""fishr's benchmarks and workloads (not part of the ``fishr`` package).

* :mod:`benchmarks.vmc`: VMC convergence on the transverse-field Ising chain (fishr SR modes, SPRING, Adam).
* :mod:`benchmarks.structured_sr`: exact SR per call, structured vs generic vs NetKet.
* :mod:`benchmarks.kfac`: fishr.kfac vs kfac_jax.Optimizer vs optax.adam on a teacher MLP.
* :mod:`benchmarks.spin_chains`: the Ising workload (Lanczos energy, local energies, Metropolis, RBM).

Run everything with ``python -m benchmarks [--quick]``.
"""
import os

# Threaded OpenBLAS spins on the small LAPACK calls of every exact solver on a busy
# 2-core machine (a 1024 x 1024 Cholesky took 1.2 s instead of 16 ms); set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
