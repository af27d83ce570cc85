"""Stochastic reconfiguration against a dense float64 NumPy reference of its own math."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sr_models import (
    dense_s,
    dense_sr,
    flat,
    holomorphic_log_psi,
    holomorphic_params,
    jacobian_rows,
    mlp_complex_log_psi,
    mlp_log_psi,
    mlp_params,
    random_like,
    rel_err,
    sub_jaxprs,
)

import fishr

TIGHT = fishr.CG(rtol=1e-14, max_steps=5000)
EXACT = [("lazy", TIGHT), ("dense", TIGHT), ("dense", fishr.Cholesky()), ("dense", fishr.Eigh()),
         ("sample_space", fishr.Cholesky()), ("sample_space", fishr.Eigh())]
IDS = ["lazy-cg", "dense-cg", "dense-cholesky", "dense-eigh", "sample_space-cholesky", "sample_space-eigh"]


def _jitted_solve(log_psi, grads, params, samples, **kw):
    """``fishr.sr_solve`` compiled as one program (op by op it takes several times longer)."""
    return jax.jit(lambda g, p, s: fishr.sr_solve(log_psi, g, p, s, **kw))(grads, params, samples)


@pytest.fixture(scope="module")
def problem():
    key = jax.random.PRNGKey(0)
    params = mlp_params(key)
    x = jax.random.normal(jax.random.PRNGKey(1), (24, 3))
    grad = random_like(jax.random.PRNGKey(2), params)
    return params, x, grad


@pytest.mark.parametrize("mode,solver", EXACT, ids=IDS)
@pytest.mark.parametrize("damping", [1e-3, 0.1])
def test_modes_match_dense_solve(problem, mode, solver, damping):
    params, x, grad = problem
    ref = dense_sr(mlp_log_psi, grad, params, x, damping)
    out, info = jax.jit(
        lambda g, p, s: fishr.sr_solve(mlp_log_psi, g, p, s, damping=damping, mode=mode, solver=solver)
    )(grad, params, x)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    assert rel_err(flat(out), ref) <= 1e-8
    assert float(info.residual_norm) <= 1e-8 * np.linalg.norm(flat(grad))
    assert bool(info.converged) and int(info.fallback) == 0
    if isinstance(solver, fishr.CG):
        assert int(info.iterations) > 0
    elif mode == "dense":
        assert int(info.iterations) == 0


@pytest.mark.parametrize("holomorphic", [False, True])
def test_dense_cholesky_with_column_blocks_matches_dense_solve(holomorphic):
    """P >= 128: dense Cholesky forms S's upper column blocks alone (linalg.upper_gram); its residual
    comes from the rows' products."""
    if holomorphic:
        log_psi, params = holomorphic_log_psi, holomorphic_params(jax.random.PRNGKey(0), n_in=12, hidden=12)
    else:
        log_psi, params = mlp_log_psi, mlp_params(jax.random.PRNGKey(0), n_in=8, hidden=20)
    assert sum(p.size for p in jax.tree.leaves(params)) >= 32 * fishr.linalg.GRAM_BLOCKS
    x = jax.random.normal(jax.random.PRNGKey(1), (96, 8 if not holomorphic else 12))
    if holomorphic:
        x = jnp.sign(x)
    grad = random_like(jax.random.PRNGKey(2), params)
    ref = dense_sr(log_psi, grad, params, x, 1e-3, holomorphic)
    out, info = _jitted_solve(log_psi, grad, params, x, damping=1e-3, mode="dense", solver=fishr.Cholesky(),
                              holomorphic=holomorphic)
    assert rel_err(flat(out), ref) <= 1e-9
    assert float(info.residual_norm) <= 1e-9 * np.linalg.norm(flat(grad)) and bool(info.converged)


def test_modes_agree_with_each_other(problem):
    params, x, grad = problem
    outs = [flat(jax.jit(functools.partial(fishr.sr_solve, mlp_log_psi, damping=1e-2, mode=m, solver=s))(
        grad, params, x)[0]) for m, s in EXACT]
    for o in outs[1:]:
        assert rel_err(o, outs[0]) <= 1e-9


def test_sample_space_is_minsr_for_gradient_in_row_space(problem):
    """g = Obar^T e / N gives x = Obar^T (Obar Obar^T + N damping I)^{-1} e (MinSR)."""
    params, x, _ = problem
    o = jacobian_rows(mlp_log_psi, params, x)
    ob = o - o.mean(0)
    n, lam = x.shape[0], 1e-3
    e = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (n,)))
    g = ob.T @ e / n
    _, unravel = jax.flatten_util.ravel_pytree(params)
    out, _ = fishr.sr_solve(mlp_log_psi, unravel(jnp.asarray(g)), params, x, damping=lam, mode="sample_space")
    minsr = ob.T @ np.linalg.solve(ob @ ob.T + n * lam * np.eye(n), e)
    assert rel_err(flat(out), minsr) <= 1e-9


# ----------------------------------------------------------------- vmcnet's own two checks


def _linear_log_psi(params, x):
    """log psi = x . theta with theta split over a pytree: the Jacobian is the positions."""
    return x[:, :2] @ params["a"] + x[:, 2:] @ params["b"]


