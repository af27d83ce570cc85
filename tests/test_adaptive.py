"""Adaptive steps: the quadratic model, Levenberg-Marquardt damping, the Fisher-norm trust region.

References are dense float64 restatements of the documented math: explicit per-sample
Jacobians for the curvature, ``numpy.linalg.solve`` for the 2 x 2 model, the stated
thresholds for the damping rule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from sr_models import flat, mlp_complex_log_psi, mlp_log_psi, mlp_params, random_like

import fishr

# --------------------------------------------------------------------------- helpers


def _mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _mlp_params(key, d_in=3, width=5, d_out=2):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": jax.random.normal(k1, (d_in, width)) / np.sqrt(d_in), "b1": 0.1 * jax.random.normal(k3, (width,)),
            "w2": jax.random.normal(k2, (width, d_out)) / np.sqrt(width), "b2": jnp.zeros((d_out,))}


def _unravel(params):
    vec, unravel = jax.flatten_util.ravel_pytree(params)
    return vec, unravel


def _output_jacobian(apply_fn, params, x):
    """``(n, out, P)`` per-sample Jacobian of the outputs by jacfwd (float64)."""
    vec, unravel = _unravel(params)
    jac = jax.jacfwd(lambda v: apply_fn(unravel(v), x))(vec)
    return np.asarray(jac).reshape(x.shape[0], -1, vec.size)


def _dense_ggn(likelihood, params, x):
    jac = _output_jacobian(_mlp, params, x)
    if likelihood == "gaussian":
        return np.einsum("nop,noq->pq", jac, jac) / x.shape[0]
    p = np.asarray(jax.nn.softmax(_mlp(params, x), axis=-1))
    h = np.einsum("no,op->nop", p, np.eye(p.shape[1])) - np.einsum("no,np->nop", p, p)
    return np.einsum("nop,nor,nrq->pq", jac, h, jac) / x.shape[0]


def _dense_s(log_psi, params, x, centred=True):
    """SR's S = Re mean conj(Obar)^T Obar from the explicit Jacobian of log psi (real parameters)."""
    vec, unravel = _unravel(params)
    jac = np.asarray(jax.jacfwd(lambda v: log_psi(unravel(v), x))(vec))  # complex or real (n, P)
    if centred:
        jac = jac - jac.mean(axis=0)
    return np.real(jac.conj().T @ jac) / x.shape[0]


def _vec(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


# --------------------------------------------------------------------------- curvature


@pytest.mark.parametrize("likelihood", ["gaussian", "categorical"])
def test_gauss_newton_gram_equals_explicit_jacobian(likelihood):
    params = _mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 3))
    vs = [random_like(jax.random.PRNGKey(k), params) for k in (2, 3, 4)]
    got = fishr.curvature.gauss_newton(_mlp, likelihood)(params, (x, None), vs)
    c = _dense_ggn(likelihood, params, x)
    u = np.stack([_vec(v) for v in vs])
    np.testing.assert_allclose(np.asarray(got), u @ c @ u.T, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("log_psi", [mlp_log_psi, mlp_complex_log_psi], ids=["real", "complex"])
@pytest.mark.parametrize("centred", [True, False])
def test_fisher_gram_equals_explicit_s(log_psi, centred):
    params = mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (9, 3))
    vs = [random_like(jax.random.PRNGKey(k), params) for k in (2, 3)]
    got = fishr.curvature.fisher(log_psi, centred=centred)(params, x, vs)
    s = _dense_s(log_psi, params, x, centred)
    u = np.stack([_vec(v) for v in vs])
    np.testing.assert_allclose(np.asarray(got), u @ s @ u.T, rtol=1e-12, atol=1e-13)


def test_fisher_gram_holomorphic_is_the_hermitian_form():
    def log_psi(p, x):
        return jnp.sum(jnp.log(jnp.cosh(x @ p["w"])), axis=-1)

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    w = (jax.random.normal(k1, (3, 4)) + 1j * jax.random.normal(k2, (3, 4))) / 3
    params = {"w": w}
    x = jax.random.normal(k3, (8, 3))
    v = {"w": jax.random.normal(jax.random.PRNGKey(5), (3, 4)) + 1j * jax.random.normal(jax.random.PRNGKey(6), (3, 4))}
    got = fishr.curvature.fisher(log_psi, holomorphic=True)(params, x, [v])
    jac = np.asarray(jax.jacfwd(lambda z: log_psi({"w": z}, x), holomorphic=True)(w)).reshape(8, -1)
    jac = jac - jac.mean(axis=0)
    vv = np.asarray(v["w"]).reshape(-1)
    np.testing.assert_allclose(float(got[0, 0]), np.real(vv.conj() @ (jac.conj().T @ jac / 8) @ vv), rtol=1e-12)


