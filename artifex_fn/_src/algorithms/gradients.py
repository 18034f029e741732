"""Gradient steps: the optimiser step, keyed steps, gradients
accumulated over micro-batches, and epochs of shuffled minibatches.

Every step clips the gradient by its global norm when the config has a
``max_grad_norm`` and reports ``grad_norm``, the norm before clipping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from artifex_fn._src.algorithms.batching import micro_batches
from artifex_fn._src.algorithms.batching import shuffle_indices
from artifex_fn._src.algorithms.state import TrainState


def optimizer_step(params, opt_state, grads, optimizer, max_grad_norm=None):
    """One optimiser step with optional global-norm clipping.

    Returns ``(params, opt_state, grad_norm)`` where ``grad_norm`` is the
    norm before clipping.
    """
    grad_norm = optax.tree.norm(grads)
    if max_grad_norm is not None:
        grads, _ = optax.clip_by_global_norm(max_grad_norm).update(
            grads, optax.EmptyState())
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grad_norm


def _apply_gradients(state: TrainState, grads, metrics, **replace):
    """Optimiser step from ``grads``; adds ``grad_norm`` (before clipping)."""
    config = state.config
    params, opt_state, grad_norm = optimizer_step(
        state.params, state.opt_state, grads, config.optimizer,
        getattr(config, "max_grad_norm", None))
    metrics = dict(metrics, grad_norm=grad_norm)
    return state.replace(params=params, opt_state=opt_state,
                         step=state.step + 1, **replace), metrics


def keyed_gradient_step(state: TrainState, loss_fn, batch):
    """One optimiser step on a loss that needs randomness.

    Calls ``loss_fn(params, batch, config, key)`` with a fresh subkey of
    ``state.key`` and advances the key. Returns ``(state, metrics)`` with
    the loss's metrics plus ``grad_norm`` (before clipping by
    ``config.max_grad_norm``).
    """
    key, sub = jax.random.split(state.key)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch,
                                                      state.config, sub)
    return _apply_gradients(state, grads, metrics, key=key)


def accumulated_gradient_step(state: TrainState, loss_fn, rows, *args):
    """One optimiser step on a row-additive ``loss_fn(params, rows, config,
    *args)``, accumulated over ``config.num_micro_batches`` micro-batches
    (see :func:`accumulated_grad`). Returns ``(state, metrics)`` with
    ``grad_norm`` added (before clipping).
    """
    config = state.config
    grads, metrics = accumulated_grad(loss_fn, state.params, rows,
                                      config.num_micro_batches, config, *args)
    return _apply_gradients(state, grads, metrics)


def accumulated_grad(loss_fn, params, rows, num_micro_batches: int, *args,
                     what: str = "batch"):
    """``(grads, metrics)`` of a row-additive loss, over micro-batches.

    ``loss_fn(params, rows, *args) -> (loss, metrics)`` must be *additive
    over rows*: for disjoint row sets its values, metrics and gradients add
    up to those of their union. The algorithms get there by normalising
    with denominators of the whole batch (``args``), computed once before
    the split (the (sum, count) form). Then the sum over ``k``
    micro-batches of ``n / k`` rows, accumulated in a ``lax.scan`` so that
    only one micro-batch's activations are alive at a time, is the
    full-batch gradient up to floating-point summation order.
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if num_micro_batches == 1:
        return grad_fn(params, rows, *args)
    split = micro_batches(rows, num_micro_batches, what=what)
    first = jax.tree_util.tree_map(lambda x: x[0], split)
    zeros = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(grad_fn, params, first, *args))

    def add(total, micro_batch):
        out = grad_fn(params, micro_batch, *args)
        return jax.tree_util.tree_map(jnp.add, total, out), None

    total, _ = lax.scan(add, zeros, split)
    return total


def minibatch_epochs(state: TrainState, loss_fn, rows, prepare_minibatch, *,
                     size_name: str = "B"):
    """``config.num_epochs`` passes over ``rows``, each in
    ``config.num_minibatches`` shuffled minibatches, one optimiser step
    per minibatch (its gradient accumulated over ``num_micro_batches``
    micro-batches), all in one ``lax.scan``: the PPO phase, also GRPO's
    several updates per generation.

    ``prepare_minibatch(minibatch) -> (minibatch, totals)`` computes the
    minibatch's statistics and denominators before any split;
    ``loss_fn(params, rows, config, totals)`` is row-additive (see
    :func:`accumulated_grad`). With one minibatch every epoch sees the
    whole batch unshuffled. ``size_name`` names the rows in errors.

    Returns ``(params, opt_state, key, metrics)``: the metrics are means
    over the steps, with ``grad_norm`` (before clipping).
    """
    config = state.config
    n = jax.tree_util.tree_leaves(rows)[0].shape[0]
    k = config.num_minibatches
    if n % k:
        raise ValueError(f"`num_minibatches`={k} must divide the number of "
                         f"rows {size_name}={n}.")
    if (n // k) % config.num_micro_batches:
        raise ValueError(
            f"`num_micro_batches`={config.num_micro_batches} must divide the "
            f"minibatch size {size_name}/num_minibatches={n // k}.")
    key, *epoch_keys = jax.random.split(state.key, config.num_epochs + 1)

    def minibatch_step(carry, minibatch):
        params, opt_state = carry
        minibatch, totals = prepare_minibatch(minibatch)
        grads, metrics = accumulated_grad(
            loss_fn, params, minibatch, config.num_micro_batches, config,
            totals, what="minibatch")
        params, opt_state, grad_norm = optimizer_step(
            params, opt_state, grads, config.optimizer,
            getattr(config, "max_grad_norm", None))
        return (params, opt_state), dict(metrics, grad_norm=grad_norm)

    def epoch(carry, epoch_key):
        if k == 1:
            minibatches = jax.tree_util.tree_map(lambda x: x[None], rows)
        else:
            perm = shuffle_indices(epoch_key, n)
            minibatches = jax.tree_util.tree_map(
                lambda x: jnp.reshape(x[perm], (k, n // k) + x.shape[1:]),
                rows)
        return lax.scan(minibatch_step, carry, minibatches)

    (params, opt_state), metrics = lax.scan(
        epoch, (state.params, state.opt_state), jnp.stack(epoch_keys))
    return params, opt_state, key, jax.tree_util.tree_map(jnp.mean, metrics)
