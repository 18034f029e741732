"""PPO (Schulman et al. 2017): pure `init`/`update` pair, loss and config.

See :mod:`artifex_fn._src.algorithms.ppo` for the maths and batch layout.
"""

from artifex_fn._src.algorithms.ppo import PPOConfig
from artifex_fn._src.algorithms.ppo import init
from artifex_fn._src.algorithms.ppo import loss
from artifex_fn._src.algorithms.ppo import minibatch_loss
from artifex_fn._src.algorithms.ppo import next_beta
from artifex_fn._src.algorithms.ppo import prepare
from artifex_fn._src.algorithms.ppo import prepare_minibatch
from artifex_fn._src.algorithms.ppo import rows_loss
from artifex_fn._src.algorithms.ppo import update
from artifex_fn._src.algorithms.ppo import with_reference_log_probs

__all__ = ("PPOConfig", "init", "loss", "minibatch_loss", "next_beta",
           "prepare", "prepare_minibatch", "rows_loss", "update",
           "with_reference_log_probs")
