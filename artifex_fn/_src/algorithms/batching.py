"""Batches: key and shape checks, shuffling, micro-batches, padding.

Every algorithm batch is a dict with required and optional keys; any other
key is an error except ``"extras"``, which is never read. Arrays keep the
shapes the docstrings give (nothing is reshaped to fit, except masks and
flags, which broadcast). Padded entries (``mask == 0``) may hold anything
and are replaced before any arithmetic.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from artifex_fn._src import checks

EXTRAS = "extras"


def check_keys(batch, *, required, optional, what: str) -> None:
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
    else:
        checks.check_shape(x, shape, name, what)
    return x


def batch_array(batch, key: str):
    """``batch[key]``, or a ``ValueError`` naming the missing key."""
    if key not in batch:
        raise ValueError(f"batch is missing the key '{key}'.")
    return batch[key]


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
        return checks.keep_valid(valid, x, False if x.dtype == bool else 0)

    return jax.tree_util.tree_map(clean, tree)
