"""Documented callbacks module: re-exports :mod:`artifex_fn.training.callbacks`."""

from artifex_fn.training.callbacks import *  # noqa: F401,F403
from artifex_fn.training.callbacks import __all__  # noqa: F401
