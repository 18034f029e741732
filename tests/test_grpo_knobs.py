"""GRPO as practitioners run it: several updates per generation, per-reward
metrics, dynamic sampling, over-long completions, LoRA and refreshed
references."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import artifex_fn as afn
from artifex_fn import sampling
from artifex_fn._src.algorithms.batching import shuffle_indices
from artifex_fn.lora import add_lora
from artifex_fn import training
from artifex_fn.families.autoregressive import TinyCausalLM

from algo_fixtures import (assert_trees_close, examples, grpo_problem,
                           with_fields)

_update = jax.jit(afn.grpo.update)


def _state(config, params):
    return afn.grpo.init(params, config)


# -- several updates per generation ----------------------------------------

def test_epochs_without_minibatches_equal_repeated_single_updates():
    """mu = 3 on the whole batch is three mu = 1 updates on the same batch:
    every ratio is taken against the generation's log-probs."""
    cfg, params, batch = grpo_problem(1)
    many = _update(_state(with_fields(cfg, num_epochs=3), params), batch)[0]
    state = _state(cfg, params)
    for _ in range(3):
        state, _ = _update(state, batch)
    assert_trees_close(many.params, state.params, rtol=1e-5, atol=1e-6)
    assert int(many.step) == 1
    # mu = 1 leaves the key alone, as before the option existed.
    one = _update(_state(cfg, params), batch)[0]
    np.testing.assert_array_equal(one.key, _state(cfg, params).key)


def _replay(state, batch):
    """The multi-epoch update written out from the public pieces."""
    cfg = state.config
    rows, _, _ = afn.grpo.prepare(batch, cfg)
    n, k = rows["log_probs"].shape[0], cfg.num_minibatches
    _, *keys = jax.random.split(state.key, cfg.num_epochs + 1)
    params, opt_state = state.params, state.opt_state
    grad = jax.jit(jax.grad(afn.grpo.rows_loss, has_aux=True),
                   static_argnums=2)
    for key in keys:
        perm = np.asarray(shuffle_indices(key, n))
        for j in range(k):
            idx = perm[j * (n // k):(j + 1) * (n // k)]
            mb = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[idx], rows)
            g, _ = grad(params, mb, cfg, afn.grpo.totals_of(mb, cfg))
            updates, opt_state = cfg.optimizer.update(g, opt_state, params)
            params = optax.apply_updates(params, updates)
    return params


# "dapo" shares the token-mean denominators with "grpo"'s token counts.
@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo"])
def test_epochs_and_minibatches_follow_the_written_out_loop(aggregation):
    cfg, params, batch = grpo_problem(2)
    cfg = with_fields(cfg, num_epochs=2, num_minibatches=2,
                      loss_aggregation=aggregation)
    state = afn.grpo.init(params, cfg, key=jax.random.PRNGKey(3))
    new, metrics = _update(state, batch)
    assert_trees_close(new.params, _replay(state, batch), rtol=1e-5,
                       atol=1e-6)
    # micro-batches inside each minibatch: the same steps
    micro = _update(state.replace(config=with_fields(
        cfg, num_micro_batches=2)), batch)[0]
    assert_trees_close(micro.params, new.params, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(new.key, state.key)
    assert np.isfinite(float(metrics["loss"]))


def test_reference_is_scored_once_like_reference_log_probs_in_the_batch():
    cfg, params, batch = grpo_problem(3)
    cfg = with_fields(cfg, num_epochs=2, num_minibatches=2,
                      num_micro_batches=2)
    ref = jax.tree_util.tree_map(lambda x: x + 0.3, params)
    ref["w"] = ref["w"] * 0.5
    plain = {k: v for k, v in batch.items() if k != "ref_log_probs"}
    with_ref = afn.grpo.init(params, cfg, ref_params=ref)
    got, m1 = _update(with_ref, plain)
    scored = afn.grpo.with_reference_log_probs(with_ref, plain)
    want, m2 = _update(afn.grpo.init(params, cfg), scored)
    assert_trees_close(got.params, want.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m1["kl"], m2["kl"], rtol=1e-5)
    assert float(m1["kl"]) > 0


def test_epoch_settings_are_checked():
    with pytest.raises(ValueError, match="num_epochs"):
        afn.grpo.GRPOConfig(num_epochs=0)
    cfg, params, batch = grpo_problem(0)
    with pytest.raises(ValueError, match="num_minibatches"):
        afn.grpo.update(_state(with_fields(cfg, num_minibatches=3), params),
                        batch)


# -- over-long completions ---------------------------------------------------

def test_masked_truncated_completions_contribute_exactly_zero():
    cfg, params, batch = grpo_problem(4)
    truncated = np.zeros(batch["rewards"].shape[0], bool)
    truncated[[1, 6]] = True
    cfg_t = with_fields(cfg, mask_truncated_completions=True)
    flagged = dict(batch, truncated=jnp.asarray(truncated))
    got, m1 = _update(_state(cfg_t, params), flagged)
    # The same rows masked out by hand: the same update (another compiled
    # program, so equal up to float32 rounding).
    mask = np.where(truncated[:, None], 0.0, np.asarray(batch["mask"]))
    want, m2 = _update(_state(cfg, params),
                       dict(batch, mask=jnp.asarray(mask, jnp.float32)))
    assert_trees_close(got.params, want.params, rtol=1e-6, atol=1e-7)
    # Whatever the flagged rows hold (NaN log-probs, other actions), it
    # contributes nothing, to values or gradients.
    poisoned = dict(flagged)
    for key in ("log_probs", "ref_log_probs"):
        poisoned[key] = poisoned[key].at[jnp.array([1, 6])].set(jnp.nan)
    poisoned["actions"] = poisoned["actions"].at[1].set(3)
    again, m3 = _update(_state(cfg_t, params), poisoned)
    assert_trees_close(again.params, got.params, rtol=0, atol=0)
    for k in ("loss", "policy_loss", "kl", "entropy"):
        np.testing.assert_array_equal(m1[k], m3[k])
    assert float(m1["frac_truncated"]) == pytest.approx(2 / len(truncated))
    # Their rewards still count in their groups' advantages.
    rows, _, _ = afn.grpo.prepare(flagged, cfg_t)
    full, _, _ = afn.grpo.prepare(batch, cfg)
    np.testing.assert_array_equal(rows["advantages"], full["advantages"])
    with pytest.raises(ValueError, match="truncated"):
        afn.grpo.update(_state(cfg_t, params), batch)


def _np_lengths(tokens, stops):
    out = []
    for row in np.asarray(tokens):
        hit = [i for i, t in enumerate(row) if t in stops]
        out.append(hit[0] + 1 if hit else len(row))
    return np.array(out)


@settings(max_examples=examples(40), deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=6, max_size=6),
                min_size=1, max_size=6))
