"""Documented training entry point: ``artifex_fn.generative_models.training``.

``rl.utils`` holds the documented RL utility functions.
"""

from artifex_fn.generative_models.training import rl

__all__ = ("rl",)
