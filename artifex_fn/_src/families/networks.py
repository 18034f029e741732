"""Small Flax NNX networks used by the examples, tasks and tests.

* :class:`TinyCausalLM`: a causal transformer language model
  (``tokens [B, L] -> logits [B, L, V]``) with rotary positions and a
  key-value cache (the decoder protocol of :mod:`artifex_fn.sampling`);
* :class:`EpsMLP`: a noise-prediction MLP for 2-D diffusion
  (``eps_theta(x_t [N, 2], t [N]) -> [N, 2]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from artifex_fn._src import checks

# Score of a masked key: finite, so a query with no visible key (a padded
# position) gets finite (unused) outputs instead of NaN.
_MASKED = -1e30


def rotary(x: jax.Array, positions: jax.Array, *,
           base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021, "RoFormer").

    Each head vector's two halves ``(x_1, x_2)`` are rotated by the angles
    ``p * base^{-2i/d}`` of its position ``p``:

    .. math::
        (x_1, x_2) \\mapsto (x_1 \\cos\\theta - x_2 \\sin\\theta,\\;
        x_2 \\cos\\theta + x_1 \\sin\\theta),

    so that the dot product of a query and a key depends on their positions
    only through ``p_q - p_k``.

    Args:
      x: ``[B, T, H, Dh]`` with ``Dh`` even.
      positions: ``[B, T]`` integer positions.
      base: frequency base.

    Returns:
      ``x`` rotated, in its dtype (angles in float32).
    """
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None] * freq   # [B, T, half]
    cos = jnp.cos(angle)[:, :, None, :]
    sin = jnp.sin(angle)[:, :, None, :]
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                           axis=-1).astype(x.dtype)


class CausalSelfAttention(nnx.Module):
    """Multi-head self-attention with rotary positions and a key-value cache.

    Keys and values of the cache are ``[B, H, S, Dh]``; the ``T`` new
    tokens are written at slots ``index ... index + T - 1``. Scores and the
    softmax are computed in float32 whatever the model's dtype.
    """

    def __init__(self, d_model: int, num_heads: int, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = nnx.Linear(d_model, 3 * d_model, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h, positions, mask, cache=None, index=None):
        """``h [B, T, D]``, ``positions [B, T]``, ``mask [B, T, S]`` (bool;
        ``S = T`` without a cache) -> ``([B, T, D], new layer cache)``."""
        b, t, d = h.shape
        heads, dh = self.num_heads, d // self.num_heads
        qkv = self.qkv(h).reshape(b, t, 3, heads, dh)
        q = rotary(qkv[:, :, 0], positions)
        k = rotary(qkv[:, :, 1], positions)
        v = qkv[:, :, 2]
        q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, H, T, Dh]
        if cache is not None:
            k = lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype),
                                         (0, 0, index, 0))
            v = lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype),
                                         (0, 0, index, 0))
            cache = dict(k=k, v=v)
        scores = jnp.einsum("bhtd,bhsd->bhts", q, k.astype(q.dtype),
                            preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None], scores / jnp.sqrt(dh), _MASKED)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhts,bhsd->bhtd", weights, v)
        out = jnp.swapaxes(out, 1, 2).reshape(b, t, d).astype(h.dtype)
        return self.out(out), cache


