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

* the forward pass runs ``fn`` under :func:`flax.linen.intercept_methods` (linen) with
  the ``__call__`` of ``flax.nnx.Linear``, ``LinearGeneral`` and ``Conv`` wrapped for the
  duration of the trace (NNX, whose modules have no interceptor); every
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
Flax NNX: ``fn`` is typically ``lambda state, x: nnx.merge(graphdef, state)(x)`` with
``graphdef, state = nnx.split(model)``; ``nnx.Linear``, ``nnx.LinearGeneral`` and
``nnx.Conv`` are captured as their linen twins below (a layer is named by its path in
``state``).

* ``flax.linen.Dense``: ``a = inputs`` (last axis ``d_in``), ``d`` the gradient
  with respect to the output (last axis ``d_out``).
* ``flax.linen.DenseGeneral`` with any contracting ``axis`` (one or several, never
  the leading batch axis) and any ``features``, no ``batch_dims``: attention's
  query/key/value projections (``axis=-1``, ``features=(heads, head_dim)``) and its
  output projection (``axis=(-2, -1)``). The kernel ``(*contracted, *features)`` is
  treated as a ``(d_in, d_out)`` matrix (``d_in`` the product of the contracted sizes,
  in ``axis`` order; ``d_out`` the product of ``features``), the bias ``(*features,)``
  as a vector; ``a`` holds the contracted axes flattened last.
* ``flax.linen.Conv`` (1-D, 2-D or more spatial axes, one batch axis, any
  ``strides``, ``padding`` (including ``"CIRCULAR"``, ``"REFLECT"``, ``"CAUSAL"``),
  ``input_dilation`` and ``kernel_dilation``, with or without bias,
  ``feature_group_count=1``, no ``mask``): ``a`` holds the input patches (im2col,
  :func:`jax.lax.conv_general_dilated_patches`), one position ``t`` per output pixel,
  features ordered like the kernel ``(*kernel_size, C_in)`` flattened, so ``d_in =
  prod(kernel_size) C_in`` and ``d_out = features``; ``T`` is the number of output
  pixels. Grouped and depthwise convolutions (``feature_group_count > 1``), masked
  kernels, ``ConvLocal``, ``ConvTranspose`` and convolutions with a custom
  ``conv_general_dilated`` are not captured (their parameters are uncovered).
* A layer is captured when it is called on the whole batch (leading axis of its
  input = number of outputs of ``fn``) with its kernel (and bias) taken
  unchanged from ``params``: the kernel is recognised by identity with a leaf
  of ``params``. Layers inside ``nn.scan``/``nn.vmap``/``nn.remat`` or a
  ``jax.vmap`` over samples, layers whose parameters are transformed before
  use, and every other module are *not* captured; their parameters are listed
  in :attr:`LayerPlan.uncovered` (K-FAC leaves them to the identity, structured SR
  gives them explicit per-sample rows). :func:`report` lists, per parameter, what
  was captured and how.

Shapes returned: ``inputs[l]`` is ``(n, T_l, d_in)`` and ``output_grads[l]`` is
``(n, T_l, d_out)`` for layer ``l``, where ``T_l`` is the product of the extra
axes of the layer's input summed over its calls (``T = 1`` for a plain
``(n, d_in)`` input). ``a`` is returned without the trailing 1 of the bias; see
:func:`augment_bias`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from fishr.scores import inactive_leaves

__all__ = [
    "CAPTURED_MODULES",
    "Captured",
    "ConvSpec",
    "CoverageRow",
    "LayerInfo",
    "LayerPlan",
    "Linearized",
    "NormInfo",
    "NormSpec",
    "augment_bias",
    "capture",
    "conv_patches",
    "discover_layers",
    "format_report",
    "layer_block",
    "linearize_layers",
    "put_layer_block",
    "report",
]

CAPTURED_MODULES = (nn.Dense, nn.DenseGeneral, nn.Conv)
NNX_CAPTURED_MODULES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv)
NORM_MODULES = (nn.LayerNorm, nn.RMSNorm)  # captured for K-FAC's diagonal blocks (``norms=True``)
NNX_NORM_MODULES = (nnx.LayerNorm, nnx.RMSNorm)


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """How a captured LayerNorm / RMSNorm call normalises its input over the last axis (static)."""

    centred: bool  # LayerNorm subtracts the mean; RMSNorm does not
    epsilon: float
    fast_variance: bool  # E[x^2] - E[x]^2 (Flax's default) instead of E[(x - E[x])^2]


