"""GRPO's generation path: sampling, scoring, masks, and learning."""

from __future__ import annotations

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_fn.sampling import GenerationConfig
from artifex_fn.grpo import GRPOConfig
from artifex_fn.training import GRPOTrainer
from artifex_fn.training import ScaledReward
from artifex_fn import sampling

VOCAB = 8


class PointPolicy(nnx.Module):
    """One-step Gaussian policy over a 2-D point, conditioned on a vector."""

    def __init__(self, rngs):
        self.mean = nnx.Linear(2, 2, rngs=rngs)
        self.log_std = nnx.Param(jnp.full((2,), -0.5))

    def __call__(self, cond):
        return distrax.MultivariateNormalDiag(
            self.mean(cond), jnp.exp(self.log_std[...]))


class TinyLM(nnx.Module):
    """Causal token model: logits at j depend on tokens <= j (prefix mean)."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, 16, rngs=rngs)
        self.out = nnx.Linear(16, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        h = jnp.cumsum(h, axis=1) / jnp.arange(1, tokens.shape[1] + 1)[:, None]
        return self.out(h)


class Scripted(nnx.Module):
    """Emits ``script[i]`` after a prompt, whatever came before."""

    def __init__(self, script, prompt_len):
        self.script = jnp.asarray(script)
        self.prompt_len = prompt_len

    def __call__(self, tokens):
        pos = jnp.arange(tokens.shape[1]) - (self.prompt_len - 1)
        nxt = self.script[jnp.clip(pos, 0, len(self.script) - 1)]
        logits = 50.0 * jax.nn.one_hot(nxt, VOCAB)
        return jnp.broadcast_to(logits, tokens.shape + (VOCAB,))


def test_sample_tokens_stops_at_eos_and_pads():
    prompts = jnp.ones((3, 2), jnp.int32)
    model = Scripted([4, 5, 7, 4, 4], prompt_len=2)
    comp, mask, _ = sampling.generate(
        model, prompts, jax.random.key(0), max_new_tokens=5, eos_token_id=7,
        pad_token_id=0)
    np.testing.assert_array_equal(comp, [[4, 5, 7, 0, 0]] * 3)
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0]] * 3)
    comp, mask, _ = sampling.generate(
        model, prompts, jax.random.key(0), max_new_tokens=5)
    np.testing.assert_array_equal(comp, [[4, 5, 7, 4, 4]] * 3)
    np.testing.assert_array_equal(mask, 1.0)


def test_eos_equal_to_pad_and_mask_from_first_eos():
    model = Scripted([3, 3, 2, 1], prompt_len=1)
    comp, mask, _ = sampling.generate(
        model, jnp.zeros((2, 1), jnp.int32), jax.random.key(0),
        max_new_tokens=4, eos_token_id=3, pad_token_id=3)
    np.testing.assert_array_equal(comp, [[3, 3, 3, 3]] * 2)
    np.testing.assert_array_equal(mask, [[1, 0, 0, 0]] * 2)


def test_completion_logits_align_with_next_token_positions():
    model = TinyLM(nnx.Rngs(0))
    prompt = jnp.array([[1, 2, 3]])
    comp = jnp.array([[4, 5]])
    got = sampling.completion_logits(model, prompt, comp)
    full = model(jnp.array([[1, 2, 3, 4]]))
    np.testing.assert_allclose(got, full[:, 2:4], rtol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, Lp\]"):
        sampling.completion_logits(model, jnp.array([1, 2]), comp)


def test_generation_config_validation():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=0.0)


def _point_trainer(**kw):
    model = PointPolicy(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    return model, GRPOTrainer(model, opt, GRPOConfig(num_generations=8,
                                                     beta=0.0), **kw)


TARGET = jnp.array([1.0, -2.0])


def point_reward(samples, conditions):
    return -jnp.sum((samples - TARGET - conditions) ** 2, axis=-1)


def test_one_step_policy_learns_and_is_on_policy():
    model, trainer = _point_trainer()
    conds = jax.random.normal(jax.random.key(1), (4, 2))
    first = trainer.train_step(dict(observations=conds), point_reward,
                               jax.random.key(0))
    # behaviour log-probs are those of the current policy: ratio 1
    assert float(first["approx_kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(first["clip_fraction"]) == 0.0
    for i in range(150):
        m = trainer.train_step(dict(observations=conds), point_reward,
                               jax.random.key(i + 1))
    assert float(m["mean_reward"]) > 0.5 * float(first["mean_reward"])
    mean = model(conds).mean()
    np.testing.assert_allclose(mean, conds + TARGET, atol=0.35)
    assert trainer._generate_update._cache_size() == 1
    roll = trainer.last_rollout
    assert roll["samples"].shape == (32, 2) and roll["rewards"].shape == (32,)


def test_conditions_are_repeated_in_contiguous_groups():
    seen = {}

    def reward(samples, conditions):
        seen["c"] = conditions
        return jnp.zeros(samples.shape[0])

    _, trainer = _point_trainer(jit_reward=False)
    conds = jnp.arange(6.0).reshape(3, 2)
    trainer.train_step(dict(observations=conds), reward, jax.random.key(0))
    np.testing.assert_array_equal(seen["c"], jnp.repeat(conds, 8, axis=0))


def test_host_reward_equals_jitted_reward():
    results = []
    for jit_reward in (True, False):
        model, trainer = _point_trainer(jit_reward=jit_reward)
        for i in range(3):
            trainer.train_step(dict(observations=jnp.ones((2, 2))),
                               point_reward, jax.random.key(i))
        results.append(nnx.as_pure(nnx.state(model, nnx.Param)))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_reward_shapes_are_checked():
    _, trainer = _point_trainer()
    with pytest.raises(ValueError, match=r"shape \(16,\)"):
        trainer.train_step(dict(observations=jnp.ones((2, 2))),
                           lambda s, c: jnp.zeros((16, 1)), jax.random.key(0))
    with pytest.raises(ValueError, match="'observations'"):
        trainer.train_step(dict(x=jnp.ones((2, 2))), point_reward,
                           jax.random.key(0))


def test_pytree_and_module_rewards_do_not_recompile():
    _, trainer = _point_trainer()
    conds = dict(observations=jnp.ones((2, 2)))
    for scale in (1.0, 2.0, 3.0):  # numeric leaves are traced
        trainer.train_step(conds, ScaledReward(point_reward, scale=scale),
                           jax.random.key(0))
    assert trainer._generate_update._cache_size() == 1

    class Critic(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 1, rngs=rngs)

        def __call__(self, samples, conditions=None):
            return self.lin(samples)[:, 0]

    critic = Critic(nnx.Rngs(3))
    m1 = trainer.train_step(conds, critic, jax.random.key(0))
    critic.lin.bias.set_value(critic.lin.bias.get_value() + 10.0)
    m2 = trainer.train_step(conds, critic, jax.random.key(0))
    assert trainer._generate_update._cache_size() == 2
    assert float(m2["mean_reward"]) > float(m1["mean_reward"]) + 5.0


def test_token_model_learns_target_token_with_eos_and_reference():
    model = TinyLM(nnx.Rngs(0))
    ref = nnx.clone(model)
    opt = nnx.Optimizer(model, optax.adam(0.03), wrt=nnx.Param)
    gen = GenerationConfig(max_new_tokens=5, eos_token_id=7, pad_token_id=0)
    trainer = GRPOTrainer(model, opt, GRPOConfig(num_generations=4, beta=0.01),
                          reference_model=ref, generation=gen)
    prompts = jax.random.randint(jax.random.key(0), (6, 3), 1, 7)

    def reward(samples, conditions):
        valid = samples != 0
        return jnp.sum((samples == 3) & valid, axis=1) / 5.0

    first = trainer.train_step(dict(observations=prompts), reward, jax.random.key(0))
    assert float(first["approx_kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(first["kl"]) == pytest.approx(0.0, abs=1e-6)
    for i in range(60):
        m = trainer.train_step(dict(observations=prompts), reward,
                               jax.random.key(i + 1))
    assert float(m["mean_reward"]) > 0.8 > float(first["mean_reward"])
    assert float(m["kl"]) > 0.0  # moved away from the frozen reference
    roll = trainer.last_rollout
    comp, mask = np.asarray(roll["samples"]), np.asarray(roll["mask"])
    assert comp.shape == (24, 5) and mask.shape == (24, 5)
    for row, mrow in zip(comp, mask):  # padding after the first EOS
        eos = np.flatnonzero(row == 7)
        if eos.size:
            assert (row[eos[0] + 1:] == 0).all()
            assert mrow[:eos[0] + 1].all() and not mrow[eos[0] + 1:].any()
        else:
            assert mrow.all()
    np.testing.assert_allclose(m["completion_length"], mask.sum(1).mean())


def test_fit_with_reward_is_deterministic_in_key():
    params = []
    for _ in range(2):
        model, trainer = _point_trainer()
        trainer.fit(lambda step: dict(observations=jnp.ones((2, 2))),
                    num_steps=3, reward_fn=point_reward, key=5)
        params.append(nnx.as_pure(nnx.state(model, nnx.Param)))
        assert trainer.step == 3
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_array_equal(a, b)
