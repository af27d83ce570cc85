"""fishr.sr as an optax transformation: chaining, jit, schedules, state, bad input, non-finite values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fishr
from sr_models import flat, mlp_log_psi, mlp_params, random_like


@pytest.fixture(scope="module")
def problem():
    params = mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
    grad = random_like(jax.random.PRNGKey(2), params)
    return params, x, grad


def test_chain_with_sgd_under_jit(problem):
    params, x, grad = problem
    lr = 0.05
    opt = optax.chain(fishr.sr(mlp_log_psi, damping=1e-3, tol=1e-12), optax.sgd(lr))
    state = opt.init(params)
    updates, state = jax.jit(opt.update)(grad, state, params, samples=x)
    expected, _ = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=1e-3, tol=1e-12)
    np.testing.assert_allclose(flat(updates), -lr * flat(expected), rtol=1e-9)  # jit vs eager CG rounding
    sr_state = state[0]
    assert isinstance(sr_state, fishr.SRState)
    assert int(sr_state.count) == 1
    assert int(sr_state.cg_iterations) > 0
    np.testing.assert_allclose(flat(sr_state.previous), flat(expected), rtol=1e-9)


def test_damping_schedule_follows_count(problem):
    params, x, grad = problem
    schedule = optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.1)
    tx = fishr.sr(mlp_log_psi, damping=schedule, mode="sample_space")
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(3):
        out, state = update(grad, state, params, samples=x)
        damping_now = 0.1**step  # float64: the schedule is evaluated in the default float type
        expected, _ = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=damping_now, mode="sample_space")
        np.testing.assert_allclose(flat(out), flat(expected), rtol=1e-10)


def test_schedules_are_evaluated_in_float64_under_x64():
    # optax on the int32 count would give float32 (0.1 -> 0.10000000149...)
    from fishr.checks import damping_at

    schedule = optax.linear_schedule(0.1, 0.01, 10)
    value = damping_at(schedule, jnp.zeros((), jnp.int32))
    assert value.dtype == jnp.float64 and float(value) == 0.1
    assert abs(float(damping_at(schedule, jnp.int32(3))) - 0.073) <= 1e-15
    assert damping_at(0.25, jnp.int32(3)) == 0.25


def test_momentum_in_transform_uses_previous_solution(problem):
    params, x, grad = problem
    tx = fishr.sr(mlp_log_psi, damping=1e-2, mode="dense", solver="cholesky", momentum=0.8)
    state = tx.init(params)
    x1, state = tx.update(grad, state, params, samples=x)
    plain, _ = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=1e-2, mode="dense", solver="cholesky")
    np.testing.assert_allclose(flat(x1), flat(plain), rtol=1e-12)  # previous starts at zero
    x2, state = tx.update(grad, state, params, samples=x)
    expected, _ = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=1e-2, mode="dense", solver="cholesky",
                                 momentum=0.8, previous=x1)
    np.testing.assert_allclose(flat(x2), flat(expected), rtol=1e-12)
    assert not np.allclose(flat(x2), flat(x1))


def test_warm_start_from_previous_saves_iterations(problem):
    params, x, grad = problem
    iters = {}
    for warm in ["grad", "previous", "zeros"]:
        tx = fishr.sr(mlp_log_psi, damping=1e-3, tol=1e-10, warm_start=warm)
        state = tx.init(params)
        _, state = tx.update(grad, state, params, samples=x)
        _, state = tx.update(grad, state, params, samples=x)
        iters[warm] = int(state.cg_iterations)
    assert iters["previous"] < iters["grad"]
    assert iters["previous"] < iters["zeros"]


def test_batch_size_may_change_between_calls(problem):
    params, _, grad = problem
    tx = fishr.sr(mlp_log_psi, damping=1e-3)
    state = tx.init(params)
    for n in (8, 12):
        x = jax.random.normal(jax.random.PRNGKey(n), (n, 3))
        out, state = tx.update(grad, state, params, samples=x)
        assert np.all(np.isfinite(flat(out)))


# ----------------------------------------------------------------- bad input


def test_gradient_tree_must_match_params(problem):
    params, x, grad = problem
    tx = fishr.sr(mlp_log_psi)
    state = tx.init(params)
    bad = dict(grad)
    del bad["phase"]
    with pytest.raises(ValueError, match="tree structure of `params`"):
        tx.update(bad, state, params, samples=x)
    bad = jax.tree.map(lambda g: g, grad)
    bad["dense1"]["b"] = jnp.zeros(7)
    with pytest.raises(ValueError, match=r"\['dense1'\]\['b'\].*shape"):
        jax.jit(tx.update)(bad, state, params, samples=x)


@pytest.mark.parametrize("damping", [-1e-3, -1.0])
def test_negative_damping(damping):
    with pytest.raises(ValueError, match="`damping` must be >= 0"):
        fishr.sr(mlp_log_psi, damping=damping)
    with pytest.raises(ValueError, match="`damping` must be >= 0"):
        fishr.fisher_inverse_fn(mlp_log_psi, damping=damping)


def test_sample_space_needs_positive_damping():
    with pytest.raises(ValueError, match="sample_space.*damping"):
        fishr.sr(mlp_log_psi, damping=0.0, mode="sample_space")


def test_unknown_mode_and_solver():
    with pytest.raises(ValueError, match="unknown `mode` 'exact'"):
        fishr.sr(mlp_log_psi, mode="exact")
    with pytest.raises(ValueError, match="`solver`='cholesky' is not available for mode='lazy'"):
        fishr.sr(mlp_log_psi, mode="lazy", solver="cholesky")
    with pytest.raises(ValueError, match="`warm_start`"):
        fishr.sr(mlp_log_psi, warm_start="last")


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
    with pytest.raises(ValueError, match=r"`log_psi_apply\(params, samples\)` must return one value per sample"):
        jax.jit(tx.update)(grad, tx.init(params), params, samples=x)


def test_missing_samples_or_params(problem):
    params, x, grad = problem
    tx = fishr.sr(mlp_log_psi)
    with pytest.raises(ValueError, match="`samples=`"):
        tx.update(grad, tx.init(params), params)
    with pytest.raises(ValueError, match="`params`"):
        tx.update(grad, tx.init(params), None, samples=x)


def test_holomorphic_flag_must_match_params(problem):
    params, x, grad = problem
    with pytest.raises(ValueError, match="holomorphic=True needs complex `params`"):
        fishr.sr_solve(mlp_log_psi, grad, params, x, holomorphic=True)
    cparams = jax.tree.map(lambda p: p.astype(jnp.complex128), params)
    with pytest.raises(ValueError, match="complex `params` need holomorphic=True"):
        fishr.sr_solve(mlp_log_psi, cparams, cparams, x)


# ----------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("mode", ["lazy", "dense", "sample_space"])
@pytest.mark.parametrize("where", ["grad", "samples"])
def test_non_finite_step_leaves_state_and_params_clean(problem, mode, where):
    params, x, grad = problem
    bad_grad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grad) if where == "grad" else grad
    bad_x = x.at[3, 1].set(jnp.nan) if where == "samples" else x
    damping = 1e-2

    tx = fishr.sr(mlp_log_psi, damping=damping, mode=mode, tol=1e-12, momentum=0.5)
    state0 = tx.init(params)
    good, state1 = tx.update(grad, state0, params, samples=x)
    out, state2 = jax.jit(tx.update)(bad_grad, state1, params, samples=bad_x)
    assert not np.all(np.isfinite(flat(out)))  # the bad update is visible ...
    for a, b in zip(jax.tree.leaves(state2), jax.tree.leaves(state1)):  # ... and the state untouched
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # optax.apply_if_finite inspects the updates it receives. Placed after fishr.sr it sees SR's
    # output, so it catches non-finite samples as well as non-finite gradients; placed around the
    # whole chain it sees the raw gradient and catches non-finite gradients.
    chains = {"after_sr": lambda: optax.chain(fishr.sr(mlp_log_psi, damping=damping, mode=mode, tol=1e-12),
                                              optax.apply_if_finite(optax.sgd(0.1), 3))}
    if where == "grad":
        chains["outer"] = lambda: optax.apply_if_finite(
            optax.chain(fishr.sr(mlp_log_psi, damping=damping, mode=mode, tol=1e-12), optax.sgd(0.1)), 3)
    for make in chains.values():
        opt = make()
        ostate = opt.init(params)
        upd, ostate = jax.jit(opt.update)(bad_grad, ostate, params, samples=bad_x)
        new_params = optax.apply_updates(params, upd)
        np.testing.assert_array_equal(flat(new_params), flat(params))
        assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(ostate))
        # and the next good step is the one it would have been without the bad one
        upd2, _ = opt.update(grad, ostate, params, samples=x)
        np.testing.assert_allclose(flat(upd2), -0.1 * flat(good), rtol=1e-9)
