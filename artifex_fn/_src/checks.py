"""Argument checks shared by the math layer.

Every check runs at trace time on static shapes and raises ``ValueError``
naming the argument and the expected shape, so a bad call fails before
anything is compiled.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_min_rank(x: jax.Array, rank: int, name: str) -> None:
    """Raises unless ``x`` has at least ``rank`` dimensions."""
    if x.ndim < rank:
        raise ValueError(
            f"`{name}` must have rank >= {rank}, got shape {tuple(x.shape)}.")


def check_same_shape(x: jax.Array, name: str, ref: jax.Array,
                     ref_name: str) -> None:
    """Raises unless ``x`` has exactly the shape of ``ref``."""
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(
            f"`{name}` must have the shape of `{ref_name}` "
            f"{tuple(ref.shape)}, got {tuple(x.shape)}.")


def check_shape(x: jax.Array, expected: Sequence[int], name: str,
                what: str = "") -> None:
    """Raises unless ``x.shape == expected``; ``what`` explains the shape."""
    if tuple(x.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(
            f"`{name}` must have shape {tuple(expected)}{extra}, "
            f"got {tuple(x.shape)}.")


def check_broadcastable(x: jax.Array, shape: Sequence[int], name: str) -> None:
    """Raises unless ``x`` broadcasts to exactly ``shape``."""
    try:
        out = jnp.broadcast_shapes(tuple(x.shape), tuple(shape))
    except ValueError:
        out = None
    if out != tuple(shape):
        raise ValueError(
            f"`{name}` with shape {tuple(x.shape)} does not broadcast to "
            f"{tuple(shape)}.")


def check_choice(value, choices: Sequence, name: str) -> None:
    """Raises unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {list(choices)}, got {value!r}.")


def normalize_axis(axis: int, ndim: int, name: str) -> int:
    """Returns ``axis`` as a non-negative index, or raises naming ``name``."""
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"`{name}`={axis} is out of range for an array of rank {ndim}.")
    return axis % ndim


def float_dtypes(*arrays) -> tuple[jnp.dtype, jnp.dtype]:
    """Returns (result dtype, compute dtype) for floating-point maths.

    The result dtype is the inputs' promoted floating dtype (float32 for
    integer or boolean inputs). The compute dtype is at least float32: half
    precision inputs are computed in float32 and cast back, float64 stays
    float64.
    """
    # Python scalars (and weakly typed arrays) do not promote: a float
    # `bootstrap_value` keeps bfloat16 rewards bfloat16.
    given = [a for a in arrays if a is not None]
    out = jnp.result_type(*given) if given else jnp.dtype(jnp.float32)
    if not jnp.issubdtype(out, jnp.floating):
        out = jnp.dtype(jnp.float32)
    return jnp.dtype(out), jnp.dtype(jnp.promote_types(out, jnp.float32))


