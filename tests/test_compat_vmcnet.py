"""fishr.compat.vmcnet against a NumPy re-statement of vmcnet's get_fisher_inverse_fn."""

import enum
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as PS

from fishr import distributed
from fishr.compat.vmcnet import SRMode, get_fisher_inverse_fn

TOL = 1e-10
NDEV = 4
L, H, N = 3, 4, 16


def log_psi(params, x):
    """Works on a batch (n, L) -> (n,) and on one sample (L,) -> ()."""
    return jnp.sum(jnp.tanh(x @ params["W"]), axis=-1) + x @ params["a"]


def np_jacobian(params, x):
    """Rows d log_psi(x_i) / d params in ravel_pytree order (W then a)."""
    w = np.asarray(params["W"])
    t = np.tanh(x @ w)
    dw = x[:, :, None] * (1.0 - t**2)[:, None, :]
    return np.concatenate([dw.reshape(x.shape[0], -1), x], axis=1)


def np_scipy_cg(a_mul, b, x0, maxiter, tol=1e-5):
    """jax.scipy.sparse.linalg.cg without preconditioner: stop when |r|^2 <= tol^2 |b|^2."""
    x = x0.copy()
    r = b - a_mul(x)
    p = r.copy()
    gamma = r @ r
    threshold = tol**2 * (b @ b)
    k = 0
    while gamma > threshold and k < maxiter:
        ap = a_mul(p)
        alpha = gamma / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        gamma_new = r @ r
        p = r + (gamma_new / gamma) * p
        gamma = gamma_new
        k += 1
    return x


def np_vmcnet(mode, jac, g, damping, maxiter=None, weights=None):
    """vmcnet's preconditioner on one device, with the centring mean ``weights @ u``."""
    n = jac.shape[0]
    weights = np.full(n, 1.0 / n) if weights is None else weights
    if mode == "DEBUG":
        jc = jac - weights @ jac
        a_mul = lambda v: jc.T @ (jc @ v) / n + damping * v
    else:
        a_mul = lambda v: jac.T @ (jac @ v - weights @ (jac @ v)) / n + damping * v
    return np_scipy_cg(a_mul, g, g, maxiter if maxiter is not None else 10 * g.size)


def problem(seed=0, n=N):
    rng = np.random.default_rng(seed)
    params = {"W": rng.normal(size=(L, H)), "a": rng.normal(size=L)}
    x = rng.normal(size=(n, L))
    grad = {"W": rng.normal(size=(L, H)), "a": rng.normal(size=L)}
    return params, x, grad


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def plain_mean(u):
    return jnp.mean(u, axis=0)


def test_signature_is_vmcnets():
    sig = inspect.signature(get_fisher_inverse_fn).parameters
    assert list(sig) == ["log_psi_apply", "mean_grad_fn", "damping", "maxiter", "mode"]
    assert sig["damping"].default == 0.001 and sig["maxiter"].default is None and sig["mode"].default is SRMode.LAZY
    assert [m.name for m in SRMode] == ["LAZY", "DEBUG"] and SRMode.LAZY.value == 1


@pytest.mark.parametrize("mode", ["LAZY", "DEBUG"])
@pytest.mark.parametrize("damping, maxiter", [(1e-3, 6), (5e-2, 8), (0.5, None), (2.0, None)])
def test_matches_numpy_statement(mode, damping, maxiter):
    params, x, grad = problem()
    fn = get_fisher_inverse_fn(log_psi, plain_mean, damping=damping, maxiter=maxiter, mode=SRMode[mode])
    out = jax.jit(fn)(grad, params, x)
    assert jax.tree.structure(out) == jax.tree.structure(grad)
    expected = np_vmcnet(mode, np_jacobian(params, x), flat(grad), damping, maxiter)
    np.testing.assert_allclose(flat(out), expected, rtol=0, atol=TOL * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("mode, maxiter", [("DEBUG", 8), ("LAZY", 4)])
def test_the_users_mean_grad_fn_does_the_centring(mode, maxiter):
    """A weighted mean (weights summing to 1) instead of the plain one changes S; fishr follows it."""
    params, x, grad = problem(1)
    weights = np.linspace(1.0, 3.0, N)
    weights /= weights.sum()
    fn = get_fisher_inverse_fn(log_psi, lambda u: jnp.tensordot(weights, u, axes=1), 1e-2, maxiter, SRMode[mode])
    out = flat(jax.jit(fn)(grad, params, x))
    jac, g = np_jacobian(params, x), flat(grad)
    expected = np_vmcnet(mode, jac, g, 1e-2, maxiter, weights)
    np.testing.assert_allclose(out, expected, rtol=0, atol=TOL * max(1.0, np.abs(expected).max()))
    assert np.abs(out - np_vmcnet(mode, jac, g, 1e-2, maxiter)).max() > 1e-6  # the plain mean differs


def test_modes_agree_and_bad_modes_raise_vmcnets_error():
    params, x, grad = problem(2)
    lazy = get_fisher_inverse_fn(log_psi, plain_mean, 0.5)(grad, params, x)
    debug = get_fisher_inverse_fn(log_psi, plain_mean, 0.5, mode=SRMode.DEBUG)(grad, params, x)
    np.testing.assert_allclose(flat(lazy), flat(debug), rtol=0, atol=1e-9)

    class TheirSRMode(enum.Enum):  # vmcnet's own enum is accepted by name
        LAZY = 1
        DEBUG = 2

    theirs = get_fisher_inverse_fn(log_psi, plain_mean, 0.5, mode=TheirSRMode.DEBUG)(grad, params, x)
    np.testing.assert_allclose(flat(theirs), flat(debug), rtol=0, atol=0)
    for bad in ("LAZY", "lazy", 1, None):
        with pytest.raises(ValueError) as err:
            get_fisher_inverse_fn(log_psi, plain_mean, mode=bad)
        assert str(err.value) == (
            f"Requested Fisher apply mode not supported; only LAZY, DEBUG are supported, but {bad} was requested."
        )


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:NDEV]), ("pmap",))


