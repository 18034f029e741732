"""Sampling from a policy model: the single home of token generation.

Two kinds of policy:

* **one-step**: ``model(observations)`` is a distribution over the whole
  sample (a ``distrax`` distribution, or logits for a ``Categorical``), e.g.
  a Gaussian over a latent, a 2-D point or a class label. One draw per row
  (:func:`sample_one_step`).
* **autoregressive**: a causal token model, sampled one token at a time by
  :func:`generate`.

Decoder protocol
----------------
A causal model that offers

* ``model.init_cache(batch_size, max_length)`` -> a cache pytree of
  ``max_length`` slots, and
* ``model(tokens [B, T], positions=[B, T], attention_mask=[B, S],
  cache=cache)`` -> ``(logits [B, T, V], new cache)``, writing the ``T``
  tokens at the cache's next ``T`` slots; query ``t`` attends to slot ``s``
  iff ``s`` is not after it and ``attention_mask[b, s]`` is set; without
  ``cache`` the same call returns the logits alone (``S = T``),

is decoded with a key-value cache (:class:`~artifex_fn.families.\
autoregressive.TinyCausalLM` is one): the prompt is prefilled in one call,
then one token per step inside compiled ``lax.while_loop`` s that stop as
soon as every row has finished. The final cache has exactly ``Lp + N - 1``
slots (the last token is sampled, never fed back); on the way it grows in
segments (:func:`cache_windows`), so that a step reads only about as many
slots as are filled. Any other callable
``tokens [B, L] -> logits [B, L, V]`` keeps the recompute path: every step
reruns the model on the fixed-length buffer ``[B, Lp + N - 1]``.

Prompts are left-padded: ``prompt_mask [B, Lp]`` marks the real tokens
(``0`` = padding, all on the left). Positions count real tokens only
(``cumsum(mask) - 1``), and padded slots are never attended, so a padded
prompt gives the tokens and log-probs of the unpadded one. Ragged prompts
need a decoder. :func:`pad_prompts` left-pads lists of token lists and
rounds the length up to a bucket (a power of two by default), so that a
stream of prompts of varying lengths compiles a bounded number of programs.

Sampling distribution
---------------------
The logits ``z`` of each step are transformed (:func:`transform_logits`)
in float32: divided by the temperature, then restricted to the ``top_k``
largest (ties kept) and then to the smallest set of largest tokens whose
probability reaches ``top_p`` (Holtzman et al. 2020, "The Curious Case of
Neural Text Degeneration"); tokens outside the support get logit
``-1e9`` (probability exactly 0). The token is drawn from
``softmax(transform(z))`` and its log-probability under that same
distribution is returned: the behaviour log-probs, which
:func:`token_policy` reproduces for the loss (it keeps the taken token in
the support, so the first update after generation has importance ratios of
1). A row finishes at the first of its stop tokens (``eos_token_id`` and
``stop_token_ids``), which belongs to the completion; later tokens are
``pad_token_id`` with mask and log-prob 0.

For the RL batch, ``observations = {"prompt": [B, Lp], "completion":
[B, N]}`` (plus ``"prompt_mask"`` for padded prompts) and ``actions =
completion``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from artifex_fn._src import checks
from artifex_fn._src.algorithms.policies import as_distribution
from artifex_fn._src.algorithms.policies import reduce_to_rank

# Logit given to tokens outside the sampling support: exp underflows to
# exactly 0 after the softmax, and unlike -inf it keeps entropies and
# gradients finite.
MASKED_LOGIT = -1e9

BUCKETINGS = ("pow2",)


def _check_top(top_k, top_p):
    if top_k is not None:
        checks.check_int(top_k, "top_k", lo=1)
    if top_p is not None:
        checks.check_hparam(top_p, "top_p", lo=0.0, hi=1.0, lo_open=True)


def _check_bucketing(bucketing):
    if bucketing is None or bucketing in BUCKETINGS:
        return
    if isinstance(bucketing, bool) or not isinstance(bucketing, int) or (
            bucketing < 1):
        raise ValueError(
            f"`prompt_bucketing` must be None, 'pow2' or a positive integer "
            f"(round the prompt length up to a multiple of it), got "
            f"{bucketing!r}.")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How a trainer samples from its model.

    Attributes:
      max_new_tokens: ``None`` for one-step policies; otherwise the number
        of tokens to sample autoregressively after each prompt.
      eos_token_id: token that ends a completion (``None``: only
        ``stop_token_ids`` end one).
      stop_token_ids: further tokens that end a completion.
      pad_token_id: token written after the end of a completion, and to
        the left of short prompts.
      temperature: logits are divided by it, for sampling and for the
        log-probabilities the loss uses (autoregressive policies only).
      top_k: optional: sample among the ``top_k`` largest logits.
      top_p: optional nucleus: sample among the smallest set of tokens
        whose probability reaches ``top_p`` (in ``(0, 1]``).
      prompt_bucketing: ``"pow2"`` (default) rounds the prompt length up
        to a power of two by left padding, an integer ``m`` up to a multiple
        of ``m``, ``None`` keeps it (only decoders, see
        :mod:`artifex_fn.sampling`, are given padded prompts).
      cache_dtype: optional dtype of the key-value cache (e.g.
        ``"bfloat16"``); default the model's.
      use_cache: ``False`` forces the recompute path on a decoder.
    """
    max_new_tokens: int | None = None
    eos_token_id: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    prompt_bucketing: str | int | None = "pow2"
    cache_dtype: Any = None
    use_cache: bool = True

    def __post_init__(self):
        if self.max_new_tokens is not None:
            checks.check_int(self.max_new_tokens, "max_new_tokens", lo=1)
        if self.eos_token_id is not None:
            checks.check_int(self.eos_token_id, "eos_token_id", lo=0)
        object.__setattr__(self, "stop_token_ids",
                           _stop_ids(None, self.stop_token_ids))
        checks.check_int(self.pad_token_id, "pad_token_id", lo=0)
        checks.check_hparam(self.temperature, "temperature", lo=0.0,
                            lo_open=True)
        _check_top(self.top_k, self.top_p)
        _check_bucketing(self.prompt_bucketing)

    @property
    def autoregressive(self) -> bool:
        return self.max_new_tokens is not None

    def sampling_kwargs(self) -> dict:
        """The keyword arguments of :func:`generate` this config sets."""
        return dict(max_new_tokens=self.max_new_tokens,
                    eos_token_id=self.eos_token_id,
                    stop_token_ids=self.stop_token_ids,
                    pad_token_id=self.pad_token_id,
                    temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p, cache_dtype=self.cache_dtype,
                    use_cache=self.use_cache)

    def transform_kwargs(self) -> dict:
        """``temperature``, ``top_k``, ``top_p``: the sampling transform."""
        return dict(temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p)


