"""Every code example of the RL training guide, section by section.

Each test is the guide's code with ``artifex`` spelled ``artifex_fn`` and
its placeholders (``YourPolicyModel``, ``observations``, models inside the
reward examples, ``dataloader``) filled by tiny models and random data. The
diffusion integration fills ``generate_samples`` / ``compute_log_probs``
with the last reverse step of a tiny DDPM as a one-step MDP (the full
chain-as-MDP version is ``examples/diffusion_grpo.py``).

Read as documentation, the guide's DPO examples pass precomputed
log-probabilities: those carry no gradient to the model, so the trainer
evaluates them and warns; the trainable form scores ``chosen`` /
``rejected`` responses with the model (``test_dpo_with_responses_...``).
"""

from __future__ import annotations

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

OBS, ACT, B, T = 4, 3, 8, 6
_k = jax.random.split(jax.random.key(0), 8)
observations = jax.random.normal(_k[0], (B, T, OBS))
actions = jax.random.randint(_k[1], (B, T), 0, ACT)
rewards = jax.random.normal(_k[2], (B, T))
values = 0.1 * jax.random.normal(_k[3], (B, T + 1))  # V(s_0..s_T)
old_log_probs = jnp.full((B, T), -jnp.log(ACT))
dones = jnp.zeros((B, T)).at[:, -1].set(1.0)


