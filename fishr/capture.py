r"""Per-sample layer statistics of an unmodified Flax model: inputs ``a_i`` and output gradients ``d_i``.

For a dense layer ``z = a W (+ b)`` (Flax layout: kernel ``W`` of shape
``(d_in, d_out)``) and a per-sample scalar ``s_i = fn(params, batch)[i]``, the
per-sample gradient with respect to the kernel is the outer product
``d s_i / d W = sum_t a_{i,t} d_{i,t}^T`` with ``d_{i,t} = d s_i / d z_{i,t}``
(``t`` runs over the extra axes the layer is applied over: positions,
particles, a sequence; and over repeated calls of a shared layer). Block K-FAC
(:func:`fishr.kfac`) and structured exact SR (:func:`fishr.sr`,
:mod:`fishr.jacobian`) need exactly these ``a`` and ``d``; this module, shared by both,
collects all of them from ONE forward and ONE backward pass:

* the forward pass runs ``fn`` under :func:`flax.linen.intercept_methods`; every
  call of a captured layer records its input and adds a zero "perturbation"
  array to its output (the idea of Flax's ``perturb``, but the zeros are an
  argument of the traced function, so the user's ``apply`` needs no
  ``'perturbations'`` collection and no ``mutable=``);
* the backward pass is one ``jax.vjp`` with respect to those zeros: with the
  cotangent ``u`` on the outputs it returns ``sum_i u_i d s_i / d z`` for every
  captured call. Because ``s_i`` depends only on sample ``i`` (no batch
  statistics across samples), ``u = 1`` gives every ``d_i`` at once. The
  parameters are closed over, so no weight gradient is computed.

What is captured
----------------
* ``flax.linen.Dense``: ``a = inputs`` (last axis ``d_in``), ``d`` the gradient
  with respect to the output (last axis ``d_out``).
* ``flax.linen.DenseGeneral`` with ONE contracting ``axis`` (any position but
  the leading batch axis) and no ``batch_dims``; its kernel ``(d_in, *features)``
  is treated as a ``(d_in, prod(features))`` matrix, its bias ``(*features,)`` as a
  vector.
* A layer is captured when it is called on the whole batch (leading axis of its
  input = number of outputs of ``fn``) with its kernel (and bias) taken
  unchanged from ``params``: the kernel is recognised by identity with a leaf
  of ``params``. Layers inside ``nn.scan``/``nn.vmap``/``nn.remat`` or a
  ``jax.vmap`` over samples, layers whose parameters are transformed before
  use, and every other module are *not* captured; their parameters are listed
  in :attr:`LayerPlan.uncovered` (K-FAC leaves them to the identity, structured SR
  gives them explicit per-sample rows).
* ``flax.linen.Conv`` is not captured (its kernel falls back to the identity):
  the Kronecker factors of a convolution (KFC, Grosse & Martens 2016) need the
  input patches (im2col) for the layer's window, strides, padding, dilation and
  feature groups, a second statistics path that this module does not build.

Shapes returned: ``inputs[l]`` is ``(n, T_l, d_in)`` and ``output_grads[l]`` is
``(n, T_l, d_out)`` for layer ``l``, where ``T_l`` is the product of the extra
axes of the layer's input summed over its calls (``T = 1`` for a plain
``(n, d_in)`` input). ``a`` is returned without the trailing 1 of the bias; see
:func:`augment_bias`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "CAPTURED_MODULES",
    "LayerInfo",
    "LayerPlan",
    "Linearized",
    "Captured",
    "augment_bias",
    "capture",
    "discover_layers",
    "linearize_layers",
]

CAPTURED_MODULES = (nn.Dense, nn.DenseGeneral)


@dataclasses.dataclass(frozen=True)
class _Call:
    """One intercepted call of a candidate module, in call order (static)."""

    layer: Optional[int]  # index into LayerPlan.layers, None when not captured
    module_type: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    output_dtype: Any
    contract_axis: int  # input axis contracted with the kernel (non-negative)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A captured layer (static, hashable).

    Attributes:
      name: the Flax module path joined by ``"/"`` (e.g. ``"Dense_0"``).
      kind: ``"Dense"`` or ``"DenseGeneral"``.
      kernel_index: position of the kernel in ``jax.tree.leaves(params)``.
      bias_index: position of the bias, ``None`` without bias.
      kernel_shape: the kernel leaf's shape (``(d_in, *features)``).
      d_in, d_out: the kernel seen as a ``(d_in, d_out)`` matrix.
      calls: positions of this layer's calls in the traced call sequence (a
        shared layer is called more than once; each call adds positions).
      positions: ``T``, the number of (position, call) pairs per sample.
    """

    name: str
    kind: str
    kernel_index: int
    bias_index: Optional[int]
    kernel_shape: tuple[int, ...]
    d_in: int
    d_out: int
    calls: tuple[int, ...]
    positions: int

    @property
    def has_bias(self) -> bool:
        return self.bias_index is not None


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What :func:`discover_layers` found (static, hashable).

    Attributes:
      layers: the captured layers, in order of their first call.
      uncovered: indices (in ``jax.tree.leaves(params)``) of the parameters that
        belong to no captured layer.
      num_leaves: number of leaves of ``params``.
      batch_size: ``n``, the leading size of ``fn``'s output.
    """

    layers: tuple[LayerInfo, ...]
    uncovered: tuple[int, ...]
    num_leaves: int
    batch_size: int
    calls: tuple[_Call, ...] = dataclasses.field(repr=False)


def _same_trace(x: Any, y: Any) -> bool:
    # A layer applied inside a jax.vmap/scan over samples sees inputs of an inner
    # trace; those values cannot leave it, so such calls are not captured.
    return getattr(x, "_trace", None) is getattr(y, "_trace", None)


def _contract_axis(module: nn.Module, ndim: int) -> Optional[int]:
    if isinstance(module, nn.Dense):
        return ndim - 1
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    batch_dims = module.batch_dims if isinstance(module.batch_dims, (tuple, list)) else (module.batch_dims,)
    if len(axis) != 1 or len(batch_dims) != 0:
        return None
    return axis[0] % ndim


def _intercepted_call(ctx) -> bool:
    return ctx.method_name == "__call__" and isinstance(ctx.module, CAPTURED_MODULES)


def _layer_input(args, kwargs):
    return args[0] if args else kwargs["inputs"]


def discover_layers(fn: Callable[..., jax.Array], params: Any, *args: Any) -> LayerPlan:
    """Trace ``fn(params, *args)`` abstractly (``jax.eval_shape``) and list its capturable layers.

    Costs one abstract trace, no computation. ``args`` may hold arrays or
    ``jax.ShapeDtypeStruct`` s. ``fn`` must return an array whose leading axis
    is the batch (``n``).
    """
    raw: list[dict] = []

    def traced(params, *args):
        leaves = jax.tree.leaves(params)
        index_of = {id(leaf): i for i, leaf in enumerate(leaves)}

        def interceptor(next_fun, iargs, ikwargs, ctx):
            out = next_fun(*iargs, **ikwargs)
            if not _intercepted_call(ctx):
                return out
            x = _layer_input(iargs, ikwargs)
            variables = ctx.module.variables.get("params", {})
            kernel, bias = variables.get("kernel"), variables.get("bias")
            kernel_index = index_of.get(id(kernel))
            bias_index = None if bias is None else index_of.get(id(bias))
            axis = _contract_axis(ctx.module, jnp.ndim(x))
            ok = (
                kernel_index is not None
                and (bias is None or bias_index is not None)
                and axis is not None
                and axis != 0
                and _same_trace(x, kernel)
                and jnp.ndim(x) >= 2
            )
            raw.append(
                dict(
                    ok=ok, name="/".join(str(p) for p in ctx.module.scope.path),
                    kind=type(ctx.module).__name__, kernel_index=kernel_index, bias_index=bias_index,
                    kernel_shape=tuple(jnp.shape(kernel)) if kernel is not None else (),
                    input_shape=tuple(jnp.shape(x)), output_shape=tuple(jnp.shape(out)),
                    output_dtype=jnp.result_type(out), axis=axis,
                )
            )
            return out

        with nn.intercept_methods(interceptor):
            return fn(params, *args)

    out = jax.eval_shape(traced, params, *args)
    if not hasattr(out, "shape") or len(out.shape) < 1:
        raise ValueError(
            "fishr.capture: `fn(params, ...)` must return an array with a leading batch axis "
            f"(one score per sample); got {out}."
        )
    n = out.shape[0]
    num_leaves = len(jax.tree.leaves(params))

    # Group calls by kernel; a kernel is captured only if every call of it is capturable.
    by_kernel: dict[int, list[int]] = {}
    for k, r in enumerate(raw):
        if r["kernel_index"] is not None:
            by_kernel.setdefault(r["kernel_index"], []).append(k)
    layers: list[LayerInfo] = []
    layer_of_call: dict[int, int] = {}
    for kernel_index, call_ids in by_kernel.items():
        rs = [raw[k] for k in call_ids]
        first = rs[0]
        consistent = all(
            r["ok"] and r["input_shape"][0] == n and r["bias_index"] == first["bias_index"] for r in rs
        )
        if not consistent:
            continue
        d_in = first["kernel_shape"][0]
        d_out = math.prod(first["kernel_shape"][1:])
        positions = sum(math.prod(r["input_shape"]) // (n * d_in) for r in rs)
        for k in call_ids:
            layer_of_call[k] = len(layers)
        layers.append(
            LayerInfo(
                name=first["name"], kind=first["kind"], kernel_index=kernel_index,
                bias_index=first["bias_index"], kernel_shape=first["kernel_shape"], d_in=d_in,
                d_out=d_out, calls=tuple(call_ids), positions=positions,
            )
        )
    covered = {l.kernel_index for l in layers} | {l.bias_index for l in layers if l.has_bias}
    calls = tuple(
        _Call(
            layer=layer_of_call.get(k), module_type=r["kind"], input_shape=r["input_shape"],
            output_shape=r["output_shape"], output_dtype=r["output_dtype"],
            contract_axis=r["axis"] if r["axis"] is not None else -1,
        )
        for k, r in enumerate(raw)
    )
    return LayerPlan(
        layers=tuple(layers),
        uncovered=tuple(i for i in range(num_leaves) if i not in covered),
        num_leaves=num_leaves,
        batch_size=n,
        calls=calls,
    )


class Linearized(NamedTuple):
    """Result of :func:`linearize_layers` (use inside one trace; ``plan`` is static).

    Attributes:
      outputs: ``fn(params, *args)``.
      plan: the :class:`LayerPlan`.
      inputs: per captured layer, ``a`` of shape ``(n, T, d_in)`` (no bias column).
      pullback: ``cotangent -> tuple of (n, T, d_out)``: for a cotangent ``u`` on
        ``outputs``, the gradient of ``sum_i u_i . outputs_i`` with respect to each
        layer's outputs (the backward pass; call it as often as needed).
    """

    outputs: jax.Array
    plan: LayerPlan
    inputs: tuple
    pullback: Callable[[jax.Array], tuple]


def _varying_zero(args: Any) -> jax.Array:
    """A scalar 0 that varies over the same mapped axes as ``args`` (the batch).

    Under ``jax.shard_map`` a perturbation created with ``jnp.zeros`` is invariant
    across devices, and the cotangent of an invariant input of a per-device
    computation is summed over the devices; deriving the zeros from the batch
    keeps them per-device, so each device gets its own samples' ``d_i``. Outside
    ``shard_map`` this is the constant 0.
    """
    zero = jnp.zeros(())
    for leaf in jax.tree.leaves(args):
        if jnp.ndim(leaf) > 0:
            zero = zero + jnp.sum(jnp.asarray(leaf).ravel()[:0]).astype(zero.dtype)
    return jax.lax.stop_gradient(zero)


def linearize_layers(fn: Callable[..., jax.Array], params: Any, *args: Any) -> Linearized:
    """One forward pass of ``fn(params, *args)`` recording every captured layer (see module docs)."""
    plan = discover_layers(fn, params, *args)
    captured = [k for k, c in enumerate(plan.calls) if c.layer is not None]
    slot = {k: j for j, k in enumerate(captured)}

    def perturbed(perturbations):
        recorded: dict[int, jax.Array] = {}
        counter = iter(range(len(plan.calls)))

        def interceptor(next_fun, iargs, ikwargs, ctx):
            if not _intercepted_call(ctx):
                return next_fun(*iargs, **ikwargs)
            k = next(counter, None)
            x = _layer_input(iargs, ikwargs)
            if k is None or plan.calls[k].input_shape != tuple(jnp.shape(x)):
                raise RuntimeError(
                    "fishr.capture: the model called its layers differently in two traces of the "
                    "same function (call order or shapes changed); capture needs a deterministic model."
                )
            out = next_fun(*iargs, **ikwargs)
            if k not in slot:
                return out
            recorded[k] = x
            return out + perturbations[slot[k]]

        with nn.intercept_methods(interceptor):
            outputs = fn(params, *args)
        return outputs, tuple(recorded[k] for k in captured)

    anchor = _varying_zero(args)
    zeros = tuple(
        jnp.zeros(plan.calls[k].output_shape, plan.calls[k].output_dtype) + anchor.astype(plan.calls[k].output_dtype)
        for k in captured
    )
    outputs, vjp_fn, raw_inputs = jax.vjp(perturbed, zeros, has_aux=True)
    n = plan.batch_size

    def per_layer_inputs(layer: LayerInfo) -> jax.Array:
        parts = []
        for k in layer.calls:
            x = jnp.moveaxis(raw_inputs[slot[k]], plan.calls[k].contract_axis, -1)
            parts.append(x.reshape(n, -1, layer.d_in))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

    def pullback(cotangent: jax.Array) -> tuple:
        (grads,) = vjp_fn(cotangent)
        result = []
        for layer in plan.layers:
            parts = [grads[slot[k]].reshape(n, -1, layer.d_out) for k in layer.calls]
            result.append(parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1))
        return tuple(result)

    inputs = tuple(per_layer_inputs(layer) for layer in plan.layers)
    return Linearized(outputs=outputs, plan=plan, inputs=inputs, pullback=pullback)


class Captured(NamedTuple):
    """Result of :func:`capture`: ``outputs``, static ``plan``, per-layer ``inputs`` ``a`` and ``output_grads`` ``d``."""

    outputs: jax.Array
    plan: LayerPlan
    inputs: tuple
    output_grads: tuple


def capture(fn: Callable[..., jax.Array], params: Any, *args: Any, cotangent: Optional[jax.Array] = None) -> Captured:
    """Per-sample ``a_i`` and ``d_i = d fn(params, *args)_i / d z_i`` for every captured layer.

    One forward and one backward pass. ``fn`` returns one real score per
    sample, shape ``(n,)``; ``cotangent`` defaults to ones (every ``d_i`` at once).
    """
    lin = linearize_layers(fn, params, *args)
    u = jnp.ones_like(lin.outputs) if cotangent is None else cotangent
    return Captured(lin.outputs, lin.plan, lin.inputs, lin.pullback(u))


def augment_bias(a: jax.Array, has_bias: bool) -> jax.Array:
    """``a`` with a trailing column of ones when the layer has a bias (``[a, 1]``)."""
    if not has_bias:
        return a
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
