"""NNX trainer for variational autoencoders over the pure VAE loss.

The model is an ``nnx.Module`` with two methods:

* ``encode(x [B, ...]) -> (mean [B, D], log_var [B, D])``,
* ``decode(z [B, D]) -> [B, ...]`` logits (Bernoulli likelihood) or means
  (Gaussian likelihood),

and optionally a ``latent_dim`` attribute used by :meth:`VAETrainer.sample`.
Each ``train_step`` is one compiled gradient step on
:func:`artifex_fn.families.vae.loss` (the negative ELBO, Kingma & Welling
2014), with the KL warm-up driven by ``trainer.step``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from artifex_fn.families import vae as _vae
from artifex_fn.training.trainers.base import Trainer
from artifex_fn.training.trainers.base import data_batch
from artifex_fn.training.trainers.base import key_data


def _model_encode(model, x):
    return model.encode(x)


def _model_decode(model, z):
    return model.decode(z)


class VAETrainer(Trainer):
    """Trains an NNX VAE on the negative ELBO.

    Args:
      model: ``nnx.Module`` with ``encode`` and ``decode`` (see the module
        docstring).
      optimizer: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
      config: :class:`~artifex_fn.families.vae.VAEConfig` with ``encode``,
        ``decode`` and ``optimizer`` left None (the trainer uses the model's
        methods and the optimizer's transformation); ``max_grad_norm``
        clips the gradient. Numeric fields are traced, so assigning a new
        config does not recompile.
      key: seed or PRNG key for the reparameterisation noise.

    ``train_step(batch)`` takes ``x [B, ...]`` or ``{"x": x}`` and returns
    device metrics ``loss, reconstruction_loss, kl, kl_weight, elbo,
    grad_norm``.

    Example::

        trainer = VAETrainer(model, nnx.Optimizer(model, optax.adam(1e-3),
                                                  wrt=nnx.Param),
                             VAEConfig(beta=1.0, kl_anneal_steps=500))
        for x in batches:
            metrics = trainer.train_step(x)
        images = trainer.sample(16, key=0)
    """

    config_type = _vae.VAEConfig
    model_fields = ("encode", "decode")
    model_fields_hint = "the trainer calls the model's encode/decode methods"

    def __init__(self, model, optimizer, config=None, *, key=None):
        for name in ("encode", "decode"):
            if not callable(getattr(type(model), name, None)):
                raise TypeError(f"`model` must define a `{name}` method.")
        super().__init__(model, optimizer, config, key=key)
        self._reconstruct = jax.jit(self._pure_reconstruct)
        self._sample = jax.jit(self._pure_sample,
                               static_argnames=("num_samples", "latent_dim"))

    @staticmethod
    def _full_config(config):
        return dataclasses.replace(config, encode=_model_encode,
                                   decode=_model_decode)

    # -- the step ---------------------------------------------------------
    def loss_and_metrics(self, model, batch, key, config, step):
        """The negative ELBO with the KL warm-up at ``step``."""
        return _vae.loss(model, data_batch(batch)["x"], self._full_config(config),
                         key, step=step)

    def compute_loss(self, model, batch, key):
        """``(loss, metrics)`` of :func:`artifex_fn.families.vae.loss` on
        ``x`` or ``{"x": x}``, with the full KL weight ``beta``."""
        return _vae.loss(model, data_batch(batch)["x"],
                         self._full_config(self.config_arg()), key)

    # -- inference --------------------------------------------------------
    def _pure_reconstruct(self, params, rest, config, x, key):
        model = nnx.merge(self.graphdef, params, rest)
        return _vae.reconstruct(model, x, self._full_config(config), key)

    def _pure_sample(self, params, rest, config, key, *, num_samples,
                     latent_dim):
        model = nnx.merge(self.graphdef, params, rest)
        return _vae.sample(model, self._full_config(config), key,
                           num_samples=num_samples, latent_dim=latent_dim)

    def reconstruct(self, x, key=None) -> jax.Array:
        """Decoder means ``[B, ...]`` of the encodings of ``x``.

        Args:
          x: ``[B, ...]`` data.
          key: None to decode the posterior mean, else a seed/key to decode
            one posterior sample.
        """
        params, rest, _, _ = self._read()
        key = None if key is None else key_data(key)
        return self._reconstruct(params, rest, self.config_arg(),
                                 jnp.asarray(x), key)

    def sample(self, n: int, key=None, *, latent_dim: int | None = None):
        """Decoder means ``[n, ...]`` of ``n`` latents drawn from ``N(0, I)``.

        Args:
          n: number of samples.
          key: seed or PRNG key (default: split from the trainer's key).
          latent_dim: size of the latent; defaults to ``model.latent_dim``.
        """
        if latent_dim is None:
            latent_dim = getattr(self.model, "latent_dim", None)
            if latent_dim is None:
                raise ValueError("pass `latent_dim` or give the model a "
                                 "`latent_dim` attribute.")
        if key is None:
            self.key, key = jax.random.split(self.key)
        params, rest, _, _ = self._read()
        return self._sample(params, rest, self.config_arg(), key_data(key),
                            num_samples=int(n), latent_dim=int(latent_dim))
