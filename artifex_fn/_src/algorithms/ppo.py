"""Proximal Policy Optimization (Schulman et al. 2017) as ``init``/``update``.

One call of :func:`update` runs the whole PPO phase on a collected batch:
GAE (Schulman et al. 2016) from the stored values, then ``num_epochs``
passes of ``num_minibatches`` shuffled minibatches, each one optimiser step
on

.. math::
    L = L^{CLIP} + c_V L^{V} - c_H H

with gradients clipped to ``max_grad_norm``; everything inside one
``lax.scan``, so ``jax.jit(update)`` compiles the phase once.

Batch layout: ``rewards``, ``log_probs``, ``dones`` (termination),
optional ``truncated`` and ``mask`` are ``[B, T]`` (or ``[B]`` for one-step
episodes); ``values`` is ``[B, T]`` (then ``bootstrap_value [B]`` or
``next_values [B, T]`` give the values after the steps) or ``[B, T + 1]``
(``V(s_0..s_T)``); ``observations`` and ``actions`` are pytrees with leading
``[B, T]`` (or ``[B]``) axes. Any other key is an error, except ``extras``,
which is never read. The policy is called on flattened minibatches
``[n, ...]`` and returns ``(distribution_or_logits, value)`` with a value
of shape ``[n]`` or ``[n, 1]``.

Sequences (RLHF-PPO on language models, Ziegler et al. 2019, Ouyang et al.
2022): ``rewards [B]`` (one score per completion) with ``log_probs``,
``values``, ``actions`` and optional ``mask`` of shape ``[B, L]`` (one
entry per completion token; padding has mask 0) and observations with
leading ``[B]`` (one per sequence). The per-token reward is

.. math::
    r_t = -\\beta\\, \\mathrm{KL}_t + [t = T]\\, s

with :math:`\\mathrm{KL}_t` the ``kl_estimator`` estimate between the
behaviour log-probs and optional ``ref_log_probs [B, L]`` (or the
reference policy of ``state.ref_params``), :math:`s` the score and
:math:`T` the last valid token; GAE runs over the tokens, terminating at
:math:`T`. Minibatches are sets of sequences; the losses are means over
their valid tokens. The policy takes observations ``[n]`` and returns
``(distribution over [n, L], values [n, L])`` (e.g.
:func:`artifex_fn.sampling.token_actor_critic`). With ``kl_target`` the
coefficient adapts (Ziegler et al. 2019, eq. 2): :math:`\\beta \\leftarrow
\\beta (1 + \\mathrm{clip}(\\mathrm{KL}/\\mathrm{KL}_{target} - 1, -0.2,
0.2)\\, B / H)`, ``KL`` the batch's mean KL per sequence, ``H`` the
``kl_horizon``; the new value is ``state.config.beta`` (and the metric
``next_beta``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax
from jax import lax

from artifex_fn._src import checks
from artifex_fn._src.advantages import normalize_advantages
from artifex_fn._src.aggregation import aggregate_loss
from artifex_fn._src.algorithms.batching import batch_array
from artifex_fn._src.algorithms.batching import check_keys
from artifex_fn._src.algorithms.batching import check_leading
from artifex_fn._src.algorithms.batching import check_shape_of
from artifex_fn._src.algorithms.batching import clean_padding
from artifex_fn._src.algorithms.batching import masked_mean_std
from artifex_fn._src.algorithms.config import Bound
from artifex_fn._src.algorithms.config import bounds_ok
from artifex_fn._src.algorithms.config import check_bounds
from artifex_fn._src.algorithms.config import nan_unless_valid
from artifex_fn._src.algorithms.config import pytree_config
from artifex_fn._src.algorithms.gradients import minibatch_epochs
from artifex_fn._src.algorithms.policies import as_distribution
from artifex_fn._src.algorithms.policies import log_prob_and_entropy
from artifex_fn._src.algorithms.policies import require_policy
from artifex_fn._src.algorithms.state import TrainState
from artifex_fn._src.algorithms.state import init_state
from artifex_fn._src.divergences import kl_estimate
from artifex_fn._src.multistep import gae_advantages
from artifex_fn._src.policy_gradients import clip_fraction
from artifex_fn._src.policy_gradients import clipped_surrogate_loss
from artifex_fn._src.policy_gradients import importance_ratio
from artifex_fn._src.policy_gradients import value_loss


@pytree_config(static=("num_epochs", "num_minibatches",
                       "normalize_advantages", "num_micro_batches",
                       "kl_estimator", "policy", "optimizer"))
class PPOConfig:
    """Hyper-parameters of PPO.

    Attributes:
      gamma: discount factor for GAE, in ``[0, 1]``.
      gae_lambda: GAE lambda, in ``[0, 1]``.
      clip_param: clip range epsilon of the surrogate, in ``[0, 1]``.
      vf_coeff: weight of the value loss, ``>= 0``.
      entropy_coeff: weight of the entropy bonus, ``>= 0``.
      max_grad_norm: global-norm gradient clipping (None: no clipping).
      num_epochs: passes over the batch per update.
      num_minibatches: minibatches per pass; must divide the number of
        samples ``B * T``.
      normalize_advantages: normalise advantages per minibatch.
      value_clip_param: if set, clip the value loss around the stored
        values with this range (PPO baselines' value clipping).
      clip_param_high: optional upper clip range (clip-higher): ratio
        ceiling ``1 + clip_param_high``; defaults to ``clip_param``.
      num_micro_batches: accumulate each minibatch's gradient over this
        many micro-batches (must divide the minibatch size); the same
        steps, a ``k``-th of the activations in memory.
      beta: weight of the per-token KL penalty in the reward of sequence
        batches (with a reference), ``>= 0``; with ``kl_target``, the
        initial value.
      kl_estimator: ``"k1"`` (default, the log-ratio of RLHF), ``"k2"`` or
        ``"k3"``.
      kl_target: optional target KL per sequence of the adaptive
        controller.
      kl_horizon: the controller's horizon ``H`` (in sequences), ``> 0``.
      policy: ``(params, observations) -> (distribution_or_logits, value)``.
      optimizer: an optax ``GradientTransformation``.
    """
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_param: float = 0.2
    vf_coeff: float = 0.5
    entropy_coeff: float = 0.01
    max_grad_norm: float | None = 0.5
    num_epochs: int = 4
    num_minibatches: int = 1
    normalize_advantages: bool = True
    value_clip_param: float | None = None
    clip_param_high: float | None = None
    num_micro_batches: int = 1
    beta: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    policy: Callable[..., Any] | None = None
    optimizer: optax.GradientTransformation | None = None

    BOUNDS = dict(
        beta=Bound(0.0), kl_target=Bound(0.0, lo_open=True, optional=True),
        kl_horizon=Bound(0.0, lo_open=True),
        gamma=Bound(0.0, 1.0), gae_lambda=Bound(0.0, 1.0),
        clip_param=Bound(0.0, 1.0), vf_coeff=Bound(0.0),
        entropy_coeff=Bound(0.0),
        max_grad_norm=Bound(0.0, lo_open=True, optional=True),
        value_clip_param=Bound(0.0, lo_open=True, optional=True),
        clip_param_high=Bound(0.0, optional=True))

    def __post_init__(self):
        check_bounds(self)
        checks.check_int(self.num_epochs, "num_epochs", lo=1)
        checks.check_int(self.num_minibatches, "num_minibatches", lo=1)
        checks.check_int(self.num_micro_batches, "num_micro_batches", lo=1)
        checks.check_choice(self.kl_estimator, ("k1", "k2", "k3"),
                            "kl_estimator")


REQUIRED_KEYS = ("observations", "actions", "rewards", "log_probs", "values")
OPTIONAL_KEYS = ("dones", "truncated", "mask", "next_values",
                 "bootstrap_value", "ref_log_probs")


def _policy_outputs(config, params, observations, actions, rank=1):
    out = require_policy(config)(params, observations)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(
            "the PPO policy must return (distribution_or_logits, value).")
    dist, value = as_distribution(out[0]), jnp.asarray(out[1])
    log_prob, entropy = log_prob_and_entropy(dist, actions, rank)
    if rank == 2:        # sequences: one value per token
        if value.shape != log_prob.shape:
            raise ValueError(
                f"for sequences the PPO policy's values must have the shape "
                f"of the token log-probs {tuple(log_prob.shape)}, got "
                f"{tuple(value.shape)}.")
        return log_prob, entropy, value
    n = log_prob.shape[0]
    if value.shape not in ((n,), (n, 1)):
        raise ValueError(
            f"the PPO policy's value head must return shape ({n},) or "
            f"({n}, 1), one value per sample, got {tuple(value.shape)}.")
    value = value.reshape(n)
    return log_prob, entropy, value


def prepare_minibatch(minibatch, config: PPOConfig):
    """Minibatch statistics, before any split into micro-batches.

    Returns ``(minibatch, totals)``: advantages normalised over the whole
    minibatch (if ``normalize_advantages``) and ``totals["samples"]``, its
    number of valid samples (the loss's denominator).
    """
    minibatch = dict(minibatch)
    mask = minibatch["mask"]
    if config.normalize_advantages:
        minibatch["advantages"] = normalize_advantages(
            minibatch["advantages"], mask=mask)
    return minibatch, dict(samples=jnp.sum(jnp.asarray(mask, jnp.float32)))


def rows_loss(params, minibatch, config: PPOConfig, totals):
    """This shard's share of the PPO loss: ``(loss, metrics)``.

    ``minibatch`` and ``totals`` come from :func:`prepare_minibatch`; every
    value is a sum over the shard's samples divided by the minibatch's
    valid samples, so shares of disjoint shards add up to the minibatch
    means.
    """
    mask = minibatch["mask"]
    log_prob, entropy, value = _policy_outputs(
        config, params, minibatch["observations"], minibatch["actions"],
        rank=jnp.ndim(mask))
    old = minibatch["log_probs"]
    adv = minibatch["advantages"]
    valid = mask > 0   # the policy's own outputs at padded samples too
    log_prob = checks.keep_valid(valid, log_prob)
    entropy = checks.keep_valid(valid, entropy)
    value = checks.keep_valid(valid, value)
    pg = clipped_surrogate_loss(log_prob, old, adv,
                                clip_param=config.clip_param,
                                clip_param_high=config.clip_param_high,
                                mask=mask)
    vl = value_loss(value, minibatch["returns"],
                    old_values=minibatch["values"],
                    value_clip_param=config.value_clip_param, mask=mask)
    # The masked mean over samples (tokens of sequences): token_mean.
    if mask.ndim == 1:
        m = mask[:, None]
        mean = lambda x: aggregate_loss(x[:, None], m,
                                        denominator=totals["samples"])
    else:
        mean = lambda x: aggregate_loss(x, mask,
                                        denominator=totals["samples"])
    policy_loss = mean(pg)
    v_loss = mean(vl)
    ent = mean(entropy)
    total = policy_loss + config.vf_coeff * v_loss - config.entropy_coeff * ent
    ratio = importance_ratio(log_prob, old, mask=mask)
    metrics = dict(
        loss=total, policy_loss=policy_loss, value_loss=v_loss, entropy=ent,
        approx_kl=mean(kl_estimate(old, log_prob, mask=mask)),
        kl_divergence=mean(kl_estimate(old, log_prob, estimator="k1",
                                       mask=mask)),
        clip_fraction=mean(clip_fraction(
            ratio, clip_param=config.clip_param,
            clip_param_high=config.clip_param_high, mask=mask)))
    return total, metrics


def minibatch_loss(params, minibatch, config: PPOConfig):
    """PPO loss on flattened samples; returns ``(loss, metrics)``.

    ``minibatch`` holds ``observations``, ``actions`` (leading ``[n]``),
    ``log_probs``, ``advantages``, ``returns``, ``values``, ``mask``
    (all ``[n]``).
    """
    minibatch, totals = prepare_minibatch(minibatch, config)
    return rows_loss(params, minibatch, config, totals)


def _flatten(x, lead_ndim, n):
    return jax.tree_util.tree_map(
        lambda a: jnp.reshape(a, (n,) + jnp.shape(a)[lead_ndim:]), x)


def prepare(batch, config: PPOConfig):
    """GAE and flattening: returns (samples, batch metrics).

    ``samples`` is a dict of ``[B * T]``-leading arrays used by
    :func:`minibatch_loss`.
    """
    check_keys(batch, required=REQUIRED_KEYS,
               optional=OPTIONAL_KEYS, what="PPO")
    rewards = jnp.asarray(batch["rewards"])
    if rewards.ndim == 1 and jnp.ndim(batch["log_probs"]) == 2:
        return _prepare_sequences(batch, config)
    if "ref_log_probs" in batch:
        raise ValueError(
            "`batch['ref_log_probs']` goes with sequences (rewards [B], "
            "log_probs [B, L]): the KL penalty is per token of a "
            "completion.")
    if rewards.ndim not in (1, 2):
        raise ValueError(
            f"`batch['rewards']` must be [B] or [B, T], got shape "
            f"{tuple(rewards.shape)}.")
    lead = rewards.ndim
    shape = tuple(rewards.shape)
    r2 = rewards if lead == 2 else rewards[:, None]
    what = "the shape of batch['rewards']"

    def as_2d(name):
        x = check_shape_of(batch.get(name), f"batch['{name}']", shape, what,
                           broadcast=name in ("dones", "truncated", "mask"))
        if x is None:
            return None
        x = jnp.broadcast_to(x, shape)
        return x if lead == 2 else x[:, None]

    values = jnp.asarray(batch["values"])
    plus_one = shape[:-1] + (shape[-1] + 1,) if lead == 2 else (shape[0], 2)
    if tuple(values.shape) not in (shape, plus_one):
        raise ValueError(
            f"`batch['values']` must have shape {shape} (V(s_t)) or "
            f"{plus_one} (V(s_0..s_T)), the rows and steps of "
            f"batch['rewards']; got {tuple(values.shape)}.")
    if lead == 1 and values.ndim == 1:  # [B] -> [B, 1]; [B, 2] is V(s_0), V(s_1)
        values = values[:, None]
    check_shape_of(batch["log_probs"], "batch['log_probs']", shape, what)
    check_shape_of(batch.get("bootstrap_value"),
                   "batch['bootstrap_value']", shape[:1],
                   "one value per row of batch['rewards']")
    for key in ("observations", "actions"):
        check_leading(batch[key], shape, f"batch['{key}']",
                      "the rows and steps of batch['rewards']")
    mask = as_2d("mask")
    adv = gae_advantages(
        r2, values, gamma=config.gamma, lambda_=config.gae_lambda,
        terminated=as_2d("dones"), truncated=as_2d("truncated"),
        next_values=as_2d("next_values"),
        bootstrap_value=batch.get("bootstrap_value"), mask=mask)
    n = r2.size
    m = jnp.ones(r2.shape, jnp.float32) if mask is None else (
        jnp.broadcast_to(mask, r2.shape).astype(jnp.float32))
    # Padded samples may hold anything: replaced before any arithmetic.
    valid = None if mask is None else m > 0
    v = checks.keep_valid(valid, values[..., :r2.shape[-1]])
    returns = adv + v
    log_probs = checks.keep_valid(
        valid, jnp.reshape(jnp.asarray(batch["log_probs"]), r2.shape))
    observations = batch_array(batch, "observations")
    actions = batch_array(batch, "actions")
    if lead == 1:
        flat_mask = None if mask is None else m[:, 0]
    else:
        flat_mask = None if mask is None else m
    observations = clean_padding(observations, flat_mask)
    actions = clean_padding(actions, flat_mask)
    samples = dict(
        observations=_flatten(observations, lead, n),
        actions=_flatten(actions, lead, n),
        log_probs=jnp.reshape(log_probs, (n,)),
        advantages=adv.reshape(n), returns=returns.reshape(n),
        values=v.reshape(n), mask=m.reshape(n))
    mean_reward, _ = masked_mean_std(r2, m)
    stats = dict(mean_reward=mean_reward,
                 **_value_stats(adv, returns, v, m))
    return samples, stats


def _value_stats(adv, returns, values, mask):
    """Advantage mean and spread, and the values' explained variance
    ``1 - Var(returns - values) / Var(returns)`` over valid entries."""
    adv_mean, adv_std = masked_mean_std(adv, mask)
    _, ret_std = masked_mean_std(returns, mask)
    _, res_std = masked_mean_std(returns - values, mask)
    explained = jnp.where(ret_std > 0,
                          1.0 - res_std ** 2 / jnp.maximum(ret_std ** 2,
                                                           1e-12), 0.0)
    return dict(advantage_mean=adv_mean, advantage_std=adv_std,
                explained_variance=explained)


def _prepare_sequences(batch, config: PPOConfig):
    """:func:`prepare` for sequences (module docstring): per-token rewards
    with the KL penalty, GAE over tokens; rows stay sequences."""
    rewards = jnp.asarray(batch["rewards"])
    b = rewards.shape[0]
    old = jnp.asarray(batch["log_probs"])
    shape = tuple(old.shape)
    if shape[0] != b:
        raise ValueError(
            f"`batch['log_probs']` {shape} must have one row per score of "
            f"batch['rewards'] ({b},).")
    what = "one entry per completion token, [B, L]"
    for name in ("dones", "truncated", "next_values", "bootstrap_value"):
        if name in batch:
            raise ValueError(
                f"`batch['{name}']` does not apply to sequences: a "
                "completion ends at its last valid token (`mask`).")
    values = check_shape_of(batch["values"], "batch['values']", shape, what)
    ref = check_shape_of(batch.get("ref_log_probs"),
                         "batch['ref_log_probs']", shape, what)
    mask = check_shape_of(batch.get("mask"), "batch['mask']", shape, what,
                          broadcast=True)
    for key in ("observations",):
        check_leading(batch[key], (b,), f"batch['{key}']",
                      "one row per sequence")
    check_leading(batch["actions"], shape, "batch['actions']", what)
    m = (jnp.ones(shape, jnp.float32) if mask is None else
         jnp.broadcast_to(mask, shape).astype(jnp.float32))
    valid = m > 0
    old = checks.keep_valid(valid, old)
    v = checks.keep_valid(valid, values)
    length = shape[1]
    pos = jnp.arange(length)
    last = jnp.where(jnp.any(valid, axis=1),
                     length - 1 - jnp.argmax(valid[:, ::-1], axis=1), -1)
    is_last = pos[None] == last[:, None]
    if ref is not None:
        ref = checks.keep_valid(valid, ref)
        kl_tok = kl_estimate(old, lax.stop_gradient(ref),
                             estimator=config.kl_estimator, mask=m)
    else:
        kl_tok = jnp.zeros(shape, jnp.float32)
    score = jnp.where(is_last, rewards[:, None], 0.0)
    non_score = jnp.where(valid, -config.beta * kl_tok, 0.0)
    token_rewards = non_score + score
    adv = gae_advantages(token_rewards, v, gamma=config.gamma,
                         lambda_=config.gae_lambda, terminated=is_last,
                         mask=m)
    returns = adv + v
    samples = dict(
        observations=clean_padding(batch["observations"], None),
        actions=clean_padding(batch["actions"], m), log_probs=old,
        advantages=adv, returns=returns, values=v, mask=m)
    kl_seq = jnp.sum(jnp.where(valid, kl_tok, 0.0), axis=1)
    stats = dict(
        mean_reward=jnp.mean(rewards.astype(jnp.float32)),
        score=jnp.mean(rewards.astype(jnp.float32)),
        kl=jnp.mean(kl_seq),
        non_score_reward=jnp.mean(jnp.sum(non_score, axis=1)),
        beta=jnp.asarray(config.beta, jnp.float32),
        **_value_stats(adv, returns, v, m))
    return samples, stats


def next_beta(config: PPOConfig, kl, batch_size: int):
    """The adaptive KL coefficient after a batch of ``batch_size``
    sequences with mean KL ``kl`` (Ziegler et al. 2019, eq. 2); ``beta``
    unchanged without ``kl_target``."""
    if config.kl_target is None:
        return jnp.asarray(config.beta, jnp.float32)
    error = jnp.clip(kl / config.kl_target - 1.0, -0.2, 0.2)
    return jnp.asarray(config.beta, jnp.float32) * (
        1.0 + error * batch_size / config.kl_horizon)


def with_reference_log_probs(state: TrainState, batch):
    """Adds ``ref_log_probs [B, L]`` of a sequence batch from
    ``state.ref_params`` if the batch lacks them; other batches are
    returned unchanged. The reference policy may return a distribution
    (or logits) or, like the policy, a ``(distribution, values)`` pair."""
    if ("ref_log_probs" in batch or state.ref_params is None
            or jnp.ndim(batch_array(batch, "log_probs")) != 2
            or jnp.ndim(batch_array(batch, "rewards")) != 1):
        return batch
    out = require_policy(state.config)(state.ref_params,
                                       batch["observations"])
    if isinstance(out, (tuple, list)):   # an actor-critic: its policy
        out = out[0]
    ref = as_distribution(out).log_prob(batch["actions"])
    return dict(batch, ref_log_probs=lax.stop_gradient(
        jnp.asarray(ref, jnp.float32)))


def loss(params, batch, config: PPOConfig):
    """PPO loss on a whole batch (GAE inside, one minibatch, no shuffling).

    Returns ``(loss, metrics)``; :func:`update` uses the same objective on
    shuffled minibatches over several epochs.
    """
    samples, stats = prepare(batch, config)
    total, metrics = minibatch_loss(params, samples, config)
    ok = bounds_ok(config)
    return checks.nan_unless(ok, (total, dict(metrics, **stats)))


def init(params, config: PPOConfig, *, key=None,
         ref_params=None) -> TrainState:
    """Initial state: parameters, optimiser state, step 0, PRNG key."""
    return init_state(params, config, key=key, ref_params=ref_params)


def update(state: TrainState, batch):
    """One PPO phase (epochs x minibatches); returns ``(state, metrics)``.

    Metrics: ``loss, policy_loss, value_loss, entropy, approx_kl,
    kl_divergence, clip_fraction`` (means over all minibatch steps),
    ``mean_reward, advantage_mean, advantage_std, explained_variance`` (of
    the batch) and ``grad_norm`` (mean, before clipping).

    With ``num_micro_batches = k > 1`` each minibatch's gradient is
    accumulated over ``k`` micro-batches, with the advantage statistics and
    denominator of the whole minibatch: the same steps as with ``k = 1``.
    """
    config = state.config
    batch = with_reference_log_probs(state, batch)
    samples, stats = prepare(batch, config)
    params, opt_state, key, metrics = minibatch_epochs(
        state, rows_loss, samples,
        lambda minibatch: prepare_minibatch(minibatch, config),
        size_name="B*T" if samples["mask"].ndim == 1 else "B")
    metrics.update(stats)
    new_state = state.replace(params=params, opt_state=opt_state,
                              step=state.step + 1, key=key)
    if config.kl_target is not None and "kl" in stats:
        beta = next_beta(config, stats["kl"], samples["mask"].shape[0])
        metrics["next_beta"] = beta
        new_state = new_state.replace(
            config=dataclasses.replace(config, beta=beta))
    return nan_unless_valid(config, new_state, metrics)
