"""Group Relative Policy Optimization (Shao et al. 2024) as ``init``/``update``.

Critic-free: for each prompt, ``num_generations`` samples are drawn and
scored; their rewards are normalised within the group
(:func:`artifex_fn.group_advantages`) and every token of a sample shares its
advantage. The per-token objective is PPO's clipped surrogate plus a KL
penalty to a frozen reference (k3 estimator by default, Shao et al. 2024,
eq. 4), minus an entropy bonus:

.. math::
    \\ell_{i,t} = -\\min(r_{i,t} A_i, \\mathrm{clip}(r_{i,t}, 1-\\epsilon,
      1+\\epsilon_{high}) A_i) + \\beta\\, \\mathrm{KL}_{i,t} - c_H H_{i,t}

reduced by ``loss_aggregation``:

* ``"grpo"``: mean over sequences of per-sequence token means (the paper);
* ``"dapo"``: mean over all valid tokens of the batch (Yu et al. 2025);
* ``"bnpo"``: the same token mean, normalised by the batch's valid tokens
  (identical to ``"dapo"`` within one update);
* ``"dr_grpo"``: token sum over ``num_sequences * max_completion_length``
  (Liu et al. 2025); Dr. GRPO also drops the std scaling of the
  advantages: set ``scale_rewards="none"`` for the full method.

Batch: ``observations``, ``actions`` (leading ``[B]``), ``rewards [B]``
(per-step ``[B, T]`` rewards are folded to the discounted return from the
first step with ``gamma``), ``log_probs`` of the behaviour policy (``[B]``
for one-step samples, ``[B, L]`` per token), optional ``mask [B, L]``,
``ref_log_probs`` (same shape as ``log_probs``) and ``group_size`` (a Python
int; defaults to ``num_generations``); ``dones`` and ``reward_mask`` go with
per-step rewards; ``truncated [B]`` (bool) flags completions cut at the
length limit (see ``mask_truncated_completions``). ``B`` must be a multiple
of the group size, with the samples of one prompt contiguous.

Several updates per generation: with ``num_epochs`` (the mu of Shao et al.
2024, TRL's ``num_iterations``) and ``num_minibatches``, one call of
:func:`update` takes ``num_epochs * num_minibatches`` optimiser steps on
the batch, as PPO does: advantages are computed once from whole groups,
the rows are shuffled into minibatches each epoch, and every step's ratios
are taken against the behaviour log-probs of the batch (kept from
generation time), so the clipping bounds how far the policy moves from the
one that generated. Reference log-probs are scored once per call. Each
minibatch is aggregated with its own denominators (sequences or tokens of
the minibatch); with ``num_epochs = num_minibatches = 1`` the update is
the single step of before. Any other key is an error (a misspelt
``ref_logprobs`` would silently drop the KL term), except ``extras``, which
is never read.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax
from jax import lax

from artifex_fn._src import checks
from artifex_fn._src.advantages import group_advantages
from artifex_fn._src.advantages import select_groups
from artifex_fn._src.aggregation import aggregate_loss
from artifex_fn._src.aggregation import aggregate_loss_parts
from artifex_fn._src.algorithms.batching import batch_array
from artifex_fn._src.algorithms.batching import check_keys
from artifex_fn._src.algorithms.batching import check_leading
from artifex_fn._src.algorithms.batching import check_shape_of
from artifex_fn._src.algorithms.batching import clean_padding
from artifex_fn._src.algorithms.batching import masked_mean_std
from artifex_fn._src.algorithms.batching import micro_batches
from artifex_fn._src.algorithms.config import Bound
from artifex_fn._src.algorithms.config import bounds_ok
from artifex_fn._src.algorithms.config import check_bounds
from artifex_fn._src.algorithms.config import nan_unless_valid
from artifex_fn._src.algorithms.config import pytree_config
from artifex_fn._src.algorithms.gradients import accumulated_gradient_step
from artifex_fn._src.algorithms.gradients import minibatch_epochs
from artifex_fn._src.algorithms.policies import as_distribution
from artifex_fn._src.algorithms.policies import log_prob_and_entropy
from artifex_fn._src.algorithms.policies import reduce_to_rank
from artifex_fn._src.algorithms.policies import require_policy
from artifex_fn._src.algorithms.state import TrainState
from artifex_fn._src.algorithms.state import init_state
from artifex_fn._src.divergences import kl_estimate
from artifex_fn._src.multistep import discounted_returns
from artifex_fn._src.policy_gradients import clip_fraction
from artifex_fn._src.policy_gradients import clipped_surrogate_loss
from artifex_fn._src.policy_gradients import importance_ratio

LOSS_AGGREGATIONS = {
    "grpo": "seq_mean_token_mean",
    "dapo": "token_mean",
    "bnpo": "token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",
}


@pytree_config(static=(
    "num_generations", "kl_estimator", "loss_aggregation", "ratio_level",
    "scale_rewards", "baseline", "max_completion_length",
    "num_micro_batches", "num_epochs", "num_minibatches",
    "mask_truncated_completions", "policy", "optimizer"))
class GRPOConfig:
    """Hyper-parameters of GRPO.

    Attributes:
      num_generations: samples per prompt (group size ``G``), ``>= 1``.
      clip_param: clip range epsilon in ``[0, 1]`` (ratio floor
        ``1 - clip_param``).
      beta: weight of the KL penalty to the reference, ``>= 0``.
      entropy_coeff: weight of the entropy bonus, ``>= 0``.
      gamma: discount applied when rewards are per step ``[B, T]``.
      clip_param_high: upper clip range (clip-higher): ratio ceiling
        ``1 + clip_param_high``; defaults to ``clip_param``.
      kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
      loss_aggregation: ``"grpo"``, ``"dapo"``, ``"bnpo"`` or ``"dr_grpo"``.
      ratio_level: ``"token"`` or ``"sequence"`` (GSPO) importance ratios.
      scale_rewards: ``"group"``, ``"batch"`` or ``"none"`` advantage scale.
      baseline: ``"mean"`` or ``"rloo"`` (leave-one-out) group baseline.
      advantage_eps: added to the standard deviation of the scaling.
      max_completion_length: constant of ``"dr_grpo"`` aggregation
        (defaults to the token axis length ``L``).
      max_grad_norm: optional global-norm gradient clipping.
      num_micro_batches: accumulate each step's gradient over this many
        micro-batches (must divide ``B``); the step is the same as with
        one batch, with a ``k``-th of the activations in memory (with
        ``num_minibatches``: must divide the minibatch size).
      num_epochs: passes over the batch per update (``mu``), ``>= 1``.
      num_minibatches: optimiser steps per pass, on shuffled disjoint
        minibatches; must divide ``B``.
      mask_truncated_completions: completions flagged in
        ``batch["truncated"]`` (cut at the length limit without a stop
        token) contribute no loss; their rewards still count in their
        group's advantages (DAPO's over-long filtering).
      policy: ``(params, observations) -> distrax.Distribution`` (or logits).
      optimizer: an optax ``GradientTransformation``.
    """
    num_generations: int = 4
    clip_param: float = 0.2
    beta: float = 0.01
    entropy_coeff: float = 0.01
    gamma: float = 0.99
    clip_param_high: float | None = None
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    loss_aggregation: Literal["grpo", "dapo", "bnpo", "dr_grpo"] = "grpo"
    ratio_level: Literal["token", "sequence"] = "token"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    baseline: Literal["mean", "rloo"] = "mean"
    advantage_eps: float = 1e-6
    max_completion_length: int | None = None
    max_grad_norm: float | None = None
    num_micro_batches: int = 1
    num_epochs: int = 1
    num_minibatches: int = 1
    mask_truncated_completions: bool = False
    policy: Callable[..., Any] | None = None
    optimizer: optax.GradientTransformation | None = None

    BOUNDS = dict(
        clip_param=Bound(0.0, 1.0), beta=Bound(0.0),
        entropy_coeff=Bound(0.0), gamma=Bound(0.0, 1.0),
        clip_param_high=Bound(0.0, optional=True),
        advantage_eps=Bound(0.0),
        max_grad_norm=Bound(0.0, lo_open=True, optional=True))

    def __post_init__(self):
        checks.check_int(self.num_generations, "num_generations", lo=1)
        checks.check_int(self.num_micro_batches, "num_micro_batches", lo=1)
        checks.check_int(self.num_epochs, "num_epochs", lo=1)
        checks.check_int(self.num_minibatches, "num_minibatches", lo=1)
        if not isinstance(self.mask_truncated_completions, bool):
            raise ValueError(
                "`mask_truncated_completions` must be a bool, got "
                f"{self.mask_truncated_completions!r}.")
        check_bounds(self)
        for name, choices in (
                ("kl_estimator", ("k1", "k2", "k3")),
                ("loss_aggregation", tuple(LOSS_AGGREGATIONS)),
                ("ratio_level", ("token", "sequence")),
                ("scale_rewards", ("group", "batch", "none")),
                ("baseline", ("mean", "rloo"))):
            checks.check_choice(getattr(self, name), choices, name)
        if self.max_completion_length is not None:
            checks.check_int(self.max_completion_length,
                             "max_completion_length", lo=1)


REQUIRED_KEYS = ("observations", "actions", "rewards", "log_probs")
OPTIONAL_KEYS = ("mask", "ref_log_probs", "group_size", "dones",
                 "reward_mask", "truncated")


def group_size_of(batch, config: GRPOConfig) -> int:
    """The static group size: ``batch['group_size']`` or the config's."""
    size = batch.get("group_size", config.num_generations)
    if isinstance(size, jax.core.Tracer):
        raise ValueError(
            "`batch['group_size']` is traced (it was passed through jax.jit): "
            "it sets shapes, so remove it from the batch and set "
            "`GRPOConfig.num_generations`, or call update outside jit.")
    if hasattr(size, "item"):
        size = size.item()
    checks.check_int(size, "group_size", lo=1)
    return size


