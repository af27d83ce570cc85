"""Small log-psi models and a float64 NumPy reference of SR for the SR tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree


def slow(*values, id=None):
    """A parameter set marked ``slow``: run by CI; left out by ``-m "not slow"``, run alone by ``-m slow``.

    For the cases of a parametrised test that repeat what its other cases already cover along
    the same code path (CI's 20-minute budget).
    """
    return pytest.param(*values, id=id, marks=pytest.mark.slow)


@functools.partial(jax.jit, static_argnames=("n_in", "hidden", "dtype"))  # one program, not op by op
def mlp_params(key, n_in=3, hidden=6, dtype=jnp.float64):
    k = jax.random.split(key, 4)
    params = {
        "dense1": {"w": jax.random.normal(k[0], (n_in, hidden), dtype) / np.sqrt(n_in),
                   "b": 0.1 * jax.random.normal(k[1], (hidden,), dtype)},
        "dense2": {"w": jax.random.normal(k[2], (hidden, 1), dtype) / np.sqrt(hidden)},
        "phase": {"w": jax.random.normal(k[3], (hidden, 1), dtype) / np.sqrt(hidden)},
    }
    return jax.tree.map(lambda p: p.astype(dtype), params)


def mlp_log_psi(params, x):
    """Real log psi, batched: (N, n_in) -> (N,). The 'phase' leaf is unused (a zero column of O)."""
    h = jnp.tanh(x @ params["dense1"]["w"] + params["dense1"]["b"])
    return (h @ params["dense2"]["w"])[:, 0]


def mlp_complex_log_psi(params, x):
    """Complex log psi of real parameters: log|psi| + i phase."""
    h = jnp.tanh(x @ params["dense1"]["w"] + params["dense1"]["b"])
    return (h @ params["dense2"]["w"])[:, 0] + 1j * jnp.sin(h @ params["phase"]["w"])[:, 0]


def holomorphic_params(key, n_in=3, hidden=5):
    k = jax.random.split(key, 4)
    c = lambda a, b, s: (jax.random.normal(a, s) + 1j * jax.random.normal(b, s)) / np.sqrt(2 * s[0])
    return {"w": c(k[0], k[1], (n_in, hidden)), "v": c(k[2], k[3], (hidden,))}


def holomorphic_log_psi(params, x):
    """A holomorphic function of complex parameters (an RBM-like log cosh)."""
    return jnp.sum(jnp.log(jnp.cosh(x @ params["w"])), axis=-1) + x[:, :1] @ params["v"][:1]


@jax.jit  # one program: op by op, each leaf shape compiles its own random-number kernels (~1 s per tree)
def random_like(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, leaf in zip(keys, leaves):
        r = jax.random.normal(k, leaf.shape)
        if jnp.iscomplexobj(leaf):
            r = r + 1j * jax.random.normal(jax.random.fold_in(k, 1), leaf.shape)
        out.append(r.astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def jacobian_rows(log_psi, params, x, holomorphic=False):
    """Per-sample O_i as a dense NumPy array (N, P), complex where log psi is complex.

    Built column by column from jax.jacfwd of the batched function (an independent
    route from fishr's vmap-of-jacrev), compiled: several times faster than op by op.
    """
    flat, unravel = ravel_pytree(params)
    f = lambda p: log_psi(unravel(p), x)
    out = jax.eval_shape(f, flat)
    wrap = jax.jit
    if holomorphic:
        return np.asarray(wrap(jax.jacfwd(f, holomorphic=True))(flat))
    if jnp.issubdtype(out.dtype, jnp.complexfloating):
        re = wrap(jax.jacfwd(lambda p: jnp.real(f(p))))(flat)
        im = wrap(jax.jacfwd(lambda p: jnp.imag(f(p))))(flat)
        return np.asarray(re) + 1j * np.asarray(im)
    return np.asarray(wrap(jax.jacfwd(f))(flat))


def dense_s(o, real_params=True):
    """S = Obar^H Obar / N (real part for real parameters)."""
    ob = o - o.mean(axis=0, keepdims=True)
    s = ob.conj().T @ ob / o.shape[0]
    return s.real if real_params else s


def dense_sr(log_psi, grad, params, x, damping, holomorphic=False):
    """float64 reference: numpy.linalg.solve((S + damping I), g)."""
    o = jacobian_rows(log_psi, params, x, holomorphic)
    s = dense_s(o, real_params=not holomorphic)
    g = np.asarray(ravel_pytree(grad)[0])
    return np.linalg.solve(s + damping * np.eye(s.shape[0]), g)


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def sub_jaxprs(eqn):
    """``(param name, jaxpr)`` for every jaxpr an equation holds (loop bodies, branches, inner calls)."""
    for name, value in eqn.params.items():
        for sub in value if isinstance(value, (tuple, list)) else [value]:
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
                yield name, inner


def dot_precisions(jaxpr) -> list:
    """The ``precision`` of every float ``dot_general`` in ``jaxpr`` and the jaxprs it holds."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating):
            out.append(eqn.params["precision"])
        for _, inner in sub_jaxprs(eqn):
            out.extend(dot_precisions(inner))
    return out
