"""Trainers at their boundaries: restored state, replaced configs, and code
ported from the guide.

A state of another model must not load; a config carrying other functions
must not be silently ignored; the guide's natural code gets an error that
says what to add. Each case asserts the clear error or the exact result.
"""

from __future__ import annotations

import dataclasses
import warnings

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_fn.training.callbacks import Callback
from artifex_fn.training import (
    CompositeReward,
    ConstantReward,
    DPOTrainer,
    GRPOTrainer,
    PPOTrainer,
    REINFORCETrainer,
    VAETrainer,
)
from artifex_fn.dpo import DPOConfig
from artifex_fn.grpo import GRPOConfig
from artifex_fn.ppo import PPOConfig
from artifex_fn.reinforce import REINFORCEConfig
from artifex_fn.families.vae import VAEConfig


class Linear(nnx.Module):
    """Logits of a categorical policy over ``n_out`` actions."""

    def __init__(self, n_in, n_out, rngs):
        self.layer = nnx.Linear(n_in, n_out, rngs=rngs)

    def __call__(self, obs):
        return self.layer(obs)


def _trainer(n_out=4, seed=0, cls=REINFORCETrainer, config=None, **kw):
    model = Linear(2, n_out, nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    return cls(model, opt, config if config is not None else
               cls.config_type(), **kw)


OBS = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)), jnp.float32)
BATCH = dict(observations=OBS, actions=jnp.arange(6) % 4,
             rewards=jnp.linspace(-1.0, 1.0, 6))


# --------------------------------------------------------------------------
# load_state_dict
# --------------------------------------------------------------------------


