"""fishr: JAX-native natural-gradient preconditioners as optax transformations.

Every method preconditions a gradient with ``(F + damping)^{-1}`` for some
approximation ``F`` of the covariance of per-sample score gradients:

* :func:`fishr.sr` / :func:`fishr.fisher_inverse_fn`: stochastic reconfiguration
  (lazy, dense and sample-space modes, SPRING momentum).
"""

from fishr import distributed, linalg
from fishr.linalg import CGInfo
from fishr.sr import SRState, fisher_inverse_fn, sr, sr_solve

__version__ = "0.1.0"

__all__ = [
    "CGInfo",
    "SRState",
    "distributed",
    "fisher_inverse_fn",
    "linalg",
    "sr",
    "sr_solve",
]
