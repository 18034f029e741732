"""Online DPO (Guo et al. 2024): DPO on best-versus-worst pairs of the
current policy's own samples, as a pure `init`/`update` pair.

See :mod:`artifex_fn._src.algorithms.online_dpo` for the maths and the
batch layout.
"""

from artifex_fn._src.algorithms.online_dpo import OnlineDPOConfig
from artifex_fn._src.algorithms.online_dpo import init
from artifex_fn._src.algorithms.online_dpo import loss
from artifex_fn._src.algorithms.online_dpo import pair_rows
from artifex_fn._src.algorithms.online_dpo import rows_loss
from artifex_fn._src.algorithms.online_dpo import select_pairs
from artifex_fn._src.algorithms.online_dpo import update
from artifex_fn._src.algorithms.online_dpo import with_reference_log_probs

__all__ = ("OnlineDPOConfig", "init", "loss", "pair_rows", "rows_loss",
           "select_pairs", "update", "with_reference_log_probs")
