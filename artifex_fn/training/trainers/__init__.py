"""The trainer hierarchy: the base ``Trainer``, family and RL trainers.

Family trainers (:class:`VAETrainer`, :class:`GANTrainer`,
:class:`DiffusionTrainer`, :class:`FlowTrainer`, :class:`EnergyTrainer`,
:class:`AutoregressiveTrainer`) wrap the pure pairs of
:mod:`artifex_fn.families`; the RL trainers wrap :mod:`artifex_fn.reinforce`,
:mod:`artifex_fn.ppo`, :mod:`artifex_fn.grpo` and :mod:`artifex_fn.dpo`.
"""

from artifex_fn.training.rl_trainers import DPOTrainer
from artifex_fn.training.rl_trainers import GRPOTrainer
from artifex_fn.training.rl_trainers import PPOTrainer
from artifex_fn.training.rl_trainers import REINFORCETrainer
from artifex_fn.training.trainer import Trainer
from artifex_fn.training.trainers.autoregressive import AutoregressiveConfig
from artifex_fn.training.trainers.autoregressive import AutoregressiveTrainer
from artifex_fn.training.trainers.autoregressive import TinyCausalLM
from artifex_fn.training.trainers.diffusion import DiffusionConfig
from artifex_fn.training.trainers.diffusion import DiffusionTrainer
from artifex_fn.training.trainers.energy import EnergyConfig
from artifex_fn.training.trainers.energy import EnergyTrainer
from artifex_fn.training.trainers.flow import FlowConfig
from artifex_fn.training.trainers.flow import FlowTrainer
from artifex_fn.training.trainers.gan import GANConfig
from artifex_fn.training.trainers.gan import GANTrainer
from artifex_fn.training.trainers.vae import VAEConfig
from artifex_fn.training.trainers.vae import VAETrainer

__all__ = (
    "Trainer",
    "VAEConfig", "VAETrainer", "GANConfig", "GANTrainer",
    "DiffusionConfig", "DiffusionTrainer", "FlowConfig", "FlowTrainer",
    "EnergyConfig", "EnergyTrainer", "AutoregressiveConfig",
    "AutoregressiveTrainer", "TinyCausalLM",
    "REINFORCETrainer", "PPOTrainer", "GRPOTrainer", "DPOTrainer",
)
