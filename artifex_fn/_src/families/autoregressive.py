"""Autoregressive sequence models: teacher forcing and scheduled sampling,
as ``init``/``update`` (sampling from them: :mod:`artifex_fn._src.sampling`).

A causal model maps tokens ``[B, L]`` to next-token logits ``[B, L, V]``
(the output at position ``j`` depends on tokens ``<= j`` only). Training
minimises the masked next-token cross-entropy with optional label
smoothing ``epsilon`` (Szegedy et al. 2016):

.. math::
    \\ell_t = -(1 - \\epsilon) \\log p(y_t | y_{<t})
      - \\frac{\\epsilon}{V} \\sum_v \\log p(v | y_{<t}),

averaged over the valid target tokens (``aggregate_loss(...,
"token_mean")``).

Scheduled sampling (Bengio et al. 2015, "Scheduled Sampling for Sequence
Prediction with Recurrent Neural Networks") feeds, with probability ``p``
per position, the model's own prediction instead of the ground-truth
token. For a parallel (transformer) model it is done in two passes: a
teacher-forced pass without gradient samples a prediction for every
position, the predictions replace the inputs at a Bernoulli(``p``) subset
of positions (never the first token, never padding), and the second pass
is trained on the ground-truth targets. ``p`` may follow a linear schedule
over training steps.

Batch: ``{"tokens": [B, L]}`` integer ids and an optional ``"mask":
[B, L]`` (default ``tokens != pad_token_id``); inputs are
``tokens[:, :-1]``, targets ``tokens[:, 1:]``, weighted by ``mask[:, 1:]``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from artifex_fn._src import checks
from artifex_fn._src.aggregation import aggregate_loss
from artifex_fn._src.algorithms.config import pytree_config
from artifex_fn._src.algorithms.gradients import keyed_gradient_step
from artifex_fn._src.algorithms.state import TrainState
from artifex_fn._src.algorithms.state import init_state
from artifex_fn._src.log_probs import token_log_probs


@pytree_config(static=("scheduled_sampling_steps", "pad_token_id",
                       "apply", "optimizer"))
class AutoregressiveConfig:
    """Hyper-parameters of next-token training.

    Attributes:
      scheduled_sampling: probability ``p`` of feeding the model's own
        prediction instead of the ground truth, in ``[0, 1]`` (``0``: pure
        teacher forcing); the start of the schedule when
        ``scheduled_sampling_final`` is set.
      scheduled_sampling_final: optional final probability; ``p`` moves
        linearly from ``scheduled_sampling`` to it over
        ``scheduled_sampling_steps`` updates, then stays.
      scheduled_sampling_steps: length of the linear schedule, ``>= 1``.
      pad_token_id: padding token, masked out of the targets when the
        batch has no ``mask``.
      label_smoothing: ``epsilon`` in ``[0, 1)``.
      max_grad_norm: optional global-norm gradient clipping.
      apply: ``(params, tokens [B, L]) -> logits [B, L, V]`` (causal).
      optimizer: an optax ``GradientTransformation``.
    """
    scheduled_sampling: float = 0.0
    scheduled_sampling_final: float | None = None
    scheduled_sampling_steps: int = 1
    pad_token_id: int = 0
    label_smoothing: float = 0.0
    max_grad_norm: float | None = None
    apply: Callable[..., Any] | None = None
    optimizer: optax.GradientTransformation | None = None

    def __post_init__(self):
        checks.check_hparam(self.scheduled_sampling, "scheduled_sampling",
                            lo=0.0, hi=1.0)
        checks.check_hparam(self.scheduled_sampling_final,
                            "scheduled_sampling_final", lo=0.0, hi=1.0,
                            optional=True)
        checks.check_int(self.scheduled_sampling_steps,
                         "scheduled_sampling_steps", lo=1)
        checks.check_int(self.pad_token_id, "pad_token_id", lo=0)
        checks.check_hparam(self.label_smoothing, "label_smoothing", lo=0.0,
                            hi=1.0, hi_open=True)
        checks.check_hparam(self.max_grad_norm, "max_grad_norm", lo=0.0,
                            lo_open=True, optional=True)
        if self.apply is not None and not callable(self.apply):
            raise ValueError("`apply` must be callable (params, tokens) -> "
                             "logits.")

    @property
    def uses_scheduled_sampling(self) -> bool:
        """False only when ``p`` is the Python number 0 with no schedule."""
        p = self.scheduled_sampling
        return not (self.scheduled_sampling_final is None
                    and isinstance(p, (int, float)) and p == 0)


def _require_apply(config) -> Callable:
    if config.apply is None:
        raise ValueError(
            "`config.apply` is None: pass a function "
            "`(params, tokens [B, L]) -> logits [B, L, V]`.")
    return config.apply


def logits_of(apply: Callable, params, tokens: jax.Array) -> jax.Array:
    """``apply(params, tokens)`` checked to be ``[B, L, V]`` logits."""
    out = apply(params, tokens)
    out = out.logits if hasattr(out, "logits") else jnp.asarray(out)
    if out.ndim != 3 or out.shape[:2] != tokens.shape:
        raise ValueError(
            f"the model must map tokens {tuple(tokens.shape)} to logits "
            f"[B, L, V], got shape {tuple(out.shape)}.")
    return out


def scheduled_sampling_probability(config: AutoregressiveConfig, step):
    """``p`` at update ``step``: constant, or the linear schedule."""
    start = jnp.asarray(config.scheduled_sampling, jnp.float32)
    if config.scheduled_sampling_final is None:
        return start
    frac = jnp.minimum(jnp.asarray(step, jnp.float32)
                       / config.scheduled_sampling_steps, 1.0)
    return start + frac * (config.scheduled_sampling_final - start)


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: jax.Array | None = None, *,
                  label_smoothing: float | jax.Array = 0.0):
    """Per-token label-smoothed cross-entropy and the masked token mean.

    Args:
      logits: ``[B, L, V]``.
      targets: ``[B, L]`` integer ids.
      mask: optional ``[B, L]``; zero marks padding.
      label_smoothing: ``epsilon``.

    Returns:
      ``(loss, nll)``: the scalar token mean of the smoothed loss and the
      per-token negative log-likelihood ``[B, L]`` (unsmoothed).
    """
    nll = -token_log_probs(logits, targets)
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    uniform = lse - jnp.mean(logits.astype(jnp.float32), axis=-1)
    per_token = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    return aggregate_loss(per_token, mask, mode="token_mean"), nll


def _split_batch(batch, config):
    tokens = batch.get("tokens") if isinstance(batch, dict) else batch
    if tokens is None:
        raise ValueError("batch is missing the key 'tokens' ([B, L] ids).")
    tokens = jnp.asarray(tokens)
    if (tokens.ndim != 2 or tokens.shape[1] < 2
            or not jnp.issubdtype(tokens.dtype, jnp.integer)):
        raise ValueError(
            f"`tokens` must be integer ids [B, L] with L >= 2, got "
            f"{tokens.dtype}{list(tokens.shape)}.")
    mask = batch.get("mask") if isinstance(batch, dict) else None
    if mask is None:
        mask = tokens != config.pad_token_id
    elif jnp.shape(mask) != tokens.shape:
        raise ValueError(f"`mask` must have the shape of `tokens` "
                         f"{tuple(tokens.shape)}, got {jnp.shape(mask)}.")
    return tokens, jnp.asarray(mask).astype(jnp.float32)


def mix_predictions(inputs, predictions, mask, sampling_probability, key):
    """Scheduled-sampling inputs: ``predictions`` replace ``inputs`` at
    random positions.

    ``predictions[:, j]`` is the model's guess for ``inputs[:, j + 1]``.
    Position ``j + 1`` takes it with probability ``sampling_probability``
    where ``mask[:, j + 1]`` is set (zero marks padding); position 0 is
    never replaced.

    Returns:
      ``(mixed inputs [B, L], replaced [B, L] bool)``.
    """
    shifted = jnp.concatenate([inputs[:, :1], predictions[:, :-1]], axis=1)
    coin = jax.random.bernoulli(key, sampling_probability, inputs.shape)
    first = jnp.arange(inputs.shape[1]) == 0
    replace = coin & (mask > 0) & ~first
    return jnp.where(replace, shifted.astype(inputs.dtype), inputs), replace


def loss(params, batch, config: AutoregressiveConfig, key: jax.Array):
    """Next-token loss (teacher forcing or scheduled sampling).

    ``batch["sampling_probability"]`` (a scalar), when present, overrides
    ``config.scheduled_sampling`` (:func:`update` sets it from the
    schedule).

    Returns:
      ``(loss, metrics)``; metrics: ``loss, nll, perplexity, accuracy,
      num_tokens, sampling_probability`` (token means over valid targets;
      with scheduled sampling they are those of the mixed-input pass).
    """
    apply = _require_apply(config)
    tokens, mask = _split_batch(batch, config)
    inputs, targets, target_mask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    prob = jnp.asarray(0.0, jnp.float32)
    if config.uses_scheduled_sampling:
        prob = jnp.asarray(batch.get("sampling_probability",
                                     config.scheduled_sampling)
                           if isinstance(batch, dict)
                           else config.scheduled_sampling, jnp.float32)
        k_pred, k_mix = jax.random.split(key)

        def mixed(inputs):
            first = lax.stop_gradient(logits_of(apply, params, inputs))
            preds = jax.random.categorical(k_pred, first, axis=-1)
            return mix_predictions(inputs, preds, mask[:, :-1], prob,
                                   k_mix)[0]

        # A real branch under jit: p == 0 costs no first pass.
        inputs = lax.cond(prob > 0, mixed, lambda x: x, inputs)
    logits = logits_of(apply, params, inputs)
    total, nll = cross_entropy(logits, targets, target_mask,
                               label_smoothing=config.label_smoothing)
    count = jnp.maximum(jnp.sum(target_mask), 1.0)
    mean_nll = lax.stop_gradient(jnp.sum(nll * target_mask) / count)
    correct = (jnp.argmax(logits, axis=-1) == targets) * target_mask
    metrics = dict(loss=total, nll=mean_nll, perplexity=jnp.exp(mean_nll),
                   accuracy=jnp.sum(correct) / count,
                   num_tokens=jnp.sum(target_mask),
                   sampling_probability=prob)
    return total, metrics


def init(params, config: AutoregressiveConfig, *,
         key=None) -> TrainState:
    """Initial :class:`~artifex_fn.TrainState` (validates the optimizer)."""
    _require_apply(config)
    return init_state(params, config, key=key)


def update(state: TrainState, batch):
    """One gradient step; scheduled-sampling ``p`` follows ``state.step``."""
    if state.config.uses_scheduled_sampling:
        batch = dict(batch if isinstance(batch, dict) else dict(tokens=batch),
                     sampling_probability=scheduled_sampling_probability(
                         state.config, state.step))
    return keyed_gradient_step(state, loss, batch)
