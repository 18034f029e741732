"""Callbacks for :meth:`artifex_fn.training.Trainer.fit` and hand-written loops."""

from artifex_fn.training.callbacks.base import Callback
from artifex_fn.training.callbacks.base import CallbackList
from artifex_fn.training.callbacks.checkpoint import CheckpointConfig
from artifex_fn.training.callbacks.checkpoint import ModelCheckpoint
from artifex_fn.training.callbacks.checkpoint import restore_checkpoint

__all__ = ("Callback", "CallbackList", "CheckpointConfig", "ModelCheckpoint",
           "restore_checkpoint")
