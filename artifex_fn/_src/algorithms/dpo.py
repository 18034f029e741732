"""Direct Preference Optimization (Rafailov et al. 2023) and SimPO (Meng et
al. 2024) as ``init``/``update``.

Two batch forms:

* flat log-probabilities, as in the guide: ``chosen_log_probs``,
  ``rejected_log_probs`` (``[B]`` sequence log-prob sums) and, unless
  ``reference_free``, ``ref_chosen_log_probs``, ``ref_rejected_log_probs``;
  SimPO also reads ``chosen_lengths`` / ``rejected_lengths`` (default 1,
  i.e. the inputs are already length-normalised). These drive the pure
  :func:`loss`; they carry no gradient to the parameters.
* responses to score: ``{"chosen": {"observations", "actions", "mask"?},
  "rejected": {...}}`` plus optional precomputed reference log-probs. The
  policy scores both sides: the masked token log-prob sum for DPO, the
  length-normalised mean for SimPO. :func:`update` needs this form.

``reference_free=False`` without reference log-probs (in the batch, or
computed from ``state.ref_params``) is an error, never a silent switch to
SimPO.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax
from jax import lax

from artifex_fn._src import checks
from artifex_fn._src.algorithms.batching import batch_array
from artifex_fn._src.algorithms.batching import check_keys
from artifex_fn._src.algorithms.batching import check_leading
from artifex_fn._src.algorithms.batching import check_shape_of
from artifex_fn._src.algorithms.batching import clean_padding
from artifex_fn._src.algorithms.config import Bound
from artifex_fn._src.algorithms.config import bounds_ok
from artifex_fn._src.algorithms.config import check_bounds
from artifex_fn._src.algorithms.config import nan_unless_valid
from artifex_fn._src.algorithms.config import pytree_config
from artifex_fn._src.algorithms.gradients import accumulated_gradient_step
from artifex_fn._src.algorithms.policies import as_distribution
from artifex_fn._src.algorithms.policies import reduce_to_rank
from artifex_fn._src.algorithms.policies import require_policy
from artifex_fn._src.algorithms.state import TrainState
from artifex_fn._src.algorithms.state import init_state
from artifex_fn._src.log_probs import sequence_lengths
from artifex_fn._src.log_probs import sequence_log_probs
from artifex_fn._src.preference import dpo_loss
from artifex_fn._src.preference import simpo_loss

_REF_KEYS = ("ref_chosen_log_probs", "ref_rejected_log_probs")


@pytree_config(static=("reference_free", "loss_type",
                       "num_micro_batches", "policy", "optimizer"))
class DPOConfig:
    """Hyper-parameters of DPO / SimPO.

    Attributes:
      beta: inverse temperature of the implicit reward, ``> 0``.
      label_smoothing: probability of a flipped label (cDPO / robust DPO).
      reference_free: use SimPO (length-normalised, no reference model).
      loss_type: ``"sigmoid"``, ``"ipo"``, ``"hinge"`` or ``"robust"``
        (SimPO: ``"sigmoid"`` or ``"hinge"``).
      simpo_margin: SimPO's target reward margin (``margin`` of
        :func:`artifex_fn.simpo_loss`).
      rpo_alpha: weight ``alpha >= 0`` of the length-normalised negative
        log-likelihood of the chosen response, ``-log pi(y_w|x) / |y_w|``,
        added to each pair's loss (RPO: Pang et al. 2024, "Iterative
        Reasoning Preference Optimization", eq. 1; TRL's ``rpo_alpha``);
        0 (the default) is plain DPO / SimPO.
      max_grad_norm: optional global-norm gradient clipping.
      num_micro_batches: accumulate each step's gradient over this many
        micro-batches of pairs (must divide ``B``); same step, a ``k``-th
        of the activations in memory.
      policy: ``(params, observations) -> distrax.Distribution`` (or logits)
        giving per-token log-probs of ``actions``.
      optimizer: an optax ``GradientTransformation``.
    """
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    simpo_margin: float = 0.5
    rpo_alpha: float = 0.0
    max_grad_norm: float | None = None
    num_micro_batches: int = 1
    policy: Callable[..., Any] | None = None
    optimizer: optax.GradientTransformation | None = None

    BOUNDS = dict(
        beta=Bound(0.0, lo_open=True), simpo_margin=Bound(),
        rpo_alpha=Bound(0.0),
        max_grad_norm=Bound(0.0, lo_open=True, optional=True))

    def __post_init__(self):
        check_bounds(self)
        checks.check_int(self.num_micro_batches, "num_micro_batches", lo=1)
        allowed = (("sigmoid", "hinge") if self.reference_free else
                   ("sigmoid", "ipo", "hinge", "robust"))
        if self.loss_type not in allowed:
            raise ValueError(f"`loss_type` must be one of {list(allowed)}"
                             f"{' with reference_free=True' if self.reference_free else ''}"
                             f", got {self.loss_type!r}.")
        if self.loss_type == "robust":
            checks.check_hparam(self.label_smoothing, "label_smoothing",
                                lo=0.0, hi=0.5, hi_open=True)
        else:
            checks.check_hparam(self.label_smoothing, "label_smoothing",
                                lo=0.0, hi=1.0)


def score(policy, params, side, *, normalize: bool):
    """Sequence log-prob (sum, or mean with ``normalize``) and length.

    ``side`` holds ``observations``, ``actions`` and optional ``mask``; the
    policy's log-probs of ``actions`` are ``[B, L]`` per token (or ``[B]``
    for one-step samples).
    """
    mask = side.get("mask")
    # Padded tokens may hold anything: replaced before the policy sees them.
    observations = clean_padding(
        batch_array(side, "observations"), mask)
    actions = clean_padding(batch_array(side, "actions"), mask)
    dist = as_distribution(policy(params, observations))
    log_prob = jnp.asarray(dist.log_prob(actions))
    if mask is None and log_prob.ndim == 1:
        return log_prob, jnp.ones(log_prob.shape, jnp.float32)
    if mask is not None:
        log_prob = reduce_to_rank(log_prob, jnp.ndim(mask), "log_prob")
    else:
        log_prob = reduce_to_rank(log_prob, 2, "log_prob")
        mask = jnp.ones(log_prob.shape, jnp.float32)
    seq = sequence_log_probs(log_prob, mask, normalize=normalize)
    return seq, sequence_lengths(mask)


FLAT_KEYS = ("chosen_log_probs", "rejected_log_probs")
FLAT_OPTIONAL = ("ref_chosen_log_probs", "ref_rejected_log_probs",
                 "chosen_lengths", "rejected_lengths")
SIDE_EXAMPLE = ("{'chosen': {'observations': prompt_and_response[:, :-1], "
                "'actions': prompt_and_response[:, 1:], 'mask': "
                "response_mask}, 'rejected': {...}}")


def check_batch(batch) -> int:
    """Validates either batch form (module docstring); returns ``B``."""
    if not isinstance(batch, dict):
        raise TypeError(f"the DPO batch must be a dict, got "
                        f"{type(batch).__name__}: {SIDE_EXAMPLE}, or flat "
                        f"log-probs {{'chosen_log_probs': [B], ...}}.")
    if "chosen" in batch or "rejected" in batch:
        check_keys(batch, required=("chosen", "rejected"),
                   optional=_REF_KEYS, what="DPO")
        sizes = []
        for name in ("chosen", "rejected"):
            side = batch[name]
            if not isinstance(side, dict):
                raise TypeError(
                    f"batch['{name}'] must be a dict with 'observations' "
                    f"(what the policy reads), 'actions' (the response "
                    f"tokens it scores) and optionally 'mask', e.g. "
                    f"{SIDE_EXAMPLE}; got "
                    + (f"an array of shape {tuple(side.shape)}"
                       if hasattr(side, "shape") else type(side).__name__)
                    + ".")
            check_keys(side, required=("observations", "actions"),
                       optional=("mask",),
                       what=f"DPO batch['{name}']")
            actions = jax.tree_util.tree_leaves(side["actions"])
            if not actions or jnp.ndim(actions[0]) < 1:
                raise ValueError(f"batch['{name}']['actions'] must lead with "
                                 "the pairs axis [B, ...].")
            b = int(jnp.shape(actions[0])[0])
            check_leading(side["observations"], (b,),
                          f"batch['{name}']['observations']",
                          "the pairs of its actions")
            if "mask" in side:
                check_shape_of(
                    side["mask"], f"batch['{name}']['mask']",
                    tuple(jnp.shape(actions[0])[:jnp.ndim(side["mask"])]),
                    "the leading axes of its actions")
            sizes.append(b)
        if sizes[0] != sizes[1]:
            raise ValueError(f"batch['chosen'] holds {sizes[0]} pairs but "
                             f"batch['rejected'] {sizes[1]}.")
        b = sizes[0]
    else:
        check_keys(batch, required=FLAT_KEYS, optional=FLAT_OPTIONAL,
                   what="DPO (flat log-probs)")
        b = int(jnp.shape(batch["chosen_log_probs"])[0]) if jnp.ndim(
            batch["chosen_log_probs"]) else 0
        check_shape_of(batch["chosen_log_probs"],
                       "batch['chosen_log_probs']", (b,), "[B]")
    for key in FLAT_KEYS + FLAT_OPTIONAL:
        if key in batch:
            check_shape_of(batch[key], f"batch['{key}']", (b,),
                           "one value per pair")
    return b


def _scored(params, batch, config):
    """Flat log-prob dict from either batch form."""
    if "chosen" not in batch:
        for key in ("chosen_log_probs", "rejected_log_probs"):
            batch_array(batch, key)
        return batch
    if "rejected" not in batch:
        raise ValueError("batch has 'chosen' but is missing 'rejected'.")
    policy = require_policy(config)
    out = {k: v for k, v in batch.items() if k not in ("chosen", "rejected")}
    for name in ("chosen", "rejected"):
        seq, length = score(policy, params, batch[name], normalize=False)
        out[f"{name}_log_probs"] = seq
        out[f"{name}_lengths"] = length
    return out


def pair_losses(params, batch, config: DPOConfig):
    """Per-pair losses: ``(PreferenceLoss, chosen [B], rejected [B],
    chosen_lengths [B])``, the policy's sequence log-probs (sums; SimPO
    normalises inside its loss) of either batch form, scored under DPO's
    or SimPO's loss."""
    flat = _scored(params, batch, config)
    chosen = jnp.asarray(flat["chosen_log_probs"])
    rejected = jnp.asarray(flat["rejected_log_probs"])
    ones = jnp.ones(chosen.shape, jnp.float32)
    if config.reference_free:
        out = simpo_loss(chosen, rejected,
                         flat.get("chosen_lengths", ones),
                         flat.get("rejected_lengths", ones),
                         beta=config.beta, margin=config.simpo_margin,
                         loss_type=config.loss_type,
                         label_smoothing=config.label_smoothing)
    else:
        missing = [k for k in _REF_KEYS if k not in flat]
        if missing:
            raise ValueError(
                f"DPO with reference_free=False needs reference log-probs: "
                f"batch is missing {missing} (pass them, give the state "
                f"`ref_params`, or set reference_free=True for SimPO).")
        out = dpo_loss(chosen, rejected, flat["ref_chosen_log_probs"],
                       flat["ref_rejected_log_probs"], beta=config.beta,
                       loss_type=config.loss_type,
                       label_smoothing=config.label_smoothing)
    return out, chosen, rejected, flat.get("chosen_lengths", ones)


