"""Tests for the PPO algorithm (``artifex_fn.ppo``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import artifex_fn as afn
from artifex_fn import testing as aft

from algo_fixtures import (B, N_ACT, N_OBS, SGD, T, actor_critic,
                           assert_all_finite,
                           assert_trees_close, init_params,
                           np_log_prob_entropy, np_values, one_hot,
                           ppo_problem, with_fields)

_loss = jax.jit(afn.ppo.loss)
_grad = jax.jit(jax.grad(lambda p, b, c: afn.ppo.loss(p, b, c)[0]))
_prepare = jax.jit(afn.ppo.prepare)
_update = jax.jit(afn.ppo.update)


def _obs_idx(batch):
    return np.argmax(np.asarray(batch["observations"]), -1)


def test_loss_matches_hand_computation():
    """Clipped surrogate of normalised GAE, value loss, entropy, metrics."""
    cfg, params, batch = ppo_problem(1)
    cfg = with_fields(cfg, gamma=0.9, gae_lambda=0.8, clip_param=0.15,
                      vf_coeff=0.7, entropy_coeff=0.05)
    loss, m = _loss(params, batch, cfg)

    obs, actions = _obs_idx(batch), np.asarray(batch["actions"])
    rewards = np.asarray(batch["rewards"], np.float64)
    values = np.asarray(batch["values"], np.float64)
    dones = np.asarray(batch["dones"])
    mask = np.asarray(batch["mask"])
    old = np.asarray(batch["log_probs"], np.float64)
    assert dones.any() and not mask.all()
    valid = mask > 0
    adv = aft.np_gae_advantages(rewards, values, 0.9, 0.8, terminated=dones,
                                mask=mask)
    norm_adv = aft.np_normalize_advantages(adv, mask=mask)
    logp, entropy = np_log_prob_entropy(params, obs, actions)
    policy_loss = aft.np_clipped_surrogate_loss(
        logp, old, norm_adv, clip_param=0.15)[valid].mean()
    v_old = values[:, :T]
    returns = adv + v_old
    v_new = np_values(params, obs)
    value_loss = 0.5 * np.mean((v_new - returns)[valid] ** 2)
    total = policy_loss + 0.7 * value_loss - 0.05 * entropy[valid].mean()
    ratio = np.exp(logp - old)[valid]

    np.testing.assert_allclose(loss, total, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m["loss"], total, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m["policy_loss"], policy_loss, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(m["value_loss"], value_loss, rtol=1e-4)
    np.testing.assert_allclose(m["entropy"], entropy[valid].mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(
        m["explained_variance"],
        1.0 - np.var(adv[valid]) / np.var(returns[valid]), rtol=1e-4,
        atol=1e-5)
    np.testing.assert_allclose(m["advantage_mean"], adv[valid].mean(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m["advantage_std"], adv[valid].std(),
                               rtol=1e-4)
    np.testing.assert_allclose(m["mean_reward"], rewards[valid].mean(),
                               rtol=1e-5, atol=1e-6)
    # Every valid ratio clear of the clip bounds 0.85 and 1.15 (relative
    # 1e-4), so that the clip fraction cannot depend on float32 rounding.
    assert np.min(np.abs(ratio[:, None] / [0.85, 1.15] - 1.0)) > 1e-4
    clip_frac = np.mean(np.abs(ratio - 1.0) > 0.15)
    assert 0.0 < clip_frac < 1.0
    np.testing.assert_allclose(m["clip_fraction"], clip_frac, atol=1e-6)
    np.testing.assert_allclose(
        m["approx_kl"], aft.np_kl_estimate(old, logp)[valid].mean(),
        rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["kl_divergence"], (old - logp)[valid].mean(),
                               rtol=1e-4, atol=1e-6)


def test_truncation_changes_gae_as_the_reference_says():
    """truncated cuts the recursion but bootstraps from V(s_{t+1})."""
    cfg, params, batch = ppo_problem(2)
    cfg = with_fields(cfg, gamma=0.95, gae_lambda=0.9)
    rewards = np.asarray(batch["rewards"])
    values = np.asarray(batch["values"])
    dones = np.asarray(batch["dones"])
    mask = np.asarray(batch["mask"])
    # Truncate mid-episode steps: not terminal, followed by a valid step.
    eligible = ~dones[:, :-1] & (mask[:, 1:] > 0)
    rows = np.flatnonzero(eligible.any(-1))[:3]
    truncated = np.zeros((B, T), bool)
    truncated[rows, np.argmax(eligible[rows], -1)] = True
    assert truncated.sum() == 3
    samples, stats = _prepare(dict(batch, truncated=jnp.asarray(truncated)),
                              cfg)
    expected = aft.np_gae_advantages(rewards, values, 0.95, 0.9,
                                     terminated=dones, truncated=truncated,
                                     mask=mask)
    untruncated = aft.np_gae_advantages(rewards, values, 0.95, 0.9,
                                        terminated=dones, mask=mask)
    got = np.asarray(samples["advantages"]).reshape(B, T)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected - untruncated).max() > 1e-2
    # Value targets on valid steps; padded samples hold zero.
    np.testing.assert_allclose(np.asarray(samples["returns"]).reshape(B, T),
                               np.where(mask > 0, expected + values[:, :T],
                                        0.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["advantage_mean"],
                               expected[mask > 0].mean(), rtol=1e-4,
                               atol=1e-5)


def test_bootstrap_value_layout_matches_values_plus_one():
    """values [B, T] + bootstrap_value gives the same GAE as [B, T + 1]:
    with right padding, the bootstrap value is V(s_L), the value after each
    row's last valid step."""
    cfg, _, batch = ppo_problem(3)
    values = batch["values"]
    lengths = np.asarray(batch["mask"]).sum(-1).astype(int)
    assert lengths.min() < T       # some rows are padded
    split = dict(batch, values=values[:, :T],
                 bootstrap_value=jnp.asarray(values)[np.arange(B), lengths])
    a, _ = _prepare(batch, cfg)
    b, _ = _prepare(split, cfg)
    np.testing.assert_allclose(a["advantages"], b["advantages"], rtol=1e-5,
                               atol=1e-6)


