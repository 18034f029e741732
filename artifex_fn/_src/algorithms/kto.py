"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024) as
``init``/``update``.

KTO learns from *unpaired* responses, each labelled desirable or
undesirable (:func:`artifex_fn.kto_loss`): no preference pairs needed.

Batch (every array leads with the ``B`` examples, except under ``kl``):

* ``observations``: what the policy reads, ``[B, ...]`` (any pytree);
* ``actions``: the response tokens it scores, ``[B, L]`` (or one-step
  actions ``[B, ...]``);
* ``mask`` (optional): ``[B, L]``, 0 on padding (padded observations and
  actions may hold anything, NaN included);
* ``desirable``: ``[B]`` booleans (or integers, nonzero: desirable);
* ``ref_log_probs`` (optional): ``[B]`` reference log-prob sums of the
  responses; without them they come from ``state.ref_params``, and
  having neither is an error;
* ``kl`` (optional): ``{"observations", "actions", "mask"?}`` with
  ``B_kl`` rows of *mismatched* prompts and completions (each prompt with
  a completion written for another prompt, as in the paper and TRL's
  ``KTOTrainer``), laid out like the batch's own rows;
* ``kl_ref_log_probs`` (optional, only with ``kl``): ``[B_kl]`` reference
  log-prob sums of the ``kl`` rows (else from ``state.ref_params``).

The reference point is
:math:`z_{ref} = \\max(0, \\frac{1}{B_{kl}}\\sum_i \\log\\pi_\\theta(y'_i|x_i)
- \\log\\pi_{ref}(y'_i|x_i))` over the ``kl`` rows or, without them, over
the batch's own rows (a cruder estimate: matched responses are likelier
under the policy than mismatched ones). It carries no gradient. It is a
statistic of the whole batch: :func:`update` computes it once, before the
gradient is accumulated over micro-batches, and passes it (with the
number of examples and of each label) in the totals of :func:`rows_loss`,
so a micro-batched step equals the plain one. The forward passes behind
it (and behind missing reference log-probs) also run micro-batch by
micro-batch when ``num_micro_batches`` divides their rows.

:func:`pairs_to_unpaired` turns a DPO batch of pairs into a KTO batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from artifex_fn._src import checks
from artifex_fn._src.algorithms.batching import check_keys
from artifex_fn._src.algorithms.batching import check_leading
from artifex_fn._src.algorithms.batching import check_shape_of
from artifex_fn._src.algorithms.batching import micro_batches
from artifex_fn._src.algorithms.config import Bound
from artifex_fn._src.algorithms.config import bounds_ok
from artifex_fn._src.algorithms.config import check_bounds
from artifex_fn._src.algorithms.config import nan_unless_valid
from artifex_fn._src.algorithms.config import pytree_config
from artifex_fn._src.algorithms.dpo import score
from artifex_fn._src.algorithms.gradients import accumulated_gradient_step
from artifex_fn._src.algorithms.policies import require_policy
from artifex_fn._src.algorithms.state import TrainState
from artifex_fn._src.algorithms.state import init_state
from artifex_fn._src.preference import kto_loss


@pytree_config(static=("num_micro_batches", "policy", "optimizer"))
class KTOConfig:
    """Hyper-parameters of KTO.

    Attributes:
      beta: inverse temperature of the implicit reward, ``> 0``.
      desirable_weight: :math:`\\lambda_D \\ge 0`, weight of the desirable
        examples' losses.
      undesirable_weight: :math:`\\lambda_U \\ge 0`. The paper advises
        :math:`\\frac{\\lambda_D n_D}{\\lambda_U n_U} \\in [1, \\frac{4}{3}]`
        for ``n_D`` desirable and ``n_U`` undesirable examples.
      max_grad_norm: optional global-norm gradient clipping.
      num_micro_batches: accumulate each step's gradient over this many
        micro-batches of examples (must divide ``B``): the same step.
      policy: ``(params, observations) -> distrax.Distribution`` (or logits)
        giving per-token log-probs of ``actions``.
      optimizer: an optax ``GradientTransformation``.
    """
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    max_grad_norm: float | None = None
    num_micro_batches: int = 1
    policy: Callable[..., Any] | None = None
    optimizer: optax.GradientTransformation | None = None

    BOUNDS = dict(beta=Bound(0.0, lo_open=True),
                  desirable_weight=Bound(0.0), undesirable_weight=Bound(0.0),
                  max_grad_norm=Bound(0.0, lo_open=True, optional=True))

    def __post_init__(self):
        checks.check_int(self.num_micro_batches, "num_micro_batches", lo=1)
        check_bounds(self)


