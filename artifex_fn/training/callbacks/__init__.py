"""Callbacks for :meth:`artifex_fn.training.Trainer.fit` and hand-written loops."""

from artifex_fn.training.callbacks.base import Callback
from artifex_fn.training.callbacks.base import CallbackList

__all__ = ("Callback", "CallbackList")
