"""REINFORCE (Williams 1992): pure `init`/`update` pair, loss and config.

See :mod:`artifex_fn._src.algorithms.reinforce` for the maths and batch layout.
"""

from artifex_fn._src.algorithms.reinforce import REINFORCEConfig
from artifex_fn._src.algorithms.reinforce import init
from artifex_fn._src.algorithms.reinforce import loss
from artifex_fn._src.algorithms.reinforce import prepare
from artifex_fn._src.algorithms.reinforce import rows_loss
from artifex_fn._src.algorithms.reinforce import update

__all__ = ("REINFORCEConfig", "init", "loss", "prepare", "rows_loss", "update")
