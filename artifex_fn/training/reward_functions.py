"""Reward functions: the ``RewardFunction`` protocol and combinators.

A reward function maps a batch of generated ``samples`` (leading axis
``B``) and optional ``conditions`` to rewards of shape ``(B,)``. The
combinators here are frozen dataclasses registered as pytrees
(``flax.struct.dataclass``): numeric
fields (``value``, ``weights``, ``threshold``, ``scale``, bounds) are
leaves, so a combinator can be passed through ``jax.jit`` as an argument or
``jax.vmap``-ed over its numbers; wrapped reward functions are static.

Text rewards (:class:`TextReward`, :func:`format_reward`,
:func:`exact_answer_reward`) decode token ids with a tokenizer of
:mod:`artifex_fn.text` and score the strings in Python, on the host. They
take concrete arrays (a trainer calls them outside its compiled step, e.g.
``GRPOTrainer(..., jit_reward=False)``; :func:`is_host_reward` tells which
rewards need that), or, built with ``callback=True``, run inside
``jax.jit`` / ``jax.vmap`` through ``jax.pure_callback``. The combinators
wrap them like any other reward.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from artifex_fn import completion_lengths
from artifex_fn import overlong_penalty
from artifex_fn.text import decode_completions
from artifex_fn.text import decode_prompts


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

    The parts are named (``names``, or each function's name:
    :func:`reward_name`) and exposed by :meth:`parts`; the GRPO trainer
    logs each part's statistics (``rewards/<name>/mean``, ...), computed
    from the same calls as the sum.

    Examples:
      >>> import jax.numpy as jnp
      >>> r = CompositeReward(reward_fns=[ConstantReward(1.0),
      ...                                 ConstantReward(2.0)],
      ...                     weights=[0.3, 0.7], names=("a", "b"))
      >>> r(jnp.zeros((2, 4)))
      Array([1.7, 1.7], dtype=float32)
      >>> total, parts = r.parts(jnp.zeros((2, 4)))
      >>> sorted(parts), parts["b"]
      (['a', 'b'], Array([2., 2.], dtype=float32))
    """
    reward_fns: Sequence[Callable[..., jax.Array]] = struct.field(
        pytree_node=False)
    weights: Any = None
    names: tuple[str, ...] | None = struct.field(pytree_node=False,
                                                 default=None)

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
        names = self.names
        if names is None:
            names = _unique([reward_name(fn) for fn in fns])
        else:
            names = tuple(str(n) for n in names)
            if len(names) != len(fns) or len(set(names)) != len(names):
                raise ValueError(
                    f"`names` must give {len(fns)} distinct names, one per "
                    f"reward function; got {names}.")
        if "total" in names:
            raise ValueError("`names` may not use 'total' (the name of the "
                             "sum in the logged metrics).")
        object.__setattr__(self, "names", names)

    def parts(self, samples, conditions=None, **kwargs):
        """``(total [B], {name: part [B]})``: the weighted sum and the
        unweighted parts, each part called once."""
        weights = jnp.asarray(self.weights)
        if weights.shape != (len(self.reward_fns),):
            raise ValueError(
                f"`weights` must have shape ({len(self.reward_fns)},), got "
                f"{tuple(weights.shape)}.")
        rewards = [_call(fn, samples, conditions, kwargs)
                   for fn in self.reward_fns]
        total = sum(w * r for w, r in zip(weights, rewards))
        return total, dict(zip(self.names, rewards))

    def __call__(self, samples, conditions=None, **kwargs):
        return self.parts(samples, conditions, **kwargs)[0]


def reward_name(fn) -> str:
    """A reward function's name for logs: a :class:`TextReward`'s inner
    function name, a function's ``__name__``, else its class name
    (lambdas are named ``reward``)."""
    name = _name(fn.fn if isinstance(fn, TextReward) else fn)
    return "reward" if name == "<lambda>" else name


def _unique(names) -> tuple[str, ...]:
    """``names`` with repeats numbered (``exact``, ``exact_1``, ...)."""
    seen, out = {}, []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}_{k}")
    return tuple(out)


def reward_parts(reward_fn, samples, conditions=None):
    """``(total [B], {name: part [B]})`` of any reward function.

    A :class:`CompositeReward` (or anything with a ``parts`` method) gives
    its named parts; any other reward gives ``{}``. The total is what
    ``reward_fn(samples, conditions)`` returns.

    Examples:
      >>> import jax.numpy as jnp
      >>> total, parts = reward_parts(ConstantReward(2.0), jnp.zeros((3,)))
      >>> total, parts
      (Array([2., 2., 2.], dtype=float32), {})
    """
    parts = getattr(reward_fn, "parts", None)
    if callable(parts):
        total, named = parts(samples, conditions)
        return jnp.asarray(total), dict(named)
    return jnp.asarray(reward_fn(samples, conditions)), {}


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


