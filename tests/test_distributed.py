"""The batch reductions of :mod:`fishr.distributed`: the product form of the mean over samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fishr import distributed


@pytest.mark.parametrize("shape", [(7, 1_500), (6, 2, 700), (5, 3)])
@pytest.mark.parametrize("dtype", [np.float64, np.complex128, np.float32])
@pytest.mark.parametrize("keepdims", [False, True])
def test_local_mean_is_the_mean_over_samples(shape, dtype, keepdims):
    """Wide arrays (>= PRODUCT_MEAN_MIN_WIDTH entries per sample) take the product, the others
    jnp.mean; both give NumPy's mean to rounding, with its shape."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape) + (1j * rng.normal(size=shape) if np.iscomplexobj(dtype(0)) else 0)
    x = x.astype(dtype)
    got = jax.jit(lambda a: distributed.local_mean(a, keepdims=keepdims))(x)
    want = x.mean(axis=0, keepdims=keepdims)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=50 * np.finfo(dtype).eps * np.abs(x).max())


def test_local_mean_product_path_is_taken_and_other_axes_and_dtypes_fall_back():
    wide = jnp.ones((4, distributed.PRODUCT_MEAN_MIN_WIDTH))
    assert "dot_general" in str(jax.make_jaxpr(distributed.local_mean)(wide))
    for x, kw in ((wide, dict(axis=1)), (wide.astype(jnp.int32), {}), (jnp.ones((4, 8)), {})):
        assert "dot_general" not in str(jax.make_jaxpr(lambda a: distributed.local_mean(a, **kw))(x))
    np.testing.assert_array_equal(distributed.local_mean(jnp.arange(8).reshape(4, 2)), [3.0, 4.0])


def test_batch_mean_over_devices_equals_the_single_device_mean():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("d",))
    x = np.random.default_rng(1).normal(size=(16, 2, 600))  # 1,200 entries per sample: the product
    sharded = jax.jit(jax.shard_map(lambda a: distributed.batch_mean(a, "d", keepdims=True), mesh=mesh,
                                    in_specs=P("d"), out_specs=P(), check_vma=False))(x)
    np.testing.assert_allclose(np.asarray(sharded), x.mean(0, keepdims=True), rtol=0, atol=1e-14)
