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
``gram() = Obar Obar^H`` (``(n C) x (n C)``), ``gram_tiles()`` (its tiles on and
below the diagonal, for :func:`fishr.linalg.tiled_cholesky_factor`) and ``gather()``.

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
    (:class:`DenseJacobian` restricted to them). Centring of the kernel is
    ``H K H`` with ``H = I - 1 1^T / n`` acting on the sample index, applied
    through the row means of ``K`` (see :func:`_centre_block`).

    Per layer, :meth:`LayerJacobian.gram` picks the cheaper of the structured
    kernel, ``n^2 T^2 (k + C^2 m)`` multiply-adds, and the generic one through
    the per-sample gradients ``G`` (``n C T k m`` to form them plus
    ``(n C)^2 k m``), with ``k = d_in (+1)``, ``m = d_out``, ``T`` positions;
    for ``T = 1`` the structured kernel always wins.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fishr import distributed
from fishr.distributed import AxisName
from fishr.capture import LayerPlan, augment_bias, linearize_layers

__all__ = ["DenseJacobian", "LayerJacobian", "LinearizedJacobian", "layer_kernel_is_structured"]


def _centre(u: jax.Array, axis_name: AxisName, mean_fn: Optional[Callable[[jax.Array], jax.Array]] = None) -> jax.Array:
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


