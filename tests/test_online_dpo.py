"""Online DPO: best-versus-worst pairs of the policy's own samples."""

from __future__ import annotations

import copy
import dataclasses

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_fn import online_dpo
from artifex_fn import sampling
from artifex_fn import training
from artifex_fn.families.autoregressive import TinyCausalLM

from algo_fixtures import assert_trees_close

D, V, L, K = 4, 5, 3, 3


def _policy(params, obs):
    return distrax.Categorical(logits=obs @ params["w"] + params["b"])


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.standard_normal((D, V)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(V), jnp.float32)}


def _batch(seed=0, n=4, rewards=None):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, L + 1, n * K)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.float32)
    if rewards is None:
        rewards = np.array([0.0, 1.0, 1.0,    # best 1, worst 0
                            2.0, 2.0, 2.0,    # a tie
                            3.0, -1.0, 0.5,   # best 0, worst 1
                            0.0, 0.0, 5.0])[:n * K]
    return dict(
        observations=jnp.asarray(rng.standard_normal((n * K, L, D)),
                                 jnp.float32),
        actions=jnp.asarray(rng.integers(0, V, (n * K, L))),
        mask=jnp.asarray(mask), rewards=jnp.asarray(rewards, jnp.float32))


def _seq_lp(params, obs, actions, mask):
    logits = (np.asarray(obs, np.float64) @ np.asarray(params["w"], np.float64)
              + np.asarray(params["b"], np.float64))
    logits -= logits.max(-1, keepdims=True)
    log_sm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    lp = np.take_along_axis(log_sm, np.asarray(actions)[..., None], -1)[..., 0]
    return (lp * np.asarray(mask)).sum(-1)


def _config(**kw):
    return online_dpo.OnlineDPOConfig(num_generations=K, policy=_policy,
                                      optimizer=optax.sgd(0.3), **kw)


def test_select_pairs_by_hand():
    batch = _batch()
    pairs, decisive, info = online_dpo.select_pairs(
        dict(batch, ref_log_probs=jnp.arange(12.0)), group_size=K)
    np.testing.assert_array_equal(decisive, [1, 0, 1, 1])
    chosen_rows, rejected_rows = [1, 3, 6, 11], [0, 3, 7, 9]
    np.testing.assert_array_equal(pairs["chosen"]["actions"],
                                  batch["actions"][np.array(chosen_rows)])
    np.testing.assert_array_equal(pairs["rejected"]["mask"],
                                  batch["mask"][np.array(rejected_rows)])
    np.testing.assert_array_equal(pairs["ref_chosen_log_probs"], chosen_rows)
    np.testing.assert_array_equal(pairs["ref_rejected_log_probs"],
                                  rejected_rows)
    assert float(info["decisive_pairs"]) == pytest.approx(0.75)
    assert float(info["mean_reward"]) == pytest.approx(np.mean(
        np.asarray(batch["rewards"])))
    assert float(info["chosen_score"]) == pytest.approx((1 + 3 + 5) / 3)
    assert float(info["rejected_score"]) == pytest.approx((0 - 1 + 0) / 3)


def test_pair_rows_are_the_rows_select_pairs_takes():
    batch = _batch()
    chosen, rejected = online_dpo.pair_rows(batch["rewards"], group_size=K)
    np.testing.assert_array_equal(chosen, [1, 3, 6, 11])
    np.testing.assert_array_equal(rejected, [0, 3, 7, 9])
    with pytest.raises(ValueError, match="not a multiple of group_size=5"):
        online_dpo.pair_rows(batch["rewards"], group_size=5)
    with pytest.raises(ValueError, match=r"`rewards` must be \[N \* K\]"):
        online_dpo.pair_rows(jnp.zeros((4, 3)), group_size=K)