def advantages_of(batch, config: GRPOConfig):
    """Group-relative advantages ``[B]`` and the group statistics."""
    rewards = jnp.asarray(batch_array(batch, "rewards"))
    if rewards.ndim == 2:
        per_step = "per-step rewards [B, T]"
        rewards = discounted_returns(
            rewards, gamma=config.gamma,
            terminated=check_shape_of(
                batch.get("dones"), "batch['dones']", rewards.shape,
                per_step, broadcast=True),
            mask=check_shape_of(
                batch.get("reward_mask"), "batch['reward_mask']",
                rewards.shape, per_step, broadcast=True))[:, 0]
    elif rewards.ndim != 1:
        raise ValueError(
            f"`batch['rewards']` must be [B] or [B, T], got shape "
            f"{tuple(rewards.shape)}.")
    else:
        for key in ("dones", "reward_mask"):
            if key in batch:
                raise ValueError(
                    f"`batch['{key}']` applies to per-step rewards [B, T]; "
                    f"batch['rewards'] has shape {tuple(rewards.shape)}.")
    size = group_size_of(batch, config)
    if rewards.shape[0] % size:
        raise ValueError(
            f"batch size {rewards.shape[0]} (the rows of batch['rewards']) "
            f"must be a multiple of the group size {size} "
            f"(`num_generations` or batch['group_size']).")
    out = group_advantages(rewards, group_size=size,
                           baseline=config.baseline,
                           scale=config.scale_rewards,
                           eps=config.advantage_eps)
    return rewards, out


