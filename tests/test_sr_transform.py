"""fishr.sr as an optax transformation: chaining, jit, schedules, state, bad input, non-finite values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sr_models import flat, mlp_log_psi, mlp_params, random_like

import fishr


@pytest.fixture(scope="module")
def problem():
    params = mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
    grad = random_like(jax.random.PRNGKey(2), params)
    return params, x, grad


def test_chain_with_sgd_under_jit(problem):
    params, x, grad = problem
    lr = 0.05
    cg = fishr.CG(rtol=1e-12)
    opt = optax.chain(fishr.sr(mlp_log_psi, damping=1e-3, solver=cg), optax.sgd(lr))
    state = opt.init(params)
    updates, state = jax.jit(opt.update)(grad, state, params, batch=x)
    expected, _ = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=1e-3, solver=cg)
    np.testing.assert_allclose(flat(updates), -lr * flat(expected), rtol=1e-9)  # jit vs eager CG rounding
    sr_state = state[0]
    assert isinstance(sr_state, fishr.SRState)
    assert int(sr_state.count) == 1
    assert fishr.SR_MODES[int(sr_state.mode)] == "lazy"
    assert int(sr_state.info.iterations) > 0 and bool(sr_state.info.converged)
    np.testing.assert_allclose(flat(sr_state.previous), flat(expected), rtol=1e-9)


def test_damping_schedule_follows_count(problem):
    params, x, grad = problem
    schedule = optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.1)
    tx = fishr.sr(mlp_log_psi, damping=schedule, mode="sample_space")
    state = tx.init(params)
    update = jax.jit(tx.update)
    reference = jax.jit(lambda d: fishr.sr_solve(mlp_log_psi, grad, params, x, damping=d, mode="sample_space")[0])
    for step in range(3):
        out, state = update(grad, state, params, batch=x)
        damping_now = 0.1**step  # float64: the schedule is evaluated in the default float type
        expected = reference(jnp.float64(damping_now))
        np.testing.assert_allclose(flat(out), flat(expected), rtol=1e-10)


def test_schedules_are_evaluated_in_float64_under_x64():
    # optax on the int32 count would give float32 (0.1 -> 0.10000000149...)
    from fishr._validate import damping_at

    schedule = optax.linear_schedule(0.1, 0.01, 10)
    value = damping_at(schedule, jnp.zeros((), jnp.int32))
    assert value.dtype == jnp.float64 and float(value) == 0.1
    assert abs(float(damping_at(schedule, jnp.int32(3))) - 0.073) <= 1e-15
    assert damping_at(0.25, jnp.int32(3)) == 0.25


def test_momentum_in_transform_uses_previous_solution(problem):
    params, x, grad = problem
    tx = fishr.sr(mlp_log_psi, damping=1e-2, mode="dense", solver=fishr.Cholesky(), momentum=0.8)
    state = tx.init(params)
    x1, state = tx.update(grad, state, params, batch=x)
    plain, _ = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=1e-2, mode="dense", solver=fishr.Cholesky())
    np.testing.assert_allclose(flat(x1), flat(plain), rtol=1e-12)  # previous starts at zero
    x2, state = tx.update(grad, state, params, batch=x)
    expected, _ = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=1e-2, mode="dense",
                                 solver=fishr.Cholesky(), momentum=0.8, previous=x1)
    np.testing.assert_allclose(flat(x2), flat(expected), rtol=1e-12)
    assert not np.allclose(flat(x2), flat(x1))


def test_warm_start_from_previous_saves_iterations(problem):
    params, x, grad = problem
    iters = {}
    for warm in ["rhs", "previous", "zeros"]:
        tx = fishr.sr(mlp_log_psi, damping=1e-3, solver=fishr.CG(rtol=1e-10, initial_guess=warm))
        state = tx.init(params)
        _, state = tx.update(grad, state, params, batch=x)
        _, state = tx.update(grad, state, params, batch=x)
        iters[warm] = int(state.info.iterations)
    assert iters["previous"] < iters["rhs"]
    assert iters["previous"] < iters["zeros"]


def test_batch_size_may_change_between_calls(problem):
    params, _, grad = problem
    tx = fishr.sr(mlp_log_psi, damping=1e-3)
    state = tx.init(params)
    for n in (8, 12):
        x = jax.random.normal(jax.random.PRNGKey(n), (n, 3))
        out, state = jax.jit(tx.update)(grad, state, params, batch=x)  # a new batch size: a new program
        assert np.all(np.isfinite(flat(out)))


# ----------------------------------------------------------------- bad input


def test_gradient_tree_must_match_params(problem):
    params, x, grad = problem
    tx = fishr.sr(mlp_log_psi)
    state = tx.init(params)
    bad = dict(grad)
    del bad["phase"]
    with pytest.raises(ValueError, match="tree structure of `params`"):
        tx.update(bad, state, params, batch=x)
    bad = jax.tree.map(lambda g: g, grad)
    bad["dense1"]["b"] = jnp.zeros(7)
    with pytest.raises(ValueError, match=r"\['dense1'\]\['b'\].*shape"):
        jax.jit(tx.update)(bad, state, params, batch=x)


@pytest.mark.parametrize("damping", [-1e-3, -1.0, float("nan"), float("inf"), jnp.asarray(-0.01), np.float32(-1)])
def test_bad_concrete_damping(damping):
    with pytest.raises(ValueError, match="`damping` must be finite and >= 0"):
        fishr.sr(mlp_log_psi, damping=damping)
    with pytest.raises(ValueError, match="`damping` must be finite and > 0"):
        fishr.sr(mlp_log_psi, damping=damping, mode="sample_space")


def test_damping_must_be_a_scalar():
    with pytest.raises(ValueError, match="`damping` must be a real scalar"):
        fishr.sr(mlp_log_psi, damping=jnp.ones(3))
    with pytest.raises(ValueError, match="`damping` must be a real scalar"):
        fishr.sr(mlp_log_psi, damping="0.1")


def test_sample_space_needs_positive_damping():
    with pytest.raises(ValueError, match="`damping` must be finite and > 0"):
        fishr.sr(mlp_log_psi, damping=0.0, mode="sample_space")


@pytest.mark.parametrize("mode", ["lazy", "dense", "sample_space"])
def test_negative_schedule_or_traced_damping_gives_nan_and_keeps_state(problem, mode):
    params, x, grad = problem
    schedule = lambda count: 1e-2 - 2e-2 * count  # 0.01, then -0.01
    tx = fishr.sr(mlp_log_psi, damping=schedule, mode=mode)
    state = tx.init(params)
    good, state1 = jax.jit(tx.update)(grad, state, params, batch=x)
    assert np.all(np.isfinite(flat(good)))
    bad, state2 = jax.jit(tx.update)(grad, state1, params, batch=x)
    assert np.all(np.isnan(flat(bad)))
    for a, b in zip(jax.tree.leaves(state2), jax.tree.leaves(state1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a traced damping in the pure function
    solve = jax.jit(lambda d: fishr.sr_solve(mlp_log_psi, grad, params, x, damping=d, mode=mode)[0])
    assert np.all(np.isnan(flat(solve(-0.01))))
    assert np.all(np.isfinite(flat(solve(0.01))))


def test_diverging_cg_on_singular_s_is_nan_and_state_kept(problem):
    """damping=0 on a singular S (the unused 'phase' leaf): CG diverges; the update is NaN, not 1e33."""
    params, x, grad = problem
    tx = fishr.sr(mlp_log_psi, damping=0.0, mode="lazy")
    state = tx.init(params)
    out, new_state = jax.jit(tx.update)(grad, state, params, batch=x)
    assert np.all(np.isnan(flat(out)))
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a non-singular problem (no unused leaf, N = 64 > P = 30) at damping 0 still converges
    sub = {k: v for k, v in params.items() if k != "phase"}
    g = {k: v for k, v in grad.items() if k != "phase"}
    many = jax.random.normal(jax.random.PRNGKey(9), (64, 3))
    y, info = fishr.sr_solve(mlp_log_psi, g, sub, many, damping=0.0, solver=fishr.CG(rtol=1e-10))
    assert bool(info.converged) and np.all(np.isfinite(flat(y)))


def test_cg_options_are_validated():
    for bad in [dict(max_steps=-5), dict(max_steps=0), dict(max_steps=2.5), dict(rtol=-1.0), dict(atol=float("nan")),
                dict(initial_guess="last")]:
        with pytest.raises(ValueError, match="fishr.CG: `(max_steps|rtol|atol|initial_guess)`"):
            fishr.CG(**bad)


def test_unknown_mode_and_solver():
    with pytest.raises(ValueError, match="`mode` must be one of 'auto', 'lazy', 'dense', 'sample_space'; got 'exact'"):
        fishr.sr(mlp_log_psi, mode="exact")
    with pytest.raises(TypeError, match=r"`solver` must be one of fishr.CG\(\) in mode='lazy'"):
        fishr.sr(mlp_log_psi, mode="lazy", solver=fishr.Cholesky())
    with pytest.raises(TypeError, match=r"`solver` must be one of fishr.Cholesky\(\), fishr.Eigh\(\), "
                                        r"fishr.Spectral\(\) in mode='sample_space'"):
        fishr.sr(mlp_log_psi, mode="sample_space", solver=fishr.CG())
    with pytest.raises(TypeError, match="`solver`"):
        fishr.sr(mlp_log_psi, mode="dense", solver="cholesky")
    with pytest.raises(ValueError, match="`jacobian` must be one of"):
        fishr.sr(mlp_log_psi, jacobian="fast")
    with pytest.raises(ValueError, match="jacobian='structured' applies to modes"):
        fishr.sr(mlp_log_psi, mode="dense", jacobian="structured")


def test_empty_batch_is_refused(problem):
    params, x, grad = problem
    for mode in ["lazy", "dense", "sample_space"]:
        tx = fishr.sr(mlp_log_psi, mode=mode)
        with pytest.raises(ValueError, match="`batch` holds no samples"):
            tx.update(grad, tx.init(params), params, batch=x[:0])


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_momentum_range(momentum):
    with pytest.raises(ValueError, match=r"`momentum` must be a float in \[0, 1\)"):
        fishr.sr(mlp_log_psi, momentum=momentum)


@pytest.mark.parametrize("mode", ["lazy", "dense", "sample_space"])
def test_log_psi_must_return_one_value_per_sample(problem, mode):
    params, x, grad = problem

    def bad_log_psi(p, s):
        return mlp_log_psi(p, s)[:, None]  # (N, 1) instead of (N,)

    tx = fishr.sr(bad_log_psi, mode=mode)
    with pytest.raises(ValueError, match=r"`apply_fn\(params, batch\)` must return log psi, one value per sample"):
        jax.jit(tx.update)(grad, tx.init(params), params, batch=x)


def test_missing_samples_or_params(problem):
    params, x, grad = problem
    tx = fishr.sr(mlp_log_psi)
    with pytest.raises(ValueError, match="`batch=`"):
        tx.update(grad, tx.init(params), params)
    with pytest.raises(ValueError, match="`params`"):
        tx.update(grad, tx.init(params), None, batch=x)


def test_holomorphic_flag_must_match_params(problem):
    params, x, grad = problem
    with pytest.raises(ValueError, match="holomorphic=True needs complex `params`"):
        fishr.sr_solve(mlp_log_psi, grad, params, x, holomorphic=True)
    cparams = jax.tree.map(lambda p: p.astype(jnp.complex128), params)
    with pytest.raises(ValueError, match="structured.*holomorphic=True"):  # complex, not holomorphic: generic only
        fishr.sr_solve(mlp_log_psi, cparams, cparams, x, jacobian="structured", mode="sample_space")
    with pytest.raises(ValueError, match="metric.*holomorphic=False"):
        fishr.sr_solve(mlp_log_psi, cparams, cparams, x, diag_damping=0.1, mode="dense")


# ----------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("mode", ["lazy", "dense", "sample_space"])
@pytest.mark.parametrize("where", ["grad", "samples"])
def test_non_finite_step_leaves_state_and_params_clean(problem, mode, where):
    params, x, grad = problem
    bad_grad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grad) if where == "grad" else grad
    bad_x = x.at[3, 1].set(jnp.nan) if where == "samples" else x
    damping = 1e-2

    cg = fishr.CG(rtol=1e-12) if mode != "sample_space" else None
    tx = fishr.sr(mlp_log_psi, damping=damping, mode=mode, solver=cg, momentum=0.5)
    state0 = tx.init(params)
    update = jax.jit(tx.update)  # one program for the good and the bad step
    good, state1 = update(grad, state0, params, batch=x)
    out, state2 = update(bad_grad, state1, params, batch=bad_x)
    assert not np.all(np.isfinite(flat(out)))  # the bad update is visible ...
    for a, b in zip(jax.tree.leaves(state2), jax.tree.leaves(state1)):  # ... and the state untouched
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # optax.apply_if_finite inspects the updates it receives. Placed after fishr.sr it sees SR's
    # output, so it catches non-finite samples as well as non-finite gradients; placed around the
    # whole chain it sees the raw gradient and catches non-finite gradients.
    chains = {"after_sr": lambda: optax.chain(fishr.sr(mlp_log_psi, damping=damping, mode=mode, solver=cg),
                                              optax.apply_if_finite(optax.sgd(0.1), 3))}
    if where == "grad":
        chains["outer"] = lambda: optax.apply_if_finite(
            optax.chain(fishr.sr(mlp_log_psi, damping=damping, mode=mode, solver=cg), optax.sgd(0.1)), 3)
    for make in chains.values():
        opt = make()
        ostate = opt.init(params)
        update = jax.jit(opt.update)
        upd, ostate = update(bad_grad, ostate, params, batch=bad_x)
        new_params = optax.apply_updates(params, upd)
        np.testing.assert_array_equal(flat(new_params), flat(params))
        assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(ostate))
        # and the next good step is the one it would have been without the bad one
        upd2, _ = update(grad, ostate, params, batch=x)
        np.testing.assert_allclose(flat(upd2), -0.1 * flat(good), rtol=1e-9)


def test_undamped_singular_dense_direct_solve_is_nan(problem):
    """Eigh has no fallback; Cholesky's is the pseudo-inverse (tests/test_sr_variants.py)."""
    params, x, grad = problem  # N = 16 < P: S is singular
    out, info = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=0.0, mode="dense", solver=fishr.Eigh())
    assert np.all(np.isnan(flat(out))) and not bool(info.converged)
