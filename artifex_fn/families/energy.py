"""Energy-based models: contrastive divergence with Langevin negatives.

See :mod:`artifex_fn._src.families.energy` for the maths and batch layout.
"""

from artifex_fn._src.families.energy import EnergyConfig
from artifex_fn._src.families.energy import contrastive_divergence_loss
from artifex_fn._src.families.energy import energies
from artifex_fn._src.families.energy import init
from artifex_fn._src.families.energy import initial_samples
from artifex_fn._src.families.energy import langevin_sample
from artifex_fn._src.families.energy import loss
from artifex_fn._src.families.energy import persistent_update
from artifex_fn._src.families.energy import push_to_buffer
from artifex_fn._src.families.energy import sample_negatives
from artifex_fn._src.families.energy import update

__all__ = (
    "EnergyConfig",
    "contrastive_divergence_loss",
    "energies",
    "init",
    "initial_samples",
    "langevin_sample",
    "loss",
    "persistent_update",
    "push_to_buffer",
    "sample_negatives",
    "update",
)