def prepare(batch, config: GRPOConfig):
    """The parameter-free part of the loss, on the whole batch.

    Returns ``(rows, totals, stats)``: ``rows`` holds the per-sample arrays
    the loss reads (``observations``, ``actions``, ``log_probs``,
    ``advantages``, optional ``mask`` and ``ref_log_probs``), all with
    leading ``[B]``; ``totals`` the denominators of the batch (``loss``:
    that of ``loss_aggregation``, ``tokens``: valid tokens); ``stats`` the
    reward statistics. Group advantages need whole groups, so they are
    computed here, before any split into micro-batches.
    """
    check_keys(batch, required=REQUIRED_KEYS,
               optional=OPTIONAL_KEYS, what="GRPO")
    old = jnp.asarray(batch["log_probs"])
    rewards_shape = tuple(jnp.shape(batch["rewards"]))
    b = rewards_shape[0] if rewards_shape else None
    if old.ndim not in (1, 2) or old.shape[0] != b:
        raise ValueError(
            f"`batch['log_probs']` must be [B] (one-step samples) or [B, L] "
            f"(tokens) with B = {b}, the rows of batch['rewards'] "
            f"{rewards_shape}; got shape {tuple(old.shape)}.")
    rewards, group = advantages_of(batch, config)
    for key in ("observations", "actions"):
        check_leading(batch[key], (b,), f"batch['{key}']",
                      "the rows of batch['rewards']")
    rows = dict(observations=batch["observations"],
                actions=batch["actions"], log_probs=old,
                advantages=group.advantages)
    mask = _loss_mask(batch, old, config)
    ref = check_shape_of(batch.get("ref_log_probs"),
                         "batch['ref_log_probs']", old.shape,
                         "the shape of batch['log_probs']")
    if ref is not None:
        rows["ref_log_probs"] = ref
    if mask is not None:
        rows["mask"] = mask
        # Padded tokens may hold anything: replaced before any maths.
        valid = rows["mask"] > 0
        for key in ("log_probs", "ref_log_probs"):
            if key in rows:
                rows[key] = checks.keep_valid(valid, rows[key])
        for key in ("observations", "actions"):
            rows[key] = clean_padding(rows[key], rows["mask"])
    mean_reward, reward_std = masked_mean_std(rewards)
    _, adv_std = masked_mean_std(group.advantages)
    stats = dict(
        mean_reward=mean_reward, reward_std=reward_std,
        group_advantage_std=adv_std,
        frac_reward_zero_std=jnp.mean(group.zero_std.astype(jnp.float32)))
    if "truncated" in batch:
        stats["frac_truncated"] = jnp.mean(
            jnp.asarray(batch["truncated"]).astype(jnp.float32))
    return rows, totals_of(rows, config), stats