def normalised(x: jax.Array, spec: NormSpec) -> jax.Array:
    """``xhat``, the normalised input the norm's scale multiplies (last axis), as Flax computes it."""
    if spec.centred:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        if spec.fast_variance:
            var = jnp.maximum(0.0, jnp.mean(jnp.abs(x) ** 2, axis=-1, keepdims=True) - jnp.abs(mean) ** 2)
        else:
            var = jnp.mean(jnp.abs(x - mean) ** 2, axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + spec.epsilon)
    return x * jax.lax.rsqrt(jnp.mean(jnp.abs(x) ** 2, axis=-1, keepdims=True) + spec.epsilon)


def _norm_spec(module: Any, x: Any) -> NormSpec | None:
    """The spec of a LayerNorm / RMSNorm normalising over the last axis only, else ``None``."""
    last = jnp.ndim(x) - 1
    axes_ok = all(tuple(a % jnp.ndim(x) for a in _as_tuple(getattr(module, name))) == (last,)
                  for name in ("reduction_axes", "feature_axes"))
    if not axes_ok or getattr(module, "axis_name", None) is not None:
        return None
    return NormSpec(centred=isinstance(module, (nn.LayerNorm, nnx.LayerNorm)), epsilon=float(module.epsilon),
                    fast_variance=bool(getattr(module, "use_fast_variance", True)))


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """How a captured ``nn.Conv`` call turns its input into patches (static).

    Attributes:
      kernel_size, strides, input_dilation, kernel_dilation: per spatial axis.
      padding: ``"SAME"``, ``"VALID"`` or per-axis ``(low, high)`` pairs, after
        ``pre_pad`` (``"CIRCULAR"``, ``"REFLECT"`` and ``"CAUSAL"`` pad the input
        first, as Flax does, then use ``"VALID"``).
      pre_pad: ``((low, high), ...)`` per spatial axis and the ``jnp.pad`` mode, or ``None``.
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: Any
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]
    pre_pad: tuple[tuple[tuple[int, int], ...], str] | None


@dataclasses.dataclass(frozen=True)
class _Call:
    """One intercepted call of a candidate module, in call order (static)."""

    layer: int | None  # index into LayerPlan.layers, None when not captured
    module_type: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    output_dtype: Any
    contract_axes: tuple[int, ...]  # input axes contracted with the kernel (non-negative, kernel order)
    conv: ConvSpec | None = None
    norm: int | None = None  # index into LayerPlan.norms, for a captured norm call


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A captured layer (static, hashable).

    Attributes:
      name: the Flax module path joined by ``"/"`` (e.g. ``"Dense_0"``).
      kind: the module class: ``"Dense"``, ``"DenseGeneral"``, ``"Conv"`` (linen) or
        ``"Linear"``, ``"LinearGeneral"``, ``"Conv"`` (NNX).
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
    bias_index: int | None
    kernel_shape: tuple[int, ...]
    d_in: int
    d_out: int
    calls: tuple[int, ...]
    positions: int

    @property
    def has_bias(self) -> bool:
        return self.bias_index is not None


@dataclasses.dataclass(frozen=True)
class NormInfo:
    """A captured LayerNorm / RMSNorm (static; only with ``norms=True``, for K-FAC's diagonal blocks).

    ``y = xhat * scale + bias`` over the last axis (``features``), so the per-sample
    gradients are ``sum_t xhat_t d_t`` (scale) and ``sum_t d_t`` (bias), with ``d`` the
    gradient with respect to ``y``.

    Attributes:
      name, kind: as for :class:`LayerInfo` (``"LayerNorm"`` or ``"RMSNorm"``).
      scale_index, bias_index: leaf positions in ``params`` (``None`` when absent).
      features: the size of the normalised axis.
      positions: ``T``, positions per sample over all calls.
      calls: positions of its calls in the traced call sequence.
      spec: the normalisation (:class:`NormSpec`).
    """

    name: str
    kind: str
    scale_index: int | None
    bias_index: int | None
    features: int
    positions: int
    calls: tuple[int, ...]
    spec: NormSpec


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What :func:`discover_layers` found (static, hashable).

    Attributes:
      layers: the captured layers, in order of their first call.
      uncovered: indices (in ``jax.tree.leaves(params)``) of the parameters that
        belong to no captured layer.
      num_leaves: number of leaves of ``params``.
      batch_size: ``n``, the leading size of ``fn``'s output.
      norms: the captured normalisation layers (``norms=True`` only; their scale and
        bias are then not in ``uncovered``).
    """

    layers: tuple[LayerInfo, ...]
    uncovered: tuple[int, ...]
    num_leaves: int
    batch_size: int
    calls: tuple[_Call, ...] = dataclasses.field(repr=False)
    norms: tuple[NormInfo, ...] = ()


def _same_trace(x: Any, y: Any) -> bool:
    # A layer applied inside a jax.vmap/scan over samples sees inputs of an inner
    # trace; those values cannot leave it, so such calls are not captured.
    return getattr(x, "_trace", None) is getattr(y, "_trace", None)


def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _contract_axes(module: Any, ndim: int) -> tuple[int, ...] | None:
    """The input axes a dense layer contracts with its kernel, in kernel order; ``None`` if not captured."""
    if isinstance(module, (nn.Dense, nnx.Linear)):
        return (ndim - 1,)
    if isinstance(module, nn.DenseGeneral):
        has_batch = len(_as_tuple(module.batch_dims)) != 0
    else:  # nnx.LinearGeneral: batch_axis maps axes to sizes
        has_batch = len(module.batch_axis) != 0
    if has_batch:
        return None
    axes = tuple(a % ndim for a in _as_tuple(module.axis))
    return axes if len(set(axes)) == len(axes) else None


def _conv_spec(module: nn.Conv | nnx.Conv, x: Any) -> ConvSpec | None:
    """The patch recipe of a Conv call, or ``None`` where capture does not apply (module docstring)."""
    if (
        module.feature_group_count != 1
        or module.mask is not None
        or getattr(module, "shared_weights", True) is not True
        or getattr(module, "conv_general_dilated", None) not in (None, jax.lax.conv_general_dilated)
        or getattr(module, "conv_general_dilated_cls", None) is not None
    ):
        return None
    kernel_size = _as_tuple(module.kernel_size)
    rank = len(kernel_size)
    if jnp.ndim(x) != rank + 2:  # one batch axis
        return None

    def per_axis(v):
        v = 1 if v is None else v
        return (v,) * rank if isinstance(v, int) else tuple(v)

    strides = per_axis(module.strides)
    lhs_dil, rhs_dil = per_axis(module.input_dilation), per_axis(module.kernel_dilation)
    try:
        padding = nn.linear.canonicalize_padding(module.padding, rank)
    except ValueError:
        return None
    pre_pad = None
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, rhs_dil)]
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[str(padding)]
        pre_pad = (tuple(((k - 1) // 2, k // 2) for k in dilated), mode)
        padding = "VALID"
    elif padding == "CAUSAL":
        if rank != 1:
            return None
        pre_pad = (((rhs_dil[0] * (kernel_size[0] - 1), 0),), "constant")
        padding = "VALID"
    elif not isinstance(padding, str):
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return ConvSpec(kernel_size=kernel_size, strides=strides, padding=padding, input_dilation=lhs_dil,
                    kernel_dilation=rhs_dil, pre_pad=pre_pad)


def conv_patches(x: jax.Array, spec: ConvSpec) -> jax.Array:
    """``(n, *out_spatial, prod(kernel_size) C_in)`` input patches of a Conv call, features in kernel order.

    ``patches @ kernel.reshape(-1, C_out)`` equals the convolution (without bias).
    """
    if spec.pre_pad is not None:
        pads, mode = spec.pre_pad
        x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),), mode=mode)
    ndim = x.ndim
    lhs_spec = (0, ndim - 1) + tuple(range(1, ndim - 1))
    rhs_spec = (ndim - 1, ndim - 2) + tuple(range(0, ndim - 2))
    padding = spec.padding if isinstance(spec.padding, str) else list(spec.padding)
    patches = jax.lax.conv_general_dilated_patches(
        x, spec.kernel_size, spec.strides, padding, lhs_dilation=spec.input_dilation,
        rhs_dilation=spec.kernel_dilation, dimension_numbers=jax.lax.ConvDimensionNumbers(lhs_spec, rhs_spec, lhs_spec),
        precision=jax.lax.Precision.HIGHEST,
    )
    # the patches' features are (C_in, *kernel_size), C_in slowest; the kernel's are (*kernel_size, C_in)
    c_in, k = x.shape[-1], math.prod(spec.kernel_size)
    patches = patches.reshape(patches.shape[:-1] + (c_in, k))
    return jnp.swapaxes(patches, -1, -2).reshape(patches.shape[:-2] + (k * c_in,))


