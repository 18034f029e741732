"""Multi-device and multi-host training on ``jax.sharding`` meshes.

See :mod:`artifex_fn._src.distributed` for the layout and the guarantees.
"""

from artifex_fn._src.distributed import DATA_AXIS
from artifex_fn._src.distributed import FSDP_AXIS
from artifex_fn._src.distributed import batch_sharding
from artifex_fn._src.distributed import data_parallel
from artifex_fn._src.distributed import fsdp_sharding
from artifex_fn._src.distributed import initialize
from artifex_fn._src.distributed import make_mesh
from artifex_fn._src.distributed import place_state
from artifex_fn._src.distributed import replicated
from artifex_fn._src.distributed import shard_batch
from artifex_fn._src.distributed import state_shardings

__all__ = ("DATA_AXIS", "FSDP_AXIS", "batch_sharding", "data_parallel",
           "fsdp_sharding", "initialize", "make_mesh", "place_state",
           "replicated", "shard_batch", "state_shardings")
