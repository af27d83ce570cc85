"""fishr.compat.qmlhc against a NumPy re-statement of qmlhc's HCNaturalGrad / HCKFACLike over several steps."""

import inspect

import jax.numpy as jnp
import numpy as np
import pytest
from branch_reference import np_qmlhc_run

from fishr.compat.qmlhc import HCKFACLike, HCNaturalGrad

TOL = 1e-10


def make_params():
    return {"w": np.full((3, 2), 0.05), "bias": np.linspace(-0.1, 0.1, 4), "s": np.float64(0.2)}


def make_contexts(steps=5, d=5, k=6, seed=0):
    """Mostly branched steps, with the no-preconditioning cases in between."""
    rng = np.random.default_rng(seed)
    params = make_params()
    contexts = []
    for i in range(steps):
        grads = {key: rng.normal(size=np.shape(v)) for key, v in params.items()}
        kind = i % 5
        if kind == 2:
            info = {"branches": None}
        elif kind == 4:
            info = {"branches": rng.normal(size=d)}  # 1-D: no preconditioning
        else:
            info = {"branches": rng.normal(size=(k, d)) + rng.normal(size=(1, d))}
        ctx = {"grads": grads, "info": info}
        if i == 3:
            ctx = {"grads": grads}  # no "info" at all
        contexts.append(ctx)
    return contexts


def assert_same_run(opt, reference, params, contexts):
    state = opt.initialize(params)
    assert state == {"steps": 0}
    for ctx, (ref_params, ref_state) in zip(contexts, reference):
        params, state = opt.step_params(None, params, ctx)
        assert sorted(params) == sorted(ref_params)
        for key in ref_params:
            assert isinstance(params[key], np.ndarray) and params[key].shape == np.shape(ref_params[key])
            np.testing.assert_allclose(params[key], ref_params[key], rtol=0, atol=TOL)
        assert set(state) == {"steps", "precond_norm"} and state["steps"] == ref_state["steps"]
        np.testing.assert_allclose(state["precond_norm"], ref_state["precond_norm"], rtol=TOL)
    return params


def test_defaults_are_the_seeds():
    nat = inspect.signature(HCNaturalGrad).parameters
    assert {k: v.default for k, v in nat.items()} == dict(
        lr=5e-3, fisher_damp=1e-3, cg_iters=8, clip=None, grad_estimator=None, seed=12345)
    kf = inspect.signature(HCKFACLike).parameters
    assert list(kf) == ["lr", "damp", "blocks", "grad_estimator", "clip", "seed"]
    assert {k: v.default for k, v in kf.items()} == dict(
        lr=5e-3, damp=1e-3, blocks=4, grad_estimator=None, clip=None, seed=2027)


@pytest.mark.parametrize("clip", [None, 0.08])
@pytest.mark.parametrize("cg_iters", [8, 2])
def test_hc_natural_grad_matches_the_seed(clip, cg_iters):
    params, contexts = make_params(), make_contexts(6)
    ref = np_qmlhc_run("natgrad", params, contexts, lr=0.05, damping=1e-3, seed=12345, clip=clip, cg_iters=cg_iters)
    assert_same_run(HCNaturalGrad(lr=0.05, cg_iters=cg_iters, clip=clip), ref, params, contexts)


@pytest.mark.parametrize("blocks, d", [(4, 5), (2, 6), (9, 5), (0, 5), (1, 3)])
def test_hc_kfac_like_matches_the_seed(blocks, d):
    params, contexts = make_params(), make_contexts(6, d=d)
    ref = np_qmlhc_run("kfac", params, contexts, lr=0.05, damping=1e-2, seed=2027, clip=0.3, blocks=blocks)
    assert_same_run(HCKFACLike(lr=0.05, damp=1e-2, blocks=blocks, clip=0.3), ref, params, contexts)


def test_seed_argument_and_default_seed_stream():
    params, contexts = make_params(), make_contexts(3)
    ref = np_qmlhc_run("natgrad", params, contexts, lr=5e-3, damping=1e-3, seed=99)
    assert_same_run(HCNaturalGrad(seed=99), ref, params, contexts)
    ref = np_qmlhc_run("kfac", params, contexts, lr=5e-3, damping=1e-3, seed=2027)
    assert_same_run(HCKFACLike(), ref, params, contexts)


