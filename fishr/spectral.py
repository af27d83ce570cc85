r"""Spectral SR: a function of the metric ``S`` applied to a vector, from an eigendecomposition.

Every SR variant that fishr solves by eigendecomposition is ``x = f(S) b`` for one real
function ``f`` of the eigenvalues ``sigma >= 0`` of ``S`` (``sigma`` below is always an
eigenvalue of ``S = Obar^H Obar / N``; the sample-space kernel ``K = Obar Obar^H`` has
eigenvalues ``lambda = N sigma``). With ``d`` the damping (the diagonal shift):

    f(sigma) = gain(sigma) * cutoff(sigma + d) * snr_weight

* ``gain``: plain SR ``1 / (sigma + d)``; robust SR (:func:`robust_gamma`)
  ``(sigma + gamma d^2) / (sigma + d)^2``, which is ``1 / (sigma + d)`` for
  ``gamma = 1 / d`` and tends to ``gamma`` (a gradient step of that size) where
  ``sigma -> 0`` instead of ``1 / d``.
* ``cutoff`` of the shifted eigenvalue ``h = sigma + d`` relative to the largest
  ``h_max``: hard, ``h > rtol h_max`` (else 0, the pseudo-inverse), times smooth,
  ``1 / (1 + (rtol_smooth h_max / h)^6)`` (NetKet's ``pinv_smooth`` weight).
* ``snr_weight``, per eigendirection ``k`` (:func:`snr_weights`): the direction's
  signal-to-noise ratio of the force, ``SNR_k = |rho_k| / sqrt(var_k / N)`` with
  ``rho_k = mean_i Q_ik`` and ``var_k = mean_i |Q_ik - rho_k|^2`` of the per-sample
  contributions ``Q_ik`` of sample ``i`` to the force's component along the direction;
  the weight is ``1 / (1 + (snr / SNR_k)^6)``.

The damping used (:class:`DampingRule`): ``d = damping + trace_damping * tr S`` (quantax's
shift, ``ashift + rshift Tr S``), then, with ``max_cond_num = kappa`` (conditioning
control, :func:`conditioned_damping`), ``d' = max(d, (h_max - kappa h_min) / (kappa - 1))``,
the least ``d' >= d`` with ``(h_max + d') / (h_min + d') <= kappa``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fishr import distributed
from fishr.distributed import AxisName

__all__ = [
    "DampingRule",
    "conditioned_damping",
    "robust_correction",
    "robust_gamma",
    "snr_weights",
    "spectral_filter",
    "sr_gain",
]


def robust_gamma(gamma: Any, damping: Any) -> Any:
    """The robust-SR ``gamma`` for a damping: a number as given, ``"sqrt"`` is ``damping^{-1/2}``,
    ``None`` (plain SR) is ``1 / damping``."""
    if gamma is None:
        return 1.0 / damping
    if isinstance(gamma, str):  # "sqrt", validated by the caller
        return jax.lax.rsqrt(jnp.asarray(damping, jnp.result_type(float)))
    return gamma


def robust_correction(gamma: Any, damping: Any) -> Any:
    """``gamma d^2 - d``: robust SR's ``G(S) = (S + d)^{-1} + (gamma d^2 - d) (S + d)^{-2}`` (0 for plain SR)."""
    return robust_gamma(gamma, damping) * damping**2 - damping


def sr_gain(sigma: jax.Array, damping: Any, gamma: Any = None) -> jax.Array:
    """``1 / (sigma + d)`` (``gamma=None``) or robust SR's ``(sigma + gamma d^2) / (sigma + d)^2``."""
    if gamma is None:
        return 1.0 / (sigma + damping)
    return (sigma + robust_gamma(gamma, damping) * damping**2) / (sigma + damping) ** 2