def test_lengths_and_truncation_match_a_loop(rows):
    tokens = jnp.asarray(rows, jnp.int32)
    lengths = afn.completion_lengths(tokens, eos_token_id=0,
                                     stop_token_ids=(4,))
    np.testing.assert_array_equal(lengths, _np_lengths(rows, {0, 4}))
    # the sampler's mask: ones up to and including the stop token
    mask = np.arange(6)[None] < np.asarray(lengths)[:, None]
    garbage = np.where(mask, np.asarray(tokens), 0)   # eos in the padding
    trunc = afn.truncated_completions(jnp.asarray(garbage), jnp.asarray(mask),
                                      eos_token_id=0, stop_token_ids=(4,))
    want = [not any(t in (0, 4) for t in r) for r in rows]
    np.testing.assert_array_equal(trunc, want)


def test_overlong_penalty_is_dapo_eq_13():
    lengths = np.arange(0, 12)
    got = afn.overlong_penalty(jnp.asarray(lengths), max_length=10,
                               cache_length=4)
    want = [0.0 if n <= 6 else (6 - n) / 4 if n <= 10 else -1.0
            for n in lengths]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="cache_length"):
        afn.overlong_penalty(3, max_length=4, cache_length=5)
    r = training.OverlongPenalty(max_length=4, cache_length=2,
                                 eos_token_id=1)
    np.testing.assert_allclose(
        r(jnp.array([[1, 0, 0, 0], [2, 2, 2, 1], [2, 2, 2, 2]])),
        [0.0, -1.0, -1.0])


# -- dynamic sampling ----------------------------------------------------------

