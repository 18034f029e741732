"""KTO (Ethayarajh et al. 2024): pure `init`/`update` pair, loss and config.

See :mod:`artifex_fn._src.algorithms.kto` for the maths and batch layout.
"""

from artifex_fn._src.algorithms.kto import KTOConfig
from artifex_fn._src.algorithms.kto import init
from artifex_fn._src.algorithms.kto import kl_reference_point
from artifex_fn._src.algorithms.kto import loss
from artifex_fn._src.algorithms.kto import pairs_to_unpaired
from artifex_fn._src.algorithms.kto import rows_loss
from artifex_fn._src.algorithms.kto import update
from artifex_fn._src.algorithms.kto import with_reference_log_probs

__all__ = ("KTOConfig", "init", "kl_reference_point", "loss",
           "pairs_to_unpaired", "rows_loss", "update",
           "with_reference_log_probs")
