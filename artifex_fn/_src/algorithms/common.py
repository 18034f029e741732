"""Shared pieces of the algorithm layer: configs as pytrees, the training
state, policy outputs as distributions, and the optimiser step.

Configs are frozen dataclasses registered as pytrees: numeric
hyper-parameters are leaves (so ``jax.vmap`` over a stack of configs, e.g.
different ``clip_param`` values, compiles once), while callables, strings
and shape-changing integers are static metadata.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import warnings

import chex

with warnings.catch_warnings():
    # TensorFlow Probability (under distrax) touches a deprecated JAX alias
    # at import; silence that one message only.
    warnings.filterwarnings(
        "ignore", message="jax.core.pytype_aval_mappings is deprecated",
        category=DeprecationWarning)
    import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from artifex_fn._src import checks



def pytree_config(static: tuple[str, ...]):
    """Class decorator: frozen dataclass, pytree with ``static`` as metadata."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(static) - set(names)
        if unknown:  # pragma: no cover - programming error
            raise TypeError(f"unknown static fields {unknown}")
        jax.tree_util.register_dataclass(
            cls, data_fields=[n for n in names if n not in static],
            meta_fields=[n for n in names if n in static])
        return cls

    return wrap


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Bound:
    """The valid range of a numeric config field (see :func:`check_bounds`).

    Attributes:
      lo, hi: the bounds; ``lo_open`` / ``hi_open`` exclude them.
      optional: None is allowed (the feature is off).
    """
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    optional: bool = False


def check_bounds(config) -> None:
    """Checks every field named in ``type(config).BOUNDS`` (``ValueError``
    naming the field and its range). Concrete values are checked here, at
    construction; traced ones by :func:`bounds_ok` inside the step."""
    for name, b in type(config).BOUNDS.items():
        check_range(name, getattr(config, name), b.lo, b.hi,
                    lo_open=b.lo_open, hi_open=b.hi_open, optional=b.optional)


def bounds_ok(config):
    """A traced flag, False when a traced field of ``config`` is out of its
    ``BOUNDS`` (None when every field is concrete: checked at construction).

    A config rebuilt inside ``jax.jit`` or ``jax.vmap`` (e.g. a ``vmap``
    over ``clip_param`` values) carries tracers that cannot raise; the
    algorithms then return NaN parameters and metrics for such a value,
    never a clipped or otherwise plausible result.
    """
    oks = []
    for name, b in type(config).BOUNDS.items():
        value = getattr(config, name)
        if value is not None and checks._is_traced(value):
            oks.append(checks.check_hparam(
                value, name, lo=b.lo, hi=b.hi, lo_open=b.lo_open,
                hi_open=b.hi_open))
    return checks.all_ok(*oks)


def nan_unless_valid(config, state, metrics):
    """``(state, metrics)`` with NaN parameters and metrics when a traced
    hyper-parameter of ``config`` is out of range (see :func:`bounds_ok`)."""
    ok = bounds_ok(config)
    if ok is None:
        return state, metrics
    return (state.replace(params=checks.nan_unless(ok, state.params)),
            checks.nan_unless(ok, metrics))


def check_range(name: str, value, lo=-math.inf, hi=math.inf, *,
                lo_open=False, hi_open=False, optional=False) -> None:
    """Validates a hyper-parameter: a Python number or a concrete array.

    Traced values (configs are rebuilt with those inside transformations)
    are left to :func:`bounds_ok`.
    """
    if value is None:
        if optional:
            return
        raise ValueError(f"`{name}` must be a number, got None.")
    if isinstance(value, (bool, str)):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    if not _is_number(value):
        # Concrete arrays are checked; tracers, and the placeholders that
        # tree utilities unflatten configs with (ShapeDtypeStruct, None
        # sentinels), are not.
        if isinstance(value, (np.ndarray, np.generic)) or (
                isinstance(value, jax.Array)
                and not checks._is_traced(value)):
            checks.check_hparam(np.asarray(value, np.float64), name, lo=lo,
                                hi=hi, lo_open=lo_open, hi_open=hi_open)
        return
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    bad_lo = value <= lo if lo_open else value < lo
    bad_hi = value >= hi if hi_open else value > hi
    if bad_lo or bad_hi or math.isnan(value):
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(
            f"`{name}` must be in {left}{lo}, {hi}{right}, got {value!r}.")


