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

from artifex_fn._src import checks
from artifex_fn._src.algorithms.policies import as_distribution
from artifex_fn._src.algorithms.policies import reduce_to_rank


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
            checks.check_int(self.max_new_tokens, "max_new_tokens", lo=1)
        if self.eos_token_id is not None:
            checks.check_int(self.eos_token_id, "eos_token_id", lo=0)
        checks.check_int(self.pad_token_id, "pad_token_id", lo=0)
        checks.check_hparam(self.temperature, "temperature", lo=0.0, lo_open=True)

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
    return as_distribution(logits / temperature)


def sample_next_token(key: jax.Array, logits: jax.Array, *,
                      temperature: float | jax.Array = 1.0,
                      top_k: int | None = None) -> jax.Array:
    """Draws one token per row from ``logits [B, V]``.

    ``temperature == 0`` (a Python number) is greedy decoding; otherwise
    logits are divided by it. ``top_k`` restricts the draw to the ``k``
    largest logits of each row (Fan et al. 2018), renormalised.
    """
    if top_k is not None:
        checks.check_int(top_k, "top_k", lo=1)
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits, axis=-1)
    if top_k is None or top_k >= logits.shape[-1]:
        return jax.random.categorical(key, logits / temperature, axis=-1)
    values, indices = lax.top_k(logits, top_k)
    choice = jax.random.categorical(key, values / temperature, axis=-1)
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]


def completion_mask(completions: jax.Array,
                    eos_token_id: int | None) -> jax.Array:
    """``1.0`` for the tokens up to and including the first ``eos_token_id``
    of each row, ``0.0`` after it (all ones without an end token)."""
    if eos_token_id is None:
        return jnp.ones(completions.shape, jnp.float32)
    is_eos = completions == eos_token_id
    after = jnp.cumsum(is_eos, axis=1) - is_eos   # EOS tokens strictly before
    return (after == 0).astype(jnp.float32)


def generate(apply: Callable[[jax.Array], Any], prompts: jax.Array,
             key: jax.Array, *, max_new_tokens: int,
             temperature: float | jax.Array = 1.0, top_k: int | None = None,
             eos_token_id: int | None = None, pad_token_id: int = 0):
    """Samples ``max_new_tokens`` tokens after each prompt.

    One ``lax.fori_loop``; every step reruns the model on the fixed-length
    buffer ``[B, Lp + N - 1]`` (no key-value cache) and reads the logits at
    the current position; step ``i`` draws with ``fold_in(key, i)``. After
    a row emits ``eos_token_id`` its later tokens are ``pad_token_id``.

    Args:
      apply: ``tokens [B, L] -> logits [B, L, V]`` (or a ``Categorical``
        over them) of a causal model: position ``j`` sees tokens ``<= j``.
      prompts: ``[B, Lp]`` integer ids, ``Lp >= 1``.
      key: PRNG key.
      max_new_tokens: ``N >= 1``.
      temperature: ``0`` (a Python number) for greedy decoding, else
        ``> 0``; may be traced.
      top_k: optional top-k sampling.
      eos_token_id: optional end token (kept in the completion).
      pad_token_id: written after the end.

    Returns:
      ``(completions [B, N], mask [B, N])``: mask is 1 up to and including
      the first EOS.

    >>> import jax, jax.numpy as jnp
    >>> bigram = lambda t: jax.nn.one_hot((t + 1) % 5, 5) * 50.0
    >>> comp, mask = generate(bigram, jnp.array([[0], [2]]),
    ...                       jax.random.key(0), max_new_tokens=4,
    ...                       eos_token_id=4)
    >>> comp.tolist(), mask.tolist()
    ([[1, 2, 3, 4], [3, 4, 0, 0]], [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    """
    checks.check_int(max_new_tokens, "max_new_tokens", lo=1)
    checks.check_hparam(temperature, "temperature", lo=0.0)
    prompts = jnp.asarray(prompts)
    if (prompts.ndim != 2 or prompts.shape[1] < 1
            or not jnp.issubdtype(prompts.dtype, jnp.integer)):
        raise ValueError(
            f"`prompts` must be integer ids [B, Lp] with Lp >= 1, got "
            f"{prompts.dtype}{list(prompts.shape)}.")
    b, lp = prompts.shape
    n = max_new_tokens
    tokens = jnp.concatenate(
        [prompts, jnp.full((b, n), pad_token_id, prompts.dtype)], axis=1)

    def body(i, carry):
        tokens, done = carry
        logits = _logits_of(apply(tokens[:, :-1]))
        step_logits = lax.dynamic_index_in_dim(logits, lp - 1 + i, axis=1,
                                               keepdims=False)
        tok = sample_next_token(jax.random.fold_in(key, i), step_logits,
                                temperature=temperature, top_k=top_k)
        tok = jnp.where(done, pad_token_id, tok).astype(tokens.dtype)
        tokens = lax.dynamic_update_index_in_dim(tokens, tok, lp + i, axis=1)
        if eos_token_id is not None:
            done = done | (tok == eos_token_id)
        return tokens, done

    tokens, _ = lax.fori_loop(0, n, body, (tokens, jnp.zeros((b,), bool)))
    completions = tokens[:, lp:]
    return completions, completion_mask(completions, eos_token_id)


def sample_one_step(apply: Callable[[Any], Any], observations, key):
    """One draw per row of a one-step policy: ``(samples, log_probs [B])``."""
    dist = as_distribution(apply(observations))
    samples, log_prob = dist.sample_and_log_prob(seed=key)
    return samples, reduce_to_rank(log_prob, 1, "log_prob")