# --------------------------------------------------------------------------- the quadratic model


def _spd(key, k=2):
    a = np.asarray(jax.random.normal(key, (k, k)))
    return a @ a.T + 0.1 * np.eye(k)


def test_quadratic_model_equals_dense_2x2_solve():
    for seed in range(5):
        g, d = _spd(jax.random.PRNGKey(seed)), _spd(jax.random.PRNGKey(100 + seed))
        r = np.asarray(jax.random.normal(jax.random.PRNGKey(200 + seed), (2,)))
        lam = 0.3
        w, damped, plain = fishr.quadratic_model(g, d, r, lam)
        ref = np.linalg.solve(g + lam * d, -r)
        np.testing.assert_allclose(np.asarray(w), ref, rtol=1e-12)
        np.testing.assert_allclose(float(damped), r @ ref + 0.5 * ref @ (g + lam * d) @ ref, rtol=1e-12)
        np.testing.assert_allclose(float(plain), r @ ref + 0.5 * ref @ g @ ref, rtol=1e-12)
        np.testing.assert_allclose(float(damped), 0.5 * r @ ref, rtol=1e-12)  # the minimum of a quadratic


def test_quadratic_model_fixed_coefficients_and_fallbacks():
    g, d = _spd(jax.random.PRNGKey(0)), _spd(jax.random.PRNGKey(1))
    r = np.array([0.7, -0.2])
    lam = 0.1
    a = g + lam * d
    w, _, _ = fishr.quadratic_model(g, d, r, lam, momentum=0.5)  # adapt the step size only
    np.testing.assert_allclose(np.asarray(w), [-(r[0] + a[0, 1] * 0.5) / a[0, 0], 0.5], rtol=1e-12)
    w, _, _ = fishr.quadratic_model(g, d, r, lam, learning_rate=0.2)  # adapt the momentum only
    np.testing.assert_allclose(np.asarray(w), [-0.2, -(r[1] - a[1, 0] * 0.2) / a[1, 1]], rtol=1e-12)
    w, _, _ = fishr.quadratic_model(g, d, r, lam, learning_rate=0.2, momentum=0.9)
    np.testing.assert_allclose(np.asarray(w), [-0.2, 0.9])
    # v = 0 (first step): momentum 0, 1 x 1 model
    g0, d0 = g.copy(), d.copy()
    g0[1, :] = g0[:, 1] = 0
    d0[1, :] = d0[:, 1] = 0
    w, _, _ = fishr.quadratic_model(g0, d0, np.array([r[0], 0.0]), lam)
    np.testing.assert_allclose(np.asarray(w), [-r[0] / (g0[0, 0] + lam * d0[0, 0]), 0.0], rtol=1e-12)
    # v parallel to Delta: singular 2 x 2, momentum 0
    u = np.array([[1.0, 2.0], [2.0, 4.0]])
    w, _, _ = fishr.quadratic_model(3 * u, u, np.array([1.0, 2.0]), lam)
    np.testing.assert_allclose(np.asarray(w), [-1.0 / (3 + lam), 0.0], rtol=1e-12)
    # a zero direction: coefficient 0
    w, _, _ = fishr.quadratic_model(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1), lam)
    np.testing.assert_array_equal(np.asarray(w), [0.0])


def test_quadratic_step_minimises_the_dense_model_over_its_span():
    params = _mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
    y = jax.random.normal(jax.random.PRNGKey(2), (16, 2))
    batch = (x, y)
    loss = fishr.scores.mean_loss(_mlp, "gaussian")
    lam = 0.05
    step = fishr.quadratic_step(fishr.curvature.gauss_newton(_mlp, "gaussian"), damping=lam)
    state = step.init(params)
    update = jax.jit(step.update)  # one program for the 3 steps (op by op is several times slower)
    c = _dense_ggn("gaussian", params, x) + lam * np.eye(_vec(params).size)
    for t in range(3):
        grad = jax.grad(loss)(params, batch)
        direction = random_like(jax.random.PRNGKey(10 + t), params)  # any preconditioned direction
        prev = _vec(state.previous)
        delta, state = update(direction, state, params, grad=grad, batch=batch)
        u = np.stack([_vec(direction), prev]) if t else _vec(direction)[None]
        gv = _vec(grad)
        ref = np.linalg.solve(u @ c @ u.T, -u @ gv)
        np.testing.assert_allclose(_vec(delta), ref @ u, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(state.coefficients)[: len(ref)], ref, rtol=1e-10)


