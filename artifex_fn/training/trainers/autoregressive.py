"""NNX trainer for autoregressive token models, and a tiny causal
transformer.

:class:`AutoregressiveTrainer` trains ``model(tokens [B, L]) -> logits
[B, L, V]`` with the next-token loss of
:mod:`artifex_fn.families.autoregressive` (teacher forcing or scheduled
sampling) and samples from it with :meth:`AutoregressiveTrainer.generate`.
:class:`TinyCausalLM` is a small GPT-style model (Radford et al. 2018)
whose ``__call__`` is exactly that map, so the same module can be handed
to :class:`~artifex_fn.training.GRPOTrainer` or
:class:`~artifex_fn.training.DPOTrainer` as the policy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from artifex_fn._src.algorithms import common
from artifex_fn._src.families import autoregressive as _ar
from artifex_fn._src.families.networks import CausalBlock  # noqa: F401
from artifex_fn._src.families.networks import TinyCausalLM  # noqa: F401
from artifex_fn.training.trainer import Trainer
from artifex_fn.training.trainer import key_data

AutoregressiveConfig = _ar.AutoregressiveConfig


def _call(model, tokens):
    return model(tokens)


class AutoregressiveTrainer(Trainer):
    """Next-token training of an NNX causal model.

    Args:
      model: ``nnx.Module`` with ``model(tokens [B, L]) -> logits [B, L, V]``
        (or logits under ``apply_fn``).
      optimizer: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
      config: :class:`AutoregressiveConfig` with ``apply=None`` and
        ``optimizer`` None or the optimizer's ``tx``.
      apply_fn: optional ``(model, tokens) -> logits``.
      key: seed or PRNG key (scheduled sampling, generation).

    ``train_step(batch)`` with ``{"tokens": [B, L], "mask"?: [B, L]}``.
    Metrics: ``loss, nll, perplexity, accuracy, num_tokens,
    sampling_probability, grad_norm``. The scheduled-sampling probability
    follows ``trainer.step`` (passed as an array: no recompilation); the
    other numbers of the config are read when the step is first compiled.
    """

    def __init__(self, model, optimizer,
                 config: AutoregressiveConfig | None = None, *,
                 apply_fn=None, key=None):
        config = AutoregressiveConfig() if config is None else config
        if not isinstance(config, AutoregressiveConfig):
            raise TypeError("`config` must be an AutoregressiveConfig, got "
                            f"{type(config).__name__}.")
        if config.apply is not None:
            raise ValueError("`config.apply` must be None: the trainer's "
                             "model is the network (or pass `apply_fn`).")
        if config.optimizer is not None and config.optimizer is not optimizer.tx:
            raise ValueError("`config.optimizer` must be None: the trainer "
                             "uses the nnx.Optimizer's transformation.")
        if apply_fn is not None and not callable(apply_fn):
            raise TypeError("`apply_fn` must be callable (model, tokens).")
        super().__init__(model, optimizer, config, key=key)
        self.apply_fn = _call if apply_fn is None else apply_fn
        self._generate = jax.jit(self._pure_generate, static_argnames=(
            "max_new_tokens", "top_k", "eos_token_id", "pad_token_id",
            "greedy"))

    def _full_config(self):
        return dataclasses.replace(self.config, apply=self.apply_fn,
                                   optimizer=self.optimizer.tx)

    def compute_loss(self, model, batch, key):
        """Next-token loss of ``model`` on ``batch``."""
        return _ar.loss(model, batch, self._full_config(), key)

    def train_step(self, batch) -> dict[str, jax.Array]:
        """One compiled gradient step; returns device metrics."""
        if not isinstance(batch, dict):
            batch = dict(tokens=batch)
        config = self.config
        if config.scheduled_sampling_final is not None:
            start = config.scheduled_sampling
            final = config.scheduled_sampling_final
            frac = min(self.step / config.scheduled_sampling_steps, 1.0)
            batch = dict(batch, sampling_probability=np.float32(
                start + frac * (final - start)))
        return super().train_step(batch)

    def _pure_generate(self, params, rest, prompts, key, temperature, *,
                       max_new_tokens, top_k, eos_token_id, pad_token_id,
                       greedy):
        model = nnx.merge(self.graphdef, params, rest)
        return _ar.generate(
            self.apply_fn, model, prompts, key,
            max_new_tokens=max_new_tokens,
            temperature=0 if greedy else temperature, top_k=top_k,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    def generate(self, prompts, key=None, *, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None,
                 eos_token_id: int | None = None,
                 pad_token_id: int | None = None):
        """Samples completions from the current model (compiled).

        Args:
          prompts: ``[B, Lp]`` integer ids.
          key: seed or PRNG key (default: split from the trainer's key).
          max_new_tokens: completion length ``N``.
          temperature: ``0`` for greedy decoding; other values are traced
            (no recompilation).
          top_k: optional top-k sampling.
          eos_token_id: optional end token.
          pad_token_id: padding after EOS (default ``config.pad_token_id``).

        Returns:
          ``(completions [B, N], mask [B, N])``.
        """
        common.check_range("temperature", temperature, 0.0)
        if key is None:
            self.key, key = jax.random.split(self.key)
        else:
            key = key_data(key)
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        params, rest, _, _ = self._read()
        greedy = isinstance(temperature, (int, float)) and temperature == 0
        return self._generate(
            params, rest, jnp.asarray(prompts), key,
            jnp.asarray(1.0 if greedy else temperature, jnp.float32),
            max_new_tokens=max_new_tokens, top_k=top_k,
            eos_token_id=eos_token_id, pad_token_id=pad, greedy=greedy)