@dataclasses.dataclass(frozen=True)
class _Seen:
    """A call of a candidate layer as the hooks see it: the module, its kernel and bias arrays, its input."""

    module: Any
    kind: str
    name: str | None  # linen's scope path; None for NNX (named from the params path later)
    kernel: Any
    bias: Any
    x: Any


def _nnx_array(variable: Any) -> Any:
    if variable is None:
        return None
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


@contextlib.contextmanager
def _hooked(hook: Callable[[_Seen, Callable[[], jax.Array]], jax.Array], norms: bool = False):
    """Route every call of a candidate layer (linen via ``nn.intercept_methods``, NNX by
    wrapping the classes' ``__call__`` for the duration) through ``hook(seen, call) -> output``.

    A norm's ``kernel`` is its scale. Norm modules are candidates only with ``norms``.
    """
    linen_kinds = CAPTURED_MODULES + (NORM_MODULES if norms else ())

    def interceptor(next_fun, iargs, ikwargs, ctx):
        if not (ctx.method_name == "__call__" and isinstance(ctx.module, linen_kinds)) or \
                ikwargs.get("mask") is not None:
            return next_fun(*iargs, **ikwargs)
        variables = ctx.module.variables.get("params", {})
        is_norm = isinstance(ctx.module, NORM_MODULES)
        seen = _Seen(module=ctx.module, kind=type(ctx.module).__name__,
                     name="/".join(str(p) for p in ctx.module.path),
                     kernel=variables.get("scale" if is_norm else "kernel"),
                     bias=variables.get("bias"), x=iargs[0] if iargs else ikwargs["x" if is_norm else "inputs"])
        return hook(seen, lambda: next_fun(*iargs, **ikwargs))

    originals = {cls: cls.__dict__["__call__"] for cls in NNX_CAPTURED_MODULES + (NNX_NORM_MODULES if norms else ())}

    def wrap(cls, original):
        def call(self, inputs, *a, **kw):
            if type(self).__call__ is not call or kw.get("mask") is not None:  # a subclass with its own
                return original(self, inputs, *a, **kw)  # __call__, or a masked norm: not captured
            is_norm = isinstance(self, NNX_NORM_MODULES)
            seen = _Seen(module=self, kind=cls.__name__, name=None,
                         kernel=_nnx_array(getattr(self, "scale" if is_norm else "kernel", None)),
                         bias=_nnx_array(getattr(self, "bias", None)), x=inputs)
            return hook(seen, lambda: original(self, inputs, *a, **kw))

        return call

    with nn.intercept_methods(interceptor):
        try:
            for cls, original in originals.items():
                cls.__call__ = wrap(cls, original)  # pyright: ignore[reportAttributeAccessIssue]  (restored below)
            yield
        finally:
            for cls, original in originals.items():
                cls.__call__ = original


