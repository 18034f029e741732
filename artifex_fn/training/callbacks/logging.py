"""Callbacks that record training metrics: W&B, TensorBoard, CSV and JSONL.

Every logger here writes every ``log_every_n_steps`` steps: after the step
with 0-based index ``step`` when ``(step + 1) % log_every_n_steps == 0``,
and once more at the end of training for the last step if it was not
already written. Only on those steps are the metrics copied to the host,
all of them with a single ``jax.device_get``; on the other steps a logger
just keeps a reference to the metrics, so it never makes the host wait for
the accelerator.

Only scalar numeric metrics are written (0-d arrays, Python or NumPy
numbers); arrays with more than one element, strings and other values are
skipped. Booleans are written as ``0``/``1``.

Example:
  >>> import tempfile, os
  >>> import jax.numpy as jnp
  >>> path = os.path.join(tempfile.mkdtemp(), "metrics.csv")
  >>> cb = CSVLoggerCallback(path, log_every_n_steps=2)
  >>> cb.on_train_begin(None)
  >>> for step in range(3):
  ...     cb.on_train_batch_end(None, {"loss": jnp.asarray(1.0 / (step + 1))},
  ...                           step)
  >>> cb.on_train_end(None)
  >>> print(open(path).read().strip())
  step,loss
  1,0.5
  2,0.3333333432674408
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from artifex_fn.checks import check_int
from artifex_fn.training.callbacks.base import Callback

_WANDB_MODES = ("online", "offline", "disabled", "shared")


def _looks_scalar(value) -> bool:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return tuple(shape) == ()
    return isinstance(value, (bool, int, float, np.generic))


def scalar_metrics(metrics: Mapping[str, Any],
                   keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Copies the scalar numeric metrics to the host as Python numbers.

    All selected values are fetched with one ``jax.device_get`` call, which
    waits for the device: call this only on steps that log.

    Args:
      metrics: a mapping from names to values (usually 0-d device arrays).
      keys: names to keep, in this order; names missing from ``metrics`` are
        ignored. ``None`` keeps every metric, in the mapping's order.

    Returns:
      A dict from name to ``int`` or ``float``; non-scalar and non-numeric
      values are left out.

    Example:
      >>> import jax.numpy as jnp
      >>> scalar_metrics({"loss": jnp.asarray(0.5), "x": jnp.ones(3),
      ...                 "ok": jnp.asarray(True), "tag": "a"})
      {'loss': 0.5, 'ok': 1}
    """
    if keys is None:
        keys = list(metrics)
    selected = {k: metrics[k] for k in keys
                if k in metrics and _looks_scalar(metrics[k])}
    if not selected:
        return {}
    host = jax.device_get(selected)  # a dict with sorted keys.
    out = {}
    for k in selected:
        v = host[k]
        try:
            arr = np.asarray(v)
        except (TypeError, ValueError):  # not convertible: not a metric.
            continue
        if arr.shape != () or arr.dtype.kind not in "biuf":
            continue
        out[k] = int(arr) if arr.dtype.kind == "b" else arr.item()
    return out


class _PeriodicLogger(Callback):
    """Writes the metrics every ``log_every_n_steps`` steps and at the end.

    Subclasses implement ``_open(trainer)``, ``_write(step, scalars)`` and
    ``_close()``.
    """

    def __init__(self, log_every_n_steps: int):
        check_int(log_every_n_steps, "log_every_n_steps", lo=1)
        self.log_every_n_steps = log_every_n_steps
        self._is_open = False
        self._last = None  # (step, metrics) of the latest unwritten step.
        self.num_logged = 0

    def _open(self, trainer) -> None:
        raise NotImplementedError

    def _write(self, step: int, scalars: dict[str, Any]) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def on_train_begin(self, trainer) -> None:
        """Opens the destination (file, writer or run)."""
        if self._is_open:
            self._close()
        self._last = None
        self._open(trainer)
        self._is_open = True

    def on_train_batch_end(self, trainer, metrics: Mapping[str, Any],
                           step: int) -> None:
        """Writes the metrics when ``(step + 1) % log_every_n_steps == 0``."""
        if not self._is_open:
            self.on_train_begin(trainer)
        step = int(step)
        if (step + 1) % self.log_every_n_steps == 0:
            self._last = None
            self._write(step, scalar_metrics(metrics))
            self.num_logged += 1
        else:
            self._last = (step, metrics)

    def on_train_end(self, trainer) -> None:
        """Writes the last step if it was not written, then closes."""
        if not self._is_open:
            return
        try:
            if self._last is not None:
                step, metrics = self._last
                self._last = None
                self._write(step, scalar_metrics(metrics))
                self.num_logged += 1
        finally:
            self._is_open = False
            self._close()