_ROW_KEYS = ("observations", "actions", "mask")
REQUIRED_KEYS = ("observations", "actions", "desirable")
OPTIONAL_KEYS = ("mask", "ref_log_probs", "kl", "kl_ref_log_probs")


def check_response_rows(rows, where: str, *, keys: bool = True) -> int:
    """Checks rows of responses to score, ``{"observations", "actions",
    "mask"?}`` (with ``keys``: no other key); returns their number.

    ``where`` names the rows in errors (``"batch['kl']"``): the actions
    lead with the rows axis ``[n, ...]``, the observations too, and the
    mask has the leading axes of the actions.
    """
    if keys:
        if not isinstance(rows, dict):
            raise TypeError(
                f"`{where}` must be a dict with 'observations' (what the "
                f"policy reads), 'actions' (the response tokens it scores) "
                f"and optionally 'mask'; got {type(rows).__name__}.")
        check_keys(rows, required=("observations", "actions"),
                   optional=("mask",), what=where)
    leaves = jax.tree_util.tree_leaves(rows["actions"])
    if not leaves or jnp.ndim(leaves[0]) == 0:
        raise ValueError(f"`{where}['actions']` must lead with the rows "
                         f"axis [n, ...].")
    shape = tuple(jnp.shape(leaves[0]))
    for name in ("actions", "observations"):
        check_leading(rows[name], shape[:1], f"{where}['{name}']",
                      "one row per response")
    if rows.get("mask") is not None:
        check_shape_of(rows["mask"], f"{where}['mask']",
                       shape[:jnp.ndim(rows["mask"])],
                       "the leading axes of the actions")
    return shape[0]


def check_batch(batch) -> int:
    """Validates a KTO batch (module docstring); returns ``B``."""
    check_keys(batch, required=REQUIRED_KEYS, optional=OPTIONAL_KEYS,
               what="KTO")
    b = check_response_rows(batch, "batch", keys=False)
    desirable = check_shape_of(batch["desirable"], "batch['desirable']",
                               (b,), "one label per example")
    if not (desirable.dtype == jnp.bool_
            or jnp.issubdtype(desirable.dtype, jnp.integer)):
        raise ValueError(f"`batch['desirable']` must hold booleans (True: "
                         f"desirable), got dtype {desirable.dtype}.")
    if "ref_log_probs" in batch:
        check_shape_of(batch["ref_log_probs"], "batch['ref_log_probs']",
                       (b,), "one value per example")
    if "kl" in batch:
        n_kl = check_response_rows(batch["kl"], "batch['kl']")
        if "kl_ref_log_probs" in batch:
            check_shape_of(batch["kl_ref_log_probs"],
                           "batch['kl_ref_log_probs']", (n_kl,),
                           "one value per row of batch['kl']")
    elif "kl_ref_log_probs" in batch:
        raise ValueError("`batch['kl_ref_log_probs']` scores the rows of "
                         "batch['kl'], which is missing.")
    return b


def _responses(batch):
    return {k: batch[k] for k in _ROW_KEYS if k in batch}


def _per_row(fn, rows, num_micro_batches: int):
    """``fn(rows) -> [n]``, evaluated micro-batch by micro-batch (in a
    ``lax.map``, one micro-batch alive at a time) when
    ``num_micro_batches`` divides ``n``; rows in their original order."""
    n = jnp.shape(jax.tree_util.tree_leaves(rows["actions"])[0])[0]
    k = num_micro_batches
    if k == 1 or n % k:
        return fn(rows)
    out = lax.map(fn, micro_batches(rows, k))   # out[m, j]: row j * k + m
    return jnp.reshape(jnp.swapaxes(out, 0, 1), (n,))


def _log_prob_sums(params, rows, config):
    return score(require_policy(config), params, rows, normalize=False)[0]


def with_reference_log_probs(state: TrainState, batch):
    """Adds reference log-prob sums from ``state.ref_params`` when missing:
    ``ref_log_probs`` of the examples and, with ``kl``, ``kl_ref_log_probs``
    of the mismatched rows (no gradient)."""
    check_batch(batch)
    if state.ref_params is None:
        return batch
    config = state.config

    def ref_scores(rows):
        return lax.stop_gradient(_per_row(
            lambda r: _log_prob_sums(state.ref_params, r, config), rows,
            config.num_micro_batches))

    out = dict(batch)
    if "ref_log_probs" not in batch:
        out["ref_log_probs"] = ref_scores(_responses(batch))
    if "kl" in batch and "kl_ref_log_probs" not in batch:
        out["kl_ref_log_probs"] = ref_scores(_responses(batch["kl"]))
    return out