def _leaf_names(params: Any) -> list[str]:
    """``"a/b/c"`` names of the leaves of ``params`` from their paths (NNX's trailing ``value`` dropped)."""
    names = []
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
        if keys and keys[-1] == "value":
            keys = keys[:-1]
        if len(keys) > 1:
            keys = keys[:-1]  # the module, not the kernel leaf
        names.append("/".join(str(k) for k in keys if k != "params"))
    return names


def discover_layers(fn: Callable[..., jax.Array], params: Any, *args: Any, norms: bool = False) -> LayerPlan:
    """Trace ``fn(params, *args)`` abstractly (``jax.eval_shape``) and list its capturable layers.

    Costs one abstract trace, no computation. ``args`` may hold arrays or
    ``jax.ShapeDtypeStruct`` s. ``fn`` must return an array whose leading axis
    is the batch (``n``). ``norms=True`` also captures LayerNorm / RMSNorm layers
    (:class:`NormInfo`; K-FAC's diagonal blocks).
    """
    raw: list[dict] = []

    def traced(params, *args):
        leaves = jax.tree.leaves(params)
        index_of = {id(leaf): i for i, leaf in enumerate(leaves)}

        def hook(seen, call):
            out = call()
            x, kernel, bias = seen.x, seen.kernel, seen.bias
            kernel_index = None if kernel is None else index_of.get(id(kernel))
            bias_index = None if bias is None else index_of.get(id(bias))
            is_norm = isinstance(seen.module, NORM_MODULES + NNX_NORM_MODULES)
            conv = axes = spec = None
            if is_norm:  # the scale stands in for the kernel; a norm may have only a bias
                spec = _norm_spec(seen.module, x)
                anchor = kernel if kernel is not None else bias
                ok = spec is not None and anchor is not None and (kernel is None or kernel_index is not None)
            else:
                if isinstance(seen.module, (nn.Conv, nnx.Conv)):
                    conv = _conv_spec(seen.module, x)
                    axes = None if conv is None else (jnp.ndim(x) - 1,)
                else:
                    axes = _contract_axes(seen.module, jnp.ndim(x))
                anchor = kernel
                ok = kernel_index is not None and axes is not None and 0 not in axes
            ok = (ok and (bias is None or bias_index is not None) and _same_trace(x, anchor)
                  and jnp.ndim(x) >= 2)
            raw.append(
                dict(
                    ok=ok, is_norm=is_norm, name=seen.name, kind=seen.kind, kernel_index=kernel_index,
                    bias_index=bias_index, kernel_shape=tuple(jnp.shape(kernel)) if kernel is not None else (),
                    input_shape=tuple(jnp.shape(x)), output_shape=tuple(jnp.shape(out)),
                    output_dtype=jnp.result_type(out), axes=axes, conv=conv, norm=spec,
                )
            )
            return out

        with _hooked(hook, norms):
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
    by_norm: dict[tuple, list[int]] = {}
    for k, r in enumerate(raw):
        if r["is_norm"]:
            by_norm.setdefault((r["kernel_index"], r["bias_index"]), []).append(k)
        elif r["kernel_index"] is not None:
            by_kernel.setdefault(r["kernel_index"], []).append(k)
    layers: list[LayerInfo] = []
    layer_of_call: dict[int, int] = {}
    leaf_names = None
    for kernel_index, call_ids in by_kernel.items():
        rs = [raw[k] for k in call_ids]
        first = rs[0]
        consistent = all(
            r["ok"] and r["input_shape"][0] == n and r["bias_index"] == first["bias_index"] for r in rs
        )
        if not consistent:
            continue
        if first["conv"] is not None:
            d_in, d_out = math.prod(first["kernel_shape"][:-1]), first["kernel_shape"][-1]
            positions = sum(math.prod(r["output_shape"]) // (n * d_out) for r in rs)
        else:
            n_in = len(first["axes"])
            d_in, d_out = math.prod(first["kernel_shape"][:n_in]), math.prod(first["kernel_shape"][n_in:])
            positions = sum(math.prod(r["input_shape"]) // (n * d_in) for r in rs)
        for k in call_ids:
            layer_of_call[k] = len(layers)
        if first["name"] is None:
            leaf_names = leaf_names if leaf_names is not None else _leaf_names(params)
            first["name"] = leaf_names[kernel_index]
        layers.append(
            LayerInfo(
                name=first["name"], kind=first["kind"], kernel_index=kernel_index,
                bias_index=first["bias_index"], kernel_shape=first["kernel_shape"], d_in=d_in,
                d_out=d_out, calls=tuple(call_ids), positions=positions,
            )
        )
    norm_infos: list[NormInfo] = []
    norm_of_call: dict[int, int] = {}
    taken = {l.kernel_index for l in layers} | {l.bias_index for l in layers if l.has_bias}
    for (scale_index, bias_index), call_ids in by_norm.items():
        rs = [raw[k] for k in call_ids]
        first = rs[0]
        if scale_index in taken or bias_index in taken or not all(
                r["ok"] and r["input_shape"][0] == n and r["norm"] == first["norm"] for r in rs):
            continue
        features = first["input_shape"][-1]
        for k in call_ids:
            norm_of_call[k] = len(norm_infos)
        name = first["name"]
        if name is None:
            leaf_names = leaf_names if leaf_names is not None else _leaf_names(params)
            name = leaf_names[scale_index if scale_index is not None else bias_index]
        norm_infos.append(NormInfo(
            name=name, kind=first["kind"], scale_index=scale_index, bias_index=bias_index, features=features,
            positions=sum(math.prod(r["input_shape"]) // (n * features) for r in rs), calls=tuple(call_ids),
            spec=first["norm"],
        ))
    covered = {l.kernel_index for l in layers} | {l.bias_index for l in layers if l.has_bias}
    covered |= {i for m in norm_infos for i in (m.scale_index, m.bias_index) if i is not None}
    calls = tuple(
        _Call(
            layer=layer_of_call.get(k), module_type=r["kind"], input_shape=r["input_shape"],
            output_shape=r["output_shape"], output_dtype=r["output_dtype"],
            contract_axes=r["axes"] if r["axes"] is not None else (), conv=r["conv"], norm=norm_of_call.get(k),
        )
        for k, r in enumerate(raw)
    )
    return LayerPlan(
        layers=tuple(layers),
        uncovered=tuple(i for i in range(num_leaves) if i not in covered),
        num_leaves=num_leaves,
        batch_size=n,
        calls=calls,
        norms=tuple(norm_infos),
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
      norm_inputs: per captured norm (``norms=True``), ``xhat`` of shape ``(n, T, features)``.
      pullback_all: ``cotangent -> (layer grads, norm grads)`` from the same backward pass.
    """

    outputs: jax.Array
    plan: LayerPlan
    inputs: tuple
    pullback: Callable[[jax.Array], tuple]
    norm_inputs: tuple = ()
    pullback_all: Callable[[jax.Array], tuple] | None = None


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


def linearize_layers(fn: Callable[..., jax.Array], params: Any, *args: Any, norms: bool = False) -> Linearized:
    """One forward pass of ``fn(params, *args)`` recording every captured layer (see module docs).

    ``norms=True`` also records LayerNorm / RMSNorm layers (``norm_inputs``, ``pullback_all``).
    """
    plan = discover_layers(fn, params, *args, norms=norms)
    captured = [k for k, c in enumerate(plan.calls) if c.layer is not None or c.norm is not None]
    slot = {k: j for j, k in enumerate(captured)}

    def perturbed(perturbations):
        recorded: dict[int, jax.Array] = {}
        counter = iter(range(len(plan.calls)))

        def hook(seen, call):
            k = next(counter, None)
            x = seen.x
            if k is None or plan.calls[k].input_shape != tuple(jnp.shape(x)):
                raise RuntimeError(
                    "fishr.capture: the model called its layers differently in two traces of the "
                    "same function (call order or shapes changed); capture needs a deterministic model."
                )
            out = call()
            if k not in slot:
                return out
            recorded[k] = x
            return out + perturbations[slot[k]]

        with _hooked(hook, norms):
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
            call = plan.calls[k]
            if call.conv is not None:
                x = conv_patches(raw_inputs[slot[k]], call.conv)
            else:
                axes = call.contract_axes
                x = jnp.moveaxis(raw_inputs[slot[k]], axes, tuple(range(-len(axes), 0)))
            parts.append(x.reshape(n, -1, layer.d_in))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

    def per_position(grads, calls, width):
        parts = [grads[slot[k]].reshape(n, -1, width) for k in calls]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

    def pullback_all(cotangent: jax.Array) -> tuple[tuple, tuple]:
        (grads,) = vjp_fn(cotangent)
        return (tuple(per_position(grads, layer.calls, layer.d_out) for layer in plan.layers),
                tuple(per_position(grads, m.calls, m.features) for m in plan.norms))

    def norm_inputs(m: NormInfo) -> jax.Array:
        parts = [normalised(raw_inputs[slot[k]], m.spec).reshape(n, -1, m.features) for k in m.calls]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

    inputs = tuple(per_layer_inputs(layer) for layer in plan.layers)
    return Linearized(outputs=outputs, plan=plan, inputs=inputs, pullback=lambda c: pullback_all(c)[0],
                      norm_inputs=tuple(norm_inputs(m) for m in plan.norms), pullback_all=pullback_all)


class Captured(NamedTuple):
    """Result of :func:`capture`: ``outputs``, static ``plan``, per-layer ``inputs`` ``a`` and ``output_grads`` ``d``;
    with ``norms=True`` also per norm ``norm_inputs`` (``xhat``) and ``norm_output_grads``."""

    outputs: jax.Array
    plan: LayerPlan
    inputs: tuple
    output_grads: tuple
    norm_inputs: tuple = ()
    norm_output_grads: tuple = ()


def capture(fn: Callable[..., jax.Array], params: Any, *args: Any, cotangent: jax.Array | None = None,
            norms: bool = False) -> Captured:
    """Per-sample ``a_i`` and ``d_i = d fn(params, *args)_i / d z_i`` for every captured layer.

    One forward and one backward pass. ``fn`` returns one real score per
    sample, shape ``(n,)``; ``cotangent`` defaults to ones (every ``d_i`` at once).
    ``norms=True`` also captures LayerNorm / RMSNorm layers (K-FAC's diagonal blocks).
    """
    lin = linearize_layers(fn, params, *args, norms=norms)
    u = jnp.ones_like(lin.outputs) if cotangent is None else cotangent
    assert lin.pullback_all is not None  # linearize_layers always sets it
    layer_grads, norm_grads = lin.pullback_all(u)
    return Captured(lin.outputs, lin.plan, lin.inputs, layer_grads, lin.norm_inputs, norm_grads)


def augment_bias(a: jax.Array, has_bias: bool) -> jax.Array:
    """``a`` with a trailing column of ones when the layer has a bias (``[a, 1]``)."""
    if not has_bias:
        return a
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


def layer_block(leaves: Sequence[Any], layer: LayerInfo) -> jax.Array:
    """A layer's parameters (or any pytree like them, given as its leaves) as one ``(k, m)`` matrix.

    The kernel seen as ``(d_in, d_out)``, then the bias as a last row when the layer has
    one (``k = d_in + 1``): the block that multiplies :func:`augment_bias`'s inputs.
    """
    block = leaves[layer.kernel_index].reshape(layer.d_in, layer.d_out)
    if layer.bias_index is not None:
        block = jnp.concatenate([block, leaves[layer.bias_index].reshape(1, layer.d_out)], axis=0)
    return block


def put_layer_block(leaves: list, layer: LayerInfo, block: jax.Array, shapes: Sequence[tuple[int, ...]],
                    dtypes: Sequence[Any] | None = None) -> None:
    """Write a ``(k, m)`` :func:`layer_block` back into ``leaves`` (in place): its first ``d_in`` rows
    as the kernel, its last row as the bias, shaped ``shapes[i]`` (and cast to ``dtypes[i]``) of leaf ``i``."""
    parts = [(layer.kernel_index, block[:layer.d_in])]
    if layer.bias_index is not None:
        parts.append((layer.bias_index, block[layer.d_in]))
    for index, part in parts:
        part = part.reshape(shapes[index])
        leaves[index] = part if dtypes is None else part.astype(dtypes[index])


class CoverageRow(NamedTuple):
    """One parameter leaf in :func:`report`.

    Attributes:
      path: the leaf's path in ``params`` (``jax.tree_util.keystr``).
      shape: the leaf's shape.
      layer: the captured layer's module path, or ``None``.
      kind: the captured module's class (``"Dense"``, ``"Conv"``, ``"LayerNorm"``, ...), or
        ``None`` (not captured).
      role: ``"kernel"``, ``"scale"``, ``"bias"`` or ``None``.
      positions: ``T``, the positions per sample of the layer (``None`` if not captured).
      d_in, d_out: the layer's kernel as a ``(d_in, d_out)`` matrix (``None`` if not captured).
      treatment: what K-FAC and structured SR do with the leaf: Kronecker factors and
        layer statistics for a captured layer (explicit rows formed from the statistics
        where the layer's many positions make them cheaper); a diagonal block and rows
        from the captured statistics for a norm's scale and bias; the identity and
        per-sample rows (a per-sample backward pass) otherwise.
    """

    path: str
    shape: tuple[int, ...]
    layer: str | None
    kind: str | None
    role: str | None
    positions: int | None
    d_in: int | None
    d_out: int | None
    treatment: str


CAPTURED_TREATMENT = "kronecker factors (K-FAC) / layer statistics (structured SR; rows from them at many positions)"
UNCOVERED_TREATMENT = "identity (K-FAC) / explicit per-sample rows (structured SR)"
NORM_TREATMENT = "diagonal block (K-FAC) / rows from the captured statistics (structured SR)"
INACTIVE_TREATMENT = "not used by the model: zero update with SR's prune=True"


def report(fn: Callable[..., jax.Array], params: Any, *args: Any) -> tuple[CoverageRow, ...]:
    """What capture sees in ``fn(params, *args)``: one :class:`CoverageRow` per leaf of ``params``.

    An abstract trace (no computation), as :func:`discover_layers`. Print it with
    :func:`format_report`, e.g. ``print(fishr.capture.format_report(fishr.capture.report(
    model.apply, params, x)))``, to see which parameters K-FAC and structured SR cover.
    """
    plan = discover_layers(fn, params, *args, norms=True)
    paths = jax.tree_util.tree_leaves_with_path(params)
    inactive = jax.tree.leaves(inactive_leaves(lambda p, a: fn(p, *a), params, args))
    by_leaf: dict[int, tuple[Any, str]] = {}
    for layer in plan.layers:
        by_leaf[layer.kernel_index] = (layer, "kernel")
        if layer.bias_index is not None:
            by_leaf[layer.bias_index] = (layer, "bias")
    for norm in plan.norms:
        for index, role in ((norm.scale_index, "scale"), (norm.bias_index, "bias")):
            if index is not None:
                by_leaf[index] = (norm, role)
    rows = []
    for i, (path, leaf) in enumerate(paths):
        owner, role = by_leaf.get(i, (None, None))
        is_layer = isinstance(owner, LayerInfo)
        treatment = CAPTURED_TREATMENT if is_layer else NORM_TREATMENT if owner is not None else UNCOVERED_TREATMENT
        treatment = INACTIVE_TREATMENT if inactive[i] else treatment
        rows.append(CoverageRow(
            path=jax.tree_util.keystr(path), shape=tuple(jnp.shape(leaf)),
            layer=None if owner is None else owner.name, kind=None if owner is None else owner.kind, role=role,
            positions=None if owner is None else owner.positions, d_in=owner.d_in if is_layer else None,
            d_out=owner.d_out if is_layer else None, treatment=treatment,
        ))
    return tuple(rows)


def format_report(rows: tuple[CoverageRow, ...]) -> str:
    """A text table of :func:`report`'s rows and the share of parameters captured."""
    w = max([len("parameter")] + [len(r.path) for r in rows])
    lines = [f"{'parameter':<{w}} {'shape':<16} {'kind':<20} {'T':>5} {'d_in x d_out':>13}  treatment"]
    for r in rows:
        dims = f"{r.d_in} x {r.d_out}" if r.d_in is not None else "-"
        lines.append(f"{r.path:<{w}} {r.shape!s:<16} {(r.kind or '-') + ('/' + r.role if r.role else ''):<20} "
                     f"{r.positions if r.positions is not None else '-':>5} {dims:>13}  {r.treatment}")
    total = sum(math.prod(r.shape) for r in rows)
    covered = sum(math.prod(r.shape) for r in rows if r.kind is not None)
    lines.append(f"captured: {covered} of {total} parameters ({100.0 * covered / max(total, 1):.1f}%)")
    return "\n".join(lines)
