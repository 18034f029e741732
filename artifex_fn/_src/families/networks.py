"""Small Flax NNX networks used by the examples, tasks and tests.

* :class:`TinyCausalLM`: a causal transformer language model
  (``tokens [B, L] -> logits [B, L, V]``);
* :class:`EpsMLP`: a noise-prediction MLP for 2-D diffusion
  (``eps_theta(x_t [N, 2], t [N]) -> [N, 2]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from artifex_fn._src import checks


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
            checks.check_int(value, name, lo=1)
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