def _loss_mask(batch, old, config: GRPOConfig):
    """The loss mask, ``old.shape``: ``batch["mask"]`` (broadcast), with
    truncated completions removed under ``mask_truncated_completions``."""
    mask = batch.get("mask")
    if mask is not None:
        mask = check_shape_of(mask, "batch['mask']", old.shape, "",
                              broadcast=True)
        mask = jnp.broadcast_to(mask, old.shape)
    truncated = check_shape_of(batch.get("truncated"), "batch['truncated']",
                               old.shape[:1], "[B] flags, one per sample")
    if not config.mask_truncated_completions:
        return mask
    if truncated is None:
        raise ValueError(
            "`mask_truncated_completions` needs `batch['truncated']` [B]: "
            "True for completions cut at the length limit (see "
            "artifex_fn.truncated_completions).")
    keep = ~truncated.astype(bool)
    keep = keep if old.ndim == 1 else keep[:, None]
    if mask is None:
        return jnp.broadcast_to(keep, old.shape).astype(jnp.float32)
    # `where`, not a product: a padded entry may hold NaN.
    return jnp.where(keep, mask, jnp.zeros((), mask.dtype))


def totals_of(rows, config: GRPOConfig):
    """The denominators of ``rows`` (``loss``: that of
    ``loss_aggregation``, ``tokens``: valid tokens), from their mask."""
    old = jnp.asarray(rows["log_probs"])
    tokens = jnp.zeros(old.shape if old.ndim == 2 else old.shape + (1,),
                       jnp.float32)
    m2 = _token_mask(rows.get("mask"), old.ndim)
    _, den = aggregate_loss_parts(
        tokens, m2, mode=LOSS_AGGREGATIONS[config.loss_aggregation],
        normalizer=config.max_completion_length)
    _, n_tokens = aggregate_loss_parts(tokens, m2, mode="token_mean")
    return dict(loss=den, tokens=n_tokens)


def _token_mask(mask, ndim):
    """The ``[B, L]`` mask (one-step samples are sequences of one token)."""
    if mask is None or ndim == 2:
        return mask
    return jnp.asarray(mask)[:, None]