class YourPolicyModel(nnx.Module):
    """Categorical policy over ACT actions."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(OBS, ACT, rngs=rngs)

    def __call__(self, obs):
        return self.linear(obs)


PolicyModel = YourPolicyModel


class ActorCriticModel(nnx.Module):
    """Shared trunk, policy and value heads."""

    def __init__(self, rngs):
        self.trunk = nnx.Linear(OBS, 16, rngs=rngs)
        self.pi = nnx.Linear(16, ACT, rngs=rngs)
        self.v = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, obs):
        h = jnp.tanh(self.trunk(obs))
        return self.pi(h), self.v(h)[..., 0]


# -- REINFORCE Trainer -------------------------------------------------------

def test_reinforce_configuration():
    from artifex_fn.generative_models.training import REINFORCEConfig
    from artifex_fn.generative_models.training import REINFORCETrainer  # noqa: F401

    config = REINFORCEConfig(
        gamma=0.99,              # Discount factor for returns
        normalize_returns=True,  # Normalize returns for stability
        entropy_coeff=0.01,      # Entropy bonus for exploration
    )
    defaults = REINFORCEConfig()
    assert (defaults.gamma, defaults.normalize_returns,
            defaults.entropy_coeff) == (0.99, True, 0.01) == (
                config.gamma, config.normalize_returns, config.entropy_coeff)


def test_reinforce_basic_usage(capsys):
    from flax import nnx
    import optax
    from artifex_fn.generative_models.training import (
        REINFORCEConfig,
        REINFORCETrainer,
    )

    # Setup model and optimizer
    model = YourPolicyModel(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)

    # Create trainer
    config = REINFORCEConfig(gamma=0.99, entropy_coeff=0.01)
    trainer = REINFORCETrainer(model, optimizer, config)

    # Training step
    batch = {
        "observations": observations,  # State observations
        "actions": actions,            # Actions taken
        "rewards": rewards,            # Rewards received
    }
    metrics = trainer.train_step(batch)
    print(f"Policy loss: {metrics['policy_loss']:.4f}")
    assert capsys.readouterr().out.startswith("Policy loss: ")
    assert int(optimizer.step.get_value()) == 1


# -- PPO Trainer -------------------------------------------------------------

def test_ppo_configuration():
    from artifex_fn.generative_models.training import PPOConfig, PPOTrainer  # noqa: F401

    config = PPOConfig(
        gamma=0.99,           # Discount factor
        gae_lambda=0.95,      # GAE lambda for advantage estimation
        clip_param=0.2,       # PPO clipping parameter
        vf_coeff=0.5,         # Value function loss coefficient
        entropy_coeff=0.01,   # Entropy bonus coefficient
        max_grad_norm=0.5,    # Gradient clipping norm
    )
    d = PPOConfig()
    assert (d.gamma, d.gae_lambda, d.clip_param, d.vf_coeff,
            d.entropy_coeff, d.max_grad_norm) == (0.99, 0.95, 0.2, 0.5,
                                                  0.01, 0.5)
    assert config == d


def test_training_with_ppo(capsys):
    from flax import nnx
    import optax
    from artifex_fn.generative_models.training import PPOConfig, PPOTrainer

    # Actor-critic model with separate heads
    model = ActorCriticModel(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-4), wrt=nnx.Param)

    config = PPOConfig(
        gamma=0.99,
        gae_lambda=0.95,
        clip_param=0.2,
        vf_coeff=0.5,
        entropy_coeff=0.01,
    )
    trainer = PPOTrainer(model, optimizer, config)

    # Collect trajectory
    trajectory = {
        "observations": observations,
        "actions": actions,
        "rewards": rewards,
        "values": values,           # Value estimates V(s)
        "log_probs": old_log_probs, # Log probs from old policy
        "dones": dones,             # Episode termination flags
    }

    # Train on trajectory
    metrics = trainer.train_step(trajectory)
    print(f"Policy loss: {metrics['policy_loss']:.4f}")
    print(f"Value loss: {metrics['value_loss']:.4f}")
    print(f"Entropy: {metrics['entropy']:.4f}")
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["Policy loss",
                                                    "Value loss", "Entropy"]
    # epochs of updates ran
    assert int(optimizer.step.get_value()) == config.num_epochs


# -- GRPO Trainer ------------------------------------------------------------

def _grpo_data():
    n = 32
    k = jax.random.split(jax.random.key(1), 3)
    return dict(observations=jax.random.normal(k[0], (n, OBS)),
                actions=jax.random.randint(k[1], (n,), 0, ACT),
                rewards=jax.random.normal(k[2], (n,)),
                old_log_probs=jnp.full((n,), -jnp.log(ACT)))


def test_grpo_configuration():
    from artifex_fn.generative_models.training import GRPOConfig, GRPOTrainer  # noqa: F401

    config = GRPOConfig(
        num_generations=4,    # Generations per prompt (group size)
        clip_param=0.2,       # PPO-style clipping
        beta=0.01,            # KL penalty coefficient
        entropy_coeff=0.01,   # Entropy bonus
        gamma=0.99,           # Discount factor
    )
    assert config == GRPOConfig()


def test_how_grpo_works(capsys):
    from flax import nnx
    import optax
    from artifex_fn.generative_models.training import GRPOConfig, GRPOTrainer

    d = _grpo_data()
    observations, actions, rewards, old_log_probs = (
        d["observations"], d["actions"], d["rewards"], d["old_log_probs"])

    # Policy model (no value head needed!)
    model = PolicyModel(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)

    config = GRPOConfig(
        num_generations=4,  # Generate 4 samples per prompt
        clip_param=0.2,
        beta=0.01,
    )
    trainer = GRPOTrainer(model, optimizer, config)

    # Batch with grouped generations
    # If num_prompts=8 and num_generations=4, batch_size=32
    batch = {
        "observations": observations,  # Shape: (batch_size, ...)
        "actions": actions,            # Shape: (batch_size, ...)
        "rewards": rewards,            # Shape: (batch_size,)
        "log_probs": old_log_probs,    # Shape: (batch_size,)
        "group_size": 4,               # Optional, defaults to config
    }

    metrics = trainer.train_step(batch)
    print(f"Policy loss: {metrics['policy_loss']:.4f}")
    print(f"Approx KL: {metrics['approx_kl']:.4f}")
    assert "Approx KL" in capsys.readouterr().out
    # rewards were normalised within the 8 groups of 4
    assert float(metrics["group_advantage_std"]) == pytest.approx(1.0,
                                                                  abs=1e-3)


def test_grpo_kl_divergence_penalty(capsys):
    from artifex_fn.generative_models.training import GRPOConfig, GRPOTrainer

    d = _grpo_data()
    observations, actions, rewards, old_log_probs = (
        d["observations"], d["actions"], d["rewards"], d["old_log_probs"])
    model = PolicyModel(rngs=nnx.Rngs(0))
    reference = PolicyModel(rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)
    trainer = GRPOTrainer(model, optimizer, GRPOConfig(beta=0.01))
    ref_log_probs = jax.nn.log_softmax(reference(observations))[
        jnp.arange(len(actions)), actions]

    # With reference model for KL penalty
    batch = {
        "observations": observations,
        "actions": actions,
        "rewards": rewards,
        "log_probs": old_log_probs,
        "ref_log_probs": ref_log_probs,  # From frozen reference model
    }

    # KL penalty is automatically applied when ref_log_probs is provided
    metrics = trainer.train_step(batch)
    print(f"KL penalty: {metrics.get('kl_penalty', 0):.4f}")
    assert capsys.readouterr().out.startswith("KL penalty: ")
    assert float(metrics["kl_penalty"]) > 0


# -- DPO Trainer -------------------------------------------------------------

def test_dpo_configuration():
    from artifex_fn.generative_models.training import DPOConfig, DPOTrainer  # noqa: F401

    config = DPOConfig(
        beta=0.1,              # Reward scaling temperature
        label_smoothing=0.0,   # Smoothing for preference labels
        reference_free=False,  # Enable SimPO mode
    )
    assert config == DPOConfig()


def test_standard_dpo_training(capsys):
    from flax import nnx
    import optax
    from artifex_fn.generative_models.training import DPOConfig, DPOTrainer

    chosen_log_probs = jnp.array([-3.0, -4.0, -2.5])
    rejected_log_probs = jnp.array([-5.0, -3.5, -4.0])
    ref_chosen = jnp.array([-3.5, -4.0, -3.0])
    ref_rejected = jnp.array([-4.5, -4.0, -3.5])

    model = PolicyModel(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-5), wrt=nnx.Param)

    config = DPOConfig(beta=0.1)
    trainer = DPOTrainer(model, optimizer, config)

    # Preference pairs: chosen (preferred) vs rejected
    batch = {
        "chosen_log_probs": chosen_log_probs,      # Log probs for preferred
        "rejected_log_probs": rejected_log_probs,  # Log probs for rejected
        "ref_chosen_log_probs": ref_chosen,        # Reference model log probs
        "ref_rejected_log_probs": ref_rejected,
    }

    with pytest.warns(UserWarning, match="no gradient"):
        metrics = trainer.train_step(batch)
    print(f"DPO loss: {metrics['dpo_loss']:.4f}")
    print(f"Reward accuracy: {metrics['reward_accuracy']:.2%}")
    out = capsys.readouterr().out
    assert "Reward accuracy: 66.67%" in out
    # -log sigmoid(0.1 * margin); margins (c - ref_c) - (r - ref_r) are
    # 0.5 + 0.5, 0 - 0.5, 0.5 + 0.5
    expected = np.mean(np.log1p(np.exp(-0.1 * np.array([1.0, -0.5, 1.0]))))
    np.testing.assert_allclose(metrics["dpo_loss"], expected, rtol=1e-6)


def test_simpo_reference_free(capsys):
    from artifex_fn.generative_models.training import DPOConfig, DPOTrainer

    model = PolicyModel(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-5), wrt=nnx.Param)
    chosen_log_probs = jnp.array([-1.0, -2.0])
    rejected_log_probs = jnp.array([-2.0, -1.5])

    config = DPOConfig(
        beta=0.1,
        reference_free=True,  # Enable SimPO mode
    )
    trainer = DPOTrainer(model, optimizer, config)

    # No reference log probs needed
    batch = {
        "chosen_log_probs": chosen_log_probs,
        "rejected_log_probs": rejected_log_probs,
    }

    with pytest.warns(UserWarning, match="no gradient"):
        metrics = trainer.train_step(batch)
    # SimPO: -log sigmoid(beta * (c - r) - gamma), lengths 1, gamma 0.5
    margin = 0.1 * np.array([1.0, -0.5]) - 0.5
    np.testing.assert_allclose(metrics["loss"],
                               np.mean(np.log1p(np.exp(-margin))), rtol=1e-6)


def test_dpo_with_responses_scored_by_the_model():
    """The trainable form: the model scores chosen and rejected responses."""
    from artifex_fn.generative_models.training import DPOConfig, DPOTrainer

    model = PolicyModel(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-1), wrt=nnx.Param)
    trainer = DPOTrainer(model, optimizer, DPOConfig(beta=0.1),
                         reference_model=nnx.clone(model))
    obs = jax.random.normal(jax.random.key(0), (16, OBS))
    good = jnp.zeros((16,), jnp.int32)
    batch = {"chosen": {"observations": obs, "actions": good},
             "rejected": {"observations": obs, "actions": good + 1}}
    first = trainer.train_step(batch)
    for _ in range(20):
        last = trainer.train_step(batch)
    assert float(last["loss"]) < float(first["loss"])
    assert float(last["reward_accuracy"]) == 1.0


# -- Reward Functions --------------------------------------------------------

def test_builtin_reward_functions():
    from artifex_fn.generative_models.training import (
        ConstantReward,
        CompositeReward,
        ThresholdReward,
        ScaledReward,
        ClippedReward,
    )

    samples = jax.random.normal(jax.random.key(0), (5, 3))
    aesthetic_reward = lambda s, c=None: jnp.mean(s, axis=-1)
    clip_reward = lambda s, c=None: jnp.max(s, axis=-1)
    base_reward = lambda s, c=None: s[:, 0]

    reward_fn = ConstantReward(value=1.0)
    rewards = reward_fn(samples)  # Returns array of 1.0
    np.testing.assert_array_equal(rewards, np.ones(5))

    reward_fn = CompositeReward(
        reward_fns=[aesthetic_reward, clip_reward],
        weights=[0.3, 0.7],  # 30% aesthetic, 70% CLIP
    )
    np.testing.assert_allclose(
        reward_fn(samples),
        0.3 * aesthetic_reward(samples) + 0.7 * clip_reward(samples),
        rtol=1e-6)

    # Reward = 1.0 if base_reward > 0.5 else 0.0
    reward_fn = ThresholdReward(
        reward_fn=base_reward,
        threshold=0.5,
        above_value=1.0,
        below_value=0.0,
    )
    np.testing.assert_array_equal(reward_fn(samples),
                                  (samples[:, 0] > 0.5).astype(np.float32))

    reward_fn = ScaledReward(reward_fn=base_reward, scale=10.0)
    np.testing.assert_allclose(reward_fn(samples), 10 * samples[:, 0],
                               rtol=1e-6)

    reward_fn = ClippedReward(
        reward_fn=base_reward,
        min_value=-1.0,
        max_value=1.0,
    )
    np.testing.assert_allclose(reward_fn(samples),
                               np.clip(samples[:, 0], -1, 1))


class _FakeClip:
    """Stands in for a CLIP model: linear image and text encoders."""

    def __init__(self):
        self.w = jax.random.normal(jax.random.key(3), (12, 4))

    def encode_text(self, text):
        return jnp.ones(4) * len(text) / 10.0

    def encode_image(self, images):
        return images.reshape(images.shape[0], -1) @ self.w


def test_custom_reward_functions():
    from typing import Protocol
    import jax
    import jax.numpy as jnp
    from artifex_fn.generative_models.training import RewardFunction as Lib

    class RewardFunction(Protocol):
        """Protocol for reward function implementations."""

        def __call__(
            self,
            samples: jax.Array,
            conditions: jax.Array | None = None,
            **kwargs,
        ) -> jax.Array:
            ...

    # Example: CLIP-based reward
    class CLIPReward:
        def __init__(self, clip_model, target_text):
            self.clip_model = clip_model
            self.target_text = target_text
            self.target_embedding = clip_model.encode_text(target_text)

        def __call__(self, samples, conditions=None, **kwargs):
            image_embeddings = self.clip_model.encode_image(samples)
            # Cosine similarity as reward
            similarity = jnp.sum(
                image_embeddings * self.target_embedding,
                axis=-1,
            )
            return similarity

    # Example: Multi-objective reward with learnable weights
    class MultiObjectiveReward:
        """Complex reward combining multiple objectives with adaptive weighting."""

        def __init__(
            self,
            clip_model,
            aesthetic_model,
            safety_classifier,
            target_text: str,
            clip_weight: float = 0.4,
            aesthetic_weight: float = 0.3,
            safety_weight: float = 0.3,
        ):
            self.clip_model = clip_model
            self.aesthetic_model = aesthetic_model
            self.safety_classifier = safety_classifier
            self.target_embedding = clip_model.encode_text(target_text)

            # Weights can be tuned during training
            self.weights = {
                "clip": clip_weight,
                "aesthetic": aesthetic_weight,
                "safety": safety_weight,
            }

        def __call__(self, samples, conditions=None, **kwargs):
            batch_size = samples.shape[0]  # noqa: F841

            # CLIP alignment score (cosine similarity)
            image_emb = self.clip_model.encode_image(samples)
            clip_score = jnp.sum(image_emb * self.target_embedding, axis=-1)

            # Aesthetic quality score (normalized to [0, 1])
            aesthetic_score = self.aesthetic_model(samples)
            aesthetic_score = jax.nn.sigmoid(aesthetic_score)

            # Safety score (1.0 = safe, 0.0 = unsafe)
            safety_logits = self.safety_classifier(samples)
            safety_score = jax.nn.softmax(safety_logits, axis=-1)[:, 0]  # P(safe)

            # Combine with penalty for unsafe content
            combined_reward = (
                self.weights["clip"] * clip_score +
                self.weights["aesthetic"] * aesthetic_score +
                self.weights["safety"] * safety_score
            )

            # Apply safety penalty: zero reward for unsafe samples
            safety_mask = safety_score > 0.5
            combined_reward = jnp.where(safety_mask, combined_reward, -1.0)

            return combined_reward

    # Example: Sequence-level reward for text generation
    class SequenceReward:
        """Reward function for autoregressive text models."""

        def __init__(self, reward_model, tokenizer):
            self.reward_model = reward_model
            self.tokenizer = tokenizer

        def __call__(self, samples, conditions=None, **kwargs):
            # samples: token IDs of shape (batch, seq_len)
            # Compute reward at sequence level
            rewards = self.reward_model(samples)

            # Apply length penalty to avoid reward hacking
            lengths = jnp.sum(samples != self.tokenizer.pad_id, axis=-1)
            length_penalty = jnp.log(lengths + 1) / jnp.log(100)  # Normalize

            return rewards - 0.1 * length_penalty

    images = jax.random.normal(jax.random.key(0), (6, 2, 2, 3))
    clip = _FakeClip()
    r1 = CLIPReward(clip, "a cat")(images)
    aesthetic = lambda x: jnp.mean(x, axis=(1, 2, 3))
    safety = lambda x: jnp.stack([jnp.mean(x, axis=(1, 2, 3)),
                                  -jnp.mean(x, axis=(1, 2, 3))], -1)
    multi = MultiObjectiveReward(clip, aesthetic, safety, "a cat")
    r2 = jax.jit(multi.__call__)(images)
    p_safe = jax.nn.softmax(safety(images), -1)[:, 0]
    # No P(safe) within rounding of the 0.5 threshold: the rows flagged
    # here are the ones the reward flags, on any machine.
    assert np.min(np.abs(np.asarray(p_safe, np.float64) - 0.5)) > 1e-4
    unsafe = p_safe <= 0.5
    np.testing.assert_array_equal(np.asarray(r2)[np.asarray(unsafe)], -1.0)

    class Tok:
        pad_id = 0

    tokens = jnp.array([[5, 6, 0, 0], [5, 6, 7, 8]])
    seq = SequenceReward(lambda s: jnp.zeros(s.shape[0]), Tok())(tokens)
    np.testing.assert_allclose(seq, -0.1 * np.log([3, 5]) / np.log(100),
                               rtol=1e-6)
    for fn in (CLIPReward(clip, "x"), multi):
        assert isinstance(fn, Lib)
    assert r1.shape == r2.shape == (6,)


# -- Utility Functions -------------------------------------------------------

def test_utility_functions():
    from artifex_fn.generative_models.training.rl.utils import (
        compute_discounted_returns,
        compute_gae_advantages,
        normalize_advantages,
        compute_policy_entropy,
        compute_kl_divergence,
        compute_clipped_surrogate_loss,
    )

    rewards1 = jnp.array([1.0, 0.0, 2.0])
    # Compute G_t = r_t + gamma * r_{t+1} + gamma^2 * r_{t+2} + ...
    returns = compute_discounted_returns(rewards1, gamma=0.99)
    np.testing.assert_allclose(returns, [1 + 0.99 ** 2 * 2, 0.99 * 2, 2.0],
                               rtol=1e-6)

    # GAE with bias-variance trade-off
    advantages = compute_gae_advantages(
        rewards=rewards1,
        values=jnp.array([0.5, 0.2, 0.1, 0.0]),  # V(s) estimates including V(s_T+1)
        dones=jnp.zeros(3),          # Episode termination flags
        gamma=0.99,
        gae_lambda=0.95,
    )
    assert advantages.shape == (3,)

    # Zero mean, unit variance normalization
    normalized = normalize_advantages(advantages, eps=1e-8)
    assert abs(float(jnp.mean(normalized))) < 1e-6

    log_probs = jax.nn.log_softmax(jnp.array([[0.0, 1.0, 2.0]]))
    ref_log_probs = jax.nn.log_softmax(jnp.array([[0.5, 0.5, 0.5]]))
    # H = -sum(p * log(p))
    entropy = compute_policy_entropy(log_probs)
    p = np.exp(np.asarray(log_probs))
    np.testing.assert_allclose(entropy, -np.sum(p * np.log(p)), rtol=1e-6)

    # KL(policy || reference)
    kl = compute_kl_divergence(log_probs, ref_log_probs)
    np.testing.assert_allclose(
        kl, np.sum(p * (np.asarray(log_probs) - np.asarray(ref_log_probs))),
        rtol=1e-5)

    # PPO clipped objective
    loss = compute_clipped_surrogate_loss(
        log_probs=jnp.log(jnp.array([1.5, 0.5])),
        old_log_probs=jnp.zeros(2),
        advantages=jnp.array([1.0, -1.0]),
        clip_param=0.2,
    )
    # -mean(min(r A, clip(r) A)) = -(1.2 + -0.8) / 2
    np.testing.assert_allclose(loss, -0.2, rtol=1e-6)


# -- Integration with Model-Specific Trainers --------------------------------

class EpsModel(nnx.Module):
    """``eps(x_t, t)`` of a 2-D diffusion model; its DDPO policy is a step."""

    def __init__(self, rngs, num_timesteps=10):
        self.embed = nnx.Embed(num_timesteps, 32, rngs=rngs)
        self.inp = nnx.Linear(2, 32, rngs=rngs)
        self.out = nnx.Linear(32, 2, rngs=rngs)
        self.num_timesteps = num_timesteps

    def __call__(self, x_t, t):
        return self.out(jax.nn.silu(self.inp(x_t) + self.embed(t)))

    def policy_outputs(self, observations):
        """The reverse step ``p(x_{t-1} | x_t)`` as a distrax Normal."""
        from artifex_fn.families import diffusion
        return diffusion.step_distribution(
            lambda m, x, t: m(x, t), self, observations["x"],
            observations["t"], diffusion.noise_schedule(self.num_timesteps))


def test_diffusion_model_fine_tuning_with_grpo():
    from artifex_fn.generative_models.training import GRPOConfig, GRPOTrainer
    from artifex_fn.generative_models.training.trainers import DiffusionTrainer
    from artifex_fn.families.diffusion import DiffusionConfig
    from artifex_fn.toy_data import gaussian_mixture_2d

    model = EpsModel(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    diffusion_config = DiffusionConfig(num_timesteps=10)
    # The last reverse step as a one-step MDP: conditions are states x_1,
    # four copies each (a group), actions are the sampled x_0.
    x1 = jnp.repeat(jax.random.normal(jax.random.key(1), (8, 2)), 4, axis=0)
    dataloader = [{"x": gaussian_mixture_2d(jax.random.key(i), 64),
                   "conditions": {"x": x1, "t": jnp.zeros(32, jnp.int32)}}
                  for i in range(3)]
    keys = iter(jax.random.split(jax.random.key(2), 3))

    def generate_samples(model, conditions, num_samples):
        assert len(conditions["x"]) % num_samples == 0  # grouped rows
        return model.policy_outputs(conditions).sample(seed=next(keys))

    def compute_log_probs(model, samples, conditions):
        return model.policy_outputs(conditions).log_prob(samples)

    reward_fn = lambda samples, conditions: (samples[:, 0] > 0).astype(
        jnp.float32)

    # Standard diffusion trainer for pre-training
    diffusion_trainer = DiffusionTrainer(model, optimizer, diffusion_config)
    for batch in dataloader:
        pre = diffusion_trainer.train_step(batch["x"])

    # Fine-tune with GRPO
    grpo_config = GRPOConfig(num_generations=4, beta=0.01)
    grpo_trainer = GRPOTrainer(model, optimizer, grpo_config)

    # Generate samples and compute rewards
    for batch in dataloader:
        # Generate multiple samples per condition
        samples = generate_samples(model, batch["conditions"], num_samples=4)
        rewards = reward_fn(samples, batch["conditions"])

        # GRPO training step
        rl_batch = {
            "observations": batch["conditions"],
            "actions": samples,
            "rewards": rewards,
            "log_probs": compute_log_probs(model, samples, batch["conditions"]),
        }
        metrics = grpo_trainer.train_step(rl_batch)
    assert np.isfinite(float(pre["loss"])) and np.isfinite(float(metrics["loss"]))
    assert float(metrics["approx_kl"]) >= 0.0
    assert diffusion_trainer.step == 3 and grpo_trainer.step == 3


class Encoder(nnx.Module):
    """Gaussian encoder with a value head; samples with its own RNG."""

    def __init__(self, rngs):
        self.mu = nnx.Linear(12, 2, rngs=rngs)
        self.v = nnx.Linear(12, 1, rngs=rngs)
        self.log_std = nnx.Param(jnp.zeros(2))
        self.rngs = rngs

    def __call__(self, images, return_log_prob=False):
        x = images.reshape(images.shape[0], -1)
        dist = distrax.MultivariateNormalDiag(self.mu(x),
                                              jnp.exp(self.log_std[...]))
        if return_log_prob:
            latents = dist.sample(seed=self.rngs.sample())
            return latents, dist.log_prob(latents)
        return dist, self.v(x)[:, 0]


def test_vae_latent_space_optimization_with_ppo():
    from artifex_fn.generative_models.training import PPOConfig, PPOTrainer

    batch_size = 8
    encoder = Encoder(nnx.Rngs(0, sample=1))
    decoder_w = jax.random.normal(jax.random.key(2), (2, 12))
    decoder = lambda z: (z @ decoder_w).reshape(-1, 2, 2, 3)
    optimizer = nnx.Optimizer(encoder, optax.adam(1e-2), wrt=nnx.Param)

    def compute_reconstruction_reward(images, recon):
        return -jnp.mean((images - recon) ** 2, axis=(1, 2, 3))

    dataloader = [{"images": jax.random.normal(jax.random.key(i),
                                               (batch_size, 2, 2, 3))}
                  for i in range(3)]

    # Use encoder as policy, decoder as environment
    ppo_config = PPOConfig(gamma=0.99, gae_lambda=0.95)
    ppo_trainer = PPOTrainer(encoder, optimizer, ppo_config)

    # Train encoder to produce latents that decode well
    for batch in dataloader:
        value_estimates = encoder(batch["images"])[1]
        # Encoder produces latent "actions"
        latents, log_probs = encoder(batch["images"], return_log_prob=True)

        # Decoder reconstructs, computing "rewards"
        reconstructions = decoder(latents)
        rewards = compute_reconstruction_reward(batch["images"], reconstructions)

        trajectory = {
            "observations": batch["images"],
            "actions": latents,
            "rewards": rewards,
            "values": value_estimates,
            "log_probs": log_probs,
            "dones": jnp.zeros(batch_size),
        }
        metrics = ppo_trainer.train_step(trajectory)
    assert np.isfinite(float(metrics["loss"]))
    assert float(metrics["approx_kl"]) >= 0


class Generator(nnx.Module):
    """Stochastic generator: ``__call__`` samples, ``policy_outputs`` is p(x|z)."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(2, 2, rngs=rngs)
        self.rngs = rngs

    def policy_outputs(self, noise):
        return distrax.MultivariateNormalDiag(self.lin(noise),
                                              0.3 * jnp.ones(2))

    def __call__(self, noise):
        return self.policy_outputs(noise).sample(seed=self.rngs.sample())


