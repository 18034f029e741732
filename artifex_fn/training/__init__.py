"""Trainer layer (layer 3): reward functions so far.

The NNX trainers and callbacks of the guide are not here yet; the reward
functions are usable on their own with any sampler.
"""

from artifex_fn.training.reward_functions import ClippedReward
from artifex_fn.training.reward_functions import CompositeReward
from artifex_fn.training.reward_functions import ConstantReward
from artifex_fn.training.reward_functions import RewardFunction
from artifex_fn.training.reward_functions import ScaledReward
from artifex_fn.training.reward_functions import ThresholdReward

__all__ = ("ClippedReward", "CompositeReward", "ConstantReward",
           "RewardFunction", "ScaledReward", "ThresholdReward")