def _one_step_batch(values):
    rng = np.random.default_rng(11)
    obs = rng.integers(0, N_OBS, B)
    return dict(observations=one_hot(obs),
                actions=jnp.asarray(rng.integers(0, N_ACT, B)),
                rewards=jnp.asarray(rng.standard_normal(B), jnp.float32),
                values=jnp.asarray(values, jnp.float32),
                log_probs=jnp.zeros(B, jnp.float32),
                dones=jnp.asarray(np.arange(B) % 2 == 0))


def test_one_step_batch_advantages():
    """[B] one-step episodes: A = r - V (nothing to bootstrap from)."""
    cfg, _, _ = ppo_problem(0)
    values = np.random.default_rng(12).standard_normal(B)
    batch = _one_step_batch(values)
    samples, _ = _prepare(batch, cfg)
    np.testing.assert_allclose(samples["advantages"],
                               np.asarray(batch["rewards"]) - values,
                               rtol=1e-5, atol=1e-6)


def test_one_step_batch_accepts_values_with_next_state_value():
    """[B] rewards with values [B, 2] = (V(s_0), V(s_1)) bootstrap V(s_1)."""
    cfg, _, _ = ppo_problem(0)
    cfg = with_fields(cfg, gamma=0.5)
    values = np.random.default_rng(13).standard_normal((B, 2))
    batch = _one_step_batch(values)
    samples, _ = _prepare(batch, cfg)
    not_done = 1.0 - np.asarray(batch["dones"], np.float64)
    expected = (np.asarray(batch["rewards"]) + 0.5 * not_done * values[:, 1]
                - values[:, 0])
    np.testing.assert_allclose(samples["advantages"], expected, rtol=1e-5,
                               atol=1e-6)