@pytest.mark.parametrize("mode", ["lazy", "dense"])
def test_vmcnet_linear_model_fisher_is_position_covariance(mode):
    """vmcnet checks SR on log psi = x . theta, where O_i = x_i and S = Cov(x)."""
    x = jax.random.normal(jax.random.PRNGKey(3), (50, 5)) * jnp.arange(1.0, 6.0)
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    grad = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, 3.0, -1.0])}
    damping = 1e-3
    xc = np.asarray(x) - np.asarray(x).mean(0)
    expected = np.linalg.solve(xc.T @ xc / x.shape[0] + damping * np.eye(5), flat(grad))
    out, _ = jax.jit(lambda g, p, s: fishr.sr_solve(_linear_log_psi, g, p, s, damping=damping, mode=mode,
                                                    solver=TIGHT))(grad, params, x)
    np.testing.assert_allclose(flat(out), expected, rtol=1e-9)


def test_vmcnet_linear_model_isotropic_positions_scale_gradient():
    """With centred positions of covariance c I, SR divides the gradient by (c + damping)."""
    n, d = 64, 4
    base = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (n, d)))
    q, _ = np.linalg.qr(base - base.mean(0))  # orthonormal, centred columns
    x = jnp.asarray(q * np.sqrt(n) * 2.0)  # covariance 4 I
    params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    grad = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0, 4.0])}
    for mode, solver in [("lazy", TIGHT), ("dense", TIGHT), ("sample_space", None)]:
        out, _ = _jitted_solve(_linear_log_psi, grad, params, x, damping=0.5, mode=mode, solver=solver)
        np.testing.assert_allclose(flat(out), flat(grad) / 4.5, rtol=1e-10)


# ----------------------------------------------------------------- complex


@pytest.mark.parametrize("mode,solver", EXACT, ids=IDS)
def test_complex_log_psi_real_params(problem, mode, solver):
    params, x, grad = problem
    o = jacobian_rows(mlp_complex_log_psi, params, x)
    assert np.abs(o.imag).max() > 0.1  # the phase really contributes
    s = dense_s(o, real_params=True)
    np.testing.assert_allclose(s, s.T, atol=1e-14)
    ref = dense_sr(mlp_complex_log_psi, grad, params, x, 1e-3)
    out, _ = _jitted_solve(mlp_complex_log_psi, grad, params, x, damping=1e-3, mode=mode, solver=solver)
    assert rel_err(flat(out), ref) <= 1e-8


@pytest.mark.parametrize("mode,solver", EXACT, ids=IDS)
def test_holomorphic(mode, solver):
    params = holomorphic_params(jax.random.PRNGKey(7))
    x = jax.random.normal(jax.random.PRNGKey(8), (20, 3))
    grad = random_like(jax.random.PRNGKey(9), params)
    ref = dense_sr(holomorphic_log_psi, grad, params, x, 1e-3, holomorphic=True)
    assert np.abs(ref.imag).max() > 1e-3
    out, _ = _jitted_solve(holomorphic_log_psi, grad, params, x, damping=1e-3, mode=mode, solver=solver,
                           holomorphic=True)
    assert jnp.iscomplexobj(out["w"])
    assert rel_err(flat(out), ref) <= 1e-8


# ----------------------------------------------------------------- SPRING momentum


@pytest.mark.parametrize("mode,solver", EXACT, ids=IDS)
def test_momentum_equals_spring_sample_space_formula(problem, mode, solver):
    params, x, _ = problem
    o = jacobian_rows(mlp_log_psi, params, x)
    ob = o - o.mean(0)
    n, lam, mu = x.shape[0], 1e-2, 0.9
    _, unravel = jax.flatten_util.ravel_pytree(params)
    prev = np.asarray(jax.random.normal(jax.random.PRNGKey(11), (o.shape[1],)))
    e = np.asarray(jax.random.normal(jax.random.PRNGKey(12), (n,)))
    g = ob.T @ e / n
    # SPRING: phi_k = mu phi_{k-1} + Obar^T (Obar Obar^T + N lam I)^{-1} (e - mu Obar phi_{k-1})
    spring = mu * prev + ob.T @ np.linalg.solve(ob @ ob.T + n * lam * np.eye(n), e - mu * ob @ prev)
    out, _ = fishr.sr_solve(mlp_log_psi, unravel(jnp.asarray(g)), params, x, damping=lam, mode=mode, solver=solver,
                            momentum=mu, previous=unravel(jnp.asarray(prev)))
    assert np.max(np.abs(flat(out) - spring)) <= 1e-10 * max(1.0, np.max(np.abs(spring)))


def test_momentum_zero_is_plain_sr(problem):
    params, x, grad = problem
    prev = random_like(jax.random.PRNGKey(13), params)
    a, _ = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=1e-3, mode="sample_space", momentum=0.0, previous=prev)
    b, _ = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=1e-3, mode="sample_space")
    np.testing.assert_array_equal(flat(a), flat(b))


# ----------------------------------------------------------------- CG options


