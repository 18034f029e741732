"""Argument validation shared by every layer.

``check_int`` (a static size, count or id) and ``check_hparam`` (a
hyper-parameter's range: raise when concrete, NaN result when traced), the
validators the math and the algorithms use, for the trainer layer, the
experiments and user code. See :mod:`artifex_fn._src.checks`.
"""

from artifex_fn._src.checks import check_hparam
from artifex_fn._src.checks import check_int

__all__ = ("check_hparam", "check_int")
