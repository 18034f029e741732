"""Bradley-Terry reward models as ``init``/``update``, and a scalar head.

A reward model maps a response (with its prompt) to one number. Trained on
preference pairs with :func:`artifex_fn.bradley_terry_loss` (Ouyang et al.
2022, eq. 1), it becomes the reward of RL fine-tuning (RLHF-PPO, GRPO).

Batch: ``chosen`` and ``rejected``, each the observations the model scores
(any pytree with leading ``[B]``; for :class:`SequenceRewardModel` a dict
of ``tokens [B, L]`` and ``mask [B, L]``), and an optional ``margin [B]``
(the pair's preference strength, Touvron et al. 2023). Any other key is an
error, except ``extras``, which is never read. Both sides are scored in one
call of ``config.model`` (the two sides concatenated on the batch axis).

:class:`SequenceRewardModel` puts a linear head on the features of any NNX
trunk at the last valid token of each sequence; called as
``model(samples, conditions)`` it is a reward function of the library's
protocol (completion ids after left-padded prompt ids), so a generating
trainer takes it as ``reward_fn`` and passes its weights as arrays: a
retrained reward model needs no recompilation.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from artifex_fn._src import checks
from artifex_fn._src.algorithms.batching import check_keys
from artifex_fn._src.algorithms.batching import check_leading
from artifex_fn._src.algorithms.config import Bound
from artifex_fn._src.algorithms.config import bounds_ok
from artifex_fn._src.algorithms.config import check_bounds
from artifex_fn._src.algorithms.config import nan_unless_valid
from artifex_fn._src.algorithms.config import pytree_config
from artifex_fn._src.algorithms.gradients import accumulated_gradient_step
from artifex_fn._src.algorithms.state import TrainState
from artifex_fn._src.algorithms.state import init_state
from artifex_fn._src.completions import completion_lengths
from artifex_fn._src.preference import bradley_terry_loss


@pytree_config(static=("num_micro_batches", "model", "optimizer"))
class RewardModelConfig:
    """Hyper-parameters of reward-model training.

    Attributes:
      center_coeff: weight ``c >= 0`` of the centering term
        ``c * mean((r_chosen + r_rejected)^2)``.
      max_grad_norm: optional global-norm gradient clipping.
      num_micro_batches: accumulate each step's gradient over this many
        micro-batches of pairs (must divide ``B``): the same step.
      model: ``(params, observations) -> [B]`` rewards.
      optimizer: an optax ``GradientTransformation``.
    """
    center_coeff: float = 0.0
    max_grad_norm: float | None = None
    num_micro_batches: int = 1
    model: Callable[..., Any] | None = None
    optimizer: optax.GradientTransformation | None = None

    BOUNDS = dict(center_coeff=Bound(0.0),
                  max_grad_norm=Bound(0.0, lo_open=True, optional=True))

    def __post_init__(self):
        checks.check_int(self.num_micro_batches, "num_micro_batches", lo=1)
        check_bounds(self)


REQUIRED_KEYS = ("chosen", "rejected")
OPTIONAL_KEYS = ("margin",)


def _pairs(batch):
    """``(rows, totals)``: the pairs' arrays with leading ``[B]`` and the
    number of pairs (the loss's denominator)."""
    check_keys(batch, required=REQUIRED_KEYS, optional=OPTIONAL_KEYS,
               what="reward-model")
    leaves = jax.tree_util.tree_leaves(batch["chosen"])
    if not leaves or jnp.ndim(leaves[0]) == 0:
        raise ValueError("`batch['chosen']` must hold arrays with a leading "
                         "[B] axis (one row per pair).")
    b = jnp.shape(leaves[0])[0]
    for key in ("chosen", "rejected"):
        check_leading(batch[key], (b,), f"batch['{key}']",
                      "one row per pair")
    rows = dict(chosen=batch["chosen"], rejected=batch["rejected"])
    if "margin" in batch:
        margin = jnp.asarray(batch["margin"])
        checks.check_shape(margin, (b,), "batch['margin']", "one per pair")
        rows["margin"] = margin
    return rows, dict(pairs=jnp.asarray(b, jnp.float32))


def rows_loss(params, rows, config: RewardModelConfig, totals):
    """This shard's share of the mean Bradley-Terry loss: ``(loss,
    metrics)``, every value a sum over the shard's pairs divided by the
    batch's pairs (shares of disjoint shards add up)."""
    if config.model is None:
        raise ValueError("`config.model` is None: pass `(params, "
                         "observations) -> [B] rewards`.")
    b = jnp.shape(jax.tree_util.tree_leaves(rows["chosen"])[0])[0]
    both = jax.tree_util.tree_map(lambda c, r: jnp.concatenate([c, r]),
                                  rows["chosen"], rows["rejected"])
    rewards = jnp.asarray(config.model(params, both))
    if rewards.shape != (2 * b,):
        raise ValueError(
            f"the reward model must return one number per sequence, shape "
            f"({2 * b},) for the {b} pairs' two sides; got "
            f"{tuple(rewards.shape)}.")
    chosen, rejected = rewards[:b], rewards[b:]
    per_pair = bradley_terry_loss(chosen, rejected, margin=rows.get("margin"),
                                  center_coeff=config.center_coeff)
    n = totals["pairs"]
    share = lambda x: jnp.sum(jnp.asarray(x, jnp.float32)) / n
    gap = jax.lax.stop_gradient(chosen - rejected)
    metrics = dict(
        loss=share(per_pair), accuracy=share(gap > 0), margin=share(gap),
        chosen_reward=share(jax.lax.stop_gradient(chosen)),
        rejected_reward=share(jax.lax.stop_gradient(rejected)))
    return metrics["loss"], metrics


def loss(params, batch, config: RewardModelConfig):
    """Mean Bradley-Terry loss of a batch of pairs: ``(loss, metrics)``.

    Metrics: ``loss``, ``accuracy`` (pairs whose chosen reward is higher),
    ``margin`` (mean ``r_chosen - r_rejected``), ``chosen_reward``,
    ``rejected_reward``.
    """
    rows, totals = _pairs(batch)
    out = rows_loss(params, rows, config, totals)
    return checks.nan_unless(bounds_ok(config), out)


def init(params, config: RewardModelConfig, *, key=None) -> TrainState:
    """Initial state of reward-model training."""
    return init_state(params, config, key=key)


def update(state: TrainState, batch):
    """One gradient step on a batch of pairs; returns ``(state, metrics)``
    (those of :func:`loss` plus ``grad_norm``). With ``num_micro_batches >
    1`` the gradient is accumulated over micro-batches of pairs, the same
    step."""
    rows, totals = _pairs(batch)
    state, metrics = accumulated_gradient_step(state, rows_loss, rows,
                                               totals)
    return nan_unless_valid(state.config, state, metrics)


def last_valid_index(mask: jax.Array) -> jax.Array:
    """``int32 [B]``: the position of the last valid token of each row of
    ``mask [B, L]`` (left or right padding; 0 for a row without one)."""
    mask = jnp.asarray(mask) > 0
    length = mask.shape[-1]
    from_end = jnp.argmax(mask[..., ::-1], axis=-1)
    return jnp.where(jnp.any(mask, axis=-1), length - 1 - from_end,
                     0).astype(jnp.int32)


def likelihood_features(trunk, tokens, positions, mask, response_mask=None):
    r"""The trunk's features with its running log-likelihood appended.

    ``[B, L, D + 1]``: the features ``h_t`` of ``trunk.features`` and, as
    the last channel, :math:`\sum_{s \le t} \log p(x_s | x_{<s})` under
    the trunk's own language-model ``head``, over the response tokens
    (``response_mask``; default: every valid token). At the last token that
    is the log-likelihood of the response: what a language model knows
    about which answer is likelier, as a feature (without the prompt's
    log-likelihood, an offset per prompt that a pairwise loss cannot see
    and that would swamp the rewards of RL fine-tuning). A small
    trunk fine-tuned as a reward model on few prompts tends to memorise
    them; a frozen trunk with this feature generalises to prompts it never
    saw (``examples/arith_rlhf.py``). Pass as
    ``SequenceRewardModel(..., num_features=D + 1,
    features=likelihood_features)``.
    """
    h = trunk.features(tokens, positions=positions, attention_mask=mask)
    log_p = jax.nn.log_softmax(trunk.head(h).astype(jnp.float32))[:, :-1]
    log_p = jnp.take_along_axis(log_p, tokens[:, 1:, None], axis=-1)[..., 0]
    counted = mask if response_mask is None else response_mask
    log_p = jnp.where(jnp.asarray(counted)[:, 1:] > 0, log_p, 0.0)
    running = jnp.concatenate([jnp.zeros_like(log_p[:, :1]),
                               jnp.cumsum(log_p, axis=1)], axis=1)
    return jnp.concatenate([h.astype(jnp.float32), running[..., None]],
                           axis=-1)


class SequenceRewardModel(nnx.Module):
    """A scalar reward head on any NNX trunk, read at the last valid token.

    .. math::
        r(x, y) = w^\\top h_{T}(x, y) + b

    where :math:`h_T` are the trunk's features at the last valid token of
    the prompt-and-response sequence.

    Args:
      trunk: an ``nnx.Module``; its features ``[B, L, num_features]`` come
        from ``features(trunk, tokens, positions, mask)`` (default: the
        trunk's ``features(tokens, positions=, attention_mask=)`` method,
        e.g. :class:`~artifex_fn.families.autoregressive.TinyCausalLM`'s).
      num_features: the features' width.
      pad_token_id: the padding id of prompts (left-padded ``conditions``).
      eos_token_id, stop_token_ids: the ids that end a completion (the
        tokens after the first one are not read).
      features: optional ``(trunk, tokens, positions, mask, **kw) -> [B, L,
        D]``; ``kw`` holds ``response_mask`` when the response is known
        (e.g. :func:`likelihood_features`).
      rngs: initialises the head.

    Its methods:

    * ``score(tokens, mask, response_mask=None)``: ``[B]`` rewards of
      ``tokens [B, L]`` with validity ``mask [B, L]`` (positions count
      valid tokens) and optionally which tokens are the response;
    * ``model(samples, conditions)``: the reward-function protocol, ``[B]``
      rewards of completions ``samples [B, N]`` after the left-padded
      prompts ``conditions [B, Lp]``;
    * ``policy_outputs(observations)``: ``score`` of ``{"tokens", "mask",
      "response_mask"?}`` (what the trainers call).
    """

    def __init__(self, trunk: nnx.Module, num_features: int, *,
                 pad_token_id: int, eos_token_id: int | None = None,
                 stop_token_ids=(), features=None, rngs: nnx.Rngs):
        checks.check_int(num_features, "num_features", lo=1)
        checks.check_int(pad_token_id, "pad_token_id", lo=0)
        self.trunk = trunk
        self.head = nnx.Linear(num_features, 1, rngs=rngs)
        self.pad_token_id = int(pad_token_id)
        self.eos_token_id = eos_token_id
        self.stop_token_ids = tuple(int(i) for i in stop_token_ids)
        self._features = features

    def score(self, tokens, mask, response_mask=None):
        tokens = jnp.asarray(tokens)
        valid = jnp.asarray(mask) > 0
        positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)
        if self._features is not None:
            extra = {} if response_mask is None else dict(
                response_mask=jnp.asarray(response_mask) > 0)
            h = self._features(self.trunk, tokens, positions, valid, **extra)
        else:
            h = self.trunk.features(tokens, positions=positions,
                                    attention_mask=valid)
        last = last_valid_index(valid)
        h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        return self.head(h_last)[..., 0].astype(jnp.float32)

    def policy_outputs(self, observations):
        return self.score(observations["tokens"], observations["mask"],
                          observations.get("response_mask"))

    def __call__(self, samples, conditions=None, **kwargs):
        samples = jnp.asarray(samples)
        lengths = completion_lengths(samples, eos_token_id=self.eos_token_id,
                                     stop_token_ids=self.stop_token_ids)
        n = samples.shape[-1]
        completion_mask = jnp.arange(n)[None] < lengths[:, None]
        if conditions is None:
            return self.score(samples, completion_mask)
        conditions = jnp.asarray(conditions)
        tokens = jnp.concatenate([conditions, samples], axis=1)
        prompt_mask = conditions != self.pad_token_id
        mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
        response = jnp.concatenate([jnp.zeros_like(prompt_mask),
                                    completion_mask], axis=1)
        return self.score(tokens, mask, response)
