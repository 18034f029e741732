"""NumPy reference implementations, written as plain loops over the papers'
formulas, for testing the JAX versions (and users' own code) against.

They work in float64 on NumPy arrays, one trajectory or sequence at a time;
batched inputs (time or tokens on the last axis) are looped over row by row.
"""

from __future__ import annotations

import math

import numpy as np


def _rows(x):
    x = np.asarray(x, np.float64)
    return x.reshape(-1, x.shape[-1]), x.shape


def _opt_rows(x, shape):
    if x is None:
        return None
    return np.broadcast_to(np.asarray(x, np.float64), shape).reshape(
        -1, shape[-1])


def _step_inputs(rewards, gamma, terminated, truncated, next_values, mask):
    r, shape = _rows(rewards)
    g = np.broadcast_to(np.asarray(gamma, np.float64), shape).reshape(r.shape)
    term = _opt_rows(terminated, shape)
    trunc = _opt_rows(truncated, shape)
    nv = _opt_rows(next_values, shape)
    m = _opt_rows(mask, shape)
    return r, shape, g, term, trunc, nv, m


def _cut_after(t, length, trunc, m, i):
    """True where the recursion does not continue past step t."""
    if t == length - 1:
        return True
    if trunc is not None and trunc[i, t]:
        return True
    return m is not None and not m[i, t + 1]


def np_discounted_returns(rewards, gamma, terminated=None, truncated=None,
                          next_values=None, bootstrap_value=None, mask=None):
    """Loop form of :func:`artifex_fn.discounted_returns`."""
    r, shape, g, term, trunc, nv, m = _step_inputs(
        rewards, gamma, terminated, truncated, next_values, mask)
    n, length = r.shape
    boot = (np.zeros(n) if bootstrap_value is None else
            np.broadcast_to(np.asarray(bootstrap_value, np.float64),
                            shape[:-1]).reshape(n))
    out = np.zeros_like(r)
    for i in range(n):
        future = 0.0
        for t in reversed(range(length)):
            if m is not None and not m[i, t]:
                out[i, t] = future = 0.0
                continue
            if nv is not None:
                boot_t = nv[i, t]
            else:
                # bootstrap_value follows the last valid step.
                last = t == length - 1 or (m is not None and not m[i, t + 1])
                boot_t = boot[i] if last else 0.0
            if term is not None and term[i, t]:
                ret = r[i, t]
            elif _cut_after(t, length, trunc, m, i):
                ret = r[i, t] + g[i, t] * boot_t
            else:
                ret = r[i, t] + g[i, t] * future
            out[i, t] = future = ret
    return out.reshape(shape)


def _values_rows(values, shape, bootstrap_value, next_values, m=None):
    """``(V(s_t), value bootstrapped after step t)`` rows.

    With ``T`` values, the value after the last valid step (before padding
    or at the end) is ``bootstrap_value`` (zero when absent).
    """
    v = np.asarray(values, np.float64)
    n, length = math.prod(shape[:-1]), shape[-1]
    if v.shape[-1] == length + 1:
        v = v.reshape(n, length + 1)
        nxt = v[:, 1:]
        v = v[:, :-1]
    else:
        v = v.reshape(n, length)
        boot = (np.zeros(n) if bootstrap_value is None else
                np.broadcast_to(np.asarray(bootstrap_value, np.float64),
                                shape[:-1]).reshape(n))
        nxt = np.concatenate([v[:, 1:], boot[:, None]], axis=1)
        if m is not None:
            before_pad = np.concatenate(
                [~(m[:, 1:] > 0), np.ones((n, 1), bool)], axis=1)
            nxt = np.where(before_pad, boot[:, None], nxt)
    if next_values is not None:
        nxt = np.broadcast_to(np.asarray(next_values, np.float64),
                              shape).reshape(n, length)
    return v, nxt


