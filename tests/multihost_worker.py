"""One process of the multi-host test (tests/test_multihost.py); also its one-device reference.

As a script, ``python multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT.npz`` joins a
``jax.distributed`` job on ``localhost:PORT`` (CPU collectives over gloo), builds the
same global inputs as every other process, passes its own block of samples to a global
``jax.Array`` sharded over the devices of all processes (1-D mesh, ``NamedSharding``),
replicates the parameters, runs fishr under ``jax.jit`` and writes the (replicated)
results to ``OUT.npz``. The test sets ``XLA_FLAGS=--xla_force_host_platform_device_count=2``
in this process's environment, so each process has 2 CPU devices.

The test imports :func:`compute` and calls it with one-device placements to get the
reference. The inputs come from NumPy, and the results are read with NumPy, which
keeps the small jitted helpers (random draws, ``ravel_pytree``, gathers) out of the
compile time.
"""

from __future__ import annotations

import itertools
import sys

N = 64  # global number of samples: 16 per device over 2 processes x 2 devices
KFAC_STEPS = 3


def _net():
    from kfac_models import DenseNormNet  # imported after jax is set up

    return DenseNormNet()


def _inputs():
    """The global inputs as NumPy arrays, identical in every process (fixed seeds)."""
    import jax
    import numpy as np
    from sr_models import mlp_params

    rng = np.random.default_rng(1234)
    key = jax.ShapeDtypeStruct((2,), np.uint32)  # shapes only: no random draws in JAX
    normal_like = lambda tree, scale=1.0: jax.tree.map(lambda s: scale * rng.standard_normal(s.shape), tree)
    sr_params = normal_like(jax.eval_shape(mlp_params, key), 0.5)
    kfac_x = rng.standard_normal((KFAC_STEPS, N, 4))
    kfac_params = jax.eval_shape(_net().init, key, kfac_x[0])
    return {
        "sr_params": sr_params,
        "sr_grad": normal_like(sr_params),
        "sr_x": rng.standard_normal((N, 3)),
        "sr_e_loc": rng.standard_normal(N),
        "kfac_params": normal_like(kfac_params, 0.5),
        "kfac_x": kfac_x,
        "kfac_y": rng.integers(0, 3, (KFAC_STEPS, N)).astype(np.int32),
    }


def compute(shard, replicate):
    """Every checked quantity, as a flat dict of NumPy arrays.

    ``shard(x, axis=0)`` places a global array with its sample axis split over the
    devices, ``replicate(tree)`` places a pytree on every device; for the one-device
    reference both put the arrays on that device. The outputs are replicated, so every
    process reads the global value.
    """
    import jax
    import numpy as np
    import optax
    from sr_models import mlp_complex_log_psi, mlp_log_psi

    import fishr

    def fetch(tree, steps=None):
        """The leaves, raveled and concatenated (per step for ``steps`` stacked results)."""
        leaves = jax.tree.leaves(tree)
        assert all(leaf.is_fully_replicated for leaf in leaves)
        shape = (-1,) if steps is None else (steps, -1)
        return np.concatenate([np.asarray(leaf).reshape(shape) for leaf in leaves], axis=-1)

    inp = _inputs()
    out = {}

    # --- SR, one update per mode (real and complex log psi, as in test_sharded_jit)
    params = replicate(inp["sr_params"])
    grad = replicate(inp["sr_grad"])
    x = shard(inp["sr_x"])
    e_loc = shard(inp["sr_e_loc"])
    cases = {
        "sr_lazy": (mlp_log_psi, "lazy", fishr.CG(rtol=1e-14, max_steps=2000), {}),
        "sr_dense": (mlp_log_psi, "dense", fishr.Cholesky(), {}),
        "sr_sample_space": (mlp_complex_log_psi, "sample_space", None, {"local_energies": e_loc}),
    }
    for name, (log_psi, mode, solver, extra) in cases.items():
        opt = fishr.sr(log_psi, damping=1e-3, mode=mode, solver=solver)

        @jax.jit
        def sr_step(grad, params, batch, extra, opt=opt):
            return opt.update(grad, opt.init(params), params, batch=batch, **extra)[0]

        out[name] = fetch(sr_step(grad, params, x, extra))

    # --- K-FAC chained with SGD: a few steps of a classifier under one jit (init, then a
    # scan over the steps, so that the EMA of the factors carries from step to step)
    net = _net()
    xs, ys = inp["kfac_x"], inp["kfac_y"]
    opt = optax.chain(
        fishr.kfac(net.apply, 1e-2, likelihood="categorical",
                   example_batch=(jax.ShapeDtypeStruct(xs[0].shape, xs.dtype),
                                  jax.ShapeDtypeStruct(ys[0].shape, ys.dtype))),
        optax.sgd(0.1),
    )

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, x), y).mean()

    @jax.jit
    def kfac_run(p, xs, ys):
        def step(carry, xy):
            p, state = carry
            updates, state = opt.update(jax.grad(loss)(p, *xy), state, p, batch=xy)
            return (optax.apply_updates(p, updates), state), updates

        (p, _), updates = jax.lax.scan(step, (p, opt.init(p)), (xs, ys))
        return p, updates

    p, updates = kfac_run(replicate(inp["kfac_params"]), shard(xs, axis=1), shard(ys, axis=1))
    out["kfac_updates"] = fetch(updates, KFAC_STEPS)
    out["kfac_params"] = fetch(p)
    return out


def main(port: int, num_processes: int, process_id: int, out_path: str) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default in jax 0.10
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=120)

    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.process_count() == num_processes, jax.process_count()
    assert jax.local_device_count() == 2, jax.local_devices()
    mesh = Mesh(np.array(jax.devices()), ("batch",))  # the devices of all processes

    def shard(x, axis=0):
        # As a multi-host run would: each process passes only its own block of samples
        # (here cut from the global array; in practice, e.g., its own Markov chains).
        x = np.asarray(x)
        sharding = NamedSharding(mesh, P(*[None] * axis, "batch"))
        blocks = sorted({(i[axis].start, i[axis].stop)
                         for i in sharding.addressable_devices_indices_map(x.shape).values()})
        assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks)), blocks  # contiguous
        local = np.take(x, np.arange(blocks[0][0], blocks[-1][1]), axis=axis)
        arr = jax.make_array_from_process_local_data(sharding, local, x.shape)
        assert not arr.is_fully_addressable  # a true multi-process array
        return arr

    def replicate(tree):
        # The same values on every process; each fills its own devices' copies.
        return jax.tree.map(lambda x: jax.make_array_from_callback(
            np.shape(x), NamedSharding(mesh, P()), lambda idx, x=np.asarray(x): x[idx]), tree)

    out = compute(shard, replicate)
    np.savez(out_path, **out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    port, nproc, pid, path = sys.argv[1:]
    main(int(port), int(nproc), int(pid), path)