def pair_metrics(out, chosen, rejected, chosen_lengths, config, mean):
    """``(loss, metrics)`` of per-pair results reduced by ``mean`` (a
    share of a sum over the batch's pairs); with ``config.rpo_alpha`` the
    loss adds its length-normalised NLL of the chosen responses
    (``nll_loss``)."""
    dpo_total = mean(out.loss)
    nll = -chosen / jnp.maximum(jnp.asarray(chosen_lengths, chosen.dtype),
                                1.0)
    nll_total = mean(nll)
    total = dpo_total + config.rpo_alpha * nll_total
    margin = out.chosen_rewards - out.rejected_rewards
    metrics = dict(
        loss=total, dpo_loss=dpo_total, nll_loss=lax.stop_gradient(nll_total),
        reward_accuracy=mean((margin > 0).astype(jnp.float32)),
        chosen_reward=mean(out.chosen_rewards),
        rejected_reward=mean(out.rejected_rewards),
        reward_margin=mean(margin),
        chosen_log_probs=lax.stop_gradient(mean(chosen)),
        rejected_log_probs=lax.stop_gradient(mean(rejected)))
    return total, metrics


def rows_loss(params, batch, config: DPOConfig, totals):
    """This shard's share of the DPO/SimPO loss: ``(loss, metrics)``.

    Every value is a sum over the shard's pairs divided by the number of
    pairs of the whole batch (``totals["pairs"]``), so shares of disjoint
    shards add up to the full-batch means.
    """
    out, chosen, rejected, lengths = pair_losses(params, batch, config)
    pairs = totals["pairs"]
    return pair_metrics(out, chosen, rejected, lengths, config,
                        lambda x: jnp.sum(x) / pairs)


