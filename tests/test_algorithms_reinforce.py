"""Tests for the REINFORCE algorithm (``artifex_fn.reinforce``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import artifex_fn as afn
from artifex_fn import testing as aft

from algo_fixtures import (ADAM, B, N_ACT, N_OBS, SGD, T, assert_all_finite,
                           init_params, linear_policy, np_log_prob_entropy,
                           np_log_softmax, np_logits, np_sample, one_hot,
                           reinforce_problem, with_fields)

_loss = jax.jit(afn.reinforce.loss)
_update = jax.jit(afn.reinforce.update)

RTOL, ATOL = 1e-5, 1e-6


def _config(**kw):
    kw.setdefault("policy", linear_policy)
    kw.setdefault("optimizer", ADAM)
    return afn.reinforce.REINFORCEConfig(**kw)


def _one_step_batch():
    obs = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    actions = np.array([0, 2, 1, 1, 2, 0, 0, 1])
    rewards = np.array([1.0, -0.5, 2.0, 0.0, 0.3, -1.0, 0.7, 1.5])
    batch = dict(observations=one_hot(obs), actions=jnp.asarray(actions),
                 rewards=jnp.asarray(rewards, jnp.float32))
    return obs, actions, rewards, batch


def test_one_step_loss_is_minus_mean_reward_times_log_prob():
    """[B] rewards, no normalisation, no entropy: -mean(r * log pi(a))."""
    params = init_params(1)
    obs, actions, rewards, batch = _one_step_batch()
    cfg = _config(normalize_returns=False, entropy_coeff=0.0)
    loss, metrics = _loss(params, batch, cfg)
    logp, entropy = np_log_prob_entropy(params, obs, actions)
    expected = -np.mean(rewards * logp)
    np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(metrics["policy_loss"], expected, rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(metrics["entropy"], entropy.mean(), rtol=RTOL)
    np.testing.assert_allclose(metrics["mean_reward"], rewards.mean(),
                               rtol=RTOL)
    np.testing.assert_allclose(metrics["reward_std"], rewards.std(),
                               rtol=RTOL)
    np.testing.assert_allclose(metrics["mean_return"], rewards.mean(),
                               rtol=RTOL)


def test_sequence_loss_uses_discounted_returns_with_dones_and_mask():
    """[B, T] rewards: weights are the discounted returns, cut at dones."""
    cfg, params, batch = reinforce_problem(3)
    cfg = with_fields(cfg, normalize_returns=False, entropy_coeff=0.0,
                      gamma=0.9)
    obs = np.argmax(np.asarray(batch["observations"]), -1)
    rewards = np.asarray(batch["rewards"], np.float64)
    dones = np.asarray(batch["dones"])
    mask = np.asarray(batch["mask"])
    assert dones.any() and not mask.all()
    returns = aft.np_discounted_returns(rewards, 0.9, terminated=dones,
                                        mask=mask)
    logp, _ = np_log_prob_entropy(params, obs, np.asarray(batch["actions"]))
    valid = mask > 0
    expected = -np.sum((returns * logp)[valid]) / valid.sum()
    loss, metrics = _loss(params, batch, cfg)
    np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["mean_return"], returns[valid].mean(),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["mean_reward"], rewards[valid].mean(),
                               rtol=RTOL, atol=ATOL)

    # Without dones the returns run on to the end of each row.
    no_dones = dict(batch, dones=jnp.zeros_like(batch["dones"]))
    returns2 = aft.np_discounted_returns(rewards, 0.9, mask=mask)
    expected2 = -np.sum((returns2 * logp)[valid]) / valid.sum()
    np.testing.assert_allclose(_loss(params, no_dones, cfg)[0], expected2,
                               rtol=RTOL, atol=ATOL)
    assert not np.isclose(expected, expected2)


def test_mean_baseline_one_step_subtracts_batch_mean():
    """baseline='mean' weights log-probs by r - mean(r)."""
    params = init_params(2)
    obs, actions, rewards, batch = _one_step_batch()
    cfg = _config(normalize_returns=False, entropy_coeff=0.0,
                  baseline="mean")
    logp, _ = np_log_prob_entropy(params, obs, actions)
    expected = -np.mean((rewards - rewards.mean()) * logp)
    np.testing.assert_allclose(_loss(params, batch, cfg)[0], expected,
                               rtol=RTOL, atol=ATOL)


def test_mean_baseline_sequence_subtracts_per_step_batch_mean():
    """For [B, T] rewards the baseline is the batch mean at each step."""
    cfg, params, batch = reinforce_problem(4)
    batch = dict(batch, mask=jnp.ones_like(batch["mask"]))
    cfg = with_fields(cfg, normalize_returns=False, entropy_coeff=0.0,
                      gamma=0.8, baseline="mean")
    obs = np.argmax(np.asarray(batch["observations"]), -1)
    returns = aft.np_discounted_returns(np.asarray(batch["rewards"]), 0.8,
                                        terminated=np.asarray(batch["dones"]))
    logp, _ = np_log_prob_entropy(params, obs, np.asarray(batch["actions"]))
    weights = returns - returns.mean(axis=0, keepdims=True)
    expected = -np.mean(weights * logp)
    np.testing.assert_allclose(_loss(params, batch, cfg)[0], expected,
                               rtol=RTOL, atol=ATOL)


def test_entropy_bonus_lowers_loss_by_coeff_times_mean_entropy():
    """loss(c) = loss(0) - c * mean entropy."""
    params = init_params(5)
    obs, actions, _, batch = _one_step_batch()
    _, entropy = np_log_prob_entropy(params, obs, actions)
    base, _ = _loss(params, batch, _config(normalize_returns=False,
                                           entropy_coeff=0.0))
    with_bonus, metrics = _loss(params, batch, _config(
        normalize_returns=False, entropy_coeff=0.3))
    np.testing.assert_allclose(with_bonus, base - 0.3 * entropy.mean(),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["policy_loss"], base, rtol=RTOL,
                               atol=ATOL)


def test_normalize_returns_weights_by_normalised_returns():
    """normalize_returns=True uses (G - mean) / std over valid steps."""
    cfg, params, batch = reinforce_problem(6)
    cfg = with_fields(cfg, normalize_returns=True, entropy_coeff=0.0)
    obs = np.argmax(np.asarray(batch["observations"]), -1)
    mask = np.asarray(batch["mask"])
    returns = aft.np_discounted_returns(
        np.asarray(batch["rewards"]), cfg.gamma,
        terminated=np.asarray(batch["dones"]), mask=mask)
    weights = aft.np_normalize_advantages(returns, mask=mask)
    logp, _ = np_log_prob_entropy(params, obs, np.asarray(batch["actions"]))
    valid = mask > 0
    expected = -np.sum((weights * logp)[valid]) / valid.sum()
    np.testing.assert_allclose(_loss(params, batch, cfg)[0], expected,
                               rtol=1e-4, atol=1e-5)


def test_update_is_a_gradient_step_on_the_score_function():
    """With SGD(1) the step is mean(r * (onehot(a) - pi)) per observation."""
    params = init_params(7)
    obs, actions, rewards, batch = _one_step_batch()
    cfg = _config(normalize_returns=False, entropy_coeff=0.0, optimizer=SGD)
    state = afn.reinforce.init(params, cfg)
    new_state, metrics = _update(state, batch)
    probs = np.exp(np_log_softmax(np_logits(params, obs)))
    score = np.eye(N_ACT)[actions] - probs          # d log pi / d logits
    dlogits = rewards[:, None] * score / len(rewards)
    dw = np.zeros((N_OBS, N_ACT))
    np.add.at(dw, obs, dlogits)
    np.testing.assert_allclose(new_state.params["w"] - params["w"], dw,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new_state.params["b"] - params["b"],
                               dlogits.sum(0), rtol=1e-4, atol=1e-6)
    grad_norm = np.sqrt(np.sum(dw ** 2) + np.sum(dlogits.sum(0) ** 2))
    np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-4)
    assert int(new_state.step) == 1


def test_all_steps_done_and_empty_mask_are_finite():
    """Every step terminal, or nothing valid: finite loss and gradients."""
    cfg, params, batch = reinforce_problem(8)
    done_batch = dict(batch, dones=jnp.ones_like(batch["dones"]),
                      mask=jnp.ones_like(batch["mask"]))
    cfg0 = with_fields(cfg, normalize_returns=False, entropy_coeff=0.0)
    obs = np.argmax(np.asarray(batch["observations"]), -1)
    logp, _ = np_log_prob_entropy(params, obs, np.asarray(batch["actions"]))
    # Every step done: the return of each step is its own reward.
    expected = -np.mean(np.asarray(batch["rewards"]) * logp)
    np.testing.assert_allclose(_loss(params, done_batch, cfg0)[0], expected,
                               rtol=RTOL, atol=ATOL)
    empty = dict(batch, mask=jnp.zeros_like(batch["mask"]))
    for b in (done_batch, empty):
        state, metrics = _update(afn.reinforce.init(params, cfg), b)
        assert_all_finite((state.params, metrics))
    _, metrics = _update(afn.reinforce.init(params, cfg), empty)
    assert float(metrics["loss"]) == 0.0
    assert float(metrics["grad_norm"]) == 0.0


def _best_arm(ctx):
    return (ctx + 1) % N_ACT


def _bandit_batch(params, rng):
    """B x T independent pulls of a 4-armed contextual bandit."""
    ctx = rng.integers(0, N_OBS, (B, T))
    actions = np_sample(np_log_softmax(np_logits(params, ctx)), rng)
    rewards = (actions == _best_arm(ctx)).astype(np.float32)
    return dict(observations=one_hot(ctx), actions=jnp.asarray(actions),
                rewards=jnp.asarray(rewards), dones=jnp.ones((B, T), bool),
                mask=jnp.ones((B, T), jnp.float32))


def test_learns_contextual_bandit():
    """4 contexts x 4 arms, reward 1 for arm (context + 1) % 4."""
    cfg, _, _ = reinforce_problem(0)
    state = afn.reinforce.init(init_params(0, scale=0.0), cfg)
    rng = np.random.default_rng(0)
    rewards = []
    for _ in range(150):
        batch = _bandit_batch(state.params, rng)
        state, metrics = _update(state, batch)
        rewards.append(float(metrics["mean_reward"]))
    ctx = np.arange(N_OBS)
    probs = np.exp(np_log_softmax(np_logits(state.params, ctx)))
    expected_reward = probs[ctx, _best_arm(ctx)].mean()
    assert np.mean(rewards[:10]) < 0.5
    assert expected_reward >= 0.9, expected_reward
    assert np.mean(rewards[-20:]) >= 0.85
    assert int(state.step) == 150