def check_int(name: str, value, minimum: int) -> None:
    """Validates a static integer field."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


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
    """Builds the initial :class:`TrainState` for any algorithm config."""
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


def require_policy(config) -> Callable:
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
    """Sums trailing event axes of per-dimension log-probs/entropies."""
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


def shuffle_indices(key, n: int) -> jax.Array:
    """A uniformly random permutation of ``range(n)`` (``int32[n]``).

    The same distribution as ``jax.random.permutation(key, n)`` at a
    fraction of its cost on CPU, where XLA's sort of a (key, value) pair is
    slow: each round sorts one ``uint32`` array whose high bits are random
    and whose low ``b = ceil(log2 n)`` bits hold the current position, so
    ties in the random bits fall back to the previous round's (random)
    order. The order is biased only if some pair ties in every round, a
    chance below ``C(n, 2) * 2**(-rounds * (32 - b))``; the number of
    rounds keeps it under ``2**-20`` (2 rounds for ``n <= 2**10``). Falls
    back to ``jax.random.permutation`` above ``2**20`` rows.

    >>> import jax
    >>> p = shuffle_indices(jax.random.PRNGKey(0), 6)
    >>> sorted(p.tolist())
    [0, 1, 2, 3, 4, 5]
    """
    if n <= 1:
        return jnp.zeros((n,), jnp.int32)
    b = max(1, math.ceil(math.log2(n)))
    if b > 20:
        return jax.random.permutation(key, n).astype(jnp.int32)
    pairs = math.log2(n * (n - 1) / 2)
    rounds = max(1, math.ceil((pairs + 20) / (32 - b)))
    low = jnp.uint32((1 << b) - 1)
    order = None
    for round_key in jax.random.split(key, rounds):
        bits = jax.random.bits(round_key, (n,), jnp.uint32)
        packed = (bits & ~low) | jnp.arange(n, dtype=jnp.uint32)
        position = (lax.sort(packed) & low).astype(jnp.int32)
        order = position if order is None else order[position]
    return order


EXTRAS = "extras"


def check_batch(batch, *, required, optional, what: str) -> None:
    """Checks that ``batch`` is a dict with the ``required`` keys and no key
    outside ``required``, ``optional`` and ``"extras"``.

    A misspelt key (``"ref_logprobs"``) would otherwise be ignored and its
    term silently dropped. ``batch["extras"]`` may hold anything: the
    algorithms never read it.
    """
    if not isinstance(batch, dict):
        raise TypeError(f"the {what} batch must be a dict of arrays, got "
                        f"{type(batch).__name__}.")
    missing = [k for k in required if k not in batch]
    unknown = sorted(map(str, set(batch) - set(required) - set(optional)
                         - {EXTRAS}))
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing {missing}")
        if unknown:
            problems.append(f"unknown keys {unknown}")
        raise ValueError(
            f"the {what} batch has {' and '.join(problems)}; expected "
            f"keys: {list(required)} and optionally {list(optional)} (put "
            f"other data under '{EXTRAS}', which is never read).")


def check_leading(tree, lead: tuple[int, ...], name: str, what: str) -> None:
    """Checks that every array of ``tree`` starts with the axes ``lead``."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = tuple(jnp.shape(leaf))
        if shape[:len(lead)] != tuple(lead):
            where = name + jax.tree_util.keystr(path)
            raise ValueError(
                f"`{where}` has shape {shape}; its leading axes must be "
                f"{tuple(lead)} ({what}).")


def check_shape_of(x, name: str, shape: tuple[int, ...], what: str,
                   broadcast: bool = False):
    """``x`` as an array, checked to have ``shape`` (or, with
    ``broadcast``, to broadcast to it); the error names ``name``."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if broadcast:
        checks.check_broadcastable(x, shape, name)
    elif tuple(x.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)} ({what}), "
                         f"got {tuple(x.shape)}.")
    return x


def batch_array(batch, key: str, *, required=True):
    if key not in batch:
        if required:
            raise ValueError(f"batch is missing the key '{key}'.")
        return None
    return batch[key]


def masked_mean_std(x, mask=None):
    """Mean and population std of ``x`` over entries where ``mask`` is set
    (padded entries may hold anything)."""
    x = jnp.asarray(x, jnp.float32)
    valid = (jnp.ones(x.shape, bool) if mask is None else
             jnp.broadcast_to(jnp.asarray(mask), x.shape) > 0)
    x = jnp.where(valid, x, 0.0)
    n = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
    mean = jnp.sum(x) / n
    var = jnp.sum(jnp.where(valid, (x - mean) ** 2, 0.0)) / n
    return mean, jnp.sqrt(var)


def clean_padding(tree, mask):
    """Every leaf of ``tree`` whose leading axes have the shape of ``mask``,
    with its padded entries (``mask == 0``) replaced by zero (False for
    booleans).

    Observations and actions of padded steps or tokens may hold anything;
    replacing them before the policy sees them keeps a NaN there out of
    the policy's outputs and so out of the gradient (a NaN input row gives
    a NaN weight gradient even when its loss is masked). Leaves of other
    shapes pass unchanged.
    """
    if mask is None:
        return tree
    valid = jnp.asarray(mask) > 0
    lead = valid.shape

    def clean(x):
        if not hasattr(x, "shape") or tuple(jnp.shape(x)[:len(lead)]) != lead:
            return x
        x = jnp.asarray(x)
        v = valid.reshape(lead + (1,) * (x.ndim - len(lead)))
        fill = False if x.dtype == bool else 0
        return jnp.where(v, x, jnp.asarray(fill, x.dtype))

    return jax.tree_util.tree_map(clean, tree)




def check_micro_batches(name: str, value) -> None:
    check_int(name, value, 1)


def micro_batches(rows, num_micro_batches: int, *, what: str = "batch"):
    """Splits every leaf's leading axis into ``[k, n // k, ...]``.

    Row ``i`` goes to micro-batch ``i % k`` (strided, not contiguous): when
    the rows are sharded over devices in contiguous blocks, every
    micro-batch keeps the same share on every device, so splitting moves no
    data between devices.
    """
    k = num_micro_batches
    leaves = jax.tree_util.tree_leaves(rows)
    sizes = {jnp.shape(x)[0] for x in leaves if jnp.ndim(x) > 0}
    if len(sizes) != 1:
        raise ValueError(
            f"every array of the {what} must share its leading (sample) "
            f"axis; got leading sizes {sorted(sizes)}.")
    n = sizes.pop()
    if n % k:
        raise ValueError(
            f"`num_micro_batches`={k} must divide the {what} size {n}.")
    return jax.tree_util.tree_map(
        lambda x: jnp.swapaxes(
            jnp.reshape(x, (n // k, k) + jnp.shape(x)[1:]), 0, 1), rows)


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