def test_trainer_scores_only_the_pairs_with_the_reference():
    """With a reference model the trainer's reference sees the pairs' 2 N
    rows, not all K N, and its step equals the layer-2 update given the
    reference log-probs of every row."""
    seen = []

    class Logits(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Linear(D, V, rngs=rngs)

        def __call__(self, obs):
            seen.append(obs.shape[0])
            return self.w(obs)

    g, rng = 4, np.random.default_rng(5)
    groups = dict(observations=jnp.asarray(rng.standard_normal((12, D)),
                                           jnp.float32),
                  actions=jnp.asarray(rng.integers(0, V, 12)),
                  rewards=jnp.asarray(rng.standard_normal(12), jnp.float32))
    model, reference = Logits(nnx.Rngs(0)), Logits(nnx.Rngs(1))
    trainer = training.OnlineDPOTrainer(
        model, nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param),
        online_dpo.OnlineDPOConfig(num_generations=g, beta=0.5),
        reference_model=reference, key=1)
    pure = lambda m: {"w": nnx.state(m, nnx.Param)["w"]["kernel"].get_value(),
                      "b": nnx.state(m, nnx.Param)["w"]["bias"].get_value()}
    params, ref_params = pure(model), pure(reference)
    seen.clear()
    trainer.train_step(groups)
    # Traced for the policy and for the reference, each on the 3 chosen
    # and the 3 rejected rows: never on the 12 rows.
    assert seen == [3, 3, 3, 3], seen
    cfg = online_dpo.OnlineDPOConfig(
        num_generations=g, beta=0.5, optimizer=optax.sgd(0.5),
        policy=lambda p, o: distrax.Categorical(logits=o @ p["w"] + p["b"]))
    every_row = online_dpo.with_reference_log_probs(
        online_dpo.init(params, cfg, ref_params=ref_params), groups)
    assert every_row["ref_log_probs"].shape == (12,)
    want = online_dpo.update(online_dpo.init(params, cfg), every_row)[0]
    got = pure(model)
    np.testing.assert_allclose(got["w"], want.params["w"], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(got["b"], want.params["b"], rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(got["w"], params["w"])


def test_loss_is_dpo_over_the_decisive_pairs():
    """By hand: -log sigmoid(beta * margin) averaged over decisive pairs;
    the tie's rows may hold NaN and change nothing."""
    params, ref = _params(0), _params(1)
    batch = _batch()
    cfg = _config(beta=0.5)
    lp = _seq_lp(params, batch["observations"], batch["actions"],
                 batch["mask"])
    lr = _seq_lp(ref, batch["observations"], batch["actions"], batch["mask"])
    want = []
    for c, r in ((1, 0), (6, 7), (11, 9)):
        m = 0.5 * ((lp[c] - lr[c]) - (lp[r] - lr[r]))
        want.append(np.log1p(np.exp(-m)))
    full = dict(batch, ref_log_probs=jnp.asarray(lr, jnp.float32))
    loss, metrics = online_dpo.loss(params, full, cfg)
    np.testing.assert_allclose(loss, np.mean(want), rtol=1e-5)
    assert float(metrics["decisive_pairs"]) == pytest.approx(0.75)
    # Padding of valid rows holds NaN: the same loss and gradient.
    poisoned = dict(full, observations=jnp.where(
        batch["mask"][..., None] > 0, batch["observations"], jnp.nan))
    g1 = jax.grad(lambda p: online_dpo.loss(p, full, cfg)[0])(params)
    g2 = jax.grad(lambda p: online_dpo.loss(p, poisoned, cfg)[0])(params)
    assert_trees_close(g2, g1, rtol=1e-6, atol=1e-7)
    # Only ties: a zero loss with a zero gradient, all finite.
    ties = dict(full, rewards=jnp.ones(12))
    loss, metrics = online_dpo.loss(params, ties, cfg)
    assert float(loss) == 0.0 and float(metrics["decisive_pairs"]) == 0.0
    g = jax.grad(lambda p: online_dpo.loss(p, ties, cfg)[0])(params)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0
               for x in jax.tree_util.tree_leaves(g))


def test_update_reference_micro_batches_jit_and_vmap():
    params, ref = _params(0), _params(1)
    batch = _batch()
    cfg = _config()
    state = online_dpo.init(params, cfg, key=jax.random.key(0),
                            ref_params=ref)
    new, metrics = jax.jit(online_dpo.update)(state, batch)
    # The reference from ref_params equals ref_log_probs in the batch.
    lr = _seq_lp(ref, batch["observations"], batch["actions"], batch["mask"])
    given = online_dpo.update(
        online_dpo.init(params, cfg),
        dict(batch, ref_log_probs=jnp.asarray(lr, jnp.float32)))[0]
    assert_trees_close(given.params, new.params, rtol=1e-5, atol=1e-6)
    # A gradient step on the mean loss over decisive pairs.
    full = dict(batch, ref_log_probs=jnp.asarray(lr, jnp.float32))
    grads = jax.grad(lambda p: online_dpo.loss(p, full, cfg)[0])(params)
    assert_trees_close(new.params, jax.tree_util.tree_map(
        lambda p, g: p - 0.3 * g, params, grads), rtol=1e-5, atol=1e-6)
    for k in (2, 4):
        micro = jax.jit(online_dpo.update)(state.replace(
            config=dataclasses.replace(cfg, num_micro_batches=k)), batch)
        assert_trees_close(micro[0].params, new.params, rtol=1e-5, atol=1e-6)
        for name in ("loss", "reward_accuracy", "decisive_pairs"):
            np.testing.assert_allclose(micro[1][name], metrics[name],
                                       rtol=1e-5, atol=1e-6)
    seeds = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), state)
    vm = jax.jit(jax.vmap(online_dpo.update, in_axes=(0, None)))(seeds, batch)
    assert_trees_close(jax.tree_util.tree_map(lambda x: x[1], vm[0].params),
                       new.params, rtol=1e-5, atol=1e-6)
    # SimPO's loss needs no reference.
    simpo = online_dpo.update(online_dpo.init(params, _config(
        reference_free=True)), batch)[1]
    assert np.isfinite(float(simpo["loss"]))


