"""One way for config into a compiled step, the same for all ten trainers.

For each trainer: a step with the same config compiles nothing; a config
whose numbers differ takes effect on the next step (other parameters)
without compiling; a config whose static (shape-fixing) fields differ
compiles once, and the step after it nothing; a config carrying another
function raises. Compilations are counted with ``jax.monitoring``'s
backend-compile events.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_fn.dpo import DPOConfig
from artifex_fn.families.autoregressive import AutoregressiveConfig
from artifex_fn.families.diffusion import DiffusionConfig
from artifex_fn.families.energy import EnergyConfig
from artifex_fn.families.flow import FlowConfig
from artifex_fn.families.gan import GANConfig
from artifex_fn.families.vae import VAEConfig
from artifex_fn.grpo import GRPOConfig
from artifex_fn.ppo import PPOConfig
from artifex_fn.reinforce import REINFORCEConfig
from artifex_fn.training import (AutoregressiveTrainer, DiffusionTrainer,
                                 DPOTrainer, EnergyTrainer, FlowTrainer,
                                 GANTrainer, GRPOTrainer, PPOTrainer,
                                 REINFORCETrainer, VAETrainer)

_COMPILES = [0]
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: _COMPILES.__setitem__(0, _COMPILES[0] + 1)
    if name == "/jax/core/compile/backend_compile_duration" else None)


@contextlib.contextmanager
def compiles():
    box = [None]
    start = _COMPILES[0]
    yield box
    box[0] = _COMPILES[0] - start


D, A, B = 4, 3, 16


class Policy(nnx.Module):
    def __init__(self, rngs, value=False):
        self.body = nnx.Linear(D, A, rngs=rngs)
        self.v = nnx.Linear(D, 1, rngs=rngs) if value else None

    def __call__(self, x):
        logits = self.body(x)
        return logits if self.v is None else (logits, self.v(x)[..., 0])


class VAE(nnx.Module):
    latent_dim = 2

    def __init__(self, rngs):
        self.mean = nnx.Linear(D, 2, rngs=rngs)
        self.log_var = nnx.Linear(D, 2, rngs=rngs)
        self.dec = nnx.Linear(2, D, rngs=rngs)

    def encode(self, x):
        return self.mean(x), self.log_var(x)

    def decode(self, z):
        return self.dec(z)


class Field(nnx.Module):
    """``model(x_t, t)``: diffusion noise or flow velocity."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(D + 1, D, rngs=rngs)

    def __call__(self, x, t):
        t = jnp.broadcast_to(jnp.reshape(t, (-1, 1)), (x.shape[0], 1))
        return self.lin(jnp.concatenate([x, t.astype(x.dtype)], -1))


class Energy(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(D, 1, rngs=rngs)

    def __call__(self, x):
        return jnp.sum(self.lin(x) ** 2, -1)


class Bigram(nnx.Module):
    def __init__(self, rngs, vocab=6):
        self.embed = nnx.Embed(vocab, 8, rngs=rngs)
        self.out = nnx.Linear(8, vocab, rngs=rngs)

    def __call__(self, tokens):
        return self.out(self.embed(tokens))


def _opt(model):
    return nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)


def _rl_data():
    k = jax.random.split(jax.random.key(0), 4)
    return dict(observations=jax.random.normal(k[0], (B, D)),
                actions=jax.random.randint(k[1], (B,), 0, A),
                rewards=jax.random.normal(k[2], (B,)),
                log_probs=-1.0 + 0.3 * jax.random.normal(k[3], (B,)))


def _x():
    return jax.random.uniform(jax.random.key(1), (B, D))


def reinforce():
    m = Policy(nnx.Rngs(0))
    d = _rl_data()
    batch = {k: d[k] for k in ("observations", "actions", "rewards")}
    return (REINFORCETrainer(m, _opt(m), REINFORCEConfig()), batch,
            dict(entropy_coeff=0.5), dict(num_micro_batches=2))


def ppo():
    m = Policy(nnx.Rngs(0), value=True)
    k = jax.random.split(jax.random.key(2), 4)
    t = 4
    batch = dict(observations=jax.random.normal(k[0], (B, t, D)),
                 actions=jax.random.randint(k[1], (B, t), 0, A),
                 rewards=jax.random.normal(k[2], (B, t)),
                 log_probs=-1.0 + 0.1 * jax.random.normal(k[3], (B, t)),
                 values=jnp.zeros((B, t)),
                 dones=jnp.zeros((B, t)).at[:, -1].set(1.0))
    return (PPOTrainer(m, _opt(m), PPOConfig(num_minibatches=4)), batch,
            dict(vf_coeff=2.0), dict(num_minibatches=2))


def grpo():
    m = Policy(nnx.Rngs(0))
    batch = dict(_rl_data(), ref_log_probs=jnp.full((B,), -2.0))
    return (GRPOTrainer(m, _opt(m), GRPOConfig(num_generations=4)),
            batch, dict(beta=0.5), dict(num_generations=8))


def dpo():
    m = Policy(nnx.Rngs(0))
    d = _rl_data()
    side = lambda a: dict(observations=d["observations"], actions=a)
    batch = dict(chosen=side(d["actions"]),
                 rejected=side((d["actions"] + 1) % A))
    return (DPOTrainer(m, _opt(m), DPOConfig(reference_free=True)), batch,
            dict(beta=0.5), dict(num_micro_batches=2))


