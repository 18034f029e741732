"""Flow matching (Lipman et al. 2023), rectified flow (Liu et al. 2023) and
OT-CFM (Tong et al. 2023): pure ``init``/``update`` and ODE samplers.

See :mod:`artifex_fn._src.families.flow` for the maths; the NNX trainer is
:class:`artifex_fn.training.FlowTrainer`.
"""

from artifex_fn._src.families.flow import ODE_METHODS
from artifex_fn._src.families.flow import PATHS
from artifex_fn._src.families.flow import FlowConfig
from artifex_fn._src.families.flow import conditional_path
from artifex_fn._src.families.flow import init
from artifex_fn._src.families.flow import loss
from artifex_fn._src.families.flow import ot_pairing
from artifex_fn._src.families.flow import sample_ode
from artifex_fn._src.families.flow import sinkhorn_plan
from artifex_fn._src.families.flow import update

__all__ = ("FlowConfig", "ODE_METHODS", "PATHS", "conditional_path", "init",
           "loss", "ot_pairing", "sample_ode", "sinkhorn_plan", "update")