# -- Weights & Biases ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WandbLoggerConfig:
    """Settings of :class:`WandbLoggerCallback`.

    Attributes:
      project: W&B project name.
      name: run name (``None``: W&B picks one).
      config: hyper-parameters stored with the run.
      log_every_n_steps: log every this many steps (``>= 1``).
      mode: ``"online"``, ``"offline"``, ``"disabled"`` or ``"shared"``;
        ``None`` leaves the choice to W&B (the ``WANDB_MODE`` environment
        variable, else online).
      dir: directory for W&B's local files (``None``: the working
        directory); created if missing.
      tags: tags of the run.
      prefix: prepended to every metric name (``"train/loss"``).
      init_kwargs: further keyword arguments for ``wandb.init`` (``entity``,
        ``group``, ``reinit``, ...).

    Example:
      >>> WandbLoggerConfig(project="rl", log_every_n_steps=0)
      Traceback (most recent call last):
      ...
      ValueError: `log_every_n_steps` must be an int >= 1, got 0.
    """
    project: str
    name: str | None = None
    config: Mapping[str, Any] | None = None
    log_every_n_steps: int = 50
    mode: str | None = None
    dir: str | os.PathLike | None = None
    tags: Sequence[str] | None = None
    prefix: str = "train/"
    init_kwargs: Mapping[str, Any] | None = None

    def __post_init__(self):
        if not isinstance(self.project, str) or not self.project:
            raise ValueError(
                f"`project` must be a non-empty string, got {self.project!r}.")
        check_int(self.log_every_n_steps, "log_every_n_steps", lo=1)
        if self.mode is not None and self.mode not in _WANDB_MODES:
            raise ValueError(
                f"`mode` must be None or one of {_WANDB_MODES}, got "
                f"{self.mode!r}.")
        if not isinstance(self.prefix, str):
            raise ValueError(
                f"`prefix` must be a string, got {self.prefix!r}.")
        if self.tags is not None:
            if isinstance(self.tags, str):
                raise ValueError(
                    "`tags` must be a sequence of strings, got "
                    f"{self.tags!r}.")
            object.__setattr__(self, "tags", tuple(self.tags))


class WandbLoggerCallback(_PeriodicLogger):
    """Logs scalar metrics to a Weights & Biases run.

    The run starts in ``on_train_begin`` (``wandb`` is imported there, so it
    is needed only when this callback is used) and finishes in
    ``on_train_end``. Metrics are logged as ``prefix + name`` with
    ``step=`` the 0-based step index.

    Args:
      config: a :class:`WandbLoggerConfig`.

    Attributes:
      run: the ``wandb`` run while training (``None`` before; kept, finished,
        afterwards).
      num_logged: number of steps logged.

    Example:
      >>> cb = WandbLoggerCallback(WandbLoggerConfig(
      ...     project="rl-finetuning", name="grpo-experiment",
      ...     config={"algorithm": "GRPO", "num_generations": 4, "beta": 0.01},
      ...     log_every_n_steps=10))
      >>> cb.run is None
      True
    """

    def __init__(self, config: WandbLoggerConfig):
        if not isinstance(config, WandbLoggerConfig):
            raise TypeError(
                "`config` must be a WandbLoggerConfig, got "
                f"{type(config).__name__}.")
        super().__init__(config.log_every_n_steps)
        self.config = config
        self.run = None

    def _open(self, trainer) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "WandbLoggerCallback needs the `wandb` package: "
                "`pip install wandb`.") from e
        cfg = self.config
        kwargs = {"project": cfg.project, "name": cfg.name,
                  "config": (dict(cfg.config) if cfg.config is not None
                             else None)}
        if cfg.mode is not None:
            kwargs["mode"] = cfg.mode
        if cfg.dir is not None:
            os.makedirs(cfg.dir, exist_ok=True)
            kwargs["dir"] = os.fspath(cfg.dir)
        if cfg.tags is not None:
            kwargs["tags"] = list(cfg.tags)
        kwargs.update(cfg.init_kwargs or {})
        self.run = wandb.init(**kwargs)

    def _write(self, step, scalars) -> None:
        if scalars:
            prefix = self.config.prefix
            self.run.log({prefix + k: v for k, v in scalars.items()},
                         step=step)

    def _close(self) -> None:
        if self.run is not None:
            self.run.finish()


# -- TensorBoard -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorBoardLoggerConfig:
    """Settings of :class:`TensorBoardLoggerCallback`.

    Attributes:
      log_dir: directory of the event files.
      log_every_n_steps: log every this many steps (``>= 1``).
      prefix: prepended to every metric name (the TensorBoard tag).

    Example:
      >>> TensorBoardLoggerConfig("runs/a").log_every_n_steps
      50
    """
    log_dir: str | os.PathLike
    log_every_n_steps: int = 50
    prefix: str = "train/"

    def __post_init__(self):
        if not isinstance(self.log_dir, (str, os.PathLike)) or not os.fspath(
                self.log_dir):
            raise ValueError(
                f"`log_dir` must be a non-empty path, got {self.log_dir!r}.")
        check_int(self.log_every_n_steps, "log_every_n_steps", lo=1)
        if not isinstance(self.prefix, str):
            raise ValueError(
                f"`prefix` must be a string, got {self.prefix!r}.")


