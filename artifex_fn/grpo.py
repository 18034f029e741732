"""GRPO (Shao et al. 2024): pure `init`/`update` pair, loss and config.

See :mod:`artifex_fn._src.algorithms.grpo` for the maths and batch layout.
"""

from artifex_fn._src.algorithms.grpo import GRPOConfig
from artifex_fn._src.algorithms.grpo import LOSS_AGGREGATIONS
from artifex_fn._src.algorithms.grpo import advantages_of
from artifex_fn._src.algorithms.grpo import group_size_of
from artifex_fn._src.algorithms.grpo import init
from artifex_fn._src.algorithms.grpo import loss
from artifex_fn._src.algorithms.grpo import prepare
from artifex_fn._src.algorithms.grpo import reward_metrics
from artifex_fn._src.algorithms.grpo import rows_loss
from artifex_fn._src.algorithms.grpo import select_batch
from artifex_fn._src.algorithms.grpo import totals_of
from artifex_fn._src.algorithms.grpo import update
from artifex_fn._src.algorithms.grpo import with_reference_log_probs

__all__ = ("GRPOConfig", "LOSS_AGGREGATIONS", "advantages_of", "group_size_of",
           "init", "loss", "prepare", "reward_metrics", "rows_loss",
           "select_batch", "totals_of", "update", "with_reference_log_probs")
