"""NNX trainers for KTO and ORPO, the offline preference methods beside DPO.

Both are thin shells over the pure ``update`` of :mod:`artifex_fn.kto` and
:mod:`artifex_fn.orpo`, with the machinery of the RL trainers
(:mod:`artifex_fn.training.trainers.rl`): the model is the policy
(``model(observations)`` returns logits or a ``distrax`` distribution, or
the model defines ``policy_outputs``, or the trainer gets ``apply_fn``),
one compiled step per batch structure, config numbers traced.
"""

from __future__ import annotations

from artifex_fn import kto as _kto
from artifex_fn import orpo as _orpo
from artifex_fn.training.trainers import rl


class KTOTrainer(rl._RLTrainer):
    """KTO on an NNX policy scoring unpaired, labelled responses.

    ``train_step(batch)`` with ``observations``, ``actions``, ``mask``?,
    ``desirable [B]`` and optionally the mismatched rows ``kl`` (see
    :mod:`artifex_fn.kto`; :func:`artifex_fn.kto.pairs_to_unpaired` turns
    DPO pairs into such a batch) scores the responses with the model and
    takes one gradient step. Reference log-probs come from the batch
    (``ref_log_probs``, ``kl_ref_log_probs``), from ``reference_model``
    (refreshed every ``ref_sync_steps`` steps if set) or, with
    ``lora_reference=True``, from the model with its LoRA adapters off
    (see :class:`~artifex_fn.training.GRPOTrainer`); one of them is
    required. Metrics: ``loss, kl, logratio, rewards/chosen,
    rewards/rejected, grad_norm``. ``compute_loss(model, batch)``
    evaluates without updating.
    """
    _algorithm = _kto
    config_type = _kto.KTOConfig


class ORPOTrainer(rl._RLTrainer):
    """ORPO on an NNX policy scoring preference pairs; no reference model.

    ``train_step({"chosen": {"observations", "actions", "mask"?},
    "rejected": {...}})`` takes one gradient step on the chosen responses'
    token-mean NLL plus the odds-ratio term (:mod:`artifex_fn.orpo`).
    Metrics: ``loss, nll_loss, or_loss, log_odds, reward_accuracy,
    chosen_reward, rejected_reward, reward_margin, grad_norm``.
    ``reference_model``, ``lora_reference`` and ``ref_sync_steps`` are
    refused: ORPO needs no reference.
    """
    _algorithm = _orpo
    config_type = _orpo.ORPOConfig

    def __init__(self, model, optimizer, config=None, **kwargs):
        # kwargs: generation, apply_fn, key (see GRPOTrainer).
        given = [name for name in ("reference_model", "lora_reference",
                                   "ref_sync_steps")
                 if kwargs.get(name) not in (None, False)]
        if given:
            raise ValueError(
                f"ORPO uses no reference model (its odds-ratio term compares "
                f"the policy's own likelihoods): drop {given}.")
        super().__init__(model, optimizer, config, **kwargs)
