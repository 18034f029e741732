"""Documented training entry point: ``artifex_fn.generative_models.training``.

``rl.utils`` holds the documented RL utility functions; the reward
functions are re-exported from :mod:`artifex_fn.training`. The guide's
trainers and callbacks are not available yet.
"""

from artifex_fn.generative_models.training import rl
from artifex_fn.training import ClippedReward
from artifex_fn.training import CompositeReward
from artifex_fn.training import ConstantReward
from artifex_fn.training import RewardFunction
from artifex_fn.training import ScaledReward
from artifex_fn.training import ThresholdReward

__all__ = ("ClippedReward", "CompositeReward", "ConstantReward",
           "RewardFunction", "ScaledReward", "ThresholdReward", "rl")
