"""Trainer layer (layer 3): NNX trainers, reward functions, callbacks.

The RL trainers wrap the pure algorithms of :mod:`artifex_fn.reinforce`,
:mod:`artifex_fn.ppo`, :mod:`artifex_fn.grpo`, :mod:`artifex_fn.dpo`,
:mod:`artifex_fn.kto` and :mod:`artifex_fn.orpo`,
the family trainers (VAE, GAN, diffusion, flow, energy, autoregressive)
those of :mod:`artifex_fn.families`, around a Flax NNX model and
``nnx.Optimizer``; their configs are the algorithms' and families' own
(``artifex_fn.ppo.PPOConfig``, ``artifex_fn.families.vae.VAEConfig``, ...).
Text rewards (:class:`TextReward`, :func:`format_reward`,
:func:`exact_answer_reward`) score decoded completions on the host;
:func:`is_host_reward` tells whether a reward must run outside the
compiled step (``GRPOTrainer(..., jit_reward=False)``). Callbacks live in
:mod:`artifex_fn.training.callbacks`. The guide's entry
point ``artifex_fn.generative_models.training`` re-exports the guide's names.

Example::

    from artifex_fn.ppo import PPOConfig
    from artifex_fn.training import PPOTrainer

    trainer = PPOTrainer(model, nnx.Optimizer(model, optax.adam(3e-4),
                                              wrt=nnx.Param), PPOConfig())
    metrics = trainer.train_step(trajectory)
"""

from artifex_fn.training import callbacks
from artifex_fn.training.reward_functions import ClippedReward
from artifex_fn.training.reward_functions import CompositeReward
from artifex_fn.training.reward_functions import ConstantReward
from artifex_fn.training.reward_functions import OverlongPenalty
from artifex_fn.training.reward_functions import RewardFunction
from artifex_fn.training.reward_functions import ScaledReward
from artifex_fn.training.reward_functions import TextReward
from artifex_fn.training.reward_functions import ThresholdReward
from artifex_fn.training.reward_functions import exact_answer_reward
from artifex_fn.training.reward_functions import format_reward
from artifex_fn.training.reward_functions import is_host_reward
from artifex_fn.training.reward_functions import reward_name
from artifex_fn.training.reward_functions import reward_parts
from artifex_fn.training.trainers.autoregressive import AutoregressiveTrainer
from artifex_fn.training.trainers.base import Trainer
from artifex_fn.training.trainers.diffusion import DiffusionTrainer
from artifex_fn.training.trainers.energy import EnergyTrainer
from artifex_fn.training.trainers.flow import FlowTrainer
from artifex_fn.training.trainers.gan import GANTrainer
from artifex_fn.training.trainers.preference import KTOTrainer
from artifex_fn.training.trainers.preference import ORPOTrainer
from artifex_fn.training.trainers.rl import DPOTrainer
from artifex_fn.training.trainers.rl import GRPOTrainer
from artifex_fn.training.trainers.rl import OnlineDPOTrainer
from artifex_fn.training.trainers.rl import PPOTrainer
from artifex_fn.training.trainers.rl import REINFORCETrainer
from artifex_fn.training.trainers.rl import RewardModelTrainer
from artifex_fn.training.trainers.vae import VAETrainer

__all__ = (
    # trainers
    "Trainer", "REINFORCETrainer", "PPOTrainer", "GRPOTrainer", "DPOTrainer",
    "KTOTrainer", "ORPOTrainer",
    "VAETrainer", "GANTrainer", "DiffusionTrainer", "FlowTrainer",
    "EnergyTrainer", "AutoregressiveTrainer", "RewardModelTrainer",
    "OnlineDPOTrainer",
    # reward functions
    "RewardFunction", "ConstantReward", "CompositeReward", "ThresholdReward",
    "ScaledReward", "ClippedReward", "TextReward", "format_reward",
    "exact_answer_reward", "is_host_reward", "OverlongPenalty",
    "reward_name", "reward_parts",
    # callbacks
    "callbacks",
)