def rows_loss(params, rows, config: GRPOConfig, totals):
    """This shard's share of the GRPO loss: ``(loss, metrics)``.

    ``rows`` and ``totals`` come from :func:`prepare`; every value is the
    rows' sum over the whole batch's denominators, so shares of disjoint
    shards (micro-batches, devices) add up to the full-batch values.
    """
    policy = require_policy(config)
    old = jnp.asarray(rows["log_probs"])
    dist = as_distribution(policy(params, rows["observations"]))
    log_prob, entropy = log_prob_and_entropy(dist, rows["actions"],
                                             old.ndim)
    if log_prob.shape != old.shape:
        raise ValueError(
            f"the policy's log-probs have shape {tuple(log_prob.shape)} but "
            f"`batch['log_probs']` has {tuple(old.shape)}.")
    mask = _token_mask(rows.get("mask"), old.ndim)
    ref = rows.get("ref_log_probs")
    if old.ndim == 1:  # one-step samples: B sequences of one token
        log_prob, old, entropy = log_prob[:, None], old[:, None], entropy[:, None]
        ref = None if ref is None else ref[:, None]
    adv = rows["advantages"]
    if mask is not None:  # the policy's own outputs at padded tokens too
        valid = jnp.asarray(mask) > 0
        log_prob = checks.keep_valid(valid, log_prob)
        entropy = checks.keep_valid(valid, entropy)
    per_token = clipped_surrogate_loss(
        log_prob, old, adv, clip_param=config.clip_param,
        clip_param_high=config.clip_param_high, level=config.ratio_level,
        mask=mask)
    mode = LOSS_AGGREGATIONS[config.loss_aggregation]
    agg = lambda x: aggregate_loss(x, mask, mode=mode,
                                   normalizer=config.max_completion_length,
                                   denominator=totals["loss"])
    token_mean = lambda x: aggregate_loss(x, mask, mode="token_mean",
                                          denominator=totals["tokens"])
    policy_loss = agg(per_token)
    total_tokens = per_token - config.entropy_coeff * entropy
    if ref is not None:
        kl_tok = kl_estimate(log_prob, lax.stop_gradient(ref),
                             estimator=config.kl_estimator, mask=mask)
        total_tokens = total_tokens + config.beta * kl_tok
        kl = token_mean(kl_tok)
    else:
        kl = jnp.zeros((), jnp.float32)
    total = agg(total_tokens)
    ratio = importance_ratio(log_prob, old, level=config.ratio_level,
                             mask=mask)
    metrics = dict(
        loss=total, policy_loss=policy_loss, kl=kl,
        kl_penalty=config.beta * kl,
        approx_kl=token_mean(kl_estimate(old, log_prob, mask=mask)),
        clip_fraction=token_mean(clip_fraction(
            ratio, clip_param=config.clip_param,
            clip_param_high=config.clip_param_high, mask=mask)),
        entropy=token_mean(entropy))
    return total, metrics


def loss(params, batch, config: GRPOConfig):
    """GRPO loss; returns ``(loss, metrics)``.

    Metrics: ``loss, policy_loss, kl, kl_penalty, approx_kl, clip_fraction,
    entropy, mean_reward, reward_std, group_advantage_std,
    frac_reward_zero_std``. ``kl`` is the mean estimated
    ``KL(pi || pi_ref)`` and ``kl_penalty = beta * kl`` (both zero without
    reference log-probs).
    """
    rows, totals, stats = prepare(batch, config)
    total, metrics = rows_loss(params, rows, config, totals)
    ok = bounds_ok(config)
    return checks.nan_unless(ok, (total, dict(metrics, **stats)))


def init(params, config: GRPOConfig, *, key=None,
         ref_params=None) -> TrainState:
    """Initial state; ``ref_params`` (optional) scores reference log-probs."""
    return init_state(params, config, key=key, ref_params=ref_params)


def with_reference_log_probs(state: TrainState, batch):
    """Adds ``ref_log_probs`` from ``state.ref_params`` if the batch lacks them."""
    if "ref_log_probs" in batch or state.ref_params is None:
        return batch
    config = state.config
    old = jnp.asarray(batch_array(batch, "log_probs"))
    dist = as_distribution(require_policy(config)(
        state.ref_params, batch_array(batch, "observations")))
    ref = reduce_to_rank(
        dist.log_prob(batch_array(batch, "actions")), old.ndim,
        "log_prob")
    return dict(batch, ref_log_probs=lax.stop_gradient(ref))


def update(state: TrainState, batch):
    """GRPO optimiser steps on one batch of groups; returns ``(state, metrics)``.

    The KL penalty applies when the batch holds ``ref_log_probs`` or the
    state holds ``ref_params``. With ``num_epochs = num_minibatches = 1``
    (the default) this is one gradient step; otherwise ``num_epochs``
    passes of ``num_minibatches`` shuffled minibatches (module docstring),
    in one ``lax.scan``. With ``num_micro_batches = k > 1`` each step's
    gradient is accumulated over ``k`` micro-batches; advantages come from
    the whole batch and denominators from the whole (mini)batch first, so
    every step equals the one-batch step. Metrics are those of :func:`loss`
    plus ``grad_norm`` (means over the steps for the loss terms).
    """
    config = state.config
    rows, totals, stats = prepare(batch, config)
    k, epochs = config.num_minibatches, config.num_epochs
    needs_ref = "ref_log_probs" not in rows and state.ref_params is not None
    if k == 1 and epochs == 1:
        loss_fn = rows_loss
        if needs_ref:
            def loss_fn(params, micro, config, totals):
                return rows_loss(params,
                                 with_reference_log_probs(state, micro),
                                 config, totals)
        state, metrics = accumulated_gradient_step(state, loss_fn, rows,
                                                   totals)
        return nan_unless_valid(config, state, dict(metrics, **stats))

    if needs_ref:  # the reference is frozen: scored once for every epoch
        rows = dict(rows, ref_log_probs=_reference_rows(state, rows))
    params, opt_state, key, metrics = minibatch_epochs(
        state, rows_loss, rows,
        lambda minibatch: (minibatch, totals_of(minibatch, config)))
    new_state = state.replace(params=params, opt_state=opt_state,
                              step=state.step + 1, key=key)
    return nan_unless_valid(config, new_state, dict(metrics, **stats))