class CausalBlock(nnx.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP.

    .. math::
        h \\leftarrow h + \\mathrm{MHA}(\\mathrm{LN}(h), \\mathrm{mask}),
        \\qquad h \\leftarrow h + W_2\\, \\mathrm{gelu}(W_1\\,
        \\mathrm{LN}(h))
    """

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: int, *,
                 dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln1 = nnx.LayerNorm(d_model, **kw)
        self.attn = CausalSelfAttention(d_model, num_heads, **kw)
        self.ln2 = nnx.LayerNorm(d_model, **kw)
        self.mlp_in = nnx.Linear(d_model, mlp_ratio * d_model, **kw)
        self.mlp_out = nnx.Linear(mlp_ratio * d_model, d_model, **kw)

    def __call__(self, h, positions, mask, cache=None, index=None):
        """``h [B, T, D]`` -> ``([B, T, D], new layer cache)``."""
        a, cache = self.attn(self.ln1(h), positions, mask, cache, index)
        h = h + a
        return h + self.mlp_out(nnx.gelu(self.mlp_in(self.ln2(h)))), cache


class TinyCausalLM(nnx.Module):
    """A small causal transformer language model with a key-value cache.

    Token embeddings, ``num_layers`` pre-norm blocks of causal multi-head
    self-attention with rotary positions (:func:`rotary`) and an MLP, a
    final layer norm and a linear head. It implements the decoder protocol
    of :mod:`artifex_fn.sampling`:

    * ``model(tokens [B, T])`` -> logits ``[B, T, V]`` (positions
      ``0 ... T - 1``, causal);
    * ``model(tokens, positions=[B, T], attention_mask=[B, S])``: the
      positions of the tokens and which of them hold real tokens (``0``
      marks padding; position ``t`` sees position ``s`` iff ``s <= t`` and
      ``attention_mask[b, s]``), e.g. for left-padded prompts;
    * ``model.init_cache(batch_size, max_length)`` and
      ``model(tokens, positions=..., attention_mask=[B, S], cache=cache)``
      -> ``(logits [B, T, V], cache)``: the ``T`` tokens are written at the
      cache's next ``T`` slots and attend to the filled slots that
      ``attention_mask`` (over all ``S = max_length`` slots) marks.

    An ``attention_mask`` of shape ``[B, T, S]`` is used as given (query
    ``t`` may attend to slot ``s`` iff true).

    Args:
      vocab_size: number of tokens ``V``.
      max_len: optional longest input (checked; rotary positions have no
        table, so ``None`` allows any length).
      d_model: width ``D``.
      num_heads: attention heads (``D / num_heads`` must be even).
      num_layers: number of blocks.
      mlp_ratio: hidden width of the MLP over ``D``.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); attention scores
        and softmax are float32.
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` for the initialisation.
    """

    def __init__(self, vocab_size: int, *, max_len: int | None = None,
                 d_model: int = 32, num_heads: int = 2, num_layers: int = 1,
                 mlp_ratio: int = 2, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model),
                            ("num_heads", num_heads),
                            ("num_layers", num_layers),
                            ("mlp_ratio", mlp_ratio)):
            checks.check_int(value, name, lo=1)
        if max_len is not None:
            checks.check_int(max_len, "max_len", lo=1)
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ValueError(
                f"`d_model` ({d_model}) must be `num_heads` ({num_heads}) "
                f"times an even head width (rotary positions rotate pairs).")
        self.max_len = max_len
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embed = nnx.Embed(vocab_size, d_model, **kw)
        self.blocks = nnx.List([CausalBlock(d_model, num_heads, mlp_ratio,
                                            **kw)
                                for _ in range(num_layers)])
        self.ln_f = nnx.LayerNorm(d_model, **kw)
        self.head = nnx.Linear(d_model, vocab_size, **kw)

    def init_cache(self, batch_size: int, max_length: int, dtype=None):
        """An empty cache of ``max_length`` slots: ``{"index": 0, "layers":
        [{"k", "v"}: [B, H, S, Dh]] per block}`` in ``dtype`` (default: the
        model's)."""
        checks.check_int(batch_size, "batch_size", lo=1)
        checks.check_int(max_length, "max_length", lo=1)
        shape = (batch_size, self.num_heads, max_length, self.head_dim)
        dtype = self.dtype if dtype is None else dtype
        return dict(index=jnp.zeros((), jnp.int32),
                    layers=[dict(k=jnp.zeros(shape, dtype),
                                 v=jnp.zeros(shape, dtype))
                            for _ in self.blocks])

    def features(self, tokens: jax.Array, *, positions=None,
                 attention_mask=None) -> jax.Array:
        """The final (layer-normed) hidden states ``[B, T, D]`` of ``tokens
        [B, T]``, before the vocabulary head: features for value and reward
        heads (no cache)."""
        return self._hidden(tokens, positions, attention_mask, None)[0]

    def __call__(self, tokens: jax.Array, *, positions=None,
                 attention_mask=None, cache=None):
        """Next-token logits ``[B, T, V]`` for ``tokens [B, T]`` (with a
        cache: ``(logits, new cache)``)."""
        h, cache = self._hidden(tokens, positions, attention_mask, cache)
        logits = self.head(h)
        return logits if cache is None else (logits, cache)

    def _hidden(self, tokens, positions, attention_mask, cache):
        tokens = jnp.asarray(tokens)
        b, t = tokens.shape
        if cache is None:
            slots, index = t, jnp.zeros((), jnp.int32)
        else:
            slots, index = cache["layers"][0]["k"].shape[2], cache["index"]
        if self.max_len is not None and slots > self.max_len:
            raise ValueError(f"`tokens` (with the cache) span {slots} "
                             f"positions, more than max_len={self.max_len}.")
        if positions is None:
            positions = index + jnp.arange(t)
        positions = jnp.broadcast_to(positions, (b, t))
        mask = _attention_mask(attention_mask, b, t, slots, index)
        h = self.token_embed(tokens)
        layers = []
        for i, block in enumerate(self.blocks):
            h, layer = block(h, positions, mask,
                             None if cache is None else cache["layers"][i],
                             index)
            layers.append(layer)
        h = self.ln_f(h)
        if cache is None:
            return h, None
        return h, dict(index=index + t, layers=layers)


def _attention_mask(attention_mask, b, t, slots, index):
    """``[B, T, S]`` bool: causal over the slots, and the key slots marked."""
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape == (b, t, slots):
            return attention_mask.astype(bool)
        if attention_mask.shape != (b, slots):
            raise ValueError(
                f"`attention_mask` must be [B, S] = {(b, slots)} or [B, T, "
                f"S] = {(b, t, slots)} (S: the cache's slots, else T), got "
                f"{tuple(attention_mask.shape)}.")
    causal = (jnp.arange(slots)[None, :]
              <= index + jnp.arange(t)[:, None])[None]
    if attention_mask is None:
        return jnp.broadcast_to(causal, (b, t, slots))
    return causal & (attention_mask > 0)[:, None, :]


class EpsMLP(nnx.Module):
    """``eps_theta(x_t, t)``: ``x_t [N, 2]``, ``t int [N]`` -> ``[N, 2]``.

    Three SiLU layers of width ``hidden``; a learned embedding of ``t`` is
    added to the first two pre-activations.
    """

    data_shape = (2,)

    def __init__(self, num_timesteps: int, hidden: int = 128, *, rngs):
        self.embed = nnx.Embed(num_timesteps, hidden, rngs=rngs)
        self.inp = nnx.Linear(2, hidden, rngs=rngs)
        self.h1 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.h2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 2, rngs=rngs)

    def __call__(self, x_t, t):
        e = self.embed(t)
        h = nnx.silu(self.inp(x_t) + e)
        h = nnx.silu(self.h1(h) + e)
        h = nnx.silu(self.h2(h))
        return self.out(h)


class ActorCriticLM(nnx.Module):
    """A decoder language model with a value head: the actor-critic of
    RLHF-PPO.

    The value head reads the features of the policy's own trunk (the
    default: one forward pass gives both) or of a separate ``critic``
    trunk (the same architecture or another; twice the compute, no
    interference between the two objectives). The value at a position is
    that of the state whose next token is drawn there.

    Args:
      lm: a decoder with ``features(tokens, positions=, attention_mask=)``
        and a vocabulary ``head`` (e.g. :class:`TinyCausalLM`).
      critic: optional separate trunk with ``features``.
      num_features: the features' width (default: ``lm.head.in_features``).
      rngs: initialises the value head (zero kernel: values start at the
        head's bias, 0).

    The decoder protocol (``init_cache``, ``model(tokens, positions=,
    attention_mask=, cache=)``) is the ``lm``'s, so
    :func:`artifex_fn.sampling.generate` samples from it;
    ``logits_and_values(tokens, positions=, attention_mask=)`` gives
    ``([B, T, V], [B, T])`` for
    :func:`artifex_fn.sampling.token_actor_critic`.
    """

    def __init__(self, lm: nnx.Module, *, critic: nnx.Module | None = None,
                 num_features: int | None = None, rngs: nnx.Rngs):
        self.lm = lm
        self.critic = critic
        if num_features is None:
            source = lm if critic is None else critic
            head = getattr(source, "head", None)
            if head is None:
                raise ValueError("give `num_features`: the width of the "
                                 "trunk's features.")
            num_features = head.in_features
        self.value_head = nnx.Linear(num_features, 1,
                                     kernel_init=nnx.initializers.zeros,
                                     rngs=rngs)

    def init_cache(self, *args, **kwargs):
        return self.lm.init_cache(*args, **kwargs)

    def __call__(self, tokens, *, positions=None, attention_mask=None,
                 cache=None):
        return self.lm(tokens, positions=positions,
                       attention_mask=attention_mask, cache=cache)

    def logits_and_values(self, tokens, *, positions=None,
                          attention_mask=None):
        h = self.lm.features(tokens, positions=positions,
                             attention_mask=attention_mask)
        logits = self.lm.head(h)
        if self.critic is not None:
            h = self.critic.features(tokens, positions=positions,
                                     attention_mask=attention_mask)
        values = self.value_head(h.astype(jnp.float32))[..., 0]
        return logits, values
