"""Tests for the reward-function protocol and combinators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from artifex_fn.training.reward_functions import (
    ClippedReward, CompositeReward, ConstantReward, RewardFunction,
    ScaledReward, ThresholdReward)


def base_reward(samples, conditions=None, **kwargs):
    """Mean over feature axes: one score per sample."""
    return jnp.mean(samples.reshape(samples.shape[0], -1), axis=-1)


def aesthetic_reward(samples, conditions=None, **kwargs):
    return jnp.max(samples.reshape(samples.shape[0], -1), axis=-1)


def clip_reward(samples, conditions=None, **kwargs):
    return -jnp.min(samples.reshape(samples.shape[0], -1), axis=-1)


def _floats(lo, hi):
    """Float32 values without tiny magnitudes: XLA on CPU flushes subnormal
    numbers to zero, NumPy does not."""
    return st.floats(lo, hi, width=32).filter(lambda x: x == 0 or abs(x) > 1e-6)


_samples = hnp.arrays(np.float32, st.tuples(st.integers(1, 6),
                                            st.integers(1, 4)),
                      elements=_floats(-5, 5))


def test_spec_snippets_run_as_written():
    """The guide's examples, with simple base rewards."""
    samples = jnp.arange(12.0).reshape(4, 3) / 10.0
    rewards = ConstantReward(value=1.0)(samples)
    np.testing.assert_array_equal(rewards, np.ones(4))
    composite = CompositeReward(reward_fns=[aesthetic_reward, clip_reward],
                                weights=[0.3, 0.7])
    np.testing.assert_allclose(
        composite(samples),
        0.3 * aesthetic_reward(samples) + 0.7 * clip_reward(samples),
        rtol=1e-6)
    threshold = ThresholdReward(reward_fn=base_reward, threshold=0.5,
                                above_value=1.0, below_value=0.0)
    np.testing.assert_array_equal(threshold(samples),
                                  (base_reward(samples) > 0.5) * 1.0)
    scaled = ScaledReward(reward_fn=base_reward, scale=10.0)
    np.testing.assert_allclose(scaled(samples), 10 * base_reward(samples),
                               rtol=1e-6)
    clipped = ClippedReward(reward_fn=base_reward, min_value=-1.0,
                            max_value=1.0)
    np.testing.assert_allclose(clipped(samples),
                               np.clip(base_reward(samples), -1, 1))


@settings(max_examples=30, deadline=None)
@given(_samples, st.lists(st.floats(-3, 3), min_size=2, max_size=2),
       st.lists(st.floats(-3, 3), min_size=2, max_size=2),
       st.floats(-3, 3))
def test_composite_is_linear_in_weights(samples, w1, w2, a):
    fns = [aesthetic_reward, clip_reward]
    r = lambda w: np.asarray(CompositeReward(reward_fns=fns, weights=w)(
        samples), np.float64)
    w12 = [x + y for x, y in zip(w1, w2)]
    np.testing.assert_allclose(r(w12), r(w1) + r(w2), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r([a * x for x in w1]), a * r(w1),
                               rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(_samples, _floats(-3, 0), _floats(0, 3))
def test_clipped_within_bounds_and_equals_clip(samples, lo, hi):
    out = ClippedReward(reward_fn=base_reward, min_value=lo,
                        max_value=hi)(samples)
    assert np.all(out >= np.float32(lo)) and np.all(out <= np.float32(hi))
    np.testing.assert_allclose(out, np.clip(base_reward(samples), lo, hi),
                               rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(_samples, _floats(-2, 2), _floats(-5, 5), _floats(-5, 5))
def test_threshold_is_binary_and_follows_the_rule(samples, thr, above,
                                                  below):
    out = np.asarray(ThresholdReward(reward_fn=base_reward, threshold=thr,
                                     above_value=above,
                                     below_value=below)(samples))
    base = np.asarray(base_reward(samples))
    expected = np.where(base > np.float32(thr), np.float32(above),
                        np.float32(below))
    np.testing.assert_array_equal(out, expected)
    assert set(np.unique(out)) <= {np.float32(above), np.float32(below)}


@settings(max_examples=20, deadline=None)
@given(_samples, _floats(-10, 10))
def test_scaled_and_constant(samples, scale):
    np.testing.assert_allclose(
        ScaledReward(reward_fn=base_reward, scale=scale)(samples),
        np.float32(scale) * base_reward(samples), rtol=1e-5, atol=1e-6)
    const = ConstantReward(value=scale)(samples)
    assert const.shape == (samples.shape[0],)
    np.testing.assert_allclose(const, np.float32(scale))


def test_jit_with_reward_as_argument_and_vmap_over_scales():
    samples = jnp.linspace(-1, 1, 8).reshape(4, 2)
    fns = [ScaledReward(reward_fn=base_reward, scale=2.0),
           ClippedReward(reward_fn=base_reward, min_value=-0.1,
                         max_value=0.1),
           ThresholdReward(reward_fn=base_reward, threshold=0.0),
           CompositeReward(reward_fns=[base_reward, aesthetic_reward],
                           weights=[1.0, -1.0]),
           ConstantReward(value=3.0)]
    call = jax.jit(lambda f, s: f(s))
    for fn in fns:
        np.testing.assert_allclose(call(fn, samples), fn(samples),
                                   rtol=1e-6)
    stacked = jax.tree_util.tree_map(
        lambda *x: jnp.stack(x),
        ScaledReward(reward_fn=base_reward, scale=1.0),
        ScaledReward(reward_fn=base_reward, scale=3.0))
    out = jax.vmap(lambda f: f(samples))(stacked)
    np.testing.assert_allclose(out, [base_reward(samples),
                                     3 * base_reward(samples)], rtol=1e-6)
    over_samples = jax.vmap(lambda s: fns[0](s[None])[0])(samples)
    np.testing.assert_allclose(over_samples, fns[0](samples), rtol=1e-6)


def test_conditions_and_kwargs_pass_through():
    seen = {}

    def conditioned(samples, conditions=None, **kwargs):
        seen.update(kwargs, conditions=conditions)
        return jnp.sum(samples, axis=-1) * conditions

    samples, cond = jnp.ones((3, 2)), jnp.array([1.0, 2.0, 3.0])
    out = ScaledReward(reward_fn=conditioned, scale=2.0)(samples, cond,
                                                          temperature=0.5)
    np.testing.assert_allclose(out, [4.0, 8.0, 12.0])
    assert seen["temperature"] == 0.5


def test_protocol_isinstance():
    class MyReward:
        def __call__(self, samples, conditions=None, **kwargs):
            return jnp.zeros(samples.shape[0])

    assert isinstance(ConstantReward(1.0), RewardFunction)
    assert isinstance(MyReward(), RewardFunction)
    assert not isinstance(3.0, RewardFunction)


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="weights"):
        CompositeReward(reward_fns=[base_reward], weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="reward_fns"):
        CompositeReward(reward_fns=[], weights=[])
    with pytest.raises(ValueError, match="min_value"):
        ClippedReward(reward_fn=base_reward, min_value=1.0, max_value=0.0)

    def bad(samples, conditions=None):
        return jnp.zeros((samples.shape[0], 2))

    with pytest.raises(ValueError, match=r"bad.*\(batch,\)"):
        ScaledReward(reward_fn=bad, scale=1.0)(jnp.ones((3, 2)))