def np_gae_advantages(rewards, values, gamma, lambda_, terminated=None,
                      truncated=None, next_values=None, bootstrap_value=None,
                      mask=None):
    """Loop form of :func:`artifex_fn.gae_advantages`.

    ``values`` holds ``V(s_0..s_{T-1})`` or ``V(s_0..s_T)`` on the last axis.
    """
    r, shape, g, term, trunc, _, m = _step_inputs(
        rewards, gamma, terminated, truncated, None, mask)
    lam = np.broadcast_to(np.asarray(lambda_, np.float64), shape).reshape(
        r.shape)
    v, nxt = _values_rows(values, shape, bootstrap_value, next_values, m)
    n, length = r.shape
    out = np.zeros_like(r)
    for i in range(n):
        future = 0.0
        for t in reversed(range(length)):
            if m is not None and not m[i, t]:
                out[i, t] = future = 0.0
                continue
            done = term is not None and term[i, t]
            delta = r[i, t] + (0.0 if done else g[i, t] * nxt[i, t]) - v[i, t]
            if done or _cut_after(t, length, trunc, m, i):
                adv = delta
            else:
                adv = delta + g[i, t] * lam[i, t] * future
            out[i, t] = future = adv
    return out.reshape(shape)


def np_lambda_returns(rewards, values, gamma, lambda_, terminated=None,
                      truncated=None, next_values=None, bootstrap_value=None,
                      mask=None):
    """Loop form of :func:`artifex_fn.lambda_returns`."""
    r, shape, g, term, trunc, _, m = _step_inputs(
        rewards, gamma, terminated, truncated, None, mask)
    lam = np.broadcast_to(np.asarray(lambda_, np.float64), shape).reshape(
        r.shape)
    _, nxt = _values_rows(values, shape, bootstrap_value, next_values, m)
    n, length = r.shape
    out = np.zeros_like(r)
    for i in range(n):
        future = 0.0
        for t in reversed(range(length)):
            if m is not None and not m[i, t]:
                out[i, t] = future = 0.0
                continue
            if term is not None and term[i, t]:
                ret = r[i, t]
            elif _cut_after(t, length, trunc, m, i):
                ret = r[i, t] + g[i, t] * nxt[i, t]
            else:
                ret = r[i, t] + g[i, t] * (
                    (1 - lam[i, t]) * nxt[i, t] + lam[i, t] * future)
            out[i, t] = future = ret
    return out.reshape(shape)


def np_normalize_advantages(advantages, mask=None, eps=1e-8, ddof=0):
    """Global masked normalisation, see
    :func:`artifex_fn.normalize_advantages` (``axis=None``)."""
    x = np.asarray(advantages, np.float64)
    m = (np.ones_like(x) if mask is None else
         np.broadcast_to(np.asarray(mask, np.float64), x.shape))
    valid = x[m > 0]
    out = np.zeros_like(x)
    if valid.size == 0 or valid.max() == valid.min():
        return out
    mean = valid.mean()
    std = math.sqrt(((valid - mean) ** 2).sum() / max(valid.size - ddof, 1))
    out[m > 0] = (valid - mean) / (std + eps)
    return out


