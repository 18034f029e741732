"""PPO (Schulman et al. 2017): pure `init`/`update` pair, loss and config.

See :mod:`artifex_fn._src.algorithms.ppo` for the maths and batch layout.
"""

from artifex_fn._src.algorithms.ppo import PPOConfig
from artifex_fn._src.algorithms.ppo import init
from artifex_fn._src.algorithms.ppo import loss
from artifex_fn._src.algorithms.ppo import minibatch_loss
from artifex_fn._src.algorithms.ppo import prepare
from artifex_fn._src.algorithms.ppo import prepare_minibatch
from artifex_fn._src.algorithms.ppo import rows_loss
from artifex_fn._src.algorithms.ppo import update

__all__ = ("PPOConfig", "init", "loss", "minibatch_loss", "prepare",
           "prepare_minibatch", "rows_loss", "update")