def test_epochs_times_minibatches_optimizer_steps():
    """3 epochs x 2 minibatches: six Adam steps per update."""
    cfg, params, batch = ppo_problem(4)
    assert (cfg.num_epochs, cfg.num_minibatches) == (3, 2)
    state = afn.ppo.init(params, cfg)
    state, _ = _update(state, batch)
    assert int(state.opt_state[0].count) == 6
    state, _ = _update(state, batch)
    assert int(state.opt_state[0].count) == 12
    assert int(state.step) == 2


def test_num_minibatches_must_divide_samples():
    """B * T = 48 samples cannot be split into 5 minibatches."""
    cfg, params, batch = ppo_problem(5)
    cfg = with_fields(cfg, num_minibatches=5)
    state = afn.ppo.init(params, cfg)
    with pytest.raises(ValueError, match="num_minibatches"):
        _update(state, batch)


def _sgd_config(cfg, max_grad_norm):
    return with_fields(cfg, optimizer=SGD, num_epochs=1, num_minibatches=1,
                       max_grad_norm=max_grad_norm)


def test_single_minibatch_update_is_a_gradient_step_on_loss():
    """One epoch, one minibatch, SGD(1), no clipping: params - grad(loss)."""
    cfg, params, batch = ppo_problem(6)
    cfg = _sgd_config(cfg, 1e6)
    grads = _grad(params, batch, cfg)
    state, metrics = _update(afn.ppo.init(params, cfg), batch)
    expected = jax.tree_util.tree_map(lambda p, g: p - g, params, grads)
    assert_trees_close(state.params, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"],
                               optax.tree.norm(grads), rtol=1e-4)


def test_max_grad_norm_clips_the_step_and_reports_the_raw_norm():
    """grad_norm is the pre-clip norm; the SGD step has norm max_grad_norm."""
    cfg, params, batch = ppo_problem(6)
    cfg = _sgd_config(cfg, 0.01)
    grads = _grad(params, batch, cfg)
    norm = float(optax.tree.norm(grads))
    assert norm > 0.1
    state, metrics = _update(afn.ppo.init(params, cfg), batch)
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-4)
    step = jax.tree_util.tree_map(lambda a, b: a - b, state.params, params)
    np.testing.assert_allclose(optax.tree.norm(step), 0.01, rtol=1e-3)
    expected = jax.tree_util.tree_map(lambda g: -g * 0.01 / norm, grads)
    assert_trees_close(step, expected, rtol=1e-3, atol=1e-7)


def test_key_advances_and_drives_minibatch_order():
    """The state's key changes each update; the update is a function of it."""
    cfg, params, batch = ppo_problem(7)
    state = afn.ppo.init(params, cfg, key=jax.random.PRNGKey(1))
    s1, m1 = _update(state, batch)
    s1b, m1b = _update(state, batch)
    s2, _ = _update(s1, batch)
    keys = [np.asarray(s.key) for s in (state, s1, s2)]
    assert not np.array_equal(keys[0], keys[1])
    assert not np.array_equal(keys[1], keys[2])
    assert_trees_close(s1.params, s1b.params, rtol=0, atol=0)
    other, _ = _update(afn.ppo.init(params, cfg, key=jax.random.PRNGKey(2)),
                       batch)
    diff = jax.tree_util.tree_map(lambda a, b: jnp.max(jnp.abs(a - b)),
                                  s1.params, other.params)
    assert max(float(d) for d in jax.tree_util.tree_leaves(diff)) > 1e-6


def test_all_done_and_empty_mask_batches_are_finite():
    """Every step terminal, or every step padding: no NaN anywhere."""
    cfg, params, batch = ppo_problem(8)
    all_done = dict(batch, dones=jnp.ones((B, T), bool),
                    mask=jnp.ones((B, T), jnp.float32))
    empty = dict(batch, mask=jnp.zeros((B, T), jnp.float32))
    adv = aft.np_gae_advantages(np.asarray(batch["rewards"]),
                                np.asarray(batch["values"]), cfg.gamma,
                                cfg.gae_lambda,
                                terminated=np.ones((B, T), bool))
    samples, _ = _prepare(all_done, cfg)
    np.testing.assert_allclose(
        np.asarray(samples["advantages"]).reshape(B, T), adv, rtol=1e-5,
        atol=1e-6)
    state, metrics = _update(afn.ppo.init(params, cfg), all_done)
    assert_all_finite((state.params, metrics))
    state, metrics = _update(afn.ppo.init(params, cfg), empty)
    assert_all_finite((state.params, metrics))
    assert float(metrics["loss"]) == 0.0


