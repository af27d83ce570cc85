"""Test set-up: 4 simulated CPU devices, float64 and quick compilation, before jax is imported."""

import os

_flags = ["--xla_force_host_platform_device_count=4"]
if os.environ.get("FISHR_TEST_FAST_COMPILE", "1") == "1":
    # The suite is compile-bound (hundreds of small programs, each run a few times). LLVM's
    # optimisation of the generated CPU kernels is most of XLA's compile time and none of what the
    # tests check: the programs (HLO) and their floating-point semantics (no fast-math either way)
    # are the same; results differ by rounding only (multiply-adds contracted or not), as between
    # two CPUs: SR updates by 1e-14 (sample_space, float64) to 1e-8 (CG to its tolerance) relative.
    # Measured: test_sr_structured.py + test_capture_layers.py 261 -> 159 s on 2 cores.
    # FISHR_TEST_FAST_COMPILE=0 compiles as users do.
    _flags.append("--xla_backend_optimization_level=0")
for _flag in _flags:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
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