@struct.dataclass
class OverlongPenalty:
    r"""DAPO's soft over-long punishment as a reward over completion ids.

    The length of a completion is its tokens up to and including the first
    stop token (all ``N`` without one:
    :func:`artifex_fn.completion_lengths`); the reward is
    :func:`artifex_fn.overlong_penalty` of it: 0 up to ``max_length -
    cache_length`` tokens, then falling linearly to -1 at ``max_length``.
    Add it to a task reward with :class:`CompositeReward` (weights 1, 1).

    Attributes:
      max_length: :math:`L_{max}` (usually the generation's
        ``max_new_tokens``).
      cache_length: :math:`L_{cache}`, the length of the ramp.
      eos_token_id, stop_token_ids: the ids that end a completion.

    Examples:
      >>> import jax.numpy as jnp
      >>> r = OverlongPenalty(max_length=4, cache_length=2, eos_token_id=0)
      >>> r(jnp.array([[5, 0, 0, 0], [5, 5, 0, 0], [5, 5, 5, 5]]))
      Array([ 0. , -0.5, -1. ], dtype=float32)
    """
    max_length: int = struct.field(pytree_node=False)
    cache_length: int = struct.field(pytree_node=False)
    eos_token_id: int | None = struct.field(pytree_node=False, default=None)
    stop_token_ids: tuple[int, ...] = struct.field(pytree_node=False,
                                                   default=())

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids",
                           tuple(int(i) for i in self.stop_token_ids))
        overlong_penalty(0, max_length=self.max_length,
                         cache_length=self.cache_length)  # checks the sizes

    def __call__(self, samples, conditions=None, **kwargs):
        lengths = completion_lengths(samples, eos_token_id=self.eos_token_id,
                                     stop_token_ids=self.stop_token_ids)
        return overlong_penalty(lengths, max_length=self.max_length,
                                cache_length=self.cache_length)


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _host_array(x, what: str, fn):
    """``x`` as a NumPy array; a clear error for traced values."""
    try:
        return None if x is None else np.asarray(x)
    except jax.errors.TracerArrayConversionError as e:
        raise TypeError(
            f"the text reward {_name(fn)} runs on the host but got traced "
            f"{what} (inside jax.jit or jax.vmap). Evaluate it on concrete "
            "arrays outside the compiled step (e.g. GRPOTrainer(..., "
            "jit_reward=False)), or build it with callback=True to call it "
            "through jax.pure_callback.") from e


@struct.dataclass
class TextReward:
    """A reward computed from decoded text by a Python function.

    ``samples [B, N]`` (completion ids) are decoded by
    :func:`artifex_fn.text.decode_completions` (cut at ``stop_token_ids``,
    special tokens skipped) and ``conditions [B, Lp]`` (left-padded prompt
    ids, padding found by ``tokenizer.pad_token_id``) by
    :func:`artifex_fn.text.decode_prompts`; then
    ``fn(completions, prompts)`` gives one number per row (``prompts`` is
    None without conditions). Extra keyword arguments are ignored.

    Attributes:
      fn: ``(completions: list[str], prompts: list[str] | None) -> B``
        numbers.
      tokenizer: a :class:`artifex_fn.text.Tokenizer`.
      stop_token_ids: optional ids ending a completion (default: the
        tokenizer's eos and ``"<|end|>"``).
      callback: False: runs on concrete arrays only (traced ones raise).
        True: runs through ``jax.pure_callback`` (sequentially under
        ``jax.vmap``), so it may be called inside ``jax.jit``.

    Returns (when called):
      ``[B]`` float32 rewards.

    Examples:
      >>> from artifex_fn.text import ByteTokenizer
      >>> tok = ByteTokenizer()
      >>> length = TextReward(lambda c, p: [len(s) for s in c], tok)
      >>> length([tok.encode("hey") + [2], tok.encode("yo!!")])
      Array([3., 4.], dtype=float32)
    """
    fn: Callable[[list, list | None], Any] = struct.field(pytree_node=False)
    tokenizer: Any = struct.field(pytree_node=False)
    stop_token_ids: tuple[int, ...] | None = struct.field(
        pytree_node=False, default=None)
    callback: bool = struct.field(pytree_node=False, default=False)

    def __post_init__(self):
        if not callable(self.fn):
            raise ValueError(f"`fn` must be callable, got {self.fn!r}.")
        stops = self.stop_token_ids
        if stops is not None:
            stops = tuple(int(i) for i in np.asarray(stops).reshape(-1))
            object.__setattr__(self, "stop_token_ids", stops)

    def _host(self, samples, conditions) -> np.ndarray:
        completions = decode_completions(self.tokenizer, samples,
                                         stop_token_ids=self.stop_token_ids)
        prompts = (None if conditions is None
                   else decode_prompts(self.tokenizer, conditions))
        out = self.fn(completions, prompts)
        try:
            rewards = np.asarray(out, np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"text reward {_name(self.fn)} must return "
                             f"numbers, got {out!r}.") from e
        if rewards.shape != (len(completions),):
            raise ValueError(
                f"text reward {_name(self.fn)} returned shape "
                f"{rewards.shape}; expected one number per completion, "
                f"({len(completions)},).")
        return rewards

    def __call__(self, samples, conditions=None, **kwargs):
        if self.callback:
            batch = _batch_size(samples)
            return jax.pure_callback(
                self._host, jax.ShapeDtypeStruct((batch,), jnp.float32),
                samples, conditions, vmap_method="sequential")
        return jnp.asarray(self._host(
            _host_array(samples, "samples", self.fn),
            _host_array(conditions, "conditions", self.fn)))