def test_policy_must_return_value():
    """A policy without a value head gives a clear error."""
    cfg, params, batch = ppo_problem(0)
    cfg = with_fields(cfg, policy=lambda p, o: o @ p["w"] + p["b"])
    with pytest.raises(ValueError, match="value"):
        jax.jit(afn.ppo.loss)(params, batch, cfg)


N_CHAIN = 4


def _chain_step(s, a):
    """States 0..3: action 0 left, 1 right, 2-3 stay; reaching 3 pays 1."""
    s2 = jnp.where(a == 1, s + 1, jnp.where(a == 0, jnp.maximum(s - 1, 0), s))
    done = s2 == N_CHAIN - 1
    return jnp.where(done, 0, s2), done.astype(jnp.float32), done


def _chain_value(params, gamma):
    """Exact discounted return from state 0 under the policy."""
    logits, _ = actor_critic(params, jnp.eye(N_OBS))
    probs = np.asarray(jax.nn.softmax(logits), np.float64)
    n = N_CHAIN - 1
    a, r = np.eye(n), np.zeros(n)
    for s in range(n):
        p_left, p_right = probs[s, 0], probs[s, 1]
        if s + 1 == n:
            r[s] += p_right
        else:
            a[s, s + 1] -= gamma * p_right
        a[s, max(s - 1, 0)] -= gamma * p_left
        a[s, s] -= gamma * (1.0 - p_left - p_right)
    return np.linalg.solve(a, r)[0]


@jax.jit
def _chain_rollout(params, s, gumbel):
    """``T`` steps of ``B`` environments, as an RL loop collects them.

    Actions are sampled with the Gumbel-max trick from ``gumbel [T, B, A]``.
    """
    def step(s, noise):
        obs = one_hot(s)
        logits, value = actor_critic(params, obs)
        a = jnp.argmax(logits + noise, -1)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), a[:, None],
                                   -1)[:, 0]
        s2, r, done = _chain_step(s, a)
        return s2, dict(observations=obs, actions=a, rewards=r, dones=done,
                        log_probs=logp, values=value)

    s, traj = jax.lax.scan(step, s, gumbel)
    traj = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), traj)
    _, last = actor_critic(params, one_hot(s))
    traj["values"] = jnp.concatenate([traj["values"], last[:, None]], 1)
    traj["mask"] = jnp.ones((B, T), jnp.float32)
    return s, traj


def test_learns_chain_mdp():
    """PPO on a 4-state chain approaches the optimal return gamma^2."""
    gamma = 0.9
    cfg, _, _ = ppo_problem(0)
    cfg = with_fields(cfg, gamma=gamma)
    params = init_params(0, scale=0.0)
    state = afn.ppo.init(params, cfg, key=jax.random.PRNGKey(0))
    s = jnp.zeros(B, jnp.int32)
    before = _chain_value(state.params, gamma)
    rng = np.random.default_rng(1)
    rewards = []
    for _ in range(80):
        gumbel = rng.gumbel(size=(T, B, N_ACT)).astype(np.float32)
        s, traj = _chain_rollout(state.params, s, gumbel)
        state, metrics = _update(state, traj)
        rewards.append(float(metrics["mean_reward"]))
    after = _chain_value(state.params, gamma)
    optimal = gamma ** 2
    assert before < 0.5 * optimal
    assert after >= 0.9 * optimal, (before, after, optimal)
    # One reward every three steps is the best possible rate.
    assert np.mean(rewards[-10:]) >= 0.8 / 3
