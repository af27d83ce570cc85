"""fishr: JAX-native natural-gradient preconditioners as optax transformations.

Every method preconditions a gradient with ``(F + damping)^{-1}`` for some
approximation ``F`` of the covariance of per-sample score gradients:

* :func:`fishr.sr` / :func:`fishr.fisher_inverse_fn`: stochastic reconfiguration
  (lazy, dense and sample-space modes, SPRING momentum).
* :func:`fishr.kfac`: block K-FAC for Flax dense layers (layers captured from an
  unmodified model); pure functions ``kfac_statistics``, ``kfac_ema_update``,
  ``kfac_inverses``, ``kfac_precondition``, ``capture_layers``.
* :func:`fishr.branch_natgrad` / :func:`fishr.branch_kfac`: natural gradient from
  the covariance of state branches mapped by a projection (CG or exact), and its
  block-diagonal variant; pure functions ``branch_natgrad_solve``,
  ``branch_kfac_solve``, ``branch_covariance``; ``clip_params`` for the seeds' clip.
"""

from fishr import distributed, linalg
from fishr.linalg import CGInfo
from fishr.sr import SRState, fisher_inverse_fn, sr, sr_solve
from fishr.kfac import KFACState, KroneckerFactors, capture_layers, kfac  # noqa: E402  (binds fishr.kfac to the factory)
from fishr.kfac import ema_update as kfac_ema_update
from fishr.kfac import factor_inverses as kfac_inverses
from fishr.kfac import factor_statistics as kfac_statistics
from fishr.kfac import precondition as kfac_precondition
from fishr.branch import (
    BranchKFACState,
    BranchNatGradState,
    branch_covariance,
    branch_kfac,
    branch_kfac_solve,
    branch_natgrad,
    branch_natgrad_solve,
    clip_params,
)

__version__ = "0.1.0"

__all__ = [
    "CGInfo",
    "SRState",
    "distributed",
    "fisher_inverse_fn",
    "linalg",
    "sr",
    "sr_solve",
    "KFACState",
    "KroneckerFactors",
    "capture_layers",
    "kfac",
    "kfac_ema_update",
    "kfac_inverses",
    "kfac_precondition",
    "kfac_statistics",
    "BranchKFACState",
    "BranchNatGradState",
    "branch_covariance",
    "branch_kfac",
    "branch_kfac_solve",
    "branch_natgrad",
    "branch_natgrad_solve",
    "clip_params",
]