def valid_mask(mask, shape: Sequence[int], name: str = "mask"):
    """``mask`` broadcast to ``shape`` as booleans (``mask > 0``), or None.

    Raises naming ``name`` when ``mask`` does not broadcast to ``shape``.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    check_broadcastable(mask, shape, name)
    return jnp.broadcast_to(mask, tuple(shape)) > 0


def keep_valid(valid, x, fill=0):
    """``x`` where ``valid``, else ``fill``: padding replaced before maths.

    Selecting before the arithmetic (not after it) keeps NaN or inf held
    by padded entries out of the result *and* out of its gradient: the
    gradient of ``where`` sends nothing to the unselected branch, while
    ``0 * nan`` after the fact would still be NaN. The result keeps the
    dtype of ``x``. ``valid`` None returns ``x`` unchanged.
    """
    if valid is None:
        return x
    x = jnp.asarray(x)
    if x.ndim < valid.ndim:
        x = jnp.broadcast_to(x, valid.shape)
    while valid.ndim < x.ndim:
        valid = valid[..., None]
    return jnp.where(valid, x, jnp.asarray(fill, x.dtype))


def _is_traced(x) -> bool:
    return any(isinstance(leaf, jax.core.Tracer)
               for leaf in jax.tree_util.tree_leaves(x))


def _range_text(lo, hi, lo_open, hi_open) -> str:
    """``"in [0, 1]"``, ``"> 0"``, ``">= 1"`` and the like."""
    inf = float("inf")
    if hi == inf and lo == -inf:
        return "finite"
    if hi == inf:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if lo == -inf:
        return f"{'<' if hi_open else '<='} {hi:g}"
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    return f"in {left}{lo:g}, {hi:g}{right}"


def check_hparam(value, name: str, *, lo: float = -float("inf"),
                 hi: float = float("inf"), lo_open: bool = False,
                 hi_open: bool = False, optional: bool = False):
    """Validates a hyper-parameter: a finite number, or an array of them,
    in a range.

    A concrete value (Python number, NumPy or concrete JAX array) that is
    out of range, NaN or infinite raises ``ValueError`` naming ``name``
    and the range; so does a bool or a string, and None unless
    ``optional`` (None then means the feature is off). A traced value
    cannot be inspected: the returned boolean scalar is False when any
    element is out of range or not finite, and callers turn their result
    into NaN with :func:`nan_unless` (never a clipped or otherwise
    plausible number). Returns None for concrete (hence valid) values, and
    for the placeholders that tree utilities rebuild configs with
    (``ShapeDtypeStruct``, sentinel objects), which are not checked.

    Examples:
      >>> check_hparam(0.5, "gamma", lo=0.0, hi=1.0) is None
      True
      >>> check_hparam(1.5, "gamma", lo=0.0, hi=1.0)
      Traceback (most recent call last):
      ...
      ValueError: `gamma` must be in [0, 1], got 1.5.
    """
    if value is None:
        if optional:
            return None
        raise ValueError(f"`{name}` must be a number, got None.")
    if isinstance(value, (bool, np.bool_, str)):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    traced = _is_traced(value)
    if not traced and not isinstance(
            value, (int, float, np.ndarray, np.generic, jax.Array, list,
                    tuple)):
        return None
    x = jnp.asarray(value) if traced else np.asarray(value, np.float64)
    above = x > lo if lo_open else x >= lo
    below = x < hi if hi_open else x <= hi
    if traced:
        return jnp.all(above & below & jnp.isfinite(x))
    ok = above & below & np.isfinite(x)  # False for NaN and inf
    if not np.all(ok):
        bad = x[~ok].ravel()[0] if np.ndim(x) else x
        what = _range_text(lo, hi, lo_open, hi_open)
        if not np.isnan(bad) and np.isinf(bad) and what != "finite":
            what = f"finite and {what}"
        raise ValueError(f"`{name}` must be {what}, got {float(bad)!r}.")
    return None


def check_int(value, name: str, *, lo: int = 0) -> None:
    """Validates an integer argument (a static size, count or id): a Python
    or NumPy int (not a bool) ``>= lo``; else ``ValueError`` naming it.

    Examples:
      >>> check_int(3, "num_epochs", lo=1)
      >>> check_int(0, "num_epochs", lo=1)
      Traceback (most recent call last):
      ...
      ValueError: `num_epochs` must be an int >= 1, got 0.
    """
    if (not isinstance(value, (int, np.integer))
            or isinstance(value, (bool, np.bool_)) or value < lo):
        raise ValueError(f"`{name}` must be an int >= {lo}, got {value!r}.")


def all_ok(*oks):
    """The conjunction of :func:`check_hparam` results (None: all valid)."""
    oks = [ok for ok in oks if ok is not None]
    if not oks:
        return None
    out = oks[0]
    for ok in oks[1:]:
        out = out & ok
    return out


def nan_unless(ok, x):
    """``x`` where ``ok`` (a traced validity flag), NaN elsewhere.

    ``ok`` None (every hyper-parameter was concrete and valid) returns
    ``x`` unchanged. Integer results are returned unchanged.
    """
    if ok is None:
        return x

    def poison(a):
        a = jnp.asarray(a)
        if not jnp.issubdtype(a.dtype, jnp.inexact):
            return a
        return jnp.where(ok, a, jnp.asarray(jnp.nan, a.dtype))

    return jax.tree_util.tree_map(poison, x)
