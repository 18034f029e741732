"""NNX trainer for GANs: one compiled discriminator + generator step.

The generator is an ``nnx.Module`` whose ``__call__(z [B, D])`` returns
samples ``[B, ...]``; the discriminator's ``__call__(x)`` returns logits
``[B]`` or ``[B, 1]``. Each has its own ``nnx.Optimizer``.
``train_step(x)`` reads both models' variables, runs
:func:`artifex_fn.families.gan.update` (``d_steps`` discriminator steps,
then one generator step) under one ``jax.jit``, and writes the results
back. Variables outside the optimisers' ``wrt`` filters (batch statistics,
RNG counters) are passed to the models read-only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from artifex_fn import TrainState
from artifex_fn.families import gan as _gan
from artifex_fn.training.trainers.base import Trainer
from artifex_fn.training.trainers.base import bind_model_and_optimizer
from artifex_fn.training.trainers.base import check_optimizer_type
from artifex_fn.training.trainers.base import key_data

_D_KEYS = ("d_params", "d_rest", "d_opt_state", "d_optimizer_step")


def _apply(graphdef, rest, params, inputs):
    """``module(inputs)`` on the module rebuilt from its variables."""
    return nnx.merge(graphdef, params, rest)(inputs)


class GANTrainer(Trainer):
    """Trains an NNX generator and discriminator with alternating steps.

    Args:
      generator: ``nnx.Module``, ``generator(z [B, latent_dim]) -> x``;
        becomes ``trainer.model``.
      g_optimizer: ``nnx.Optimizer(generator, tx, wrt=nnx.Param)``.
      config: :class:`GANConfig` with ``generator``, ``discriminator``,
        ``g_optimizer`` and ``d_optimizer`` left None (the trainer fills
        them from the modules and optimisers). Default: ``GANConfig()``
        with ``latent_dim`` from ``generator.latent_dim`` when it exists.
      discriminator: ``nnx.Module``, ``discriminator(x) -> logits [B]``.
      d_optimizer: ``nnx.Optimizer(discriminator, tx, wrt=nnx.Param)``.
      key: seed or PRNG key for the noise.

    ``train_step(batch)`` takes real data ``x [B, ...]`` or ``{"x": x}``
    and returns device metrics ``loss, d_loss, g_loss, real_logit,
    fake_logit, d_accuracy, d_grad_norm, g_grad_norm``. :meth:`state_dict`
    holds both players.

    Example::

        trainer = GANTrainer(
            gen, nnx.Optimizer(gen, optax.adam(1e-3), wrt=nnx.Param),
            GANConfig(loss_type="hinge", latent_dim=8),
            discriminator=disc,
            d_optimizer=nnx.Optimizer(disc, optax.adam(1e-3), wrt=nnx.Param))
        trainer.fit(batches)
        x = trainer.sample(256)
    """

    config_type = _gan.GANConfig
    model_fields = ("generator", "discriminator")
    model_fields_hint = "the trainer calls the modules"
    optimizer_field = "g_optimizer"

    def __init__(self, generator, g_optimizer, config=None, *, discriminator,
                 d_optimizer, key=None):
        if config is None:
            config = _gan.GANConfig(
                latent_dim=int(getattr(generator, "latent_dim", 2)))
        if not isinstance(discriminator, nnx.Module):
            raise TypeError("`discriminator` must be a flax.nnx.Module, got "
                            f"{type(discriminator).__name__}.")
        check_optimizer_type("d_optimizer", d_optimizer)
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        super().__init__(generator, g_optimizer, config, key=key)
        self.d_graphdef = nnx.graphdef(discriminator)
        (self._d_params, self._d_rest, self._d_opt_state,
         self._d_opt_step) = bind_model_and_optimizer(
             discriminator, d_optimizer,
             names=("d_optimizer", "discriminator"))
        self._step_fn = jax.jit(self._pure_step)
        self._loss_fn = jax.jit(self._pure_loss)
        self._sample_fn = jax.jit(self._pure_sample,
                                  static_argnames=("num_samples",))

    def _other_optimizers(self):
        return {"d_optimizer": self.d_optimizer}

    # -- configs ----------------------------------------------------------
    def _full_config(self, config, g_rest, d_rest):
        return dataclasses.replace(
            config,
            generator=functools.partial(_apply, self.graphdef, g_rest),
            discriminator=functools.partial(_apply, self.d_graphdef, d_rest),
            g_optimizer=self.optimizer.tx, d_optimizer=self.d_optimizer.tx)

    def _read_d(self):
        return (self._d_params.read(), self._d_rest.read(),
                self._d_opt_state.read(), self._d_opt_step.read())

    # -- compiled pieces --------------------------------------------------
    def _pure_step(self, g_state, d_state, step, key, config, batch):
        g_params, g_rest, g_opt, g_opt_step = g_state
        d_params, d_rest, d_opt, d_opt_step = d_state
        state = TrainState(
            params=dict(generator=g_params, discriminator=d_params),
            opt_state=dict(generator=g_opt, discriminator=d_opt),
            step=step, key=key, ref_params=None,
            config=self._full_config(config, g_rest, d_rest))
        new, metrics = _gan.update(state, batch)
        return (new.params["generator"], new.opt_state["generator"],
                g_opt_step + 1, new.params["discriminator"],
                new.opt_state["discriminator"], d_opt_step + config.d_steps,
                new.key, metrics)

    def _pure_loss(self, g_params, g_rest, d_params, d_rest, config, batch,
                   key):
        params = dict(generator=g_params, discriminator=d_params)
        return _gan.loss(params, batch,
                         self._full_config(config, g_rest, d_rest), key)

    def _pure_sample(self, g_params, g_rest, config, key, *, num_samples):
        cfg = dataclasses.replace(
            config, generator=functools.partial(_apply, self.graphdef, g_rest))
        return _gan.sample(g_params, cfg, key, num_samples=num_samples)

    # -- host side --------------------------------------------------------
    def train_step(self, batch, *args, **kwargs) -> dict[str, jax.Array]:
        """``d_steps`` discriminator steps then one generator step."""
        if args or kwargs:
            raise TypeError("GANTrainer.train_step takes only the batch.")
        if isinstance(batch, dict) and "x" not in batch:
            raise ValueError("batch is missing the key 'x'.")
        batch = self._place_batch(batch)
        g_state, d_state = self._read(), self._read_d()
        (g_params, g_opt, g_opt_step, d_params, d_opt, d_opt_step, self.key,
         metrics) = self._step_fn(g_state, d_state, np.int32(self.step),
                                  self.key, self.config_arg(), batch)
        self._write(g_params, g_opt, g_opt_step)
        self._d_params.write(d_params)
        self._d_opt_state.write(d_opt)
        self._d_opt_step.write(d_opt_step)
        self.step += 1
        return metrics

    def compute_loss(self, model, batch, key=None):
        """Both losses of generator ``model`` against the bound discriminator.

        Returns ``(d_loss + g_loss, metrics)`` (see
        :func:`artifex_fn.families.gan.loss`); nothing is updated. ``key``
        (default: split from the trainer's key) draws the noise.
        """
        if key is None:
            self.key, key = jax.random.split(self.key)
        wrt = self.optimizer.wrt
        g_params = nnx.as_pure(nnx.state(model, wrt))
        g_rest = nnx.as_pure(nnx.state(model, nnx.Not(wrt)))
        return self._loss_fn(g_params, g_rest, self._d_params.read(),
                             self._d_rest.read(), self.config_arg(), batch,
                             key_data(key))

    def sample(self, n: int, key=None) -> jax.Array:
        """``n`` generator samples ``G(z)``, ``z ~ N(0, I)``.

        Args:
          n: number of samples.
          key: seed or PRNG key (default: split from the trainer's key).
        """
        if key is None:
            self.key, key = jax.random.split(self.key)
        g_params, g_rest, _, _ = self._read()
        return self._sample_fn(g_params, g_rest, self.config_arg(),
                               key_data(key), num_samples=int(n))

    generate = sample

    # -- checkpoints ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Both players' state: the base keys (generator) plus ``d_params``,
        ``d_rest``, ``d_opt_state`` and ``d_optimizer_step``."""
        state = super().state_dict()
        state.update(zip(_D_KEYS, self._read_d()))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output into both models/optimisers."""
        missing = {"d_params", "d_opt_state"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}.")
        super().load_state_dict(state)
        self._d_params.write(state["d_params"])
        self._d_opt_state.write(state["d_opt_state"])
        if "d_optimizer_step" in state:
            self._d_opt_step.write(jnp.asarray(state["d_optimizer_step"]))
        if state.get("d_rest") is not None:
            self._d_rest.write(state["d_rest"])
