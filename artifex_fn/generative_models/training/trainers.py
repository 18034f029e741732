"""The guide's ``training.trainers`` module: the trainers and the family
configs (the objects of :mod:`artifex_fn.training` and
:mod:`artifex_fn.families`)."""

from artifex_fn.families.autoregressive import AutoregressiveConfig
from artifex_fn.families.diffusion import DiffusionConfig
from artifex_fn.families.energy import EnergyConfig
from artifex_fn.families.flow import FlowConfig
from artifex_fn.families.gan import GANConfig
from artifex_fn.families.vae import VAEConfig
from artifex_fn.training import AutoregressiveTrainer
from artifex_fn.training import DiffusionTrainer
from artifex_fn.training import DPOTrainer
from artifex_fn.training import EnergyTrainer
from artifex_fn.training import FlowTrainer
from artifex_fn.training import GANTrainer
from artifex_fn.training import GRPOTrainer
from artifex_fn.training import PPOTrainer
from artifex_fn.training import REINFORCETrainer
from artifex_fn.training import Trainer
from artifex_fn.training import VAETrainer

__all__ = (
    "Trainer", "REINFORCETrainer", "PPOTrainer", "GRPOTrainer", "DPOTrainer",
    "VAETrainer", "VAEConfig", "GANTrainer", "GANConfig", "DiffusionTrainer",
    "DiffusionConfig", "FlowTrainer", "FlowConfig", "EnergyTrainer",
    "EnergyConfig", "AutoregressiveTrainer", "AutoregressiveConfig",
)
