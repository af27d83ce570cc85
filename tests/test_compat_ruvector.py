"""fishr.compat.ruvector against a line-by-line NumPy statement of the Rust seed, over several updates."""

import numpy as np
import pytest
from kfac_models import SEED_EPS, SeedError, SeedLayer

from fishr.compat import ruvector as rv

TOL = 1e-10


def close(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return x.shape == y.shape and np.max(np.abs(x - y)) <= TOL * max(1.0, np.max(np.abs(y)))


def batches(rng, n_steps, batch, n_in, n_out):
    return [(rng.normal(size=(batch, n_in)).tolist(), rng.normal(size=(batch, n_out)).tolist()) for _ in range(n_steps)]


def test_defaults_and_builders():
    layer = rv.KFACLayer.new(10, 5)
    assert layer.a_factor.shape == (10, 10) and layer.g_factor.shape == (5, 5)
    assert (layer.damping, layer.ema_factor, layer.num_updates) == (1e-3, 0.95, 0)
    assert layer.with_damping(-3.0).damping == rv.EPS == SEED_EPS
    assert layer.with_ema(1.7).ema_factor == 1.0 and layer.with_ema(-0.2).ema_factor == 0.0
    kfac = rv.KFACApproximation.new([(10, 20), (20, 5)]).with_learning_rate(0.01).with_damping(0.001)
    assert kfac.num_layers() == 2 and (kfac.learning_rate, kfac.damping) == (0.01, 0.001)
    assert rv.KFACApproximation([(2, 2)]).with_learning_rate(0.0).learning_rate == rv.EPS


@pytest.mark.parametrize("damping,ema", [(1e-3, 0.95), (0.1, 0.5), (0.0, 0.0)])
def test_layer_matches_seed_over_several_updates(damping, ema):
    rng = np.random.default_rng(0)
    ours = rv.KFACLayer(4, 3).with_damping(damping).with_ema(ema)
    seed = SeedLayer(4, 3).with_damping(damping).with_ema(ema)
    for acts, grads in batches(rng, 4, 6, 4, 3):
        ours.update(acts, grads)
        seed.update(acts, grads)
        assert close(ours.a_factor, seed.a) and close(ours.g_factor, seed.g)
        w = rng.normal(size=(3, 4)).tolist()
        assert close(ours.natural_gradient(w), seed.natural_gradient(w))
    assert ours.num_updates == 4
    ours.reset()
    assert ours.num_updates == 0 and not ours.a_factor.any() and not ours.g_factor.any()


def test_seed_unit_test_values():
    """The seed's own natural-gradient example: A = G = I / 2, damping 0.1 -> dW / 0.55^2."""
    layer = rv.KFACLayer(2, 2).with_damping(0.1)
    layer.update([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
    w = np.array([[0.1, 0.2], [0.3, 0.4]])
    assert close(layer.natural_gradient(w.tolist()), w / 0.55**2)


def test_zero_factors_use_the_eps_floor():
    layer = rv.KFACLayer(2, 3)
    w = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert close(layer.natural_gradient(w), SeedLayer(2, 3).natural_gradient(w))  # dW / EPS^2


def test_approximation_matches_seed_with_learning_rate_and_unclamped_layer_damping():
    rng = np.random.default_rng(1)
    dims = [(3, 4), (4, 2)]
    ours = rv.KFACApproximation(dims).with_learning_rate(0.05).with_damping(-1.0)
    assert ours.damping == rv.EPS
    seeds = [SeedLayer(i, o) for i, o in dims]
    for s in seeds:
        s.damping = -1.0  # the seed hands the unclamped value to its layers; the per-factor EPS floor applies
    for _step in range(3):
        for idx, (n_in, n_out) in enumerate(dims):
            acts, grads = batches(rng, 1, 5, n_in, n_out)[0]
            ours.update_layer(idx, acts, grads)
            seeds[idx].update(acts, grads)
            w = rng.normal(size=(n_out, n_in)).tolist()
            assert close(ours.natural_gradient_layer(idx, w), -0.05 * seeds[idx].natural_gradient(w))
    ours.reset()
    assert close(ours.natural_gradient_layer(0, np.ones((4, 3)).tolist()), -0.05 * np.ones((4, 3)) / SEED_EPS**2)


def test_errors_in_the_seeds_order_and_state_unchanged():
    layer = rv.KFACLayer(3, 2)
    with pytest.raises(rv.EmptyInputError):
        layer.update([], [[1.0, 2.0]])
    with pytest.raises(rv.EmptyInputError):
        layer.update([[1.0, 2.0, 3.0]], [])
    with pytest.raises(rv.DimensionMismatchError) as e:
        layer.update([[1.0, 2.0, 3.0]] * 2, [[1.0, 2.0]] * 3)
    assert (e.value.expected, e.value.found) == (2, 3)
    with pytest.raises(rv.DimensionMismatchError) as e:  # activations are checked before gradients
        layer.update([[1.0, 2.0, 3.0], [1.0, 2.0]], [[1.0]] * 2)
    assert (e.value.expected, e.value.found) == (3, 2)
    with pytest.raises(rv.DimensionMismatchError) as e:
        layer.update([[1.0, 2.0, 3.0]] * 2, [[1.0, 2.0], [1.0, 2.0, 3.0]])
    assert (e.value.expected, e.value.found) == (2, 3)
    assert layer.num_updates == 0 and not layer.a_factor.any()
    with pytest.raises(rv.DimensionMismatchError) as e:
        layer.natural_gradient([[1.0, 2.0, 3.0]])
    assert (e.value.expected, e.value.found) == (2, 1)
    with pytest.raises(rv.DimensionMismatchError):  # Rust would index out of bounds here
        layer.natural_gradient([[1.0, 2.0, 3.0], [1.0, 2.0]])
    kfac = rv.KFACApproximation([(3, 2)])
    for bad in (1, -1):
        with pytest.raises(rv.InvalidParameterError, match="index out of bounds"):
            kfac.update_layer(bad, [[1.0, 2.0, 3.0]], [[1.0, 2.0]])
        with pytest.raises(IndexError):
            kfac.natural_gradient_layer(bad, [[1.0, 2.0, 3.0]] * 2)
    with pytest.raises(ValueError, match="NaN"):
        rv.KFACLayer(2, 2).with_damping(float("nan"))


def test_non_positive_definite_factor_raises_like_the_seed():
    layer = rv.KFACLayer(3, 2)
    layer.a_factor = -np.eye(3)  # the seed's factors are public fields
    seed = SeedLayer(3, 2)
    seed.a = -np.eye(3)
    w = np.ones((2, 3)).tolist()
    with pytest.raises(SeedError, match="not PD"):
        seed.natural_gradient(w)
    with pytest.raises(rv.NumericalInstabilityError, match="not positive definite"):
        layer.natural_gradient(w)
    nan_layer = rv.KFACLayer(2, 2)
    nan_layer.update([[float("nan"), 1.0]], [[1.0, 0.0]])
    with pytest.raises(rv.NumericalInstabilityError):  # the seed would return NaN here
        nan_layer.natural_gradient([[1.0, 0.0], [0.0, 1.0]])
