"""Callbacks for :meth:`artifex_fn.training.Trainer.fit` and hand-written loops.

Every callback has the hooks ``on_train_begin(trainer)``,
``on_train_batch_end(trainer, metrics, step)`` and ``on_train_end(trainer)``;
metrics are copied from the device only on the steps where a callback
shows, logs or saves them.
"""

from artifex_fn.training.callbacks.base import Callback
from artifex_fn.training.callbacks.base import CallbackList
from artifex_fn.training.callbacks.checkpoint import CheckpointConfig
from artifex_fn.training.callbacks.checkpoint import CheckpointCorruptError
from artifex_fn.training.callbacks.checkpoint import ModelCheckpoint
from artifex_fn.training.callbacks.checkpoint import restore_checkpoint
from artifex_fn.training.callbacks.logging import CSVLoggerCallback
from artifex_fn.training.callbacks.logging import JSONLLoggerCallback
from artifex_fn.training.callbacks.logging import TensorBoardLoggerCallback
from artifex_fn.training.callbacks.logging import TensorBoardLoggerConfig
from artifex_fn.training.callbacks.logging import WandbLoggerCallback
from artifex_fn.training.callbacks.logging import WandbLoggerConfig
from artifex_fn.training.callbacks.logging import scalar_metrics
from artifex_fn.training.callbacks.profiling import JAXProfiler
from artifex_fn.training.callbacks.profiling import ProfilingConfig
from artifex_fn.training.callbacks.progress import ProgressBarCallback

__all__ = (
    "Callback", "CallbackList",
    "CheckpointConfig", "CheckpointCorruptError", "ModelCheckpoint",
    "restore_checkpoint",
    "WandbLoggerConfig", "WandbLoggerCallback",
    "TensorBoardLoggerConfig", "TensorBoardLoggerCallback",
    "CSVLoggerCallback", "JSONLLoggerCallback", "scalar_metrics",
    "ProfilingConfig", "JAXProfiler",
    "ProgressBarCallback",
)
