"""Multi-host (multi-controller) JAX: 2 processes x 2 CPU devices equal one device.

Two Python processes on localhost join one ``jax.distributed`` job (CPU collectives
over gloo), each with 2 simulated CPU devices. Each builds the same global samples,
passes its own block of them to a global ``jax.Array`` sharded over the 4 devices of
both processes (1-D mesh), replicates the parameters and runs ``fishr.sr`` (lazy,
dense, sample_space) and a few ``fishr.kfac`` steps under ``jax.jit``
(tests/multihost_worker.py). Their results must equal the same computation in this
process on one device, unsharded, to 1e-12 (float64), and each other exactly.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import multihost_worker
import numpy as np
import pytest
from sr_models import rel_err

NPROC = 2
TIMEOUT_S = 240
WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _child_env():
    """This environment with 2 CPU devices per process (set before the child imports jax).

    The children also skip LLVM's optimisations of the generated code (a fifth less
    compile time; the partitioning and the collectives are the same).
    """
    env = dict(os.environ)
    ours = ("--xla_force_host_platform_device_count", "--xla_backend_optimization_level")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(ours)]
    env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=2",
                                         "--xla_backend_optimization_level=0"])
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def _start(tmp):
    port = _free_port()
    env = _child_env()
    procs = []
    for i in range(NPROC):
        out, log = Path(tmp) / f"out{i}.npz", open(Path(tmp) / f"log{i}.txt", "w+")
        cmd = [sys.executable, str(WORKER), str(port), str(NPROC), str(i), str(out)]
        procs.append((subprocess.Popen(cmd, env=env, cwd=WORKER.parent, stdout=log, stderr=subprocess.STDOUT),
                      out, log))
    return procs


def _wait(procs):
    """The processes' results; on a failure or time-out, their output in the failure message.

    A process that fails ends the others at once (they would wait for it in a collective).
    """
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p, _, _ in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p, _, _ in procs):
                break
            time.sleep(0.1)
        codes = [p.poll() for p, _, _ in procs]
        if any(c != 0 for c in codes):
            report = []
            for i, ((_, _, log), code) in enumerate(zip(procs, codes)):
                log.seek(0)
                status = f"exit {code}" if code is not None else "killed while still running"
                report.append(f"--- process {i} ({status}) ---\n{log.read()[-6000:]}")
            pytest.fail("multi-host worker process(es) failed:\n" + "\n".join(report))
        return [dict(np.load(out)) for _, out, _ in procs]
    finally:
        _stop(procs)


def _stop(procs):
    for p, _, log in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()


def _reference():
    """The same computation in this process, on one device, with unsharded arrays."""
    dev = jax.devices()[0]
    with jax.default_device(dev):
        return multihost_worker.compute(lambda x, axis=0: jax.device_put(x, dev), lambda t: jax.device_put(t, dev))


def test_two_processes_equal_one_device():
    assert jax.config.jax_enable_x64
    with tempfile.TemporaryDirectory() as tmp:
        procs = _start(tmp)
        try:
            ref = _reference()  # while the workers run
        except BaseException:
            _stop(procs)
            raise
        results = _wait(procs)
    for i, res in enumerate(results):
        assert res.keys() == ref.keys()
        for name in ref:
            assert np.all(np.isfinite(res[name])), (i, name)
            assert rel_err(res[name], ref[name]) <= 1e-12, (i, name, rel_err(res[name], ref[name]))
    for name in ref:  # the replicated results are the same on every process
        np.testing.assert_array_equal(results[0][name], results[1][name])