@pytest.mark.parametrize("cls", [HCNaturalGrad, HCKFACLike])
def test_grad_estimator_is_used_instead_of_context_grads(cls):
    params = make_params()
    contexts = [{"info": c.get("info", {}), "grads": {}} for c in make_contexts(5)]  # empty grads: unused
    target = {k: 0.3 * np.ones(np.shape(v)) for k, v in params.items()}

    def estimator(model, p, context):  # gradient of 0.5 |p - target|^2, flat in sorted-key order
        assert model == "model"
        return [np.ravel(np.asarray(p[k], dtype=float) - target[k]) for k in sorted(p)]

    def grad_fn(p, context):
        return np.concatenate(estimator("model", p, context))

    kind, seed = ("natgrad", 12345) if cls is HCNaturalGrad else ("kfac", 2027)
    ref = np_qmlhc_run(kind, params, contexts, lr=0.1, damping=1e-3, seed=seed, grad_fn=grad_fn)
    opt = cls(lr=0.1, grad_estimator=lambda m, p, c: np.concatenate(estimator(m, p, c)))
    state = opt.initialize(params)
    p = params
    for ctx, (ref_p, ref_state) in zip(contexts, ref):
        p, state = opt.step_params("model", p, ctx)
        for key in ref_p:
            np.testing.assert_allclose(p[key], ref_p[key], rtol=0, atol=TOL)
        np.testing.assert_allclose(state["precond_norm"], ref_state["precond_norm"], rtol=TOL)
    assert state["steps"] == len(contexts)


@pytest.mark.parametrize("cls", [HCNaturalGrad, HCKFACLike])
def test_errors_are_the_seeds(cls):
    params = make_params()
    opt = cls()
    opt.initialize(params)
    branches = {"branches": np.ones((3, 2))}
    message = f"{cls.__name__} expects either grad_estimator or context['grads']"
    for ctx in ({}, {"grads": {}}, {"grads": None, "info": branches}):
        with pytest.raises(ValueError) as err:
            opt.step_params(None, params, ctx)
        assert str(err.value) == message
    bad = {"w": np.ones(6), "bias": np.ones(5), "s": 1.0}  # w reshaped is fine (size 6), bias is not
    with pytest.raises(ValueError) as err:
        opt.step_params(None, params, {"grads": bad, "info": branches})
    assert str(err.value) == "Gradient size mismatch for key 'bias'"
    with pytest.raises(KeyError):
        opt.step_params(None, params, {"grads": {"w": np.ones(6)}})
    with pytest.raises(ValueError, match="reshape"):
        cls(grad_estimator=lambda m, p, c: np.ones(3)).step_params(None, params, {})
    # failed steps change nothing: the counter and the NumPy stream continue as in the seed
    assert opt._state == {"steps": 0}
    contexts = make_contexts(2)
    kind, seed = ("natgrad", 12345) if cls is HCNaturalGrad else ("kfac", 2027)
    ref = np_qmlhc_run(kind, params, contexts, lr=5e-3, damping=1e-3, seed=seed)
    assert_same_run(opt, ref, params, contexts)


def test_step_without_initialize_and_input_types():
    """No initialize() needed (the counter starts from 0); float32/jax/list values are read as float64."""
    params = {"b": [0.1, 0.2], "a": jnp.asarray(np.ones((2, 2), np.float32))}
    ctx = {"grads": {"a": np.ones(4, np.float32), "b": (1.0, -1.0)},
           "info": {"branches": [[0.0, 1.0, 2.0], [1.0, 0.5, 0.0]]}}
    ref = list(np_qmlhc_run("natgrad", params, [ctx], lr=5e-3, damping=1e-3, seed=12345))
    new, state = HCNaturalGrad().step_params(None, params, ctx)
    assert state["steps"] == 1 and new["a"].dtype == np.float64 and new["a"].shape == (2, 2)
    for key in ref[0][0]:
        np.testing.assert_allclose(new[key], ref[0][0][key], rtol=0, atol=TOL)
