"""NNX trainer for denoising diffusion models over the pure DDPM loss.

The model is an ``nnx.Module`` whose ``__call__(x_t [B, ...], t int32 [B])``
returns the predicted noise ``eps_hat [B, ...]``. Each ``train_step`` is one
compiled gradient step on :func:`artifex_fn.families.diffusion.loss` (Ho et
al. 2020) followed by an update of the exponential moving average of the
parameters, which the trainer keeps in ``trainer.ema_params`` (and in its
``state_dict``). :meth:`DiffusionTrainer.sample` runs the ancestral
sampler; :meth:`DiffusionTrainer.ema_model` returns a module carrying the
averaged weights (e.g. as the frozen reference of a DDPO/GRPO fine-tune).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from artifex_fn.families import diffusion as _diffusion
from artifex_fn.training.trainers.base import Trainer
from artifex_fn.training.trainers.base import data_batch
from artifex_fn.training.trainers.base import key_data


def _model_apply(model, x_t, t):
    return model(x_t, t)


def _ema_step(ema, params, ema_decay, step):
    decay = _diffusion.ema_decay_at(ema_decay, step)
    return _diffusion.ema_update(ema, params, decay), decay


class DiffusionTrainer(Trainer):
    """Trains an NNX noise-prediction network with DDPM's simple loss.

    Args:
      model: ``nnx.Module`` with ``model(x_t, t) -> eps_hat``; an optional
        ``data_shape`` attribute is the default shape of one sample.
      optimizer: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
      config: :class:`~artifex_fn.families.diffusion.DiffusionConfig` with
        ``apply`` and ``optimizer`` left None; ``max_grad_norm`` clips the
        gradient. Its numeric fields are traced, so assigning a new config
        with other betas or EMA decay does not recompile.
      key: seed or PRNG key for the timesteps and noise of each step.

    Attributes:
      ema_params: the moving average of the trainable variables (same
        structure as ``nnx.state(model, nnx.Param)``), updated after every
        step with decay ``ema_decay_at(config.ema_decay, step)``.

    ``train_step(batch)`` takes ``x0 [B, ...]`` or ``{"x": x0}`` (optionally
    with ``t`` and ``noise``) and returns device metrics ``loss, grad_norm,
    ema_decay``.

    Example::

        trainer = DiffusionTrainer(model, nnx.Optimizer(
            model, optax.adam(1e-3), wrt=nnx.Param),
            DiffusionConfig(num_timesteps=50, schedule="cosine"))
        for x in batches:
            trainer.train_step(x)
        samples = trainer.sample(512, key=0, shape=(2,))
    """

    config_type = _diffusion.DiffusionConfig
    model_fields = ("apply",)
    model_fields_hint = "the trainer calls `model(x_t, t)`"

    def __init__(self, model, optimizer, config=None, *, key=None):
        super().__init__(model, optimizer, config, key=key)
        self.ema_params = self._params.read()
        self._ema = jax.jit(_ema_step)
        self._sample = jax.jit(self._pure_sample, static_argnames=(
            "n", "shape", "variance"))

    # -- the step ---------------------------------------------------------
    def loss_and_metrics(self, model, batch, key, config, step):
        """The DDPM simple loss of ``model``."""
        del step
        config = dataclasses.replace(config, apply=_model_apply)
        return _diffusion.loss(model, data_batch(batch), config, key)

    def compute_loss(self, model, batch, key):
        """``(loss, metrics)`` of the pure DDPM loss for ``model``."""
        return self.loss_and_metrics(model, batch, key, self.config_arg(),
                                     None)

    def train_step(self, batch, *args, **kwargs) -> dict[str, jax.Array]:
        """One compiled DDPM step on ``x0`` or ``{"x": x0, ...}``, then EMA."""
        step = np.int32(self.step)
        metrics = super().train_step(batch, *args, **kwargs)
        self.ema_params, decay = self._ema(
            self.ema_params, self._params.read(), self.config_arg().ema_decay,
            step)
        return dict(metrics, ema_decay=decay)

    # -- state ------------------------------------------------------------
    def state_dict(self):
        """The base trainer's state plus ``ema_params``."""
        return dict(super().state_dict(), ema_params=self.ema_params)

    def load_state_dict(self, state) -> None:
        """Restores :meth:`state_dict` output (``ema_params`` included)."""
        super().load_state_dict(state)
        self.ema_params = state.get("ema_params", self._params.read())

    def ema_model(self) -> nnx.Module:
        """A new module like ``model`` carrying the averaged weights."""
        _, rest, _, _ = self._read()
        return nnx.merge(self.graphdef, self.ema_params, rest)

    # -- sampling ---------------------------------------------------------
    def _pure_sample(self, params, rest, config, key, *, n, shape, variance):
        model = nnx.merge(self.graphdef, params, rest)
        k_T, k_chain = jax.random.split(key)
        x_T = jax.random.normal(k_T, (n,) + shape)
        return _diffusion.sample_chain(
            _model_apply, model, x_T, k_chain,
            _diffusion.schedule_of(config), variance=variance)

    def sample(self, n: int, key=None, shape=None, *, use_ema: bool = True,
               variance: str = "posterior", return_chain: bool = False):
        """``n`` samples by ancestral sampling from ``x_T ~ N(0, I)``.

        Args:
          n: number of samples.
          key: seed or PRNG key (default: split from the trainer's key).
          shape: shape of one sample; defaults to ``model.data_shape``.
          use_ema: sample with ``ema_params`` (default) or the raw weights.
          variance: ``"posterior"`` or ``"beta"`` reverse-step variance.
          return_chain: also return the trajectory and per-step log-probs.

        Returns:
          ``x_0 [n, *shape]``, or ``(x_0, trajectory [T+1, n, *shape],
          log_probs [T, n])`` with ``return_chain``.
        """
        if shape is None:
            shape = getattr(self.model, "data_shape", None)
            if shape is None:
                raise ValueError("pass `shape` or give the model a "
                                 "`data_shape` attribute.")
        if variance not in _diffusion.VARIANCES:
            raise ValueError(f"`variance` must be one of "
                             f"{list(_diffusion.VARIANCES)}, got {variance!r}.")
        if key is None:
            self.key, key = jax.random.split(self.key)
        params, rest, _, _ = self._read()
        if use_ema:
            params = self.ema_params
        x0, trajectory, log_probs = self._sample(
            params, rest, self.config_arg(), key_data(key), n=int(n),
            shape=tuple(int(s) for s in shape), variance=variance)
        return (x0, trajectory, log_probs) if return_chain else x0