def _stop_ids(eos_token_id, stop_token_ids) -> tuple[int, ...]:
    if stop_token_ids is None:
        stop_token_ids = ()
    if isinstance(stop_token_ids, (int, np.integer)):
        stop_token_ids = (stop_token_ids,)
    ids = [] if eos_token_id is None else [eos_token_id]
    for i, t in enumerate(tuple(stop_token_ids)):
        checks.check_int(t, f"stop_token_ids[{i}]", lo=0)
        ids.append(int(t))
    if eos_token_id is not None:
        checks.check_int(eos_token_id, "eos_token_id", lo=0)
    return tuple(dict.fromkeys(int(t) for t in ids))


def is_decoder(model) -> bool:
    """Whether ``model`` offers the decoder protocol (``init_cache``)."""
    return callable(getattr(model, "init_cache", None))


def _logits_of(out) -> jax.Array:
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "log_prob"):
        raise ValueError(
            "an autoregressive policy must return logits [B, L, V] or a "
            f"Categorical distribution, got {type(out).__name__}.")
    return jnp.asarray(out)


def transform_logits(logits: jax.Array, *,
                     temperature: float | jax.Array = 1.0,
                     top_k: int | None = None, top_p: float | None = None,
                     keep: jax.Array | None = None) -> jax.Array:
    """The logits of the sampling distribution, in float32.

    ``logits / temperature``, then only the ``top_k`` largest (ties at the
    ``k``-th value kept) and then only the smallest set of largest tokens
    whose probability reaches ``top_p`` keep their value; the others get
    :data:`MASKED_LOGIT`.

    Args:
      logits: ``[..., V]``.
      temperature: ``> 0`` (may be traced).
      top_k: optional ``k >= 1`` (static).
      top_p: optional ``p`` in ``(0, 1]`` (may be traced).
      keep: optional token ids ``[...]`` kept in the support whatever their
        rank (the taken tokens, when scoring a completion).

    Returns:
      ``[..., V]`` float32.

    >>> import jax.numpy as jnp
    >>> transform_logits(jnp.log(jnp.array([0.5, 0.3, 0.2])), top_p=0.7)
    Array([-6.9314718e-01, -1.2039728e+00, -1.0000000e+09], dtype=float32)
    """
    _check_top(top_k, top_p)
    checks.check_hparam(temperature, "temperature", lo=0.0, lo_open=True)
    x = jnp.asarray(logits).astype(jnp.float32) / temperature
    vocab = x.shape[-1]
    support = None
    if top_k is not None and top_k < vocab:
        kth = lax.top_k(x, top_k)[0][..., -1:]
        support = x >= kth
    if top_p is not None and not (isinstance(top_p, (int, float))
                                  and top_p >= 1.0):
        base = x if support is None else jnp.where(support, x, MASKED_LOGIT)
        ranked = lax.top_k(base, vocab if top_k is None else
                           min(top_k, vocab))[0]
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        count = jnp.sum(before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(ranked, count - 1, axis=-1)
        nucleus = base >= threshold
        support = nucleus if support is None else support & nucleus
    if support is None:
        return x
    if keep is not None:
        support = support | (jnp.arange(vocab) == jnp.asarray(keep)[..., None])
    return jnp.where(support, x, MASKED_LOGIT)


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from ``softmax(logits)``, ``logits [..., V]``.

    Inverse-CDF sampling with one uniform number per row: the token is the
    first whose cumulative (unnormalised) probability reaches ``u * total``
    with ``u`` uniform on ``(0, 1]``; a token of probability 0 is never
    drawn. On CPU this is about 4x faster than ``jax.random.categorical``'s
    Gumbel trick, which draws ``V`` numbers per row.
    """
    x = jnp.asarray(logits).astype(jnp.float32)
    cdf = jnp.cumsum(jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)),
                     axis=-1)
    u = 1.0 - jax.random.uniform(key, x.shape[:-1] + (1,))
    return jnp.sum(cdf < u * cdf[..., -1:], axis=-1)


def sample_next_token(key: jax.Array, logits: jax.Array, *,
                      temperature: float | jax.Array = 1.0,
                      top_k: int | None = None,
                      top_p: float | None = None) -> jax.Array:
    """Draws one token per row from ``logits [B, V]``.

    ``temperature == 0`` (a Python number) is greedy decoding; otherwise
    the draw is from ``softmax(transform_logits(logits, ...))`` by
    :func:`categorical`.
    """
    _check_top(top_k, top_p)
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits, axis=-1)
    return categorical(key, transform_logits(
        logits, temperature=temperature, top_k=top_k, top_p=top_p))


def completion_mask(completions: jax.Array, stop_token_ids) -> jax.Array:
    """``1.0`` for the tokens up to and including the first stop token of
    each row, ``0.0`` after it (all ones without stop tokens).

    ``stop_token_ids``: ``None``, one id, or a sequence of ids.
    """
    stops = _stop_ids(None, stop_token_ids)
    if not stops:
        return jnp.ones(completions.shape, jnp.float32)
    is_stop = jnp.isin(completions, jnp.asarray(stops))
    after = jnp.cumsum(is_stop, axis=1) - is_stop   # stops strictly before
    return (after == 0).astype(jnp.float32)


def cache_windows(prompt_length: int, slots: int,
                  step: int = 64) -> tuple[int, ...]:
    """The cache sizes of the decoding segments.

    Reading a key-value cache costs in proportion to its size, and on a
    small model that read dominates a step. Decoding therefore runs in
    segments whose caches grow: ``W`` slots, a multiple of ``step`` above
    the prompt, then exactly ``slots``; each segment decodes the steps whose
    tokens fit in ``W`` slots, and its cache is then copied into the next,
    larger one (:func:`grow_cache`), at the price of one compiled loop per
    segment.

    >>> cache_windows(16, 271)
    (64, 128, 192, 256, 271)
    """
    cuts = range((prompt_length // step + 1) * step, slots, step)
    return tuple(cuts) + (slots,)


def grow_cache(cache, larger):
    """``cache`` copied into the start of the empty ``larger`` one.

    Each leaf of ``larger`` is the leaf of ``cache`` padded with zeros along
    the one axis where their shapes differ (the slot axis); leaves of equal
    shape (the write index) are taken from ``cache``.
    """
    def grow(old, new):
        old, new = jnp.asarray(old), jnp.asarray(new)
        if old.shape == new.shape:
            return old
        diff = [a for a, (o, n) in enumerate(zip(old.shape, new.shape))
                if o != n]
        if (old.ndim != new.ndim or len(diff) != 1
                or old.shape[diff[0]] > new.shape[diff[0]]):
            raise ValueError(
                f"cannot grow a cache leaf of shape {old.shape} to "
                f"{new.shape}: `init_cache` must change one axis (the "
                f"slots) with `max_length`.")
        pad = [(0, 0)] * old.ndim
        pad[diff[0]] = (0, new.shape[diff[0]] - old.shape[diff[0]])
        return jnp.pad(old.astype(new.dtype), pad)
    return jax.tree_util.tree_map(grow, cache, larger)


def prompt_positions(prompt_mask: jax.Array) -> jax.Array:
    """Positions ``[B, L]`` of left-padded tokens: ``cumsum(mask) - 1``,
    ``0`` on the padding."""
    return jnp.maximum(jnp.cumsum(prompt_mask > 0, axis=1) - 1, 0)


def _check_prompts(prompts, prompt_mask):
    prompts = jnp.asarray(prompts)
    if (prompts.ndim != 2 or prompts.shape[1] < 1
            or not jnp.issubdtype(prompts.dtype, jnp.integer)):
        raise ValueError(
            f"`prompts` must be integer ids [B, Lp] with Lp >= 1, got "
            f"{prompts.dtype}{list(prompts.shape)}.")
    if prompt_mask is None:
        return prompts, None
    prompt_mask = jnp.asarray(prompt_mask)
    if prompt_mask.shape != prompts.shape:
        raise ValueError(
            f"`prompt_mask` must have the shape of `prompts` "
            f"{tuple(prompts.shape)}, got {tuple(prompt_mask.shape)}.")
    prompt_mask = prompt_mask > 0
    if not isinstance(prompt_mask, jax.core.Tracer):
        m = np.asarray(prompt_mask)
        if not m[:, -1].all() or (np.diff(m.astype(np.int8), axis=1) < 0).any():
            raise ValueError(
                "prompts must be left-padded: `prompt_mask` must be 0 on a "
                "(possibly empty) left part of each row and 1 after it, "
                "with the last column 1.")
    return prompts, prompt_mask


def _decoder_logits(model, tokens, valid):
    """A decoder's logits of left-padded ``tokens`` (no cache)."""
    return _logits_of(model(tokens, positions=prompt_positions(valid),
                            attention_mask=valid))


def completion_logits(model: Callable[..., Any], prompt: jax.Array,
                      completion: jax.Array,
                      prompt_mask: jax.Array | None = None) -> jax.Array:
    """Logits ``[B, N, V]`` predicting each completion token.

    Runs the model once on ``concat(prompt, completion)[:, :-1]`` and keeps
    the positions ``Lp - 1 ... Lp + N - 2``. With ``prompt_mask`` (padded
    prompts) the model must be a decoder (see the module docstring).
    """
    prompt, prompt_mask = _check_prompts(prompt, prompt_mask)
    tokens = jnp.concatenate([prompt, completion.astype(prompt.dtype)],
                             axis=1)[:, :-1]
    if prompt_mask is None:
        logits = _logits_of(model(tokens))
    else:
        if not is_decoder(model):
            raise ValueError(
                "padded prompts (`prompt_mask`) need a model with the "
                "decoder protocol (init_cache and a call taking positions "
                "and attention_mask); see artifex_fn.sampling.")
        valid = jnp.concatenate(
            [prompt_mask, jnp.ones(completion.shape, bool)], axis=1)[:, :-1]
        logits = _decoder_logits(model, tokens, valid)
    if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
        raise ValueError(
            f"the model must map tokens {tuple(tokens.shape)} to "
            f"logits [B, L, V], got shape {tuple(logits.shape)}.")
    return logits[:, prompt.shape[1] - 1:]


def _check_token_observations(observations) -> None:
    if not isinstance(observations, dict) or not {
            "prompt", "completion"} <= set(observations):
        raise ValueError(
            "with autoregressive generation, observations must be "
            "{'prompt': [B, Lp], 'completion': [B, N], 'prompt_mask'?}.")


def token_policy(model: Callable[..., Any], observations,
                 temperature: float | jax.Array = 1.0, *,
                 top_k: int | None = None, top_p: float | None = None):
    """``Categorical [B, N]`` over the completion tokens of ``observations``.

    ``observations`` is ``{"prompt": [B, Lp], "completion": [B, N],
    "prompt_mask"?: [B, Lp]}``. The logits are those of the sampling
    distribution (:func:`transform_logits`), with each completion token
    kept in its step's support, so that the log-probs of a fresh
    completion equal the behaviour log-probs :func:`generate` returned.
    """
    _check_token_observations(observations)
    completion = observations["completion"]
    logits = completion_logits(model, observations["prompt"], completion,
                               observations.get("prompt_mask"))
    return as_distribution(transform_logits(
        logits, temperature=temperature, top_k=top_k, top_p=top_p,
        keep=completion))


class _LogitsAndValues:
    """A decoder whose call returns ``[B, T, V + 1]``: the model's logits
    and its values (the last channel), from one pass of its trunk."""

    def __init__(self, model):
        self.model = model

    def init_cache(self, *args, **kwargs):   # the decoder protocol
        return self.model.init_cache(*args, **kwargs)

    def __call__(self, tokens, positions=None, attention_mask=None):
        logits, values = self.model.logits_and_values(
            tokens, positions=positions, attention_mask=attention_mask)
        return jnp.concatenate(
            [logits.astype(jnp.float32),
             values.astype(jnp.float32)[..., None]], axis=-1)


def token_actor_critic(model, observations,
                       temperature: float | jax.Array = 1.0, *,
                       top_k: int | None = None, top_p: float | None = None):
    """``(Categorical [B, N], values [B, N])`` over the completion tokens.

    The distribution is :func:`token_policy`'s (the sampling transform,
    each completion token kept in its step's support); ``values[:, t]`` is
    the model's value of the state in which completion token ``t`` was
    drawn (the same position as its logits). ``model`` provides
    ``logits_and_values(tokens, positions=, attention_mask=) -> ([B, T,
    V], [B, T])`` (e.g.
    :class:`~artifex_fn.families.autoregressive.ActorCriticLM`), and
    ``init_cache`` for padded prompts; both come from one pass.
    """
    if not callable(getattr(model, "logits_and_values", None)):
        raise ValueError(
            "an actor-critic token model needs `logits_and_values(tokens, "
            "positions=, attention_mask=) -> (logits, values)`; see "
            "artifex_fn.families.autoregressive.ActorCriticLM.")
    _check_token_observations(observations)
    completion = observations["completion"]
    wrapped = _LogitsAndValues(model)
    prompt, prompt_mask = observations["prompt"], observations.get(
        "prompt_mask")
    if prompt_mask is None and is_decoder(model):
        prompt_mask = jnp.ones(jnp.shape(prompt), bool)
    both = completion_logits(wrapped, prompt, completion, prompt_mask)
    logits, values = both[..., :-1], both[..., -1]
    return as_distribution(transform_logits(
        logits, temperature=temperature, top_k=top_k, top_p=top_p,
        keep=completion)), values


def bucket_length(length: int, bucketing: str | int | None = "pow2") -> int:
    """``length`` rounded up: to a power of two (``"pow2"``), a multiple of
    an integer, or unchanged (``None``)."""
    _check_bucketing(bucketing)
    checks.check_int(length, "length", lo=1)
    if bucketing is None:
        return length
    if bucketing == "pow2":
        return 1 << (length - 1).bit_length()
    return -(-length // bucketing) * bucketing


def pad_prompts(prompts, prompt_mask=None, *, pad_token_id: int = 0,
                bucketing: str | int | None = "pow2"):
    """Left-pads prompts to a bucketed length (on the host).

    Args:
      prompts: a list of token-id lists (ragged), or ``[B, L]`` ids.
      prompt_mask: for an array, optional ``[B, L]`` (``0`` = padding, on
        the left).
      pad_token_id: id written to the left.
      bucketing: see :func:`bucket_length`.

    Returns:
      ``(prompts [B, Lb] int32, prompt_mask [B, Lb] float32)`` as NumPy
      arrays, ``Lb = bucket_length(max length)``.

    >>> p, m = pad_prompts([[5, 6, 7], [8]])
    >>> p.tolist(), m.tolist()
    ([[0, 5, 6, 7], [0, 0, 0, 8]], [[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    """
    checks.check_int(pad_token_id, "pad_token_id", lo=0)
    if isinstance(prompts, (list, tuple)) and (
            not prompts or not np.isscalar(prompts[0])):
        if prompt_mask is not None:
            raise ValueError("`prompt_mask` goes with an array of prompts, "
                             "not with a list of token lists.")
        rows = [np.asarray(r, np.int64).reshape(-1) for r in prompts]
        if not rows or min(len(r) for r in rows) < 1:
            raise ValueError("every prompt needs at least one token.")
        width = max(len(r) for r in rows)
        arr = np.full((len(rows), width), pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), np.float32)
        for i, r in enumerate(rows):
            arr[i, width - len(r):] = r
            mask[i, width - len(r):] = 1.0
    else:
        arr, mask_arr = _check_prompts(prompts, prompt_mask)
        arr = np.asarray(arr, np.int32)
        mask = (np.ones(arr.shape, np.float32) if mask_arr is None
                else np.asarray(mask_arr, np.float32))
    width = bucket_length(arr.shape[1], bucketing)
    extra = width - arr.shape[1]
    if extra:
        arr = np.pad(arr, ((0, 0), (extra, 0)), constant_values=pad_token_id)
        mask = np.pad(mask, ((0, 0), (extra, 0)))
    return arr, mask


class Generation(NamedTuple):
    """What :func:`generate` returns.

    Attributes:
      tokens: ``[B, N]`` completion ids (``pad_token_id`` after a stop).
      mask: ``[B, N]`` float32, 1 up to and including the first stop token.
      log_probs: ``[B, N]`` float32 behaviour log-probs of the tokens under
        the sampling distribution (0 where ``mask`` is 0).
    """
    tokens: jax.Array
    mask: jax.Array
    log_probs: jax.Array


def generate(model: Callable[..., Any], prompts: jax.Array, key: jax.Array,
             *, max_new_tokens: int, prompt_mask: jax.Array | None = None,
             temperature: float | jax.Array = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | None = None,
             stop_token_ids: Sequence[int] = (), pad_token_id: int = 0,
             cache_dtype: Any = None, use_cache: bool = True) -> Generation:
    """Samples up to ``max_new_tokens`` tokens after each prompt.

    A decoder (see the module docstring) is prefilled with the prompts and
    decoded with its key-value cache of ``Lp + N - 1`` slots; any other
    causal ``tokens -> logits`` callable is rerun on the whole buffer at
    every step. Both run one ``lax.while_loop`` that stops when every row
    has emitted a stop token (or after ``N`` tokens); token ``i`` is drawn
    with ``fold_in(key, i)``, so the two paths draw the same tokens from the
    same logits.

    Args:
      model: a decoder, or ``tokens [B, L] -> logits [B, L, V]`` (or a
        ``Categorical`` over them) of a causal model.
      prompts: ``[B, Lp]`` integer ids, left-padded.
      key: PRNG key.
      max_new_tokens: ``N >= 1``.
      prompt_mask: optional ``[B, Lp]``, ``0`` on the left padding (needs
        a decoder).
      temperature: ``0`` (a Python number) for greedy decoding, else
        ``> 0``; may be traced.
      top_k: optional top-k sampling (static).
      top_p: optional nucleus sampling in ``(0, 1]``.
      eos_token_id, stop_token_ids: tokens that end a completion (kept in
        it).
      pad_token_id: written after the end.
      cache_dtype: optional dtype of the cache (``init_cache(...,
        dtype=)``).
      use_cache: ``False``: rerun a decoder on the whole buffer each step
        (the reference for the cached path).

    Returns:
      :class:`Generation` ``(tokens [B, N], mask [B, N], log_probs [B, N])``.
      With greedy decoding the log-probs are those of temperature 1.

    >>> import jax, jax.numpy as jnp
    >>> bigram = lambda t: jax.nn.one_hot((t + 1) % 5, 5) * 50.0
    >>> out = generate(bigram, jnp.array([[0], [2]]), jax.random.key(0),
    ...                max_new_tokens=4, eos_token_id=4)
    >>> out.tokens.tolist(), out.mask.tolist()
    ([[1, 2, 3, 4], [3, 4, 0, 0]], [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    """
    checks.check_int(max_new_tokens, "max_new_tokens", lo=1)
    checks.check_hparam(temperature, "temperature", lo=0.0)
    checks.check_int(pad_token_id, "pad_token_id", lo=0)
    _check_top(top_k, top_p)
    stops = _stop_ids(eos_token_id, stop_token_ids)
    prompts, prompt_mask = _check_prompts(prompts, prompt_mask)
    decoder = is_decoder(model)
    if prompt_mask is not None and not decoder:
        raise ValueError(
            "padded prompts (`prompt_mask`) need a model with the decoder "
            "protocol (init_cache and a call taking positions and "
            "attention_mask); see artifex_fn.sampling.")
    greedy = isinstance(temperature, (int, float)) and temperature == 0
    scale = 1.0 if greedy else temperature
    b, lp = prompts.shape
    n = max_new_tokens
    slots = lp + n - 1
    valid = jnp.concatenate(
        [jnp.ones((b, lp), bool) if prompt_mask is None else prompt_mask,
         jnp.ones((b, n - 1), bool)], axis=1)
    lengths = jnp.sum(valid[:, :lp], axis=1).astype(jnp.int32)
    stop_arr = jnp.asarray(stops if stops else (-1,), prompts.dtype)

    def draw(logits, i):
        x = transform_logits(logits, temperature=scale, top_k=top_k,
                             top_p=top_p)
        if greedy:
            tok = jnp.argmax(x, axis=-1)
        else:
            tok = categorical(jax.random.fold_in(key, i), x)
        logp = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1),
                                   tok[:, None], axis=-1)[:, 0]
        return tok.astype(prompts.dtype), logp

    def check_logits(logits, t):
        if logits.ndim != 3 or logits.shape[:2] != (b, t):
            raise ValueError(
                f"the model must map tokens {(b, t)} to logits [B, T, V], "
                f"got shape {tuple(logits.shape)}.")
        return logits

    windows = None
    if decoder and use_cache:
        # Segments of growing caches: each step reads only the slots that
        # can be filled by its segment's end (see ``cache_windows``).
        windows = cache_windows(lp, slots)

        def new_cache(length):
            if cache_dtype is None:
                return model.init_cache(b, length)
            return model.init_cache(b, length, dtype=cache_dtype)

        cache = new_cache(windows[0])
        out, cache = model(prompts, positions=prompt_positions(valid[:, :lp]),
                           attention_mask=valid[:, :windows[0]], cache=cache)
        first = check_logits(_logits_of(out), lp)[:, -1]

        def advance(state, prev, i, window):
            out, state = model(prev[:, None],
                               positions=(lengths + i - 1)[:, None],
                               attention_mask=valid[:, :window], cache=state)
            return check_logits(_logits_of(out), 1)[:, 0], state
    else:
        buffer = jnp.concatenate(
            [prompts, jnp.full((b, n - 1), pad_token_id, prompts.dtype)],
            axis=1)
        if decoder:
            positions = prompt_positions(valid)

            def run(tokens):
                return check_logits(_logits_of(model(
                    tokens, positions=positions, attention_mask=valid)),
                    slots)
        else:
            def run(tokens):
                return check_logits(_logits_of(model(tokens)), slots)
        first = run(buffer)[:, lp - 1]
        cache = buffer

        def advance(state, prev, i, window):
            del window
            state = lax.dynamic_update_index_in_dim(state, prev, lp + i - 1,
                                                    axis=1)
            logits = lax.dynamic_index_in_dim(run(state), lp + i - 1, axis=1,
                                              keepdims=False)
            return logits, state

    tok, logp = draw(first, 0)
    tokens = jnp.full((b, n), pad_token_id, prompts.dtype).at[:, 0].set(tok)
    log_probs = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp)
    done = jnp.isin(tok, stop_arr)

    def segment(carry, end, window):
        """Steps up to ``end`` (exclusive), reading ``window`` slots."""
        def cond(carry):
            i, _, _, done, _, _ = carry
            return (i < end) & ~jnp.all(done)

        def body(carry):
            i, tokens, log_probs, done, state, prev = carry
            logits, state = advance(state, prev, i, window)
            tok, logp = draw(logits, i)
            tok = jnp.where(done, pad_token_id, tok).astype(tokens.dtype)
            logp = jnp.where(done, 0.0, logp)
            tokens = lax.dynamic_update_index_in_dim(tokens, tok, i, axis=1)
            log_probs = lax.dynamic_update_index_in_dim(log_probs, logp, i,
                                                        axis=1)
            return (i + 1, tokens, log_probs, done | jnp.isin(tok, stop_arr),
                    state, tok)

        return lax.while_loop(cond, body, carry)

    carry = (jnp.asarray(1, jnp.int32), tokens, log_probs, done, cache, tok)
    # Step i feeds token i - 1 at slot lp + i - 1 and reads slots <= it.
    for j, window in enumerate(windows or (slots,)):
        if j:
            carry = carry[:4] + (grow_cache(carry[4], new_cache(window)),
                                 carry[5])
        carry = segment(carry, min(window - lp + 1, n), window)
    _, tokens, log_probs, _, _, _ = carry
    mask = completion_mask(tokens, stops)
    return Generation(tokens, mask, log_probs * mask)


def sample_one_step(apply: Callable[[Any], Any], observations, key):
    """One draw per row of a one-step policy: ``(samples, log_probs [B])``."""
    dist = as_distribution(apply(observations))
    samples, log_prob = dist.sample_and_log_prob(seed=key)
    return samples, reduce_to_rank(log_prob, 1, "log_prob")