# --------------------------------------------------------------------------- Levenberg-Marquardt


def _linear(params, x):
    return x @ params["w"]


def _lm_problem(scale):
    """A linear least-squares model (the quadratic model is exact: rho = 1) with a loss scaled by ``scale``."""
    params = {"w": jnp.zeros((4, 1))}
    x = jax.random.normal(jax.random.PRNGKey(0), (32, 4))
    y = x @ jnp.arange(1.0, 5.0)[:, None]
    true_loss = fishr.scores.mean_loss(_linear, "gaussian")
    value_fn = lambda p, b: scale * true_loss(p, b)
    inner = optax.chain(optax.identity(), fishr.quadratic_step(fishr.curvature.gauss_newton(_linear, "gaussian")))
    return params, (x, y), true_loss, value_fn, inner


@pytest.mark.parametrize("scale,expected", [(1.0, "down"), (5.0, "down"), (0.5, "same"), (0.1, "up"),
                                            (np.nan, "up")])
def test_levenberg_marquardt_follows_its_thresholds(scale, expected):
    params, batch, true_loss, value_fn, inner = _lm_problem(scale)
    lm = fishr.levenberg_marquardt(inner, value_fn, initial_damping=1.0, interval=5)
    state = lm.init(params)
    for t in range(5):
        grad = jax.grad(true_loss)(params, batch)
        updates, state = lm.update(grad, state, params, batch=batch)
        if t < 4:
            assert float(state.damping) == 1.0 and np.isnan(float(state.rho))
        params = optax.apply_updates(params, updates)
    factor = 0.9**5
    want = {"down": factor, "same": 1.0, "up": 1.0 / factor}[expected]
    np.testing.assert_allclose(float(state.damping), want, rtol=1e-12)
    if np.isfinite(scale):
        # rho = scale for the exact model of a linear least-squares problem (undamped model change)
        np.testing.assert_allclose(float(state.rho), scale, rtol=1e-8)


def test_levenberg_marquardt_passes_one_damping_to_the_chain():
    params, batch, true_loss, value_fn, _ = _lm_problem(1.0)
    seen = []

    def spy():
        def update(u, s, p=None, *, damping=None, grad=None, **kw):
            seen.append((damping, grad is not None))
            return u, s

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    inner = optax.chain(spy(), fishr.quadratic_step(fishr.curvature.gauss_newton(_linear, "gaussian")))
    lm = fishr.levenberg_marquardt(inner, value_fn, initial_damping=0.3)
    state = lm.init(params)
    grad = jax.grad(true_loss)(params, batch)
    lm.update(grad, state, params, batch=batch)
    assert float(seen[0][0]) == pytest.approx(0.3) and seen[0][1]
    with pytest.raises(ValueError, match="do not pass `damping=`"):
        lm.update(grad, state, params, batch=batch, damping=0.1)
    with pytest.raises(ValueError, match="exactly one fishr.quadratic_step"):
        bad = fishr.levenberg_marquardt(optax.identity(), value_fn)
        bad.update(grad, bad.init(params), params, batch=batch)


def test_kfac_and_sr_take_the_damping_from_the_chain():
    params = _mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
    y = jax.random.normal(jax.random.PRNGKey(2), (16, 2))
    grad = random_like(jax.random.PRNGKey(3), params)
    kw = dict(likelihood="gaussian", example_batch=(x, y))
    a = fishr.kfac(_mlp, 0.25, **kw)
    b = fishr.kfac(_mlp, 1e-3, **kw)
    ua, _ = jax.jit(a.update)(grad, a.init(params), params, batch=(x, y))  # jit: op by op is several times slower
    ub, _ = jax.jit(b.update)(grad, b.init(params), params, batch=(x, y), damping=0.25)
    np.testing.assert_allclose(_vec(ub), _vec(ua), rtol=1e-12)
    sp = mlp_params(jax.random.PRNGKey(0))
    sg = random_like(jax.random.PRNGKey(4), sp)
    a = fishr.sr(mlp_log_psi, 0.25, mode="dense")
    b = fishr.sr(mlp_log_psi, 1e-3, mode="dense")
    ua, _ = jax.jit(a.update)(sg, a.init(sp), sp, batch=x)
    ub, _ = jax.jit(b.update)(sg, b.init(sp), sp, batch=x, damping=0.25)
    np.testing.assert_allclose(_vec(ub), _vec(ua), rtol=1e-12)
    with pytest.raises(ValueError, match="`damping` must be finite"):
        b.update(sg, b.init(sp), sp, batch=x, damping=-1.0)