@settings(max_examples=examples(30), deadline=None)
@given(st.sampled_from([1, 2, 4]), st.integers(1, 4), st.data())
def test_select_groups_keeps_the_first_groups_that_differ(g, m, data):
    rewards = np.asarray(data.draw(st.lists(st.integers(0, 2),
                                            min_size=g * m, max_size=g * m)),
                         np.float32)
    n = data.draw(st.integers(1, m))
    out = afn.select_groups(jnp.asarray(rewards), group_size=g, num_groups=n)
    groups = rewards.reshape(m, g)
    differ = [i for i in range(m) if g > 1 and np.ptp(groups[i]) > 0]
    same = [i for i in range(m) if i not in differ]
    want = (differ + same)[:n]
    np.testing.assert_array_equal(out.groups, want)
    np.testing.assert_array_equal(out.valid, [i in differ for i in want])
    np.testing.assert_array_equal(
        out.rows, (np.array(want)[:, None] * g + np.arange(g)).reshape(-1))
    assert int(out.num_qualifying) == len(differ)
    assert float(out.fill_rate) == pytest.approx(min(len(differ), n) / n)


class _Tokens(nnx.Module):
    """Logits of a token policy over one-hot position features."""

    def __init__(self, rngs):
        self.w = nnx.Linear(4, 6, rngs=rngs)

    def __call__(self, obs):
        return self.w(obs)


def _prompts(n):
    return jnp.asarray(np.eye(4, dtype=np.float32)[np.arange(n) % 4])


def test_dynamic_sampling_trains_on_qualifying_groups_and_reports_them():
    """Groups 0 and 2 of 4 have equal rewards: with keep_groups=2 the step
    trains on groups 1 and 3, the same update as on those groups alone."""
    G = 4
    group_reward = jnp.array([0.0, 1.0, 0.0, 1.0])

    def reward(samples, conditions):
        del conditions
        group = jnp.arange(samples.shape[0]) // G
        spread = jnp.where(group % 2 == 1, samples.astype(jnp.float32), 0.0)
        return group_reward[group] + spread

    model = _Tokens(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    trainer = training.GRPOTrainer(
        model, opt, afn.grpo.GRPOConfig(num_generations=G, beta=0.0),
        keep_groups=2, key=0)
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    m = trainer.train_step({"observations": _prompts(4)}, reward, key=5)
    assert float(m["dynamic_sampling/fill_rate"]) == 1.0
    assert float(m["dynamic_sampling/qualifying_groups"]) == 2.0
    # reward metrics are over all 16 samples
    rewards = np.asarray(trainer.last_rollout["rewards"])
    np.testing.assert_allclose(m["rewards/total/mean"], rewards.mean(),
                               rtol=1e-6)
    assert float(m["rewards/total/frac_zero_std"]) == pytest.approx(0.5)
    # The update equals one on the qualifying groups' samples alone.
    roll = trainer.last_rollout
    keep = np.r_[4:8, 12:16]
    ref_model = _Tokens(nnx.Rngs(0))
    nnx.update(ref_model, before)
    ref = training.GRPOTrainer(
        ref_model, nnx.Optimizer(ref_model, optax.sgd(0.1), wrt=nnx.Param),
        afn.grpo.GRPOConfig(num_generations=G, beta=0.0))
    ref.train_step(dict(observations=roll["conditions"][keep],
                        actions=roll["samples"][keep],
                        log_probs=roll["log_probs"][keep],
                        rewards=roll["rewards"][keep]))
    assert_trees_close(nnx.as_pure(nnx.state(model, nnx.Param)),
                       nnx.as_pure(nnx.state(ref_model, nnx.Param)),
                       rtol=1e-5, atol=1e-7)


def test_dynamic_sampling_with_too_few_groups_masks_the_empty_slots():
    model = _Tokens(nnx.Rngs(1))
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    trainer = training.GRPOTrainer(
        model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param),
        afn.grpo.GRPOConfig(num_generations=2, beta=0.0, entropy_coeff=0.1),
        keep_groups=2, key=0)
    m = trainer.train_step({"observations": _prompts(3)},
                           training.ConstantReward(1.0), key=1)
    assert float(m["dynamic_sampling/fill_rate"]) == 0.0
    # No qualifying group: every slot is masked, even the entropy bonus.
    assert float(m["loss"]) == 0.0 and float(m["grad_norm"]) == 0.0
    assert_trees_close(nnx.as_pure(nnx.state(model, nnx.Param)), before,
                       rtol=0, atol=0)
    with pytest.raises(ValueError, match="keep_groups"):
        trainer.train_step({"observations": _prompts(1)},
                           training.ConstantReward(1.0), key=1)


