"""Completion lengths: truncation and the over-long penalty (DAPO).

A sampled completion either ends with a stop token or is cut at the length
limit. Yu et al. 2025 (DAPO, section 3.4) show that training on truncated
completions as if they had ended adds reward noise: a sound but unfinished
answer is punished for its length. Their two remedies are here:

* over-long filtering: :func:`truncated_completions` flags the cut
  completions, whose loss the caller then masks out
  (``GRPOConfig.mask_truncated_completions``);
* soft over-long punishment: :func:`overlong_penalty`, added to the reward,
  is zero up to ``max_length - cache_length`` tokens, then falls linearly
  to ``-1`` at ``max_length`` (DAPO eq. 13).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from artifex_fn._src import checks


def _stop_ids(eos_token_id, stop_token_ids) -> tuple[int, ...]:
    ids = [] if eos_token_id is None else [eos_token_id]
    ids += list(stop_token_ids or ())
    out = []
    for i in ids:
        checks.check_int(i, "stop_token_ids", lo=0)
        if i not in out:
            out.append(int(i))
    return tuple(out)


def completion_lengths(tokens: jax.Array, *, eos_token_id: int | None = None,
                       stop_token_ids: Sequence[int] = ()) -> jax.Array:
    """Tokens up to and including the first stop token (``N`` if none).

    Args:
      tokens: ``[..., N]`` completion ids.
      eos_token_id, stop_token_ids: the ids that end a completion.

    Returns:
      ``int32 [...]`` lengths in ``[1, N]`` (``N`` when no stop token).

    Examples:
      >>> import jax.numpy as jnp
      >>> completion_lengths(jnp.array([[5, 2, 0], [5, 6, 7]]),
      ...                    eos_token_id=2)
      Array([2, 3], dtype=int32)
    """
    tokens = jnp.asarray(tokens)
    checks.check_min_rank(tokens, 1, "tokens")
    n = tokens.shape[-1]
    stops = _stop_ids(eos_token_id, stop_token_ids)
    is_stop = jnp.zeros(tokens.shape, bool)
    for i in stops:
        is_stop = is_stop | (tokens == i)
    first = jnp.argmax(is_stop, axis=-1)
    return jnp.where(jnp.any(is_stop, axis=-1), first + 1, n).astype(
        jnp.int32)


def truncated_completions(tokens: jax.Array, mask: jax.Array | None = None,
                          *, eos_token_id: int | None = None,
                          stop_token_ids: Sequence[int] = ()) -> jax.Array:
    """Flags completions cut at the length limit: no valid stop token.

    Args:
      tokens: ``[..., N]`` completion ids.
      mask: optional ``[..., N]`` completion mask (zero after the end);
        padded positions may hold anything.
      eos_token_id, stop_token_ids: the ids that end a completion; at least
        one is needed.

    Returns:
      ``bool [...]``: True where no valid token is a stop token.

    Examples:
      >>> import jax.numpy as jnp
      >>> truncated_completions(jnp.array([[5, 2, 0], [5, 6, 7]]),
      ...                       eos_token_id=2)
      Array([False,  True], dtype=bool)
    """
    tokens = jnp.asarray(tokens)
    checks.check_min_rank(tokens, 1, "tokens")
    stops = _stop_ids(eos_token_id, stop_token_ids)
    if not stops:
        raise ValueError("truncated_completions needs `eos_token_id` or "
                         "`stop_token_ids`: the ids that end a completion.")
    is_stop = jnp.zeros(tokens.shape, bool)
    for i in stops:
        is_stop = is_stop | (tokens == i)
    if mask is not None:
        is_stop = is_stop & checks.valid_mask(mask, tokens.shape)
    return ~jnp.any(is_stop, axis=-1)


def overlong_penalty(lengths: jax.Array, *, max_length: int,
                     cache_length: int) -> jax.Array:
    r"""DAPO's soft over-long punishment (Yu et al. 2025, eq. 13).

    .. math::
        R(\ell) = \begin{cases}
          0 & \ell \le L_{max} - L_{cache} \\
          \frac{(L_{max} - L_{cache}) - \ell}{L_{cache}} &
            L_{max} - L_{cache} < \ell \le L_{max} \\
          -1 & \ell > L_{max}
        \end{cases}

    Added to the task reward, it punishes answers more the further they
    run into the last ``cache_length`` tokens before ``max_length``.

    Args:
      lengths: ``[...]`` completion lengths (any number type).
      max_length: :math:`L_{max}`, an int ``>= 1``.
      cache_length: :math:`L_{cache}`, an int in ``[1, max_length]``.

    Returns:
      ``float32 [...]`` penalties in ``[-1, 0]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> overlong_penalty(jnp.array([4, 6, 8, 9]), max_length=8,
      ...                  cache_length=4)
      Array([ 0. , -0.5, -1. , -1. ], dtype=float32)
    """
    checks.check_int(max_length, "max_length", lo=1)
    checks.check_int(cache_length, "cache_length", lo=1)
    if cache_length > max_length:
        raise ValueError(f"`cache_length` ({cache_length}) must not exceed "
                         f"`max_length` ({max_length}).")
    lengths = jnp.asarray(lengths, jnp.float32)
    start = max_length - cache_length
    return jnp.clip((start - lengths) / cache_length, -1.0, 0.0)
