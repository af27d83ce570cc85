"""Test set-up: 4 simulated CPU devices and float64, both before jax is imported."""

import os

_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Threaded OpenBLAS spins on small LAPACK calls (Cholesky) when the cores are busy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

_CACHE_ENV = "FISHR_TEST_COMPILE_CACHE_DIR"
_owned_cache = None  # the directory this process created (the xdist controller, or a run without workers)
if os.environ.get("FISHR_TEST_COMPILE_CACHE", "1") == "1":
    # One compilation cache for the test run, shared by the xdist workers: many tests compile the
    # same program through a new closure (a fresh `jax.jit(lambda ...)`), which JAX's in-memory cache
    # does not recognise but the persistent cache (keyed by the program itself) does. A fresh
    # directory per run (the workers inherit it from the process that starts them), so that every
    # run compiles every program at least once; removed when the run ends.
    if _CACHE_ENV not in os.environ:
        import tempfile

        _owned_cache = os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="fishr-tests-jax-")
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if _owned_cache is not None:
        import shutil

        shutil.rmtree(_owned_cache, ignore_errors=True)