class TensorBoardLoggerCallback(_PeriodicLogger):
    """Writes scalar metrics to TensorBoard event files (``tensorboardX``).

    The ``SummaryWriter`` is created in ``on_train_begin`` and flushed and
    closed in ``on_train_end``. Each metric is written with
    ``add_scalar(prefix + name, value, step)``.

    Args:
      config: a :class:`TensorBoardLoggerConfig`.

    Attributes:
      writer: the ``tensorboardX.SummaryWriter`` while training, else
        ``None``.
      num_logged: number of steps written.
    """

    def __init__(self, config: TensorBoardLoggerConfig):
        if not isinstance(config, TensorBoardLoggerConfig):
            raise TypeError(
                "`config` must be a TensorBoardLoggerConfig, got "
                f"{type(config).__name__}.")
        super().__init__(config.log_every_n_steps)
        self.config = config
        self.writer = None

    def _open(self, trainer) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "TensorBoardLoggerCallback needs the `tensorboardX` package: "
                "`pip install tensorboardX`.") from e
        self.writer = SummaryWriter(log_dir=os.fspath(self.config.log_dir))

    def _write(self, step, scalars) -> None:
        prefix = self.config.prefix
        for k, v in scalars.items():
            self.writer.add_scalar(prefix + k, v, step)

    def _close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.flush()
            finally:
                self.writer.close()
                self.writer = None


# -- files -----------------------------------------------------------------
class _FileLogger(_PeriodicLogger):
    """Opens ``path`` at the start of training and flushes every write.

    The first opening truncates the file unless ``append``; later ``fit``
    calls with the same callback append to it.
    """

    def __init__(self, path, *, log_every_n_steps: int, append: bool):
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ValueError(f"`path` must be a non-empty path, got {path!r}.")
        super().__init__(log_every_n_steps)
        self.path = os.fspath(path)
        self.append = bool(append)
        self._file = None
        self._opened_before = False

    def _open(self, trainer) -> None:
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        append = self.append or self._opened_before
        self._before_open(append)
        self._file = open(  # noqa: SIM115 (open across the hooks)
            self.path, "a" if append else "w", newline="", encoding="utf-8")
        self._opened_before = True

    def _before_open(self, append: bool) -> None:
        """Hook run before the file is opened."""

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @staticmethod
    def _row(step, scalars) -> dict[str, Any]:
        row = {"step": step}
        row.update((k, v) for k, v in scalars.items() if k != "step")
        return row


class CSVLoggerCallback(_FileLogger):
    """Writes one CSV row per logged step: ``step`` and the scalar metrics.

    The header is ``step`` followed by the metrics of the first logged step;
    metrics that appear only later are dropped (the file is never
    rewritten), and metrics missing at a step are left empty. With
    ``append=True`` and an existing non-empty file, its header is reused.
    A metric named ``step`` is ignored. Every row is flushed, so a crash
    loses nothing already logged.

    Args:
      path: the CSV file; its directory is created if missing.
      log_every_n_steps: write every this many steps (``>= 1``).
      append: keep the file's existing rows instead of truncating it.

    Attributes:
      fieldnames: the header once known, else ``None``.
      num_logged: number of rows written.
    """

    def __init__(self, path, *, log_every_n_steps: int = 1,
                 append: bool = False):
        super().__init__(path, log_every_n_steps=log_every_n_steps,
                         append=append)
        self.fieldnames = None
        self._writer = None

    def _before_open(self, append: bool) -> None:
        if not append:
            self.fieldnames = None
        elif self.fieldnames is None and os.path.exists(self.path):
            with open(self.path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
            if header:
                self.fieldnames = header

    def _write(self, step, scalars) -> None:
        row = self._row(step, scalars)
        if self._writer is None:
            write_header = self.fieldnames is None
            if write_header:
                self.fieldnames = list(row)
            self._writer = csv.DictWriter(
                self._file, fieldnames=self.fieldnames, restval="",
                extrasaction="ignore")
            if write_header:
                self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()

    def _close(self) -> None:
        self._writer = None
        super()._close()


class JSONLLoggerCallback(_FileLogger):
    """Writes one JSON object per line per logged step.

    Each line is ``{"step": step, <metric>: <value>, ...}`` with the scalar
    metrics of that step (a metric named ``step`` is ignored). Non-finite
    values are written as ``NaN`` / ``Infinity``, which ``json.loads``
    reads back. Every line is flushed, so a crash loses nothing already
    logged.

    Args:
      path: the JSONL file; its directory is created if missing.
      log_every_n_steps: write every this many steps (``>= 1``).
      append: keep the file's existing lines instead of truncating it.

    Attributes:
      num_logged: number of lines written.
    """

    def __init__(self, path, *, log_every_n_steps: int = 1,
                 append: bool = False):
        super().__init__(path, log_every_n_steps=log_every_n_steps,
                         append=append)

    def _write(self, step, scalars) -> None:
        self._file.write(json.dumps(self._row(step, scalars)) + "\n")
        self._file.flush()