# -- per-reward metrics --------------------------------------------------------

def test_composite_parts_are_logged_per_name():
    G = 2

    def first(samples, conditions=None):
        return samples.astype(jnp.float32)

    def flat(samples, conditions=None):
        return jnp.ones(samples.shape[0])

    reward = training.CompositeReward([first, flat], weights=[2.0, 0.5])
    assert reward.names == ("first", "flat")
    total, parts = training.reward_parts(reward, jnp.array([1, 2, 3, 3]))
    np.testing.assert_allclose(total, [2.5, 4.5, 6.5, 6.5])
    np.testing.assert_allclose(parts["first"], [1, 2, 3, 3])
    model = _Tokens(nnx.Rngs(2))
    trainer = training.GRPOTrainer(
        model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param),
        afn.grpo.GRPOConfig(num_generations=G), key=0)
    m = trainer.train_step({"observations": _prompts(3)}, reward, key=2)
    samples = np.asarray(trainer.last_rollout["samples"], np.float64)
    np.testing.assert_allclose(m["rewards/first/mean"], samples.mean(),
                               rtol=1e-6)
    np.testing.assert_allclose(m["rewards/first/std"], samples.std(),
                               rtol=1e-5)
    assert float(m["rewards/flat/std"]) == 0.0
    assert float(m["rewards/flat/frac_zero_std"]) == 1.0
    spread = np.ptp(samples.reshape(-1, G), axis=1) > 0
    np.testing.assert_allclose(m["rewards/first/frac_zero_std"],
                               1.0 - spread.mean())
    np.testing.assert_allclose(m["rewards/total/mean"],
                               np.mean(2 * samples + 0.5), rtol=1e-6)
    with pytest.raises(ValueError, match="names"):
        training.CompositeReward([first, flat], names=("a", "a"))


# -- LoRA reference and reference refresh -------------------------------------

def _lm(seed=0):
    return TinyCausalLM(12, d_model=16, num_heads=2, num_layers=1,
                        rngs=nnx.Rngs(seed))


def test_lora_reference_equals_a_frozen_copy_of_the_base():
    """After some adapter training, the LoRA reference (adapters off) gives
    the frozen base's log-probs: the same KL and the same update as a
    trainer holding a second copy of the base."""
    base = _lm()
    frozen = copy.deepcopy(base)
    n = add_lora(base, rank=2, rngs=nnx.Rngs(1))
    assert n == 5              # qkv, out, mlp_in, mlp_out and the head
    gen = sampling.GenerationConfig(max_new_tokens=4, eos_token_id=1)
    cfg = afn.grpo.GRPOConfig(num_generations=2, beta=0.5)

    def reward(samples, conditions):
        del conditions
        return jnp.mean((samples == 3).astype(jnp.float32), axis=1)

    prompts = {"observations": [[2, 5, 7], [4, 4], [9]]}
    lora = training.GRPOTrainer(
        base, nnx.Optimizer(base, optax.adam(0.05), wrt=nnx.LoRAParam),
        cfg, lora_reference=True, generation=gen, key=0)
    for i in range(2):   # move the adapters away from zero
        lora.train_step(prompts, reward, key=i)
    adapted = copy.deepcopy(base)
    twin = training.GRPOTrainer(
        adapted, nnx.Optimizer(adapted, optax.adam(0.05),
                               wrt=nnx.LoRAParam),
        cfg, reference_model=frozen, generation=gen, key=0)
    batch = dict(lora.last_rollout)
    rollout = dict(observations=dict(prompt=batch["conditions"],
                                     completion=batch["samples"],
                                     prompt_mask=batch["prompt_mask"]),
                   actions=batch["samples"], log_probs=batch["log_probs"],
                   mask=batch["mask"], rewards=batch["rewards"])
    _, m_lora = lora.compute_loss(base, rollout)
    _, m_twin = twin.compute_loss(adapted, rollout)
    assert float(m_lora["kl"]) > 1e-4
    for k in ("kl", "loss", "policy_loss"):
        np.testing.assert_allclose(m_lora[k], m_twin[k], rtol=1e-5,
                                   atol=1e-7, err_msg=k)
    # The adapters are all that trained; the base never moved.
    for a, b in zip(jax.tree.leaves(nnx.state(frozen, nnx.Param)),
                    jax.tree.leaves(nnx.state(
                        base, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))):
        np.testing.assert_array_equal(a, b)


