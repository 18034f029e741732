"""Tests for the GRPO algorithm (``artifex_fn.grpo``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import artifex_fn as afn
from artifex_fn import testing as aft

from algo_fixtures import (ADAM, B, G, L, N_ACT, N_OBS, assert_all_finite,
                           grpo_problem, init_params, linear_policy,
                           np_log_prob_entropy, np_log_softmax, np_logits,
                           np_sample, one_hot, token_obs, with_fields)

_loss = jax.jit(afn.grpo.loss)
_grad = jax.jit(jax.grad(lambda p, b, c: afn.grpo.loss(p, b, c)[0]))
_update = jax.jit(afn.grpo.update)

RTOL, ATOL = 1e-4, 1e-6


def _np(x):
    return np.asarray(x, np.float64)


def _one_step_batch(seed=0, n=8):
    rng = np.random.default_rng(seed)
    params = init_params(seed)
    obs = rng.integers(0, N_OBS, n)
    actions = rng.integers(0, N_ACT, n)
    logp, entropy = np_log_prob_entropy(params, obs, actions)
    old = logp + rng.normal(0.0, 0.4, n)
    rewards = rng.standard_normal(n)
    batch = dict(observations=one_hot(obs), actions=jnp.asarray(actions),
                 rewards=jnp.asarray(rewards, jnp.float32),
                 log_probs=jnp.asarray(old, jnp.float32))
    return params, batch, logp, entropy


def _token_terms(params, batch, config, group_size=None):
    """Per-token surrogate, entropy and k3 terms of a token-level batch."""
    pos = np.argmax(np.asarray(batch["observations"]), -1)
    logp, entropy = np_log_prob_entropy(params, pos,
                                        np.asarray(batch["actions"]))
    adv, _ = aft.np_group_advantages(_np(batch["rewards"]),
                                     group_size or config.num_generations)
    pg = aft.np_clipped_surrogate_loss(logp, _np(batch["log_probs"]),
                                       adv[:, None],
                                       clip_param=config.clip_param)
    k3 = aft.np_kl_estimate(logp, _np(batch["ref_log_probs"]), "k3")
    return pg, entropy, k3, adv


def _aggregate(x, mask, mode, max_len=None):
    """The aggregations of the GRPO family, written out."""
    if mode == "grpo":
        return np.mean((x * mask).sum(-1) / mask.sum(-1))
    if mode in ("dapo", "bnpo"):
        return (x * mask).sum() / mask.sum()
    assert mode == "dr_grpo"
    return (x * mask).sum() / (x.shape[0] * (max_len or x.shape[1]))


def test_one_step_loss_matches_clipped_surrogate_of_group_advantages():
    """[B] log-probs: mean clipped surrogate with group advantages."""
    params, batch, logp, entropy = _one_step_batch(1)
    cfg = afn.grpo.GRPOConfig(policy=linear_policy, optimizer=ADAM,
                              num_generations=4, clip_param=0.2,
                              entropy_coeff=0.05, beta=0.3)
    loss, m = _loss(params, batch, cfg)
    rewards, old = _np(batch["rewards"]), _np(batch["log_probs"])
    adv, zero_std = aft.np_group_advantages(rewards, 4)
    pg = aft.np_clipped_surrogate_loss(logp, old, adv, clip_param=0.2)
    ratio = np.exp(logp - old)
    # Every ratio clear of the clip bounds 0.8 and 1.2 (relative 1e-4), so
    # that the clip fraction cannot depend on float32 rounding.
    assert np.min(np.abs(ratio[:, None] / [0.8, 1.2] - 1.0)) > 1e-4
    np.testing.assert_allclose(m["policy_loss"], pg.mean(), rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(loss, pg.mean() - 0.05 * entropy.mean(),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["entropy"], entropy.mean(), rtol=RTOL)
    # No reference log-probs: no KL term.
    assert float(m["kl"]) == 0.0 and float(m["kl_penalty"]) == 0.0
    np.testing.assert_allclose(m["approx_kl"],
                               aft.np_kl_estimate(old, logp).mean(),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["clip_fraction"],
                               np.mean(np.abs(ratio - 1) > 0.2), atol=1e-6)
    np.testing.assert_allclose(m["mean_reward"], rewards.mean(), rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(m["reward_std"], rewards.std(), rtol=RTOL)
    np.testing.assert_allclose(m["group_advantage_std"], adv.std(),
                               rtol=RTOL)
    assert float(m["frac_reward_zero_std"]) == zero_std.mean() == 0.0


@pytest.mark.parametrize("aggregation,max_len", [
    ("grpo", None), ("dapo", None), ("bnpo", None), ("dr_grpo", None),
    ("dr_grpo", 8)])
def test_token_level_loss_per_aggregation(aggregation, max_len):
    """[B, L] log-probs with a mask, reduced per ``loss_aggregation``."""
    cfg, params, batch = grpo_problem(2)
    cfg = with_fields(cfg, loss_aggregation=aggregation, beta=0.2,
                      entropy_coeff=0.05, clip_param=0.25,
                      max_completion_length=max_len)
    mask = _np(batch["mask"])
    assert not mask.all()
    loss, m = _loss(params, batch, cfg)
    pg, entropy, k3, _ = _token_terms(params, batch, cfg)
    agg = lambda x: _aggregate(x, mask, aggregation, max_len)
    np.testing.assert_allclose(m["policy_loss"], agg(pg), rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(loss, agg(pg - 0.05 * entropy + 0.2 * k3),
                               rtol=RTOL, atol=ATOL)
    kl = (k3 * mask).sum() / mask.sum()
    np.testing.assert_allclose(m["kl"], kl, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["kl_penalty"], 0.2 * kl, rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(m["entropy"], (entropy * mask).sum()
                               / mask.sum(), rtol=RTOL)


def test_aggregations_differ_on_ragged_masks():
    """The reference aggregations really are different numbers here."""
    cfg, params, batch = grpo_problem(2)
    pg, _, _, _ = _token_terms(params, batch, with_fields(cfg,
                                                          clip_param=0.25))
    mask = _np(batch["mask"])
    values = {mode: _aggregate(pg, mask, mode)
              for mode in ("grpo", "dapo", "dr_grpo")}
    # Far apart, not just different after rounding to 6 decimals (where a
    # value next to a rounding boundary could go either way).
    assert np.min(np.diff(np.sort(list(values.values())))) > 1e-4
    assert len({round(v, 6) for v in values.values()}) == 3


def test_kl_term_applies_only_with_reference_log_probs():
    """Dropping ref_log_probs removes beta * k3 from the loss."""
    cfg, params, batch = grpo_problem(3)
    cfg = with_fields(cfg, beta=0.5, entropy_coeff=0.0)
    no_ref = {k: v for k, v in batch.items() if k != "ref_log_probs"}
    mask = _np(batch["mask"])
    pg, _, k3, _ = _token_terms(params, batch, cfg)
    with_ref, m_ref = _loss(params, batch, cfg)
    without, m_no = _loss(params, no_ref, cfg)
    np.testing.assert_allclose(without, _aggregate(pg, mask, "grpo"),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(with_ref - without,
                               0.5 * _aggregate(k3, mask, "grpo"),
                               rtol=RTOL, atol=ATOL)
    assert float(m_no["kl"]) == 0.0 and float(m_no["kl_penalty"]) == 0.0
    assert float(m_ref["kl"]) > 0.0
    np.testing.assert_allclose(m_ref["kl_penalty"], 0.5 * m_ref["kl"],
                               rtol=1e-6)


def test_reference_params_in_state_supply_the_kl_term():
    """state.ref_params scores ref_log_probs when the batch lacks them."""
    cfg, params, batch = grpo_problem(4)
    ref_params = init_params(40)
    no_ref = {k: v for k, v in batch.items() if k != "ref_log_probs"}
    pos = np.argmax(np.asarray(batch["observations"]), -1)
    actions = np.asarray(batch["actions"])
    ref_logp, _ = np_log_prob_entropy(ref_params, pos, actions)
    logp, _ = np_log_prob_entropy(params, pos, actions)
    mask = _np(batch["mask"])
    k3 = aft.np_kl_estimate(logp, ref_logp, "k3")
    _, m = _update(afn.grpo.init(params, cfg, ref_params=ref_params), no_ref)
    np.testing.assert_allclose(m["kl"], (k3 * mask).sum() / mask.sum(),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["kl_penalty"], cfg.beta * m["kl"],
                               rtol=1e-6)


def test_rloo_baseline_without_scaling():
    """baseline='rloo', scale_rewards='none' use leave-one-out advantages."""
    params, batch, logp, _ = _one_step_batch(5)
    cfg = afn.grpo.GRPOConfig(policy=linear_policy, optimizer=ADAM,
                              num_generations=4, baseline="rloo",
                              scale_rewards="none")
    adv, _ = aft.np_group_advantages(_np(batch["rewards"]), 4,
                                     baseline="rloo", scale="none")
    pg = aft.np_clipped_surrogate_loss(logp, _np(batch["log_probs"]), adv)
    _, m = _loss(params, batch, cfg)
    np.testing.assert_allclose(m["policy_loss"], pg.mean(), rtol=RTOL,
                               atol=ATOL)


def test_frac_reward_zero_std_counts_constant_groups():
    """One of two groups has equal rewards: frac_reward_zero_std = 0.5."""
    cfg, params, batch = grpo_problem(6)
    rewards = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0])
    _, m = _loss(params, dict(batch, rewards=rewards), cfg)
    assert float(m["frac_reward_zero_std"]) == 0.5
    np.testing.assert_allclose(m["mean_reward"], 0.875, rtol=1e-6)


def test_group_size_in_batch_overrides_num_generations():
    """Eagerly, batch['group_size'] sets the groups (here 4 groups of 2)."""
    cfg, params, batch = grpo_problem(7)
    cfg = with_fields(cfg, num_generations=3)
    with pytest.raises(ValueError, match="group size"):
        afn.grpo.loss(params, batch, cfg)    # 8 is not a multiple of 3
    loss, m = afn.grpo.loss(params, dict(batch, group_size=2), cfg)
    pg, entropy, k3, adv = _token_terms(params, batch, cfg, group_size=2)
    mask = _np(batch["mask"])
    expected = _aggregate(pg - cfg.entropy_coeff * entropy + cfg.beta * k3,
                          mask, "grpo")
    np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["group_advantage_std"], adv.std(),
                               rtol=RTOL)


def test_group_size_in_batch_under_jit_raises():
    """Inside jit the group size would be traced: a clear ValueError."""
    cfg, params, batch = grpo_problem(8)
    batch = dict(batch, group_size=G)
    with pytest.raises(ValueError, match="group_size"):
        _loss(params, batch, cfg)
    with pytest.raises(ValueError, match="group_size"):
        _update(afn.grpo.init(params, cfg), batch)


def test_equal_rewards_give_zero_policy_gradient():
    """Every group constant: zero advantages, finite loss, zero gradient."""
    cfg, params, batch = grpo_problem(9)
    cfg = with_fields(cfg, beta=0.0, entropy_coeff=0.0)
    batch = dict(batch, rewards=jnp.array([1.0] * 4 + [0.0] * 4))
    loss, m = _loss(params, batch, cfg)
    assert float(m["frac_reward_zero_std"]) == 1.0
    assert float(m["group_advantage_std"]) == 0.0
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(loss, 0.0, atol=1e-7)
    grads = _grad(params, batch, cfg)
    for g in jax.tree_util.tree_leaves(grads):
        np.testing.assert_allclose(g, 0.0, atol=1e-7)
    state, metrics = _update(afn.grpo.init(params, cfg), batch)
    assert_all_finite((state.params, metrics))


def test_empty_mask_gives_zero_loss_and_finite_update():
    """No valid token anywhere: zero loss, finite (zero) gradients."""
    cfg, params, batch = grpo_problem(10)
    batch = dict(batch, mask=jnp.zeros_like(batch["mask"]))
    loss, _ = _loss(params, batch, cfg)
    assert float(loss) == 0.0
    grads = _grad(params, batch, cfg)
    for g in jax.tree_util.tree_leaves(grads):
        np.testing.assert_allclose(g, 0.0, atol=0.0)
    state, metrics = _update(afn.grpo.init(params, cfg), batch)
    assert_all_finite((state.params, metrics))


TARGET = 2


def _token_batch(params, ref_params, rng):
    """2 prompts x G completions of 2..L tokens; reward = share of TARGET."""
    pos, obs = token_obs(B)
    logp_all = np_log_softmax(np_logits(params, pos))
    tokens = np_sample(logp_all, rng)
    mask = np.arange(L)[None] < rng.integers(2, L + 1, (B, 1))
    hits = ((tokens == TARGET) & mask).sum(-1) / mask.sum(-1)

    def logp(log_probs):
        return np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]

    ref_logp = np_log_softmax(np_logits(ref_params, pos))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return dict(observations=obs, actions=jnp.asarray(tokens),
                rewards=f32(hits), log_probs=f32(logp(logp_all)),
                ref_log_probs=f32(logp(ref_logp)), mask=f32(mask))


def test_learns_token_task():
    """Reward = fraction of tokens equal to the target: reaches >= 0.9."""
    cfg, _, _ = grpo_problem(0)
    cfg = with_fields(cfg, beta=0.01)
    params = init_params(0, scale=0.0)
    state = afn.grpo.init(params, cfg)
    rng = np.random.default_rng(0)
    rewards = []
    for _ in range(100):
        batch = _token_batch(state.params, params, rng)
        state, metrics = _update(state, batch)
        rewards.append(float(metrics["mean_reward"]))
    p_target = np.exp(np_log_softmax(np_logits(state.params,
                                                np.arange(N_OBS))))[:, TARGET]
    assert np.mean(rewards[:5]) < 0.5
    assert p_target.mean() >= 0.9, p_target
    assert np.mean(rewards[-10:]) >= 0.85
