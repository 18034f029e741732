"""Tests for the documented RL utility functions (spec signatures)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from artifex_fn.generative_models.training.rl.utils import (
    compute_clipped_surrogate_loss,
    compute_discounted_returns,
    compute_gae_advantages,
    compute_kl_divergence,
    compute_policy_entropy,
    normalize_advantages,
)

_FLOATS = st.floats(-5.0, 5.0, width=32)

# Jitted once per shape, so that hypothesis examples do not retrace the scan.
_returns_jit = jax.jit(compute_discounted_returns)
_gae_jit = jax.jit(compute_gae_advantages)


def _np_returns(rewards, gamma, dones=None):
    r = np.asarray(rewards, np.float64)
    d = np.zeros_like(r) if dones is None else np.asarray(dones, np.float64)
    out = np.zeros_like(r)
    future = np.zeros(r.shape[:-1])
    for t in reversed(range(r.shape[-1])):
        future = r[..., t] + gamma * (1.0 - d[..., t]) * future
        out[..., t] = future
    return out


def _np_gae(rewards, values, dones, gamma, lam):
    r = np.asarray(rewards, np.float64)
    v = np.asarray(values, np.float64)
    d = np.asarray(dones, np.float64)
    out = np.zeros_like(r)
    future = np.zeros(r.shape[:-1])
    for t in reversed(range(r.shape[-1])):
        delta = r[..., t] + gamma * v[..., t + 1] * (1.0 - d[..., t]) \
            - v[..., t]
        future = delta + gamma * lam * (1.0 - d[..., t]) * future
        out[..., t] = future
    return out


# --------------------------------------------------------------------------
# Discounted returns
# --------------------------------------------------------------------------


def test_discounted_returns_hand_values():
    """G_t = r_t + gamma G_{t+1}, with the spec's call signature."""
    rewards = jnp.array([1.0, 0.0, 2.0])
    out = compute_discounted_returns(rewards, gamma=0.99)
    np.testing.assert_allclose(out, [1.0 + 0.99 ** 2 * 2.0, 0.99 * 2.0, 2.0],
                               rtol=1e-6)
    np.testing.assert_allclose(
        compute_discounted_returns(jnp.array([1.0, 1.0]), gamma=0.5),
        [1.5, 1.0])
    np.testing.assert_allclose(
        compute_discounted_returns(jnp.array([1.0, 1.0, 1.0]), gamma=0.5,
                                   dones=jnp.array([0.0, 1.0, 0.0])),
        [1.5, 1.0, 1.0])


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float32, st.sampled_from([(1,), (6,), (3, 8)]),
                  elements=_FLOATS),
       st.floats(0.0, 1.0), st.data())
def test_discounted_returns_match_numpy_loop(rewards, gamma, data):
    """Batched returns with done flags equal a NumPy loop."""
    dones = data.draw(hnp.arrays(np.bool_, rewards.shape))
    out = _returns_jit(jnp.asarray(rewards), gamma=gamma,
                       dones=jnp.asarray(dones))
    np.testing.assert_allclose(out, _np_returns(rewards, gamma, dones),
                               rtol=1e-5, atol=1e-4)
    plain = _returns_jit(jnp.asarray(rewards), gamma=gamma)
    np.testing.assert_allclose(plain, _np_returns(rewards, gamma),
                               rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------


def test_gae_hand_values():
    """Two steps, bootstrap value V(s_2), then a terminal step."""
    rewards = jnp.array([1.0, 2.0])
    values = jnp.array([0.5, 1.0, 3.0])
    dones = jnp.array([0.0, 0.0])
    gamma, lam = 0.99, 0.95
    d1 = 2.0 + gamma * 3.0 - 1.0
    d0 = 1.0 + gamma * 1.0 - 0.5
    out = compute_gae_advantages(rewards=rewards, values=values, dones=dones,
                                 gamma=gamma, gae_lambda=lam)
    np.testing.assert_allclose(out, [d0 + gamma * lam * d1, d1], rtol=1e-6)
    # A terminal first step cuts both the bootstrap and the recursion.
    out = compute_gae_advantages(rewards=rewards, values=values,
                                 dones=jnp.array([1.0, 0.0]), gamma=gamma,
                                 gae_lambda=lam)
    np.testing.assert_allclose(out, [1.0 - 0.5, d1], rtol=1e-6)
    np.testing.assert_allclose(
        compute_gae_advantages(jnp.array([1.0]), jnp.array([0.0, 1.0]),
                               jnp.array([1.0])), [1.0])


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(1,), (7,), (2, 5)]), st.data(),
       st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_gae_matches_numpy_loop(shape, data, gamma, lam):
    """GAE with done flags and V(s_0..s_T) equals the recursive NumPy loop."""
    rewards = data.draw(hnp.arrays(np.float32, shape, elements=_FLOATS))
    values = data.draw(hnp.arrays(np.float32, shape[:-1] + (shape[-1] + 1,),
                                  elements=_FLOATS))
    dones = data.draw(hnp.arrays(np.bool_, shape)).astype(np.float32)
    out = _gae_jit(rewards=jnp.asarray(rewards), values=jnp.asarray(values),
                   dones=jnp.asarray(dones), gamma=gamma, gae_lambda=lam)
    assert out.shape == shape
    np.testing.assert_allclose(out, _np_gae(rewards, values, dones, gamma,
                                            lam), rtol=1e-5, atol=1e-4)