def _sample_ranges(n: int, c: int, max_ranges: Optional[int] = None) -> list:
    """Ranges of the sample index that the kernel is computed (and factored) in.

    ``round(n C / 256)`` near-equal ranges (at least one, at most ``max_ranges``),
    so that a tile of the kernel has about 256 rows (more when capped).

    * The tiles of :func:`fishr.linalg.tiled_cholesky_factor` (no cap): 256-row
      tiles ran the float32 factorisation at ``n = 4096`` in 294 ms, 512-row
      ones in 343 ms (LAPACK on the whole matrix: 420 to 540 ms).
    * The kernel assembled above the diagonal for LAPACK (cap 8): a tile of every
      layer's two Gram matrices stays in cache for their Hadamard product, and
      about half the products are saved. On the 2-core CPU of
      ``benchmarks/structured_sr.py`` (MLP 16-64-64-1) the float64 solve went
      from 53 to 25 ms at ``n = 1024`` and from 1287 to 966 ms at ``n = 4096``
      against the kernel computed whole; at ``n = 4096``, 16 ranges instead of
      8 cost another 6%.
    """
    blocks = max(1, round(n * c / 256))
    if max_ranges is not None:
        blocks = min(blocks, max_ranges)
    edges = [round(b * n / blocks) for b in range(blocks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _assemble_kernel(n: int, c: int, upper_only: bool, block: Callable[[int, int, int, int], jax.Array]) -> jax.Array:
    """The ``(n C) x (n C)`` kernel from ``block(i0, i1, j0, j1)``, its rows for samples
    ``i0:i1`` and columns for samples ``j0:j1``: computed whole, or with ``upper_only``
    over the tiles of :func:`_sample_ranges` on and above the diagonal, with zeros below
    (for :func:`fishr.linalg.cholesky_factor`, which reads only the upper triangle)."""
    ranges = _sample_ranges(n, c, 8 if upper_only else 1)
    rows = []
    for b, (i0, i1) in enumerate(ranges):
        row = [block(i0, i1, j0, j1) for j0, j1 in ranges[b:]]
        if i0:
            row.insert(0, jnp.zeros(((i1 - i0) * c, i0 * c), row[0].dtype))
        rows.append(jnp.concatenate(row, axis=1) if len(row) > 1 else row[0])
    return jnp.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]


def _kernel_tiles(n: int, c: int, block: Callable[[int, int, int, int], jax.Array]) -> tuple:
    """The tiles on and below the diagonal of the ``(n C) x (n C)`` kernel.

    ``block(i0, i1, j0, j1)`` is the kernel's block for the rows of samples ``i0:i1``
    and the columns of samples ``j0:j1``; tile ``[i][j]`` (``j <= i``) is that block
    for ranges ``i`` and ``j`` of :func:`_sample_ranges`, the layout of
    :func:`fishr.linalg.tiled_cholesky_factor`.
    """
    ranges = _sample_ranges(n, c)
    return tuple(tuple(block(i0, i1, j0, j1) for j0, j1 in ranges[: b + 1]) for b, (i0, i1) in enumerate(ranges))


# --------------------------------------------------------------------------- linearised


class LinearizedJacobian:
    """``Obar`` through ``jax.linearize(scores, params)`` and its transpose (never formed)."""

    def __init__(self, scores: Callable[[Any], jax.Array], params: Any, holomorphic: bool, axis_name: AxisName,
                 mean_fn: Optional[Callable[[jax.Array], jax.Array]] = None):
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


# --------------------------------------------------------------------------- dense rows


def _flat_rows(rows: jax.Array) -> jax.Array:
    """Rows ``(n, C, P)`` as the ``(n C) x P`` matrix they are."""
    return rows.reshape(rows.shape[0] * rows.shape[1], rows.shape[-1])


def _rows_matvec(rows: jax.Array, v: jax.Array) -> jax.Array:
    """``rows v`` for rows ``(n, C, P)`` and a flat ``v`` ``(P,)`` -> ``(n, C)``, as one 2-D product."""
    return (_flat_rows(rows) @ v).reshape(rows.shape[:2])


def _rows_rmatvec(rows: jax.Array, u: jax.Array) -> jax.Array:
    """``rows^H u`` for ``u`` ``(n, C)`` -> ``(P,)``.

    Written ``u @ conj(rows)`` so the large operand is not transposed: inside a CG
    loop an ``einsum('ncp,nc->p')`` ran ~10x below memory bandwidth on the CPU.
    """
    return u.reshape(-1) @ _flat_rows(rows).conj()


def _rows_gram(rows: jax.Array, other: Optional[jax.Array] = None) -> jax.Array:
    """``rows other^H`` (``other`` defaults to ``rows``), ``(n C) x (n' C)``."""
    return _flat_rows(rows) @ _flat_rows(rows if other is None else other).conj().T


def per_sample_rows(one_sample: Callable[[Any, Any], jax.Array], params: Any, samples: Any, holomorphic: bool):
    """Rows ``(n, C, P)`` of ``d one_sample(params, x_i) / d params`` in ``ravel_pytree`` order.

    ``one_sample(params, x) -> (C,)``; ``vmap`` over samples of its reverse-mode
    Jacobian, taken on the parameter pytree.
    """
    flat, _ = ravel_pytree(params)
    jac_tree = jax.vmap(jax.jacrev(one_sample, holomorphic=holomorphic), in_axes=(None, 0))(params, samples)
    leaves = jax.tree.leaves(jac_tree)  # each (n, C, *leaf_shape)
    if not leaves:
        n = jax.tree.leaves(samples)[0].shape[0]
        return jnp.zeros((n, 1, 0), flat.dtype)
    n, c = leaves[0].shape[:2]
    return jnp.concatenate([leaf.reshape(n, c, -1).astype(flat.dtype) for leaf in leaves], axis=-1)


class DenseJacobian(NamedTuple):
    """Explicit centred rows ``(n, C, P)``; ``unravel`` maps a flat ``P`` vector to the pytree."""

    rows: jax.Array
    unravel: Callable[[jax.Array], Any]
    axis_name: AxisName = None

    @classmethod
    def build(cls, one_sample, params, samples, holomorphic, axis_name, mean_fn=None) -> "DenseJacobian":
        rows = per_sample_rows(one_sample, params, samples, holomorphic)
        return cls(_centre(rows, axis_name, mean_fn), ravel_pytree(params)[1], axis_name)

    @property
    def flat_rows(self) -> jax.Array:
        return _flat_rows(self.rows)

    def matvec_flat(self, v: jax.Array) -> jax.Array:
        return _rows_matvec(self.rows, v)

    def rmatvec_flat(self, u: jax.Array) -> jax.Array:
        return _rows_rmatvec(self.rows, u)  # rows are centred already

    def matvec(self, v: Any) -> jax.Array:
        return self.matvec_flat(ravel_pytree(v)[0])

    def rmatvec(self, u: jax.Array) -> Any:
        return self.unravel(self.rmatvec_flat(u))

    def gram(self, upper_only: bool = False) -> jax.Array:
        """``Obar Obar^H``; ``upper_only`` as in :meth:`LayerJacobian.gram`."""
        n, c = self.rows.shape[:2]
        return _assemble_kernel(n, c, upper_only, self._block)

    def _block(self, i0: int, i1: int, j0: int, j1: int) -> jax.Array:
        return _rows_gram(self.rows[i0:i1], self.rows[j0:j1])

    def gram_tiles(self) -> tuple:
        """The tiles of ``Obar Obar^H`` on and below the diagonal (:func:`_kernel_tiles`)."""
        n, c = self.rows.shape[:2]
        return _kernel_tiles(n, c, self._block)

    def single_precision(self) -> "DenseJacobian":
        """The same rows rounded to single precision (for a preconditioning factor)."""
        return self._replace(rows=self.rows.astype(_single(self.rows.dtype)))

    def gather(self) -> "DenseJacobian":
        return DenseJacobian(distributed.all_gather_batch(self.rows, self.axis_name), self.unravel, None)


# --------------------------------------------------------------------------- captured layers


def layer_kernel_is_structured(n: int, c: int, positions: int, k: int, m: int) -> bool:
    """Whether the Gram-Hadamard kernel of one layer is cheaper than the generic ``G G^H``."""
    structured = n * n * positions * positions * (k + c * c * m)
    generic = n * c * positions * k * m + (n * c) ** 2 * k * m
    return structured <= generic


class LayerJacobian(NamedTuple):
    """``Obar`` from captured layer statistics, exact (see the module docstring).

    Attributes:
      plan: the static :class:`fishr.capture.LayerPlan`.
      a: per layer, inputs with the bias column, ``(n, T, k)``.
      d: per layer, output gradients per component, ``(n, C, T, m)``.
      rest: explicit rows ``(n, C, P_rest)`` of the uncovered parameters (uncentred).
      unravel_rest: flat ``P_rest`` vector -> list of uncovered leaves.
      treedef: the parameters' tree structure.
      shapes: the parameters' leaf shapes.
      dtypes: the parameters' leaf dtypes.
      axis_name: mapped axis of the batch (``None`` after :meth:`gather`).
    """

    plan: LayerPlan
    a: tuple
    d: tuple
    rest: jax.Array
    unravel_rest: Callable[[jax.Array], list]
    treedef: Any
    shapes: tuple
    dtypes: tuple
    axis_name: AxisName = None

    @classmethod
    def build(cls, scores: Callable[[Any, Any], jax.Array], one_sample, params, samples, holomorphic, axis_name):
        """One forward and ``C`` backward passes over the batch, plus rows for uncovered leaves.

        ``scores(params, samples) -> (n, C)``; ``one_sample(params, x) -> (C,)`` gives
        the uncovered parameters' rows. The samples must be an argument of
        ``scores`` (not closed over) for the first layer's input to be captured.
        """
        lin = linearize_layers(scores, params, samples)
        c = lin.outputs.shape[1]
        per_component = []
        for comp in range(c):
            cot = jnp.zeros_like(lin.outputs).at[:, comp].set(1)
            per_component.append(lin.pullback(cot))
        d = tuple(jnp.stack([pc[l] for pc in per_component], axis=1) for l in range(len(lin.plan.layers)))
        a = tuple(augment_bias(x, layer.has_bias) for x, layer in zip(lin.inputs, lin.plan.layers))

        leaves, treedef = jax.tree.flatten(params)
        uncovered = [leaves[i] for i in lin.plan.uncovered]

        def one_sample_rest(rest_leaves, x):
            full = list(leaves)
            for i, leaf in zip(lin.plan.uncovered, rest_leaves):
                full[i] = leaf
            return one_sample(jax.tree.unflatten(treedef, full), x)

        if uncovered:
            rest = per_sample_rows(one_sample_rest, uncovered, samples, holomorphic)
        else:  # every parameter is in a captured layer: no per-sample pass at all
            rest = jnp.zeros((lin.outputs.shape[0], c, 0), ravel_pytree(params)[0].dtype)
        return cls(
            plan=lin.plan, a=a, d=d, rest=rest, unravel_rest=ravel_pytree(uncovered)[1], treedef=treedef,
            shapes=tuple(jnp.shape(l) for l in leaves), dtypes=tuple(jnp.result_type(l) for l in leaves),
            axis_name=axis_name,
        )

    @property
    def num_components(self) -> int:
        return self.rest.shape[1]

    def _layer_block(self, leaves: list, layer) -> jax.Array:
        """The ``(k, m)`` block of a parameter pytree's leaves for ``layer`` (kernel rows, then bias)."""
        block = leaves[layer.kernel_index].reshape(layer.d_in, layer.d_out)
        if layer.has_bias:
            block = jnp.concatenate([block, leaves[layer.bias_index].reshape(1, layer.d_out)], axis=0)
        return block

    def _uncentred_matvec(self, v: Any) -> jax.Array:
        leaves = jax.tree.leaves(v)
        out = _rows_matvec(self.rest, ravel_pytree([leaves[i] for i in self.plan.uncovered])[0])
        for a, d, layer in zip(self.a, self.d, self.plan.layers):
            av = a @ self._layer_block(leaves, layer)  # (n, T, m), dtypes promote (real inputs, complex weights)
            out = out + jnp.einsum("ntm,nctm->nc", av, d)
        return out

    def matvec(self, v: Any) -> jax.Array:
        return _centre(self._uncentred_matvec(v), self.axis_name)

    def rmatvec(self, u: jax.Array) -> Any:
        return self._uncentred_rmatvec(_centre(u, self.axis_name))

    def _uncentred_rmatvec(self, u: jax.Array) -> Any:
        """``O^H u`` (no centring) as a parameter pytree."""
        leaves: list = [None] * len(self.shapes)
        for i, leaf in zip(self.plan.uncovered, self.unravel_rest(_rows_rmatvec(self.rest, u))):
            leaves[i] = leaf
        for a, d, layer in zip(self.a, self.d, self.plan.layers):
            w = jnp.einsum("nctm,nc->ntm", d.conj(), u)
            block = jnp.einsum("ntk,ntm->km", a.conj(), w)
            leaves[layer.kernel_index] = block[: layer.d_in].reshape(self.shapes[layer.kernel_index])
            if layer.has_bias:
                leaves[layer.bias_index] = block[layer.d_in].reshape(self.shapes[layer.bias_index])
        leaves = [leaf.astype(dt) for leaf, dt in zip(leaves, self.dtypes)]
        return jax.tree.unflatten(self.treedef, leaves)

    def gram(self, upper_only: bool = False) -> jax.Array:
        """Centred kernel ``Obar Obar^H``, ``(n C) x (n C)``, per layer the cheaper of two exact forms.

        ``upper_only=True`` computes only the tiles on and above the diagonal
        (:func:`_sample_ranges`) and leaves zeros below: for
        :func:`fishr.linalg.cholesky_factor`, which reads only the upper triangle.
        """
        n, c = self.rest.shape[:2]
        return _assemble_kernel(n, c, upper_only, self._centred_block_fn())

    def gram_tiles(self) -> tuple:
        """The tiles of the centred kernel on and below the diagonal (:func:`_kernel_tiles`),
        for :func:`fishr.linalg.tiled_cholesky_factor`; nothing above them is computed."""
        n, c = self.rest.shape[:2]
        return _kernel_tiles(n, c, self._centred_block_fn())

    def _centred_block_fn(self) -> Callable[[int, int, int, int], jax.Array]:
        """``(i0, i1, j0, j1) ->`` the centred kernel's block for samples ``i0:i1`` x ``j0:j1``."""
        c = self.rest.shape[1]
        r = self._row_means()
        s = r.mean(axis=0)
        factors = self._kernel_factors()

        def block(i0, i1, j0, j1):
            k4 = self._uncentred_block(factors, slice(i0, i1), slice(j0, j1))
            return _centre_block(k4, r[i0:i1], r[j0:j1], s).reshape((i1 - i0) * c, (j1 - j0) * c)

        return block

    def _kernel_factors(self) -> list:
        """Per layer, what its kernel blocks are products of (see :meth:`_uncentred_block`)."""
        n, c = self.rest.shape[:2]
        factors = []
        for a, d in zip(self.a, self.d):
            t, k = a.shape[1:]
            m = d.shape[-1]
            if t == 1:  # two plain GEMMs and a Hadamard product
                factors.append(("gram-hadamard", a[:, 0], d[:, :, 0]))
            elif layer_kernel_is_structured(n, c, t, k, m):
                factors.append(("positions", a, d))
            else:  # the layer's per-sample gradients, G G^H
                factors.append(("gradients", jnp.einsum("ntk,nctm->nckm", a, d).reshape(n, c, -1), None))
        return factors

    def _uncentred_block(self, factors: list, i: slice, j: slice) -> jax.Array:
        """``(O O^H)[ic, jc']`` for samples ``i`` x samples ``j``, shape ``(|i|, C, |j|, C)``."""
        c = self.rest.shape[1]
        ni, nj = self.rest[i].shape[0], self.rest[j].shape[0]
        out = _rows_gram(self.rest[i], self.rest[j]).reshape(ni, c, nj, c) if self.rest.shape[-1] else None
        for kind, x, y in factors:
            if kind == "gram-hadamard":
                ka = x[i] @ x[j].conj().T
                kd = _rows_gram(y[i], y[j]).reshape(ni, c, nj, c)
                block = ka[:, None, :, None] * kd
            elif kind == "positions":
                ka = jnp.einsum("itk,jsk->itjs", x[i], x[j].conj())
                kd = jnp.einsum("ictm,jesm->icjets", y[i], y[j].conj())
                block = jnp.einsum("itjs,icjets->icje", ka, kd)
            else:
                block = _rows_gram(x[i], x[j]).reshape(ni, c, nj, c)
            out = block if out is None else out + block
        if out is None:
            out = jnp.zeros((ni, c, nj, c), self.rest.dtype)
        return out

    def _row_means(self) -> jax.Array:
        """``r[i, c, c'] = O_ic . conj(mean_j O_jc')``, the row means of ``O O^H``, ``(n, C, C)``.

        ``O^H (e_c' / n)`` is ``conj(mean_j O_jc')`` as a parameter pytree; one
        uncentred ``matvec`` of it gives column ``c'``. Local batch only (call
        after :meth:`gather` when the batch is split over devices).
        """
        n, c = self.rest.shape[:2]
        dtype = jnp.result_type(self.rest, *self.a, *self.d)
        columns = [self._uncentred_matvec(self._uncentred_rmatvec(jnp.zeros((n, c), dtype).at[:, comp].set(1.0 / n)))
                   for comp in range(c)]
        return jnp.stack(columns, axis=-1)

    def single_precision(self) -> "LayerJacobian":
        """The same statistics rounded to single precision (for a preconditioning factor)."""
        single = lambda x: x.astype(_single(x.dtype))
        return self._replace(a=tuple(map(single, self.a)), d=tuple(map(single, self.d)), rest=single(self.rest),
                             dtypes=tuple(_single(dt) for dt in self.dtypes))

    def gather(self) -> "LayerJacobian":
        gather = lambda x: distributed.all_gather_batch(x, self.axis_name)
        return self._replace(a=gather(self.a), d=gather(self.d), rest=gather(self.rest), axis_name=None)
