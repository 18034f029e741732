"""The training state shared by every algorithm and family.

Public as :class:`artifex_fn.TrainState`.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp


@chex.dataclass(frozen=True)
class TrainState:
    """State of an algorithm: everything ``update`` reads and writes.

    Attributes:
      params: policy parameters (any pytree).
      opt_state: state of ``config.optimizer``.
      step: number of updates applied (int32 scalar).
      key: PRNG key (``uint32[2]``) for minibatch shuffling and sampling.
      ref_params: optional frozen reference parameters (GRPO's KL term,
        DPO's reference log-probs); never updated.
      config: the algorithm's config (numeric fields are leaves).
    """
    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    ref_params: Any
    config: Any


def init_state(params, config, *, key=None, ref_params=None) -> TrainState:
    """Builds the initial :class:`TrainState` for any algorithm config.

    ``key`` (default ``PRNGKey(0)``) may be a raw ``uint32[2]`` key or a
    typed one (stored as its raw data).
    """
    if config.optimizer is None:
        raise ValueError(
            "`config.optimizer` is None: pass an optax GradientTransformation, "
            "e.g. `optimizer=optax.adam(3e-4)`.")
    if key is None:
        key = jax.random.PRNGKey(0)
    elif jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return TrainState(params=params, opt_state=config.optimizer.init(params),
                      step=jnp.zeros((), jnp.int32), key=jnp.asarray(key),
                      ref_params=ref_params, config=config)
