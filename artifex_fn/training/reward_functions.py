"""Reward functions: the ``RewardFunction`` protocol and combinators.

A reward function maps a batch of generated ``samples`` (leading axis
``B``) and optional ``conditions`` to rewards of shape ``(B,)``. The
combinators here are frozen dataclasses registered as pytrees
(``flax.struct.dataclass``): numeric
fields (``value``, ``weights``, ``threshold``, ``scale``, bounds) are
leaves, so a combinator can be passed through ``jax.jit`` as an argument or
``jax.vmap``-ed over its numbers; wrapped reward functions are static.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct


@runtime_checkable
class RewardFunction(Protocol):
    """Protocol for reward functions: ``(samples, conditions=None, **kw)``.

    Returns rewards of shape ``(batch_size,)``.
    """

    def __call__(self, samples: jax.Array,
                 conditions: jax.Array | None = None,
                 **kwargs: Any) -> jax.Array:
        ...


def _batch_size(samples) -> int:
    leaves = jax.tree_util.tree_leaves(samples)
    if not leaves or jnp.ndim(leaves[0]) == 0:
        raise ValueError("`samples` must have a leading batch axis.")
    return jnp.shape(leaves[0])[0]


def _call(fn, samples, conditions, kwargs) -> jax.Array:
    """Calls a wrapped reward and checks it returns ``(batch,)``."""
    out = jnp.asarray(fn(samples, conditions, **kwargs))
    batch = _batch_size(samples)
    if out.shape != (batch,):
        name = getattr(fn, "__name__", type(fn).__name__)
        raise ValueError(
            f"reward function {name} returned shape {tuple(out.shape)}; "
            f"expected (batch,) = ({batch},).")
    return out


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@struct.dataclass
class ConstantReward:
    """Returns ``value`` for every sample (useful for tests and baselines).

    Examples:
      >>> import jax.numpy as jnp
      >>> ConstantReward(value=1.0)(jnp.zeros((3, 2)))
      Array([1., 1., 1.], dtype=float32)
    """
    value: float = 1.0

    def __call__(self, samples, conditions=None, **kwargs):
        dtype = jnp.result_type(float)
        return jnp.full((_batch_size(samples),), self.value, dtype)


@struct.dataclass
class CompositeReward:
    r"""Weighted sum :math:`\sum_i w_i R_i(x)` of reward functions.

    Without ``weights`` the parts are averaged: equal weights ``1 / n``
    that sum to one (so adding a part does not scale the reward). Given
    weights are used as they are.

    Examples:
      >>> import jax.numpy as jnp
      >>> r = CompositeReward(reward_fns=[ConstantReward(1.0),
      ...                                 ConstantReward(2.0)],
      ...                     weights=[0.3, 0.7])
      >>> r(jnp.zeros((2, 4)))
      Array([1.7, 1.7], dtype=float32)
    """
    reward_fns: Sequence[Callable[..., jax.Array]] = struct.field(
        pytree_node=False)
    weights: Any = None

    def __post_init__(self):
        fns = self.reward_fns
        if not isinstance(fns, tuple):
            fns = tuple(fns)
            object.__setattr__(self, "reward_fns", fns)
        if not fns:
            raise ValueError("`reward_fns` must hold at least one function.")
        w = self.weights
        if w is None:
            object.__setattr__(self, "weights", (1.0 / len(fns),) * len(fns))
        elif isinstance(w, (list, tuple)):
            if len(w) != len(fns):
                raise ValueError(
                    f"`weights` has {len(w)} entries but `reward_fns` has "
                    f"{len(fns)}.")
            object.__setattr__(self, "weights", tuple(w))

    def __call__(self, samples, conditions=None, **kwargs):
        weights = jnp.asarray(self.weights)
        if weights.shape != (len(self.reward_fns),):
            raise ValueError(
                f"`weights` must have shape ({len(self.reward_fns)},), got "
                f"{tuple(weights.shape)}.")
        rewards = [_call(fn, samples, conditions, kwargs)
                   for fn in self.reward_fns]
        return sum(w * r for w, r in zip(weights, rewards))


@struct.dataclass
class ThresholdReward:
    """``above_value`` where the base reward is ``> threshold``, else
    ``below_value``.

    Examples:
      >>> import jax.numpy as jnp
      >>> base = lambda x, c=None: x
      >>> ThresholdReward(reward_fn=base, threshold=0.5)(jnp.array([0.2, 0.9]))
      Array([0., 1.], dtype=float32)
    """
    reward_fn: Callable[..., jax.Array] = struct.field(pytree_node=False)
    threshold: float = 0.5
    above_value: float = 1.0
    below_value: float = 0.0

    def __call__(self, samples, conditions=None, **kwargs):
        base = _call(self.reward_fn, samples, conditions, kwargs)
        dtype = jnp.result_type(base.dtype, float)
        return jnp.where(base > self.threshold,
                         jnp.asarray(self.above_value, dtype),
                         jnp.asarray(self.below_value, dtype))


@struct.dataclass
class ScaledReward:
    """``scale * reward_fn(samples)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> ScaledReward(reward_fn=ConstantReward(1.0), scale=10.0)(jnp.zeros(2))
      Array([10., 10.], dtype=float32)
    """
    reward_fn: Callable[..., jax.Array] = struct.field(pytree_node=False)
    scale: float = 1.0

    def __call__(self, samples, conditions=None, **kwargs):
        return self.scale * _call(self.reward_fn, samples, conditions, kwargs)


@struct.dataclass
class ClippedReward:
    """``clip(reward_fn(samples), min_value, max_value)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> base = lambda x, c=None: x
      >>> ClippedReward(reward_fn=base, min_value=-1.0, max_value=1.0)(
      ...     jnp.array([-3.0, 0.5, 2.0]))
      Array([-1. ,  0.5,  1. ], dtype=float32)
    """
    reward_fn: Callable[..., jax.Array] = struct.field(pytree_node=False)
    min_value: float = -1.0
    max_value: float = 1.0

    def __post_init__(self):
        lo, hi = self.min_value, self.max_value
        if _is_number(lo) and _is_number(hi) and lo > hi:
            raise ValueError(
                f"`min_value` ({lo}) must not exceed `max_value` ({hi}).")

    def __call__(self, samples, conditions=None, **kwargs):
        base = _call(self.reward_fn, samples, conditions, kwargs)
        return jnp.clip(base, self.min_value, self.max_value)
