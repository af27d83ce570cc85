"""Capture of convolutions and multi-axis DenseGeneral / attention (float64 references).

Per-sample kernel gradients rebuilt from the captured ``a`` and ``d``
(``sum_t a_t d_t^T``) equal the per-sample gradients of ``jax.grad``; K-FAC's factors
of a convolution equal the K-FAC-expand formula on patches built by NumPy loops;
structured SR on a CNN and an attention model equals the generic Jacobian path.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sr_models import flat, random_like, rel_err, slow

import fishr
from fishr import kronecker as F
from fishr.capture import capture, conv_patches, discover_layers

F64 = jnp.float64


class CNN(nn.Module):
    padding: object = "SAME"
    strides: int = 1
    dilation: int = 1
    rank: int = 2
    bias: bool = True

    @nn.compact
    def __call__(self, x):
        k = (3,) * self.rank
        x = nn.tanh(nn.Conv(3, k, strides=self.strides, padding=self.padding, kernel_dilation=self.dilation,
                            use_bias=self.bias, param_dtype=F64)(x))
        x = nn.tanh(nn.Conv(2, (2,) * self.rank, padding="VALID", use_bias=False, param_dtype=F64)(x))
        return nn.Dense(1, param_dtype=F64)(x.reshape(x.shape[0], -1))[:, 0]


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, param_dtype=F64)(x)
        y = nn.MultiHeadDotProductAttention(num_heads=2, param_dtype=F64)(x)
        y = nn.LayerNorm(param_dtype=F64)(x + y)
        y = nn.DenseGeneral((2, 3), axis=(-2, -1), param_dtype=F64)(y)
        return jnp.sum(jnp.tanh(y), axis=(1, 2))


CONV_CASES = {
    "same": dict(),
    "valid-stride2": dict(padding="VALID", strides=2),
    "circular-dilated": dict(padding="CIRCULAR", dilation=2),
    "explicit-pairs": dict(padding=((1, 2), (0, 1))),
    "reflect-nobias": dict(padding="REFLECT", bias=False),
    "1d-causal-stride2": dict(rank=1, padding="CAUSAL", strides=2),
}


def _model_case(name):
    key = jax.random.PRNGKey(0)
    if name == "attention":
        model, x = Attention(), jax.random.normal(key, (6, 5, 3))
    else:
        cfg = CONV_CASES[name]
        model = CNN(**cfg)
        x = jax.random.normal(key, (6, 9, 9, 2) if cfg.get("rank", 2) == 2 else (6, 11, 2))
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x)  # jit: Flax init op by op takes ~1 s
    return model.apply, params, x


def _per_sample_grads(fn, params, x):
    return jax.vmap(lambda xi: jax.tree.leaves(jax.grad(lambda p: fn(p, xi[None])[0])(params)))(x)


@pytest.mark.parametrize("name", [*CONV_CASES, "attention"])
def test_captured_statistics_rebuild_per_sample_gradients(name):
    fn, params, x = _model_case(name)
    c = jax.jit(lambda p, x: capture(fn, p, x)[2:4])(params, x)
    plan = discover_layers(fn, params, x)
    per = jax.jit(_per_sample_grads, static_argnums=0)(fn, params, x)
    assert plan.layers, "nothing captured"
    for layer, a, d in zip(plan.layers, *c):
        assert a.shape == (x.shape[0], layer.positions, layer.d_in)
        g = jnp.einsum("ntk,ntm->nkm", a, d).reshape(per[layer.kernel_index].shape)
        np.testing.assert_allclose(np.asarray(g), np.asarray(per[layer.kernel_index]), rtol=1e-10, atol=1e-12)
        if layer.has_bias:
            np.testing.assert_allclose(np.asarray(d.sum(axis=1)).reshape(per[layer.bias_index].shape),
                                       np.asarray(per[layer.bias_index]), rtol=1e-10, atol=1e-12)
    kinds = [l.kind for l in plan.layers]
    if name == "attention":
        assert kinds == ["Dense"] + ["DenseGeneral"] * 5  # q, k, v, the (heads, head_dim) output projection, the head
        assert plan.layers[4].d_in == 8 and plan.layers[-1].d_in == 40
        assert len(plan.uncovered) == 2  # LayerNorm's scale and bias
    else:
        assert kinds == ["Conv", "Conv", "Dense"] and plan.uncovered == ()


def _numpy_patches(x, kernel, strides, pads):
    """im2col by loops: (n, positions, kh*kw*C) for a 2-D VALID convolution after zero padding ``pads``."""
    x = np.pad(np.asarray(x), ((0, 0), pads[0], pads[1], (0, 0)))
    n, h, w, _c = x.shape
    out = []
    for i in range(0, h - kernel[0] + 1, strides):
        for j in range(0, w - kernel[1] + 1, strides):
            out.append(x[:, i:i + kernel[0], j:j + kernel[1], :].reshape(n, -1))
    return np.stack(out, axis=1)


def test_conv_kfac_factors_equal_the_expand_formula_on_explicit_patches():
    fn, params, x = _model_case("explicit-pairs")
    plan = discover_layers(fn, params, x)
    stats = jax.jit(lambda p, x: F.factor_statistics(fn, p, x)[1])(params, x)
    _, grads = jax.jit(lambda p, x: capture(fn, p, x)[2:4])(params, x)
    a = _numpy_patches(x, (3, 3), 1, ((1, 2), (0, 1)))
    a = np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)  # the bias column
    n, t = a.shape[:2]
    np.testing.assert_allclose(np.asarray(stats.a[0]), np.einsum("ntk,ntl->kl", a, a) / (n * t), rtol=1e-12)
    d = np.asarray(grads[0])
    np.testing.assert_allclose(np.asarray(stats.g[0]), np.einsum("ntk,ntl->kl", d, d) / n, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(conv_patches(x, plan.calls[0].conv).reshape(n, t, -1)), a[..., :-1],
                               rtol=1e-13)


def test_not_captured_convolutions_are_uncovered():
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), feature_group_count=2, param_dtype=F64)(x)  # grouped
            x = nn.Conv(2, (3, 3), mask=jnp.ones((3, 3, 4, 2)), param_dtype=F64)(x)  # masked
            x = nn.ConvTranspose(2, (2, 2), param_dtype=F64)(x)
            return jnp.sum(x, axis=(1, 2, 3))

    x = jnp.ones((2, 5, 5, 2))
    params = Odd().init(jax.random.PRNGKey(0), x)
    plan = discover_layers(Odd().apply, params, x)
    assert plan.layers == () and len(plan.uncovered) == len(jax.tree.leaves(params))


def _assert_structured_equals_generic(fn, params, x):
    """Sample-space SR from the captured layers equals the explicit-row path to 1e-10; returns the gradient used."""
    grad = random_like(jax.random.PRNGKey(2), params)
    solve = lambda jacobian: jax.jit(lambda g, p, s: fishr.sr_solve(fn, g, p, s, damping=1e-3, mode="sample_space",
                                                                    jacobian=jacobian))
    generic, _ = solve("generic")(grad, params, x)
    structured, _ = solve("structured")(grad, params, x)
    assert rel_err(flat(structured), flat(generic)) <= 1e-10
    return grad


@pytest.mark.parametrize("name", ["same", "1d-causal-stride2", "attention"])
def test_structured_sr_equals_generic_on_conv_and_attention(name):
    fn, params, x = _model_case(name)
    _assert_structured_equals_generic(fn, params, x)


def test_kfac_preconditions_conv_kernels():
    fn, params, x = _model_case("same")
    grad = random_like(jax.random.PRNGKey(3), params)
    opt = fishr.kfac(fn, 1e-2, example_batch=x)
    nat, _state = jax.jit(opt.update)(grad, opt.init(params), params, batch=x)
    plan = discover_layers(fn, params, x)
    leaves, gleaves = jax.tree.leaves(nat), jax.tree.leaves(grad)
    for layer in plan.layers:  # every kernel is preconditioned (not passed through)
        assert not np.allclose(np.asarray(leaves[layer.kernel_index]), np.asarray(gleaves[layer.kernel_index]))
    assert np.all(np.isfinite(flat(nat)))


def test_report_lists_every_parameter_and_how_it_is_treated():
    fn, params, x = _model_case("attention")
    rows = fishr.capture.report(fn, params, x)
    assert len(rows) == len(jax.tree.leaves(params))
    by_path = {r.path: r for r in rows}
    out = by_path["['params']['MultiHeadDotProductAttention_0']['out']['kernel']"]
    assert (out.kind, out.role, out.positions, out.d_in, out.d_out) == ("DenseGeneral", "kernel", 5, 8, 8)
    norm = by_path["['params']['LayerNorm_0']['scale']"]
    assert (norm.kind, norm.role) == ("LayerNorm", "scale") and norm.treatment == fishr.capture.NORM_TREATMENT
    text = fishr.capture.format_report(rows)
    assert "LayerNorm_0" in text and "captured:" in text


# --------------------------------------------------------------------------- Flax NNX


def _nnx_case():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, (3, 3), strides=2, rngs=rngs, param_dtype=F64)
            self.norm = nnx.LayerNorm(3, rngs=rngs, param_dtype=F64)
            self.general = nnx.LinearGeneral((4, 3), (2, 2), axis=(-2, -1), rngs=rngs, param_dtype=F64)
            self.head = nnx.Linear(4, 1, rngs=rngs, param_dtype=F64)

        def __call__(self, x):
            h = jnp.tanh(self.conv(x))  # (n, 2, 2, 3)
            h = self.norm(h).reshape(h.shape[0], 4, 3)
            h = jnp.tanh(self.general(h)).reshape(h.shape[0], 4)
            return self.head(h)[:, 0]

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    fn = lambda state, x: nnx.merge(graphdef, state)(x)
    return fn, state, jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 2))


def test_nnx_layers_are_captured_like_linen():
    fn, state, x = _nnx_case()
    plan = discover_layers(fn, state, x)
    assert [(l.name, l.kind) for l in plan.layers] == [("conv", "Conv"), ("general", "LinearGeneral"),
                                                       ("head", "Linear")]
    assert len(plan.uncovered) == 2  # LayerNorm
    c = jax.jit(lambda p, x: capture(fn, p, x)[2:4])(state, x)
    per = jax.jit(_per_sample_grads, static_argnums=0)(fn, state, x)
    for layer, a, d in zip(plan.layers, *c):
        g = jnp.einsum("ntk,ntm->nkm", a, d).reshape(per[layer.kernel_index].shape)
        np.testing.assert_allclose(np.asarray(g), np.asarray(per[layer.kernel_index]), rtol=1e-10, atol=1e-12)
    from flax import nnx

    assert nnx.Linear.__call__.__qualname__ == "Linear.__call__"  # the wrapping is undone


def test_nnx_model_with_kfac_and_structured_sr():
    fn, state, x = _nnx_case()
    grad = _assert_structured_equals_generic(fn, state, x)
    opt = fishr.kfac(fn, 1e-2, example_batch=x)
    nat, _ = jax.jit(lambda g, s, p: opt.update(g, s, p, batch=x))(grad, opt.init(state), state)
    assert jax.tree.structure(nat) == jax.tree.structure(state) and np.all(np.isfinite(flat(nat)))


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("name", [slow("same"), "attention"])
def test_conv_and_attention_equal_on_devices_and_one_device(name):
    from jax.sharding import PartitionSpec as P

    fn, params, x = _model_case(name)
    x = jnp.concatenate([x, x[:2] * 0.5])  # 8 samples over 4 devices
    grad = random_like(jax.random.PRNGKey(2), params)
    single = jax.jit(lambda xs: fishr.sr_solve(fn, grad, params, xs, damping=1e-3, mode="sample_space",
                                               jacobian="structured")[0])(x)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("devices",))
    sharded = jax.jit(jax.shard_map(
        lambda xs: fishr.sr_solve(fn, grad, params, xs, damping=1e-3, mode="sample_space", jacobian="structured",
                                  axis_name="devices")[0],
        mesh=mesh, in_specs=P("devices"), out_specs=P(), check_vma=False))(x)  # as tests/test_sr_structured.py
    assert rel_err(flat(sharded), flat(single)) <= 1e-10
    opt = fishr.kfac(fn, 1e-2, example_batch=x)
    one = jax.jit(lambda xs: opt.update(grad, opt.init(params), params, batch=xs)[0])(x)
    opt_d = fishr.kfac(fn, 1e-2, example_batch=x[:2], axis_name="devices")
    # as tests/test_sr_structured.py
    many = jax.jit(jax.shard_map(lambda xs: opt_d.update(grad, opt_d.init(params), params, batch=xs)[0],
                                 mesh=mesh, in_specs=P("devices"), out_specs=P(), check_vma=False))(x)
    assert rel_err(flat(many), flat(one)) <= 1e-10


# --------------------------------------------------------------------------- normalisation layers (K-FAC)


@pytest.mark.parametrize("case", ["attention", "nnx"])
def test_norm_diagonal_blocks_equal_per_sample_gradients(case):
    fn, params, x = _nnx_case() if case == "nnx" else _model_case("attention")
    params = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.PRNGKey(5), a.shape, a.dtype), params)
    plan = discover_layers(fn, params, x, norms=True)
    assert [m.kind for m in plan.norms] == ["LayerNorm"] and plan.uncovered == ()
    assert len(discover_layers(fn, params, x).uncovered) == 2  # structured SR keeps explicit rows for them
    stats = jax.jit(lambda p, x: F.factor_statistics(fn, p, x)[1])(params, x)
    per = jax.jit(_per_sample_grads, static_argnums=0)(fn, params, x)
    norm = plan.norms[0]
    g = np.concatenate([np.asarray(per[norm.scale_index]).reshape(x.shape[0], -1),
                        np.asarray(per[norm.bias_index]).reshape(x.shape[0], -1)], axis=1)
    np.testing.assert_allclose(np.asarray(stats.diag[0]), np.mean(g**2, axis=0), rtol=1e-10, atol=1e-14)
    # K-FAC divides the norm's gradient by its diagonal block plus the damping (first step: no EMA history)
    grad = random_like(jax.random.PRNGKey(3), params)
    opt = fishr.kfac(fn, 1e-2, example_batch=x)
    nat, _ = jax.jit(lambda g, s, p: opt.update(g, s, p, batch=x))(grad, opt.init(params), params)
    lv, gv = jax.tree.leaves(nat), jax.tree.leaves(grad)
    diag = np.mean(g**2, axis=0)
    f = norm.features
    np.testing.assert_allclose(np.asarray(lv[norm.scale_index]).ravel(),
                               np.asarray(gv[norm.scale_index]).ravel() / (diag[:f] + 1e-2), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(lv[norm.bias_index]).ravel(),
                               np.asarray(gv[norm.bias_index]).ravel() / (diag[f:] + 1e-2), rtol=1e-10)


@pytest.mark.parametrize("name", ["attention", "reflect-nobias"])
def test_layer_block_is_the_kernel_then_the_bias_row_and_puts_back(name):
    """layer_block stacks the (d_in, d_out) kernel and the bias row (NumPy restatement); put_layer_block
    writes a block back in the leaves' shapes and dtypes, so the round trip returns the leaves."""
    fn, params, x = _model_case(name)
    leaves = jax.tree.leaves(params)
    layers = discover_layers(fn, params, x).layers
    if name == "reflect-nobias":  # layers with and without a bias
        assert {layer.has_bias for layer in layers} == {True, False}
    out = [None] * len(leaves)
    for layer in layers:
        want = np.asarray(leaves[layer.kernel_index]).reshape(layer.d_in, layer.d_out)
        if layer.has_bias:
            want = np.vstack([want, np.asarray(leaves[layer.bias_index]).reshape(1, -1)])
        block = fishr.capture.layer_block(leaves, layer)
        np.testing.assert_array_equal(block, want)
        fishr.capture.put_layer_block(out, layer, block.astype(jnp.float32), [jnp.shape(v) for v in leaves],
                                      [v.dtype for v in leaves])
    for layer in layers:
        for index in (layer.kernel_index, layer.bias_index):
            if index is not None:
                assert out[index].dtype == leaves[index].dtype
                np.testing.assert_allclose(out[index], leaves[index], rtol=1e-6)
