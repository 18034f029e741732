"""Sampling from policy models: the single home of token generation.

* :func:`generate`: autoregressive sampling of completions after prompts
  (temperature, greedy, top-k, end token and padding) from any causal
  ``tokens -> logits`` function;
* :func:`sample_next_token`: one draw per row from ``[B, V]`` logits;
* :func:`token_policy` / :func:`completion_logits`: the completion tokens
  of ``{"prompt", "completion"}`` observations as a ``Categorical``, the
  policy that GRPO, REINFORCE and DPO train on token models;
* :func:`sample_one_step`: one draw per row of a one-step policy;
* :class:`GenerationConfig`: how a trainer samples from its model.

See :mod:`artifex_fn._src.sampling` for the conventions.
"""

from artifex_fn._src.sampling import GenerationConfig
from artifex_fn._src.sampling import completion_logits
from artifex_fn._src.sampling import completion_mask
from artifex_fn._src.sampling import generate
from artifex_fn._src.sampling import sample_next_token
from artifex_fn._src.sampling import sample_one_step
from artifex_fn._src.sampling import token_policy

__all__ = ("GenerationConfig", "completion_logits", "completion_mask",
           "generate", "sample_next_token", "sample_one_step",
           "token_policy")
