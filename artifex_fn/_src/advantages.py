"""Advantage normalisation and group-relative advantages (GRPO, RLOO).

Group advantages follow Shao et al. 2024 (DeepSeekMath, GRPO, eq. 3 with
outcome supervision): rewards of the ``G`` samples drawn for one prompt are
centred on the group mean and divided by the group standard deviation. The
leave-one-out baseline is that of Kool et al. 2019 / Ahmadian et al. 2024
(RLOO); scaling by the batch standard deviation follows Hu 2025
(REINFORCE++); no scaling follows Liu et al. 2025 (Dr. GRPO).
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from artifex_fn._src import checks


def _safe_div(num, den):
    """``num / den`` where ``den > 0``, else zero, without NaN gradients."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _divide_by_scale(x, a):
    """``x / a`` for a positive normal ``a`` of any magnitude.

    XLA may rewrite a division by a broadcast value as a product with its
    reciprocal, which is subnormal (flushed to zero) for ``a`` above
    ``2^126``. Here ``a = f 2^e`` with ``f`` in ``[0.5, 1)``, and ``x`` is
    multiplied by two normal powers of two (exact) before dividing by
    ``f``.
    """
    f, e = jnp.frexp(a)
    half = e // 2
    return x * _power_of_two(-half, x.dtype) * _power_of_two(half - e,
                                                             x.dtype) / f


def _power_of_two(k, dtype):
    """Exactly ``2^k`` (``k`` within the normal exponent range), built from
    its bits: ``exp2`` goes through ``exp`` and is not exact."""
    info = jnp.finfo(dtype)
    int_type = jnp.int32 if info.bits == 32 else jnp.int64
    bias = info.maxexp - 1
    return jax.lax.bitcast_convert_type(
        (k.astype(int_type) + bias) << info.nmant, dtype)


def _standardize_parts(x, m, eps, axes, ddof):
    """Scaled statistics of :func:`_standardize` (primal values only).

    With ``a = max |x|``, ``y = x / a``, ``c = y - mean(y)`` and
    ``s = max |c|``, the centred values are ``x - mean = t u`` with
    ``t = a s`` (the spread) and ``u = c / s`` (``|u| <= 1``, one of them
    is ``+-1``), and the standard deviation is ``sigma = t r`` with ``r =
    rms(u)`` (``>= 1 / sqrt(n)``). No square of anything outside ``[0, 1]``
    is taken, so nothing overflows or underflows.
    """
    valid = m > 0
    count = jnp.sum(m, axis=axes, keepdims=True)
    n_eff = jnp.maximum(count - ddof, 1.0)
    hi = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axes, keepdims=True)
    lo = jnp.min(jnp.where(valid, x, jnp.inf), axis=axes, keepdims=True)
    a = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    tiny = jnp.finfo(x.dtype).tiny
    a_ok = a >= tiny
    safe_a = jnp.where(a_ok, a, 1.0)
    y = _divide_by_scale(x, safe_a)
    c = jnp.where(valid, y - _safe_div(jnp.sum(y, axis=axes, keepdims=True),
                                       count), 0.0)
    s = jnp.max(jnp.abs(c), axis=axes, keepdims=True)
    safe_s = jnp.where(s > 0, s, 1.0)
    u = c / safe_s
    root = jnp.sqrt(jnp.sum(jnp.square(u), axis=axes, keepdims=True)
                    / n_eff)
    t = safe_a * safe_s
    sigma = t * root
    ok = (hi > lo) & a_ok & (s > 0) & (sigma >= tiny)
    root = jnp.where(ok, root, 1.0)
    # q = t / (sigma + eps) = 1 / (r + eps / t); eps / t may be inf.
    q = jnp.where(ok, 1.0 / (root + eps / jnp.where(ok, t, 1.0)), 0.0)
    inv_d = jnp.where(ok, 1.0 / jnp.where(ok, sigma + eps, 1.0), 0.0)
    return dict(u=jnp.where(ok & valid, u, 0.0), q=q, inv_d=inv_d, root=root,
                valid=valid, count=count, n_eff=n_eff, constant=~ok)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _standardized(x, m, eps, axes, ddof):
    p = _standardize_parts(x, m, eps, axes, ddof)
    return p["u"] * p["q"]