def loss(params, batch, config: DPOConfig):
    """DPO or SimPO loss averaged over pairs; returns ``(loss, metrics)``.

    Metrics: ``loss, dpo_loss, nll_loss, reward_accuracy, chosen_reward,
    rejected_reward, reward_margin, chosen_log_probs,
    rejected_log_probs`` (rewards are the implicit rewards, scaled by
    ``beta`` as in the papers; ``loss = dpo_loss + rpo_alpha * nll_loss``,
    ``nll_loss`` the chosen responses' length-normalised NLL).
    """
    pairs = jnp.asarray(max(check_batch(batch), 1), jnp.float32)
    return checks.nan_unless(bounds_ok(config), rows_loss(
        params, batch, config, dict(pairs=pairs)))


def init(params, config: DPOConfig, *, key=None,
         ref_params=None) -> TrainState:
    """Initial state; ``ref_params`` (optional) scores reference log-probs."""
    return init_state(params, config, key=key, ref_params=ref_params)


def with_reference_log_probs(state: TrainState, batch):
    """Adds reference log-probs from ``state.ref_params`` when missing."""
    check_batch(batch)
    config = state.config
    if (config.reference_free or state.ref_params is None
            or all(k in batch for k in _REF_KEYS) or "chosen" not in batch):
        return batch
    policy = require_policy(config)
    out = dict(batch)
    for name in ("chosen", "rejected"):
        if f"ref_{name}_log_probs" in batch:  # keep what the caller gave
            continue
        seq, _ = score(policy, state.ref_params, batch[name], normalize=False)
        out[f"ref_{name}_log_probs"] = lax.stop_gradient(seq)
    return out


def update(state: TrainState, batch):
    """One DPO/SimPO gradient step; returns ``(state, metrics)``.

    With ``num_micro_batches = k > 1`` the gradient is accumulated over
    ``k`` micro-batches of ``B / k`` pairs (means over all ``B`` pairs):
    the same step as with one batch. Every array of the batch must then
    have the pairs on its leading axis.
    """
    pairs = check_batch(batch)
    if "chosen" not in batch:
        raise ValueError(
            "update needs responses to score: batch = {'chosen': "
            "{'observations', 'actions', 'mask'?}, 'rejected': {...}}; flat "
            "log-probs carry no gradient (use `loss` to evaluate them).")
    totals = dict(pairs=jnp.asarray(max(pairs, 1), jnp.float32))
    loss_fn = rows_loss
    if not all(k in batch for k in _REF_KEYS):
        # Reference log-probs per micro-batch (all at once when k = 1).
        def loss_fn(params, micro, config, totals):
            return rows_loss(params, with_reference_log_probs(state, micro),
                             config, totals)
    state, metrics = accumulated_gradient_step(state, loss_fn, batch,
                                               totals)
    return nan_unless_valid(state.config, state, metrics)
