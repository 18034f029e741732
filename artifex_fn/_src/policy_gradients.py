"""Policy-gradient and value losses, unreduced.

Every loss here returns one value per token (or per sample); reduce it with
:func:`artifex_fn.aggregate_loss` and a mask. Advantages and value targets are
treated as constants (``stop_gradient``).

* Vanilla policy gradient (Williams 1992): :math:`-A \\log\\pi(a|s)`.
* PPO clipped surrogate (Schulman et al. 2017, eq. 7) with asymmetric
  "clip-higher" bounds (Yu et al. 2025, DAPO) and dual clip (Ye et al. 2020).
* Sequence-level importance ratios (Zheng et al. 2025, GSPO).
* Value loss with optional clipping around the old values (as in the PPO
  baselines) and optional Huber loss.

Every function takes an optional ``mask`` (zero marks padding). Padded
entries are replaced before any arithmetic, so they may hold anything (NaN,
inf) and contribute exactly zero to the result and to its gradient; losses
are zero there and ratios one.

Hyper-parameters are checked: a concrete value out of range raises
``ValueError`` naming it; a traced one (inside the caller's ``jit`` or
``vmap``) cannot raise and makes the result NaN.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from artifex_fn._src import checks
from artifex_fn._src.divergences import MAX_LOG_RATIO


def _broadcast_advantages(advantages, log_probs):
    """Expands per-sequence ``[...]`` advantages over the token axis."""
    advantages = jnp.asarray(advantages)
    if advantages.ndim == log_probs.ndim - 1:
        advantages = advantages[..., None]
    checks.check_broadcastable(advantages, log_probs.shape, "advantages")
    return jnp.broadcast_to(advantages, log_probs.shape)


def importance_ratio(
    log_probs: jax.Array,
    old_log_probs: jax.Array,
    *,
    level: Literal["token", "sequence"] = "token",
    mask: jax.Array | None = None,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> jax.Array:
    r"""Importance ratios :math:`\pi_\theta / \pi_{old}` from log-probs.

    ``level="token"``: :math:`r_t = \exp(\log\pi_\theta(y_t) -
    \log\pi_{old}(y_t))`. ``level="sequence"`` (GSPO, Zheng et al. 2025):
    the length-normalised sequence ratio :math:`s = \exp(\frac{1}{|y|}
    \sum_t m_t (\log\pi_\theta(y_t) - \log\pi_{old}(y_t)))` over the last
    axis, broadcast back to every token. Log-ratios are clamped to
    ``[-max_log_ratio, max_log_ratio]`` before ``exp``, so no input
    overflows.

    Args:
      log_probs: ``[..., L]`` (or ``[...]`` for token level) current
        log-probabilities.
      old_log_probs: same shape, log-probabilities of the behaviour policy.
      level: ``"token"`` or ``"sequence"``.
      mask: optional mask broadcastable to ``log_probs``; padded tokens
        get a ratio of one and are left out of the sequence ratio.
      max_log_ratio: clamp bound on the log-ratio.

    Returns:
      Ratios with the shape and dtype of ``log_probs``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.importance_ratio(jnp.array([0.0, 1000.0]), jnp.zeros(2))
      Array([1.000000e+00, 4.851652e+08], dtype=float32)
    """
    checks.check_choice(level, ("token", "sequence"), "level")
    log_probs = jnp.asarray(log_probs)
    old_log_probs = jnp.asarray(old_log_probs)
    checks.check_same_shape(old_log_probs, "old_log_probs", log_probs,
                            "log_probs")
    ok = checks.check_hparam(max_log_ratio, "max_log_ratio", lo=0.0,
                             lo_open=True)
    out_dtype, dt = checks.float_dtypes(log_probs, old_log_probs)
    valid = checks.valid_mask(mask, log_probs.shape)
    log_ratio = (checks.keep_valid(valid, log_probs).astype(dt)
                 - lax.stop_gradient(
                     checks.keep_valid(valid, old_log_probs).astype(dt)))
    if level == "sequence":
        checks.check_min_rank(log_probs, 1, "log_probs")
        if valid is None:
            m = jnp.ones_like(log_ratio)
        else:
            m = jnp.broadcast_to(jnp.asarray(mask), log_ratio.shape).astype(dt)
            m = jnp.where(valid, m, 0.0)
        count = jnp.sum(m, axis=-1, keepdims=True)
        total = jnp.sum(log_ratio * m, axis=-1, keepdims=True)
        seq = jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0),
                        0.0)
        log_ratio = jnp.broadcast_to(seq, log_ratio.shape)
        log_ratio = checks.keep_valid(valid, log_ratio)
    log_ratio = jnp.clip(log_ratio, -max_log_ratio, max_log_ratio)
    return checks.nan_unless(ok, jnp.exp(log_ratio).astype(out_dtype))


def _clip_range_ok(clip_param, clip_param_high):
    """Checks ``clip_param`` in ``[0, 1]`` and ``clip_param_high >= 0``."""
    return checks.all_ok(
        checks.check_hparam(clip_param, "clip_param", lo=0.0, hi=1.0),
        checks.check_hparam(clip_param_high, "clip_param_high", lo=0.0,
                            optional=True))


def policy_gradient_loss(log_probs: jax.Array, advantages: jax.Array, *,
                         mask: jax.Array | None = None) -> jax.Array:
    r"""REINFORCE loss :math:`-\mathrm{sg}(A) \log\pi(a|s)` (Williams 1992).

    Args:
      log_probs: ``[...]`` log-probabilities of the taken actions.
      advantages: advantages (or returns) of the same shape, or with one
        axis fewer (per-sequence advantages broadcast over tokens).
      mask: optional mask broadcastable to ``log_probs``; padded entries
        give zero loss and zero gradient whatever they hold.

    Returns:
      Per-element losses, shape of ``log_probs``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.policy_gradient_loss(jnp.array([-1.0, -2.0]), jnp.array([1.0, -1.0]))
      Array([ 1., -2.], dtype=float32)
    """
    log_probs = jnp.asarray(log_probs)
    adv = lax.stop_gradient(_broadcast_advantages(advantages, log_probs))
    out_dtype, _ = checks.float_dtypes(log_probs, adv)
    valid = checks.valid_mask(mask, log_probs.shape)
    loss = -checks.keep_valid(valid, adv) * checks.keep_valid(valid, log_probs)
    return loss.astype(out_dtype)


def clipped_surrogate_loss(
    log_probs: jax.Array,
    old_log_probs: jax.Array,
    advantages: jax.Array,
    *,
    clip_param: float | jax.Array = 0.2,
    clip_param_high: float | jax.Array | None = None,
    dual_clip: float | jax.Array | None = None,
    level: Literal["token", "sequence"] = "token",
    mask: jax.Array | None = None,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> jax.Array:
    r"""PPO clipped surrogate loss per token (Schulman et al. 2017, eq. 7).

    .. math::
        \ell = -\min\big(r A,\ \mathrm{clip}(r, 1-\epsilon,
        1+\epsilon_{high}) A\big)

    with :math:`\epsilon` = ``clip_param`` and :math:`\epsilon_{high}` =
    ``clip_param_high`` (default ``clip_param``; a larger value is DAPO's
    clip-higher, Yu et al. 2025). With ``dual_clip = c >= 1`` (Ye et al.
    2020) the loss of negative advantages is also bounded:
    :math:`\ell = \min(\ell, -cA)` where :math:`A < 0`.
    ``level="sequence"`` uses GSPO's sequence ratio
    (:func:`importance_ratio`).

    Args:
      log_probs: ``[..., L]`` current log-probabilities of the taken tokens.
      old_log_probs: same shape, under the behaviour policy.
      advantages: same shape, or ``[...]`` per sequence.
      clip_param: clip range in ``[0, 1]``: ratio floor
        ``1 - clip_param`` (and ceiling ``1 + clip_param`` unless
        ``clip_param_high`` is given).
      clip_param_high: upper clip range ``>= 0``, ratio ceiling
        ``1 + clip_param_high`` (default ``clip_param``).
      dual_clip: optional dual-clip constant ``c >= 1`` (Ye et al. use
        ``c > 1``; ``c = 1`` bounds the loss of a negative advantage by
        ``|A|``).
      level: ``"token"`` or ``"sequence"`` importance ratios.
      mask: optional token mask broadcastable to ``log_probs``: padded
        tokens give zero loss and zero gradient whatever they hold, and are
        left out of the sequence ratio.
      max_log_ratio: clamp bound on the log-ratio before ``exp``.

    Returns:
      Per-token losses with the shape of ``log_probs``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> lp = jnp.log(jnp.array([1.5, 0.5]))
      >>> afn.clipped_surrogate_loss(lp, jnp.zeros(2), jnp.array([1.0, -1.0]))
      Array([-1.2,  0.8], dtype=float32)
    """
    log_probs = jnp.asarray(log_probs)
    ok = _clip_range_ok(clip_param, clip_param_high)
    if dual_clip is not None:
        ok = checks.all_ok(ok, checks.check_hparam(
            dual_clip, "dual_clip", lo=1.0))
    ratio = importance_ratio(log_probs, old_log_probs, level=level, mask=mask,
                             max_log_ratio=max_log_ratio)
    adv = lax.stop_gradient(_broadcast_advantages(advantages, log_probs))
    out_dtype, dt = checks.float_dtypes(log_probs, adv)
    valid = checks.valid_mask(mask, log_probs.shape)
    adv = checks.keep_valid(valid, adv)
    ratio, adv = ratio.astype(dt), adv.astype(dt)
    high = clip_param if clip_param_high is None else clip_param_high
    clipped = jnp.clip(ratio, 1.0 - clip_param, 1.0 + high)
    loss = -jnp.minimum(ratio * adv, clipped * adv)
    if dual_clip is not None:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -dual_clip * adv), loss)
    return checks.nan_unless(ok, loss.astype(out_dtype))


def clip_fraction(
    ratio: jax.Array,
    *,
    clip_param: float | jax.Array = 0.2,
    clip_param_high: float | jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Per-token indicator that ``ratio`` lies outside the clip range.

    Average it with :func:`aggregate_loss` (``"token_mean"``) for the usual
    ``clip_fraction`` metric.

    Args:
      ratio: importance ratios from :func:`importance_ratio`.
      clip_param: clip range: ratios below ``1 - clip_param`` are outside.
      clip_param_high: upper clip range: ratios above
        ``1 + clip_param_high`` are outside (default ``clip_param``).
      mask: optional mask broadcastable to ``ratio``; padded entries give 0.

    Returns:
      Float array of 0/1 with the shape of ``ratio``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.clip_fraction(jnp.array([0.7, 1.0, 1.3]))
      Array([1., 0., 1.], dtype=float32)
    """
    ratio = jnp.asarray(ratio)
    ok = _clip_range_ok(clip_param, clip_param_high)
    out_dtype, _ = checks.float_dtypes(ratio)
    high = clip_param if clip_param_high is None else clip_param_high
    outside = (ratio < 1.0 - clip_param) | (ratio > 1.0 + high)
    valid = checks.valid_mask(mask, ratio.shape)
    if valid is not None:
        outside = outside & valid
    return checks.nan_unless(ok, outside.astype(out_dtype))


