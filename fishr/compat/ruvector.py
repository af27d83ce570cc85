r"""ruvector-math's ``KFACLayer`` / ``KFACApproximation`` (Rust) on fishr's K-FAC factor code.

The seed's interface and numbers, with its factor statistics, EMA, damping and
Cholesky inverses computed by :mod:`fishr.kronecker` (no second implementation):

* ``KFACLayer(input_dim, output_dim)`` (or ``KFACLayer.new(...)``): zero factors,
  ``damping = 1e-3``, ``ema_factor = 0.95``. ``with_damping(d)`` sets
  ``max(d, EPS)``; ``with_ema(e)`` sets ``clamp(e, 0, 1)``; both return the
  configured layer (the same object, as the Rust builder's moved ``self``).
* ``update(activations, gradients)``: ``A = E[a a^T]``, ``G = E[g g^T]`` over the
  batch (no bias column: ``a`` is used as given), the first update replaces the
  factors, later ones ``ema * old + (1 - ema) * new``.
* ``natural_gradient(weight_grad)``: ``G_d^{-1} dW A_d^{-1}`` for ``dW`` of shape
  ``(output_dim, input_dim)``, where each factor ``X`` (``n x n``) is damped by
  ``max(damping * tr(X) / n, EPS)`` (the seed's "trace" damping) and inverted by
  Cholesky; computed afresh on every call, as in the seed.
* ``KFACApproximation(layer_dims)``: one layer per ``(input_dim, output_dim)``,
  ``learning_rate = 0.01``, ``damping = 1e-3``; ``with_learning_rate(lr)`` sets
  ``max(lr, EPS)``; ``with_damping(d)`` stores ``max(d, EPS)`` but hands the
  *unclamped* ``d`` to every layer (as the seed does; the per-factor floor ``EPS``
  still applies); ``update_layer``, ``natural_gradient_layer`` (returns
  ``-learning_rate * natural_gradient``), ``num_layers``, ``reset``.

``EPS = 1e-10`` is ruvector-math's ``utils::EPS``. Errors, in the seed's order of
checks, are subclasses of :class:`MathError` (itself a ``ValueError``):
:class:`EmptyInputError` (empty batch), :class:`DimensionMismatchError`
(``expected``/``found``), :class:`InvalidParameterError` (index out of bounds; also
an ``IndexError``) and :class:`NumericalInstabilityError` (a damped factor is not
positive definite). On an error the state is unchanged.

Differences from the Rust code, all where Rust would panic or silently return
NaN: a ``weight_grad`` row of the wrong length raises
:class:`DimensionMismatchError` (Rust indexes out of bounds or ignores the extra
entries); non-finite activations/gradients give non-finite factors, and the
following ``natural_gradient`` raises :class:`NumericalInstabilityError` instead
of returning NaN; a NaN ``damping`` raises ``ValueError`` (Rust's ``f64::max``
would silently replace it by ``EPS``); a layer with ``input_dim`` or ``output_dim``
of 0 is rejected at construction. Arithmetic is float64 (jax's x64 mode is
switched on locally for each call).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fishr import kronecker as F
from fishr._validate import tree_all_finite
from fishr.solvers import Cholesky

__all__ = [
    "EPS",
    "DimensionMismatchError",
    "EmptyInputError",
    "InvalidParameterError",
    "KFACApproximation",
    "KFACLayer",
    "MathError",
    "NumericalInstabilityError",
]

EPS = F.SEED_EPS


class MathError(ValueError):
    """Base class of the seed's ``MathError`` variants."""


class EmptyInputError(MathError):
    """``MathError::EmptyInput``: an empty batch."""

    def __init__(self, what: str):
        super().__init__(f"empty input: {what}")
        self.what = what


class DimensionMismatchError(MathError):
    """``MathError::DimensionMismatch``: a size differs from the expected one."""

    def __init__(self, expected: int, found: int):
        super().__init__(f"dimension mismatch: expected {expected}, found {found}")
        self.expected = expected
        self.found = found


