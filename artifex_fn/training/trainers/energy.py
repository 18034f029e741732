"""NNX trainer for energy-based models (contrastive divergence).

The model is an ``nnx.Module`` mapping data ``x [B, ...]`` to energies
``[B]``: its ``energy(x)`` method if the class defines one, else
``model(x)``. Each :meth:`EnergyTrainer.train_step` samples negatives with
Langevin dynamics from the current model (one compiled call, no gradient),
optionally keeps them in a replay buffer, and takes one compiled gradient
step on the CD loss of :mod:`artifex_fn.families.energy`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from artifex_fn.checks import check_int
from artifex_fn.families import energy as _energy
from artifex_fn.training.trainers.base import Trainer
from artifex_fn.training.trainers.base import data_batch
from artifex_fn.training.trainers.base import key_data


def _call(model, x):
    return model(x)


def _call_energy(model, x):
    return model.energy(x)


class EnergyTrainer(Trainer):
    """Contrastive-divergence training of an NNX energy model.

    Args:
      model: ``nnx.Module``; ``model.energy(x)`` (if defined) or
        ``model(x)`` returns energies ``[B]`` for data ``x [B, ...]``.
      optimizer: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
      config: :class:`~artifex_fn.families.energy.EnergyConfig` with
        ``apply`` and ``optimizer`` None (the model is the energy; the
        optimiser's ``tx``); ``max_grad_norm`` clips the gradient.
      buffer_size: size of the replay buffer used when
        ``config.persistent > 0``.
      data_shape: shape of one sample; inferred from the first batch when
        omitted (needed by :meth:`sample_negatives` before training).
      key: seed or PRNG key (Langevin noise, buffer writes).

    ``train_step(batch)`` with ``{"x": [B, ...]}`` (or the array). Metrics:
    ``loss, cd_loss, reg_loss, energy_pos, energy_neg, energy_gap,
    grad_norm``. Numeric fields of the config are traced: assigning a new
    config does not recompile (a new ``num_langevin_steps`` compiles once).
    """

    config_type = _energy.EnergyConfig
    model_fields = ("apply",)
    model_fields_hint = ("the trainer's energy is the model (define "
                         "`energy(x)` or `__call__(x)`)")

    def __init__(self, model, optimizer, config=None, *,
                 buffer_size: int = 10_000,
                 data_shape: tuple[int, ...] | None = None, key=None):
        check_int(buffer_size, "buffer_size", lo=1)
        super().__init__(model, optimizer, config, key=key)
        self.apply_fn = (_call_energy if callable(
            getattr(type(model), "energy", None)) else _call)
        self.buffer_size = buffer_size
        self.data_shape = None if data_shape is None else tuple(data_shape)
        self.buffer = None
        self._sample = jax.jit(self._pure_sample,
                               static_argnames=("n", "shape", "num_steps"))
        self._push = jax.jit(_energy.push_to_buffer)

    # -- pure pieces --------------------------------------------------------
    def _full_config(self, config):
        return dataclasses.replace(config, apply=self.apply_fn)

    def _pure_sample(self, params, rest, config, key, buffer, *, n, shape,
                     num_steps):
        model = nnx.merge(self.graphdef, params, rest)
        return _energy.sample_negatives(
            model, self._full_config(config), key, n, shape, buffer=buffer,
            num_steps=num_steps)

    def loss_and_metrics(self, model, batch, key, config, step):
        """CD loss of ``model`` on ``{"x", "negatives"?}``."""
        del step
        return _energy.loss(model, batch, self._full_config(config), key)

    def compute_loss(self, model, batch, key):
        """CD loss of ``model`` on ``{"x", "negatives"?}``."""
        return self.loss_and_metrics(model, batch, key, self.config_arg(),
                                     None)

    # -- host side ------------------------------------------------------------
    def _uses_buffer(self) -> bool:
        p = self.config.persistent
        return not (isinstance(p, (int, float)) and p == 0)

    def _draw(self, n, key, num_steps, buffer):
        if self.data_shape is None:
            raise ValueError(
                "the data shape is unknown: pass `data_shape=` to the "
                "trainer or run a train_step first.")
        params, rest, _, _ = self._read()
        return self._sample(params, rest, self.config_arg(), key, buffer, n=n,
                            shape=self.data_shape, num_steps=num_steps)

    def sample_negatives(self, n: int, key=None, *,
                         num_steps: int | None = None,
                         use_buffer: bool = False) -> jax.Array:
        """``n`` Langevin samples ``[n, *data_shape]`` from the model.

        Args:
          n: number of chains.
          key: PRNG key (default: split from the trainer's key).
          num_steps: Langevin steps (default ``config.num_langevin_steps``).
          use_buffer: start a ``config.persistent`` fraction of the chains
            from the replay buffer (if there is one), as in training.
        """
        check_int(n, "n", lo=1)
        if key is None:
            self.key, key = jax.random.split(self.key)
        else:
            key = key_data(key)
        buffer = self.buffer if use_buffer else None
        steps = self.config.num_langevin_steps if num_steps is None else num_steps
        return self._draw(n, key, steps, buffer)

    def train_step(self, batch) -> dict[str, jax.Array]:
        """Samples negatives, updates the buffer, takes one CD step."""
        batch = self._place_batch(batch)
        x = data_batch(batch)["x"]
        if self.data_shape is None:
            self.data_shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"`x` must be [B, {self.data_shape}], got "
                             f"{tuple(x.shape)}.")
        self.key, k_neg, k_push, k_buf = jax.random.split(self.key, 4)
        if self._uses_buffer() and self.buffer is None:
            self.buffer = self.config.init_scale * jax.random.uniform(
                k_buf, (self.buffer_size,) + self.data_shape, jnp.float32,
                -1.0, 1.0)
        buffer = self.buffer if self._uses_buffer() else None
        neg = self._draw(x.shape[0], k_neg, self.config.num_langevin_steps,
                         buffer)
        if buffer is not None:
            self.buffer = self._push(buffer, neg[:self.buffer_size], k_push)
        return super().train_step(dict(x=x, negatives=neg))