def _require_reference(batch) -> None:
    missing = [k for k in ("ref_log_probs", "kl_ref_log_probs")
               if k not in batch and (k == "ref_log_probs" or "kl" in batch)]
    if missing:
        raise ValueError(
            f"KTO needs reference log-probs: batch is missing {missing} "
            f"(pass them, or give the state `ref_params` / the trainer a "
            f"`reference_model`).")


def kl_reference_point(params, batch, config: KTOConfig) -> jax.Array:
    """KTO's reference point :math:`z_{ref}` (module docstring): the mean
    policy-to-reference log-ratio of the ``kl`` rows (else of the batch's
    own rows), clamped at 0, without gradient. ``batch`` must carry the
    reference log-probs (:func:`with_reference_log_probs`)."""
    _require_reference(batch)
    if "kl" in batch:
        rows = dict(_responses(batch["kl"]),
                    ref_log_probs=batch["kl_ref_log_probs"])
    else:
        rows = dict(_responses(batch), ref_log_probs=batch["ref_log_probs"])

    def log_ratio(r):
        return _log_prob_sums(params, r, config) - r["ref_log_probs"]

    ratios = _per_row(log_ratio, rows, config.num_micro_batches)
    return lax.stop_gradient(jnp.maximum(jnp.mean(ratios), 0.0))


def _rows_and_totals(params, batch, config):
    """The step's rows (leading ``[B]``) and whole-batch totals."""
    kl = kl_reference_point(params, batch, config)
    rows = dict(_responses(batch), desirable=batch["desirable"],
                ref_log_probs=batch["ref_log_probs"])
    desirable = jnp.asarray(batch["desirable"]) != 0
    b = desirable.shape[0]
    n_desirable = jnp.sum(desirable.astype(jnp.float32))
    return rows, dict(examples=jnp.asarray(max(b, 1), jnp.float32),
                      desirable=n_desirable, undesirable=b - n_desirable,
                      kl=kl)


def rows_loss(params, rows, config: KTOConfig, totals):
    """This shard's share of the KTO loss: ``(loss, metrics)``.

    ``rows`` holds ``observations``, ``actions``, ``mask``?, ``desirable``
    and ``ref_log_probs`` with leading ``[n]``; ``totals`` the whole
    batch's ``examples``, ``desirable`` and ``undesirable`` counts and the
    reference point ``kl``. Every value is a sum over the shard's examples
    divided by a whole-batch count (``kl`` enters as ``n / examples`` of
    itself), so shares of disjoint shards add up to the batch's values.
    """
    _require_reference(rows)
    policy_log_probs = _log_prob_sums(params, rows, config)
    ref = jnp.asarray(rows["ref_log_probs"])
    desirable = jnp.asarray(rows["desirable"]) != 0
    out = kto_loss(policy_log_probs, ref, desirable, totals["kl"],
                   beta=config.beta, desirable_weight=config.desirable_weight,
                   undesirable_weight=config.undesirable_weight)
    examples = totals["examples"]

    def label_mean(flag, count):
        picked = jnp.where(flag, out.rewards, 0.0)
        return jnp.sum(picked) / jnp.maximum(count, 1.0)

    total = jnp.sum(out.loss) / examples
    metrics = {
        "loss": total,
        "kl": totals["kl"] * (desirable.shape[0] / examples),
        "logratio": lax.stop_gradient(
            jnp.sum(policy_log_probs - ref) / examples),
        "rewards/chosen": label_mean(desirable, totals["desirable"]),
        "rewards/rejected": label_mean(~desirable, totals["undesirable"]),
    }
    return total, metrics


def loss(params, batch, config: KTOConfig):
    """KTO loss averaged over examples; returns ``(loss, metrics)``.

    The batch must carry its reference log-probs (``ref_log_probs``, and
    ``kl_ref_log_probs`` with ``kl``). Metrics: ``loss``, ``kl`` (the
    reference point :math:`z_{ref}`), ``logratio`` (mean policy-to-reference
    log-ratio), ``rewards/chosen`` and ``rewards/rejected`` (mean implicit
    reward ``beta * logratio`` of the desirable / undesirable examples, 0
    when there are none).
    """
    check_batch(batch)
    rows, totals = _rows_and_totals(params, batch, config)
    return checks.nan_unless(bounds_ok(config),
                             rows_loss(params, rows, config, totals))


def init(params, config: KTOConfig, *, key=None,
         ref_params=None) -> TrainState:
    """Initial state; ``ref_params`` (optional) scores reference log-probs."""
    return init_state(params, config, key=key, ref_params=ref_params)


