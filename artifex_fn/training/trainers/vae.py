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
import numpy as np
from flax import nnx

from artifex_fn._src.families import vae as _vae
from artifex_fn.training.trainer import Trainer
from artifex_fn.training.trainer import key_data

VAEConfig = _vae.VAEConfig

_STEP, _CONFIG = "_vae_step", "_vae_config"


def _model_encode(model, x):
    return model.encode(x)


def _model_decode(model, z):
    return model.decode(z)


class VAETrainer(Trainer):
    """Trains an NNX VAE on the negative ELBO.

    Args:
      model: ``nnx.Module`` with ``encode`` and ``decode`` (see the module
        docstring).
      optimizer: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``. For gradient
        clipping chain ``optax.clip_by_global_norm`` into ``tx``.
      config: :class:`VAEConfig` with ``encode``, ``decode``, ``optimizer``
        and ``max_grad_norm`` left None (the trainer uses the model's
        methods and the optimizer's transformation). Numeric fields are
        traced, so assigning a new config does not recompile.
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

    def __init__(self, model, optimizer, config=None, *, key=None):
        if config is None:
            config = VAEConfig()
        if not isinstance(config, VAEConfig):
            raise TypeError(
                f"`config` must be a VAEConfig, got {type(config).__name__}.")
        if config.encode is not None or config.decode is not None:
            raise ValueError(
                "`config.encode` and `config.decode` must be None: the "
                "trainer calls the model's encode/decode methods.")
        if config.optimizer is not None and config.optimizer is not getattr(
                optimizer, "tx", None):
            raise ValueError("`config.optimizer` must be None: the trainer "
                             "uses the nnx.Optimizer's transformation.")
        if config.max_grad_norm is not None:
            raise ValueError(
                "`config.max_grad_norm` must be None for VAETrainer: chain "
                "optax.clip_by_global_norm into the optimizer instead.")
        for name in ("encode", "decode"):
            if not callable(getattr(type(model), name, None)):
                raise TypeError(f"`model` must define a `{name}` method.")
        super().__init__(model, optimizer, config, key=key)
        self._config_cache = (None, None)
        self._reconstruct = jax.jit(self._pure_reconstruct)
        self._sample = jax.jit(self._pure_sample,
                               static_argnames=("num_samples", "latent_dim"))

    # -- configs ----------------------------------------------------------
    def _config_arg(self):
        """The config without its static callables (cached per config)."""
        if self._config_cache[0] is not self.config:
            self._config_cache = (self.config, dataclasses.replace(
                self.config, encode=None, decode=None, optimizer=None))
        return self._config_cache[1]

    @staticmethod
    def _full_config(config):
        return dataclasses.replace(config, encode=_model_encode,
                                   decode=_model_decode)

    # -- the step ---------------------------------------------------------
    def compute_loss(self, model, batch, key):
        """``(loss, metrics)`` of :func:`artifex_fn.families.vae.loss`.

        ``batch`` is ``x`` or ``{"x": x}``; called directly (outside
        ``train_step``) the KL weight is the full ``beta``.
        """
        step = None
        config = self._config_arg()
        if isinstance(batch, dict) and _STEP in batch:
            step, config = batch[_STEP], batch[_CONFIG]
            batch = batch["x"]
        return _vae.loss(model, batch, self._full_config(config), key,
                         step=step)

    def train_step(self, batch, *args, **kwargs) -> dict[str, jax.Array]:
        """One compiled negative-ELBO step on ``x`` or ``{"x": x}``."""
        if args or kwargs:
            raise TypeError("VAETrainer.train_step takes only the batch.")
        if isinstance(batch, dict) and "x" not in batch:
            raise ValueError("batch is missing the key 'x'.")
        x = batch["x"] if isinstance(batch, dict) else batch
        wrapped = {"x": x, _STEP: np.int32(self.step),
                   _CONFIG: self._config_arg()}
        return super().train_step(wrapped)

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
        return self._reconstruct(params, rest, self._config_arg(),
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
        return self._sample(params, rest, self._config_arg(), key_data(key),
                            num_samples=int(n), latent_dim=int(latent_dim))