def spectral_filter(sigma: jax.Array, damping: Any, *, gamma: Any = None, rtol: float | jax.Array = 0.0,
                    rtol_smooth: float | jax.Array = 0.0, weights: jax.Array | None = None,
                    sigma_max: jax.Array | None = None) -> jax.Array:
    """``f(sigma)`` of the module docstring for eigenvalues ``sigma`` of ``S`` (clipped at 0).

    ``weights``: SNR weights per eigenvalue (``None`` for none); ``sigma_max``: the
    largest eigenvalue of ``S`` (default ``max(sigma)``), which the relative cutoffs
    refer to. A direction with ``sigma + d = 0`` gets ``f = 0`` when a cutoff removes it
    and ``inf`` otherwise (an undamped singular ``S`` has no inverse).
    """
    sigma = jnp.maximum(jnp.real(sigma), 0)
    if sigma_max is None:
        sigma_max = jnp.max(sigma)
    h = sigma + damping
    h_max = sigma_max + damping
    keep = h > rtol * h_max if rtol > 0 else jnp.ones(h.shape, bool)
    smooth = 1.0
    if rtol_smooth > 0:
        ratio = rtol_smooth * h_max / jnp.where(h > 0, h, 1)
        smooth = jnp.where(h > 0, 1.0 / (1.0 + ratio**6), 0.0)
    gain = sr_gain(jnp.where(keep, sigma, 1.0), damping, gamma)
    f = jnp.where(keep, gain * smooth, 0.0)
    if weights is not None:
        f = f * weights
    return f


def snr_weights(contributions: jax.Array, snr: float, axis_name: AxisName = None) -> jax.Array:
    """``1 / (1 + (snr / SNR_k)^6)`` from per-sample contributions ``Q`` (``(n_local, K)``).

    ``rho_k = mean_i Q_ik``, ``var_k = mean_i |Q_ik|^2 - |rho_k|^2`` (means over all ``N``
    samples, across the devices of ``axis_name``), ``SNR_k = |rho_k| / sqrt(var_k / N)``;
    a direction with no noise (``var_k = 0``) has weight 1 unless its signal is 0 too
    (weight 0).
    """
    num_samples = distributed.batch_size(contributions.shape[0], axis_name)
    rho, second = distributed.batch_mean((contributions, jnp.abs(contributions) ** 2), axis_name)
    var = jnp.maximum(second - jnp.abs(rho) ** 2, 0)
    noise = jnp.sqrt(var / num_samples)
    ratio = jnp.where(jnp.abs(rho) > 0, snr * noise / jnp.where(jnp.abs(rho) > 0, jnp.abs(rho), 1), jnp.inf)
    return 1.0 / (1.0 + ratio**6)


def conditioned_damping(damping: Any, h_max: jax.Array, h_min: jax.Array, max_cond_num: float | None) -> Any:
    """The least damping ``>= damping`` with ``(h_max + d) / (h_min + d) <= max_cond_num`` (``None``: ``damping``)."""
    if max_cond_num is None:
        return damping
    needed = (h_max - max_cond_num * h_min) / (max_cond_num - 1.0)
    return jnp.maximum(damping, needed.astype(jnp.result_type(damping, needed)))


@dataclasses.dataclass(frozen=True)
class DampingRule:
    """How the damping used is made from the damping asked for (module docstring).

    Attributes:
      trace_damping: ``t >= 0``; adds ``t * tr S`` to the damping.
      max_cond_num: ``None`` or ``kappa > 1``; raises the damping to bound the condition number.
    """

    trace_damping: float = 0.0
    max_cond_num: float | None = None

    @property
    def active(self) -> bool:
        """Whether the rule changes anything (and so needs ``tr S`` or the eigenvalues)."""
        return self.trace_damping > 0 or self.max_cond_num is not None

    def __call__(self, damping: Any, trace: Any, h_max: Any = None, h_min: Any = 0.0) -> Any:
        """The damping used, from ``tr S`` and the extreme eigenvalues of ``S``.

        ``h_max=None`` bounds it by ``tr S`` (and ``h_min = 0`` bounds the smallest from
        below), so the condition-number bound holds whatever the spectrum.
        """
        if self.trace_damping:
            damping = damping + self.trace_damping * trace
        return conditioned_damping(damping, trace if h_max is None else h_max, h_min, self.max_cond_num)