def test_gan_discriminator_as_reward_with_reinforce():
    from artifex_fn.generative_models.training import REINFORCEConfig, REINFORCETrainer

    generator = Generator(nnx.Rngs(0, sample=1))
    optimizer = nnx.Optimizer(generator, optax.adam(5e-2), wrt=nnx.Param)
    real = jnp.array([2.0, -1.0])
    discriminator = lambda x: -jnp.sum((x - real) ** 2, axis=-1)
    dataloader = [{"noise": jax.random.normal(jax.random.key(i), (64, 2))}
                  for i in range(60)]

    reinforce_config = REINFORCEConfig(entropy_coeff=0.01)
    reinforce_trainer = REINFORCETrainer(generator, optimizer, reinforce_config)

    # Use discriminator output as reward
    first = None
    for batch in dataloader:
        # Generate samples
        generated = generator(batch["noise"])

        # Discriminator provides reward signal
        rewards = discriminator(generated)  # Higher = more realistic

        rl_batch = {
            "observations": batch["noise"],
            "actions": generated,
            "rewards": rewards,
        }
        metrics = reinforce_trainer.train_step(rl_batch)
        first = metrics if first is None else first
    assert float(metrics["mean_reward"]) > float(first["mean_reward"]) + 1.0


# -- API Reference -----------------------------------------------------------

