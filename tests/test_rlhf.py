"""Reward models (Bradley-Terry) and RLHF-PPO on sequences."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import artifex_fn as afn
from artifex_fn import reward_model as rm
from artifex_fn import sampling
from artifex_fn import training
from artifex_fn.families.autoregressive import ActorCriticLM
from artifex_fn.families.autoregressive import TinyCausalLM

from algo_fixtures import assert_trees_close


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# -- the Bradley-Terry loss and the reward-model update ------------------------

def test_bradley_terry_loss_by_hand():
    rw = np.array([1.0, 0.0, 2.0])
    rl = np.array([0.0, 1.0, 2.0])
    margin = np.array([0.0, 0.5, 0.0])
    got = afn.bradley_terry_loss(jnp.asarray(rw, jnp.float32),
                                 jnp.asarray(rl, jnp.float32),
                                 margin=jnp.asarray(margin, jnp.float32),
                                 center_coeff=0.1)
    want = (-np.log(_sigmoid(rw - rl - margin)) + 0.1 * (rw + rl) ** 2)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Without margin and centering: log 2 at a tie, log(1 + e^-1) at +1.
    np.testing.assert_allclose(
        afn.bradley_terry_loss(jnp.array([1.0, 3.0]), jnp.array([0.0, 3.0])),
        [np.log1p(np.exp(-1.0)), np.log(2.0)], rtol=1e-6)
    with pytest.raises(ValueError, match="center_coeff"):
        afn.bradley_terry_loss(jnp.zeros(2), jnp.zeros(2), center_coeff=-1.0)
    with pytest.raises(ValueError, match="rejected_rewards"):
        afn.bradley_terry_loss(jnp.zeros(2), jnp.zeros(3))


def _linear_rm(params, obs):
    return obs @ params["w"] + params["b"]


def _pairs(seed=0, n=8, d=3):
    rng = np.random.default_rng(seed)
    return dict(
        chosen=jnp.asarray(rng.standard_normal((n, d)), jnp.float32),
        rejected=jnp.asarray(rng.standard_normal((n, d)), jnp.float32),
        margin=jnp.asarray(rng.uniform(0, 1, n), jnp.float32))


def test_reward_model_update_is_a_gradient_step_on_the_mean_loss():
    params = {"w": jnp.array([0.5, -0.2, 0.1]), "b": jnp.array(0.3)}
    batch = _pairs()
    cfg = rm.RewardModelConfig(center_coeff=0.05, model=_linear_rm,
                               optimizer=optax.sgd(0.5))

    def mean_loss(p):
        rc, rr = _linear_rm(p, batch["chosen"]), _linear_rm(p,
                                                            batch["rejected"])
        return jnp.mean(-jax.nn.log_sigmoid(rc - rr - batch["margin"])
                        + 0.05 * (rc + rr) ** 2)

    new, metrics = jax.jit(rm.update)(rm.init(params, cfg), batch)
    grads = jax.grad(mean_loss)(params)
    want = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads)
    assert_trees_close(new.params, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], mean_loss(params), rtol=1e-5)
    rc = np.asarray(_linear_rm(params, batch["chosen"]))
    rr = np.asarray(_linear_rm(params, batch["rejected"]))
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(rc > rr))
    np.testing.assert_allclose(metrics["margin"], np.mean(rc - rr),
                               rtol=1e-5)
    micro = jax.jit(rm.update)(rm.init(params, _replace(
        cfg, num_micro_batches=4)), batch)[0]
    assert_trees_close(micro.params, new.params, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown keys"):
        rm.loss(params, dict(batch, chosen_ids=1), cfg)


def _replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


# -- the scalar head -------------------------------------------------------------

def _lm(seed=0, vocab=12):
    return TinyCausalLM(vocab, d_model=16, num_heads=2, num_layers=1,
                        rngs=nnx.Rngs(seed))


def test_last_valid_index_and_the_reward_function_protocol():
    np.testing.assert_array_equal(
        rm.last_valid_index(jnp.array([[0, 1, 1, 0], [1, 1, 1, 1],
                                       [0, 0, 0, 0], [0, 0, 1, 1]])),
        [2, 3, 0, 3])
    model = rm.SequenceRewardModel(_lm(), 16, pad_token_id=0,
                                   eos_token_id=1, rngs=nnx.Rngs(1))
    call = jax.jit(lambda s, c: model(s, c))
    prompts = jnp.array([[0, 4, 5], [6, 7, 8]])
    samples = jnp.array([[3, 1, 9, 9], [3, 3, 3, 3]])
    got = call(samples, prompts)
    # The same sequences scored by hand: prompt padding and the tokens
    # after the stop token are not read.
    tokens = jnp.concatenate([prompts, samples], axis=1)
    mask = jnp.array([[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_allclose(
        got, jax.jit(lambda t, m: model.score(t, m))(tokens, mask),
        rtol=1e-6)
    other = samples.at[0, 2:].set(jnp.array([5, 6]))
    np.testing.assert_allclose(call(other, prompts), got, rtol=1e-6)
    unpadded = call(samples[:1, :2], prompts[:1, 1:])
    np.testing.assert_allclose(unpadded, got[:1], rtol=1e-5, atol=1e-6)


def test_reward_model_trainer_learns_a_preference_and_scores_as_a_reward():
    """Chosen completions contain token 3, rejected ones do not: a few
    steps rank held-out pairs, and the model is then a reward function."""
    rng = np.random.default_rng(0)

    def side(has_three, n):
        toks = rng.integers(4, 10, (n, 4))
        if has_three:
            toks[np.arange(n), rng.integers(0, 4, n)] = 3
        prompt = rng.integers(4, 10, (n, 3))
        tokens = np.concatenate([prompt, toks], axis=1)
        return {"tokens": jnp.asarray(tokens),
                "mask": jnp.ones(tokens.shape, jnp.float32)}

    def pairs(n):
        return {"chosen": side(True, n), "rejected": side(False, n)}

    model = rm.SequenceRewardModel(_lm(2), 16, pad_token_id=0,
                                   eos_token_id=1, rngs=nnx.Rngs(3))
    trainer = training.RewardModelTrainer(
        model, nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param))
    for _ in range(40):
        metrics = trainer.train_step(pairs(32))
    _, held = trainer.compute_loss(model, pairs(64))
    assert float(held["accuracy"]) >= 0.95, held
    assert float(metrics["loss"]) < 0.3


# -- RLHF-PPO on sequences ---------------------------------------------------------

def _gae_loop(rewards, values, mask, gamma, lam):
    b, length = rewards.shape
    adv = np.zeros((b, length))
    for i in range(b):
        valid = np.nonzero(mask[i] > 0)[0]
        if not valid.size:
            continue
        last = valid[-1]
        running = 0.0
        for t in range(last, -1, -1):
            next_v = 0.0 if t == last else values[i, t + 1]
            delta = rewards[i, t] + gamma * next_v - values[i, t]
            running = delta + gamma * lam * running
            adv[i, t] = running
    return adv


def _sequence_problem(seed=0, b=6, length=4, vocab=5, d=3):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, b)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    batch = dict(
        observations=jnp.asarray(rng.standard_normal((b, d)), jnp.float32),
        actions=jnp.asarray(rng.integers(0, vocab, (b, length))),
        rewards=jnp.asarray(rng.standard_normal(b), jnp.float32),
        log_probs=jnp.asarray(-1.5 + 0.3 * rng.standard_normal((b, length)),
                              jnp.float32),
        ref_log_probs=jnp.asarray(
            -1.5 + 0.3 * rng.standard_normal((b, length)), jnp.float32),
        values=jnp.asarray(rng.standard_normal((b, length)), jnp.float32),
        mask=jnp.asarray(mask))
    return batch


def _seq_policy(params, obs):
    """Token logits [n, L, V] and values [n, L] from per-sequence features."""
    logits = jnp.einsum("nd,dlv->nlv", obs, params["w"])
    values = obs @ params["v"]
    return logits, values


def _seq_params(seed=0, d=3, length=4, vocab=5):
    rng = np.random.default_rng(seed + 100)
    return {"w": jnp.asarray(0.3 * rng.standard_normal((d, length, vocab)),
                             jnp.float32),
            "v": jnp.asarray(0.3 * rng.standard_normal((d, length)),
                             jnp.float32)}


def test_sequence_rewards_kl_penalty_and_gae_by_hand():
    batch = _sequence_problem()
    cfg = afn.ppo.PPOConfig(beta=0.2, gamma=1.0, gae_lambda=0.9,
                            policy=_seq_policy, optimizer=optax.sgd(0.1))
    samples, stats = afn.ppo.prepare(batch, cfg)
    mask = np.asarray(batch["mask"])
    old = np.asarray(batch["log_probs"], np.float64)
    ref = np.asarray(batch["ref_log_probs"], np.float64)
    kl = (old - ref) * mask                               # k1 per token
    last = mask.sum(1).astype(int) - 1
    r = -0.2 * kl
    r[np.arange(len(last)), last] += np.asarray(batch["rewards"])
    adv = _gae_loop(r, np.asarray(batch["values"]) * mask, mask, 1.0, 0.9)
    np.testing.assert_allclose(np.asarray(samples["advantages"]) * mask, adv,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(samples["returns"]) * mask,
        (adv + np.asarray(batch["values"])) * mask, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["kl"], kl.sum(1).mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["non_score_reward"],
                               -0.2 * kl.sum(1).mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["score"], np.mean(batch["rewards"]),
                               rtol=1e-6)
    # Padded tokens may hold NaN: nothing changes.
    poisoned = dict(batch)
    for k in ("log_probs", "ref_log_probs", "values"):
        poisoned[k] = jnp.where(batch["mask"] > 0, batch[k], jnp.nan)
    again, _ = afn.ppo.prepare(poisoned, cfg)
    np.testing.assert_array_equal(again["advantages"], samples["advantages"])


def test_sequence_update_micro_batches_and_adaptive_beta():
    batch = _sequence_problem(1)
    cfg = afn.ppo.PPOConfig(beta=0.1, kl_target=0.05, kl_horizon=100.0,
                            num_epochs=2, num_minibatches=2,
                            policy=_seq_policy, optimizer=optax.adam(0.05))
    state = afn.ppo.init(_seq_params(), cfg)
    new, m = jax.jit(afn.ppo.update)(state, batch)
    micro = jax.jit(afn.ppo.update)(state.replace(config=_replace(
        cfg, num_micro_batches=3)), batch)[0]
    assert_trees_close(micro.params, new.params, rtol=1e-5, atol=1e-6)
    kl = float(m["kl"])
    err = np.clip(kl / 0.05 - 1.0, -0.2, 0.2)
    np.testing.assert_allclose(m["next_beta"], 0.1 * (1 + err * 6 / 100.0),
                               rtol=1e-6)
    np.testing.assert_allclose(new.config.beta, m["next_beta"], rtol=1e-6)
    assert float(m["beta"]) == pytest.approx(0.1)
    for k in ("loss", "value_loss", "policy_loss", "score", "kl",
              "non_score_reward", "explained_variance"):
        assert np.isfinite(float(m[k])), k
    # A reference from state.ref_params equals ref_log_probs in the batch.
    ref_params = _seq_params(7)
    plain = {k: v for k, v in batch.items() if k != "ref_log_probs"}
    got = jax.jit(afn.ppo.update)(afn.ppo.init(_seq_params(), cfg,
                                               ref_params=ref_params),
                                  plain)[0]
    logits, _ = _seq_policy(ref_params, batch["observations"])
    ref_lp = jnp.take_along_axis(jax.nn.log_softmax(logits),
                                 batch["actions"][..., None], -1)[..., 0]
    want = jax.jit(afn.ppo.update)(state, dict(plain, ref_log_probs=ref_lp))[0]
    assert_trees_close(got.params, want.params, rtol=1e-5, atol=1e-6)


# docs/guides/preferences.md runs the same programs on this worker.
@pytest.mark.xdist_group("tiny-lm-trainers")
def test_ppo_trainer_generates_scores_with_a_reward_model_and_compiles_once():
    lm = _lm(4)
    policy = ActorCriticLM(lm, rngs=nnx.Rngs(5))
    reference = copy.deepcopy(lm)
    reward = rm.SequenceRewardModel(_lm(6), 16, pad_token_id=0,
                                    eos_token_id=1, rngs=nnx.Rngs(7))
    trainer = training.PPOTrainer(
        policy, nnx.Optimizer(policy, optax.adam(1e-2), wrt=nnx.Param),
        afn.ppo.PPOConfig(beta=0.05, kl_target=1.0, num_epochs=2,
                          gamma=1.0),
        reference_model=reference,
        generation=sampling.GenerationConfig(max_new_tokens=5,
                                             eos_token_id=1),
        key=0)
    prompts = {"observations": [[2, 5, 7], [4, 4], [9], [3, 8]]}
    m1 = trainer.train_step(prompts, reward, key=1)
    roll = trainer.last_rollout
    scores = jax.jit(lambda s, c: reward(s, c))(roll["samples"],
                                                 roll["conditions"])
    np.testing.assert_allclose(m1["score"], np.mean(scores), rtol=1e-5)
    assert float(m1["kl"]) == pytest.approx(0.0, abs=1e-5)  # policy = ref
    assert trainer.config.beta != 0.05          # the controller moved it
    # A reward model with other weights: the same compiled program.
    nnx.update(reward, jax.tree_util.tree_map(lambda x: x * 1.5,
                                              nnx.state(reward, nnx.Param)))
    m2 = trainer.train_step(prompts, reward, key=2)
    assert trainer._generate_update._cache_size() == 1
    assert float(m2["kl"]) > 0.0                # the policy has moved
    for k in ("loss", "value_loss", "score", "non_score_reward", "beta",
              "completion_length", "rewards/total/mean"):
        assert np.isfinite(float(m2[k])), k


def test_likelihood_features_sum_the_response_log_probs():
    """The appended channel at the last token is the trunk's log-likelihood
    of the response alone (the prompt's cancels in pairs and would swamp
    RL rewards), and the reward-function call passes the response."""
    lm = _lm(8)
    tokens = jnp.array([[0, 4, 5, 3, 7, 1]])
    mask = jnp.array([[0, 1, 1, 1, 1, 1]]) > 0
    response = jnp.array([[0, 0, 0, 1, 1, 1]]) > 0
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    feats = jax.jit(lambda t, p, m, r: rm.likelihood_features(
        lm, t, p, m, response_mask=r))(tokens, positions, mask, response)
    logits = lm(tokens, positions=positions, attention_mask=mask)
    log_p = np.asarray(jax.nn.log_softmax(logits), np.float64)[0]
    want = sum(log_p[t - 1, int(tokens[0, t])] for t in (3, 4, 5))
    np.testing.assert_allclose(feats[0, -1, -1], want, rtol=1e-5)
    np.testing.assert_allclose(feats[0, :, :-1],
                               lm.features(tokens, positions=positions,
                                           attention_mask=mask)[0],
                               rtol=1e-5, atol=1e-6)
    model = rm.SequenceRewardModel(lm, 17, pad_token_id=0, eos_token_id=1,
                                   features=rm.likelihood_features,
                                   rngs=nnx.Rngs(9))
    call = jax.jit(lambda s, c: model(s, c))(tokens[:, 3:], tokens[:, :3])
    direct = model.head(feats[:, -1])[..., 0]
    np.testing.assert_allclose(call, direct, rtol=1e-5, atol=1e-6)
