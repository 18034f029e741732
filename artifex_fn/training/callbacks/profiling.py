"""Profiles a window of training steps with the JAX profiler.

The trace (``*.xplane.pb`` under ``<log_dir>/plugins/profile/<run>/``, for
TensorBoard's profile plugin, XProf or Perfetto) covers the steps with
0-based indices ``start_step`` to ``end_step - 1``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from artifex_fn.checks import check_int
from artifex_fn.training.callbacks.base import Callback


@dataclasses.dataclass(frozen=True)
class ProfilingConfig:
    """Settings of :class:`JAXProfiler`.

    Attributes:
      log_dir: directory the trace is written under.
      start_step: index of the first profiled step (``>= 0``).
      end_step: index one past the last profiled step (``> start_step``).

    Example:
      >>> ProfilingConfig(log_dir="logs", start_step=5, end_step=5)
      Traceback (most recent call last):
      ...
      ValueError: `end_step` must be an int > `start_step` (5), got 5.
    """
    log_dir: str | os.PathLike
    start_step: int = 10
    end_step: int = 20

    def __post_init__(self):
        if not isinstance(self.log_dir, (str, os.PathLike)) or not os.fspath(
                self.log_dir):
            raise ValueError(
                f"`log_dir` must be a non-empty path, got {self.log_dir!r}.")
        check_int(self.start_step, "start_step", lo=0)
        end = self.end_step
        if (not isinstance(end, int) or isinstance(end, bool)
                or end <= self.start_step):
            raise ValueError(
                f"`end_step` must be an int > `start_step` "
                f"({self.start_step}), got {end!r}.")


def _block_on(*trees: Any) -> None:
    for tree in trees:
        if tree is not None:
            jax.block_until_ready(tree)


def _trainer_state(trainer) -> list[Any]:
    """The trainer's model and optimizer state, for waiting on them."""
    from flax import nnx

    graph_node = getattr(nnx, "Pytree", None) or nnx.Object
    out = []
    for name in ("model", "optimizer"):
        obj = getattr(trainer, name, None)
        if isinstance(obj, graph_node):
            out.append(nnx.state(obj))
    return out


class JAXProfiler(Callback):
    """Records a JAX profiler trace of steps ``start_step .. end_step - 1``.

    Steps are the 0-based indices the hooks receive. The trace starts in
    the ``on_train_batch_end`` of step ``start_step - 1`` (or in
    ``on_train_begin`` when ``trainer.step == start_step``, e.g. a fresh
    trainer and ``start_step == 0``) and stops in the ``on_train_batch_end``
    of step ``end_step - 1``, or in ``on_train_end`` if training ends inside
    the window. Before starting and before stopping it waits for the
    pending device work (the step's metrics and the trainer's model and
    optimizer state), so the trace holds exactly the window's work and
    nothing of it is cut off. One callback records one trace; later
    windows of the same object are not profiled.

    Args:
      config: a :class:`ProfilingConfig`.

    Attributes:
      active: whether a trace is being recorded.
      done: whether the trace was recorded and saved.

    Example:
      >>> prof = JAXProfiler(ProfilingConfig(log_dir="logs/rl_profiles",
      ...                                    start_step=50, end_step=60))
      >>> prof.active
      False
    """

    def __init__(self, config: ProfilingConfig):
        if not isinstance(config, ProfilingConfig):
            raise TypeError(
                "`config` must be a ProfilingConfig, got "
                f"{type(config).__name__}.")
        self.config = config
        self.active = False
        self.done = False

    def _start(self, trainer, metrics=None) -> None:
        _block_on(metrics, *_trainer_state(trainer))
        jax.profiler.start_trace(os.fspath(self.config.log_dir))
        self.active = True

    def _stop(self, trainer, metrics=None) -> None:
        try:
            _block_on(metrics, *_trainer_state(trainer))
        finally:
            self.active = False
            self.done = True
            jax.profiler.stop_trace()

    def on_train_begin(self, trainer) -> None:
        """Starts the trace if the next step is ``start_step``."""
        step = getattr(trainer, "step", 0)
        if (not self.active and not self.done and isinstance(step, int)
                and step == self.config.start_step):
            self._start(trainer)

    def on_train_batch_end(self, trainer, metrics: Any, step: int) -> None:
        """Starts before step ``start_step``; stops after ``end_step - 1``."""
        step = int(step)
        if self.active:
            if step + 1 >= self.config.end_step:
                self._stop(trainer, metrics)
        elif not self.done and step + 1 == self.config.start_step:
            self._start(trainer, metrics)

    def on_train_end(self, trainer) -> None:
        """Stops the trace if training ended inside the window."""
        if self.active:
            self._stop(trainer)
