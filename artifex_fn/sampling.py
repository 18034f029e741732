"""Sampling from policy models: the single home of token generation.

* :func:`generate`: sampling of completions after (left-padded) prompts,
  with a key-value cache for models with the decoder protocol
  (``init_cache`` and a call taking positions, an attention mask and the
  cache) and the recompute path for any other causal
  ``tokens -> logits`` function; temperature, greedy, top-k, top-p,
  several stop tokens; returns a :class:`Generation` (tokens, mask,
  behaviour log-probs);
* :func:`pad_prompts` / :func:`bucket_length`: ragged prompts to
  left-padded arrays of a bucketed length;
* :func:`transform_logits`: the sampling distribution's logits;
* :func:`sample_next_token` / :func:`categorical`: one draw per row from
  ``[B, V]`` logits;
* :func:`cache_windows` / :func:`grow_cache`: the growing cache of the
  decoding segments;
* :func:`token_policy` / :func:`completion_logits`: the completion tokens
  of ``{"prompt", "completion", "prompt_mask"?}`` observations as a
  ``Categorical``, the policy that GRPO, REINFORCE and DPO train on token
  models;
* :func:`sample_one_step`: one draw per row of a one-step policy;
* :class:`GenerationConfig`: how a trainer samples from its model.

See :mod:`artifex_fn._src.sampling` for the conventions.
"""

from artifex_fn._src.sampling import MASKED_LOGIT
from artifex_fn._src.sampling import Generation
from artifex_fn._src.sampling import GenerationConfig
from artifex_fn._src.sampling import bucket_length
from artifex_fn._src.sampling import cache_windows
from artifex_fn._src.sampling import categorical
from artifex_fn._src.sampling import completion_logits
from artifex_fn._src.sampling import completion_mask
from artifex_fn._src.sampling import generate
from artifex_fn._src.sampling import grow_cache
from artifex_fn._src.sampling import is_decoder
from artifex_fn._src.sampling import pad_prompts
from artifex_fn._src.sampling import prompt_positions
from artifex_fn._src.sampling import sample_next_token
from artifex_fn._src.sampling import sample_one_step
from artifex_fn._src.sampling import token_actor_critic
from artifex_fn._src.sampling import token_policy
from artifex_fn._src.sampling import transform_logits

__all__ = ("MASKED_LOGIT", "Generation", "GenerationConfig", "bucket_length",
           "cache_windows", "categorical", "completion_logits",
           "completion_mask", "generate", "grow_cache", "is_decoder",
           "pad_prompts", "prompt_positions", "sample_next_token",
           "sample_one_step", "token_actor_critic", "token_policy", "transform_logits")
