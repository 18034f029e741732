"""Bradley-Terry reward models: pure ``init``/``update`` pair, loss,
config and a scalar head for any NNX trunk.

See :mod:`artifex_fn._src.algorithms.reward_model`.
"""

from artifex_fn._src.algorithms.reward_model import RewardModelConfig
from artifex_fn._src.algorithms.reward_model import SequenceRewardModel
from artifex_fn._src.algorithms.reward_model import init
from artifex_fn._src.algorithms.reward_model import last_valid_index
from artifex_fn._src.algorithms.reward_model import likelihood_features
from artifex_fn._src.algorithms.reward_model import loss
from artifex_fn._src.algorithms.reward_model import rows_loss
from artifex_fn._src.algorithms.reward_model import update

__all__ = ("RewardModelConfig", "SequenceRewardModel", "init",
           "last_valid_index", "likelihood_features", "loss", "rows_loss",
           "update")