def test_cg_max_steps_initial_guess_and_diagnostics(problem):
    params, x, grad = problem
    _, info = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=1e-3, solver=fishr.CG(max_steps=3, rtol=1e-14))
    assert int(info.iterations) == 3 and not bool(info.converged)
    assert float(info.residual_norm) > 1e-8
    x_exact, info_exact = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=1e-3, solver=fishr.CG(rtol=1e-12))
    assert bool(info_exact.converged)
    # a start from the exact solution converges at once
    warm = fishr.CG(rtol=1e-10, initial_guess="previous")
    _, info_warm = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=1e-3, solver=warm, previous=x_exact)
    assert int(info_warm.iterations) < int(info_exact.iterations)
    zeros = fishr.CG(rtol=1e-12, initial_guess="zeros")
    x_zero, _ = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=1e-3, solver=zeros)
    assert rel_err(flat(x_zero), flat(x_exact)) <= 1e-9
    with pytest.raises(ValueError, match="initial_guess='previous' needs the previous solution"):
        fishr.sr_solve(mlp_log_psi, grad, params, x, damping=1e-3, solver=warm)


def test_default_max_steps_is_ten_times_params(problem):
    params, x, grad = problem
    p = flat(params).size
    _, info = fishr.sr_solve(mlp_log_psi, grad, params, x, damping=1e-6, solver=fishr.CG(rtol=0.0))
    assert int(info.iterations) == 10 * p


def _loop_bodies(jaxpr):
    """Every ``while`` body inside ``jaxpr`` (recursively through nested calls)."""
    for eqn in jaxpr.eqns:
        for name, inner in sub_jaxprs(eqn):
            if eqn.primitive.name == "while" and name == "body_jaxpr":
                yield inner
            yield from _loop_bodies(inner)


@pytest.mark.parametrize("log_psi", [mlp_log_psi, mlp_complex_log_psi], ids=["real", "complex"])
def test_dense_cg_products_take_the_rows_as_stored(problem, log_psi):
    """The rows enter dense CG's loop 2-D and unconjugated: a reshape or ``conj`` of them in the
    loop body is fused by XLA's CPU backend into a loop-emitted product (~3x slower per step)."""
    params, x, grad = problem
    size = x.shape[0] * flat(params).size  # n x P: any operand this large is the rows
    jaxpr = jax.make_jaxpr(lambda g, p, s: fishr.sr_solve(log_psi, g, p, s, mode="dense", solver=fishr.CG())[0])(
        grad, params, x).jaxpr
    bodies = list(_loop_bodies(jaxpr))
    assert bodies, "dense CG runs in a while loop"
    for body in bodies:
        for eqn in body.eqns:
            if eqn.primitive.name in ("reshape", "conj", "transpose", "convert_element_type"):
                assert all(np.prod(v.aval.shape) < size for v in eqn.invars if hasattr(v, "aval")), eqn

# ----------------------------------------------------------------- float32


@pytest.mark.parametrize("mode,solver", EXACT, ids=IDS)
def test_float32(mode, solver):
    params = mlp_params(jax.random.PRNGKey(0), dtype=jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(1), (24, 3), jnp.float32)
    grad = random_like(jax.random.PRNGKey(2), params)
    ref = dense_sr(mlp_log_psi, jax.tree.map(lambda g: g.astype(jnp.float64), grad),
                   jax.tree.map(lambda p: p.astype(jnp.float64), params), x.astype(jnp.float64), 0.1)
    if isinstance(solver, fishr.CG):
        solver = fishr.CG(rtol=1e-6)
    out, _ = _jitted_solve(mlp_log_psi, grad, params, x, damping=0.1, mode=mode, solver=solver)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(out))
    assert rel_err(flat(out), ref) <= 1e-4


@pytest.mark.parametrize("jacobian", ["structured", "generic"])
def test_float32_sample_space_refines_the_woodbury_solve(jacobian):
    """The VMC gradient lies in the row space of Obar, where the Woodbury
    subtraction cancels ~log10(1/damping) digits; one refinement step restores
    them (measured here: 1.2e-4 relative error without it, 5.7e-6 with it)."""
    from flax_models import MLP

    n, model = 128, MLP(width=16)
    x = jax.random.normal(jax.random.PRNGKey(1), (n, 8), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), x)
    e = jax.random.normal(jax.random.PRNGKey(2), (n,), jnp.float32)
    vmc_grad = lambda p, s, e: jax.vjp(lambda q: model.apply(q, s), p)[1](2 * (e - e.mean()) / n)[0]
    f64 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float64), t)
    ref, _ = jax.jit(functools.partial(fishr.sr_solve, model.apply, damping=1e-3, mode="dense",
                                       solver=fishr.Cholesky()))(vmc_grad(f64(params), f64(x), f64(e)), f64(params),
                                                                 f64(x))
    out, _ = jax.jit(functools.partial(fishr.sr_solve, model.apply, damping=1e-3, mode="sample_space",
                                       jacobian=jacobian))(vmc_grad(params, x, e), params, x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(out))
    assert rel_err(flat(out), flat(ref)) <= 2e-5