def update(state: TrainState, batch):
    """One KTO gradient step; returns ``(state, metrics)`` (those of
    :func:`loss` plus ``grad_norm``).

    Missing reference log-probs come from ``state.ref_params``; the
    reference point is computed once over the whole batch at the current
    parameters; with ``num_micro_batches = k > 1`` the gradient is then
    accumulated over ``k`` micro-batches of ``B / k`` examples: the same
    step as with one batch.
    """
    check_batch(batch)
    batch = with_reference_log_probs(state, batch)
    rows, totals = _rows_and_totals(state.params, batch, state.config)
    state, metrics = accumulated_gradient_step(state, rows_loss, rows,
                                               totals)
    return nan_unless_valid(state.config, state, metrics)


_PAIR_REF_KEYS = ("ref_chosen_log_probs", "ref_rejected_log_probs")


def _mismatched(rows, observations_are_prompts: bool):
    """Rows pairing each prompt with the completion of the next row, or
    None when the observations do not separate prompt and completion."""
    shift = lambda x: jnp.roll(x, -1, axis=0)
    obs = rows["observations"]
    if isinstance(obs, dict) and {"prompt", "completion"} <= set(obs):
        obs = dict(obs, completion=shift(obs["completion"]))
    elif not observations_are_prompts:
        return None
    kl = dict(observations=obs,
              actions=jax.tree_util.tree_map(shift, rows["actions"]))
    if "mask" in rows:
        kl["mask"] = shift(rows["mask"])
    return kl


def pairs_to_unpaired(batch, *, observations_are_prompts: bool = False):
    """A KTO batch from a DPO batch of pairs.

    ``{"chosen": rows, "rejected": rows}`` (rows: ``{"observations",
    "actions", "mask"?}`` with leading ``[B]``, both sides with the same
    structure and trailing shapes; pad them to one length) and optional
    ``ref_chosen_log_probs`` / ``ref_rejected_log_probs`` (both or
    neither) become ``2B`` examples: the chosen responses (desirable) and
    then the rejected ones (undesirable), with ``ref_log_probs``
    concatenated the same way.

    The ``kl`` rows pair the prompt of each of the ``2B`` rows with the
    completion of the next row (the last with the first; with ``B >= 2``
    pairs of distinct prompts no row keeps its own prompt). They can be
    built only when the prompt and the completion are separate arrays:

    * the token layout of :func:`artifex_fn.sampling.token_policy`,
      ``observations = {"prompt", "completion", "prompt_mask"?}`` with the
      completion as ``actions``: the completion, actions and mask move,
      the prompt (and its mask) stays;
    * ``observations_are_prompts=True``: the observations hold only the
      prompt (a one-step policy scoring ``actions`` given a context), so
      the actions and mask move.

    Otherwise (e.g. ``observations = prompt_and_response[:, :-1]``, where
    the response is part of what the policy reads) no ``kl`` rows are made
    and KTO estimates the reference point from the batch's own rows; build
    ``batch["kl"]`` from re-tokenised mismatched prompt-completion pairs
    for the paper's estimate. With ``B = 1`` no ``kl`` rows are made
    either.
    """
    check_keys(batch, required=("chosen", "rejected"),
               optional=_PAIR_REF_KEYS, what="paired preference")
    sides = [batch["chosen"], batch["rejected"]]
    sizes = [check_response_rows(side, f"batch['{name}']")
             for name, side in zip(("chosen", "rejected"), sides)]
    if sizes[0] != sizes[1]:
        raise ValueError(f"batch['chosen'] holds {sizes[0]} pairs but "
                         f"batch['rejected'] {sizes[1]}.")
    if ("mask" in sides[0]) != ("mask" in sides[1]):
        raise ValueError("give a `mask` on both sides ('chosen' and "
                         "'rejected') or on neither.")
    refs = [k for k in _PAIR_REF_KEYS if k in batch]
    if len(refs) == 1:
        raise ValueError(f"batch has '{refs[0]}' but not the other side's: "
                         f"give both of {list(_PAIR_REF_KEYS)} or neither.")
    try:
        rows = jax.tree_util.tree_map(
            lambda c, r: jnp.concatenate([c, r]), _responses(sides[0]),
            _responses(sides[1]))
    except (TypeError, ValueError) as err:
        raise ValueError(
            "batch['chosen'] and batch['rejected'] must have the same "
            "structure and trailing shapes to be stacked as rows (pad the "
            f"responses to one length): {err}") from None
    b = sizes[0]
    out = dict(rows, desirable=jnp.arange(2 * b) < b)
    if refs:
        out["ref_log_probs"] = jnp.concatenate([
            check_shape_of(batch[k], f"batch['{k}']", (b,), "one per pair")
            for k in _PAIR_REF_KEYS])
    kl = _mismatched(rows, observations_are_prompts) if b > 1 else None
    if kl is not None:
        out["kl"] = kl
    return out
