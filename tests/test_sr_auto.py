"""``mode="auto"``: the documented rule, and that it runs (and reports) the mode it picks."""

import jax
import jax.numpy as jnp
import pytest
from flax_models import MLP
from sr_models import flat, random_like, rel_err

import fishr
from fishr import _sr_solve as sr_solve_mod

auto_mode = sr_solve_mod.auto_mode


def test_rule_picks_the_cheaper_exact_solve():
    # N >> P: the P x P Cholesky (RBM alpha=1 on 16 spins, N = 2,048)
    assert auto_mode(2048, 288, 50) == "dense"
    # N << P: the N x N kernel (RBM alpha=16, N = 256, P = 4,368; structured kernel 290 per pair)
    assert auto_mode(256, 4368, 290) == "sample_space"
    # N ~ P with a cheap structured kernel: sample space
    assert auto_mode(1024, 1104, 98) == "sample_space"
    # ... twice the samples with generic rows (kernel cost P per pair): the dense solve
    assert auto_mode(2048, 1104, 1104) == "dense"
    # a complex log psi of real parameters doubles the rows of both
    assert auto_mode(512, 5378, 2 * 2 * 5378, components=2) == "sample_space"


def test_rule_respects_memory_and_damping():
    big_p = sr_solve_mod.AUTO_MAX_DENSE_P + 1
    big_n = sr_solve_mod.AUTO_MAX_SAMPLE_SPACE_N + 1
    assert auto_mode(100_000, 300, 300) == "dense"  # cheaper, and the P x P matrix fits
    assert auto_mode(big_n, big_p, big_p) == "lazy"  # neither matrix fits
    assert auto_mode(1024, big_p, big_p) == "sample_space"
    assert auto_mode(256, 4368, 290, sample_space_ok=False) == "dense"
    assert auto_mode(256, big_p, 290, sample_space_ok=False) == "lazy"


def _case(n):
    model = MLP()
    x = jax.random.normal(jax.random.PRNGKey(0), (n, 4), jnp.float64)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.PRNGKey(1), x))
    return model.apply, params, x, random_like(jax.random.PRNGKey(2), params)


@pytest.mark.parametrize("n", [8, 512], ids=["few_samples", "many_samples"])
def test_transform_runs_and_reports_the_mode_the_rule_picks(n):
    apply, params, x, grad = _case(n)
    p = flat(params).size
    tx = fishr.sr(apply, damping=1e-3)  # mode="auto" is the default
    state = tx.init(params)
    assert int(state.mode) == -1  # nothing ran yet
    out, state = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=x))(grad, state, params)
    ran = fishr.SR_MODES[int(state.mode)]
    assert ran == ("sample_space" if n == 8 else "dense"), (n, p)
    explicit, _ = jax.jit(lambda g, p: fishr.sr_solve(apply, g, p, x, damping=1e-3, mode=ran,
                                                      solver=fishr.Cholesky()))(grad, params)
    assert rel_err(flat(out), flat(explicit)) <= 1e-10
    assert bool(state.info.converged)


def test_auto_with_a_solver_and_with_zero_damping():
    """A CG solver makes "auto" run lazy (the iterative solve it asks for); Cholesky or Eigh
    choose between dense and sample_space; a damping of 0 never takes sample_space."""
    apply, params, x, grad = _case(8)

    def picked(**kw):
        config = sr_solve_mod.sr_config("test", mode="auto", jacobian="auto", momentum=0.0, holomorphic=False,
                                        axis_name=None, **{"damping": 1e-3, "solver": None, **kw})
        return sr_solve_mod._resolve_auto(config, apply, params, x, 8, None)

    assert picked().mode == "sample_space"
    assert picked(solver=fishr.CG()).mode == "lazy"
    assert picked(solver=fishr.Eigh()).mode == "sample_space" and isinstance(picked(solver=fishr.Eigh()).solver,
                                                                            fishr.Eigh)
    assert picked(damping=0.0).mode == "dense"
    tx = fishr.sr(apply, damping=1e-3, solver=fishr.CG(rtol=1e-12))
    out, state = tx.update(grad, tx.init(params), params, batch=x)
    assert fishr.SR_MODES[int(state.mode)] == "lazy"
    ref, _ = fishr.sr_solve(apply, grad, params, x, damping=1e-3, mode="lazy", solver=fishr.CG(rtol=1e-12))
    assert rel_err(flat(out), flat(ref)) <= 1e-12
