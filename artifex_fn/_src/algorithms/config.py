"""Configs as pytrees, and their hyper-parameter ranges.

Configs are frozen dataclasses registered as pytrees: numeric
hyper-parameters are leaves (so ``jax.vmap`` over a stack of configs, e.g.
different ``clip_param`` values, compiles once), while callables, strings
and shape-changing integers are static metadata.

A config declares the ranges of its numeric fields in ``BOUNDS``
(field name to :class:`Bound`). Concrete values are checked when the config
is built (:func:`check_bounds`); a config rebuilt inside ``jax.jit`` or
``jax.vmap`` carries tracers, which cannot raise, so the updates check them
again (:func:`bounds_ok`) and return NaN for an out-of-range value
(:func:`nan_unless_valid`). Every range check is
:func:`artifex_fn._src.checks.check_hparam`.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from artifex_fn._src import checks


def pytree_config(static: tuple[str, ...]):
    """Class decorator: frozen dataclass, pytree with ``static`` as metadata.

    Every field not named in ``static`` is a pytree leaf.

    Examples:
      >>> import jax
      >>> @pytree_config(static=("name",))
      ... class C:
      ...     rate: float = 0.1
      ...     name: str = "c"
      >>> jax.tree_util.tree_leaves(C())
      [0.1]
    """

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
        checks.check_hparam(getattr(config, name), name, lo=b.lo, hi=b.hi,
                            lo_open=b.lo_open, hi_open=b.hi_open,
                            optional=b.optional)


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
