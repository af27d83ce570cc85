"""Block K-FAC: Kronecker-factored Fisher blocks of Flax dense layers.

* :mod:`fishr.kfac.capture`: per-sample layer inputs ``a_i`` and output gradients
  ``d_i`` of an unmodified Flax model, from one forward and one backward pass.
* :mod:`fishr.kfac.factors`: factor statistics ``A``, ``G``, the seed's EMA, trace / pi
  damping, Cholesky / eigh inverses, preconditioning of a gradient pytree.
* :mod:`fishr.kfac.scores`: per-sample scores (log psi, or a log-likelihood with
  sampled labels for the true Fisher or data labels for the empirical one).
* :mod:`fishr.kfac.transform`: :func:`kfac`, the optax transformation.

``fishr.kfac`` (the package attribute of :mod:`fishr`) is the transform factory;
import the pure functions from here or from :mod:`fishr` directly.
"""

from fishr.kfac import capture, factors, scores, transform
from fishr.kfac.capture import Captured, LayerInfo, LayerPlan, capture as capture_layers, discover_layers, linearize_layers
from fishr.kfac.factors import (
    KroneckerFactors,
    damping_shifts,
    ema_update,
    factor_inverses,
    factor_statistics,
    layer_factors,
    precondition,
)
from fishr.kfac.scores import make_score_fn
from fishr.kfac.transform import KFACState, kfac

__all__ = [
    "Captured",
    "KFACState",
    "KroneckerFactors",
    "LayerInfo",
    "LayerPlan",
    "capture_layers",
    "damping_shifts",
    "discover_layers",
    "ema_update",
    "factor_inverses",
    "factor_statistics",
    "kfac",
    "layer_factors",
    "linearize_layers",
    "make_score_fn",
    "precondition",
]
