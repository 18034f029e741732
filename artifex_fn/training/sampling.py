"""Sampling for the RL trainers (generation config, token policies).

Re-exports :mod:`artifex_fn._src.sampling`, which holds the pure functions
below the trainer layer (the experiments use them too).
"""

from artifex_fn._src.sampling import GenerationConfig
from artifex_fn._src.sampling import completion_logits
from artifex_fn._src.sampling import sample_one_step
from artifex_fn._src.sampling import sample_tokens
from artifex_fn._src.sampling import token_policy

__all__ = ("GenerationConfig", "completion_logits", "sample_one_step",
           "sample_tokens", "token_policy")
