"""Advantage normalisation and group-relative advantages (GRPO, RLOO).

Group advantages follow Shao et al. 2024 (DeepSeekMath, GRPO, eq. 3 with
outcome supervision): rewards of the ``G`` samples drawn for one prompt are
centred on the group mean and divided by the group standard deviation. The
leave-one-out baseline is that of Kool et al. 2019 / Ahmadian et al. 2024
(RLOO); scaling by the batch standard deviation follows Hu 2025
(REINFORCE++); no scaling follows Liu et al. 2025 (Dr. GRPO).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from artifex_fn._src import checks


def _safe_div(num, den):
    """``num / den`` where ``den > 0``, else zero, without NaN gradients."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _safe_std_plus_eps(var, constant, eps):
    """``sqrt(var) + eps``, replaced by 1 where the slice is constant.

    Constant slices are zeroed by the caller; substituting 1 there keeps
    both the unused quotient and the gradient of ``sqrt`` at zero variance
    finite (``0 * inf`` would otherwise make the gradient NaN).
    """
    safe_var = jnp.where(constant, 1.0, var)
    return jnp.where(constant, 1.0, jnp.sqrt(safe_var) + eps)


def normalize_advantages(
    advantages: jax.Array,
    *,
    mask: jax.Array | None = None,
    axis: int | tuple[int, ...] | None = None,
    eps: float = 1e-8,
    ddof: int = 0,
) -> jax.Array:
    r"""Centres advantages and scales them to unit standard deviation.

    .. math:: \hat A = (A - \mu) / (\sigma + \epsilon)

    with the (masked) mean and standard deviation taken over ``axis``: all
    elements when ``axis`` is None (global), ``axis=-1`` for per-row
    statistics. A slice whose valid entries are all equal gives exactly zero
    (no ``eps``-amplified rounding noise); padded entries give zero; an
    all-masked slice gives zeros.

    Args:
      advantages: array of any shape.
      mask: optional array broadcastable to ``advantages``; zero or False
        entries are left out of the statistics and set to zero.
      axis: axis or axes to reduce over; None for all.
      eps: added to the standard deviation.
      ddof: delta degrees of freedom of the variance (0: population).

    Returns:
      Normalised advantages, same shape and dtype as ``advantages``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.normalize_advantages(jnp.array([1.0, 2.0, 3.0]), eps=0.0)
      Array([-1.2247449,  0.       ,  1.2247449], dtype=float32)
    """
    advantages = jnp.asarray(advantages)
    out_dtype, dt = checks.float_dtypes(advantages)
    x = advantages.astype(dt)
    if mask is None:
        m = jnp.ones_like(x)
    else:
        mask = jnp.asarray(mask)
        checks.check_broadcastable(mask, x.shape, "mask")
        m = jnp.broadcast_to(mask, x.shape).astype(dt)
    if axis is not None:
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        axes = tuple(checks.normalize_axis(a, x.ndim, "axis") for a in axes)
    else:
        axes = None
    count = jnp.sum(m, axis=axes, keepdims=True)
    xm = jnp.where(m > 0, x, 0.0)
    mean = _safe_div(jnp.sum(xm, axis=axes, keepdims=True), count)
    centred = jnp.where(m > 0, x - mean, 0.0)
    var = (jnp.sum(centred ** 2, axis=axes, keepdims=True)
           / jnp.maximum(count - ddof, 1.0))
    hi = jnp.max(jnp.where(m > 0, x, -jnp.inf), axis=axes, keepdims=True)
    lo = jnp.min(jnp.where(m > 0, x, jnp.inf), axis=axes, keepdims=True)
    constant = hi <= lo
    out = jnp.where(constant, 0.0,
                    centred / _safe_std_plus_eps(var, constant, eps))
    return out.astype(out_dtype)


class GroupAdvantages(NamedTuple):
    """Output of :func:`group_advantages`.

    Attributes:
      advantages: ``[..., N]`` advantages, same shape as the rewards.
      zero_std: ``[..., N // group_size]`` booleans, true for groups whose
        rewards are all equal (those get exactly zero advantage).
    """
    advantages: jax.Array
    zero_std: jax.Array


