"""Documented training entry point: ``artifex_fn.generative_models.training``.

Exports every name of the guide's API reference (configs, trainers, reward
functions) plus the callbacks, the same objects as :mod:`artifex_fn.training`.
``rl.utils`` holds the documented RL utility functions and ``callbacks`` the
documented callbacks module.
"""

from artifex_fn.generative_models.training import callbacks
from artifex_fn.generative_models.training import rl
from artifex_fn.generative_models.training import trainers
from artifex_fn.training import *  # noqa: F401,F403
from artifex_fn.training import __all__ as _names

__all__ = tuple(n for n in _names if n not in ("callbacks", "trainers")) + (
    "callbacks", "rl", "trainers")