def test_adaptive_kfac_trains_a_regression_without_a_learning_rate():
    params = _mlp_params(jax.random.PRNGKey(0), d_out=1)
    teacher = _mlp_params(jax.random.PRNGKey(9), d_out=1)
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 3))
    batch = (x, _mlp(teacher, x))
    loss = fishr.scores.mean_loss(_mlp, "gaussian")
    opt = fishr.adaptive_kfac(_mlp, "gaussian", example_batch=batch)
    state = opt.init(params)
    first = float(loss(params, batch))

    @jax.jit
    def step(params, state):
        value, grad = jax.value_and_grad(loss)(params, batch)
        updates, state = opt.update(grad, state, params, batch=batch, value=value)
        return optax.apply_updates(params, updates), state

    for _ in range(30):
        params, state = step(params, state)
    assert float(loss(params, batch)) < 1e-2 * first
    assert float(state.damping) < 1.0  # the model was trusted: the damping went down
    with pytest.raises(ValueError, match="initial_damping"):
        fishr.adaptive_kfac(_mlp, "gaussian", example_batch=batch, damping=0.1)


# --------------------------------------------------------------------------- trust region


@pytest.mark.parametrize("log_psi", [mlp_log_psi, mlp_complex_log_psi], ids=["real", "complex"])
def test_trust_region_bounds_the_metric_length(log_psi):
    params = mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (12, 3))
    direction = random_like(jax.random.PRNGKey(2), params)
    s = _dense_s(log_psi, params, x)
    norm = _vec(direction) @ s @ _vec(direction)
    for lr, bound in [(0.1, 1e-6), (0.1, 1e3)]:
        tr = fishr.trust_region(fishr.curvature.fisher(log_psi), learning_rate=lr, max_norm=bound)
        delta, state = tr.update(direction, tr.init(params), params, batch=x)
        eta = min(lr, np.sqrt(bound / norm))
        np.testing.assert_allclose(_vec(delta), -eta * _vec(direction), rtol=1e-12)
        np.testing.assert_allclose(float(state.metric_norm), norm, rtol=1e-12)
        assert _vec(delta) @ s @ _vec(delta) <= bound * (1 + 1e-12) or eta == lr
    e_loc = jax.random.normal(jax.random.PRNGKey(3), (12,))
    tr = fishr.trust_region(fishr.curvature.fisher(log_psi), learning_rate=10.0,
                            max_norm=lambda t, e: 1e-3 * e.variance)
    delta, state = tr.update(direction, tr.init(params), params, batch=x, local_energies=e_loc)
    np.testing.assert_allclose(float(state.bound), 1e-3 * np.var(np.asarray(e_loc)), rtol=1e-12)
    np.testing.assert_allclose(_vec(delta) @ s @ _vec(delta), float(state.bound), rtol=1e-10)
    with pytest.raises(ValueError, match="local_energies"):
        tr.update(direction, tr.init(params), params, batch=x)


