"""RL pieces of the documented training entry point."""

from artifex_fn.generative_models.training.rl import utils

__all__ = ("utils",)