def vae():
    m = VAE(nnx.Rngs(0))
    return (VAETrainer(m, _opt(m), VAEConfig(), key=0), _x(),
            dict(beta=0.2), dict(likelihood="gaussian"))


def gan():
    g, d = nnx.Linear(2, D, rngs=nnx.Rngs(0)), nnx.Linear(D, 1,
                                                          rngs=nnx.Rngs(1))
    trainer = GANTrainer(g, _opt(g), GANConfig(max_grad_norm=10.0),
                         discriminator=d, d_optimizer=_opt(d), key=0)
    return trainer, _x(), dict(max_grad_norm=1e-3), dict(d_steps=2)


def diffusion():
    m = Field(nnx.Rngs(0))
    return (DiffusionTrainer(m, _opt(m), DiffusionConfig(num_timesteps=20),
                             key=0), _x(), dict(beta_end=0.2),
            dict(num_timesteps=30))


def flow():
    m = Field(nnx.Rngs(0))
    return (FlowTrainer(m, _opt(m), FlowConfig(), key=0), _x(),
            dict(sigma_min=0.5), dict(path="ot", ot_iters=5))


def energy():
    m = Energy(nnx.Rngs(0))
    return (EnergyTrainer(m, _opt(m), EnergyConfig(num_langevin_steps=3),
                          key=0), _x(), dict(alpha=5.0),
            dict(num_langevin_steps=4))


def autoregressive():
    m = Bigram(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (B, 6), 1, 6)
    return (AutoregressiveTrainer(m, _opt(m), AutoregressiveConfig(), key=0),
            dict(tokens=tokens), dict(label_smoothing=0.3),
            dict(pad_token_id=1))


TRAINERS = [reinforce, ppo, grpo, dpo, vae, gan, diffusion, flow, energy,
            autoregressive]


def _params(trainer):
    state = trainer.state_dict()
    return jax.tree_util.tree_leaves(
        (state["params"], state.get("d_params")))


@pytest.mark.parametrize("make", TRAINERS, ids=lambda f: f.__name__)
def test_numbers_traced_statics_compile_once_functions_raise(make):
    trainer, batch, numbers, statics = make()
    config = trainer.config
    start = trainer.state_dict()
    trainer.train_step(batch)
    before = _params(trainer)

    with compiles() as same:
        trainer.load_state_dict(start)
        trainer.train_step(batch)
    assert same[0] == 0
    for a, b in zip(before, _params(trainer)):
        np.testing.assert_array_equal(a, b)

    with compiles() as numeric:
        trainer.load_state_dict(start)
        trainer.config = dataclasses.replace(config, **numbers)
        trainer.train_step(batch)
    assert numeric[0] == 0
    changed = max(float(jnp.max(jnp.abs(a - b)))
                  for a, b in zip(before, _params(trainer)))
    assert changed > 1e-6, "the new numbers did not take effect"

    trainer.config = dataclasses.replace(config, **statics)
    with compiles() as first:
        trainer.train_step(batch)
    with compiles() as second:
        trainer.train_step(batch)
    assert first[0] >= 1 and second[0] == 0
    # one compiled function per trainer step, except the energy trainer's
    # separate Langevin sampler
    assert first[0] <= (2 if make is energy else 1)

    name = ("g_optimizer" if make is gan else "optimizer")
    with pytest.raises(ValueError, match="build a new trainer"):
        trainer.config = dataclasses.replace(config,
                                             **{name: optax.sgd(0.1)})


@pytest.mark.parametrize("make", [vae, diffusion, flow, autoregressive],
                         ids=lambda f: f.__name__)
def test_max_grad_norm_clips_the_gradient_everywhere(make):
    """The family trainers accept ``max_grad_norm`` and it means what it
    means in the RL configs: the gradient clipped to that global norm
    before the optimiser (SGD here, so the step is ``-lr * clipped``)."""
    trainer, batch, _, _ = make()
    model = trainer.model
    tx = optax.sgd(1.0)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    cls = type(trainer)
    cfg = dataclasses.replace(trainer.config, max_grad_norm=1e-3)
    trainer = cls(model, opt, cfg, key=0)
    before = jax.tree_util.tree_leaves(trainer.state_dict()["params"])
    metrics = trainer.train_step(batch)
    after = jax.tree_util.tree_leaves(trainer.state_dict()["params"])
    step = float(optax.tree.norm([a - b for a, b in zip(after, before)]))
    assert float(metrics["grad_norm"]) > 1e-2
    np.testing.assert_allclose(step, 1e-3, rtol=1e-3)


def test_a_user_subclass_may_hold_any_config_object():
    """Without a ``config_type`` the config is not passed into the compiled
    step (it may be any object, here a plain class); ``compute_loss``
    reads ``self.config``."""
    from artifex_fn.training import Trainer

    class Plain:
        scale = 2.0

    class Regression(Trainer):
        def compute_loss(self, model, batch, key):
            err = model(batch["x"]) - batch["y"]
            return self.config.scale * jnp.mean(err ** 2), {}

    model = nnx.Linear(D, 1, rngs=nnx.Rngs(0))
    trainer = Regression(model, _opt(model), Plain())
    batch = dict(x=_x(), y=jnp.ones((B, 1)))
    first = float(trainer.train_step(batch)["loss"])
    assert np.isfinite(first)
    assert float(trainer.train_step(batch)["loss"]) < first
