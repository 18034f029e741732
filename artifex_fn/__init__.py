"""artifex_fn: functional reinforcement-learning fine-tuning for JAX.

The RL math layer is re-exported here flat; see the module docstrings of
``artifex_fn._src`` for conventions (time on the last axis by default,
unreduced losses, masks where zero marks padding).
"""

from artifex_fn._src.advantages import GroupAdvantages
from artifex_fn._src.advantages import GroupSelection
from artifex_fn._src.advantages import group_advantages
from artifex_fn._src.advantages import normalize_advantages
from artifex_fn._src.advantages import select_groups
from artifex_fn._src.aggregation import AGGREGATION_MODES
from artifex_fn._src.aggregation import aggregate_loss
from artifex_fn._src.aggregation import aggregate_loss_parts
from artifex_fn._src.completions import completion_lengths
from artifex_fn._src.completions import overlong_penalty
from artifex_fn._src.completions import truncated_completions
from artifex_fn._src.divergences import entropy_from_log_probs
from artifex_fn._src.divergences import entropy_from_logits
from artifex_fn._src.divergences import kl_estimate
from artifex_fn._src.divergences import kl_from_log_probs
from artifex_fn._src.divergences import kl_from_logits
from artifex_fn._src.log_probs import sequence_lengths
from artifex_fn._src.log_probs import sequence_log_probs
from artifex_fn._src.log_probs import token_log_probs
from artifex_fn._src.multistep import discounted_returns
from artifex_fn._src.multistep import gae_advantages
from artifex_fn._src.multistep import lambda_returns
from artifex_fn._src.multistep import reverse_linear_recurrence
from artifex_fn._src.policy_gradients import clip_fraction
from artifex_fn._src.policy_gradients import clipped_surrogate_loss
from artifex_fn._src.policy_gradients import importance_ratio
from artifex_fn._src.policy_gradients import policy_gradient_loss
from artifex_fn._src.policy_gradients import value_loss
from artifex_fn._src.preference import KTOLoss
from artifex_fn._src.preference import ORPOLoss
from artifex_fn._src.preference import PREFERENCE_LOSS_TYPES
from artifex_fn._src.preference import PreferenceLoss
from artifex_fn._src.preference import bradley_terry_loss
from artifex_fn._src.preference import dpo_loss
from artifex_fn._src.preference import kto_loss
from artifex_fn._src.preference import orpo_loss
from artifex_fn._src.preference import simpo_loss

# Algorithms: `afn.ppo.update`, `afn.grpo.GRPOConfig`, ...
from artifex_fn import dpo
from artifex_fn import grpo
from artifex_fn import kto
from artifex_fn import online_dpo
from artifex_fn import orpo
from artifex_fn import ppo
from artifex_fn import reinforce
from artifex_fn import reward_model
from artifex_fn._src.algorithms.state import TrainState

# Generative-model families (`afn.families.diffusion.update`, ...) and toy data.
from artifex_fn import families
from artifex_fn import toy_data

# Scaling out: meshes, data parallel and FSDP placement, multi-host set-up.
from artifex_fn import distributed

__version__ = "0.3.0"

__all__ = (
    "AGGREGATION_MODES",
    "GroupAdvantages",
    "GroupSelection",
    "KTOLoss",
    "ORPOLoss",
    "TrainState",
    "PREFERENCE_LOSS_TYPES",
    "PreferenceLoss",
    "aggregate_loss",
    "aggregate_loss_parts",
    "bradley_terry_loss",
    "clip_fraction",
    "clipped_surrogate_loss",
    "completion_lengths",
    "discounted_returns",
    "distributed",
    "dpo",
    "dpo_loss",
    "entropy_from_log_probs",
    "families",
    "entropy_from_logits",
    "gae_advantages",
    "group_advantages",
    "grpo",
    "importance_ratio",
    "kl_estimate",
    "kl_from_log_probs",
    "kl_from_logits",
    "kto",
    "kto_loss",
    "lambda_returns",
    "normalize_advantages",
    "online_dpo",
    "orpo",
    "orpo_loss",
    "overlong_penalty",
    "policy_gradient_loss",
    "ppo",
    "reinforce",
    "reward_model",
    "reverse_linear_recurrence",
    "select_groups",
    "sequence_lengths",
    "sequence_log_probs",
    "simpo_loss",
    "token_log_probs",
    "truncated_completions",
    "toy_data",
    "value_loss",
)
