r"""The centred per-sample Jacobian ``Obar`` of the SR scores, in three representations.

Rows are indexed by ``(i, c)``: sample ``i`` of the batch and component ``c``
(``C = 1`` for a real ``log psi`` or a holomorphic one, ``C = 2`` for the real
and imaginary parts of a complex ``log psi`` of real parameters).
``Obar = O - mean_i O_i`` with the mean over the *global* batch (through
:mod:`fishr.distributed`). Every representation offers

* ``matvec(v) = Obar v`` for a parameter pytree ``v`` -> ``(n, C)``;
* ``rmatvec(u) = Obar^H u`` for ``u`` of shape ``(n, C)`` -> parameter pytree;
  equivalently ``O^H (u - mean_i u_i)``, so centring costs nothing extra;

and the two that hold the statistics of the whole batch also offer
``kernel_tiles()`` (the tiles of ``Obar Obar^H``, ``(n C) x (n C)``, on and below the
diagonal, for :func:`fishr.linalg.tiled_cholesky`), ``gram()`` (the whole kernel) and
``gather()``. Up to a few tile rows the tiles come from one block per tile column
(:class:`fishr.linalg.ColumnTiles`, the sample-space solve's), from one block mapped over the tile
pairs or from blocks unrolled at static starts (:func:`tiled_kernel`), beyond from a
``lax.fori_loop`` over the tile pairs, so the compiled program does not grow with ``n``.

:class:`LinearizedJacobian`
    ``jax.linearize`` of the batched scores and its transpose (no Jacobian is
    formed; ``matvec``/``rmatvec`` cost one JVP / one transposed JVP).
:class:`DenseJacobian`
    the explicit rows ``(n, C, P)`` from ``vmap`` of a per-sample ``jacrev``.
:class:`LayerJacobian`
    exact, from captured layer statistics (:mod:`fishr.capture`). For a
    dense layer ``z = a W (+ b)`` applied at positions ``t`` the per-sample
    gradient is ``G_ic = sum_t a_it^T d_ict`` (``a`` with a trailing 1 for the
    bias, ``d_ict = d score_ic / d z_it``), so

    * ``(O v)_ic = sum_t a_it V d_ict^T``          (``V`` the layer's block of ``v``),
    * ``O^H u = sum_ict conj(a_it)^T conj(d_ict) u_ic``,
    * ``(O O^H)_{ic,jc'} = sum_{t,s} (a_it . conj a_js)(d_ict . conj d_jc's)``,

    i.e. per layer two Gram matrices and a Hadamard product, never the
    ``n x P`` Jacobian. Parameters in no captured layer keep explicit rows
    (:class:`DenseJacobian` restricted to them), which are centred before their Gram
    matrix is formed. The layers' kernel is centred as ``H K H`` with
    ``H = I - 1 1^T / n`` acting on the sample index, applied through the row means
    of ``K`` (see ``_centre_block``); that subtraction cancels digits when the
    mean score is large next to its spread, so the kernel serves as the
    preconditioner of a solve whose products are exact (``fishr._sample_space``).

    Per layer, :meth:`LayerJacobian.build` takes the cheaper of the structured
    kernel, ``n^2 T^2 (k + C^2 m)`` multiply-adds, and the generic one through
    the per-sample gradients ``G`` (``n C T k m`` to form them plus
    ``(n C)^2 k m``), with ``k = d_in (+1)``, ``m = d_out``, ``T`` positions
    (for ``T = 1`` the structured kernel always wins): a layer where ``G`` is cheaper
    (a transformer's, at many positions) becomes explicit rows ``G`` formed from its
    statistics, centred exactly like the uncovered parameters' rows, with no per-sample
    backward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fishr import distributed, linalg
from fishr.capture import LayerPlan, augment_bias, layer_block, linearize_layers, put_layer_block
from fishr.chunking import map_chunks, sum_chunks
from fishr.distributed import AxisName

__all__ = ["ChunkedLinearizedJacobian", "DenseJacobian", "LayerJacobian", "LinearizedJacobian", "ScaledJacobian",
           "ShardedRowsJacobian", "kernel_cost_per_pair",
           "kernel_from_tiles", "layer_kernel_is_structured", "layers_pay_off", "tiled_kernel"]


def _centre(u: jax.Array, axis_name: AxisName, mean_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """``u - mean_i u_i``: the global batch mean, or a caller's ``mean_fn`` (see :func:`fishr.sr_solve`)."""
    if mean_fn is None:
        return u - distributed.batch_mean(u, axis_name)
    mean = mean_fn(u)
    if jnp.shape(mean) not in (u.shape[1:], (1,) + u.shape[1:]):
        raise ValueError(
            f"fishr.sr_solve: `mean_fn` must average over the batch axis 0, mapping shape {u.shape} to "
            f"{u.shape[1:]}; it returned shape {jnp.shape(mean)}."
        )
    return u - mean


def _centre_block(k4: jax.Array, r_i: jax.Array, r_j: jax.Array, s: jax.Array) -> jax.Array:
    """A block of ``H K H`` for ``K = O O^H``, ``H`` centring over the sample index.

    ``k4[i, c, j, c']`` is the block of ``K`` for samples ``i`` in one range and ``j``
    in another, ``r[i, c, c'] = O_ic . conj(mean_j O_jc')`` are ``K``'s row means
    (``r_i``, ``r_j`` their rows for the two ranges) and ``s[c, c'] = mean_i r[i, c, c']``:

        (H K H)[ic, jc'] = K[ic, jc'] - r[i, c, c'] - conj(r[j, c', c]) + s[c, c'],

    one elementwise pass that XLA fuses with the kernel's sum of products, instead
    of two reductions over ``K`` and two passes to subtract them.
    """
    row = r_i[:, :, None, :]                                     # [i, c, ., c']
    col = jnp.conj(jnp.transpose(r_j, (2, 0, 1)))[None]          # [., c, j, c'] = conj(r[j, c', c])
    return k4 - row - col + s[None, :, None, :]


def _single(dtype) -> Any:
    """The single-precision dtype of ``dtype``'s kind (complex64 or float32)."""
    return jnp.complex64 if jnp.issubdtype(dtype, jnp.complexfloating) else jnp.float32


UNROLL_KERNEL_MAX_TILES = 4  # tiled_kernel maps its block over the tile pairs up to this many tile rows, loops beyond
# tiled_kernel maps its few blocks while the slabs the mapped block gathers (two per tile pair) fit in this
# many bytes, unrolls them beyond (see its row_bytes; measured on the 2-core benchmark CPU)
MAPPED_MAX_BYTES = 16 * 2**20
# explicit rows alone (the generic Jacobian): their blocks are single products, cheap to compile, and
# unrolled up to this many tile rows (N <= 8,192 with linalg.tile_size): 1.10x faster than the loop at
# N = 2,048, P = 5,313 (float32, 481 against 531 ms, compile 2.9 against 3.0 s)
UNROLL_ROWS_MAX_TILES = 8


