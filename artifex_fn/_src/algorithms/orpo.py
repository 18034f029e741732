"""Odds Ratio Preference Optimization (Hong et al. 2024) as
``init``/``update``.

ORPO fine-tunes and aligns in one loss, without a reference model: the
negative log-likelihood of the chosen responses (the SFT term) plus
:func:`artifex_fn.orpo_loss`'s odds-ratio term, which raises the odds of
the chosen response's length-normalised likelihood over the rejected
one's:

.. math::
    \\mathcal{L} = -\\frac{\\sum_{i,t} m^w_{it}\\log\\pi_\\theta(y^w_{it}|
    x_i, y^w_{i,<t})}{\\sum_{i,t} m^w_{it}}
    - \\frac{\\lambda}{B}\\sum_i\\log\\sigma(\\text{log-odds}_i)

The SFT term is a token mean over every chosen token of the batch (TRL's
``ORPOTrainer`` does the same); :func:`update` counts those tokens once
before the gradient is accumulated over micro-batches, so a micro-batched
step equals the plain one. Without a mask every response has the same
length and the token mean is the mean over pairs of per-response means.

Batch: DPO's responses form (:mod:`artifex_fn.dpo`), ``{"chosen":
{"observations", "actions", "mask"?}, "rejected": {...}}``, the two sides
with the same number of pairs ``B``; no reference log-probs (any other key
but ``extras`` is an error).
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import optax
from jax import lax

from artifex_fn._src import checks
from artifex_fn._src.algorithms.batching import check_keys
from artifex_fn._src.algorithms.config import Bound
from artifex_fn._src.algorithms.config import bounds_ok
from artifex_fn._src.algorithms.config import check_bounds
from artifex_fn._src.algorithms.config import nan_unless_valid
from artifex_fn._src.algorithms.config import pytree_config
from artifex_fn._src.algorithms.dpo import score
from artifex_fn._src.algorithms.gradients import accumulated_gradient_step
from artifex_fn._src.algorithms.kto import check_response_rows
from artifex_fn._src.algorithms.policies import require_policy
from artifex_fn._src.algorithms.state import TrainState
from artifex_fn._src.algorithms.state import init_state
from artifex_fn._src.preference import orpo_loss


@pytree_config(static=("num_micro_batches", "policy", "optimizer"))
class ORPOConfig:
    """Hyper-parameters of ORPO.

    Attributes:
      lambda_: weight :math:`\\lambda \\ge 0` of the odds-ratio term (the
        paper uses 0.1 to 0.25; 0 is plain SFT on the chosen responses).
      max_grad_norm: optional global-norm gradient clipping.
      num_micro_batches: accumulate each step's gradient over this many
        micro-batches of pairs (must divide ``B``): the same step.
      policy: ``(params, observations) -> distrax.Distribution`` (or logits)
        giving per-token log-probs of ``actions``.
      optimizer: an optax ``GradientTransformation``.
    """
    lambda_: float = 0.1
    max_grad_norm: float | None = None
    num_micro_batches: int = 1
    policy: Callable[..., Any] | None = None
    optimizer: optax.GradientTransformation | None = None

    BOUNDS = dict(lambda_=Bound(0.0),
                  max_grad_norm=Bound(0.0, lo_open=True, optional=True))

    def __post_init__(self):
        checks.check_int(self.num_micro_batches, "num_micro_batches", lo=1)
        check_bounds(self)


_SIDES = ("chosen", "rejected")


def check_batch(batch) -> int:
    """Validates an ORPO batch (module docstring); returns ``B``."""
    check_keys(batch, required=_SIDES, optional=(), what="ORPO")
    sizes = [check_response_rows(batch[name], f"batch['{name}']")
             for name in _SIDES]
    if sizes[0] != sizes[1]:
        raise ValueError(f"batch['chosen'] holds {sizes[0]} pairs but "
                         f"batch['rejected'] {sizes[1]}.")
    return sizes[0]


def _rows_and_totals(batch):
    """The step's rows and whole-batch totals: the number of pairs and,
    with a mask, of chosen tokens."""
    pairs = check_batch(batch)
    rows = {name: batch[name] for name in _SIDES}
    totals = dict(pairs=jnp.asarray(max(pairs, 1), jnp.float32))
    mask = batch["chosen"].get("mask")
    if mask is not None:
        mask = jnp.asarray(mask, jnp.float32)
        totals["chosen_tokens"] = jnp.maximum(
            jnp.sum(jnp.where(mask > 0, mask, 0.0)), 1.0)
    return rows, totals


def rows_loss(params, rows, config: ORPOConfig, totals):
    """This shard's share of the ORPO loss: ``(loss, metrics)``.

    Every value is a sum over the shard's pairs divided by the batch's
    pairs (``totals["pairs"]``), the SFT term's by the batch's chosen
    tokens (``totals["chosen_tokens"]``, present with a mask), so shares
    of disjoint shards add up to the full-batch values.
    """
    policy = require_policy(config)
    chosen, chosen_len = score(policy, params, rows["chosen"],
                               normalize=False)
    rejected, rejected_len = score(policy, params, rows["rejected"],
                                   normalize=False)
    out = orpo_loss(chosen, rejected, chosen_len, rejected_len,
                    lambda_=config.lambda_)
    pairs = totals["pairs"]
    share = lambda x: jnp.sum(x) / pairs
    mean_chosen = chosen / jnp.maximum(chosen_len, 1.0)
    mean_rejected = rejected / jnp.maximum(rejected_len, 1.0)
    if "chosen_tokens" in totals:
        nll = -jnp.sum(chosen) / totals["chosen_tokens"]
    else:
        nll = -share(mean_chosen)
    or_loss = share(out.loss)
    total = nll + or_loss
    margin = out.chosen_rewards - out.rejected_rewards
    metrics = dict(
        loss=total, nll_loss=nll, or_loss=or_loss,
        log_odds=lax.stop_gradient(share(out.log_odds)),
        reward_accuracy=share((mean_chosen > mean_rejected).astype(
            jnp.float32)),
        chosen_reward=share(out.chosen_rewards),
        rejected_reward=share(out.rejected_rewards),
        reward_margin=share(margin))
    return total, metrics


def loss(params, batch, config: ORPOConfig):
    """ORPO loss of a batch of pairs; returns ``(loss, metrics)``.

    Metrics: ``loss`` (``nll_loss + or_loss``), ``nll_loss`` (token-mean
    NLL of the chosen responses), ``or_loss`` (mean odds-ratio term),
    ``log_odds`` (mean log odds ratio), ``reward_accuracy`` (fraction of
    pairs whose chosen response has the higher mean token log-prob),
    ``chosen_reward``, ``rejected_reward`` and ``reward_margin`` (means of
    the implicit rewards ``lambda_ * mean token log-prob``).
    """
    rows, totals = _rows_and_totals(batch)
    return checks.nan_unless(bounds_ok(config),
                             rows_loss(params, rows, config, totals))


def init(params, config: ORPOConfig, *, key=None,
         ref_params=None) -> TrainState:
    """Initial state. ORPO has no reference model: ``ref_params`` (kept
    for the signature every algorithm shares) must be None."""
    if ref_params is not None:
        raise ValueError("ORPO uses no reference model: `ref_params` must "
                         "be None.")
    return init_state(params, config, key=key)


def update(state: TrainState, batch):
    """One ORPO gradient step; returns ``(state, metrics)`` (those of
    :func:`loss` plus ``grad_norm``). With ``num_micro_batches = k > 1``
    the gradient is accumulated over ``k`` micro-batches of ``B / k``
    pairs: the same step as with one batch."""
    rows, totals = _rows_and_totals(batch)
    state, metrics = accumulated_gradient_step(state, rows_loss, rows,
                                               totals)
    return nan_unless_valid(state.config, state, metrics)
