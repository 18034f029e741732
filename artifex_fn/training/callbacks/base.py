"""The callback protocol and a list that dispatches to many callbacks."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

_HOOKS = ("on_train_begin", "on_train_batch_end", "on_train_end")


class Callback:
    """Base class with no-op hooks; override the ones you need.

    ``step`` is the 0-based index of the step that produced ``metrics``
    (``trainer.step - 1`` inside :meth:`Trainer.fit`). ``metrics`` values are
    device arrays: converting them to Python numbers waits for the step to
    finish, so callbacks do it only when they need the value.

    The trainers call exactly ``on_train_begin``, ``on_train_batch_end``
    and ``on_train_end``. A subclass defining another ``on_*`` method (say
    ``on_epoch_end`` or ``on_batch_end`` from another library) gets a
    warning at class creation: that method would never be called.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = sorted(name for name, value in vars(cls).items()
                         if name.startswith("on_") and callable(value)
                         and name not in _HOOKS)
        if unknown:
            warnings.warn(
                f"{cls.__name__} defines {unknown}, which the trainers never "
                f"call; the supported hooks are {list(_HOOKS)} (e.g. "
                f"on_batch_end -> on_train_batch_end).", UserWarning,
                stacklevel=2)

    def on_train_begin(self, trainer) -> None:
        """Called once before the first step."""

    def on_train_batch_end(self, trainer, metrics: dict[str, Any],
                           step: int) -> None:
        """Called after every step."""

    def on_train_end(self, trainer) -> None:
        """Called once after the last step (also when training raised)."""


class CallbackList(Callback):
    """Calls each hook on every callback that defines it, in order."""

    def __init__(self, callbacks: Iterable[Any] = ()):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not any(callable(getattr(cb, h, None)) for h in _HOOKS):
                raise TypeError(
                    f"{cb!r} is not a callback: it has none of {_HOOKS}.")

    def _call(self, hook, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(*args)

    def on_train_begin(self, trainer) -> None:
        self._call("on_train_begin", trainer)

    def on_train_batch_end(self, trainer, metrics, step) -> None:
        self._call("on_train_batch_end", trainer, metrics, step)

    def on_train_end(self, trainer) -> None:
        self._call("on_train_end", trainer)
