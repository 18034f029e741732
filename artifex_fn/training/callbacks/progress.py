"""A tqdm progress bar for training loops.

The bar counts every step but redraws, and copies metrics from the device,
only every ``refresh_every_n_steps`` steps, so it does not make the host
wait for the accelerator between refreshes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from artifex_fn.checks import check_int
from artifex_fn.training.callbacks.base import Callback
from artifex_fn.training.callbacks.logging import scalar_metrics


class ProgressBarCallback(Callback):
    """Shows the step count, the rate (it/s) and selected metrics.

    The bar opens in ``on_train_begin`` starting at ``trainer.step`` (so a
    resumed run shows the global step) and is closed in ``on_train_end``
    after the final count and the last step's metrics are shown. Metrics
    are shown as ``name=value`` with format ``.4g``; selected names that
    are absent or not scalar are left out.

    Args:
      total: the step count at which the bar is full (``None``: unknown).
      refresh_every_n_steps: update the bar every this many steps (``>= 1``).
      metrics: names of the metrics to show, in order; ``None`` shows all
        scalar metrics.
      disable: hide the bar; ``None`` hides it when the output is not a
        terminal (tqdm's rule).
      leave: keep the finished bar on screen.
      desc: label in front of the bar.
      file: stream to draw on (default: ``sys.stderr``).
      tqdm_kwargs: further keyword arguments for ``tqdm.tqdm``.

    Attributes:
      bar: the ``tqdm`` bar while training, else ``None``.
      num_refreshes: number of times metrics were copied and shown.

    Example:
      >>> cb = ProgressBarCallback()
      >>> cb.refresh_every_n_steps, cb.metrics
      (10, ('loss', 'mean_reward'))
    """

    def __init__(self, *, total: int | None = None,
                 refresh_every_n_steps: int = 10,
                 metrics: Sequence[str] | None = ("loss", "mean_reward"),
                 disable: bool | None = None, leave: bool = True,
                 desc: str = "train", file=None,
                 tqdm_kwargs: Mapping[str, Any] | None = None):
        if total is not None:
            check_int(total, "total", lo=0)
        check_int(refresh_every_n_steps, "refresh_every_n_steps", lo=1)
        if metrics is not None:
            if isinstance(metrics, str) or not all(
                    isinstance(m, str) for m in metrics):
                raise ValueError(
                    "`metrics` must be None or a sequence of metric names, "
                    f"got {metrics!r}.")
            metrics = tuple(metrics)
        self.total = total
        self.refresh_every_n_steps = refresh_every_n_steps
        self.metrics = metrics
        self.disable = disable
        self.leave = leave
        self.desc = desc
        self.file = file
        self.tqdm_kwargs = dict(tqdm_kwargs or {})
        self.bar = None
        self.num_refreshes = 0
        self._pending = 0       # steps counted but not yet added to the bar.
        self._last_metrics = None  # metrics of the latest step not shown.

    def on_train_begin(self, trainer) -> None:
        """Opens the bar at ``trainer.step`` (0 without a trainer)."""
        from tqdm.auto import tqdm

        if self.bar is not None:
            self.on_train_end(trainer)
        initial = getattr(trainer, "step", 0)
        initial = initial if isinstance(initial, int) else 0
        kwargs = {"total": self.total, "initial": initial, "desc": self.desc,
                  "disable": self.disable, "leave": self.leave,
                  "file": self.file}
        kwargs.update(self.tqdm_kwargs)
        self.bar = tqdm(**kwargs)
        self._pending = 0
        self._last_metrics = None

    def on_train_batch_end(self, trainer, metrics: Mapping[str, Any],
                           step: int) -> None:
        """Counts the step; every ``refresh_every_n_steps`` steps, redraws."""
        if self.bar is None:
            self.on_train_begin(trainer)
        self._pending += 1
        if (int(step) + 1) % self.refresh_every_n_steps == 0:
            self._refresh(metrics)
        else:
            self._last_metrics = metrics

    def on_train_end(self, trainer) -> None:
        """Adds the remaining steps, shows the last metrics, closes the bar."""
        if self.bar is None:
            return
        try:
            if self._pending or self._last_metrics is not None:
                self._refresh(self._last_metrics)
        finally:
            bar, self.bar = self.bar, None
            bar.close()

    def _refresh(self, metrics) -> None:
        self._last_metrics = None
        if metrics is not None and not self.bar.disable:
            values = scalar_metrics(metrics, self.metrics)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()},
                                 refresh=False)
            self.num_refreshes += 1
        pending, self._pending = self._pending, 0
        self.bar.update(pending)
