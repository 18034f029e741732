"""Sampling from a policy model for on-line training (GRPO's generation path).

Two kinds of policy:

* **one-step**: ``model(observations)`` is a distribution over the whole
  sample (a ``distrax`` distribution, or logits for a ``Categorical``), e.g.
  a Gaussian over a latent, a 2-D point or a class label. One draw per row.
* **autoregressive**: ``model(tokens [B, L])`` returns next-token logits
  ``[B, L, V]`` (or a ``Categorical`` over them) of a *causal* model: the
  output at position ``j`` depends on tokens ``<= j`` only. Completions of
  ``max_new_tokens`` tokens are sampled one token at a time inside one
  ``lax.fori_loop``; every step recomputes the whole (fixed-length) prefix,
  no key-value cache, which is fine at small sizes. Once a row samples
  ``eos_token_id`` its later tokens are ``pad_token_id`` and masked out; the
  EOS token itself counts as part of the completion.

For the autoregressive kind the RL batch uses
``observations = {"prompt": [B, Lp], "completion": [B, N]}`` and
``actions = completion``; :func:`token_policy` turns the model into the
policy the algorithms expect (a ``Categorical`` over the ``N`` completion
positions, logits divided by the sampling temperature, so that the
behaviour log-probs and the trained log-probs are of the same
distribution). Prompts must all have the same length ``Lp``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from artifex_fn._src.algorithms import common


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How a trainer samples from its model.

    Attributes:
      max_new_tokens: ``None`` for one-step policies; otherwise the number
        of tokens to sample autoregressively after each prompt.
      eos_token_id: token that ends a completion (``None``: never ends
        early).
      pad_token_id: token written after the end of a completion.
      temperature: logits are divided by it, for sampling and for the
        log-probabilities the loss uses (autoregressive policies only).
    """
    max_new_tokens: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int = 0
    temperature: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens is not None:
            common.check_int("max_new_tokens", self.max_new_tokens, 1)
        if self.eos_token_id is not None:
            common.check_int("eos_token_id", self.eos_token_id, 0)
        common.check_int("pad_token_id", self.pad_token_id, 0)
        common.check_range("temperature", self.temperature, 0.0, lo_open=True)

    @property
    def autoregressive(self) -> bool:
        return self.max_new_tokens is not None


def _logits_of(out) -> jax.Array:
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "log_prob"):
        raise ValueError(
            "an autoregressive policy must return logits [B, L, V] or a "
            f"Categorical distribution, got {type(out).__name__}.")
    return jnp.asarray(out)


def completion_logits(apply: Callable[[jax.Array], Any], prompt: jax.Array,
                      completion: jax.Array) -> jax.Array:
    """Logits ``[B, N, V]`` predicting each completion token.

    Runs the model once on ``concat(prompt, completion)[:, :-1]`` and keeps
    the positions ``Lp - 1 ... Lp + N - 2``.
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(
            f"prompts must be token ids [B, Lp] with Lp >= 1, got shape "
            f"{tuple(prompt.shape)}.")
    tokens = jnp.concatenate([prompt, completion.astype(prompt.dtype)], axis=1)
    logits = _logits_of(apply(tokens[:, :-1]))
    if logits.ndim != 3 or logits.shape[:2] != tokens[:, :-1].shape:
        raise ValueError(
            f"the model must map tokens {tuple(tokens[:, :-1].shape)} to "
            f"logits [B, L, V], got shape {tuple(logits.shape)}.")
    return logits[:, prompt.shape[1] - 1:]


def token_policy(apply: Callable[[jax.Array], Any], observations,
                 temperature: float = 1.0):
    """``Categorical`` over the completion tokens of ``observations``.

    ``observations`` is ``{"prompt": [B, Lp], "completion": [B, N]}``.
    """
    if not isinstance(observations, dict) or not {
            "prompt", "completion"} <= set(observations):
        raise ValueError(
            "with autoregressive generation, observations must be "
            "{'prompt': [B, Lp], 'completion': [B, N]}.")
    logits = completion_logits(apply, observations["prompt"],
                               observations["completion"])
    return common.as_distribution(logits / temperature)


def sample_tokens(apply: Callable[[jax.Array], Any], prompts: jax.Array,
                  key: jax.Array, *, max_new_tokens: int,
                  eos_token_id: int | None = None, pad_token_id: int = 0,
                  temperature: float = 1.0):
    """Samples completions token by token.

    Args:
      apply: ``tokens [B, L] -> logits [B, L, V]`` of a causal model.
      prompts: ``[B, Lp]`` integer token ids.
      key: PRNG key.
      max_new_tokens: completion length ``N``.
      eos_token_id: optional end-of-sequence token.
      pad_token_id: token after the end.
      temperature: sampling temperature ``> 0``.

    Returns:
      ``(completions [B, N], mask [B, N])``: tokens (pad after EOS) and
      ``1.0`` for tokens up to and including the first EOS.
    """
    prompts = jnp.asarray(prompts)
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(
            f"prompts must be integer token ids [B, Lp], got "
            f"{prompts.dtype}{list(prompts.shape)}.")
    b, lp = prompts.shape
    n = max_new_tokens
    tokens = jnp.concatenate(
        [prompts, jnp.full((b, n), pad_token_id, prompts.dtype)], axis=1)

    def body(i, carry):
        tokens, done, key = carry
        key, sub = jax.random.split(key)
        logits = _logits_of(apply(tokens[:, :-1]))
        step_logits = lax.dynamic_index_in_dim(logits, lp - 1 + i, axis=1,
                                               keepdims=False)
        tok = jax.random.categorical(sub, step_logits / temperature, axis=-1)
        tok = jnp.where(done, pad_token_id, tok).astype(tokens.dtype)
        tokens = lax.dynamic_update_index_in_dim(tokens, tok, lp + i, axis=1)
        if eos_token_id is not None:
            done = done | (tok == eos_token_id)
        return tokens, done, key

    done0 = jnp.zeros((b,), bool)
    tokens, _, _ = lax.fori_loop(0, n, body, (tokens, done0, key))
    completions = tokens[:, lp:]
    if eos_token_id is None:
        mask = jnp.ones((b, n), jnp.float32)
    else:
        is_eos = completions == eos_token_id
        # tokens strictly after the first EOS are padding
        after = jnp.cumsum(is_eos, axis=1) - is_eos
        mask = (after == 0).astype(jnp.float32)
    return completions, mask


def sample_one_step(apply: Callable[[Any], Any], observations, key):
    """One draw per row of a one-step policy: ``(samples, log_probs [B])``."""
    dist = common.as_distribution(apply(observations))
    samples, log_prob = dist.sample_and_log_prob(seed=key)
    return samples, common.reduce_to_rank(log_prob, 1, "log_prob")