def test_api_reference_imports():
    from artifex_fn.generative_models.training import (  # noqa: F401
        # Configurations
        REINFORCEConfig,
        PPOConfig,
        GRPOConfig,
        DPOConfig,

        # Trainers
        REINFORCETrainer,
        PPOTrainer,
        GRPOTrainer,
        DPOTrainer,

        # Reward functions
        RewardFunction,
        ConstantReward,
        CompositeReward,
        ThresholdReward,
        ScaledReward,
        ClippedReward,
    )
    import artifex_fn.dpo
    import artifex_fn.training as home
    assert home.GRPOTrainer is GRPOTrainer
    assert artifex_fn.dpo.DPOConfig is DPOConfig


# -- Using Callbacks with RL Trainers ----------------------------------------

@pytest.fixture
def offline_run_dir(tmp_path, monkeypatch):
    """Relative paths of the guide land in tmp_path; W&B offline and local."""
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                       ("WANDB_DIR", tmp_path),
                       ("WANDB_CONFIG_DIR", tmp_path / "config"),
                       ("WANDB_CACHE_DIR", tmp_path / "cache"),
                       ("WANDB_DATA_DIR", tmp_path / "data"),
                       ("WANDB_DISABLE_GIT", "true"),
                       ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(var, str(value))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    import wandb
    wandb.teardown()