def group_advantages(
    rewards: jax.Array,
    *,
    group_size: int,
    baseline: Literal["mean", "rloo"] = "mean",
    scale: Literal["group", "batch", "none"] = "group",
    ddof: int = 0,
    eps: float = 1e-6,
) -> GroupAdvantages:
    r"""Group-relative advantages for critic-free policy optimisation.

    The last axis of ``rewards`` holds ``N = num_groups * group_size``
    samples, each group of ``group_size`` contiguous samples answering the
    same prompt. With group mean :math:`\mu_g` and standard deviation
    :math:`\sigma_g` (``ddof`` as given):

    * ``baseline="mean"``: :math:`c_i = r_i - \mu_g` (GRPO);
      ``baseline="rloo"``: :math:`c_i = r_i - \frac{1}{G-1}\sum_{j\ne i} r_j
      = \frac{G}{G-1}(r_i - \mu_g)` (leave-one-out).
    * ``scale="group"``: :math:`A_i = c_i / (\sigma_g + \epsilon)`;
      ``scale="batch"``: :math:`c_i` over the standard deviation of all
      ``c`` in the row plus ``eps``; ``scale="none"``: :math:`A_i = c_i`.

    A group whose rewards are all equal gets exactly zero advantage (it
    carries no learning signal), whatever ``eps`` is, and is reported in
    ``zero_std``.

    Args:
      rewards: ``[..., N]`` rewards; ``N`` must be a multiple of
        ``group_size``.
      group_size: samples per group ``G`` (a Python int).
      baseline: ``"mean"`` or ``"rloo"`` (needs ``group_size >= 2``).
      scale: ``"group"``, ``"batch"`` or ``"none"``.
      ddof: delta degrees of freedom of the standard deviations.
      eps: added to the standard deviation before dividing.

    Returns:
      A :class:`GroupAdvantages` ``(advantages, zero_std)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> out = afn.group_advantages(jnp.array([1.0, 0.0, 2.0, 2.0]),
      ...                            group_size=2, eps=0.0)
      >>> out.advantages
      Array([ 1., -1.,  0.,  0.], dtype=float32)
      >>> out.zero_std
      Array([False,  True], dtype=bool)
    """
    rewards = jnp.asarray(rewards)
    checks.check_min_rank(rewards, 1, "rewards")
    checks.check_choice(baseline, ("mean", "rloo"), "baseline")
    checks.check_choice(scale, ("group", "batch", "none"), "scale")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"`group_size` must be a positive Python int, got {group_size!r}.")
    n = rewards.shape[-1]
    if n % group_size:
        raise ValueError(
            f"`rewards` last axis ({n}) must be a multiple of `group_size` "
            f"({group_size}).")
    if baseline == "rloo" and group_size < 2:
        raise ValueError("`baseline='rloo'` needs `group_size` >= 2.")
    if scale == "group" and group_size - ddof <= 0:
        raise ValueError(
            f"`ddof`={ddof} must be smaller than `group_size`={group_size}.")
    if scale == "batch" and n - ddof <= 0:
        raise ValueError(f"`ddof`={ddof} must be smaller than N={n}.")

    out_dtype, dt = checks.float_dtypes(rewards)
    grouped = rewards.astype(dt).reshape(
        rewards.shape[:-1] + (n // group_size, group_size))
    mean = jnp.mean(grouped, axis=-1, keepdims=True)
    zero_std = jnp.max(grouped, axis=-1) <= jnp.min(grouped, axis=-1)
    centred = grouped - mean
    if baseline == "rloo":
        centred = centred * (group_size / (group_size - 1))
    if scale == "group":
        var = (jnp.sum((grouped - mean) ** 2, axis=-1, keepdims=True)
               / (group_size - ddof))
        adv = centred / _safe_std_plus_eps(var, zero_std[..., None], eps)
    elif scale == "batch":
        flat = centred.reshape(rewards.shape)
        batch_mean = jnp.mean(flat, axis=-1, keepdims=True)
        var = (jnp.sum((flat - batch_mean) ** 2, axis=-1, keepdims=True)
               / (n - ddof))
        all_constant = jnp.all(zero_std, axis=-1, keepdims=True)
        adv = centred / _safe_std_plus_eps(var, all_constant, eps)[..., None]
    else:
        adv = centred
    adv = jnp.where(zero_std[..., None], 0.0, adv)
    return GroupAdvantages(adv.reshape(rewards.shape).astype(out_dtype),
                           zero_std)