def value_loss(
    values: jax.Array,
    targets: jax.Array,
    *,
    old_values: jax.Array | None = None,
    value_clip_param: float | jax.Array | None = None,
    huber_delta: float | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    r"""Value-function regression loss per element.

    .. math:: \ell = \tfrac12 (V - R)^2

    or the Huber loss with ``huber_delta``. With ``old_values`` and
    ``value_clip_param`` :math:`= \epsilon_V` the clipped form of the PPO
    baselines is used: :math:`\max(\ell(V), \ell(V_{old} +
    \mathrm{clip}(V - V_{old}, -\epsilon_V, \epsilon_V)))`. Targets (and
    old values) are constants.

    Args:
      values: ``[...]`` predicted values.
      targets: ``[...]`` value targets (returns), same shape.
      old_values: optional values predicted when the data was collected.
      value_clip_param: clip range ``>= 0`` around ``old_values``.
      huber_delta: optional Huber threshold ``> 0``.
      mask: optional mask broadcastable to ``values``; padded entries give
        zero loss and zero gradient whatever they hold.

    Returns:
      Per-element losses with the shape of ``values``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.value_loss(jnp.array([1.0, 3.0]), jnp.array([0.0, 0.0]))
      Array([0.5, 4.5], dtype=float32)
    """
    values = jnp.asarray(values)
    targets = lax.stop_gradient(jnp.asarray(targets))
    checks.check_same_shape(targets, "targets", values, "values")
    ok = checks.all_ok(
        checks.check_hparam(value_clip_param, "value_clip_param", lo=0.0,
                            optional=True),
        checks.check_hparam(huber_delta, "huber_delta", lo=0.0,
                            lo_open=True, optional=True))
    out_dtype, dt = checks.float_dtypes(values, targets)
    valid = checks.valid_mask(mask, values.shape)
    v = checks.keep_valid(valid, values).astype(dt)
    t = checks.keep_valid(valid, targets).astype(dt)

    def err(x):
        d = x - t
        if huber_delta is None:
            return 0.5 * jnp.square(d)
        a = jnp.abs(d)
        quad = jnp.minimum(a, huber_delta)
        return 0.5 * jnp.square(quad) + huber_delta * (a - quad)

    loss = err(v)
    if value_clip_param is not None:
        if old_values is None:
            raise ValueError("`value_clip_param` needs `old_values`.")
        old = lax.stop_gradient(jnp.asarray(old_values))
        checks.check_same_shape(old, "old_values", values, "values")
        old = checks.keep_valid(valid, old).astype(dt)
        v_clipped = old + jnp.clip(v - old, -value_clip_param,
                                   value_clip_param)
        loss = jnp.maximum(loss, err(v_clipped))
    return checks.nan_unless(ok, loss.astype(out_dtype))