def test_gae_lambda_one_is_returns_minus_values():
    """With lambda = 1 and no dones, A_t = G_t - V(s_t) (G bootstrapped)."""
    rewards = jnp.array([1.0, -1.0, 2.0, 0.5])
    values = jnp.array([0.3, 0.1, -0.2, 0.7, 2.0])
    out = compute_gae_advantages(rewards=rewards, values=values,
                                 dones=jnp.zeros(4), gamma=0.9,
                                 gae_lambda=1.0)
    r = np.asarray(rewards, np.float64)
    g = [sum(0.9 ** (k - t) * r[k] for k in range(t, 4))
         + 2.0 * 0.9 ** (4 - t) for t in range(4)]
    np.testing.assert_allclose(out, np.array(g) - np.asarray(values)[:4],
                               rtol=1e-5)


def test_gae_values_of_wrong_length_raise():
    """values must hold T + 1 entries; otherwise the error names it."""
    rewards = jnp.zeros(4)
    for bad in (jnp.zeros(4), jnp.zeros(6), jnp.zeros((2, 5))):
        with pytest.raises(ValueError, match="values"):
            compute_gae_advantages(rewards=rewards, values=bad,
                                   dones=jnp.zeros(4))


# --------------------------------------------------------------------------
# Advantage normalisation
# --------------------------------------------------------------------------


def test_normalize_advantages():
    """(A - mean) / (std + eps): zero mean and unit std."""
    adv = jnp.array([1.0, 2.0, 3.0, 10.0])
    normalize = jax.jit(normalize_advantages)
    out = normalize(adv, eps=1e-8)
    a = np.asarray(adv, np.float64)
    np.testing.assert_allclose(out, (a - a.mean()) / (a.std() + 1e-8),
                               rtol=1e-5)
    np.testing.assert_allclose(float(jnp.mean(out)), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(jnp.std(out)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(normalize(adv, eps=1.0),
                               (a - a.mean()) / (a.std() + 1.0), rtol=1e-5)
    np.testing.assert_array_equal(normalize(jnp.full(4, 7.0)), np.zeros(4))
    # The spec call itself (not jitted).
    np.testing.assert_allclose(normalize_advantages(adv, eps=1e-8), out,
                               rtol=1e-6)


# --------------------------------------------------------------------------
# Reduced entropy, KL and surrogate loss
# --------------------------------------------------------------------------


def test_policy_entropy_is_batch_mean():
    """Scalar mean of per-row entropies."""
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]])
    with np.errstate(divide="ignore"):
        log_probs = jnp.asarray(np.log(probs), jnp.float32)
    out = compute_policy_entropy(log_probs)
    expected = np.mean([math.log(2.0),
                        -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)),
                        0.0])
    assert out.shape == ()
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_kl_divergence_is_batch_mean():
    """Scalar mean of exact per-row KL(pi || pi_ref)."""
    p = np.array([[0.5, 0.5], [0.2, 0.8]])
    q = np.array([[0.25, 0.75], [0.2, 0.8]])
    out = compute_kl_divergence(jnp.asarray(np.log(p), jnp.float32),
                                jnp.asarray(np.log(q), jnp.float32))
    kl0 = 0.5 * math.log(2.0) + 0.5 * math.log(0.5 / 0.75)
    assert out.shape == ()
    np.testing.assert_allclose(out, kl0 / 2.0, rtol=1e-5)
    same = compute_kl_divergence(jnp.asarray(np.log(p), jnp.float32),
                                 jnp.asarray(np.log(p), jnp.float32))
    np.testing.assert_allclose(same, 0.0, atol=1e-7)


def test_clipped_surrogate_loss_is_mean_of_ppo_objective():
    """-mean(min(r A, clip(r, 1 - eps, 1 + eps) A))."""
    ratios = np.array([1.0, 1.0, 1.5, 0.5])
    adv = jnp.array([1.0, 3.0, 2.0, -1.0])
    log_probs = jnp.asarray(np.log(ratios) - 1.0, jnp.float32)
    out = compute_clipped_surrogate_loss(
        log_probs=log_probs, old_log_probs=jnp.full(4, -1.0),
        advantages=adv, clip_param=0.2)
    assert out.shape == ()
    np.testing.assert_allclose(out, -(1.0 + 3.0 + 2.4 - 0.8) / 4.0,
                               rtol=1e-5)
    wide = compute_clipped_surrogate_loss(
        log_probs=log_probs, old_log_probs=jnp.full(4, -1.0),
        advantages=adv, clip_param=0.6)
    np.testing.assert_allclose(wide, -(1.0 + 3.0 + 3.0 - 0.5) / 4.0,
                               rtol=1e-5)
    grad = jax.grad(lambda x: compute_clipped_surrogate_loss(
        log_probs=x, old_log_probs=jnp.full(4, -1.0), advantages=adv,
        clip_param=0.2))(log_probs)
    np.testing.assert_allclose(grad, [-0.25, -0.75, 0.0, 0.0], rtol=1e-5,
                               atol=1e-7)