def test_lora_reference_errors_name_the_fix():
    model = _lm()
    with pytest.raises(ValueError, match="LoRA adapters"):
        training.GRPOTrainer(model, nnx.Optimizer(model, optax.sgd(0.1),
                                                  wrt=nnx.Param),
                             lora_reference=True)
    add_lora(model, rank=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="wrt=nnx.LoRAParam"):
        training.GRPOTrainer(model, nnx.Optimizer(model, optax.sgd(0.1),
                                                  wrt=nnx.Param),
                             lora_reference=True)
    with pytest.raises(ValueError, match="not both"):
        training.GRPOTrainer(model, nnx.Optimizer(model, optax.sgd(0.1),
                                                  wrt=nnx.LoRAParam),
                             lora_reference=True, reference_model=_lm())


@pytest.mark.parametrize("mix", [1.0, 0.25])
def test_reference_refresh_every_n_steps(mix):
    cfg, _, batch = grpo_problem(5)
    batch = {k: v for k, v in batch.items() if k != "ref_log_probs"}

    class Linear(nnx.Module):
        def __init__(self, seed):
            self.w = nnx.Linear(4, 4, rngs=nnx.Rngs(seed))

        def __call__(self, obs):
            return self.w(obs)

    model, ref = Linear(0), Linear(1)
    trainer = training.GRPOTrainer(
        model, nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param),
        afn.grpo.GRPOConfig(num_generations=4, beta=0.1),
        reference_model=ref, ref_sync_steps=2, ref_sync_mix=mix)
    old_ref = nnx.as_pure(nnx.state(ref))
    trainer.train_step(batch)
    assert_trees_close(nnx.as_pure(nnx.state(ref)), old_ref, rtol=0, atol=0)
    trainer.train_step(batch)
    policy = nnx.as_pure(nnx.state(model))
    want = jax.tree_util.tree_map(lambda p, r: mix * p + (1 - mix) * r,
                                  policy, old_ref)
    assert_trees_close(nnx.as_pure(nnx.state(ref)), want, rtol=1e-6,
                       atol=1e-7)
    with pytest.raises(ValueError, match="reference_model"):
        training.GRPOTrainer(model, trainer.optimizer, ref_sync_steps=2)


def test_dpo_takes_the_lora_reference_too():
    base = _Tokens(nnx.Rngs(3))
    frozen = copy.deepcopy(base)
    assert add_lora(base, rank=2, rngs=nnx.Rngs(4)) == 1
    # move the adapters away from zero (random: a constant B would shift
    # every logit of a row alike and change no log-prob)
    adapters = nnx.state(base, nnx.LoRAParam)
    nnx.update(base, jax.tree_util.tree_map(
        lambda x: x + jax.random.normal(jax.random.key(5), x.shape),
        adapters))
    rng = np.random.default_rng(0)
    obs = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    batch = {"chosen": {"observations": obs,
                        "actions": jnp.asarray(rng.integers(0, 6, 6))},
             "rejected": {"observations": obs,
                          "actions": jnp.asarray(rng.integers(0, 6, 6))}}
    cfg = afn.dpo.DPOConfig(beta=0.5)
    lora = training.DPOTrainer(
        base, nnx.Optimizer(base, optax.sgd(0.1), wrt=nnx.LoRAParam), cfg,
        lora_reference=True)
    twin = training.DPOTrainer(
        base, nnx.Optimizer(base, optax.sgd(0.1), wrt=nnx.LoRAParam), cfg,
        reference_model=frozen)
    _, m1 = lora.compute_loss(base, batch)
    _, m2 = twin.compute_loss(base, batch)
    assert abs(float(m1["reward_margin"])) > 1e-3
    for k in ("loss", "reward_margin", "chosen_reward"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-7,
                                   err_msg=k)
