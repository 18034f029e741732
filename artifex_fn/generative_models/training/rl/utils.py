"""The documented RL utility functions, as thin wrappers over the math layer.

These keep the signatures of the guide (``compute_discounted_returns(rewards,
gamma=0.99)``, ``compute_gae_advantages(rewards, values, dones, gamma,
gae_lambda)`` with ``values`` holding ``V(s_0..s_T)``, ...). The reducing
ones (entropy, KL, surrogate loss) return the batch mean, as documented; the
flat ``artifex_fn`` functions they wrap return unreduced values and accept
masks, truncation flags and a choice of time axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from artifex_fn import clipped_surrogate_loss
from artifex_fn import discounted_returns
from artifex_fn import entropy_from_log_probs
from artifex_fn import gae_advantages
from artifex_fn import kl_from_log_probs
from artifex_fn import normalize_advantages

__all__ = (
    "compute_clipped_surrogate_loss",
    "compute_discounted_returns",
    "compute_gae_advantages",
    "compute_kl_divergence",
    "compute_policy_entropy",
    "normalize_advantages",
)


def compute_discounted_returns(rewards: jax.Array, gamma: float = 0.99,
                               dones: jax.Array | None = None) -> jax.Array:
    r"""Discounted returns :math:`G_t = \sum_{k \ge t} \gamma^{k-t} r_k`.

    Args:
      rewards: ``[..., T]`` rewards, time on the last axis.
      gamma: discount factor in ``[0, 1]``.
      dones: optional ``[..., T]`` termination flags (no bootstrap past a
        done step).

    Returns:
      ``[..., T]`` returns. See :func:`artifex_fn.discounted_returns`.

    Examples:
      >>> import jax.numpy as jnp
      >>> compute_discounted_returns(jnp.array([1.0, 1.0]), gamma=0.5)
      Array([1.5, 1. ], dtype=float32)
    """
    return discounted_returns(rewards, gamma=gamma, terminated=dones)


def compute_gae_advantages(rewards: jax.Array, values: jax.Array,
                           dones: jax.Array | None = None,
                           gamma: float = 0.99,
                           gae_lambda: float = 0.95) -> jax.Array:
    r"""GAE advantages (Schulman et al. 2016).

    :math:`A_t = \sum_l (\gamma\lambda)^l \delta_{t+l}`, with
    :math:`\delta_t = r_t + \gamma (1 - d_t) V(s_{t+1}) - V(s_t)`.

    Args:
      rewards: ``[..., T]`` rewards.
      values: ``[..., T + 1]`` values ``V(s_0..s_T)`` (the last one is the
        bootstrap value).
      dones: optional ``[..., T]`` termination flags.
      gamma: discount factor.
      gae_lambda: GAE lambda.

    Returns:
      ``[..., T]`` advantages. See :func:`artifex_fn.gae_advantages`.

    Examples:
      >>> import jax.numpy as jnp
      >>> compute_gae_advantages(jnp.array([1.0]), jnp.array([0.0, 1.0]),
      ...                        jnp.array([1.0]))
      Array([1.], dtype=float32)
    """
    rewards = jnp.asarray(rewards)
    values = jnp.asarray(values)
    if values.shape[-1:] != (rewards.shape[-1] + 1,):
        raise ValueError(
            "`values` must hold V(s_0..s_T): shape "
            f"{rewards.shape[:-1] + (rewards.shape[-1] + 1,)}, got "
            f"{tuple(values.shape)}.")
    return gae_advantages(rewards, values, gamma=gamma, lambda_=gae_lambda,
                          terminated=dones)


def compute_policy_entropy(log_probs: jax.Array) -> jax.Array:
    r"""Mean entropy :math:`H = -\sum_a p(a)\log p(a)` over the batch.

    Args:
      log_probs: ``[..., A]`` normalised log-probabilities.

    Returns:
      Scalar mean entropy.

    Examples:
      >>> import jax.numpy as jnp
      >>> compute_policy_entropy(jnp.log(jnp.full((3, 2), 0.5)))
      Array(0.6931472, dtype=float32)
    """
    return jnp.mean(entropy_from_log_probs(log_probs))


def compute_kl_divergence(policy_log_probs: jax.Array,
                          ref_log_probs: jax.Array) -> jax.Array:
    r"""Mean exact :math:`\mathrm{KL}(\pi \| \pi_{ref})` over the batch.

    Args:
      policy_log_probs: ``[..., A]`` normalised log-probs of the policy.
      ref_log_probs: ``[..., A]`` normalised log-probs of the reference.

    Returns:
      Scalar mean KL divergence.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = jnp.log(jnp.array([[0.5, 0.5]]))
      >>> compute_kl_divergence(p, p)
      Array(0., dtype=float32)
    """
    return jnp.mean(kl_from_log_probs(policy_log_probs, ref_log_probs))


def compute_clipped_surrogate_loss(log_probs: jax.Array,
                                   old_log_probs: jax.Array,
                                   advantages: jax.Array,
                                   clip_param: float = 0.2) -> jax.Array:
    r"""Mean PPO clipped surrogate loss (Schulman et al. 2017).

    :math:`-\mathbb{E}[\min(rA, \mathrm{clip}(r, 1-\epsilon, 1+\epsilon)A)]`.

    Args:
      log_probs: current log-probabilities of the taken actions.
      old_log_probs: log-probabilities under the behaviour policy.
      advantages: advantage estimates, same shape.
      clip_param: clip range ``epsilon``.

    Returns:
      Scalar loss (to minimise).

    Examples:
      >>> import jax.numpy as jnp
      >>> compute_clipped_surrogate_loss(jnp.zeros(2), jnp.zeros(2),
      ...                                jnp.array([1.0, 3.0]))
      Array(-2., dtype=float32)
    """
    return jnp.mean(clipped_surrogate_loss(
        log_probs, old_log_probs, advantages, clip_param=clip_param))