class InvalidParameterError(MathError, IndexError):
    """``MathError::InvalidParameter`` (here: ``layer_idx`` out of bounds)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"invalid parameter {name}: {reason}")
        self.name = name
        self.reason = reason


class NumericalInstabilityError(MathError):
    """``MathError::NumericalInstability``: a damped factor is not positive definite."""


def _rust_max(x: float, floor: float) -> float:
    x = float(x)
    if math.isnan(x):
        raise ValueError("fishr.compat.ruvector: a NaN damping / learning rate is not accepted.")
    return max(x, floor)


def _rows(rows: Sequence[Sequence[float]], width: int) -> np.ndarray:
    """Check each row's length against ``width`` (the seed's per-row check) and stack as float64."""
    for row in rows:
        if len(row) != width:
            raise DimensionMismatchError(width, len(row))
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), width)


def _x64():
    return jax.enable_x64(True)


class KFACLayer:
    """K-FAC factors of one layer (ruvector ``KFACLayer``); see the module docstring."""

    def __init__(self, input_dim: int, output_dim: int):
        if int(input_dim) < 1 or int(output_dim) < 1:
            raise ValueError(
                f"KFACLayer: `input_dim` and `output_dim` must be >= 1, got {input_dim} and {output_dim}."
            )
        self.a_factor = np.zeros((int(input_dim), int(input_dim)))
        self.g_factor = np.zeros((int(output_dim), int(output_dim)))
        self._damping = 1e-3
        self._ema_factor = 0.95
        self._num_updates = 0

    @classmethod
    def new(cls, input_dim: int, output_dim: int) -> KFACLayer:
        return cls(input_dim, output_dim)

    @property
    def damping(self) -> float:
        return self._damping

    @property
    def ema_factor(self) -> float:
        return self._ema_factor

    @property
    def num_updates(self) -> int:
        return self._num_updates

    def with_damping(self, damping: float) -> KFACLayer:
        self._damping = _rust_max(damping, EPS)
        return self

    def with_ema(self, ema: float) -> KFACLayer:
        self._ema_factor = float(np.clip(float(ema), 0.0, 1.0))  # NaN stays NaN, as Rust's clamp
        return self

    def update(self, activations: Sequence[Sequence[float]], gradients: Sequence[Sequence[float]]) -> None:
        if len(activations) == 0 or len(gradients) == 0:
            raise EmptyInputError("batch")
        if len(gradients) != len(activations):
            raise DimensionMismatchError(len(activations), len(gradients))
        a = _rows(activations, self.a_factor.shape[0])
        d = _rows(gradients, self.g_factor.shape[0])
        with _x64():
            new_a, new_g = F.layer_factors(jnp.asarray(a)[:, None, :], jnp.asarray(d)[:, None, :], has_bias=False)
            old = F.KroneckerFactors(a=(jnp.asarray(self.a_factor),), g=(jnp.asarray(self.g_factor),))
            mixed = F.ema_update(old, F.KroneckerFactors(a=(new_a,), g=(new_g,)), self._ema_factor, self._num_updates,
                                 debias=False)
            self.a_factor, self.g_factor = np.asarray(mixed.a[0]), np.asarray(mixed.g[0])
        self._num_updates += 1

    def _inverses(self) -> F.KroneckerFactors:
        factors = F.KroneckerFactors(a=(jnp.asarray(self.a_factor),), g=(jnp.asarray(self.g_factor),))
        inverses = F.factor_inverses(factors, self._damping, kind="trace", solver=Cholesky())
        if not bool(tree_all_finite(inverses)):
            raise NumericalInstabilityError("Matrix not positive definite in K-FAC")
        return inverses

    def natural_gradient(self, weight_grad: Sequence[Sequence[float]]) -> np.ndarray:
        """``G_d^{-1} dW A_d^{-1}`` for ``dW`` of shape ``(output_dim, input_dim)``."""
        output_dim, input_dim = self.g_factor.shape[0], self.a_factor.shape[0]
        if len(weight_grad) != output_dim:
            raise DimensionMismatchError(output_dim, len(weight_grad))
        w = _rows(weight_grad, input_dim)
        with _x64():
            inverses = self._inverses()
            # fishr works in the (in, out) layout: (A^-1 dW^T G^-1)^T = G^-1 dW A^-1.
            nat = F.precondition_matrix(jnp.asarray(w).T, inverses.a[0], inverses.g[0]).T
            return np.asarray(nat)

    def reset(self) -> None:
        self.a_factor = np.zeros_like(self.a_factor)
        self.g_factor = np.zeros_like(self.g_factor)
        self._num_updates = 0


class KFACApproximation:
    """K-FAC over a list of layers (ruvector ``KFACApproximation``); see the module docstring."""

    def __init__(self, layer_dims: Sequence[tuple[int, int]]):
        self._layers = [KFACLayer(i, o) for i, o in layer_dims]
        self._learning_rate = 0.01
        self._damping = 1e-3

    @classmethod
    def new(cls, layer_dims: Sequence[tuple[int, int]]) -> KFACApproximation:
        return cls(layer_dims)

    @property
    def learning_rate(self) -> float:
        return self._learning_rate

    @property
    def damping(self) -> float:
        return self._damping

    def with_learning_rate(self, lr: float) -> KFACApproximation:
        self._learning_rate = _rust_max(lr, EPS)
        return self

    def with_damping(self, damping: float) -> KFACApproximation:
        self._damping = _rust_max(damping, EPS)
        for layer in self._layers:
            layer._damping = float(damping)  # unclamped, as in the seed
        return self

    def _layer(self, layer_idx: int) -> KFACLayer:
        if not 0 <= int(layer_idx) < len(self._layers):
            raise InvalidParameterError("layer_idx", "index out of bounds")
        return self._layers[int(layer_idx)]

    def update_layer(self, layer_idx: int, activations, gradients) -> None:
        self._layer(layer_idx).update(activations, gradients)

    def natural_gradient_layer(self, layer_idx: int, weight_grad) -> np.ndarray:
        """``-learning_rate * natural_gradient`` of layer ``layer_idx``."""
        return -self._learning_rate * self._layer(layer_idx).natural_gradient(weight_grad)

    def num_layers(self) -> int:
        return len(self._layers)

    def reset(self) -> None:
        for layer in self._layers:
            layer.reset()