def test_bad_input():
    with pytest.raises(ValueError, match="num_generations"):
        online_dpo.OnlineDPOConfig(num_generations=1)
    cfg = _config()
    state = online_dpo.init(_params(), cfg)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        online_dpo.update(state, _batch(rewards=np.zeros(12))
                          | dict(rewards=jnp.zeros(11)))
    with pytest.raises(ValueError, match="ref_params"):
        online_dpo.update(state, _batch())
    with pytest.raises(ValueError, match="unknown keys"):
        online_dpo.update(state, dict(_batch(), log_probs=jnp.zeros((12, L))))


# docs/guides/preferences.md runs the same programs on this worker.
@pytest.mark.xdist_group("tiny-lm-trainers")
def test_trainer_raises_the_reward_and_compiles_once():
    """A tiny LM learns to emit token 7, from its own samples ranked by a
    count of 7s; one compiled program for all steps."""
    lm = TinyCausalLM(12, d_model=16, num_heads=2, num_layers=1,
                      rngs=nnx.Rngs(0))
    trainer = training.OnlineDPOTrainer(
        lm, nnx.Optimizer(lm, optax.adam(1e-2), wrt=nnx.Param),
        online_dpo.OnlineDPOConfig(num_generations=4, beta=0.1),
        reference_model=copy.deepcopy(lm),
        generation=sampling.GenerationConfig(max_new_tokens=4,
                                             eos_token_id=1), key=0)
    reward = lambda s, c: jnp.sum(s == 7, axis=-1).astype(jnp.float32)
    prompts = {"observations": [[2, 5], [4], [9, 3, 3], [3, 8]] * 2}
    first = trainer.train_step(prompts, reward, key=0)
    for i in range(1, 12):
        last = trainer.train_step(prompts, reward, key=i)
    assert float(first["mean_reward"]) < 1.0
    assert float(last["mean_reward"]) > 2.5
    assert trainer._generate_update._cache_size() == 1
    for name in ("loss", "decisive_pairs", "chosen_score",
                 "completion_length", "rewards/total/mean", "grad_norm"):
        assert np.isfinite(float(last[name])), name
    assert trainer.last_rollout["samples"].shape == (32, 4)


def test_trainer_one_step_policy_and_collected_groups():
    """A one-step categorical policy, and ``train_step`` on collected
    groups equal to the layer-2 update."""
    class Logits(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Linear(D, V, rngs=rngs)

        def __call__(self, obs):
            return self.w(obs)

    def make():
        m = Logits(nnx.Rngs(0))
        return m, training.OnlineDPOTrainer(
            m, nnx.Optimizer(m, optax.sgd(0.5), wrt=nnx.Param),
            online_dpo.OnlineDPOConfig(num_generations=4, beta=2.0,
                                       reference_free=True), key=1)

    model, trainer = make()
    obs = jnp.asarray(np.random.default_rng(3).standard_normal((8, D)),
                      jnp.float32)
    reward = lambda s, c: (s == 2).astype(jnp.float32)
    before = float(jnp.mean(jax.nn.softmax(model(obs))[:, 2]))
    for i in range(15):
        m = trainer.train_step({"observations": obs}, reward, key=i)
    after = float(jnp.mean(jax.nn.softmax(model(obs))[:, 2]))
    assert after > before + 0.2, (before, after)
    assert 0.0 <= float(m["decisive_pairs"]) <= 1.0
    # Collected groups: the trainer's step is online_dpo.update's.
    model, trainer = make()
    rng = np.random.default_rng(4)
    groups = dict(observations=jnp.asarray(rng.standard_normal((8, D)),
                                           jnp.float32),
                  actions=jnp.asarray(rng.integers(0, V, 8)),
                  rewards=jnp.asarray(rng.standard_normal(8), jnp.float32))
    params = {"w": nnx.state(model, nnx.Param)["w"]["kernel"].get_value(),
              "b": nnx.state(model, nnx.Param)["w"]["bias"].get_value()}
    cfg = online_dpo.OnlineDPOConfig(
        num_generations=4, beta=2.0, reference_free=True,
        optimizer=optax.sgd(0.5),
        policy=lambda p, o: distrax.Categorical(logits=o @ p["w"] + p["b"]))
    want = online_dpo.update(online_dpo.init(params, cfg), groups)[0].params
    trainer.train_step(groups)
    got = nnx.state(model, nnx.Param)["w"]
    np.testing.assert_allclose(got["kernel"].get_value(), want["w"],
                               rtol=1e-5, atol=1e-6)
