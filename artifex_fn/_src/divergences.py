"""Entropy and KL divergence: exact over a distribution, or per-sample.

The sample-based estimators of :math:`\\mathrm{KL}(\\pi \\| \\pi_{ref})` from
actions drawn from :math:`\\pi` are those of Schulman (2020), "Approximating
KL divergence": with :math:`\\log r = \\log\\pi_{ref}(a) - \\log\\pi(a)`,

* ``k1 = -log r`` (unbiased, high variance, can be negative),
* ``k2 = (log r)^2 / 2`` (biased, low variance),
* ``k3 = (r - 1) - log r`` (unbiased, low variance, non-negative; the GRPO
  penalty of Shao et al. 2024, eq. 4).

All maths here runs in at least float32 and is cast back to the input dtype.
Every function takes an optional ``mask`` over its result's shape (zero
marks padding): padded entries are replaced before any arithmetic, so they
may hold anything (NaN, inf, all ``-inf`` logits) and give exactly zero,
with zero gradient.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from artifex_fn._src import checks

# Log-ratios are clamped to this magnitude before `exp` (e^20 ~ 4.9e8).
MAX_LOG_RATIO = 20.0


def _plogp_terms(log_p, other):
    """``p * other`` with ``p = exp(log_p)``, zero where ``p == 0``."""
    p = jnp.exp(log_p)
    live = p > 0
    # The inner `where` keeps the unused branch finite, so its cotangent
    # (0 * -inf) cannot turn the gradient into NaN.
    return jnp.where(live, p * jnp.where(live, other, 0.0), 0.0)


def _padded_rows(mask, x, axis, name):
    """Boolean ``[...]`` mask of valid rows (``x`` without ``axis``)."""
    if mask is None:
        return None, None
    axis = checks.normalize_axis(axis, x.ndim, "axis")
    row_shape = x.shape[:axis] + x.shape[axis + 1:]
    valid = checks.valid_mask(mask, row_shape, name)
    return valid, jnp.expand_dims(valid, axis)


def entropy_from_log_probs(log_probs: jax.Array, *, axis: int = -1,
                           mask: jax.Array | None = None) -> jax.Array:
    r"""Entropy :math:`H = -\sum_a p(a) \log p(a)` from normalised log-probs.

    Args:
      log_probs: ``[..., A]`` normalised log-probabilities (``-inf`` allowed
        for impossible actions).
      axis: the action axis.
      mask: optional ``[...]`` mask of the rows (the shape of the result);
        padded rows give zero.

    Returns:
      ``[...]`` entropies in the input dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.entropy_from_log_probs(jnp.log(jnp.array([0.5, 0.5])))
      Array(0.6931472, dtype=float32)
    """
    log_probs = jnp.asarray(log_probs)
    checks.check_min_rank(log_probs, 1, "log_probs")
    out_dtype, dt = checks.float_dtypes(log_probs)
    rows, cells = _padded_rows(mask, log_probs, axis, "mask")
    lp = checks.keep_valid(cells, log_probs.astype(dt))
    out = -jnp.sum(_plogp_terms(lp, lp), axis=axis)
    return checks.keep_valid(rows, out).astype(out_dtype)


def entropy_from_logits(logits: jax.Array, *, axis: int = -1,
                        mask: jax.Array | None = None) -> jax.Array:
    """Entropy of ``softmax(logits)`` along ``axis``; see
    :func:`entropy_from_log_probs` (``mask`` as there).

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.entropy_from_logits(jnp.zeros((2, 4)))
      Array([1.3862944, 1.3862944], dtype=float32)
    """
    logits = jnp.asarray(logits)
    checks.check_min_rank(logits, 1, "logits")
    out_dtype, dt = checks.float_dtypes(logits)
    rows, cells = _padded_rows(mask, logits, axis, "mask")
    z = checks.keep_valid(cells, logits.astype(dt))
    lp = jax.nn.log_softmax(z, axis=axis)
    out = -jnp.sum(_plogp_terms(lp, lp), axis=axis)
    return checks.keep_valid(rows, out).astype(out_dtype)


def kl_from_log_probs(p_log_probs: jax.Array, q_log_probs: jax.Array, *,
                      axis: int = -1,
                      mask: jax.Array | None = None) -> jax.Array:
    r"""Exact :math:`\mathrm{KL}(p \| q) = \sum_a p(a)(\log p(a) - \log q(a))`.

    Args:
      p_log_probs: ``[..., A]`` normalised log-probabilities of ``p``.
      q_log_probs: ``[..., A]`` normalised log-probabilities of ``q``.
      axis: the action axis.
      mask: optional ``[...]`` mask of the rows; padded rows give zero.

    Returns:
      ``[...]`` divergences in the inputs' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> p = jnp.log(jnp.array([0.5, 0.5]))
      >>> q = jnp.log(jnp.array([0.25, 0.75]))
      >>> afn.kl_from_log_probs(p, q)
      Array(0.14384..., dtype=float32)
    """
    p_log_probs = jnp.asarray(p_log_probs)
    q_log_probs = jnp.asarray(q_log_probs)
    checks.check_min_rank(p_log_probs, 1, "p_log_probs")
    checks.check_same_shape(q_log_probs, "q_log_probs", p_log_probs,
                            "p_log_probs")
    out_dtype, dt = checks.float_dtypes(p_log_probs, q_log_probs)
    rows, cells = _padded_rows(mask, p_log_probs, axis, "mask")
    lp = checks.keep_valid(cells, p_log_probs.astype(dt))
    lq = checks.keep_valid(cells, q_log_probs.astype(dt))
    out = jnp.sum(_plogp_terms(lp, lp - lq), axis=axis)
    return checks.keep_valid(rows, out).astype(out_dtype)


def kl_from_logits(p_logits: jax.Array, q_logits: jax.Array, *,
                   axis: int = -1,
                   mask: jax.Array | None = None) -> jax.Array:
    """Exact ``KL(softmax(p_logits) || softmax(q_logits))`` along ``axis``
    (``mask`` as in :func:`kl_from_log_probs`).

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.kl_from_logits(jnp.zeros(3), jnp.zeros(3))
      Array(0., dtype=float32)
    """
    p_logits = jnp.asarray(p_logits)
    q_logits = jnp.asarray(q_logits)
    checks.check_min_rank(p_logits, 1, "p_logits")
    checks.check_same_shape(q_logits, "q_logits", p_logits, "p_logits")
    out_dtype, dt = checks.float_dtypes(p_logits, q_logits)
    rows, cells = _padded_rows(mask, p_logits, axis, "mask")
    lp = jax.nn.log_softmax(checks.keep_valid(cells, p_logits.astype(dt)),
                            axis=axis)
    lq = jax.nn.log_softmax(checks.keep_valid(cells, q_logits.astype(dt)),
                            axis=axis)
    out = jnp.sum(_plogp_terms(lp, lp - lq), axis=axis)
    return checks.keep_valid(rows, out).astype(out_dtype)


def kl_estimate(
    log_probs: jax.Array,
    ref_log_probs: jax.Array,
    *,
    estimator: Literal["k1", "k2", "k3"] = "k3",
    clamp: float | None = None,
    max_log_ratio: float = MAX_LOG_RATIO,
    mask: jax.Array | None = None,
) -> jax.Array:
    r"""Per-sample estimate of :math:`\mathrm{KL}(\pi \| \pi_{ref})`.

    For actions sampled from :math:`\pi` with
    :math:`\log r = \log\pi_{ref} - \log\pi` (clamped to
    ``[-max_log_ratio, max_log_ratio]`` before ``exp``): ``k1 = -log r``,
    ``k2 = (log r)^2 / 2``, ``k3 = exp(log r) - 1 - log r`` (Schulman 2020).
    Computed in float32 (or float64), returned in the input dtype; reduce
    with a mask via :func:`aggregate_loss`.

    Args:
      log_probs: ``[...]`` log-probabilities of the sampled actions under
        the current policy.
      ref_log_probs: ``[...]`` log-probabilities under the reference.
      estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
      clamp: if given (``> 0``), the estimate is clipped to ``[-clamp,
        clamp]``.
      max_log_ratio: bound ``> 0`` on ``|log r|`` applied before ``exp``.
      mask: optional mask broadcastable to ``log_probs``; padded entries
        give zero with zero gradient, whatever they hold.

    Returns:
      ``[...]`` per-sample estimates.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.kl_estimate(jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25])))
      Array([0.19314718], dtype=float32)
    """
    checks.check_choice(estimator, ("k1", "k2", "k3"), "estimator")
    log_probs = jnp.asarray(log_probs)
    ref_log_probs = jnp.asarray(ref_log_probs)
    checks.check_same_shape(ref_log_probs, "ref_log_probs", log_probs,
                            "log_probs")
    ok = checks.all_ok(
        checks.check_hparam(clamp, "clamp", lo=0.0, lo_open=True,
                            optional=True),
        checks.check_hparam(max_log_ratio, "max_log_ratio", lo=0.0,
                            lo_open=True))
    out_dtype, dt = checks.float_dtypes(log_probs, ref_log_probs)
    valid = checks.valid_mask(mask, log_probs.shape)
    log_r = (checks.keep_valid(valid, ref_log_probs).astype(dt)
             - checks.keep_valid(valid, log_probs).astype(dt))
    log_r = jnp.clip(log_r, -max_log_ratio, max_log_ratio)
    if estimator == "k1":
        kl = -log_r
    elif estimator == "k2":
        kl = 0.5 * jnp.square(log_r)
    else:
        kl = jnp.expm1(log_r) - log_r
    if clamp is not None:
        kl = jnp.clip(kl, -clamp, clamp)
    return checks.nan_unless(ok, kl.astype(out_dtype))
