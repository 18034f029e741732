"""Trainer layer (layer 3): NNX trainers, reward functions, callbacks.

The family trainers (VAE, GAN, diffusion, flow, energy, autoregressive)
wrap :mod:`artifex_fn.families`; the RL trainers wrap the pure algorithms of :mod:`artifex_fn.reinforce`,
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
from artifex_fn.training import trainers
from artifex_fn.training.trainers import AutoregressiveConfig
from artifex_fn.training.trainers import AutoregressiveTrainer
from artifex_fn.training.trainers import DiffusionConfig
from artifex_fn.training.trainers import DiffusionTrainer
from artifex_fn.training.trainers import EnergyConfig
from artifex_fn.training.trainers import EnergyTrainer
from artifex_fn.training.trainers import FlowConfig
from artifex_fn.training.trainers import FlowTrainer
from artifex_fn.training.trainers import GANConfig
from artifex_fn.training.trainers import GANTrainer
from artifex_fn.training.trainers import VAEConfig
from artifex_fn.training.trainers import VAETrainer

__all__ = (
    # configurations
    "REINFORCEConfig", "PPOConfig", "GRPOConfig", "DPOConfig",
    "GenerationConfig",
    # trainers
    "Trainer", "REINFORCETrainer", "PPOTrainer", "GRPOTrainer", "DPOTrainer",
    # reward functions
    "RewardFunction", "ConstantReward", "CompositeReward", "ThresholdReward",
    "ScaledReward", "ClippedReward",
    # family trainers and configs
    "VAEConfig", "VAETrainer", "GANConfig", "GANTrainer", "DiffusionConfig",
    "DiffusionTrainer", "FlowConfig", "FlowTrainer", "EnergyConfig",
    "EnergyTrainer", "AutoregressiveConfig", "AutoregressiveTrainer",
    "trainers",
    # callbacks
    "callbacks",
) + tuple(_callback_names)
