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
from artifex_fn.training.trainer import Trainer
from artifex_fn.training.trainer import key_data

AutoregressiveConfig = _ar.AutoregressiveConfig


class CausalBlock(nnx.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP.

    .. math::
        h \\leftarrow h + \\mathrm{MHA}(\\mathrm{LN}(h), \\mathrm{mask}),
        \\qquad h \\leftarrow h + W_2\\, \\mathrm{gelu}(W_1\\,
        \\mathrm{LN}(h))
    """

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: int, *,
                 rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads, d_model, decode=False, keep_rngs=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, mlp_ratio * d_model, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_ratio * d_model, d_model, rngs=rngs)

    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        """``h [B, L, D]``, ``mask [B, 1, L, L]`` -> ``[B, L, D]``."""
        h = h + self.attn(self.ln1(h), mask=mask)
        return h + self.mlp_out(nnx.gelu(self.mlp_in(self.ln2(h))))


class TinyCausalLM(nnx.Module):
    """A small causal transformer language model.

    Token and learned position embeddings, ``num_layers`` pre-norm blocks
    of causal multi-head self-attention (``nnx.MultiHeadAttention`` with
    ``nnx.make_causal_mask``) and MLP, a final layer norm and a linear
    head.

    Args:
      vocab_size: number of tokens ``V``.
      max_len: longest input the position table covers.
      d_model: width ``D``.
      num_heads: attention heads (must divide ``D``).
      num_layers: number of blocks.
      mlp_ratio: hidden width of the MLP over ``D``.
      rngs: ``nnx.Rngs`` for the initialisation.
    """

    def __init__(self, vocab_size: int, *, max_len: int, d_model: int = 32,
                 num_heads: int = 2, num_layers: int = 1, mlp_ratio: int = 2,
                 rngs: nnx.Rngs):
        for name, value in (("vocab_size", vocab_size), ("max_len", max_len),
                            ("d_model", d_model), ("num_heads", num_heads),
                            ("num_layers", num_layers),
                            ("mlp_ratio", mlp_ratio)):
            common.check_int(name, value, 1)
        if d_model % num_heads:
            raise ValueError(f"`num_heads` ({num_heads}) must divide "
                             f"`d_model` ({d_model}).")
        self.max_len = max_len
        self.token_embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.pos_embed = nnx.Embed(max_len, d_model, rngs=rngs)
        self.blocks = nnx.List([CausalBlock(d_model, num_heads, mlp_ratio,
                                            rngs=rngs)
                                for _ in range(num_layers)])
        self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Next-token logits ``[B, L, V]`` for ``tokens [B, L]``."""
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"`tokens` has length {length}, more than "
                             f"max_len={self.max_len}.")
        h = self.token_embed(tokens) + self.pos_embed(jnp.arange(length))
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.ln_f(h))


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
