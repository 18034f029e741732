"""ORPO (Hong et al. 2024): pure `init`/`update` pair, loss and config.

See :mod:`artifex_fn._src.algorithms.orpo` for the maths and batch layout.
"""

from artifex_fn._src.algorithms.orpo import ORPOConfig
from artifex_fn._src.algorithms.orpo import init
from artifex_fn._src.algorithms.orpo import loss
from artifex_fn._src.algorithms.orpo import rows_loss
from artifex_fn._src.algorithms.orpo import update

__all__ = ("ORPOConfig", "init", "loss", "rows_loss", "update")
