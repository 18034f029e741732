"""DPO (Rafailov et al. 2023) and SimPO (Meng et al. 2024): pure `init`/`update` pair, loss and config.

See :mod:`artifex_fn._src.algorithms.dpo` for the maths and batch layout.
"""

from artifex_fn._src.algorithms.dpo import DPOConfig
from artifex_fn._src.algorithms.dpo import init
from artifex_fn._src.algorithms.dpo import loss
from artifex_fn._src.algorithms.dpo import rows_loss
from artifex_fn._src.algorithms.dpo import score
from artifex_fn._src.algorithms.dpo import update
from artifex_fn._src.algorithms.dpo import with_reference_log_probs

__all__ = ("DPOConfig", "init", "loss", "rows_loss", "score", "update",
           "with_reference_log_probs")
