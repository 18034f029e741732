"""Online DPO as ``init``/``update``: preferences made from the current
policy's own samples.

Offline DPO (Rafailov et al. 2023) learns from pairs collected once. Online
DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI
Feedback"; the iterative best-versus-worst of Yuan et al. 2024 and Xu et
al. 2024) samples ``K = num_generations >= 2`` responses per prompt from
the *current* policy, ranks them with a reward (a function, a reward model
or a judge), and takes a DPO step on the best against the worst of each
group. The compared responses then lie where the policy puts its mass, so
the preferences keep informing it as it moves; the frozen reference still
anchors the implicit reward ``beta * log(pi_theta / pi_ref)``.

Batch (the layout of :mod:`artifex_fn.grpo`: ``N`` groups of ``K``
consecutive rows):

* ``observations``: what the policy reads, any pytree with leading
  ``[N * K]``; ``actions`` ``[N * K, L]`` (tokens) or ``[N * K, ...]``
  (one-step samples); optional ``mask`` ``[N * K, L]``;
* ``rewards`` ``[N * K]``: the ranking;
* optional ``ref_log_probs`` ``[N * K]``: reference sequence log-prob
  sums (else computed from ``state.ref_params`` for the selected pairs,
  unless ``reference_free``).

Per group the chosen response is the first of highest reward and the
rejected one the first of lowest reward (for exchangeable samples a
uniformly random choice among the tied ones). A group whose rewards all
agree carries no preference: it is a **tie**, left out of the loss, and
the loss and its metrics are means over the ``decisive`` groups only (a
mean over all groups would shrink the step by the fraction of ties). With
``reference_free`` the pairs take SimPO's loss instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from artifex_fn._src import checks
from artifex_fn._src.algorithms import dpo as _dpo
from artifex_fn._src.algorithms.batching import batch_array
from artifex_fn._src.algorithms.batching import check_keys
from artifex_fn._src.algorithms.batching import check_leading
from artifex_fn._src.algorithms.batching import check_shape_of
from artifex_fn._src.algorithms.config import bounds_ok
from artifex_fn._src.algorithms.config import nan_unless_valid
from artifex_fn._src.algorithms.config import pytree_config
from artifex_fn._src.algorithms.gradients import accumulated_gradient_step
from artifex_fn._src.algorithms.policies import require_policy
from artifex_fn._src.algorithms.state import TrainState
from artifex_fn._src.algorithms.state import init_state


@pytree_config(static=("reference_free", "loss_type", "num_generations",
                       "num_micro_batches", "policy", "optimizer"))
class OnlineDPOConfig(_dpo.DPOConfig):
    """Hyper-parameters of online DPO: :class:`~artifex_fn.dpo.DPOConfig`'s
    (``beta``, ``label_smoothing``, ``reference_free``, ``loss_type``,
    ``simpo_margin``, ``rpo_alpha``, ``max_grad_norm``,
    ``num_micro_batches`` over pairs, ``policy``, ``optimizer``) plus

    Attributes:
      num_generations: ``K >= 2`` responses sampled per prompt; the pair is
        the best against the worst of each group.
    """
    num_generations: int = 2

    def __post_init__(self):
        super().__post_init__()
        checks.check_int(self.num_generations, "num_generations", lo=2)


REQUIRED_KEYS = ("observations", "actions", "rewards")
OPTIONAL_KEYS = ("mask", "ref_log_probs")


def _check(batch, group_size: int) -> int:
    """Validates a grouped batch; returns the number of groups ``N``."""
    if not isinstance(batch, dict):
        raise TypeError(f"the online-DPO batch must be a dict, got "
                        f"{type(batch).__name__}.")
    check_keys(batch, required=REQUIRED_KEYS, optional=OPTIONAL_KEYS,
               what="online-DPO")
    rewards = batch_array(batch, "rewards")
    if jnp.ndim(rewards) != 1:
        raise ValueError(f"`batch['rewards']` must be [N * K] (one reward "
                         f"per sample), got shape {tuple(jnp.shape(rewards))}.")
    n_rows = int(jnp.shape(rewards)[0])
    if n_rows % group_size:
        raise ValueError(
            f"`batch['rewards']` holds {n_rows} samples, not a multiple of "
            f"num_generations = {group_size} (groups of consecutive rows).")
    for key in ("observations", "actions"):
        check_leading(batch[key], (n_rows,), f"batch['{key}']",
                      "one row per sample")
    if "mask" in batch:
        actions = jax.tree_util.tree_leaves(batch["actions"])[0]
        check_shape_of(batch["mask"], "batch['mask']",
                       tuple(jnp.shape(actions)[:jnp.ndim(batch["mask"])]),
                       "the leading axes of the actions")
    if "ref_log_probs" in batch:
        check_shape_of(batch["ref_log_probs"], "batch['ref_log_probs']",
                       (n_rows,), "one reference sequence log-prob per "
                       "sample")
    return n_rows // group_size


def pair_rows(rewards, *, group_size: int):
    """Rows of each group's best and worst sample.

    Args:
      rewards: ``[N * K]`` rewards, groups of ``K = group_size``
        consecutive rows.
      group_size: ``K``.

    Returns:
      ``(chosen, rejected)``, two ``[N]`` int arrays of row indices into
      the batch: the first row of each group's highest and of its lowest
      reward (the same row in a group whose rewards are all equal). These
      are the rows :func:`select_pairs` pairs, so a caller can score only
      them (a reference model, say) and leave the other ``(K - 2) N`` rows
      alone.

    >>> chosen, rejected = pair_rows(jnp.array([0.0, 2.0, 1.0, 5.0, 5.0, 3.0]),
    ...                              group_size=3)
    >>> chosen.tolist(), rejected.tolist()
    ([1, 3], [0, 5])
    """
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 1:
        raise ValueError(f"`rewards` must be [N * K] (one reward a sample), "
                         f"got shape {r.shape}.")
    if r.shape[0] % group_size:
        raise ValueError(
            f"`rewards` holds {r.shape[0]} rows, not a multiple of "
            f"group_size={group_size}.")
    n = r.shape[0] // group_size
    r = r.reshape(n, group_size)
    base = jnp.arange(n) * group_size
    return base + jnp.argmax(r, axis=1), base + jnp.argmin(r, axis=1)


def select_pairs(batch, *, group_size: int):
    """Best-versus-worst pairs of each group of ``group_size`` samples.

    Args:
      batch: a grouped batch (module docstring).
      group_size: ``K``, the samples per prompt (consecutive rows).

    Returns:
      ``(pairs, decisive, info)``: ``pairs`` a DPO batch ``{"chosen":
      side, "rejected": side}`` of ``N`` pairs (plus
      ``ref_chosen_log_probs`` / ``ref_rejected_log_probs`` when the batch
      has ``ref_log_probs``), ``decisive`` ``[N]`` float32 (1 where the
      group's rewards differ) and ``info``: ``decisive_pairs`` (their
      fraction), ``mean_reward`` (over every sample) and
      ``chosen_score`` / ``rejected_score`` (mean reward of the chosen /
      rejected samples of the decisive groups, 0 without any).
    """
    n = _check(batch, group_size)
    best, worst = pair_rows(batch["rewards"], group_size=group_size)
    rewards = jnp.asarray(batch["rewards"], jnp.float32).reshape(n, group_size)
    decisive = (jnp.max(rewards, 1) > jnp.min(rewards, 1)).astype(jnp.float32)

    def take(rows):
        keys = ("observations", "actions") + (("mask",) if "mask" in batch
                                              else ())
        return {k: jax.tree_util.tree_map(lambda x: jnp.asarray(x)[rows],
                                          batch[k]) for k in keys}

    pairs = dict(chosen=take(best), rejected=take(worst))
    if "ref_log_probs" in batch:
        ref = jnp.asarray(batch["ref_log_probs"])
        pairs["ref_chosen_log_probs"] = ref[best]
        pairs["ref_rejected_log_probs"] = ref[worst]
    count = jnp.sum(decisive)
    per = lambda x: jnp.sum(x * decisive) / jnp.maximum(count, 1.0)
    info = dict(decisive_pairs=jnp.mean(decisive),
                mean_reward=jnp.mean(rewards),
                chosen_score=per(jnp.max(rewards, 1)),
                rejected_score=per(jnp.min(rewards, 1)))
    return pairs, decisive, info


def rows_loss(params, rows, config: OnlineDPOConfig, totals):
    """This shard's share of the loss over decisive pairs: ``(loss,
    metrics)``; every value a sum over the shard's pairs, weighted by
    ``rows["decisive"]``, divided by the whole batch's decisive pairs
    (``totals["pairs"]``), so disjoint shards add up."""
    missing = [k for k in ("ref_chosen_log_probs", "ref_rejected_log_probs")
               if k not in rows]
    if missing and not config.reference_free:
        raise ValueError(
            "online DPO with reference_free=False needs reference "
            "log-probs: pass `ref_log_probs`, give the state `ref_params`, "
            "or set reference_free=True (SimPO).")
    pairs = {k: v for k, v in rows.items() if k != "decisive"}
    out, chosen, rejected, lengths = _dpo.pair_losses(params, pairs, config)
    live = rows["decisive"] > 0
    n = totals["pairs"]
    # Ties are selected out before the sum.
    return _dpo.pair_metrics(out, chosen, rejected, lengths, config,
                             lambda x: jnp.sum(jnp.where(live, x, 0.0)) / n)


def _totals(decisive):
    return dict(pairs=jnp.maximum(jnp.sum(decisive), 1.0))


def loss(params, batch, config: OnlineDPOConfig):
    """The online-DPO loss of a grouped batch (``ref_log_probs`` in the
    batch unless ``reference_free``): ``(loss, metrics)``, the metrics of
    :func:`update` without ``grad_norm``."""
    pairs, decisive, info = select_pairs(batch,
                                         group_size=config.num_generations)
    total, metrics = rows_loss(params, dict(pairs, decisive=decisive),
                               config, _totals(decisive))
    return checks.nan_unless(bounds_ok(config),
                             (total, dict(metrics, **info)))


def init(params, config: OnlineDPOConfig, *, key=None,
         ref_params=None) -> TrainState:
    """Initial state; ``ref_params`` (the frozen reference) scores the
    reference log-probs of the selected pairs."""
    return init_state(params, config, key=key, ref_params=ref_params)


def with_reference_log_probs(state: TrainState, batch):
    """Adds ``ref_log_probs [N * K]`` (reference sequence log-prob sums of
    every sample) from ``state.ref_params`` when the batch lacks them."""
    config = state.config
    if (config.reference_free or state.ref_params is None
            or "ref_log_probs" in batch):
        return batch
    _check(batch, config.num_generations)
    side = {k: batch[k] for k in ("observations", "actions", "mask")
            if k in batch}
    seq, _ = _dpo.score(require_policy(config), state.ref_params, side,
                        normalize=False)
    return dict(batch, ref_log_probs=lax.stop_gradient(seq))


def update(state: TrainState, batch):
    """One online-DPO step on a grouped batch; returns ``(state, metrics)``.

    Metrics: DPO's (``loss, dpo_loss, nll_loss, reward_accuracy, chosen_reward,
    rejected_reward, reward_margin, chosen_log_probs, rejected_log_probs``,
    means over the decisive pairs), ``grad_norm``, and ``decisive_pairs,
    mean_reward, chosen_score, rejected_score`` (:func:`select_pairs`).

    With ``num_micro_batches = k > 1`` (``k`` divides ``N``) the gradient
    is accumulated over ``k`` micro-batches of pairs, normalised by the
    decisive pairs of the whole batch: the same step. The reference scores
    the selected pairs only (``2 N`` sequences, not ``K N``).
    """
    config = state.config
    pairs, decisive, info = select_pairs(batch,
                                         group_size=config.num_generations)
    rows = dict(pairs, decisive=decisive)
    needs_ref = not (config.reference_free or "ref_chosen_log_probs" in rows)
    if needs_ref and state.ref_params is None:
        raise ValueError(
            "online DPO with reference_free=False needs reference "
            "log-probs: pass `ref_log_probs`, give the state `ref_params`, "
            "or set reference_free=True (SimPO).")

    def loss_fn(params, micro, config, totals):
        if needs_ref:
            sides = {k: micro[k] for k in ("chosen", "rejected")}
            with_ref = _dpo.with_reference_log_probs(state, sides)
            micro = dict(micro, **{k: with_ref[k] for k in (
                "ref_chosen_log_probs", "ref_rejected_log_probs")})
        return rows_loss(params, micro, config, totals)

    state, metrics = accumulated_gradient_step(state, loss_fn, rows,
                                               _totals(decisive))
    return nan_unless_valid(state.config, state,
                            dict(metrics, **info))
