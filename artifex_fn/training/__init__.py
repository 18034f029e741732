"""Trainer layer (layer 3): NNX trainers, reward functions, callbacks.

The trainers wrap the pure algorithms of :mod:`artifex_fn.reinforce`,
:mod:`artifex_fn.ppo`, :mod:`artifex_fn.grpo` and :mod:`artifex_fn.dpo`
around a Flax NNX model and ``nnx.Optimizer``. The same names are exported
from the documented entry point ``artifex_fn.generative_models.training``.
"""

from artifex_fn.training import callbacks
from artifex_fn.training.callbacks import *  # noqa: F401,F403
from artifex_fn.training.callbacks import __all__ as _callback_names
from artifex_fn.training.reward_functions import ClippedReward
from artifex_fn.training.reward_functions import CompositeReward
from artifex_fn.training.reward_functions import ConstantReward
from artifex_fn.training.reward_functions import RewardFunction
from artifex_fn.training.reward_functions import ScaledReward
from artifex_fn.training.reward_functions import ThresholdReward
from artifex_fn.training.rl_trainers import DPOConfig
from artifex_fn.training.rl_trainers import DPOTrainer
from artifex_fn.training.rl_trainers import GRPOConfig
from artifex_fn.training.rl_trainers import GRPOTrainer
from artifex_fn.training.rl_trainers import PPOConfig
from artifex_fn.training.rl_trainers import PPOTrainer
from artifex_fn.training.rl_trainers import REINFORCEConfig
from artifex_fn.training.rl_trainers import REINFORCETrainer
from artifex_fn.training.sampling import GenerationConfig
from artifex_fn.training.trainer import Trainer

__all__ = (
    # configurations
    "REINFORCEConfig", "PPOConfig", "GRPOConfig", "DPOConfig",
    "GenerationConfig",
    # trainers
    "Trainer", "REINFORCETrainer", "PPOTrainer", "GRPOTrainer", "DPOTrainer",
    # reward functions
    "RewardFunction", "ConstantReward", "CompositeReward", "ThresholdReward",
    "ScaledReward", "ClippedReward",
    # callbacks
    "callbacks",
) + tuple(_callback_names)
