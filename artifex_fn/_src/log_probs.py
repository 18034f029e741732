"""Token log-probabilities from logits, and masked per-sequence reductions.

``token_log_probs`` is a selective log-softmax: it returns
:math:`\\log\\mathrm{softmax}(z)_y = z_y - \\mathrm{logsumexp}(z)` for the
chosen token ``y`` only. The log-sum-exp is accumulated in float32 from the
logits in their own dtype, so a ``[B, L, V]`` bfloat16 input never gets a
float32 ``[B, L, V]`` copy; ``chunk_size`` bounds the working set further by
mapping over chunks of rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from artifex_fn._src import checks


def _selective_log_softmax(logits, tokens, dt, valid=None,
                           temperature=None):
    """``log_softmax(logits / temperature)[tokens]``; rows where ``valid``
    is False give 0.

    Padded rows are replaced inside each reduction (no cleaned copy of the
    ``[..., V]`` logits is made), before any arithmetic, so their contents
    (NaN, all ``-inf``, ids out of range) reach neither the result nor
    the gradient.
    """
    if valid is not None:
        tokens = jnp.where(valid, tokens, 0)

    def prep(x, row_valid):
        if valid is not None:
            x = jnp.where(row_valid, x, 0)
        return x if temperature is None else x / temperature

    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    cells = None if valid is None else valid[..., None]
    top = lax.stop_gradient(jnp.max(prep(logits, cells), axis=-1,
                                    keepdims=True))
    # Keep the gather out of the fusion that reads the logits for the
    # log-sum-exp: fused together, XLA:CPU materialises the float32
    # conversion of a half-precision [..., V] input.
    picked, logits = lax.optimization_barrier((picked, logits))
    picked = prep(picked, valid)
    sum_exp = jnp.sum(jnp.exp((prep(logits, cells) - top).astype(dt)),
                      axis=-1)
    # Subtract the max before adding anything: the result keeps the
    # precision of log_softmax whatever the logits' magnitude.
    out = (picked - top[..., 0]).astype(dt) - jnp.log(sum_exp)
    return out if valid is None else jnp.where(valid, out, 0.0)


def _chunked(logits, tokens, dt, chunk_size, valid=None, temperature=None):
    """Selective log-softmax over ``[rows, V]``, ``chunk_size`` rows a step.

    Chunks are read with ``dynamic_slice`` from the input itself (no padded
    or sliced copy of the logits); when ``chunk_size`` does not divide the
    rows, the last chunk is shifted back to end at the last row and
    overlaps its predecessor, rewriting identical values.
    """
    rows, vocab = logits.shape
    if chunk_size >= rows:
        return _selective_log_softmax(logits, tokens, dt, valid, temperature)
    n_chunks = -(-rows // chunk_size)

    def body(i, out):
        start = jnp.minimum(i * chunk_size, rows - chunk_size)
        block = lax.dynamic_slice(logits, (start, 0), (chunk_size, vocab))
        toks = lax.dynamic_slice(tokens, (start,), (chunk_size,))
        ok = (None if valid is None else
              lax.dynamic_slice(valid, (start,), (chunk_size,)))
        return lax.dynamic_update_slice(
            out, _selective_log_softmax(block, toks, dt, ok, temperature),
            (start,))

    return lax.fori_loop(0, n_chunks, body, jnp.zeros((rows,), dt))


def token_log_probs(
    logits: jax.Array,
    tokens: jax.Array,
    *,
    temperature: float | jax.Array | None = None,
    chunk_size: int | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    r"""Log-probability of each chosen token, :math:`\log p(y_t | \cdot)`.

    Args:
      logits: ``[..., V]`` unnormalised logits (any float dtype).
      tokens: ``[...]`` integer token ids, the shape of ``logits`` without
        its last axis.
      temperature: optional sampling temperature ``> 0``; logits are
        divided by it.
      chunk_size: if given, rows (all leading axes flattened) are processed
        ``chunk_size`` at a time with ``lax.map`` to bound peak memory.
      mask: optional mask broadcastable to ``tokens``; padded positions
        give zero with zero gradient, whatever their logits and token ids
        hold (NaN, a row of ``-inf``, a padding id such as ``-1``).

    Returns:
      ``[...]`` log-probabilities in at least float32 (half-precision logits
      give float32: log-prob differences feed importance ratios, where
      bfloat16 rounding would dominate).

    Raises:
      ValueError: for concrete token ids outside ``[0, V)`` at unmasked
        positions, or a concrete ``temperature <= 0``. Traced ones (inside
        the caller's ``jit``) give NaN there instead.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.token_log_probs(jnp.zeros((1, 2, 4)), jnp.array([[0, 3]]))
      Array([[-1.3862944, -1.3862944]], dtype=float32)
    """
    logits = jnp.asarray(logits)
    tokens = jnp.asarray(tokens)
    checks.check_min_rank(logits, 1, "logits")
    checks.check_shape(tokens, logits.shape[:-1], "tokens",
                       "the shape of `logits` without its last axis")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"`tokens` must be integers, got dtype {tokens.dtype}.")
    _, dt = checks.float_dtypes(logits)
    valid = checks.valid_mask(mask, tokens.shape)
    ok = checks.check_hparam(temperature, "temperature", lo=0.0,
                             lo_open=True, optional=True)
    in_vocab = _check_token_ids(tokens, logits.shape[-1], valid)
    if temperature is not None:
        temperature = jnp.asarray(temperature, logits.dtype)
    if chunk_size is not None and (not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(
            f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    if chunk_size is None:
        out = _selective_log_softmax(logits, tokens, dt, valid, temperature)
    else:
        lead = logits.shape[:-1]
        rows = math.prod(lead)
        out = _chunked(logits.reshape(rows, logits.shape[-1]),
                       tokens.reshape(rows), dt, chunk_size,
                       None if valid is None else valid.reshape(rows),
                       temperature).reshape(lead)
    if in_vocab is not None:  # traced ids out of range: NaN, not a wrap
        out = jnp.where(in_vocab, out, jnp.nan)
    return checks.nan_unless(ok, out)


def _check_token_ids(tokens, vocab, valid):
    """Checks ``0 <= tokens < vocab`` where ``valid`` (all when None).

    Concrete ids out of range raise ``ValueError`` (a gather would wrap
    ``-1`` to the last token, or read garbage); traced ones cannot, so the
    returned boolean array marks them and the caller makes their
    log-probabilities NaN. Returns None for concrete ids.
    """
    inside = (tokens >= 0) & (tokens < vocab)
    if valid is not None:
        inside = inside | ~valid
    if checks._is_traced(tokens) or checks._is_traced(valid):
        return inside
    inside = np.asarray(inside)
    if not inside.all():
        where = tuple(int(i) for i in np.argwhere(~inside)[0])
        raise ValueError(
            f"`tokens` must be ids in [0, {vocab}) (the last axis of "
            f"`logits`) wherever `mask` is set; got "
            f"{int(np.asarray(tokens)[where])} at index {where}.")
    return None


def _mask_like(mask, x, name="mask"):
    if mask is None:
        return jnp.ones(x.shape, x.dtype)
    mask = jnp.asarray(mask)
    checks.check_broadcastable(mask, x.shape, name)
    return jnp.broadcast_to(mask, x.shape).astype(x.dtype)


def sequence_lengths(mask: jax.Array, *, axis: int = -1) -> jax.Array:
    """Number of valid tokens of each sequence, ``sum(mask, axis)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.sequence_lengths(jnp.array([[1, 1, 0], [1, 0, 0]]))
      Array([2., 1.], dtype=float32)
    """
    mask = jnp.asarray(mask)
    checks.check_min_rank(mask, 1, "mask")
    return jnp.sum(mask.astype(jnp.float32), axis=axis)


def sequence_log_probs(
    token_log_probs: jax.Array,
    mask: jax.Array | None = None,
    *,
    normalize: bool = False,
    axis: int = -1,
) -> jax.Array:
    """Masked sum (or, with ``normalize``, mean) of token log-probs.

    The sum is :math:`\\log\\pi(y|x)` of a whole response, the input of
    :func:`artifex_fn.dpo_loss`; the mean is SimPO's length-normalised score.
    Padding entries are ignored even when they hold ``-inf`` or NaN; an
    empty sequence gives ``0``.

    Args:
      token_log_probs: ``[..., L]`` per-token log-probabilities.
      mask: optional mask broadcastable to ``token_log_probs``.
      normalize: divide by the number of valid tokens.
      axis: the token axis.

    Returns:
      ``[...]`` per-sequence values.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> lp = jnp.array([[-1.0, -2.0, -jnp.inf]])
      >>> afn.sequence_log_probs(lp, jnp.array([[1, 1, 0]]))
      Array([-3.], dtype=float32)
    """
    x = jnp.asarray(token_log_probs)
    checks.check_min_rank(x, 1, "token_log_probs")
    m = _mask_like(mask, x)
    m = jnp.where(m > 0, m, 0)
    total = jnp.sum(jnp.where(m > 0, x, 0) * m, axis=axis)
    if not normalize:
        return total
    count = jnp.sum(m, axis=axis)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1), 0.0)