def test_state_of_another_model_does_not_load():
    """The state of a Linear(2, 8) trainer into a Linear(2, 4) one: an
    error naming the array and both shapes, and nothing written."""
    wide, narrow = _trainer(n_out=8), _trainer(n_out=4)
    before = jax.tree_util.tree_map(np.asarray, narrow.state_dict())
    with pytest.raises(ValueError, match=r"state\['params'\]\['layer'\]"
                                         r"\['bias'\] has shape \(8,\).*"
                                         r"this trainer's has \(4,\)"):
        narrow.load_state_dict(wide.state_dict())
    after = jax.tree_util.tree_map(np.asarray, narrow.state_dict())
    for a, b in zip(jax.tree_util.tree_leaves(before),
                    jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_state_with_other_dtype_or_structure_does_not_load():
    trainer = _trainer()
    state = trainer.state_dict()
    as_f64 = dict(state, params=jax.tree_util.tree_map(
        lambda x: np.asarray(x, np.float64), state["params"]))
    with pytest.raises(ValueError, match="dtype float64.*float32"):
        trainer.load_state_dict(as_f64)
    other_opt = dict(state, opt_state=_trainer(cls=REINFORCETrainer)
                     .state_dict()["params"])
    with pytest.raises(ValueError, match=r"state\['opt_state'\] does not "
                                         r"have the structure"):
        trainer.load_state_dict(other_opt)
    with pytest.raises(ValueError, match=r"unknown entries \['ema'\]"):
        trainer.load_state_dict(dict(state, ema=1.0))
    with pytest.raises(ValueError, match=r"state\['step'\] must be an "
                                         r"integer"):
        trainer.load_state_dict(dict(state, step=1.5))
    with pytest.raises(ValueError, match=r"missing \['key'\]"):
        trainer.load_state_dict({k: v for k, v in state.items()
                                 if k != "key"})
    with pytest.raises(TypeError, match="must be a dict"):
        trainer.load_state_dict([state])


def test_state_round_trip_is_exact():
    a, b = _trainer(seed=0), _trainer(seed=1)
    for _ in range(2):
        a.train_step(BATCH)
    b.load_state_dict(a.state_dict())
    assert b.step == a.step == 2
    np.testing.assert_array_equal(a.train_step(BATCH)["loss"],
                                  b.train_step(BATCH)["loss"])


# --------------------------------------------------------------------------
# Replacing the config
# --------------------------------------------------------------------------


def test_new_numbers_take_effect_new_functions_raise():
    trainer = _trainer()
    trainer.config = dataclasses.replace(trainer.config, entropy_coeff=0.5)
    assert trainer.config.entropy_coeff == 0.5
    with pytest.raises(ValueError, match=r"config.optimizer` cannot change"
                                         r".*new trainer"):
        trainer.config = dataclasses.replace(trainer.config,
                                             optimizer=optax.sgd(1.0))
    with pytest.raises(ValueError, match=r"config.policy` cannot change"):
        trainer.config = dataclasses.replace(
            trainer.config, policy=lambda params, obs: obs)
    with pytest.raises(TypeError, match="must stay a REINFORCEConfig"):
        trainer.config = PPOConfig()
    with pytest.raises(ValueError, match="gamma"):
        trainer.config = dataclasses.replace(trainer.config, gamma=1.5)
    assert trainer.config.entropy_coeff == 0.5   # the last good one stays
    vae = _vae_trainer()
    with pytest.raises(ValueError, match=r"config.encode` cannot change"):
        vae.config = dataclasses.replace(vae.config, encode=lambda p, x: x)


class _VAE(nnx.Module):
    def __init__(self, rngs):
        self.enc = nnx.Linear(4, 4, rngs=rngs)
        self.dec = nnx.Linear(2, 4, rngs=rngs)

    def encode(self, x):
        return tuple(jnp.split(self.enc(x), 2, axis=-1))

    def decode(self, z):
        return self.dec(z)


def _vae_trainer():
    model = _VAE(nnx.Rngs(0))
    return VAETrainer(model, nnx.Optimizer(model, optax.adam(1e-3),
                                           wrt=nnx.Param), VAEConfig())


# --------------------------------------------------------------------------
# Porting from the guide
# --------------------------------------------------------------------------


def test_composite_reward_averages_by_default():
    """Equal weights that sum to one: adding a part does not scale it."""
    samples = jnp.zeros((3, 2))
    two = CompositeReward(reward_fns=[ConstantReward(1.0),
                                      ConstantReward(3.0)])
    np.testing.assert_allclose(two(samples), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(np.sum(two.weights), 1.0)
    weighted = CompositeReward(reward_fns=[ConstantReward(1.0),
                                           ConstantReward(3.0)],
                               weights=[0.3, 0.7])
    np.testing.assert_allclose(weighted(samples), [2.4] * 3, rtol=1e-6)


def test_dpo_token_arrays_get_the_expected_structure():
    trainer = _trainer(cls=DPOTrainer, config=DPOConfig(reference_free=True))
    tokens = jnp.zeros((4, 6), jnp.int32)
    with pytest.raises(TypeError, match=r"batch\['chosen'\] must be a dict "
                                        r"with 'observations'.*an array of "
                                        r"shape \(4, 6\)"):
        trainer.train_step({"chosen": tokens, "rejected": tokens})


def test_callback_with_an_unknown_hook_warns():
    with pytest.warns(UserWarning, match=r"\['on_batch_end', "
                                         r"'on_epoch_end'\].*never call"):
        class Legacy(Callback):
            def on_batch_end(self, trainer, metrics, step):
                pass

            def on_epoch_end(self, trainer):
                pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class Fine(Callback):
            def on_train_batch_end(self, trainer, metrics, step):
                pass

            def helper(self):
                pass
    assert Legacy and Fine


class NoiseToSample(nnx.Module):
    """A diffusion-style network: ``__call__(x, t)``."""

    def __init__(self, rngs):
        self.layer = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x, t):
        return self.layer(jnp.concatenate([x, t[:, None]], axis=-1))


class Generator(nnx.Module):
    """A GAN-style generator: ``__call__`` returns samples."""

    def __init__(self, rngs):
        self.layer = nnx.Linear(2, 2, rngs=rngs)

    def __call__(self, z):
        return self.layer(z)


def test_a_model_without_a_policy_gets_an_example_to_add():
    model = NoiseToSample(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    with pytest.raises(TypeError, match=r"takes other arguments \(x, t\)"
                                        r"[\s\S]*def policy_outputs\(self, "
                                        r"observations\)"):
        GRPOTrainer(model, opt, GRPOConfig())
    gen = Generator(nnx.Rngs(0))
    trainer = REINFORCETrainer(gen, nnx.Optimizer(gen, optax.adam(1e-3),
                                                  wrt=nnx.Param),
                               REINFORCEConfig())
    z = jnp.ones((4, 2))
    with pytest.raises(ValueError, match=r"integer ids of shape \(4,\)"
                                         r"[\s\S]*policy_outputs"):
        trainer.train_step(dict(observations=z, actions=gen(z),
                                rewards=jnp.ones(4)))


class Encoder(nnx.Module):
    """A VAE-style encoder: ``__call__`` returns (mean, log-variance)."""

    def __init__(self, rngs):
        self.layer = nnx.Linear(2, 4, rngs=rngs)

    def __call__(self, x):
        return tuple(jnp.split(self.layer(x), 2, axis=-1))


def test_ppo_model_without_a_value_head_gets_an_example():
    batch = dict(observations=OBS, actions=jnp.arange(6) % 2,
                 rewards=jnp.ones(6), values=jnp.zeros(6),
                 log_probs=jnp.zeros(6))
    trainer = _trainer(cls=PPOTrainer, config=PPOConfig(num_epochs=1))
    with pytest.raises(ValueError, match=r"\(distribution or logits, value\)"
                                         r"[\s\S]*an array of shape \(6, 4\)"
                                         r"[\s\S]*self.value_head"):
        trainer.train_step(batch)
    encoder = Encoder(nnx.Rngs(0))
    trainer = PPOTrainer(encoder, nnx.Optimizer(encoder, optax.adam(1e-3),
                                                wrt=nnx.Param),
                         PPOConfig(num_epochs=1))
    with pytest.raises(ValueError, match=r"one value per sample.*a tuple of "
                                         r"2: an array of shape \(6, 2\), an "
                                         r"array of shape \(6, 2\)"):
        trainer.train_step(batch)


class GaussianGenerator(nnx.Module):
    """The generator made a policy: ``policy_outputs`` gives the
    distribution it samples from."""

    def __init__(self, rngs):
        self.layer = nnx.Linear(2, 2, rngs=rngs)
        self.log_std = nnx.Param(jnp.zeros(2))

    def __call__(self, z):
        return self.layer(z)

    def policy_outputs(self, z):
        return distrax.MultivariateNormalDiag(self.layer(z),
                                              jnp.exp(self.log_std[...]))


def test_the_suggested_fix_works():
    gen = GaussianGenerator(nnx.Rngs(0))
    trainer = REINFORCETrainer(gen, nnx.Optimizer(gen, optax.adam(1e-2),
                                                  wrt=nnx.Param),
                               REINFORCEConfig())
    z = jnp.ones((4, 2))
    metrics = trainer.train_step(dict(observations=z, actions=gen(z) + 0.1,
                                      rewards=jnp.arange(4.0)))
    assert np.isfinite(metrics["loss"])