def tiled_kernel(n: int, c: int, dtype: Any, make_block: Callable[[int, int], Callable[...,
                 jax.Array]], ts: int | None = None, map_blocks: bool = True,
                 max_unrolled: int | None = None, row_bytes: int = 0,
                 columns: bool = False) -> linalg.Tiles:
    """The tiles ``(nb, nb, ts, ts)`` on and below the diagonal of an ``(n C) x (n C)`` kernel.

    ``make_block(m, n_pad)`` prepares the statistics padded with zero rows to ``n_pad``
    samples (once, outside the loop) and returns ``block(i0, j0)``, the kernel's
    ``(m C) x (m C)`` block for samples ``i0 .. i0 + m`` and ``j0 .. j0 + m`` (dynamic
    starts), and ``block(i0, j0, mi, mj)`` for ``mi`` and ``mj`` samples (static starts; only
    with ``columns``).

    ``columns=True``: up to ``max_unrolled`` (default ``UNROLL_KERNEL_MAX_TILES`` = 4) tile rows the
    tiles come as :class:`fishr.linalg.ColumnTiles`, one block per tile column ``j``, samples
    ``j m ..`` against the ``m`` samples of tile ``j``: ``nb`` products per factor of the block (where
    mapped or unrolled tiles take ``nb (nb + 1) / 2``), whose row-major results are the column's
    tiles without a copy, and no ``(nb, nb, ts, ts)`` array with its zero tiles to fill. Measured
    (float32 structured sample-space update, 2-core CPU, 2026-12-05, interleaved in one process,
    median of 100-300 calls; mapped or unrolled tiles -> columns): MLP 16-64-64-1 at ``N = 1,024``
    from ``g``, against 0.1.0's unrolled tiles, jax 0.10.2 1.24x (mapped; 1.10x unrolled) -> 1.03x,
    jax 0.9.1 1.08x -> 1.00x; with local energies 5.87 -> 5.09 ms (0.10.2) and 5.82 -> 5.49 ms
    (0.9.1); float64 16.67 against 17.88 ms (0.10.2), level (0.9.1); ``N = 512`` 0.89x (0.10.2),
    level (0.9.1); RBM ``alpha = 4``, ``N = 1,024`` 0.93x / 0.90x; MLP 32-200-200-1 (unrolled
    before) 0.95x / 0.96x. Its price is program size where the block was mapped: the first call in
    fresh processes (jax 0.10.2) compiles 0.96-1.11 -> 1.11-1.14 s (MLP 16-64-64-1), 0.85-0.90 ->
    1.01-1.08 s (RBM, with local energies), repaid after 150-600 steps; where the block was
    unrolled it compiles less (1.21 -> 1.11-1.20 s, and its first run 0.13 -> 0.10 s). Beyond 4 tile
    rows columns measured no faster (``N = 2,048``: 34.8 against 35.0 ms, 0.36 s more compile;
    4,096: 1.15x slower), and for explicit rows neither (``N = 1,024`` / 2,048, ``P = 5,313``:
    1.05x / 1.08x slower, for 0.3 s less compile): there the tiles come as without ``columns``.

    Up to ``UNROLL_KERNEL_MAX_TILES`` = 4 tile rows the block is mapped
    (``jax.vmap``) over the ``nb (nb + 1) / 2`` lower tile pairs at once: batched products that
    run on every core, compiled once; beyond, the blocks are filled in one ``lax.fori_loop``
    over the tile pairs: a compiled program of one block's size whatever ``n``. Measured on
    the 2-core CPU (float32 sample-space update with local energies, interleaved in one
    process, 2026-12-04): at ``n = 1,024`` (4 tile rows) the loop made the warm call
    1.17-1.27x slower, the mapped block 1.00-1.01x (against each block unrolled, which
    compiled 10 copies); at ``n = 2,048`` (8 tile rows) the loop changed the warm call by
    0.98-1.03x against unrolled blocks (and took 1.5-2.2 s off a 3.6-4.3 s compile), the
    mapped block 1.06x against the loop. ``map_blocks=False`` unrolls the few blocks
    instead, each at static starts: for explicit rows (``N x P``, ``P`` large) the mapped
    block gathers every pair's two ``m x P`` row slabs into copies before its batched
    product, and the float32 sample-space call at ``N = 1,024``, ``P = 5,313`` ran 1.5x
    slower mapped (204-207 against 131-141 ms), and the structured call of a ViT whose
    layers are all kept as explicit rows (``N = 1,024``, ``P = 17,345``) 1.29x (607 against
    471 ms, jax 0.9.1). A block of narrow layers' statistics is small, and mapped it compiles
    once; with ``row_bytes`` (the bytes of one sample's statistics that a block reads) the
    block is mapped only while the slabs it gathers, ``nb (nb + 1) m row_bytes`` bytes, fit in
    ``MAPPED_MAX_BYTES`` (16 MiB). Measured (float32 structured sample-space call, MLP
    ``k``-``w``-``w``-1, ``N = 1,024``, 10 tile pairs, jax 0.9.1, warm / first call, fresh
    processes alternating): mapped at ``w = 64`` (gathered slabs 5.7 MB) 16.6 ms / 2.2 s
    against 17.0 ms / 2.5-2.7 s unrolled (in row slabs, one block per tile row), ``w = 128``
    (10.9 MB) 22.4 / 2.2-2.3 against 24.1 / 2.7, ``w = 192`` (16.5 MB) 29.6 / 2.2 against
    31.2 / 2.9; at ``w = 200`` (``P = 47,001``, 17.1 MB) mapped 43-45 ms / 2.2-2.3 s against
    29-33 ms / 2.6-2.9 s unrolled by tiles (30-33 ms in row slabs, 47-52 ms as one whole
    square block), ``w = 208`` (17.8 MB) 45.0 against 36.8 ms, ``w = 256`` (21.4 MB) 50.7
    against 42.9 ms (row slabs): the mapped block falls off a cliff between 16.5 and 17.1 MB of
    gathered slabs (the CPU's L3 is 32 MiB; the cause is not established). An RBM of 16 sites,
    ``alpha = 16`` (6 MB), mapped 14.7-15.8 ms / 1.8-1.9 s against 14.8-22.4 ms / 2.2-2.6 s
    unrolled. Row slabs were not kept: for explicit rows the tiles are the faster (``N = 2,048``,
    ``P = 5,313``, kernel alone: 171 against 213 ms), for layers they are level.
    ``max_unrolled`` (default ``UNROLL_KERNEL_MAX_TILES``) moves the limit between the few
    blocks and the loop. The padded rows get 1 on the diagonal (and 0 elsewhere), so a solve
    with the padded matrix leaves the real rows' solution as it is. ``ts`` defaults to :func:`fishr.linalg.tile_size`
    (rounded up to a multiple of ``C``).
    """
    rows = n * c
    if ts is None:
        ts = linalg.tile_size(rows)
    ts = -(-ts // c) * c
    m = ts // c
    nb = -(-rows // ts)
    block = make_block(m, nb * m)
    few = nb <= (UNROLL_KERNEL_MAX_TILES if max_unrolled is None else max_unrolled)
    # the padded rows (fewer than ts) lie in the last tile: 1 on their diagonal there, nothing elsewhere
    padded = np.arange(nb * ts)[-ts:] >= rows
    pad_tile = jnp.asarray(np.diag(padded.astype(float)), dtype) if padded.any() else None
    if columns and few:
        cols = [block(j * m, j * m, (nb - j) * m, m).astype(dtype).reshape(nb - j, ts, ts) for j in range(nb)]
        if pad_tile is not None:
            cols[-1] = cols[-1] + pad_tile
        return linalg.ColumnTiles(tuple(cols))
    map_blocks = map_blocks and nb * (nb + 1) * m * row_bytes <= MAPPED_MAX_BYTES  # gathered slabs, bytes
    if nb == 1:
        tiles = block(0, 0).astype(dtype)[None, None]
    elif few and not map_blocks:  # few tiles: each block at its static starts
        zero = jnp.zeros((ts, ts), dtype)
        tiles = jnp.stack([jnp.stack([block(i * m, j * m).astype(dtype) if j <= i else zero for j in range(nb)])
                           for i in range(nb)])
    elif few:  # few tiles: one block mapped over the lower tile pairs at once
        lower = np.asarray([(i, j) for i in range(nb) for j in range(i + 1)])
        blocks = jax.vmap(lambda i, j: block(i * m, j * m).astype(dtype))(jnp.asarray(lower[:, 0]),
                                                                           jnp.asarray(lower[:, 1]))
        tiles = jnp.zeros((nb, nb, ts, ts), dtype).at[lower[:, 0], lower[:, 1]].set(blocks)
    else:
        tiles = jnp.zeros((nb, nb, ts, ts), dtype)

        def fill(p, tiles):
            i, j = linalg.lower_pair(p)
            return tiles.at[i, j].set(block(i * m, j * m).astype(dtype))

        tiles = jax.lax.fori_loop(0, nb * (nb + 1) // 2, fill, tiles)
    if pad_tile is not None:
        tiles = tiles.at[nb - 1, nb - 1].add(pad_tile)
    return tiles


def _slicer(x: jax.Array, n_pad: int) -> Callable[[Any, int], jax.Array]:
    """``(i0, size) -> x_padded[i0 : i0 + size]`` for ``x`` padded with zero rows to ``n_pad`` (padded
    once); a static ``i0`` slices, a traced one is a dynamic slice."""
    padded = jnp.pad(x, [(0, n_pad - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    return lambda i0, size: (padded[i0:i0 + size] if isinstance(i0, int)
                             else jax.lax.dynamic_slice_in_dim(padded, i0, size, axis=0))


def kernel_from_tiles(tiles: linalg.Tiles, rows: int) -> jax.Array:
    """The whole ``rows x rows`` Hermitian kernel from its lower tiles (padding removed)."""
    return linalg.hermitian_from_lower_tiles(linalg.tile_array(tiles))[:rows, :rows]


# --------------------------------------------------------------------------- linearised


class LinearizedJacobian:
    """``Obar`` through ``jax.linearize(scores, params)`` and its transpose (never formed)."""

    def __init__(self, scores: Callable[[Any], jax.Array], params: Any, holomorphic: bool, axis_name: AxisName,
                 mean_fn: Callable[[jax.Array], jax.Array] | None = None):
        _, self._jvp = jax.linearize(scores, params)
        self._transpose = jax.linear_transpose(self._jvp, params)
        self._holomorphic = holomorphic
        self._axis_name = axis_name
        self._mean_fn = mean_fn

    def matvec(self, v: Any) -> jax.Array:
        return _centre(self._jvp(v), self._axis_name, self._mean_fn)

    def rmatvec(self, u: jax.Array) -> Any:
        u = _centre(u, self._axis_name, self._mean_fn)
        if self._holomorphic:  # O^H u = conj(O^T conj(u)); JAX transposes without conjugation
            (w,) = self._transpose(u.conj())
            return jax.tree.map(jnp.conj, w)
        (w,) = self._transpose(u)
        return w


class ChunkedLinearizedJacobian:
    """``Obar`` by a JVP / VJP of ``scores(params, chunk)`` over chunks of the batch (:mod:`fishr.chunking`).

    Nothing of the whole batch is kept between products: each product runs the forward
    pass again, chunk by chunk, so peak memory is one chunk's linearisation (NetKet's
    ``chunk_size`` trade: about twice the arithmetic of :class:`LinearizedJacobian` per
    product, memory independent of the batch).
    """

    def __init__(self, scores: Callable[[Any, Any], jax.Array], params: Any, batch: Any, chunk_size: int,
                 holomorphic: bool, axis_name: AxisName, mean_fn: Callable[[jax.Array], jax.Array] | None = None):
        self._scores, self._params, self._batch, self._chunk_size = scores, params, batch, chunk_size
        self._holomorphic = holomorphic
        self._axis_name = axis_name
        self._mean_fn = mean_fn

    def matvec(self, v: Any) -> jax.Array:
        jvp = lambda xs: jax.jvp(lambda p: self._scores(p, xs), (self._params,), (v,))[1]
        return _centre(map_chunks(jvp, self._batch, self._chunk_size), self._axis_name, self._mean_fn)

    def rmatvec(self, u: jax.Array) -> Any:
        u = _centre(u, self._axis_name, self._mean_fn)
        if self._holomorphic:  # O^H u = conj(O^T conj(u)); JAX's VJP does not conjugate
            u = u.conj()

        def vjp(xs, us):
            out, pullback = jax.vjp(lambda p: self._scores(p, xs), self._params)
            return pullback(us.astype(out.dtype))[0]

        w = sum_chunks(vjp, self._batch, u, self._chunk_size)
        return jax.tree.map(jnp.conj, w) if self._holomorphic else w


class ScaledJacobian:
    """``Obar diag(scale)`` for a Jacobian with ``matvec`` / ``rmatvec`` (the reparametrisation
    ``theta = scale * theta~``; ``scale`` a real pytree like the parameters)."""

    def __init__(self, jac: Any, scale: Any):
        self._jac, self._scale = jac, scale

    def matvec(self, v: Any) -> jax.Array:
        return self._jac.matvec(jax.tree.map(lambda s, x: s.astype(x.dtype) * x, self._scale, v))

    def rmatvec(self, u: jax.Array) -> Any:
        return jax.tree.map(lambda s, x: s.astype(x.dtype) * x, self._scale, self._jac.rmatvec(u))


# --------------------------------------------------------------------------- dense rows


def _flat_rows(rows: jax.Array) -> jax.Array:
    """Rows ``(n, C, P)`` as the ``(n C) x P`` matrix they are."""
    return rows.reshape(rows.shape[0] * rows.shape[1], rows.shape[-1])


def _rows_matvec(flat: jax.Array, c: int, v: jax.Array) -> jax.Array:
    """``Obar v`` for flat rows ``(n C, P)`` and a flat ``v`` ``(P,)`` -> ``(n, C)``."""
    return (flat @ v).reshape(-1, c)


def _rows_rmatvec(flat: jax.Array, u: jax.Array) -> jax.Array:
    """``Obar^H u`` for flat rows ``(n C, P)`` and ``u`` ``(n, C)`` -> ``(P,)``.

    Written ``conj(conj(u) @ Obar)``: the large operand is neither transposed nor
    conjugated (inside a CG loop, ``einsum('ncp,nc->p')`` and an elementwise ``conj`` of the
    rows were fused into a loop-emitted product that ran ~3-10x below memory bandwidth
    on the CPU).
    """
    return jnp.conj(jnp.conj(u.reshape(-1)) @ flat)


def _rows_gram(rows: jax.Array, other: jax.Array | None = None) -> jax.Array:
    """``rows other^H`` (``other`` defaults to ``rows``), ``(n C) x (n' C)``."""
    return _flat_rows(rows) @ _flat_rows(rows if other is None else other).conj().T


def per_sample_rows(one_sample: Callable[[Any, Any], jax.Array], params: Any, samples: Any, holomorphic: bool,
                    chunk_size: int | None = None):
    """Rows ``(n, C, P)`` of ``d one_sample(params, x_i) / d params`` in ``ravel_pytree`` order.

    ``one_sample(params, x) -> (C,)``; ``vmap`` over samples of its reverse-mode
    Jacobian, taken on the parameter pytree, ``chunk_size`` samples at a time
    (:func:`fishr.chunking.map_chunks`; the rows themselves are ``n x C x P`` either way).
    """
    flat, _ = ravel_pytree(params)
    per_chunk = jax.vmap(jax.jacrev(one_sample, holomorphic=holomorphic), in_axes=(None, 0))
    jac_tree = map_chunks(lambda xs: per_chunk(params, xs), samples, chunk_size)
    leaves = jax.tree.leaves(jac_tree)  # each (n, C, *leaf_shape)
    if not leaves:
        n = jax.tree.leaves(samples)[0].shape[0]
        return jnp.zeros((n, 1, 0), flat.dtype)
    n, c = leaves[0].shape[:2]
    return jnp.concatenate([leaf.reshape(n, c, -1).astype(flat.dtype) for leaf in leaves], axis=-1)


class DenseJacobian(NamedTuple):
    """Explicit centred rows, held flat as the ``(n C) x P`` matrix they are.

    ``flat_rows`` is stored 2-D on purpose: a product inside a CG loop whose operand is
    reshaped from ``(n, C, P)`` in the loop body is fused by XLA's CPU backend into a
    loop-emitted product about 3x slower than the library matrix-vector product (50 CG
    steps on an RBM with N = 256, P = 4,368: 18 ms against 7 ms); ``rows`` is the
    ``(n, C, P)`` view for code outside such loops. ``unravel`` maps a flat ``P`` vector to the
    pytree.
    """

    flat_rows: jax.Array
    components: int
    unravel: Callable[[jax.Array], Any]
    axis_name: AxisName = None

    @classmethod
    def of_rows(cls, rows: jax.Array, unravel: Callable[[jax.Array], Any], axis_name: AxisName = None
                ) -> DenseJacobian:
        """From centred rows ``(n, C, P)``."""
        return cls(_flat_rows(rows), rows.shape[1], unravel, axis_name)

    @classmethod
    def build(cls, one_sample, params, samples, holomorphic, axis_name, mean_fn=None,
              row_clip: float | None = None, chunk_size: int | None = None) -> DenseJacobian:
        """The centred rows; with ``row_clip = c`` each raw row is first scaled by
        ``min(1, c / a_i)``, ``a_i = mean_p |O_ip|`` (JaQMC's score clipping), then centred."""
        rows = per_sample_rows(one_sample, params, samples, holomorphic, chunk_size)
        if row_clip is not None:
            size = jnp.mean(jnp.abs(rows), axis=(1, 2), keepdims=True)
            rows = rows * jnp.minimum(1.0, row_clip / jnp.maximum(size, jnp.finfo(size.dtype).tiny)).astype(rows.dtype)
        return cls.of_rows(_centre(rows, axis_name, mean_fn), ravel_pytree(params)[1], axis_name)

    @property
    def rows(self) -> jax.Array:
        """The centred rows ``(n, C, P)`` (a view of ``flat_rows``)."""
        return self.flat_rows.reshape(-1, self.components, self.flat_rows.shape[-1])

    @property
    def rows_shape(self) -> tuple[int, int]:
        """``(n, C)``: the samples and score components of these rows."""
        return self.flat_rows.shape[0] // self.components, self.components

    def matvec_flat(self, v: jax.Array) -> jax.Array:
        return _rows_matvec(self.flat_rows, self.components, v)

    def rmatvec_flat(self, u: jax.Array) -> jax.Array:
        return _rows_rmatvec(self.flat_rows, u)  # rows are centred already

    def matvec(self, v: Any) -> jax.Array:
        return self.matvec_flat(ravel_pytree(v)[0])

    def rmatvec(self, u: jax.Array) -> Any:
        return self.unravel(self.rmatvec_flat(u))

    def kernel_tiles(self, ts: int | None = None, compact: bool = False, columns: bool = False) -> linalg.Tiles:
        """The tiles of ``Obar Obar^H`` on and below the diagonal (:func:`tiled_kernel`).

        ``compact`` (program size before speed, for a rare path) changes nothing here: each
        block is one product already; nor does ``columns`` (an array of tiles either way)."""
        n, c = self.rows_shape
        rows = self.rows

        def make_block(m, n_pad):
            take = _slicer(rows, n_pad)
            return lambda i0, j0: _rows_gram(take(i0, m), take(j0, m))

        # m x P slabs, one product per block: unrolled (no gathered copies), up to 8 tile rows
        return tiled_kernel(n, c, rows.dtype, make_block, ts, map_blocks=False, max_unrolled=UNROLL_ROWS_MAX_TILES)

    def gram(self) -> jax.Array:
        """``Obar Obar^H``, ``(n C) x (n C)``."""
        n, c = self.rows_shape
        return kernel_from_tiles(self.kernel_tiles(), n * c)

    def single_precision(self) -> DenseJacobian:
        """The same rows rounded to single precision (for a preconditioning factor)."""
        return self._replace(flat_rows=self.flat_rows.astype(_single(self.flat_rows.dtype)))

    def gather(self) -> Any:
        """What a sample-space solve over all devices needs: without devices ``self``, else a
        :class:`ShardedRowsJacobian` that keeps the local rows and gathers only kernel blocks."""
        if distributed.device_count(self.axis_name) == 1:
            return self._replace(axis_name=None)
        return ShardedRowsJacobian(self.flat_rows, self.components, self.unravel, self.axis_name)

    def score_variance(self) -> jax.Array:
        """``diag S = mean_i sum_c |Obar_icp|^2`` over all samples (flat ``(P,)``, real)."""
        return distributed.batch_mean(jnp.sum(jnp.abs(self.rows) ** 2, axis=1), self.axis_name)

    def scaled_samples(self, factor: jax.Array) -> DenseJacobian:
        """Each sample's rows times ``factor[i]`` (``(n,)``; sample weights enter as ``sqrt(w_i)``)."""
        per_row = jnp.repeat(factor.astype(self.flat_rows.dtype), self.components)
        return self._replace(flat_rows=self.flat_rows * per_row[:, None])

    def scaled(self, scale: Any) -> DenseJacobian:
        """The Jacobian of the reparametrisation ``theta = scale * theta~``: columns times ``scale`` (a pytree)."""
        return self._replace(flat_rows=self.flat_rows * ravel_pytree(scale)[0].astype(self.flat_rows.dtype))


GATHER_ELEMENTS = 1 << 24  # entries of one gathered column slab of the rows (64 MiB in float32)


class ShardedRowsJacobian(NamedTuple):
    """``Obar`` over all devices from each device's own centred rows, never gathered whole.

    For sample-space solves: products and the kernel are those of the global ``(N C) x P``
    matrix whose rows device ``k`` holds for samples ``k n_loc ... (k + 1) n_loc - 1``:

    * ``matvec(v)``: the local ``Obar_k v``, gathered (``N x C``);
    * ``rmatvec(u)``: ``sum_k Obar_k^H u_k`` (``psum``) for a global ``u`` (``N x C``);
    * the kernel: each device forms its block row ``Obar_k Obar^H`` from column slabs of
      ``Obar`` gathered ``GATHER_ELEMENTS`` entries at a time (so a device never holds
      ``N x P`` rows, and computes ``1 / D`` of the kernel), then the block rows are
      gathered (the ``(N C) x (N C)`` kernel that every device factors).
    """

    flat_rows: jax.Array
    components: int
    unravel: Callable[[jax.Array], Any]
    axis_name: AxisName

    @property
    def rows_shape(self) -> tuple[int, int]:
        """``(N, C)``: all devices' samples and the score components."""
        n_local = self.flat_rows.shape[0] // self.components
        return n_local * distributed.device_count(self.axis_name), self.components

    def matvec_flat(self, v: jax.Array) -> jax.Array:
        return distributed.all_gather_batch(_rows_matvec(self.flat_rows, self.components, v), self.axis_name)

    def rmatvec_flat(self, u: jax.Array) -> jax.Array:
        n_local = self.flat_rows.shape[0] // self.components
        own = jax.lax.dynamic_slice_in_dim(u, distributed.device_index(self.axis_name) * n_local, n_local, axis=0)
        return distributed.psum(_rows_rmatvec(self.flat_rows, own), self.axis_name)

    def matvec(self, v: Any) -> jax.Array:
        return self.matvec_flat(ravel_pytree(v)[0])

    def rmatvec(self, u: jax.Array) -> Any:
        return self.unravel(self.rmatvec_flat(u))

    def gram(self) -> jax.Array:
        """``Obar Obar^H``, ``(N C) x (N C)``, the same on every device."""
        local = self.flat_rows
        rows, num_params = local.shape
        width = max(1, min(num_params, GATHER_ELEMENTS // (rows * distributed.device_count(self.axis_name))))
        full = num_params // width

        def slab(p0, size):
            cols = jax.lax.dynamic_slice_in_dim(local, p0, size, axis=1)
            return cols @ distributed.all_gather_batch(cols, self.axis_name).conj().T

        block_row = jax.lax.fori_loop(0, full, lambda k, acc: acc + slab(k * width, width),
                                      jnp.zeros((rows, rows * distributed.device_count(self.axis_name)),
                                                local.dtype))
        if num_params > full * width:
            block_row = block_row + slab(full * width, num_params - full * width)
        return distributed.all_gather_batch(block_row, self.axis_name)

    def kernel_tiles(self, ts: int | None = None, compact: bool = False, columns: bool = False) -> linalg.Tiles:
        """The tiles of :meth:`gram` on and below the diagonal (:func:`tiled_kernel`; ``compact`` and
        ``columns`` change nothing: the blocks are slices of the assembled kernel)."""
        n, c = self.rows_shape
        kernel = self.gram()

        def make_block(m, n_pad):
            padded = jnp.pad(kernel, [(0, (n_pad - n) * c)] * 2)
            return lambda i0, j0: jax.lax.dynamic_slice(padded, (i0 * c, j0 * c), (m * c, m * c))

        return tiled_kernel(n, c, self.flat_rows.dtype, make_block, ts)

    def single_precision(self) -> ShardedRowsJacobian:
        """The same rows rounded to single precision (for a preconditioning factor)."""
        return self._replace(flat_rows=self.flat_rows.astype(_single(self.flat_rows.dtype)))

    def gather(self) -> ShardedRowsJacobian:
        return self


# --------------------------------------------------------------------------- captured layers


def _uncentred_layer_block(kind: str, xi: jax.Array, xj: jax.Array, yi: jax.Array, yj: jax.Array,
                           c: int) -> jax.Array:
    """One layer's ``(O O^H)[ic, jc']`` for two sample ranges, shape ``(m_i, C, m_j, C)``.

    ``"gram-hadamard"`` (``T = 1``): ``(a_i . conj a_j)(d_ic . conj d_jc')``;
    ``"positions"``: ``sum_{t,s} (a_it . conj a_js)(d_ict . conj d_jc's)``.
    """
    mi, mj = xi.shape[0], xj.shape[0]
    if kind == "gram-hadamard":
        ka = xi @ xj.conj().T
        return ka[:, None, :, None] * _rows_gram(yi, yj).reshape(mi, c, mj, c)
    ka = jnp.einsum("itk,jsk->itjs", xi, xj.conj())
    kd = jnp.einsum("ictm,jesm->icjets", yi, yj.conj())
    return jnp.einsum("itjs,icjets->icje", ka, kd)


def layer_kernel_is_structured(n: int, c: int, positions: int, k: int, m: int) -> bool:
    """Whether the Gram-Hadamard kernel of one layer is cheaper than the generic ``G G^H``."""
    structured = n * n * positions * positions * (k + c * c * m)
    generic = n * c * positions * k * m + (n * c) ** 2 * k * m
    return structured <= generic


def layer_folds(use: str, n: int, c: int, positions: int, k: int, m: int) -> bool:
    """Whether a layer at ``positions > 1`` is held as explicit rows ``G_ic = sum_t a_it^T d_ict``
    (``C k m`` entries per sample) instead of its statistics (``T (k + C m)``).

    ``use="kernel"`` (the sample-space kernel): where its Gram-Hadamard kernel costs more
    than ``G G^H`` (:func:`layer_kernel_is_structured`). ``use="products"`` (lazy mode, the
    products alone): the rows' products cost ``C k m`` per sample against the statistics'
    ``T k m``, so fold where ``C < T`` and the rows take at most twice the statistics'
    memory, which keeps lazy mode's memory that of the activations, not ``N P``. Measured on
    the vision transformer of ``benchmarks/vit.py`` (``N = 256``, ``P = 17,345``, float32,
    50 CG steps, 2-core CPU, jax 0.10.2; its layers at 16 positions, ``k m`` up to 65 x 32, whose
    rows take 0.03-0.68x their statistics' memory): every layer folded 34-44 ms, none folded
    168 ms, the model's linearisation (``jacobian="generic"``) 444-641 ms.
    """
    if use not in ("kernel", "products"):
        raise ValueError(f"layer_folds: `use` (LayerJacobian.build's `fold_for`) must be 'kernel' or 'products', "
                         f"got {use!r}.")
    if positions == 1:
        return False
    if use == "products":
        return c < positions and c * k * m <= 2 * positions * (k + c * m)
    return not layer_kernel_is_structured(n, c, positions, k, m)


def kernel_cost_per_pair(plan: LayerPlan | None, num_params: int, c: int = 1) -> int:
    """Multiply-adds per pair of samples of the sample-space kernel ``Obar Obar^H``.

    Generic rows: ``C^2 P``. From the captured layers of ``plan``: per layer the cheaper
    form of :func:`layer_kernel_is_structured` (``T^2 (k + C^2 m)`` or ``C^2 k m``),
    plus ``C^2 P_rest`` for the uncovered parameters; ``None`` (or no layer) is the
    generic count.
    """
    if plan is None or not plan.layers:
        return c * c * num_params
    covered, cost = 0, 0
    for layer in plan.layers:
        k, m, t = layer.d_in + int(layer.has_bias), layer.d_out, layer.positions
        covered += k * m
        cost += min(t * t * (k + c * c * m), c * c * k * m)
    return cost + c * c * max(num_params - covered, 0)


def layers_pay_off(plan: LayerPlan, num_params: int, c: int = 1) -> bool:
    """Whether the layer statistics beat explicit per-sample rows: ``jacobian="auto"``'s rule.

    Either the captured layers make the sample-space kernel at least twice cheaper than
    ``G G^H`` (:func:`kernel_cost_per_pair` with and without the layers; both scale as
    ``n^2``, so this does not depend on ``n``: Dense networks, RBMs), or the capture covers
    every parameter (``plan.uncovered`` empty; ``plan`` discovered with ``norms=True``) with
    no convolution, so that no per-sample backward pass runs: the rows of dense layers at
    many positions and of the norms' scales and biases then come from the one forward and
    ``C`` backward passes of the capture. A transformer over patches is that case (its
    kernel costs the same either way): on the vision transformer of ``benchmarks/vit.py``
    (``N = 256``, P = 17,345, 2-core CPU, median of 21 interleaved calls, 2026-12-04) the
    structured update took 0.82x the generic one's time on jax 0.10.2 (float32 and float64)
    and 0.83-0.84x in float64 on jax 0.9.1; 1.03-1.11x in float32 there (about the spread).
    Convolutions are left out: their rows from the capture go through the input patches
    (``T k`` entries per sample), where the per-sample passes use the convolution itself (a
    CNN of two 3x3 convolutions of 16 channels on 8x8 spins, ``N = 512``: structured
    1.54-1.76x the generic time). A capture that leaves parameters uncovered and does not
    halve the kernel gains nothing: the uncovered rows need the per-sample passes anyway.
    """
    if not plan.layers:
        return False
    if 2 * kernel_cost_per_pair(plan, num_params, c) <= kernel_cost_per_pair(None, num_params, c):
        return True
    return layers_cover_model(plan)


def layers_cover_model(plan: LayerPlan) -> bool:
    """Whether the capture covers every parameter (``plan`` discovered with ``norms=True``) with no
    convolution: the Jacobian's products then come from the layers' statistics alone.

    ``jacobian="auto"``'s rule for ``mode="lazy"``: there each CG product is ``O v`` and
    ``O^H u`` from the statistics (per layer two matrix products of the linearisation's size)
    in place of the model's JVP and transposed JVP, which also run the model's elementwise
    code and, in a transformer, the attention products. Measured (2-core CPU, 50 CG steps,
    interleaved medians, float32 / float64, jax 0.10.2, 2026-12-05; generic -> structured):
    the vision transformer of ``benchmarks/vit.py`` (``N = 256``, ``P = 17,345``) 641 -> 44 /
    849 -> 84 ms; MLP 16-64-64-64-1 (``N = 1,024``) 22.3 -> 15.9 / 51.3 -> 43.1 ms; RBM
    ``alpha = 2`` (``N = 1,024``) 0.87-0.92x / 0.74x; see the CHANGELOG for the RBMs and
    the complex MLP of ``benchmarks/sr_timing.py``. Convolutions are left out (their
    statistics are the input patches, ``T k`` entries per sample), and so is a capture that
    leaves parameters uncovered (their explicit rows would need the per-sample passes).
    """
    return bool(plan.layers) and not plan.uncovered and all(layer.kind != "Conv" for layer in plan.layers)


VARIANCE_CHUNK_ELEMENTS = 1 << 24  # entries of the per-sample gradients held at once for diag S (T > 1)


def _rest_leaves(plan: LayerPlan) -> tuple[int, ...]:
    """The leaves with explicit rows in :class:`LayerJacobian`, in the order of ``rest``'s columns: the
    uncovered ones (rows by per-sample gradients), then each norm's scale and bias (rows from its
    captured ``xhat`` and output gradients)."""
    norms = tuple(i for m in plan.norms for i in (m.scale_index, m.bias_index) if i is not None)
    return tuple(plan.uncovered) + norms


def _over_components(av: jax.Array, d: jax.Array) -> jax.Array:
    """``out[n, c] = sum_tm av[n, t, m] d[n, c, t, m]``: a layer's share of ``O v``.

    One component is an einsum; several are summed elementwise, per component: as one
    einsum (or any per-sample contraction) the CPU runs ``n`` tiny batched dots plus
    transposes of ``d``: lazy SR on the complex-output MLP 64-64 (``C = 2``, ``N = 512``,
    float32, jax 0.10.2, 50 CG steps) took 1.40x ``QGTOnTheFly``'s time through the einsums,
    and 0.61x of the einsums' time summed elementwise (10.3 -> 6.3 ms); with ``C = 1`` the
    einsum measured 1.02-1.08x faster than the elementwise form (RBMs).
    """
    if d.shape[1] == 1:
        return jnp.einsum("ntm,nctm->nc", av, d)
    return jnp.stack([jnp.sum(av * d[:, comp], axis=(1, 2)) for comp in range(d.shape[1])], axis=1)


def _components_combined(d: jax.Array, u: jax.Array) -> jax.Array:
    """``w[n, t, m] = sum_c d[n, c, t, m] u[n, c]``: the cotangent a layer's share of ``O^H u`` contracts
    with its inputs (``d`` conjugated by the caller); the components summed as in :func:`_over_components`."""
    if d.shape[1] == 1:
        return jnp.einsum("nctm,nc->ntm", d, u)
    out = d[:, 0] * u[:, 0, None, None]
    for comp in range(1, d.shape[1]):
        out = out + d[:, comp] * u[:, comp, None, None]
    return out


class LayerJacobian(NamedTuple):
    """``Obar`` from captured layer statistics, exact (see the module docstring).

    Attributes:
      plan: the static :class:`fishr.capture.LayerPlan`.
      a: per layer, inputs with the bias column, ``(n, T, k)``.
      d: per layer, output gradients per component, ``(n, C, T, m)``.
      rest: explicit rows (centred when ``rest_centred``), held flat ``(n C, P_rest)`` as :class:`DenseJacobian`'s
        (a product on rows reshaped inside a CG loop runs several times slower on the CPU; the
        ``(n, C, P_rest)`` view is :attr:`rest_rows`), of the uncovered parameters (per-sample
        gradients), of the layers whose per-sample gradients are cheaper than their structured
        kernel (many positions: folded into rows ``G_ic = sum_t a_it^T d_ict`` at build time, and
        then in ``plan.uncovered``) and of LayerNorm / RMSNorm scales and biases (``sum_t xhat_t d_t`` and
        ``sum_t d_t`` from the same capture, no per-sample pass), see ``_rest_leaves``.
      unravel_rest: flat ``P_rest`` vector -> list of uncovered leaves.
      treedef: the parameters' tree structure.
      shapes: the parameters' leaf shapes.
      dtypes: the parameters' leaf dtypes.
      components: ``C``, the score components per sample.
      rest_centred: whether ``rest`` was centred at build (single precision) or is centred where
        it is used (the kernel; the products centre their outputs).
      axis_name: mapped axis of the batch (``None`` after :meth:`gather`).
      inputs_t: ``None``, or per layer the conjugated inputs transposed to ``(k, n T)``
        (:meth:`for_products`), which :meth:`rmatvec` then contracts with instead of ``a``.
    """

    plan: LayerPlan
    a: tuple
    d: tuple
    rest: jax.Array
    unravel_rest: Callable[[jax.Array], list]
    treedef: Any
    shapes: tuple
    dtypes: tuple
    components: int
    rest_centred: bool
    axis_name: AxisName = None
    inputs_t: tuple | None = None

    @classmethod
    def build(cls, scores: Callable[[Any, Any], jax.Array], one_sample, params, samples, holomorphic, axis_name,
              chunk_size: int | None = None, fold_for: str = "kernel"):
        """One forward and ``C`` backward passes over the batch, plus rows for uncovered leaves.

        ``scores(params, samples) -> (n, C)``; ``one_sample(params, x) -> (C,)`` gives
        the uncovered parameters' rows. The samples must be an argument of
        ``scores`` (not closed over) for the first layer's input to be captured.
        ``chunk_size``: the passes run over chunks of that many samples
        (:func:`fishr.chunking.map_chunks`), so the model's intermediates (attention
        maps, activations of uncaptured layers) are held for one chunk only; the
        statistics kept are those of the whole batch either way. ``fold_for``: which layers
        at many positions are folded into explicit rows, for the sample-space kernel
        (``"kernel"``) or for the products alone (``"products"``, lazy mode), see
        :func:`layer_folds`.
        """
        leaves, treedef = jax.tree.flatten(params)
        plans = []  # the static plan, recorded when the (per-chunk) capture is traced
        n_global = distributed.batch_size(jax.tree.leaves(samples)[0].shape[0], axis_name)
        dtype = ravel_pytree(params)[0].dtype

        def statistics(xs):
            lin = linearize_layers(scores, params, xs, norms=True)
            c = lin.outputs.shape[1]
            per_component = []
            for comp in range(c):
                cot = jnp.zeros_like(lin.outputs).at[:, comp].set(1)
                per_component.append(lin.pullback_all(cot))  # pyright: ignore[reportOptionalCall]  (norms=True)
            d = tuple(jnp.stack([pc[0][l] for pc in per_component], axis=1) for l in range(len(lin.plan.layers)))
            a = tuple(augment_bias(x, layer.has_bias) for x, layer in zip(lin.inputs, lin.plan.layers))
            uncovered = [leaves[i] for i in lin.plan.uncovered]
            # a layer at many positions whose statistics cost more than its per-sample gradients
            # G_ic = sum_t a_it^T d_ict (a transformer's; layer_folds) is kept as explicit rows G (exactly centred)
            kept, kept_a, kept_d, folded_rows, folded_leaves = [], [], [], [], []
            for layer, x, y in zip(lin.plan.layers, a, d):
                if not layer_folds(fold_for, n_global, c, layer.positions, layer.d_in + int(layer.has_bias),
                                   layer.d_out):
                    kept.append(layer)
                    kept_a.append(x)
                    kept_d.append(y)
                    continue
                g = jnp.einsum("ntk,nctm->nckm", x, y)
                folded_rows.append(g[:, :, :layer.d_in].reshape(g.shape[0], c, -1))
                folded_leaves.append(layer.kernel_index)
                if layer.has_bias:
                    folded_rows.append(g[:, :, layer.d_in])
                    folded_leaves.append(layer.bias_index)
            plans.append(dataclasses.replace(lin.plan, layers=tuple(kept),
                                             uncovered=tuple(lin.plan.uncovered) + tuple(folded_leaves)))

            def one_sample_rest(rest_leaves, x):
                full = list(leaves)
                for i, leaf in zip(lin.plan.uncovered, rest_leaves):
                    full[i] = leaf
                return one_sample(jax.tree.unflatten(treedef, full), x)

            n = lin.outputs.shape[0]
            parts = [per_sample_rows(one_sample_rest, uncovered, xs, holomorphic)] if uncovered else []
            parts += [rows.astype(dtype) for rows in folded_rows]
            for j, norm in enumerate(lin.plan.norms):  # exact rows of LayerNorm / RMSNorm scale and bias
                g = jnp.stack([pc[1][j] for pc in per_component], axis=1)  # (n, C, T, features)
                if norm.scale_index is not None:
                    parts.append(jnp.einsum("ntf,nctf->ncf", lin.norm_inputs[j], g).astype(dtype))
                if norm.bias_index is not None:
                    parts.append(jnp.sum(g, axis=2).astype(dtype))
            rest = jnp.concatenate(parts, axis=-1) if parts else jnp.zeros((n, c, 0), dtype)
            return tuple(kept_a), tuple(kept_d), rest

        a, d, rest = map_chunks(statistics, samples, chunk_size)
        # single precision: the rows centred once, here, so that the kernel (the factor) and the
        # products see the same rows (a mean computed twice differs by rounding, which the one
        # refinement step of explicit rows then carries: ViT float32 error 2.8e-5 against 1.2e-5);
        # double precision: centred where the kernel's single-precision copy is made (no extra pass)
        centred = _single(rest.dtype) == rest.dtype
        if centred:
            rest = _centre(rest, axis_name)
        plan = plans[-1]
        return cls(
            plan=plan, a=a, d=d, rest=_flat_rows(rest),
            unravel_rest=ravel_pytree([leaves[i] for i in _rest_leaves(plan)])[1],
            treedef=treedef, shapes=tuple(jnp.shape(l) for l in leaves),
            dtypes=tuple(jnp.result_type(l) for l in leaves), components=rest.shape[1], rest_centred=centred,
            axis_name=axis_name,
        )

    @property
    def num_components(self) -> int:
        return self.components

    @property
    def rows_shape(self) -> tuple[int, int]:
        """``(n, C)``: the samples and score components of these statistics."""
        return self.rest.shape[0] // self.components, self.components

    @property
    def rest_rows(self) -> jax.Array:
        """The explicit rows ``(n, C, P_rest)`` (a view of :attr:`rest`, for code outside loops)."""
        return self.rest.reshape(self.rest.shape[0] // self.components, self.components, self.rest.shape[-1])

    def _uncentred_matvec(self, v: Any) -> jax.Array:
        leaves = jax.tree.leaves(v)
        out = _rows_matvec(self.rest, self.components, ravel_pytree([leaves[i] for i in _rest_leaves(self.plan)])[0])
        for a, d, layer in zip(self.a, self.d, self.plan.layers):
            av = a @ layer_block(leaves, layer)  # (n, T, m), dtypes promote (real inputs, complex weights)
            out = out + _over_components(av, d)
        return out

    def matvec(self, v: Any) -> jax.Array:
        return _centre(self._uncentred_matvec(v), self.axis_name)

    def rmatvec(self, u: jax.Array) -> Any:
        return self._uncentred_rmatvec(_centre(u, self.axis_name))

    def for_products(self) -> LayerJacobian:
        """The same Jacobian with :attr:`inputs_t` made: call it outside a loop of products.

        ``O^H u`` contracts each layer's inputs ``a`` over the samples (``a^H w``), and
        the CPU's matrix product wants that operand transposed: inside a CG loop XLA copies
        ``a`` to ``(k, n T)`` at every step (it does not hoist the loop-invariant copy). Made
        once here, the copy is out of the loop: lazy SR on an RBM (``alpha = 2``, ``N = 1,024``,
        float32) spent 2.0 of 11.0 ms of op time on those copies. It doubles the memory of
        the inputs.
        """
        return self._replace(inputs_t=tuple(x.conj().reshape(-1, x.shape[-1]).T for x in self.a))

    def _uncentred_rmatvec(self, u: jax.Array) -> Any:
        """``O^H u`` (no centring) as a parameter pytree."""
        leaves: list = [None] * len(self.shapes)
        for i, leaf in zip(_rest_leaves(self.plan), self.unravel_rest(_rows_rmatvec(self.rest, u))):
            leaves[i] = leaf
        for idx, (a, d, layer) in enumerate(zip(self.a, self.d, self.plan.layers)):
            w = _components_combined(d.conj(), u)
            block = (self.inputs_t[idx] @ w.reshape(-1, w.shape[-1]) if self.inputs_t is not None
                     else jnp.einsum("ntk,ntm->km", a.conj(), w))
            put_layer_block(leaves, layer, block, self.shapes)
        leaves = [leaf.astype(dt) for leaf, dt in zip(leaves, self.dtypes)]
        return jax.tree.unflatten(self.treedef, leaves)

    def kernel_tiles(self, ts: int | None = None, compact: bool = False, columns: bool = False) -> linalg.Tiles:
        """The tiles of the centred kernel ``Obar Obar^H`` on and below the diagonal (:func:`tiled_kernel`).

        Per layer the cheaper exact form (``_kernel_factors``); the layers' part is
        centred through its row means (``_centre_block``), the uncovered
        parameters' rows are centred before their Gram matrix. Local batch only (call
        after :meth:`gather` when the batch is split over devices). A few tile rows map one
        block over the tile pairs while its gathered slabs fit in ``MAPPED_MAX_BYTES``, and
        whatever their size with ``compact=True`` (program size before speed: the double-precision
        fallback's kernel, which runs only when the single-precision factor was not finite);
        with ``columns=True`` (and not ``compact``) a few tile rows come as
        :class:`fishr.linalg.ColumnTiles`, one block per tile column (the sample-space solve's).
        """
        n, c = self.rows_shape
        dtype = jnp.result_type(self.rest, *self.a, *self.d)
        factors = self._kernel_factors()
        r = self._layer_row_means()
        s = r.mean(axis=0)
        rest = self.rest_rows
        if not self.rest_centred:
            rest = rest - distributed.local_mean(rest, keepdims=True)

        def make_block(m, n_pad):
            take = [(kind, _slicer(x, n_pad), _slicer(y, n_pad)) for kind, x, y in factors]
            take_rest, take_r = _slicer(rest, n_pad), _slicer(r, n_pad)
            take_valid = _slicer(jnp.ones((n,), dtype), n_pad)

            def block(i0, j0, mi=m, mj=m):  # samples i0 .. i0 + mi against j0 .. j0 + mj
                out = jnp.zeros((mi, c, mj, c), dtype)
                for kind, tx, ty in take:
                    out = out + _uncentred_layer_block(kind, tx(i0, mi), tx(j0, mj), ty(i0, mi), ty(j0, mj), c)
                if factors:
                    valid = take_valid(i0, mi)[:, None, None, None] * take_valid(j0, mj)[None, None, :, None]
                    out = _centre_block(out, take_r(i0, mi), take_r(j0, mj), s) * valid
                if rest.shape[-1]:
                    out = out + _rows_gram(take_rest(i0, mi), take_rest(j0, mj)).reshape(mi, c, mj, c)
                return out.reshape(mi * c, mj * c)

            return block

        # mapped (compiled once) while the gathered slabs stay small; else unrolled (no gathered copies)
        statistics = [v for _, x, y in factors for v in (x, y)] + [rest]  # each (n, ...)
        row_bytes = sum(v.size // max(n, 1) * v.dtype.itemsize for v in statistics)
        return tiled_kernel(n, c, dtype, make_block, ts, row_bytes=0 if compact else row_bytes,
                            columns=columns and not compact)

    def gram(self) -> jax.Array:
        """The centred kernel ``Obar Obar^H``, ``(n C) x (n C)`` (from :meth:`kernel_tiles`)."""
        n, c = self.rows_shape
        return kernel_from_tiles(self.kernel_tiles(), n * c)

    def _kernel_factors(self) -> list:
        """Per layer, what its kernel blocks are products of (see :func:`_uncentred_layer_block`)."""
        factors = []
        for a, d in zip(self.a, self.d):
            if a.shape[1] == 1:  # two plain GEMMs and a Hadamard product
                factors.append(("gram-hadamard", a[:, 0], d[:, :, 0]))
            else:  # kept at T > 1 positions because this is cheaper than G G^H (see build)
                factors.append(("positions", a, d))
        return factors

    def _layer_row_means(self) -> jax.Array:
        """``r[i, c, c'] = O_ic . conj(mean_j O_jc')`` over the captured layers' parameters, ``(n, C, C)``.

        Per layer the mean per-sample gradient ``M_c' = mean_j sum_t a_jt^T d_jc't``
        (``k x m``), then ``r[i, c, c'] = sum_t a_it conj(M_c') d_ict^T``: the row means of
        the layers' uncentred kernel.
        """
        n, c = self.rows_shape
        dtype = jnp.result_type(self.rest, *self.a, *self.d)
        r = jnp.zeros((n, c, c), dtype)
        for a, d in zip(self.a, self.d):
            mean = jnp.einsum("jtk,jctm->ckm", a, d) / n
            r = r + jnp.einsum("itk,ekm,ictm->ice", a, mean.conj(), d)
        return r

    def score_variance(self) -> Any:
        """``diag S = mean_i sum_c |Obar_icp|^2`` over all samples, as a real parameter pytree.

        Per layer from its statistics, ``mean_i sum_c |O_ic|^2 - sum_c |mean_i O_ic|^2`` with
        ``O_ic = sum_t a_it^T d_ict`` (``k x m``): at ``T = 1`` one product of the squared
        moduli, ``|a|^2^T |d|^2``, never the per-sample gradients; at ``T > 1`` the
        per-sample gradients chunk by chunk (``VARIANCE_CHUNK_ELEMENTS`` entries at a time).
        The difference is clipped at zero (it cancels digits where the mean score is large
        next to its spread, as the layers' kernel centring does; a metric needs no more).
        The explicit rows are centred first (exact), unless they were at build.
        """
        n_global = distributed.batch_size(self.rows_shape[0], self.axis_name)
        real = jnp.finfo(self.rest.dtype).dtype
        leaves: list = [None] * len(self.shapes)
        rest = self.rest_rows
        if not self.rest_centred:
            rest = rest - distributed.batch_mean(rest, self.axis_name, keepdims=True)
        rest_variance = distributed.batch_mean(jnp.sum(jnp.abs(rest) ** 2, axis=1), self.axis_name)
        for i, leaf in zip(_rest_leaves(self.plan), self.unravel_rest(rest_variance)):
            leaves[i] = leaf
        for a, d, layer in zip(self.a, self.d, self.plan.layers):
            if a.shape[1] == 1:
                second = jnp.einsum("nk,ncm->km", jnp.abs(a[:, 0]) ** 2, jnp.abs(d[:, :, 0]) ** 2)
            else:
                rows_per_chunk = max(1, VARIANCE_CHUNK_ELEMENTS // (d.shape[1] * a.shape[2] * d.shape[3]))

                def squares(stats, mask):
                    g = jnp.einsum("ntk,nctm->nckm", *stats)
                    return jnp.einsum("n,nckm->km", mask, jnp.abs(g) ** 2)

                second = sum_chunks(squares, (a, d), jnp.ones((a.shape[0],), real), rows_per_chunk)
            mean = distributed.psum(jnp.einsum("ntk,nctm->ckm", a, d), self.axis_name) / n_global
            block = distributed.psum(second, self.axis_name) / n_global - jnp.sum(jnp.abs(mean) ** 2, axis=0)
            put_layer_block(leaves, layer, jnp.maximum(jnp.real(block), 0).astype(real), self.shapes)
        return jax.tree.unflatten(self.treedef, [jnp.real(leaf).astype(real) for leaf in leaves])

    def scaled(self, scale: Any, factors: dict) -> LayerJacobian:
        """The Jacobian of ``theta = scale * theta~`` where each captured layer's block of
        ``scale`` is the product ``u w^T`` of ``factors[kernel_index] = (u, w)`` (``u`` over
        the ``k`` inputs with the bias, ``w`` over the ``m`` outputs): the layer's inputs are
        scaled by ``u``, its output gradients by ``w``; the explicit rows' columns by ``scale``."""
        leaves = jax.tree.leaves(scale)
        rest_scale = ravel_pytree([leaves[i] for i in _rest_leaves(self.plan)])[0]
        a = tuple(x * factors[layer.kernel_index][0].astype(x.dtype) for x, layer in zip(self.a, self.plan.layers))
        d = tuple(y * factors[layer.kernel_index][1].astype(y.dtype) for y, layer in zip(self.d, self.plan.layers))
        return self._replace(a=a, d=d, rest=self.rest * rest_scale.astype(self.rest.dtype), inputs_t=None)

    def single_precision(self) -> LayerJacobian:
        """The same statistics rounded to single precision (for a preconditioning factor)."""
        single = lambda x: x.astype(_single(x.dtype))
        return self._replace(a=tuple(map(single, self.a)), d=tuple(map(single, self.d)), rest=single(self.rest),
                             dtypes=tuple(_single(dt) for dt in self.dtypes), inputs_t=None)

    def gather(self) -> LayerJacobian:
        gather = lambda x: distributed.all_gather_batch(x, self.axis_name)
        return self._replace(a=gather(self.a), d=gather(self.d), rest=gather(self.rest), axis_name=None,
                             inputs_t=None)
