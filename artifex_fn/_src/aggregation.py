"""Masked reduction of per-token losses to a scalar.

Modes (``loss`` is ``[..., L]``: the last axis indexes tokens of one
sequence, every leading axis indexes sequences):

* ``"token_mean"``: :math:`\\sum_{i,t} m_{it} \\ell_{it} / \\sum_{i,t} m_{it}`
  (every token weighs the same; DAPO, Yu et al. 2025, eq. 8).
* ``"seq_mean_token_mean"``: mean over sequences of each sequence's token
  mean (the original GRPO objective, Shao et al. 2024, eq. 3). Sequences
  without valid tokens are left out of the outer mean.
* ``"seq_mean_token_sum"``: mean over sequences of each sequence's token sum.
* ``"seq_mean_token_sum_norm"``: :math:`\\sum_{i,t} m_{it}\\ell_{it} /
  (N_{seq} \\cdot C)` with a constant ``C`` (``normalizer``, default ``L``):
  Dr. GRPO (Liu et al. 2025), free of the length bias of per-sequence means.

Every mode is a ratio ``numerator / denominator`` of sums over sequences;
:func:`aggregate_loss_parts` returns the two parts, so that sums over
micro-batches or devices give exactly the single-batch result.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from artifex_fn._src import checks

AggregationMode = Literal["token_mean", "seq_mean_token_mean",
                          "seq_mean_token_sum", "seq_mean_token_sum_norm"]
AGGREGATION_MODES = ("token_mean", "seq_mean_token_mean",
                     "seq_mean_token_sum", "seq_mean_token_sum_norm")


def aggregate_loss_parts(
    loss: jax.Array,
    mask: jax.Array | None = None,
    *,
    mode: AggregationMode = "token_mean",
    normalizer: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Numerator and denominator of :func:`aggregate_loss`.

    Both are sums over sequences, so summing the parts of disjoint shards
    of a batch (micro-batches, devices) and dividing once gives the
    full-batch value exactly.

    Args:
      loss: ``[..., L]`` per-token losses (a 1-D array is one sequence).
      mask: optional array broadcastable to ``loss``; zero marks padding.
      mode: see the module docstring.
      normalizer: the constant ``C`` of ``"seq_mean_token_sum_norm"``
        (defaults to ``L``); ignored by the other modes.

    Returns:
      ``(numerator, denominator)`` scalars in at least float32.
    """
    checks.check_choice(mode, AGGREGATION_MODES, "mode")
    loss = jnp.asarray(loss)
    checks.check_min_rank(loss, 1, "loss")
    _, dt = checks.float_dtypes(loss)
    x = loss.astype(dt)
    if mask is None:
        m = jnp.ones(x.shape, dt)
    else:
        mask = jnp.asarray(mask)
        checks.check_broadcastable(mask, x.shape, "mask")
        m = jnp.broadcast_to(mask, x.shape).astype(dt)
    x = jnp.where(m > 0, x, 0.0) * m
    if mode == "token_mean":
        return jnp.sum(x), jnp.sum(m)
    seq_sum = jnp.sum(x, axis=-1)
    seq_count = jnp.sum(m, axis=-1)
    if mode == "seq_mean_token_sum_norm":
        c = x.shape[-1] if normalizer is None else normalizer
        return jnp.sum(seq_sum), jnp.asarray(seq_sum.size * c, dt)
    has_tokens = seq_count > 0
    n_seq = jnp.sum(has_tokens.astype(dt))
    if mode == "seq_mean_token_sum":
        return jnp.sum(seq_sum), n_seq
    seq_mean = jnp.where(has_tokens,
                         seq_sum / jnp.where(has_tokens, seq_count, 1.0), 0.0)
    return jnp.sum(seq_mean), n_seq


def aggregate_loss(
    loss: jax.Array,
    mask: jax.Array | None = None,
    *,
    mode: AggregationMode = "token_mean",
    normalizer: float | None = None,
    denominator: jax.Array | None = None,
) -> jax.Array:
    """Reduces per-token losses to a scalar with a mask.

    An empty mask gives ``0`` (not NaN), with zero gradient.

    Args:
      loss: ``[..., L]`` per-token losses.
      mask: optional array broadcastable to ``loss``; zero marks padding.
      mode: ``"token_mean"``, ``"seq_mean_token_mean"``,
        ``"seq_mean_token_sum"`` or ``"seq_mean_token_sum_norm"`` (module
        docstring).
      normalizer: constant of ``"seq_mean_token_sum_norm"`` (default ``L``).
      denominator: optional denominator of the *whole* batch (the sum of
        :func:`aggregate_loss_parts` denominators over all its shards).
        With it the result is this shard's numerator over the global
        denominator: its exact share of the full-batch value, so the
        values (and gradients) of disjoint shards sum to the full-batch
        ones. Default: this batch's own denominator.

    Returns:
      A scalar in the dtype of ``loss``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> loss = jnp.array([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
      >>> mask = jnp.array([[1, 1, 1], [1, 0, 0]])
      >>> afn.aggregate_loss(loss, mask, mode="token_mean")
      Array(1.75, dtype=float32)
      >>> afn.aggregate_loss(loss, mask, mode="seq_mean_token_mean")
      Array(2.5, dtype=float32)
      >>> afn.aggregate_loss(loss, mask, mode="seq_mean_token_sum")
      Array(3.5, dtype=float32)
      >>> afn.aggregate_loss(loss, mask, mode="seq_mean_token_sum_norm")
      Array(1.1666666, dtype=float32)

      Shares of two shards under the global denominator sum to the whole:

      >>> _, den = afn.aggregate_loss_parts(loss, mask, mode="token_mean")
      >>> parts = [afn.aggregate_loss(loss[i:i + 1], mask[i:i + 1],
      ...                             denominator=den) for i in (0, 1)]
      >>> parts[0] + parts[1]
      Array(1.75, dtype=float32)
    """
    num, den = aggregate_loss_parts(loss, mask, mode=mode,
                                    normalizer=normalizer)
    ok = checks.check_hparam(normalizer, "normalizer", lo=0.0, lo_open=True,
                             optional=True)
    if denominator is not None:
        den = jnp.asarray(denominator, num.dtype)
    out_dtype, _ = checks.float_dtypes(jnp.asarray(loss))
    positive = den > 0
    value = jnp.where(positive, num / jnp.where(positive, den, 1.0), 0.0)
    return checks.nan_unless(ok, value.astype(out_dtype))
