r"""Adaptive step size, momentum and damping, as optax pieces that follow any preconditioner.

:func:`~fishr.quadratic_step` (chain it after a preconditioner)
----------------------------------------------------------------
With ``g`` the gradient, ``Delta`` the preconditioned direction (the incoming updates,
e.g. ``(F + damping)^{-1} g``), ``v`` the previous update and ``C`` the exact curvature on
the current batch (:mod:`fishr.curvature`), the update is ``delta = a Delta + b v`` with
the coefficients that minimise the damped quadratic model of the loss over that span::

    M(delta) = g . delta + 1/2 delta^T (C + damping I) delta

i.e. ``A w = -r`` with ``A = G + damping D``, ``G_jk = u_j^T C u_k``, ``D_jk = u_j . u_k``,
``r_j = g . u_j`` and ``(u_1, u_2) = (Delta, v)`` (:func:`~fishr.quadratic_model`). The sign is
part of ``delta``: apply it with ``optax.apply_updates`` (no ``optax.sgd`` after it).
``learning_rate`` / ``momentum`` fix ``-a`` / ``b`` instead of adapting them (kfac-jax's
``use_adaptive_learning_rate`` / ``use_adaptive_momentum``). Where ``v = 0`` (the first
step) or ``v`` is parallel to ``Delta`` (the 2 x 2 system is singular to working
precision), the momentum is 0 and ``a`` comes from the 1 x 1 model.

:func:`~fishr.levenberg_marquardt` (wrap a chain)
-------------------------------------------------
Holds the damping (one value) and passes it, with the gradient, as the extra arguments
``damping=`` and ``grad=`` to every transform of the chain it wraps (:func:`fishr.kfac`,
:func:`fishr.sr` and :func:`~fishr.quadratic_step` read them). Every ``interval`` steps (on
steps ``t`` with ``(t + 1) % interval == 0``) it evaluates the reduction ratio on the
current batch::

    rho = (L(params + delta) - L(params)) / M0(delta)

with ``M0`` the model change without the damping term (``include_damping=True``: with
it), taken from the :func:`~fishr.quadratic_step` inside the chain; a NaN ratio counts as
``-100``. Then ``damping /= decay**interval`` if ``rho < lower``, ``damping *=
decay**interval`` if ``rho > upper``, clipped to ``[min_damping, max_damping]``.
Defaults (``interval=5``, ``decay=0.9``, ``lower=0.25``, ``upper=0.75``) are
kfac-jax's and Martens & Grosse (2015)'s.

:func:`~fishr.trust_region` (chain it after :func:`fishr.sr`)
-------------------------------------------------------------
``delta = -m_t eta x`` with ``eta = min(lr, sqrt(max_norm / x^T S x))``: without the
factor ``m_t`` the step's squared length in the metric ``S`` (exact,
:func:`fishr.curvature.fisher`) stays under ``max_norm`` (the norm constraint of FermiNet
and vmcnet, with the exact metric instead of ``x . g``). ``max_norm`` may depend on the
step and on the local energies' statistics (:class:`EnergyStats`).

The factor ``m_t`` (``adapt_rate = kappa > 0``, the default) follows Kesten's rule for
stochastic approximation (Kesten, 1958), measured in the metric: with ``x_t`` the
incoming direction and ``x_{t-1}`` the previous accepted one, both on the current batch::

    c_t = x_t^T S x_{t-1} / sqrt((x_t^T S x_t) (x_{t-1}^T S x_{t-1}))   (0 at the first step)
    m_t = clip(m_{t-1} exp(kappa c_t), 1 / adapt_range, adapt_range),   m_{-1} = 1.

Successive directions that agree (``c > 0``: the state still drifts towards lower
energy) lengthen the step; directions that turn back (``c < 0``) shorten it. They turn
back in two cases, both of which call for a shorter step: the iteration overshoots a
direction of high curvature (a step beyond ``1 / h`` along it), or the state has
reached the level where the Monte Carlo noise of the gradient dominates: for a noisy
quadratic at step ``eta``, successive steps of the stationary iteration have
correlation ``-eta^3 h sigma^2 / (2 - eta h) < 0``. So the step grows from a too small
``lr`` / ``max_norm``, shrinks from a too large one, and decreases as the run
reaches its noise floor (an annealing the run does not have to schedule). ``lr``
and ``max_norm`` are then the values the step starts from; ``delta^T S delta <= m_t^2
max_norm``. ``adapt_rate=0`` is the fixed trust region (``m = 1``).

Non-finite values: if the incoming direction, the gradient, the curvature or the
coefficients are not finite, the update is NaN and the state is left exactly as it
was (``optax.apply_if_finite`` then skips the step). :func:`~fishr.levenberg_marquardt` keeps
its state too when the update it returns is not finite; a finite update whose trial
loss is not finite counts as ``rho = -100`` (the damping grows).

Multi-device: parameters and gradients are the global ones on every device; the
curvature's means and the losses and energies are averaged through
:mod:`fishr.distributed` (``axis_name``), so every coefficient, damping and bound is the
same on every device and equal to the one-device value.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fishr import distributed
from fishr._kfac import kfac
from fishr._precision import DEFAULT_MATMUL_PRECISION, check_matmul_precision, traced_at
from fishr._validate import (
    ScalarOrSchedule,
    check_damping,
    check_int,
    check_real,
    damping_at,
    damping_ok,
    next_count,
    poison,
    shared_damping,
    tree_all_finite,
)
from fishr.curvature import Curvature, gauss_newton
from fishr.distributed import AxisName
from fishr.scores import mean_loss

__all__ = [
    "EnergyStats",
    "LevenbergMarquardtState",
    "QuadraticStepState",
    "TrustRegionState",
    "adaptive_kfac",
    "energy_stats",
    "levenberg_marquardt",
    "quadratic_model",
    "quadratic_step",
    "quadratic_step_state",
    "trust_region",
]



# --------------------------------------------------------------------------- the quadratic model


def _real_dtype(params: Any) -> Any:
    """The real dtype the adaptive states keep their scalars in: that of the parameters (real part)."""
    return jnp.result_type(*[jnp.real(jnp.zeros((), x.dtype)) for x in jax.tree.leaves(params)] or [float])


def _vdot(a: Any, b: Any) -> jax.Array:
    """Real inner product of two parameter pytrees (``Re sum conj(a) b``)."""
    return sum((jnp.vdot(x, y).real for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), jnp.zeros(()))


def quadratic_model(
    curvature_gram: jax.Array,
    vector_gram: jax.Array,
    grad_dots: jax.Array,
    damping: Any,
    *,
    learning_rate: Any | None = None,
    momentum: Any | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Coefficients ``w`` minimising ``M(w) = r^T w + 1/2 w^T (G + damping D) w`` (module docstring).

    Args:
      curvature_gram: ``G``, ``(k, k)`` with ``k`` 1 (``Delta``) or 2 (``Delta``, ``v``).
      vector_gram: ``D``, the plain inner products of the same vectors.
      grad_dots: ``r``, ``(k,)``, the gradient's inner products with them.
      damping: the damping added to the curvature.
      learning_rate: ``None`` (adapt ``w_0``) or a value: ``w_0 = -learning_rate``.
      momentum: ``None`` (adapt ``w_1``) or a value: ``w_1 = momentum``; ignored for ``k = 1``.

    Returns:
      ``(w, M(w), M0(w))``: the coefficients ``(k,)``, the damped model change and the
      change without the damping term. An adapted coefficient whose diagonal entry is
      0 with a zero right-hand side is 0 (a zero vector); the momentum falls back to 0
      where ``v = 0`` or ``v`` is parallel to ``Delta``.
    """
    g = jnp.asarray(curvature_gram)
    d = jnp.asarray(vector_gram)
    r = jnp.asarray(grad_dots)
    k = r.shape[0]
    a = g + damping * d

    def one(aa, rhs):  # -rhs / aa; 0 for 0 / 0 (a zero vector); +-inf (a rejected step) for an unbounded model
        return jnp.where((aa == 0) & (rhs == 0), jnp.zeros_like(rhs), -rhs / aa)

    if k == 1:
        w = jnp.reshape(one(a[0, 0], r[0]) if learning_rate is None else -jnp.asarray(learning_rate, r.dtype), (1,))
    else:
        if learning_rate is None and momentum is None:
            det = a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0]
            tiny = 100 * jnp.finfo(r.dtype).eps
            singular = (a[1, 1] == 0) | (det <= tiny * jnp.abs(a[0, 0] * a[1, 1]))
            safe_det = jnp.where(singular, 1.0, det)
            both = jnp.stack([(-r[0] * a[1, 1] + r[1] * a[0, 1]) / safe_det,
                              (-r[1] * a[0, 0] + r[0] * a[1, 0]) / safe_det])
            alone = jnp.stack([one(a[0, 0], r[0]), jnp.zeros_like(r[0])])
            w = jnp.where(singular, alone, both)
        elif learning_rate is None:
            mu = jnp.asarray(momentum, r.dtype)
            w = jnp.stack([one(a[0, 0], r[0] + a[0, 1] * mu), mu])
        elif momentum is None:
            w0 = -jnp.asarray(learning_rate, r.dtype)
            w = jnp.stack([w0, one(a[1, 1], r[1] + a[1, 0] * w0)])
        else:
            w = jnp.stack([-jnp.asarray(learning_rate, r.dtype), jnp.asarray(momentum, r.dtype)])
    change0 = r @ w + 0.5 * w @ g @ w
    return w, change0 + 0.5 * damping * (w @ d @ w), change0


