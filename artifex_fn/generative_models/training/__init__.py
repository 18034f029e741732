"""The guide's entry point: ``artifex_fn.generative_models.training``.

A compatibility package holding the names the guide imports from here and
its three submodules (``.callbacks``, ``.rl.utils``, ``.trainers``). Every
object is the one of its single home: configs from the algorithm modules
(:mod:`artifex_fn.ppo`, ...), trainers and reward functions from
:mod:`artifex_fn.training`, callbacks from
:mod:`artifex_fn.training.callbacks`, :class:`GenerationConfig` from
:mod:`artifex_fn.sampling`.
"""

from artifex_fn.dpo import DPOConfig
from artifex_fn.generative_models.training import callbacks
from artifex_fn.generative_models.training import rl
from artifex_fn.generative_models.training import trainers
from artifex_fn.grpo import GRPOConfig
from artifex_fn.ppo import PPOConfig
from artifex_fn.reinforce import REINFORCEConfig
from artifex_fn.sampling import GenerationConfig
from artifex_fn.training import *  # noqa: F401,F403
from artifex_fn.training import __all__ as _training_names
from artifex_fn.training.callbacks import *  # noqa: F401,F403
from artifex_fn.training.callbacks import __all__ as _callback_names

__all__ = (("REINFORCEConfig", "PPOConfig", "GRPOConfig", "DPOConfig",
            "GenerationConfig")
           + tuple(n for n in _training_names if n != "callbacks")
           + tuple(_callback_names) + ("callbacks", "rl", "trainers"))
