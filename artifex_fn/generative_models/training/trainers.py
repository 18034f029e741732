"""Documented trainers module: re-exports :mod:`artifex_fn.training.trainers`."""

from artifex_fn.training.trainers import *  # noqa: F401,F403
from artifex_fn.training.trainers import __all__  # noqa: F401
