"""fishr.branch against a NumPy float64 statement of its formulas, the transforms, and 4 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from branch_reference import np_block_sizes, np_cg, np_cov, np_kfac, np_natgrad
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as PS

import fishr
from fishr import _branch as branch
from fishr import linalg

TOL = 1e-10
NDEV = 4


# --------------------------------------------------------------------------- fixtures


def make_problem(seed=0, k=8, d=5, scale=1.0):
    rng = np.random.default_rng(seed)
    grad = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(4,)), "s": rng.normal(size=())}
    flat, _ = ravel_pytree(grad)
    branches = scale * rng.normal(size=(k, d)) + rng.normal(size=(1, d))
    proj = rng.normal(size=(flat.size, d)) / np.sqrt(d)
    return grad, np.asarray(flat), branches, proj


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def assert_close(a, b, tol=TOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    scale = max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale)


# --------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("k", [1, 2, 8])
def test_covariance_matches_numpy(k):
    _, _, b, _ = make_problem(k=k)
    assert_close(fishr.branch_covariance(b), np_cov(b))


def test_block_sizes_follow_the_seed():
    for d in range(0, 9):
        for blocks in (-1, 0, 1, 2, 3, 4, 9):
            assert branch.block_sizes(d, blocks) == tuple(np_block_sizes(d, blocks)), (d, blocks)


@pytest.mark.parametrize("iters, tol, scale",
                         [(8, 1e-6, 1.0), (2, 1e-6, 1.0), (50, 1e-3, 1.0), (8, 1e-6, 1e-9), (0, 1e-6, 1.0)])
def test_linalg_cg_reproduces_qmlhc_cg_solve(iters, tol, scale):
    """Seed settings of the shared CG: from zero, >= 1 step, absolute tol after each update, 1e-12 floors."""
    rng = np.random.default_rng(1)
    m = rng.normal(size=(6, 6))
    a = m @ m.T + 1e-3 * np.eye(6)
    b = scale * rng.normal(size=6)
    x, info = linalg.cg(lambda v: a @ v, jnp.asarray(b), None, rtol=0.0, atol=tol, max_steps=iters,
                        denominator_floor=1e-12, min_iterations=1)
    assert_close(x, np_cg(lambda v: a @ v, b, iters, tol))
    if scale < 1e-6 and iters:  # ||b|| < tol already: the seed still takes one step
        assert int(info.iterations) == 1 and np.linalg.norm(np.asarray(x)) > 0


def qmlhc_cg(iters):
    return fishr.CG(rtol=0.0, atol=1e-6, max_steps=iters, initial_guess="zeros")


@pytest.mark.parametrize("solver", ["cg", "cholesky", "eigh"])
@pytest.mark.parametrize("k, d, damping, iters", [(8, 5, 1e-3, 8), (3, 6, 1e-2, 3), (1, 3, 1e-3, 8)])
def test_natgrad_solve_matches_numpy(solver, k, d, damping, iters):
    grad, g, b, p = make_problem(k=k, d=d)
    solver_obj = {"cg": qmlhc_cg(iters), "cholesky": fishr.Cholesky(), "eigh": fishr.Eigh()}[solver]
    out, info = fishr.branch_natgrad_solve(grad, b, p, damping=damping, solver=solver_obj)
    assert jax.tree.structure(out) == jax.tree.structure(grad)
    assert_close(flat(out), np_natgrad(g, b, p, damping, "cg" if solver == "cg" else "cholesky", iters))
    if solver != "cg":
        assert int(info.iterations) == 0 and float(info.residual_norm) < 1e-8 and bool(info.converged)
    else:
        assert 1 <= int(info.iterations) <= iters


def test_natgrad_solve_jit_and_linear_map_projection():
    grad, g, b, p = make_problem()
    expected = np_natgrad(g, b, p, 1e-3)
    pj = jnp.asarray(p)
    jitted = jax.jit(lambda gr, br: fishr.branch_natgrad_solve(gr, br, lambda v: pj @ v)[0])
    assert_close(flat(jitted(grad, b)), expected)


@pytest.mark.parametrize("d, blocks", [(5, -2), (5, 2), (5, 3), (5, 9), (6, 0), (6, 3), (6, 4)])
def test_kfac_solve_matches_numpy(d, blocks):
    grad, g, b, p = make_problem(d=d, k=9)
    for solver in (fishr.Cholesky(), fishr.Eigh()):
        out, info = jax.jit(lambda gr, br, pr: fishr.branch_kfac_solve(
            gr, br, pr, damping=1e-2, blocks=max(1, blocks), solver=solver))(grad, b, p)
        assert_close(flat(out), np_kfac(g, b, p, 1e-2, blocks))
        assert bool(info.converged) and float(info.residual_norm) < 1e-8


def test_kfac_with_one_block_is_the_exact_natgrad():
    grad, _, b, p = make_problem()
    x, _ = fishr.branch_kfac_solve(grad, b, p, damping=1e-3, blocks=1)
    y, _ = fishr.branch_natgrad_solve(grad, b, p, damping=1e-3, solver=fishr.Cholesky())
    assert_close(flat(x), flat(y))


@pytest.mark.parametrize("branches", [None, np.ones(5), np.ones((2, 3, 4))])
def test_without_branches_the_gradient_passes_through(branches):
    grad, _, _, _ = make_problem()
    out, info = fishr.branch_natgrad_solve(grad, branches, None)
    assert out is grad and int(info.iterations) == 0
    assert fishr.branch_kfac_solve(grad, branches, None)[0] is grad
    for tx in (fishr.branch_natgrad(key=jax.random.key(3)), fishr.branch_kfac(key=jax.random.key(3))):
        state = tx.init(grad)
        upd, new_state = jax.jit(tx.update)(grad, state, None, branches=branches)
        assert_close(flat(upd), flat(grad), 0.0)
        assert int(new_state.count) == 1
        np.testing.assert_array_equal(new_state.key, state.key)


def test_zero_state_dimension_gives_a_zero_update():
    grad, g, _, _ = make_problem()
    b = np.zeros((4, 0))
    x, _ = fishr.branch_natgrad_solve(grad, b, np.zeros((g.size, 0)))
    assert_close(flat(x), np.zeros_like(g), 0.0)
    assert_close(flat(fishr.branch_kfac_solve(grad, b, np.zeros((g.size, 0)))[0]), np.zeros_like(g), 0.0)


def test_bad_arguments_raise_naming_the_argument():
    grad, _g, b, p = make_problem()
    with pytest.raises(ValueError, match="`projection` must have shape"):
        fishr.branch_natgrad_solve(grad, b, p[:, :-1])
    with pytest.raises(ValueError, match="callable `projection`"):
        fishr.branch_kfac_solve(grad, b, lambda v: jnp.zeros(3))
    with pytest.raises(ValueError, match="must be a linear map"):
        fishr.branch_natgrad_solve(grad, b, lambda v: jnp.asarray(p) @ jnp.sin(v))
    with pytest.raises(TypeError, match="`solver`"):
        fishr.branch_natgrad(solver="lu")
    with pytest.raises(TypeError, match="`solver`"):
        fishr.branch_kfac(solver=fishr.CG())
    with pytest.raises(ValueError, match=r"CG\(initial_guess='previous'\) does not apply"):
        fishr.branch_natgrad(solver=fishr.CG(initial_guess="previous"))
    for bad in (-1.0, float("nan"), jnp.asarray(-0.01)):
        with pytest.raises(ValueError, match="`damping`"):
            fishr.branch_kfac(bad)
        with pytest.raises(ValueError, match="`damping`"):
            fishr.branch_natgrad_solve(grad, b, p, damping=bad)
    with pytest.raises(ValueError, match="fishr.CG: `max_steps`"):
        fishr.CG(max_steps=-1)
    with pytest.raises(ValueError, match="`blocks`"):
        fishr.branch_kfac(blocks=2.5)
    with pytest.raises(ValueError, match="`blocks`"):
        fishr.branch_kfac_solve(grad, b, p, blocks=0)
    with pytest.raises(TypeError, match="`key` must be a jax.random key"):
        fishr.branch_natgrad(key=3)
    with pytest.raises(ValueError, match="`key` draws the random projection"):
        fishr.branch_natgrad(key=jax.random.key(0), projection=p)
    with pytest.raises(ValueError, match="no branches"):
        fishr.branch_covariance(np.ones((0, 3)))
    with pytest.raises(ValueError, match="`branches` must be a 2-D"):
        fishr.branch_covariance(np.ones(3))
    with pytest.raises(ValueError, match="`bound`"):
        fishr.clip_params(-1.0)
    with pytest.raises(ValueError, match="`params`"):
        fishr.clip_params(1.0).update(grad, optax.EmptyState())


# --------------------------------------------------------------------------- transforms


def _run(tx, params, grads, branches_seq):
    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for grad, branches in zip(grads, branches_seq):
        upd, state = step(grad, state, params, branches=branches)
        params = optax.apply_updates(params, upd)
        out.append(params)
    return out, state


def _steps(n=3, d=5):
    probs = [make_problem(seed=s, d=d) for s in range(n)]
    params = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), probs[0][0])
    return params, [p[0] for p in probs], [p[2] for p in probs]


@pytest.mark.parametrize("method", ["natgrad", "kfac"])
def test_transform_in_chain_matches_numpy_with_the_keys_projections(method):
    lr, clip, damping = 0.05, 0.11, 1e-3
    params, grads, bs = _steps()
    make = {"natgrad": lambda: fishr.branch_natgrad(damping, key=jax.random.key(7)),
            "kfac": lambda: fishr.branch_kfac(damping, blocks=2, key=jax.random.key(7))}[method]
    tx = optax.chain(make(), optax.scale(-lr), fishr.clip_params(clip))
    outs, state = _run(tx, params, grads, bs)
    # the NumPy statement with the projections the key stream gives: split, use the second half
    key, theta = jax.random.key(7), flat(params)
    for grad, b, out in zip(grads, bs, outs):
        key, sub = jax.random.split(key)
        p = np.asarray(branch.gaussian_projection(sub, theta.size, b.shape[1], jnp.float64))
        g = flat(grad)
        pre = np_natgrad(g, b, p, damping) if method == "natgrad" else np_kfac(g, b, p, damping, 2)
        theta = np.clip(theta - lr * pre, -clip, clip)
        assert_close(flat(out), theta)
    assert int(state[0].count) == 3
    # reproducible from the same key, different from another key
    again, _ = _run(tx, params, grads, bs)
    assert_close(flat(again[-1]), flat(outs[-1]), 0.0)
    other = optax.chain(
        fishr.branch_natgrad(damping, key=jax.random.key(8)) if method == "natgrad"
        else fishr.branch_kfac(damping, blocks=2, key=jax.random.key(8)),
        optax.scale(-lr))
    assert np.max(np.abs(flat(_run(other, params, grads, bs)[0][0]) - flat(outs[0]))) > 1e-6


def test_transform_with_fixed_projection_and_schedule():
    grad, g, b, p = make_problem()
    sched = optax.linear_schedule(1e-2, 1e-1, 4)
    tx = fishr.branch_natgrad(sched, projection=p, solver=fishr.Cholesky())
    state = tx.init(grad)
    for step in range(3):
        upd, state = jax.jit(tx.update)(grad, state, branches=b)
        assert_close(flat(upd), np_natgrad(g, b, p, float(sched(step)), "cholesky"))
    assert int(state.count) == 3 and int(state.info.iterations) == 0 and bool(state.info.converged)


def test_non_finite_step_leaves_state_unchanged():
    grad, _, b, _ = make_problem()
    for tx in (fishr.branch_natgrad(key=jax.random.key(1)), fishr.branch_kfac(key=jax.random.key(1))):
        step = jax.jit(tx.update)
        _, state = step(grad, tx.init(grad), branches=b)
        bad_b = b.copy()
        bad_b[0, 0] = np.nan
        bad_g = jax.tree.map(lambda x: x * np.nan, grad)
        for gr, br in ((grad, bad_b), (bad_g, b), (bad_g, None)):
            upd, new_state = step(gr, state, branches=br)
            assert not np.all(np.isfinite(flat(upd)))
            for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
                np.testing.assert_array_equal(new, old)


def test_clip_params_clips_the_new_parameters():
    params = {"a": jnp.array([0.5, -0.2, 0.0]), "b": jnp.array(0.3)}
    updates = {"a": jnp.array([0.7, -0.1, 0.05]), "b": jnp.array(-1.0)}
    tx = fishr.clip_params(0.4)
    upd, _ = tx.update(updates, tx.init(params), params)
    new = optax.apply_updates(params, upd)
    expected = jax.tree.map(lambda p, u: np.clip(np.asarray(p) + np.asarray(u), -0.4, 0.4), params, updates)
    assert_close(flat(new), flat(expected), 1e-15)


# --------------------------------------------------------------------------- 4 devices


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:NDEV]), ("devices",))


def _split(x):
    return x.reshape(NDEV, x.shape[0] // NDEV, *x.shape[1:])


@pytest.mark.parametrize("k", [4, 8])
def test_covariance_and_solves_split_over_devices(k):
    grad, g, b, p = make_problem(k=k)

    def solves(gr, br, pr):
        return (fishr.branch_covariance(br, "devices"),
                fishr.branch_natgrad_solve(gr, br, pr, axis_name="devices")[0],
                fishr.branch_kfac_solve(gr, br, pr, blocks=2, axis_name="devices")[0])

    expected = (np_cov(b), np_natgrad(g, b, p, 1e-3), np_kfac(g, b, p, 1e-3, 2))
    pm = jax.pmap(solves, axis_name="devices", in_axes=(None, 0, None))(grad, _split(b), p)
    sm = jax.jit(jax.shard_map(solves, mesh=_mesh(), in_specs=(PS(), PS("devices"), PS()),
                               out_specs=PS(), check_vma=False))(grad, b, p)
    for got in (jax.tree.map(lambda a: a[0], pm), sm):
        assert_close(got[0], expected[0])
        assert_close(flat(got[1]), expected[1])
        assert_close(flat(got[2]), expected[2])
    for leaf in jax.tree.leaves(pm):  # identical on every device
        np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))


@pytest.mark.parametrize("method", ["natgrad", "kfac"])
def test_transform_split_over_devices_equals_single_device(method):
    params, grads, bs = _steps(n=2)
    make = {"natgrad": fishr.branch_natgrad, "kfac": fishr.branch_kfac}[method]

    def two_steps(axis_name, params, branches0, branches1):
        tx = optax.chain(make(1e-3, key=jax.random.key(5), axis_name=axis_name), optax.scale(-0.05))
        state = tx.init(params)
        for grad, br in zip(grads, (branches0, branches1)):
            upd, state = tx.update(grad, state, params, branches=br)
            params = optax.apply_updates(params, upd)
        return params

    single = flat(jax.jit(lambda *a: two_steps(None, *a))(params, *bs))
    if method == "natgrad":  # pmap once is enough: the pure solves of both methods are checked under it above
        pm = jax.pmap(lambda *a: two_steps("devices", *a), axis_name="devices", in_axes=(None, 0, 0))(
            params, *map(_split, bs))
        for dev in range(NDEV):
            assert_close(flat(jax.tree.map(lambda a: a[dev], pm)), single)
    sm = jax.jit(jax.shard_map(lambda *a: two_steps("devices", *a), mesh=_mesh(),
                               in_specs=(PS(), PS("devices"), PS("devices")), out_specs=PS(), check_vma=False))(
        params, *bs)
    assert_close(flat(sm), single)


@pytest.mark.parametrize("solver", [None, fishr.Cholesky(), fishr.Eigh()])
def test_undamped_rank_deficient_covariance_gives_nan_and_keeps_state(solver):
    """damping 0 with K <= D: C has rank K - 1 < D, there is no solution (a finite 4.4e15 before)."""
    grad, g, b, p = make_problem(k=5, d=6)
    kw = {} if solver is None else dict(solver=solver)
    out, info = fishr.branch_natgrad_solve(grad, b, p, damping=0.0, **kw)
    assert np.all(np.isnan(flat(out))) and not bool(info.converged)
    tx = fishr.branch_natgrad(0.0, projection=p, **kw)
    state = tx.init(grad)
    upd, new_state = jax.jit(tx.update)(grad, state, branches=b)
    assert np.all(np.isnan(flat(upd)))
    for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(new, old)
    if solver is not None:  # the block solve of the same rank-deficient blocks
        out, info = fishr.branch_kfac_solve(grad, b, p, damping=0.0, blocks=1, solver=solver)
        assert np.all(np.isnan(flat(out))) and not bool(info.converged)
    # with more branches than dimensions the undamped solve is well posed
    grad, g, b, p = make_problem(k=30, d=6)
    out, info = fishr.branch_natgrad_solve(grad, b, p, damping=0.0, solver=fishr.Cholesky())
    assert_close(flat(out), np_natgrad(g, b, p, 0.0, "cholesky"), 1e-8)