def is_host_reward(reward_fn) -> bool:
    r"""Whether ``reward_fn`` must be called on concrete arrays, outside
    ``jax.jit``: a :class:`TextReward` without ``callback``, or a
    combinator wrapping one (at any depth).

    Args:
      reward_fn: any reward function.

    Returns:
      A Python bool.

    Examples:
      >>> from artifex_fn.text import ByteTokenizer
      >>> text = format_reward(r"\d+", tokenizer=ByteTokenizer())
      >>> is_host_reward(ScaledReward(text, 2.0)), is_host_reward(
      ...     ConstantReward(1.0))
      (True, False)
    """
    if isinstance(reward_fn, TextReward):
        return not reward_fn.callback
    if isinstance(reward_fn, CompositeReward):
        return any(is_host_reward(fn) for fn in reward_fn.reward_fns)
    if isinstance(reward_fn, (ScaledReward, ThresholdReward, ClippedReward)):
        return is_host_reward(reward_fn.reward_fn)
    return False


def format_reward(pattern: str, *, tokenizer, callback: bool = False
                  ) -> TextReward:
    r"""1.0 where the whole completion (stripped) matches ``pattern``.

    Args:
      pattern: a regular expression, matched with ``re.fullmatch`` against
        the completion with surrounding whitespace stripped.
      tokenizer: a :class:`artifex_fn.text.Tokenizer`.
      callback: see :class:`TextReward`.

    Returns:
      A :class:`TextReward` giving 1.0 or 0.0 per completion.

    Examples:
      >>> from artifex_fn.text import ByteTokenizer
      >>> tok = ByteTokenizer()
      >>> r = format_reward(r"= -?\d+", tokenizer=tok)
      >>> r([tok.encode(" = 42"), tok.encode("= xyz")])
      Array([1., 0.], dtype=float32)
    """
    regex = re.compile(pattern)

    def matches_format(completions, prompts=None):
        del prompts
        return [float(regex.fullmatch(c.strip()) is not None)
                for c in completions]

    return TextReward(matches_format, tokenizer, callback=callback)


def exact_answer_reward(answer_fn: Callable[[str], Any], *, tokenizer,
                        extract: str = r"=\s*(-?\d+)",
                        callback: bool = False) -> TextReward:
    """1.0 where the answer found in the completion is the prompt's answer.

    The answer is the first group of ``re.search(extract, completion)``;
    it must equal ``str(answer_fn(prompt)).strip()`` (no match: 0.0).

    Args:
      answer_fn: ``prompt text -> expected answer``.
      tokenizer: a :class:`artifex_fn.text.Tokenizer`.
      extract: a regular expression with at least one group.
      callback: see :class:`TextReward`.

    Returns:
      A :class:`TextReward` giving 1.0 or 0.0 per completion; it needs the
      prompts (``conditions``).

    Examples:
      >>> from artifex_fn.text import ByteTokenizer, encode_prompts
      >>> tok = ByteTokenizer()
      >>> prompts, _ = encode_prompts(tok, ["2+3", "1+1"])
      >>> r = exact_answer_reward(lambda p: eval(p), tokenizer=tok)
      >>> r([tok.encode("= 5"), tok.encode("=3 ")], prompts)
      Array([1., 0.], dtype=float32)
    """
    regex = re.compile(extract)
    if regex.groups < 1:
        raise ValueError(f"`extract` needs a group for the answer, got "
                         f"{extract!r}.")

    def answer_is_exact(completions, prompts):
        if prompts is None:
            raise ValueError("exact_answer_reward needs the prompts: pass "
                             "them as `conditions`.")
        out = []
        for completion, prompt in zip(completions, prompts):
            found = regex.search(completion)
            out.append(float(found is not None and found.group(1).strip()
                             == str(answer_fn(prompt)).strip()))
        return out

    return TextReward(answer_is_exact, tokenizer, callback=callback)