@_standardized.defjvp
def _standardized_jvp(axes, ddof, primals, tangents):
    """``d out = (dx - mean dx) / D - u q / D (d sigma + d eps)`` with
    ``D = sigma + eps`` and ``d sigma = sum(u dx) / (n r)``: the derivative
    of ``(x - mean) / (sigma + eps)``, in the scaled quantities, so that it
    is finite wherever the value is (gradients of at most about ``1 /
    tiny``)."""
    x, m, eps = primals
    dx, _, deps = tangents
    p = _standardize_parts(x, m, eps, axes, ddof)
    p = jax.tree_util.tree_map(jax.lax.stop_gradient, p)
    u, q, inv_d, valid = p["u"], p["q"], p["inv_d"], p["valid"]
    dx = jnp.where(valid, dx, 0.0)
    mean_dx = _safe_div(jnp.sum(dx, axis=axes, keepdims=True), p["count"])
    dsigma = (jnp.sum(u * dx, axis=axes, keepdims=True)
              / (p["n_eff"] * p["root"]))
    d_out = ((jnp.where(valid, dx - mean_dx, 0.0) - u * q * (dsigma + deps))
             * inv_d)
    return u * q, d_out


def _standardize(x, m, axes, *, eps, ddof):
    """``(x - mean) / (std + eps)`` over the valid entries, at any scale.

    ``x`` must already hold zero at invalid entries (``m == 0``). Values and
    derivatives come from rescaled quantities (:func:`_standardize_parts`),
    the derivative from its closed form, so that neither overflows nor
    meets ``0 * inf`` where the textbook formula squares a spread of
    ``1e20`` (inf in float32) or ``1e-20`` (zero).

    Returns ``(out, constant)``: ``constant`` (``keepdims`` over ``axes``)
    is true where the valid entries are all equal, where their magnitudes
    are all below the smallest normal number of the dtype (``1.2e-38`` in
    float32), where their spread is lost to rounding against their
    magnitude, or where their standard deviation is below that smallest
    normal number; ``out`` is exactly zero there and at invalid entries,
    with zero gradient.
    """
    eps = jnp.asarray(eps, x.dtype)
    constant = jax.lax.stop_gradient(
        _standardize_parts(x, m, eps, axes, ddof)["constant"])
    return _standardized(x, m, eps, axes, ddof), constant