def _callback_setup():
    model = PolicyModel(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    prompts = jax.random.normal(jax.random.key(0), (4, OBS))
    dataloader = [{"observations": prompts}] * 61
    reward_fn = lambda samples, conditions: (samples == 0).astype(jnp.float32)
    return model, optimizer, dataloader, reward_fn


def test_using_callbacks_with_rl_trainers(offline_run_dir):
    from artifex_fn.generative_models.training import GRPOTrainer, GRPOConfig
    from artifex_fn.generative_models.training.callbacks import (
        WandbLoggerCallback,
        WandbLoggerConfig,
        ModelCheckpoint,
        CheckpointConfig,
        JAXProfiler,
        ProfilingConfig,
        ProgressBarCallback,
    )

    model, optimizer, dataloader, reward_fn = _callback_setup()
    keys = iter(jax.random.split(jax.random.key(1), len(dataloader)))

    # Configure RL trainer
    grpo_config = GRPOConfig(
        num_generations=4,
        clip_param=0.2,
        beta=0.01,
    )
    trainer = GRPOTrainer(model, optimizer, grpo_config)

    # Setup callbacks for RL training
    callbacks = [
        # Log RL-specific metrics (rewards, advantages, KL divergence)
        WandbLoggerCallback(WandbLoggerConfig(
            project="rl-finetuning",
            name="grpo-experiment",
            config={
                "algorithm": "GRPO",
                "num_generations": 4,
                "beta": 0.01,
            },
            log_every_n_steps=10,
        )),

        # Save best model based on mean reward
        ModelCheckpoint(CheckpointConfig(
            dirpath="checkpoints/grpo",
            monitor="mean_reward",
            mode="max",  # Higher reward is better
            save_top_k=1,  # Keep only the best checkpoint
        )),

        # Profile RL training (useful for debugging generation bottlenecks)
        JAXProfiler(ProfilingConfig(
            log_dir="logs/rl_profiles",
            start_step=50,
            end_step=60,
        )),

        # Progress bar with RL metrics
        ProgressBarCallback(),
    ]

    # Training loop with callbacks
    for callback in callbacks:
        callback.on_train_begin(trainer)

    for step, batch in enumerate(dataloader):
        key = next(keys)
        # Generate samples and compute rewards
        metrics = trainer.train_step(batch, reward_fn, key)

        # Log metrics via callbacks
        for callback in callbacks:
            callback.on_train_batch_end(trainer, metrics, step)

    for callback in callbacks:
        callback.on_train_end(trainer)

    wandb_cb, ckpt, profiler, bar = callbacks
    assert wandb_cb.num_logged == 7  # steps 10, 20, ..., 60 and the last
    assert ckpt.best_step is not None
    assert (offline_run_dir / "checkpoints/grpo/best").is_dir()
    assert list((offline_run_dir / "logs/rl_profiles").rglob("*.xplane.pb"))
    assert not profiler.active
    assert bar.bar is None and trainer.step == 61


def test_fit_drives_the_same_callbacks(offline_run_dir):
    from artifex_fn.generative_models.training import GRPOTrainer, GRPOConfig
    from artifex_fn.generative_models.training.callbacks import (
        CheckpointConfig, JSONLLoggerCallback, ModelCheckpoint,
        ProgressBarCallback)

    model, optimizer, dataloader, reward_fn = _callback_setup()
    trainer = GRPOTrainer(model, optimizer, GRPOConfig(num_generations=4))
    ckpt = ModelCheckpoint(CheckpointConfig(
        dirpath="ckpt", monitor="mean_reward", mode="max", every_n_steps=5))
    trainer.fit(dataloader[:20], reward_fn=reward_fn, key=0, callbacks=[
        ckpt, JSONLLoggerCallback("log.jsonl", log_every_n_steps=5),
        ProgressBarCallback()])
    lines = (offline_run_dir / "log.jsonl").read_text().splitlines()
    assert len(lines) == 4 and '"mean_reward"' in lines[0]
    assert ckpt.best_step in (5, 10, 15, 20)


# -- Trainer Class Hierarchy -------------------------------------------------

def test_trainer_hierarchy():
    from artifex_fn.generative_models.training.trainers import (
        AutoregressiveTrainer, DiffusionTrainer, DPOTrainer, EnergyTrainer,
        FlowTrainer, GANTrainer, GRPOTrainer, PPOTrainer, REINFORCETrainer,
        Trainer, VAETrainer)
    assert callable(AutoregressiveTrainer.generate)
    assert callable(EnergyTrainer.sample_negatives)
    for cls in (VAETrainer, GANTrainer, DiffusionTrainer, FlowTrainer,
                EnergyTrainer, AutoregressiveTrainer, REINFORCETrainer,
                PPOTrainer, GRPOTrainer, DPOTrainer):
        assert issubclass(cls, Trainer)
        assert callable(cls.compute_loss) and callable(cls.fit)
