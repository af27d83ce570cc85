"""fishr: JAX-native natural-gradient preconditioners as optax transformations.

Every method preconditions a gradient with ``(F + damping)^{-1}`` for some
approximation ``F`` of the covariance of per-sample score gradients.

Transforms (``optax.GradientTransformationExtraArgs``) and their pure solves:

* :func:`sr` / :func:`sr_solve`: stochastic reconfiguration (lazy, dense and
  sample-space modes, SPRING momentum; robust SR, spectral and signal-to-noise solves
  (:class:`Spectral`), conditioning control, MARCH and other diagonal metrics, sample
  weights, score clipping, pruning: :mod:`fishr.spectral`); extra argument ``batch=``.
* :func:`kfac`: block K-FAC for Flax dense layers (layers captured from an
  unmodified model); extra argument ``batch=``. Its pure functions are in
  :mod:`fishr.kronecker`.
* :func:`branch_natgrad` / :func:`branch_natgrad_solve`, :func:`branch_kfac` /
  :func:`branch_kfac_solve`: natural gradient from the covariance of state branches
  (:func:`branch_covariance`) mapped by a projection, and its block-diagonal variant;
  extra argument ``branches=``. :func:`clip_params` is the seeds' parameter clip.

Adaptive steps (chain them after a preconditioner; math in their docstrings):
:func:`quadratic_step` (step size and momentum from the exact quadratic model),
:func:`levenberg_marquardt` (the damping, one value shared by the chain it wraps),
:func:`trust_region` (SR steps of bounded, self-adapting length in the metric ``S``) and
:func:`adaptive_kfac` (K-FAC with all three, no learning rate); the exact curvature
they use is in :mod:`fishr.curvature`.

Solver objects (:mod:`fishr.solvers`): :class:`CG`, :class:`Cholesky`, :class:`Eigh`,
:class:`Spectral` (SR's eigendecomposition solves with cutoffs, :mod:`fishr.spectral`);
every solve returns ``(x, SolveInfo)``.

Modules, each importable by its dotted path: :mod:`fishr.distributed` (device-aware
reductions), :mod:`fishr.linalg` (numerical routines), :mod:`fishr.solvers`,
:mod:`fishr.capture` (layer capture shared by K-FAC and structured SR),
:mod:`fishr.jacobian` (representations of SR's Jacobian), :mod:`fishr.kronecker`
(K-FAC's factor math), :mod:`fishr.scores` (per-sample scores), :mod:`fishr.compat`
(the seeds' interfaces).
"""

from fishr import capture, compat, curvature, distributed, jacobian, kronecker, linalg, scores, solvers, spectral
from fishr._adaptive import (
    EnergyStats,
    LevenbergMarquardtState,
    QuadraticStepState,
    TrustRegionState,
    adaptive_kfac,
    energy_stats,
    levenberg_marquardt,
    quadratic_model,
    quadratic_step,
    quadratic_step_state,
    trust_region,
)
from fishr._branch import (
    BranchState,
    branch_covariance,
    branch_kfac,
    branch_kfac_solve,
    branch_natgrad,
    branch_natgrad_solve,
    clip_params,
)
from fishr._kfac import KFACState, kfac
from fishr._sr import SRState, sr
from fishr._sr_solve import MODES as SR_MODES
from fishr._sr_solve import sr_solve
from fishr.linalg import SolveInfo
from fishr.solvers import CG, Cholesky, Eigh, Spectral

__version__ = "0.2.0"

__all__ = [
    "CG",
    "SR_MODES",
    "BranchState",
    "Cholesky",
    "Eigh",
    "EnergyStats",
    "KFACState",
    "LevenbergMarquardtState",
    "QuadraticStepState",
    "SRState",
    "SolveInfo",
    "Spectral",
    "TrustRegionState",
    "adaptive_kfac",
    "branch_covariance",
    "branch_kfac",
    "branch_kfac_solve",
    "branch_natgrad",
    "branch_natgrad_solve",
    "capture",
    "clip_params",
    "compat",
    "curvature",
    "distributed",
    "energy_stats",
    "jacobian",
    "kfac",
    "kronecker",
    "levenberg_marquardt",
    "linalg",
    "quadratic_model",
    "quadratic_step",
    "quadratic_step_state",
    "scores",
    "solvers",
    "spectral",
    "sr",
    "sr_solve",
    "trust_region",
]
