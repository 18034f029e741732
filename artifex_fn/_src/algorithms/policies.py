"""Policy outputs as distributions: log-probabilities and entropies.

A policy is ``(params, observations) -> distrax.Distribution`` or logits
(read as ``distrax.Categorical(logits)``). Per-dimension log-probs and
entropies (``[..., D]`` of a factorised continuous distribution) are summed
over their trailing event axes down to the rank of the batch.
"""

from __future__ import annotations

import warnings
from typing import Callable

import jax
import jax.numpy as jnp

with warnings.catch_warnings():
    # TensorFlow Probability (under distrax) touches a deprecated JAX alias
    # at import; silence that one message only.
    warnings.filterwarnings(
        "ignore", message="jax.core.pytype_aval_mappings is deprecated",
        category=DeprecationWarning)
    import distrax


def require_policy(config) -> Callable:
    """``config.policy``, or a ``ValueError`` saying what to pass."""
    if config.policy is None:
        raise ValueError(
            "`config.policy` is None: pass a function "
            "`(params, observations) -> distrax.Distribution` (or logits).")
    return config.policy


def as_distribution(out) -> distrax.Distribution:
    """Returns ``out`` if it is a distribution, else ``Categorical(logits)``."""
    if hasattr(out, "log_prob"):
        return out
    return distrax.Categorical(logits=jnp.asarray(out))


def _check_categorical_actions(dist, actions) -> None:
    """Actions of a categorical policy: ids with the logits' leading shape."""
    leaves = jax.tree_util.tree_leaves(actions)
    if len(leaves) != 1:
        return
    a = leaves[0]
    logits_shape = tuple(dist.logits.shape)
    continuous = jnp.issubdtype(jnp.result_type(a), jnp.floating)
    if tuple(jnp.shape(a)) != logits_shape[:-1] or continuous:
        hint = (" For continuous actions the policy must return a "
                "distribution, e.g. distrax.MultivariateNormalDiag(mean, "
                "scale) (a trainer's model: from a `policy_outputs("
                "observations)` method when `__call__` returns samples)."
                if continuous else "")
        raise ValueError(
            f"the policy returned an array of shape {logits_shape}, used as "
            f"the logits of a categorical distribution over "
            f"{logits_shape[-1]} choices, but the actions have shape "
            f"{tuple(jnp.shape(a))} and dtype {jnp.result_type(a)}: they "
            f"must be integer ids of shape {logits_shape[:-1]}.{hint}")


def reduce_to_rank(x: jax.Array, rank: int, name: str) -> jax.Array:
    """Sums trailing event axes of per-dimension log-probs/entropies.

    Examples:
      >>> import jax.numpy as jnp
      >>> reduce_to_rank(jnp.ones((2, 3, 4)), 1, "log_prob")
      Array([12., 12.], dtype=float32)
    """
    x = jnp.asarray(x)
    if x.ndim < rank:
        raise ValueError(
            f"the policy's {name} has shape {tuple(x.shape)}; expected at "
            f"least {rank} leading batch axes.")
    while x.ndim > rank:
        x = jnp.sum(x, axis=-1)
    return x


def log_prob_and_entropy(dist, actions, rank: int):
    """Log-probabilities of ``actions`` and entropies, with ``rank`` axes.

    Distributions without a closed-form entropy fall back to the
    single-sample estimate ``-log p(a)`` at the taken actions.
    """
    if isinstance(dist, distrax.Categorical):
        _check_categorical_actions(dist, actions)
    log_prob = reduce_to_rank(dist.log_prob(actions), rank, "log_prob")
    try:
        entropy = reduce_to_rank(dist.entropy(), rank, "entropy")
    except NotImplementedError:
        entropy = -log_prob
    return log_prob, entropy
