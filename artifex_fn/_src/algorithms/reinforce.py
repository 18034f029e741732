"""REINFORCE (Williams 1992) as a pure ``init``/``update`` pair.

.. math::
    \\nabla_\\theta J = \\mathbb{E}\\Big[\\sum_t \\nabla_\\theta
      \\log\\pi_\\theta(a_t|s_t)\\,(G_t - b_t)\\Big]
      + c_H \\nabla_\\theta \\mathbb{E}[H(\\pi_\\theta(\\cdot|s_t))]

Rewards are either ``[B]`` (one-step generation: one sample, one reward,
``G = r``) or ``[B, T]`` with optional ``dones`` (termination) and ``mask``
(padding), in which case ``G_t`` are discounted returns. Any other batch
key is an error, except ``extras``, which is never read.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax.numpy as jnp
import optax

from artifex_fn._src import checks
from artifex_fn._src.advantages import normalize_advantages
from artifex_fn._src.aggregation import aggregate_loss
from artifex_fn._src.aggregation import aggregate_loss_parts
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
from artifex_fn._src.algorithms.gradients import accumulated_gradient_step
from artifex_fn._src.algorithms.policies import as_distribution
from artifex_fn._src.algorithms.policies import log_prob_and_entropy
from artifex_fn._src.algorithms.policies import require_policy
from artifex_fn._src.algorithms.state import TrainState
from artifex_fn._src.algorithms.state import init_state
from artifex_fn._src.multistep import discounted_returns
from artifex_fn._src.policy_gradients import policy_gradient_loss


@pytree_config(static=("normalize_returns", "baseline",
                       "num_micro_batches", "policy", "optimizer"))
class REINFORCEConfig:
    """Hyper-parameters of REINFORCE.

    Attributes:
      gamma: discount factor for the returns, in ``[0, 1]``.
      normalize_returns: normalise returns (masked) to zero mean and unit
        variance before weighting the log-probabilities.
      entropy_coeff: weight of the entropy bonus, ``>= 0``.
      baseline: ``"none"`` or ``"mean"`` (subtract the batch mean return,
        per time step for ``[B, T]`` rewards).
      max_grad_norm: optional global-norm gradient clipping.
      num_micro_batches: accumulate each step's gradient over this many
        micro-batches of trajectories (must divide ``B``); same step, a
        ``k``-th of the activations in memory.
      policy: ``(params, observations) -> distrax.Distribution`` (or logits,
        wrapped as ``distrax.Categorical``).
      optimizer: an optax ``GradientTransformation``.
    """
    gamma: float = 0.99
    normalize_returns: bool = True
    entropy_coeff: float = 0.01
    baseline: Literal["none", "mean"] = "none"
    max_grad_norm: float | None = None
    num_micro_batches: int = 1
    policy: Callable[..., Any] | None = None
    optimizer: optax.GradientTransformation | None = None

    BOUNDS = dict(
        gamma=Bound(0.0, 1.0), entropy_coeff=Bound(0.0),
        max_grad_norm=Bound(0.0, lo_open=True, optional=True))

    def __post_init__(self):
        check_bounds(self)
        checks.check_int(self.num_micro_batches, "num_micro_batches", lo=1)
        checks.check_choice(self.baseline, ("none", "mean"), "baseline")


REQUIRED_KEYS = ("observations", "actions", "rewards")
OPTIONAL_KEYS = ("dones", "mask")


def _masked_time_mean(x, mask):
    """Mean over the batch axis (per time step when ``x`` is ``[B, T]``)."""
    m = jnp.ones_like(x) if mask is None else jnp.asarray(mask, x.dtype)
    num = jnp.sum(jnp.where(m > 0, x, 0.0), axis=0, keepdims=True)
    den = jnp.sum(m, axis=0, keepdims=True)
    return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)


def prepare(batch, config: REINFORCEConfig):
    """The parameter-free part of the loss, on the whole batch.

    Returns ``(rows, totals, stats)``: ``rows`` holds ``observations``,
    ``actions``, the weights ``G_t - b_t`` (normalised over the whole batch
    if ``normalize_returns``) and the optional ``mask``; ``totals["steps"]``
    is the number of valid steps (the loss's denominator); ``stats`` the
    reward and return statistics.
    """
    check_keys(batch, required=REQUIRED_KEYS,
               optional=OPTIONAL_KEYS, what="REINFORCE")
    rewards = jnp.asarray(batch["rewards"])
    if rewards.ndim not in (1, 2):
        raise ValueError(
            f"`batch['rewards']` must be [B] or [B, T], got shape "
            f"{tuple(rewards.shape)}.")
    what = "the shape of batch['rewards']"
    for key in ("observations", "actions"):
        check_leading(batch[key], rewards.shape, f"batch['{key}']",
                      "the rows (and steps) of batch['rewards']")
    mask = check_shape_of(batch.get("mask"), "batch['mask']",
                          rewards.shape, what, broadcast=True)
    dones = check_shape_of(batch.get("dones"), "batch['dones']",
                           rewards.shape, what, broadcast=True)
    valid = None
    if mask is not None:
        mask = jnp.broadcast_to(mask, rewards.shape)
        valid = mask > 0
    if rewards.ndim == 1:
        returns = checks.keep_valid(valid, rewards)
    else:
        returns = discounted_returns(rewards, gamma=config.gamma,
                                     terminated=dones, mask=mask)
    weights = returns
    if config.baseline == "mean":
        weights = checks.keep_valid(
            valid, weights - _masked_time_mean(weights, mask))
    if config.normalize_returns:
        weights = normalize_advantages(weights, mask=mask)
    observations = batch_array(batch, "observations")
    actions = batch_array(batch, "actions")
    rows = dict(observations=clean_padding(observations, mask),
                actions=clean_padding(actions, mask), weights=weights)
    if mask is not None:
        rows["mask"] = mask
    _, steps = aggregate_loss_parts(jnp.zeros(weights.shape, jnp.float32),
                                    rows.get("mask"))
    mean_reward, reward_std = masked_mean_std(rewards, mask)
    mean_return, _ = masked_mean_std(returns, mask)
    stats = dict(mean_reward=mean_reward, reward_std=reward_std,
                 mean_return=mean_return)
    return rows, dict(steps=steps), stats


def rows_loss(params, rows, config: REINFORCEConfig, totals):
    """This shard's share of the loss (over the batch's valid steps).

    Returns ``(loss, metrics)`` with ``loss, policy_loss, entropy``; shares
    of disjoint shards add up to the full-batch values.
    """
    policy = require_policy(config)
    weights = rows["weights"]
    dist = as_distribution(policy(params, rows["observations"]))
    log_prob, entropy = log_prob_and_entropy(dist, rows["actions"],
                                             weights.ndim)
    mask = rows.get("mask")
    if mask is not None:  # the policy's own outputs at padded steps too
        log_prob = checks.keep_valid(mask > 0, log_prob)
        entropy = checks.keep_valid(mask > 0, entropy)
    per_step = policy_gradient_loss(log_prob, weights, mask=mask)
    if weights.ndim == 1:  # B one-step episodes, not one sequence of B steps
        per_step, entropy = per_step[:, None], entropy[:, None]
        mask = None if mask is None else mask[:, None]
    mean = lambda x: aggregate_loss(x, mask, denominator=totals["steps"])
    policy_loss = mean(per_step)
    mean_entropy = mean(entropy)
    total = policy_loss - config.entropy_coeff * mean_entropy
    return total, dict(loss=total, policy_loss=policy_loss,
                       entropy=mean_entropy)


def loss(params, batch, config: REINFORCEConfig):
    """REINFORCE loss ``policy_loss - entropy_coeff * entropy``.

    Args:
      params: policy parameters.
      batch: dict with ``observations`` and ``actions`` (pytrees with
        leading ``[B]`` or ``[B, T]`` axes, as the policy expects),
        ``rewards`` (``[B]`` or ``[B, T]``) and optional ``dones`` and
        ``mask`` (``[B, T]``).
      config: a :class:`REINFORCEConfig`.

    Returns:
      ``(loss, metrics)`` with metrics ``loss, policy_loss, entropy,
      mean_reward, reward_std, mean_return``.
    """
    rows, totals, stats = prepare(batch, config)
    total, metrics = rows_loss(params, rows, config, totals)
    ok = bounds_ok(config)
    return checks.nan_unless(ok, (total, dict(metrics, **stats)))


def init(params, config: REINFORCEConfig, *, key=None,
         ref_params=None) -> TrainState:
    """Initial state: parameters, optimiser state, step 0, key."""
    return init_state(params, config, key=key, ref_params=ref_params)


def update(state: TrainState, batch):
    """One REINFORCE gradient step; returns ``(state, metrics)``.

    ``metrics`` holds the :func:`loss` metrics plus ``grad_norm`` (before
    clipping), all scalars on device. With ``num_micro_batches = k > 1``
    the gradient is accumulated over ``k`` micro-batches of ``B / k``
    trajectories, with the baseline, normalisation and denominator of the
    whole batch: the same step as with one batch.
    """
    rows, totals, stats = prepare(batch, state.config)
    state, metrics = accumulated_gradient_step(state, rows_loss, rows,
                                               totals)
    return nan_unless_valid(state.config, state,
                            dict(metrics, **stats))