@pytest.mark.parametrize("log_psi", [mlp_log_psi, mlp_complex_log_psi], ids=["real", "complex"])
def test_trust_region_scale_follows_kestens_rule_in_the_metric(log_psi):
    """Three steps against the module docstring's formulas with a dense float64 S: the metric
    cosine of successive directions moves log m by kappa c (clipped to the range); adapt_rate=0
    is the fixed trust region (m = 1, no previous direction kept)."""
    params = mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (12, 3))
    s = _dense_s(log_psi, params, x)
    first = random_like(jax.random.PRNGKey(2), params)
    # the second direction turns back against the first (c < 0), the third agrees with the second (c > 0)
    second = jax.tree.map(lambda a, b: -a + 0.5 * b, first, random_like(jax.random.PRNGKey(3), params))
    third = jax.tree.map(lambda a, b: a + 0.3 * b, second, random_like(jax.random.PRNGKey(4), params))
    lr, bound, kappa = 0.1, 1e-3, 0.7
    for rate, limit in [(kappa, 100.0), (kappa, 1.2), (0.0, 100.0)]:
        tr = fishr.trust_region(fishr.curvature.fisher(log_psi), learning_rate=lr, max_norm=bound, adapt_rate=rate,
                                adapt_range=limit)
        state, m, prev = tr.init(params), 1.0, None
        for direction in (first, second, third):
            delta, state = tr.update(direction, state, params, batch=x)
            v = _vec(direction)
            c = 0.0 if prev is None else v @ s @ prev / np.sqrt((v @ s @ v) * (prev @ s @ prev))
            m = float(np.clip(m * np.exp(rate * c), 1 / limit, limit))
            eta = m * min(lr, np.sqrt(bound / (v @ s @ v)))
            np.testing.assert_allclose(float(state.cosine), c if rate else 0.0, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(float(state.scale), m, rtol=1e-12)
            np.testing.assert_allclose(_vec(delta), -eta * v, rtol=1e-10)
            assert _vec(delta) @ s @ _vec(delta) <= m**2 * bound * (1 + 1e-10)
            prev = v
        if rate == 0:
            assert state.previous == () and float(state.scale) == 1.0
        else:
            np.testing.assert_array_equal(_vec(state.previous), _vec(third))
    with pytest.raises(ValueError, match="adapt_rate"):
        fishr.trust_region(fishr.curvature.fisher(log_psi), adapt_rate=-0.1)
    with pytest.raises(ValueError, match="adapt_range"):
        fishr.trust_region(fishr.curvature.fisher(log_psi), adapt_range=0.5)


# --------------------------------------------------------------------------- bad input, non-finite values


def test_bad_input_is_named():
    params = _mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    gn = fishr.curvature.gauss_newton(_mlp, "gaussian")
    step = fishr.quadratic_step(gn)
    with pytest.raises(ValueError, match="grad="):
        step.update(params, step.init(params), params, batch=(x, x))
    with pytest.raises(ValueError, match="no damping"):
        step.update(params, step.init(params), params, batch=(x, x), grad=params)
    with pytest.raises(ValueError, match="learning_rate"):
        fishr.quadratic_step(gn, learning_rate=-1.0)
    with pytest.raises(TypeError, match="curvature"):
        fishr.quadratic_step("gauss_newton")
    with pytest.raises(ValueError, match="likelihood"):
        fishr.curvature.gauss_newton(_mlp, "poisson")
    with pytest.raises(ValueError, match="gauss_newton.*`batch` must be a pair"):
        gn(params, x, [params])
    with pytest.raises(ValueError, match="initial_damping"):
        fishr.levenberg_marquardt(optax.identity(), lambda p, b: 0.0, initial_damping=0.0)
    with pytest.raises(ValueError, match="max_norm"):
        fishr.trust_region(gn, max_norm=-1.0)
    cparams = jax.tree.map(lambda a: a.astype(jnp.complex128), params)
    with pytest.raises(ValueError, match="complex parameters"):
        step.update(cparams, step.init(cparams), cparams, batch=(x, x), grad=cparams, damping=0.1)


@pytest.mark.parametrize("adapt_rate", [0.1, 0.0])
def test_trust_region_non_finite_curvature_gives_nan_and_keeps_the_state(adapt_rate):
    params = {"w": jnp.ones((3,))}
    nan_metric = lambda p, b, vectors: jnp.full((len(vectors), len(vectors)), jnp.nan)
    tr = fishr.trust_region(nan_metric, adapt_rate=adapt_rate)
    state = tr.init(params)
    delta, new_state = tr.update(params, state, params, batch=jnp.zeros((4, 3)))
    assert not np.isfinite(_vec(delta)).any()
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_direction_keeps_the_state():
    params = _mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    batch = (x, jnp.zeros((8, 2)))
    step = fishr.quadratic_step(fishr.curvature.gauss_newton(_mlp, "gaussian"), damping=0.1)
    state = step.init(params)
    good = random_like(jax.random.PRNGKey(2), params)
    _, state = step.update(good, state, params, grad=good, batch=batch)
    bad = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), good)
    delta, new = step.update(bad, state, params, grad=good, batch=batch)
    assert np.all(np.isnan(_vec(delta)))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lm = fishr.levenberg_marquardt(optax.chain(optax.identity(), step), fishr.scores.mean_loss(_mlp, "gaussian"))
    lstate = lm.init(params)
    delta, lnew = lm.update(bad, lstate, params, batch=batch)
    assert np.all(np.isnan(_vec(delta)))
    for a, b in zip(jax.tree.leaves(lnew), jax.tree.leaves(lstate)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- devices

NDEV = 4


def test_adaptive_kfac_and_trust_region_equal_on_devices_and_one_device():
    assert jax.device_count() >= NDEV
    params = _mlp_params(jax.random.PRNGKey(0), d_out=3)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 3))
    y = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 3)
    loss = fishr.scores.mean_loss(_mlp, "categorical")
    grad = jax.grad(loss)(params, (x, y))
    split = lambda a: a.reshape(NDEV, a.shape[0] // NDEV, *a.shape[1:])

    def steps(axis_name, xs, ys, n=5):  # 5 steps: the damping adapts on the 5th
        opt = fishr.adaptive_kfac(_mlp, "categorical", example_batch=(xs, ys), axis_name=axis_name)
        p, state = params, opt.init(params)
        out = []
        for _ in range(n):
            updates, state = opt.update(grad, state, p, batch=(xs, ys))
            out.append(updates)
            p = optax.apply_updates(p, updates)
        return out, state.damping, state.rho

    single = jax.jit(lambda xs, ys: steps(None, xs, ys))(x, y)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:NDEV]), ("devices",))
    sharded = jax.jit(jax.shard_map(lambda xs, ys: steps("devices", xs, ys), mesh=mesh,
                                    in_specs=(P("devices"), P("devices")), out_specs=P()))(x, y)
    pmapped = jax.pmap(lambda xs, ys: steps("devices", xs, ys), axis_name="devices")(split(x), split(y))
    for got in (sharded, jax.tree.map(lambda a: a[0], pmapped)):
        np.testing.assert_allclose(flat(got[0]), flat(single[0]), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(float(got[1]), float(single[1]), rtol=1e-12)
        np.testing.assert_allclose(float(got[2]), float(single[2]), rtol=1e-10)
    for leaf in jax.tree.leaves(pmapped):
        for d in range(1, NDEV):
            np.testing.assert_array_equal(np.asarray(leaf)[d], np.asarray(leaf)[0])

    sp = mlp_params(jax.random.PRNGKey(0))
    direction = random_like(jax.random.PRNGKey(3), sp)
    e_loc = jax.random.normal(jax.random.PRNGKey(4), (32,))

    second = jax.tree.map(lambda a, b: b - a, direction, random_like(jax.random.PRNGKey(5), sp))

    def tr_step(axis_name, xs, es):  # two steps: the second one's metric cosine and scale
        tr = fishr.trust_region(fishr.curvature.fisher(mlp_complex_log_psi, axis_name=axis_name), 1.0,
                                lambda t, e: 1e-3 * e.variance, axis_name=axis_name)
        delta, state = tr.update(direction, tr.init(sp), sp, batch=xs, local_energies=es)
        delta2, state = tr.update(second, state, sp, batch=xs, local_energies=es)
        return delta, state.bound, state.metric_norm, delta2, state.cosine, state.scale

    single = jax.jit(lambda xs, es: tr_step(None, xs, es))(x, e_loc)
    sharded = jax.jit(jax.shard_map(lambda xs, es: tr_step("devices", xs, es), mesh=mesh,
                                    in_specs=(P("devices"), P("devices")), out_specs=P()))(x, e_loc)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
    assert float(single[1]) < float(single[2])  # the bound is active
    assert float(single[4]) < 0 and float(single[5]) < 1  # the directions turn back: the scale shrinks



def test_adapted_values_are_readable_by_name():
    params, batch, true_loss, value_fn, inner = _lm_problem(1.0)
    lm = fishr.levenberg_marquardt(inner, value_fn)
    state = lm.init(params)
    _updates, state = lm.update(jax.grad(true_loss)(params, batch), state, params, batch=batch)
    step = fishr.quadratic_step_state(state)
    assert float(step.learning_rate) == -float(step.coefficients[0]) > 0
    assert float(step.momentum) == float(step.coefficients[1])
    with pytest.raises(ValueError, match="expected one QuadraticStepState"):
        fishr.quadratic_step_state(optax.EmptyState())