class QuadraticStepState(NamedTuple):
    """State of :func:`quadratic_step`.

    Attributes:
      count: accepted (finite) steps.
      previous: the last update ``delta`` (zeros before the first step): the momentum vector ``v``.
      coefficients: ``(a, b)`` of the last accepted step (``delta = a Delta + b v``).
      model_change: ``M0(delta)``, the model change without the damping term, of the last step.
      damped_model_change: ``M(delta)``, with it.
    """

    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  (optax states name it count too)
    previous: Any
    coefficients: jax.Array
    model_change: jax.Array
    damped_model_change: jax.Array

    @property
    def learning_rate(self) -> jax.Array:
        """The step size of the last step, ``-a`` (positive for a descent step)."""
        return -self.coefficients[0]

    @property
    def momentum(self) -> jax.Array:
        """The momentum coefficient ``b`` of the last step."""
        return self.coefficients[1]


def quadratic_step(
    curvature: Curvature,
    *,
    learning_rate: ScalarOrSchedule | None = None,
    momentum: ScalarOrSchedule | None = None,
    damping: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Step size and momentum from the exact quadratic model (module docstring) as an optax transformation.

    ``update(direction, state, params, *, grad, batch, damping=None)`` returns the final
    update ``delta = a direction + b previous`` (sign included)::

        opt = optax.chain(fishr.kfac(model.apply, likelihood="gaussian", example_batch=batch),
                          fishr.quadratic_step(fishr.curvature.gauss_newton(model.apply, "gaussian"),
                                               damping=1e-3))
        updates, state = opt.update(grads, state, params, batch=batch, grad=grads)

    Args:
      curvature: ``(params, batch, vectors) -> (k, k)`` Gram matrix of the exact curvature
        (:mod:`fishr.curvature`), matching the preconditioner's metric.
      learning_rate: ``None`` (adaptive, default) or a fixed value / schedule of the count.
      momentum: ``None`` (adaptive, default), ``0`` (none: one curvature product fewer), or
        a fixed value / schedule.
      damping: the damping of the model, used when the chain passes no ``damping=``
        (:func:`levenberg_marquardt` passes its adapted value; pass the same value to the
        preconditioner otherwise).

    Extra arguments of ``update``: ``grad`` (the gradient the direction was preconditioned
    from; required), ``batch`` (the curvature's batch; required), ``damping`` (overrides
    the constructor's).
    """
    who = "fishr.quadratic_step"
    if not callable(curvature):
        raise TypeError(f"{who}: `curvature` must be a function (params, batch, vectors) -> (k, k) "
                        f"(see fishr.curvature), got {type(curvature).__name__}.")
    for name, value in (("learning_rate", learning_rate), ("momentum", momentum)):
        if value is not None and not callable(value):
            check_damping(value, who, name=name)
    if damping is not None:
        check_damping(damping, who)
    use_momentum = not (momentum is not None and not callable(momentum) and float(momentum) == 0.0)

    def init_fn(params):
        dtype = _real_dtype(params)
        zero = jnp.zeros((), dtype)
        return QuadraticStepState(
            count=jnp.zeros((), jnp.int32),
            previous=optax.tree.zeros_like(params),
            coefficients=jnp.zeros((2,), dtype),
            model_change=zero,
            damped_model_change=zero,
        )

    def update_fn(updates, state, params=None, *, grad=None, batch=None, **extra_args):
        direction = updates
        if params is None or grad is None or batch is None:
            missing = [n for n, v in (("params", params), ("grad=", grad), ("batch=", batch)) if v is None]
            raise ValueError(f"{who}: update needs {', '.join(missing)} (the gradient, and the batch the "
                             "curvature is evaluated on).")
        if any(jnp.iscomplexobj(x) for x in jax.tree.leaves(params)):
            raise ValueError(f"{who}: complex parameters are not supported (the model is over real coefficients); "
                             "use fishr.trust_region for holomorphic SR.")
        damping_now = shared_damping(extra_args, damping, state.count, who)
        if damping_now is None:
            raise ValueError(f"{who}: no damping: pass `damping=` to quadratic_step or to update, or wrap the chain "
                             "in fishr.levenberg_marquardt.")
        vectors = [direction, state.previous] if use_momentum else [direction]
        k = len(vectors)
        gram = curvature(params, batch, vectors)
        if jnp.shape(gram) != (k, k):
            raise ValueError(f"{who}: `curvature` must return a ({k}, {k}) array for {k} vectors; got "
                             f"shape {jnp.shape(gram)}.")
        dtype = state.coefficients.dtype
        gram = jnp.asarray(gram, dtype)
        vector_gram = jnp.stack([jnp.stack([_vdot(u, w) for w in vectors]) for u in vectors]).astype(dtype)
        grad_dots = jnp.stack([_vdot(grad, u) for u in vectors]).astype(dtype)
        lr = damping_at(learning_rate, state.count)
        mu = damping_at(momentum, state.count) if use_momentum else None
        w, damped_change, change = quadratic_model(gram, vector_gram, grad_dots, jnp.asarray(damping_now, dtype),
                                                   learning_rate=lr, momentum=mu)
        delta = jax.tree.map(lambda x: w[0].astype(x.dtype) * x, direction)
        if use_momentum:
            delta = jax.tree.map(lambda x, v: x + w[1].astype(x.dtype) * v, delta, state.previous)
        ok = tree_all_finite((w, damped_change, grad_dots, gram)) & damping_ok(damping_now)
        delta = poison(delta, ok)
        new_state = QuadraticStepState(
            count=next_count(state.count),
            previous=delta,
            coefficients=jnp.zeros((2,), dtype).at[:k].set(w),
            model_change=change,
            damped_model_change=damped_change,
        )
        new_state = optax.tree.where(tree_all_finite(delta), new_state, state)
        return delta, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- Levenberg-Marquardt damping


class LevenbergMarquardtState(NamedTuple):
    """State of :func:`levenberg_marquardt`.

    Attributes:
      count: accepted (finite) steps.
      damping: the damping the next step uses (the one value the whole chain sees).
      rho: the last reduction ratio evaluated (NaN before the first).
      inner_state: the wrapped chain's state.
    """

    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  (optax states name it count too)
    damping: jax.Array
    rho: jax.Array
    inner_state: Any


def _quadratic_step_states(state: Any) -> list[QuadraticStepState]:
    return [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, QuadraticStepState))
            if isinstance(s, QuadraticStepState)]


def quadratic_step_state(state: Any) -> QuadraticStepState:
    """The :class:`QuadraticStepState` inside an optimizer state (e.g. :func:`adaptive_kfac`'s), to read
    the adapted ``.learning_rate`` and ``.momentum``."""
    found = _quadratic_step_states(state)
    if len(found) != 1:
        raise ValueError(f"fishr.quadratic_step_state: expected one QuadraticStepState in `state`, found {len(found)}.")
    return found[0]


def _model_changes(inner_state: Any, include_damping: bool) -> list[jax.Array]:
    return [s.damped_model_change if include_damping else s.model_change for s in _quadratic_step_states(inner_state)]


def levenberg_marquardt(
    inner: optax.GradientTransformation,
    value_fn: Callable[[Any, Any], jax.Array],
    *,
    initial_damping: float = 1.0,
    interval: int = 5,
    decay: float = 0.9,
    lower: float = 0.25,
    upper: float = 0.75,
    min_damping: float = 1e-8,
    max_damping: float = float("inf"),
    include_damping: bool = False,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Levenberg-Marquardt damping around a chain that ends in :func:`quadratic_step` (module docstring).

    ``update(grads, state, params, *, batch, value=None, **extra)`` calls ``inner`` with the
    extra arguments ``damping=state.damping`` and ``grad=grads`` (and the caller's)::

        opt = fishr.levenberg_marquardt(
            optax.chain(fishr.kfac(model.apply, likelihood="gaussian", example_batch=batch),
                        fishr.quadratic_step(fishr.curvature.gauss_newton(model.apply, "gaussian"))),
            value_fn=loss_fn)
        updates, state = opt.update(grads, state, params, batch=batch, value=loss)

    Args:
      inner: the chain to wrap; it must contain one :func:`quadratic_step` (the model
        change for ``rho``).
      value_fn: ``(params, batch) -> loss``, the mean over the local batch (averaged over
        ``axis_name``).
      initial_damping: the damping of the first steps (``> 0``).
      interval: adapt every this many steps.
      decay: the factor per step; the damping changes by ``decay**interval``.
      lower, upper: thresholds on ``rho`` (raise below ``lower``, lower above ``upper``).
      min_damping, max_damping: the clip.
      include_damping: compare with the damped model change.
      axis_name: mapped axis name(s) when the batch is split over devices.

    Extra arguments of ``update``: ``batch`` (required), ``value`` (the loss at ``params``
    on this batch, if the caller has it; saves a forward pass on adaptation steps). ``value``
    must be ``value_fn(params, batch)`` itself (the same loss, regularisers included, the
    mean over the same batch): ``rho`` compares it with ``value_fn`` after the step.

    The adapted values are in the state: ``state.damping``, and the
    :class:`QuadraticStepState` inside ``state.inner_state`` (``.learning_rate``,
    ``.momentum``; :func:`quadratic_step_state` finds it).
    """
    who = "fishr.levenberg_marquardt"
    check_damping(initial_damping, who, positive=True, name="initial_damping")
    check_int(interval, who, "interval", 1)
    check_real(decay, who, "decay", 0.0, 1.0)
    if not (0 <= lower <= upper):
        raise ValueError(f"{who}: need 0 <= lower <= upper, got lower={lower!r}, upper={upper!r}.")
    if not (0 < min_damping <= initial_damping <= max_damping):
        raise ValueError(f"{who}: need 0 < min_damping <= initial_damping <= max_damping, got {min_damping!r}, "
                         f"{initial_damping!r}, {max_damping!r}.")
    factor = float(decay) ** interval
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        dtype = _real_dtype(params)
        return LevenbergMarquardtState(
            count=jnp.zeros((), jnp.int32),
            damping=jnp.asarray(initial_damping, dtype),
            rho=jnp.asarray(jnp.nan, dtype),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, *, batch=None, value=None, **extra_args):
        grads = updates
        if params is None or batch is None:
            raise ValueError(f"{who}: update needs `params` and `batch=` (the loss is evaluated on the batch).")
        for name in ("damping", "grad"):
            if name in extra_args:
                raise ValueError(f"{who}: do not pass `{name}=` to update: the wrapper passes its own "
                                 "(the damping lives in its state).")
        updates, inner_state = inner.update(grads, state.inner_state, params, batch=batch, value=value,
                                            damping=state.damping, grad=grads, **extra_args)
        changes = _model_changes(inner_state, include_damping)
        if len(changes) != 1:
            raise ValueError(f"{who}: `inner` must contain exactly one fishr.quadratic_step (its model change "
                             f"gives rho); found {len(changes)}.")
        predicted = changes[0]
        adapt = (state.count + 1) % interval == 0

        def ratio():
            old = distributed.pmean(value_fn(params, batch) if value is None else value, axis_name)
            new = distributed.pmean(value_fn(optax.apply_updates(params, updates), batch), axis_name)
            return jnp.asarray((new - old) / predicted, state.rho.dtype)

        rho = lax.cond(adapt, ratio, lambda: jnp.asarray(jnp.nan, state.rho.dtype))
        rho_or_low = jnp.nan_to_num(rho, nan=-100.0)
        damping_new = jnp.where(adapt & (rho_or_low < lower), state.damping / factor,
                                jnp.where(adapt & (rho_or_low > upper), state.damping * factor, state.damping))
        new_state = LevenbergMarquardtState(
            count=next_count(state.count),
            damping=jnp.clip(damping_new, min_damping, max_damping).astype(state.damping.dtype),
            rho=jnp.where(adapt, rho, state.rho),
            inner_state=inner_state,
        )
        new_state = optax.tree.where(tree_all_finite(updates), new_state, state)
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- Fisher-norm trust region


class EnergyStats(NamedTuple):
    """Statistics of the local energies over the global batch, for an adaptive trust-region bound.

    Attributes:
      mean: ``Re mean_i E_i``.
      variance: ``mean_i |E_i - mean_j E_j|^2``.
      count: the global number of samples ``N``.
    """

    mean: jax.Array
    variance: jax.Array
    count: int  # pyright: ignore[reportIncompatibleMethodOverride]  (optax states name it count too)


def energy_stats(local_energies: jax.Array, axis_name: AxisName = None) -> EnergyStats:
    """:class:`EnergyStats` of ``local_energies`` ``(n_local,)`` over the devices of ``axis_name``."""
    e = jnp.asarray(local_energies)
    mean = distributed.batch_mean(e, axis_name)
    variance = distributed.batch_mean(jnp.abs(e - mean) ** 2, axis_name)
    return EnergyStats(mean=jnp.real(mean), variance=variance, count=distributed.batch_size(e.shape[0], axis_name))


class TrustRegionState(NamedTuple):
    """State of :func:`trust_region`.

    Attributes:
      count: accepted (finite) steps.
      step_size: ``m eta`` of the last step (the update is ``-step_size x``).
      metric_norm: ``x^T S x`` of the last incoming direction.
      bound: the ``max_norm`` used at the last step.
      scale: the adaptive factor ``m`` (1 with ``adapt_rate=0``).
      cosine: ``c``, the metric cosine of the last two incoming directions (0 at the first step).
      previous: the last accepted incoming direction (``()`` with ``adapt_rate=0``).
    """

    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  (optax states name it count too)
    step_size: jax.Array
    metric_norm: jax.Array
    bound: jax.Array
    scale: jax.Array
    cosine: jax.Array
    previous: Any


def _takes_energy(fn: Callable) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        return False
    return len(params) == 2


def trust_region(
    curvature: Curvature,
    learning_rate: ScalarOrSchedule = 0.05,
    max_norm: ScalarOrSchedule | Callable[[jax.Array, EnergyStats], jax.Array] = 1e-3,
    *,
    adapt_rate: float = 0.1,
    adapt_range: float = 100.0,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """SR step with a bounded length in the metric and an adaptive scale (module docstring) as an optax transformation.

    ``update(x, state, params, *, batch, local_energies=None)`` returns ``-m eta x`` with
    ``eta = min(learning_rate, sqrt(max_norm / x^T S x))`` and ``m`` the Kesten factor of
    the module docstring (from the metric cosine of successive directions)::

        opt = optax.chain(fishr.sr(log_psi, damping=1e-3),
                          fishr.trust_region(fishr.curvature.fisher(log_psi), learning_rate=0.05, max_norm=1e-3))
        updates, state = opt.update(grads, state, params, batch=samples, local_energies=e_loc)

    Args:
      curvature: the metric's Gram function, normally :func:`fishr.curvature.fisher` of
        the same ``log psi`` (SR's ``S``; one Jacobian-vector product per step).
      learning_rate: the step size where the bound is not active (float or schedule); the
        default 0.05 and ``max_norm=1e-3`` are FermiNet's defaults for its norm constraint.
      max_norm: the bound on ``delta^T S delta``: a float, a schedule of the count, or a
        function ``(count, stats) -> bound`` of the count and the local energies'
        :class:`EnergyStats` (then ``local_energies=`` is required), e.g.
        ``lambda t, e: 1e-3 * e.variance`` for a bound that shrinks as the state
        approaches an eigenstate (zero variance); such a bound also grows with the
        variance, so a too large factor diverges (1e-2 did on both benchmark chains).
      adapt_rate: ``kappa``, the rate of the factor ``m`` (``log m`` moves by ``kappa c`` per
        step, ``|c| <= 1``); 0 keeps ``m = 1`` (the fixed trust region, one
        Jacobian-vector product per step instead of two). With the default 0.1 the final
        energy error of every base setting over a 100x span of ``learning_rate`` and
        ``max_norm`` was 0.76-1.07x that of the best hand-tuned plain-SR learning rate on
        the benchmark chains (``benchmarks/trust_region.py``, exact energies; README),
        against 1.11-1.62x for the fixed trust region; 0.03 gave 0.87-1.12x and 0.3
        0.92-1.31x (Ising and Heisenberg chains).
      adapt_range: ``m`` stays in ``[1 / adapt_range, adapt_range]`` (``>= 1``).
      axis_name: mapped axis name(s) when the samples are split over devices (the energy
        statistics; the curvature carries its own).
    """
    who = "fishr.trust_region"
    if not callable(curvature):
        raise TypeError(
            f"{who}: `curvature` must be a function (params, batch, vectors) -> (k, k) (see fishr.curvature)."
        )
    if not callable(learning_rate):
        check_damping(learning_rate, who, positive=True, name="learning_rate")
    if not callable(max_norm):
        check_damping(max_norm, who, positive=True, name="max_norm")
    check_real(adapt_rate, who, "adapt_rate", 0.0, 10.0)
    check_real(adapt_range, who, "adapt_range", 1.0, 1e12)
    bound_uses_energy = callable(max_norm) and _takes_energy(max_norm)
    adaptive = adapt_rate > 0

    def init_fn(params):
        dtype = _real_dtype(params)
        zero = jnp.zeros((), dtype)
        previous = jax.tree.map(jnp.zeros_like, params) if adaptive else ()
        return TrustRegionState(count=jnp.zeros((), jnp.int32), step_size=zero, metric_norm=zero, bound=zero,
                                scale=jnp.ones((), dtype), cosine=zero, previous=previous)

    def update_fn(updates, state, params=None, *, batch=None, local_energies=None, **extra_args):
        direction = updates
        del extra_args
        if params is None or batch is None:
            raise ValueError(f"{who}: update needs `params` and `batch=` (the metric is evaluated on the batch).")
        dtype = state.step_size.dtype
        if bound_uses_energy:
            if local_energies is None:
                raise ValueError(
                    f"{who}: this `max_norm` takes the energy statistics: pass `local_energies=` to update."
                )
            bound = cast(Callable, max_norm)(state.count, energy_stats(local_energies, axis_name))
        else:
            bound = damping_at(max_norm, state.count)
        bound = jnp.asarray(bound, dtype)
        lr = jnp.asarray(damping_at(learning_rate, state.count), dtype)
        gram = jnp.asarray(curvature(params, batch, [direction, state.previous] if adaptive else [direction]), dtype)
        norm = gram[0, 0]
        eta = jnp.where(norm > 0, jnp.minimum(lr, jnp.sqrt(bound / jnp.where(norm > 0, norm, 1.0))), lr)
        scale, cosine = state.scale, jnp.zeros((), dtype)
        if adaptive:  # Kesten's rule in the metric (module docstring)
            both = norm * gram[1, 1]
            cosine = jnp.where((state.count > 0) & (both > 0),
                               jnp.clip(gram[0, 1] / jnp.sqrt(jnp.where(both > 0, both, 1.0)), -1.0, 1.0), 0.0)
            scale = jnp.clip(scale * jnp.exp(adapt_rate * cosine), 1.0 / adapt_range, adapt_range).astype(dtype)
            eta = scale * eta
        ok = jnp.all(jnp.isfinite(gram)) & jnp.isfinite(eta) & (bound > 0) & (lr > 0)  # a NaN x^T S x fails here
        delta = poison(jax.tree.map(lambda x: (-eta).astype(x.dtype) * x, direction), ok)
        new_state = TrustRegionState(count=next_count(state.count), step_size=eta, metric_norm=norm, bound=bound,
                                     scale=scale, cosine=cosine,
                                     previous=jax.tree.map(lambda x, p: x.astype(p.dtype), direction, state.previous)
                                     if adaptive else ())
        new_state = optax.tree.where(tree_all_finite(delta), new_state, state)
        return delta, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- K-FAC with everything adaptive


def adaptive_kfac(
    apply_fn: Callable[[Any, Any], jax.Array],
    likelihood: Literal["gaussian", "categorical"],
    *,
    example_batch: Any,
    initial_damping: float = 1.0,
    learning_rate: ScalarOrSchedule | None = None,
    momentum: ScalarOrSchedule | None = None,
    interval: int = 5,
    value_fn: Callable[[Any, Any], jax.Array] | None = None,
    axis_name: AxisName = None,
    matmul_precision: str | None = DEFAULT_MATMUL_PRECISION,
    **kfac_options: Any,
) -> optax.GradientTransformationExtraArgs:
    """:func:`fishr.kfac` with adaptive step size, momentum and damping, no learning rate to choose.

    ``levenberg_marquardt(chain(kfac, quadratic_step(gauss_newton)), value_fn=the likelihood's
    mean loss)``: the curvature of the quadratic model is the Gauss-Newton matrix of the
    likelihood (:func:`fishr.curvature.gauss_newton`, the matrix K-FAC approximates) and
    the loss is the likelihood's (:func:`fishr.scores.mean_loss`). The update is final
    (apply it with ``optax.apply_updates``)::

        opt = fishr.adaptive_kfac(model.apply, "categorical", example_batch=(x, y))
        updates, state = opt.update(grads, state, params, batch=(x, y), value=loss)

    Args:
      apply_fn: ``(params, inputs) -> logits / means``.
      likelihood: ``"categorical"`` or ``"gaussian"``.
      example_batch: as for :func:`fishr.kfac`.
      initial_damping, interval: as for :func:`levenberg_marquardt`.
      learning_rate, momentum: as for :func:`quadratic_step` (``None``: adaptive).
      value_fn: the loss the damping rule measures, ``(params, batch) -> mean loss``
        (default: the likelihood's, :func:`fishr.scores.mean_loss`); pass yours when it adds
        terms (a regulariser), and pass ``value=`` only with that same loss.
      axis_name: mapped axis name(s) when the batch is split over devices.
      matmul_precision: the precision of every product the update traces (K-FAC's, the
        quadratic model's and the loss's), as for :func:`fishr.kfac` (default ``"highest"``).
      **kfac_options: further options of :func:`fishr.kfac` (``ema``, ``inverse_every``, ...;
        not ``damping``, which the wrapper adapts).
    """
    if "damping" in kfac_options:
        raise ValueError("fishr.adaptive_kfac: the damping is adapted; set `initial_damping=` instead of `damping=`.")
    check_matmul_precision(matmul_precision, "fishr.adaptive_kfac")
    preconditioner = kfac(apply_fn, initial_damping, example_batch=example_batch, likelihood=likelihood,
                          axis_name=axis_name, matmul_precision=matmul_precision, **kfac_options)
    step = quadratic_step(gauss_newton(apply_fn, likelihood, axis_name=axis_name), learning_rate=learning_rate,
                          momentum=momentum)
    loss = mean_loss(apply_fn, likelihood) if value_fn is None else value_fn
    tx = levenberg_marquardt(optax.chain(preconditioner, step), loss,
                             initial_damping=initial_damping, interval=interval, axis_name=axis_name)
    return optax.GradientTransformationExtraArgs(tx.init, traced_at(matmul_precision, tx.update))