def np_group_advantages(rewards, group_size, baseline="mean", scale="group",
                        ddof=0, eps=1e-6):
    """Loop form of :func:`artifex_fn.group_advantages` on a 1-D batch.

    Returns ``(advantages, zero_std)``.
    """
    r = np.asarray(rewards, np.float64)
    assert r.ndim == 1 and r.size % group_size == 0
    n_groups = r.size // group_size
    centred = np.zeros_like(r)
    zero_std = np.zeros(n_groups, bool)
    group_std = np.zeros(n_groups)
    for k in range(n_groups):
        grp = r[k * group_size:(k + 1) * group_size]
        zero_std[k] = bool(np.all(grp == grp[0]))
        mu = grp.mean()
        group_std[k] = math.sqrt(((grp - mu) ** 2).sum() / (group_size - ddof))
        for j in range(group_size):
            if baseline == "mean":
                c = grp[j] - mu
            else:  # leave-one-out mean of the other samples
                c = grp[j] - (grp.sum() - grp[j]) / (group_size - 1)
            centred[k * group_size + j] = c
    if scale == "batch":
        batch_std = math.sqrt(((centred - centred.mean()) ** 2).sum()
                              / (r.size - ddof))
    adv = np.zeros_like(r)
    for i in range(r.size):
        k = i // group_size
        if zero_std[k]:
            continue
        if scale == "group":
            adv[i] = centred[i] / (group_std[k] + eps)
        elif scale == "batch":
            adv[i] = centred[i] / (batch_std + eps)
        else:
            adv[i] = centred[i]
    return adv, zero_std


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_dpo_loss(chosen_log_probs, rejected_log_probs, ref_chosen_log_probs,
                ref_rejected_log_probs, beta=0.1, loss_type="sigmoid",
                label_smoothing=0.0):
    """Per-pair DPO-family loss (see :func:`artifex_fn.dpo_loss`).

    Returns ``(loss, chosen_rewards, rejected_rewards)``.
    """
    rho_w = (np.asarray(chosen_log_probs, np.float64)
             - np.asarray(ref_chosen_log_probs, np.float64))
    rho_l = (np.asarray(rejected_log_probs, np.float64)
             - np.asarray(ref_rejected_log_probs, np.float64))
    h = beta * (rho_w - rho_l)
    eps = label_smoothing
    if loss_type == "sigmoid":
        loss = -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h)
    elif loss_type == "ipo":
        loss = (rho_w - rho_l - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        loss = np.maximum(0.0, 1.0 - h)
    elif loss_type == "robust":
        loss = ((-(1 - eps) * _log_sigmoid(h) + eps * _log_sigmoid(-h))
                / (1 - 2 * eps))
    else:
        raise ValueError(loss_type)
    return loss, beta * rho_w, beta * rho_l


def np_simpo_loss(chosen_log_probs, rejected_log_probs, chosen_lengths,
                  rejected_lengths, beta=2.0, margin=1.0,
                  label_smoothing=0.0):
    """Per-pair SimPO loss (sigmoid form); see :func:`artifex_fn.simpo_loss`.

    Returns ``(loss, chosen_rewards, rejected_rewards)``.
    """
    r_w = beta * np.asarray(chosen_log_probs, np.float64) / np.maximum(
        np.asarray(chosen_lengths, np.float64), 1.0)
    r_l = beta * np.asarray(rejected_log_probs, np.float64) / np.maximum(
        np.asarray(rejected_lengths, np.float64), 1.0)
    h = r_w - r_l - margin
    eps = label_smoothing
    loss = -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h)
    return loss, r_w, r_l


def np_clipped_surrogate_loss(log_probs, old_log_probs, advantages,
                              clip_param=0.2, clip_param_high=None,
                              dual_clip=None):
    """Per-token PPO clipped surrogate loss (token-level ratios)."""
    lp = np.asarray(log_probs, np.float64)
    old = np.asarray(old_log_probs, np.float64)
    adv = np.broadcast_to(np.asarray(advantages, np.float64), lp.shape)
    hi = clip_param if clip_param_high is None else clip_param_high
    out = np.zeros_like(lp)
    for idx in np.ndindex(lp.shape):
        ratio = math.exp(max(min(lp[idx] - old[idx], 20.0), -20.0))
        a = adv[idx]
        clipped = min(max(ratio, 1 - clip_param), 1 + hi)
        loss = -min(ratio * a, clipped * a)
        if dual_clip is not None and a < 0:
            loss = min(loss, -dual_clip * a)
        out[idx] = loss
    return out


def np_kl_estimate(log_probs, ref_log_probs, estimator="k3"):
    """Per-sample KL estimators k1, k2, k3 (Schulman 2020)."""
    log_r = (np.asarray(ref_log_probs, np.float64)
             - np.asarray(log_probs, np.float64))
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    return np.exp(log_r) - 1 - log_r


def np_aggregate_loss(loss, mask=None, mode="token_mean", normalizer=None):
    """Loop form of :func:`artifex_fn.aggregate_loss`."""
    x, shape = _rows(loss)
    m = (np.ones_like(x) if mask is None else
         np.broadcast_to(np.asarray(mask, np.float64), shape).reshape(x.shape))
    if mode == "token_mean":
        den = m.sum()
        return float((x * m).sum() / den) if den > 0 else 0.0
    if mode == "seq_mean_token_sum_norm":
        c = x.shape[-1] if normalizer is None else normalizer
        return float((x * m).sum() / (x.shape[0] * c))
    per_seq = []
    for i in range(x.shape[0]):
        n = m[i].sum()
        if n <= 0:
            continue
        s = (x[i] * m[i]).sum()
        per_seq.append(s / n if mode == "seq_mean_token_mean" else s)
    return float(np.mean(per_seq)) if per_seq else 0.0