def _reference_rows(state: TrainState, rows):
    """``ref_log_probs`` of every row, scored in ``num_micro_batches``
    micro-batches (one micro-batch's reference activations at a time)."""
    k = state.config.num_micro_batches
    score = lambda micro: with_reference_log_probs(state, micro)[
        "ref_log_probs"]
    if k == 1:
        return score(rows)
    split = micro_batches(rows, k)
    out = lax.map(score, split)        # [k, n / k, ...]: row p * k + j at [j, p]
    out = jnp.swapaxes(out, 0, 1)
    return jnp.reshape(out, (out.shape[0] * k,) + out.shape[2:])


def reward_metrics(rewards, *, group_size: int):
    """Mean, spread and zero-spread groups of each named reward.

    Args:
      rewards: ``{name: [B] rewards}`` (e.g. the parts of a composite
        reward and its ``"total"``), ``B`` a multiple of ``group_size``
        with the samples of one prompt contiguous.
      group_size: samples per prompt ``G``.

    Returns:
      ``{"rewards/<name>/mean", "rewards/<name>/std",
      "rewards/<name>/frac_zero_std"}`` scalars for each name:
      ``frac_zero_std`` is the fraction of groups whose rewards of that
      name are all equal (no learning signal from that reward alone).

    Examples:
      >>> import jax.numpy as jnp
      >>> m = reward_metrics({"exact": jnp.array([1., 0., 1., 1.])},
      ...                    group_size=2)
      >>> [round(float(m[k]), 3) for k in sorted(m)]
      [0.5, 0.75, 0.433]
    """
    out = {}
    for name, r in rewards.items():
        r = jnp.asarray(r)
        if r.ndim != 1 or r.shape[0] % group_size:
            raise ValueError(
                f"reward {name!r} must be [B] with B a multiple of the "
                f"group size {group_size}, got shape {tuple(r.shape)}.")
        mean, std = masked_mean_std(r)
        zero = group_advantages(r, group_size=group_size, eps=0.0).zero_std
        out[f"rewards/{name}/mean"] = mean
        out[f"rewards/{name}/std"] = std
        out[f"rewards/{name}/frac_zero_std"] = jnp.mean(
            zero.astype(jnp.float32))
    return out


def select_batch(batch, *, num_groups: int, group_size: int):
    """Dynamic sampling on a GRPO batch (DAPO): its rows of the first
    ``num_groups`` groups whose ``rewards`` differ
    (:func:`artifex_fn.select_groups`), with the loss mask of any slot left
    to a flat group set to zero (those rows contribute nothing).

    Args:
      batch: a GRPO batch with ``rewards [B]`` (and any per-row arrays);
        ``B`` a multiple of ``group_size``, groups contiguous.
      num_groups: the groups to keep, at most ``B / group_size``.
      group_size: samples per prompt.

    Returns:
      ``(batch, selection)``: the ``[num_groups * group_size]``-row batch
      and the :class:`artifex_fn.GroupSelection` (``fill_rate``, ...).
    """
    rewards = jnp.asarray(batch_array(batch, "rewards"))
    n = rewards.shape[0]
    if num_groups * group_size > n:
        raise ValueError(
            f"`keep_groups`={num_groups} groups of {group_size} need at "
            f"least {num_groups * group_size} samples; the step generated "
            f"{n}: give it more prompts (dynamic sampling over-generates).")
    sel = select_groups(rewards, group_size=group_size,
                        num_groups=num_groups)
    out = jax.tree_util.tree_map(lambda x: x[sel.rows], batch)
    old = jnp.asarray(out["log_probs"])
    keep = jnp.repeat(sel.valid, group_size)
    keep = keep if old.ndim == 1 else keep[:, None]
    if "mask" in out:
        mask = jnp.asarray(out["mask"])
        out["mask"] = jnp.where(keep, mask, jnp.zeros((), mask.dtype))
    else:
        out["mask"] = jnp.broadcast_to(keep, old.shape).astype(jnp.float32)
    return out, sel