def _centre(x, axes):
    """``x - mean(x)`` over ``axes`` (all entries valid). Where the plain
    sum overflows, the mean is taken of ``x / max|x|`` instead."""
    mean = jnp.mean(x, axis=axes, keepdims=True)
    # The scale is a constant: mean(x / a) * a has the gradient of mean(x).
    a = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axes, keepdims=True))
    a = jnp.where(a >= jnp.finfo(x.dtype).tiny, a, 1.0)
    scaled_mean = jnp.mean(_divide_by_scale(x, a), axis=axes,
                           keepdims=True) * a
    return x - jnp.where(jnp.isfinite(mean), mean, scaled_mean)


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
    (no ``eps``-amplified rounding noise); padded entries give zero, with
    zero gradient, whatever they hold (NaN, inf); an all-masked slice gives
    zeros. The statistics are computed on rescaled values, so the result
    is right and its gradient finite at any spread that the dtype holds
    (``1e-30`` or ``1e30`` in float32); a slice whose values are all below
    the dtype's smallest normal number (``1.2e-38`` in float32), or whose
    spread is lost to rounding against their magnitude, counts as
    constant.

    Args:
      advantages: array of any shape.
      mask: optional array broadcastable to ``advantages``; zero or False
        entries are left out of the statistics and set to zero.
      axis: axis or axes to reduce over; None for all.
      eps: added to the standard deviation, ``>= 0``.
      ddof: delta degrees of freedom of the variance (0: population), an
        int ``>= 0``.

    Returns:
      Normalised advantages, same shape and dtype as ``advantages``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.normalize_advantages(jnp.array([1.0, 2.0, 3.0]), eps=0.0)
      Array([-1.2247449,  0.       ,  1.2247449], dtype=float32)
    """
    advantages = jnp.asarray(advantages)
    checks.check_int(ddof, "ddof", lo=0)
    ok = checks.check_hparam(eps, "eps", lo=0.0)
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
    m = jnp.where(m > 0, m, 0.0)
    x = jnp.where(m > 0, x, 0.0)   # padding out before any arithmetic
    out, _ = _standardize(x, m, axes, eps=eps, ddof=ddof)
    return checks.nan_unless(ok, out.astype(out_dtype))


class GroupAdvantages(NamedTuple):
    """Output of :func:`group_advantages`.

    Attributes:
      advantages: ``[..., N]`` advantages, same shape as the rewards.
      zero_std: ``[..., N // group_size]`` booleans, true for groups whose
        rewards are all equal (those get exactly zero advantage), and for
        the numerically equivalent cases of :func:`normalize_advantages`
        (all magnitudes below the dtype's smallest normal number, or a
        spread lost to rounding against the rewards' magnitude).
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
      group_size: samples per group ``G`` (a static int ``>= 1``).
      baseline: ``"mean"`` or ``"rloo"`` (needs ``group_size >= 2``).
      scale: ``"group"``, ``"batch"`` or ``"none"``.
      ddof: delta degrees of freedom of the standard deviations, ``>= 0``.
      eps: added to the standard deviation before dividing, ``>= 0``.

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
    checks.check_int(group_size, "group_size", lo=1)
    n = rewards.shape[-1]
    if n % group_size:
        raise ValueError(
            f"`rewards` last axis ({n}) must be a multiple of `group_size` "
            f"({group_size}).")
    if baseline == "rloo" and group_size < 2:
        raise ValueError("`baseline='rloo'` needs `group_size` >= 2.")
    checks.check_int(ddof, "ddof", lo=0)
    ok = checks.check_hparam(eps, "eps", lo=0.0)
    if scale == "group" and group_size - ddof <= 0:
        raise ValueError(
            f"`ddof`={ddof} must be smaller than `group_size`={group_size}.")
    if scale == "batch" and n - ddof <= 0:
        raise ValueError(f"`ddof`={ddof} must be smaller than N={n}.")

    out_dtype, dt = checks.float_dtypes(rewards)
    grouped = rewards.astype(dt).reshape(
        rewards.shape[:-1] + (n // group_size, group_size))
    ones = jnp.ones_like(grouped)
    # `standardized` is (r - mean) / (std + eps) per group, computed at any
    # scale; `zero_std` also flags spreads lost to rounding (see
    # `_standardize`).
    standardized, constant = _standardize(grouped, ones, -1, eps=eps,
                                          ddof=ddof if scale == "group" else 0)
    zero_std = constant[..., 0]
    k = group_size / (group_size - 1) if baseline == "rloo" else 1.0
    if scale == "group":
        adv = k * standardized
    else:
        centred = k * _centre(grouped, -1)
        if scale == "batch":
            centred = jnp.where(zero_std[..., None], 0.0, centred)
            flat = centred.reshape(rewards.shape)
            adv, _ = _standardize(flat, jnp.ones_like(flat), -1, eps=eps,
                                  ddof=ddof)
            adv = adv.reshape(grouped.shape)
        else:
            adv = centred
    adv = jnp.where(zero_std[..., None], 0.0, adv)
    return GroupAdvantages(checks.nan_unless(
        ok, adv.reshape(rewards.shape).astype(out_dtype)),
                           zero_std)


class GroupSelection(NamedTuple):
    """Result of :func:`select_groups`.

    Attributes:
      rows: ``int32 [num_groups * G]`` the rows (samples) of the kept
        groups, group by group, for ``x[rows]``.
      groups: ``int32 [num_groups]`` the kept groups' indices.
      valid: ``bool [num_groups]``: the kept group's rewards differ. When
        fewer than ``num_groups`` groups qualify, the remaining slots hold
        groups whose rewards are all equal, flagged False here.
      num_qualifying: ``int32 []`` how many groups of the input qualify.
      fill_rate: ``float32 []`` the fraction of slots holding a qualifying
        group, ``min(num_qualifying, num_groups) / num_groups``.
    """
    rows: jax.Array
    groups: jax.Array
    valid: jax.Array
    num_qualifying: jax.Array
    fill_rate: jax.Array


def select_groups(rewards: jax.Array, *, group_size: int,
                  num_groups: int) -> GroupSelection:
    r"""Keeps ``num_groups`` groups whose rewards are not all equal.

    Dynamic sampling (Yu et al. 2025, DAPO, eq. 11): a group of ``G``
    samples whose rewards are all equal has zero group-relative advantage,
    so it carries no policy-gradient signal and only dilutes the batch.
    Over-generate ``M > num_groups`` groups, then keep the first
    ``num_groups`` groups (in their input order) whose rewards differ,
    with a shape fixed at ``num_groups * G`` rows so that the step compiles
    once. Equality is :func:`group_advantages`' ``zero_std`` (a spread lost
    to rounding counts as none).

    When fewer than ``num_groups`` groups qualify, the remaining slots are
    filled with non-qualifying groups and flagged ``valid = False``: mask
    their samples out of the loss (the GRPO trainer does) so that the step
    trains on the qualifying groups only; with none qualifying, the policy
    gradient is zero.

    Args:
      rewards: ``[N]`` rewards, ``N = M * G``, groups contiguous.
      group_size: ``G``, a static int ``>= 1``.
      num_groups: slots to fill, a static int in ``[1, M]``.

    Returns:
      A :class:`GroupSelection`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> r = jnp.array([1., 1., 0., 1., 2., 2., 3., 0.])
      >>> out = afn.select_groups(r, group_size=2, num_groups=2)
      >>> out.groups, out.rows
      (Array([1, 3], dtype=int32), Array([2, 3, 6, 7], dtype=int32))
      >>> float(out.fill_rate), int(out.num_qualifying)
      (1.0, 2)
    """
    rewards = jnp.asarray(rewards)
    checks.check_int(group_size, "group_size", lo=1)
    checks.check_int(num_groups, "num_groups", lo=1)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"`rewards` must be [N] with N a multiple of `group_size` "
            f"({group_size}), got shape {tuple(rewards.shape)}.")
    m = rewards.shape[0] // group_size
    if num_groups > m:
        raise ValueError(
            f"`num_groups` ({num_groups}) must not exceed the number of "
            f"groups in `rewards` ({m} = {rewards.shape[0]} / {group_size}).")
    if group_size == 1:  # a group of one never has a spread
        qualifies = jnp.zeros((m,), bool)
    else:
        qualifies = ~group_advantages(rewards, group_size=group_size,
                                      eps=0.0).zero_std
    # A stable sort on "does not qualify" puts qualifying groups first, each
    # side in input order.
    order = jnp.argsort(~qualifies, stable=True)[:num_groups].astype(
        jnp.int32)
    rows = (order[:, None] * group_size
            + jnp.arange(group_size, dtype=jnp.int32)).reshape(-1)
    count = jnp.sum(qualifies.astype(jnp.int32))
    fill = jnp.minimum(count, num_groups).astype(jnp.float32) / num_groups
    return GroupSelection(rows=rows, groups=order, valid=qualifies[order],
                          num_qualifying=count, fill_rate=fill)