@pytest.mark.parametrize("mode", ["LAZY", "DEBUG"])
def test_pmap_with_pmean_in_mean_grad_fn_equals_single_device(mode):
    params, x, grad = problem(3)
    expected = np_vmcnet(mode, np_jacobian(params, x), flat(grad), 1e-3, maxiter=6)
    global_mean = lambda u: distributed.batch_mean(u, "pmap")
    fn = get_fisher_inverse_fn(log_psi, global_mean, maxiter=6, mode=SRMode[mode])
    xs = x.reshape(NDEV, N // NDEV, L)
    pm = jax.pmap(fn, axis_name="pmap", in_axes=(None, None, 0))(grad, params, xs)
    for dev in range(NDEV):
        np.testing.assert_allclose(flat(jax.tree.map(lambda a: a[dev], pm)), expected, rtol=0, atol=TOL * 10)
    sm = jax.jit(jax.shard_map(fn, mesh=_mesh(), in_specs=(PS(), PS(), PS("pmap")), out_specs=PS(),
                               check_vma=False))(grad, params, x)
    np.testing.assert_allclose(flat(sm), expected, rtol=0, atol=TOL * 10)


def test_pmap_with_a_local_mean_grad_fn_centres_per_device():
    """mean_grad_fn without pmean: each device centres by its own mean; the Fisher product is still pmean'd."""
    params, x, grad = problem(4)
    jacs = np_jacobian(params, x).reshape(NDEV, N // NDEV, -1)
    local_c = [j - j.mean(axis=0) for j in jacs]
    a_mul = lambda v: np.mean([c.T @ (c @ v) / c.shape[0] for c in local_c], axis=0) + 1e-3 * v
    g = flat(grad)
    expected = np_scipy_cg(a_mul, g, g, 6)
    fn = get_fisher_inverse_fn(log_psi, plain_mean, maxiter=6, mode=SRMode.DEBUG)
    pm = jax.pmap(fn, axis_name="pmap", in_axes=(None, None, 0))(grad, params, x.reshape(NDEV, N // NDEV, L))
    np.testing.assert_allclose(flat(jax.tree.map(lambda a: a[0], pm)), expected, rtol=0, atol=TOL * 10)


def test_sr_solve_mean_fn_hook_defaults_and_refuses_structured():
    """The hook the adapter uses: mean_fn=None is fishr's batch mean; a structured Jacobian refuses it."""
    import fishr

    params, x, grad = problem(5)
    for mode in ("lazy", "dense"):
        cg = fishr.CG(max_steps=6)
        solve = jax.jit(lambda g, p, mode=mode, cg=cg, **kw: fishr.sr_solve(log_psi, g, p, x, mode=mode, solver=cg,
                                                                           **kw)[0], static_argnames="mean_fn")
        default = solve(grad, params)
        explicit = solve(grad, params, mean_fn=lambda u: jnp.mean(u, 0))
        np.testing.assert_allclose(flat(explicit), flat(default), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="`mean_fn`"):
        fishr.sr_solve(log_psi, grad, params, x, jacobian="structured", mean_fn=plain_mean)


def test_mean_grad_fn_over_all_axes_is_refused_where_it_is_wrong():
    """jnp.mean without axis=0: in DEBUG it would average the (n, P) Jacobian over the parameters
    too (60% off before this check) and is refused; in LAZY it only sees (n,) vectors, where it
    is the right mean."""
    params, x, grad = problem(6)
    debug = get_fisher_inverse_fn(log_psi, jnp.mean, 1e-2, 6, SRMode.DEBUG)
    with pytest.raises(ValueError, match="`mean_grad_fn` must average over the batch axis 0"):
        jax.jit(debug)(grad, params, x)
    lazy = get_fisher_inverse_fn(log_psi, jnp.mean, 1e-2, 6, SRMode.LAZY)
    reference = get_fisher_inverse_fn(log_psi, plain_mean, 1e-2, 6, SRMode.LAZY)
    np.testing.assert_allclose(flat(lazy(grad, params, x)), flat(reference(grad, params, x)), rtol=1e-12)


def test_sr_solve_checks_the_mean_fn_shape():
    import fishr

    params, x, grad = problem(7)
    with pytest.raises(ValueError, match="`mean_fn` must average over the batch axis 0"):
        fishr.sr_solve(log_psi, grad, params, x, mode="dense", mean_fn=jnp.mean)


@pytest.mark.parametrize("mode", ["LAZY", "DEBUG"])
def test_products_keep_jaxs_precision_as_vmcnet(mode):
    from sr_models import dot_precisions

    params, x, grad = problem()
    fn = get_fisher_inverse_fn(log_psi, plain_mean, damping=1e-3, maxiter=4, mode=SRMode[mode])
    # the model's products carry no precision (JAX's setting); under fishr.sr's default every one would be HIGHEST
    model_products = [p for p in dot_precisions(jax.make_jaxpr(fn)(grad, params, x).jaxpr) if p is None]
    assert len(model_products) >= 2
