"""NNX trainer for autoregressive token models.

:class:`AutoregressiveTrainer` trains ``model(tokens [B, L]) -> logits
[B, L, V]`` with the next-token loss of
:mod:`artifex_fn.families.autoregressive` (teacher forcing or scheduled
sampling) and samples from it with :meth:`AutoregressiveTrainer.generate`
(:func:`artifex_fn.sampling.generate`). The same module can be handed to
:class:`~artifex_fn.training.GRPOTrainer` or
:class:`~artifex_fn.training.DPOTrainer` as the policy
(:class:`artifex_fn.families.autoregressive.TinyCausalLM` is such a model).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from artifex_fn import sampling
from artifex_fn.checks import check_hparam
from artifex_fn.families import autoregressive as _ar
from artifex_fn.training.trainers.base import Trainer
from artifex_fn.training.trainers.base import key_data


def _call(model, tokens):
    return model(tokens)


class AutoregressiveTrainer(Trainer):
    """Next-token training of an NNX causal model.

    Args:
      model: ``nnx.Module`` with ``model(tokens [B, L]) -> logits [B, L, V]``
        (or logits under ``apply_fn``).
      optimizer: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
      config: :class:`~artifex_fn.families.autoregressive.AutoregressiveConfig`
        with ``apply`` and ``optimizer`` None; ``max_grad_norm`` clips the
        gradient.
      apply_fn: optional ``(model, tokens) -> logits``.
      key: seed or PRNG key (scheduled sampling, generation).

    ``train_step(batch)`` with ``{"tokens": [B, L], "mask"?: [B, L]}``.
    Metrics: ``loss, nll, perplexity, accuracy, num_tokens,
    sampling_probability, grad_norm``. The scheduled-sampling probability
    follows ``trainer.step``. The config's numbers are traced (assigning a
    new config does not recompile; switching scheduled sampling on or off
    compiles once).
    """

    config_type = _ar.AutoregressiveConfig
    model_fields = ("apply",)
    model_fields_hint = ("the trainer's model is the network (or pass "
                         "`apply_fn`)")

    def __init__(self, model, optimizer, config=None, *, apply_fn=None,
                 key=None):
        if apply_fn is not None and not callable(apply_fn):
            raise TypeError("`apply_fn` must be callable (model, tokens).")
        super().__init__(model, optimizer, config, key=key)
        self.apply_fn = _call if apply_fn is None else apply_fn
        self._generate = jax.jit(self._pure_generate, static_argnames=(
            "max_new_tokens", "top_k", "eos_token_id", "stop_token_ids",
            "pad_token_id", "greedy"))

    def static_flags(self) -> tuple:
        return (self.config.uses_scheduled_sampling,)

    def trace_config(self, config, flags):
        (uses_scheduled_sampling,) = flags
        if not uses_scheduled_sampling:   # the plain teacher-forced loss
            config = dataclasses.replace(config, scheduled_sampling=0.0)
        return config

    def loss_and_metrics(self, model, batch, key, config, step):
        """Next-token loss of ``model``; scheduled sampling at ``step``."""
        if not isinstance(batch, dict):
            batch = dict(tokens=batch)
        config = dataclasses.replace(config, apply=self.apply_fn)
        if step is not None and config.scheduled_sampling_final is not None:
            batch = dict(batch, sampling_probability=(
                _ar.scheduled_sampling_probability(config, step)))
        return _ar.loss(model, batch, config, key)

    def compute_loss(self, model, batch, key):
        """Next-token loss of ``model`` on ``batch``."""
        return self.loss_and_metrics(
            model, batch, key,
            self.trace_config(self.config_arg(), self.static_flags()), None)

    def _pure_generate(self, params, rest, prompts, prompt_mask, key,
                       temperature, top_p, *, max_new_tokens, top_k,
                       eos_token_id, stop_token_ids, pad_token_id, greedy):
        model = nnx.merge(self.graphdef, params, rest)
        target = (model if self.apply_fn is _call
                  else functools.partial(self.apply_fn, model))
        return sampling.generate(
            target, prompts, key, prompt_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            temperature=0 if greedy else temperature, top_k=top_k,
            top_p=top_p, eos_token_id=eos_token_id,
            stop_token_ids=stop_token_ids, pad_token_id=pad_token_id)

    def generate(self, prompts, key=None, *, max_new_tokens: int,
                 prompt_mask=None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, stop_token_ids=(),
                 pad_token_id: int | None = None,
                 prompt_bucketing: str | int | None = "pow2"):
        """Samples completions from the current model (compiled).

        Args:
          prompts: ``[B, Lp]`` integer ids (left-padded with
            ``prompt_mask``), or a list of token lists (ragged).
          key: seed or PRNG key (default: split from the trainer's key).
          max_new_tokens: completion length ``N``.
          prompt_mask: optional ``[B, Lp]``, ``0`` on the left padding.
          temperature: ``0`` for greedy decoding; other values are traced
            (no recompilation), as is ``top_p``.
          top_k, top_p: optional top-k / nucleus sampling.
          eos_token_id, stop_token_ids: tokens that end a completion.
          pad_token_id: padding (default ``config.pad_token_id``).
          prompt_bucketing: for a model with the decoder protocol, prompts
            are left-padded to this bucket (see
            :func:`artifex_fn.sampling.pad_prompts`).

        Returns:
          :class:`artifex_fn.sampling.Generation` ``(tokens [B, N], mask
          [B, N], log_probs [B, N])``.
        """
        check_hparam(temperature, "temperature", lo=0.0)
        if key is None:
            self.key, key = jax.random.split(self.key)
        else:
            key = key_data(key)
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        if self.apply_fn is _call and sampling.is_decoder(self.model):
            prompts, prompt_mask = sampling.pad_prompts(
                prompts, prompt_mask, pad_token_id=pad,
                bucketing=prompt_bucketing)
        params, rest, _, _ = self._read()
        greedy = isinstance(temperature, (int, float)) and temperature == 0
        stops = tuple(int(t) for t in np.asarray(
            () if stop_token_ids is None else stop_token_ids).reshape(-1))
        return self._generate(
            params, rest, jnp.asarray(prompts),
            None if prompt_mask is None else jnp.asarray(prompt_mask), key,
            jnp.asarray(1.0 if greedy else temperature, jnp.float32),
            None if top_p is None else jnp.asarray(top_p, jnp.float32),
            max_new_tokens=max_new_tokens, top_k=top_k,
            eos_token_id=eos_token_id, stop_token_ids=stops,
            pad_token_id=pad, greedy=greedy)
