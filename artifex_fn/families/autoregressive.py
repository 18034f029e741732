"""Autoregressive sequence models: teacher forcing, scheduled sampling and
generation.

See :mod:`artifex_fn._src.families.autoregressive` for the maths and batch
layout.
"""

from artifex_fn._src.families.networks import ActorCriticLM
from artifex_fn._src.families.networks import TinyCausalLM
from artifex_fn._src.families.autoregressive import AutoregressiveConfig
from artifex_fn._src.families.autoregressive import cross_entropy
from artifex_fn._src.families.autoregressive import init
from artifex_fn._src.families.autoregressive import logits_of
from artifex_fn._src.families.autoregressive import loss
from artifex_fn._src.families.autoregressive import mix_predictions
from artifex_fn._src.families.autoregressive import (
    scheduled_sampling_probability)
from artifex_fn._src.families.autoregressive import update

__all__ = (
    "ActorCriticLM",
    "TinyCausalLM",
    "AutoregressiveConfig",
    "cross_entropy",
    "init",
    "logits_of",
    "loss",
    "mix_predictions",
    "scheduled_sampling_probability",
    "update",
)
