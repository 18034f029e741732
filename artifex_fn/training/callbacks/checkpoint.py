"""Saving and restoring a trainer's full state with Orbax.

:class:`ModelCheckpoint` is a callback for :meth:`Trainer.fit` that writes
``trainer.state_dict()`` (trained and other model variables, optimizer state
and step counter, the trainer's step and PRNG key) to two
``orbax.checkpoint.CheckpointManager`` directories:

* ``<dirpath>/best`` keeps the ``save_top_k`` checkpoints with the best value
  of the ``monitor`` metric;
* ``<dirpath>/last`` keeps the most recent checkpoint (``save_last``), so a
  crashed run resumes from its latest saved step even when that step was not
  among the best.

Checkpoints are numbered by ``trainer.step`` after the step, i.e. the number
of steps applied, so restoring checkpoint ``n`` sets ``trainer.step = n``.
Orbax writes each checkpoint into a temporary directory and renames it once
complete: a save interrupted by a crash leaves the earlier checkpoints
loadable.

>>> import os
>>> cfg = CheckpointConfig(dirpath="checkpoints/grpo", monitor="mean_reward",
...                        mode="max", save_top_k=1)
>>> cfg.dirpath == os.path.abspath("checkpoints/grpo")
True
>>> callback = ModelCheckpoint(cfg)   # writes nothing until the first save
>>> CheckpointConfig(dirpath="ckpt", mode="highest")
Traceback (most recent call last):
    ...
ValueError: `mode` must be 'min' or 'max', got 'highest'.

Resuming in a new process after a crash: build the same model, optimizer and
trainer, then ``restore_checkpoint(trainer, "checkpoints/grpo")`` and call
``trainer.fit`` again with a ``step -> batch`` data function.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from artifex_fn.training.callbacks.base import Callback

__all__ = ("CheckpointConfig", "ModelCheckpoint", "restore_checkpoint")

_BEST = "best"
_LAST = "last"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _normalize_path(dirpath) -> str:
    """``dirpath`` as an absolute path (URLs such as ``gs://`` unchanged)."""
    path = os.fsdecode(os.fspath(dirpath))
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Settings of :class:`ModelCheckpoint`.

    Attributes:
      dirpath: directory of the checkpoints (made absolute; URLs such as
        ``gs://bucket/run`` are kept as given). ``best`` and ``last``
        subdirectories are created in it on the first save.
      monitor: name of the metric that ranks checkpoints; it must be among
        the metrics the trainer's steps return (``"loss"`` for
        ``compute_loss`` trainers, ``"mean_reward"`` for the RL trainers).
      mode: ``"min"`` (lower ``monitor`` is better) or ``"max"``.
      save_top_k: number of best checkpoints to keep, ``>= 1``, or ``-1`` to
        keep every saved checkpoint.
      every_n_steps: save when ``trainer.step`` is a multiple of this,
        ``>= 1``.
      save_last: also keep the most recent checkpoint under ``last``, for
        resuming.
      async_save: write checkpoints in a background thread; the training
        step only waits for the copy of the arrays to host memory.
    """
    dirpath: str
    monitor: str = "loss"
    mode: str = "min"
    save_top_k: int = 1
    every_n_steps: int = 1
    save_last: bool = True
    async_save: bool = True

    def __post_init__(self):
        if not isinstance(self.dirpath, (str, os.PathLike)) or not os.fsdecode(
                os.fspath(self.dirpath)).strip():
            raise ValueError(
                "`dirpath` must be a non-empty path (str or os.PathLike), "
                f"got {self.dirpath!r}.")
        object.__setattr__(self, "dirpath", _normalize_path(self.dirpath))
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(
                "`monitor` must be the non-empty name of a metric, got "
                f"{self.monitor!r}.")
        if self.mode not in ("min", "max"):
            raise ValueError(
                f"`mode` must be 'min' or 'max', got {self.mode!r}.")
        if not _is_int(self.save_top_k) or not (
                self.save_top_k == -1 or self.save_top_k >= 1):
            raise ValueError(
                "`save_top_k` must be an int >= 1, or -1 to keep every "
                f"checkpoint, got {self.save_top_k!r}.")
        if not _is_int(self.every_n_steps) or self.every_n_steps < 1:
            raise ValueError(
                "`every_n_steps` must be an int >= 1, got "
                f"{self.every_n_steps!r}.")
        for name in ("save_last", "async_save"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(
                    f"`{name}` must be True or False, got {value!r}.")


def _subdir(dirpath: str, name: str) -> str:
    return dirpath.rstrip("/") + "/" + name


def _open_reader(path: str) -> ocp.CheckpointManager | None:
    """A manager over existing checkpoints in ``path`` (None if absent)."""
    if not epath.Path(path).exists():
        return None
    return ocp.CheckpointManager(
        path, options=ocp.CheckpointManagerOptions(
            create=False, enable_async_checkpointing=False,
            save_root_metadata=False),
        item_handlers=ocp.StandardCheckpointHandler())


def _ranking(mngr: ocp.CheckpointManager) -> dict[int, tuple[float, str, str]]:
    """``{step: (score, monitor, mode)}`` of the checkpoints in ``best``."""
    ranking = {}
    for step in mngr.all_steps():
        meta = mngr.metadata(step)
        custom = meta.custom_metadata or {}
        monitor = custom.get("monitor")
        metrics = meta.metrics or {}
        if monitor in metrics:
            ranking[int(step)] = (float(metrics[monitor]), monitor,
                                  custom.get("mode", "min"))
    return ranking


def _scores(mngr: ocp.CheckpointManager) -> tuple[dict[int, float], str]:
    """``{step: score}`` of the checkpoints in ``best``, and their mode."""
    ranking = _ranking(mngr)
    modes = {mode for _, _, mode in ranking.values()}
    mode = modes.pop() if len(modes) == 1 else "min"
    return {s: score for s, (score, _, _) in ranking.items()}, mode


def _best_of(scores: dict[int, float], mode: str) -> int | None:
    """The best step; among equal scores the latest, as Orbax keeps it."""
    if not scores:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scores, key=lambda s: (sign * scores[s], s))


def _restore_into(trainer, dirpath: str, which) -> int:
    """Loads checkpoint ``which`` of ``dirpath`` into ``trainer``."""
    if not (which in ("last", "best") or _is_int(which)):
        raise ValueError(
            "`which` must be 'last', 'best' or a step number (int), got "
            f"{which!r}.")
    readers = {name: _open_reader(_subdir(dirpath, name))
               for name in (_LAST, _BEST)}
    try:
        found = {name: m for name, m in readers.items()
                 if m is not None and m.all_steps()}
        if not found:
            raise FileNotFoundError(
                f"No checkpoint in {dirpath!r} (looked in its 'last' and "
                "'best' subdirectories).")
        if which == "last":
            step, mngr = None, None
            for m in found.values():  # 'last' first: it wins a tie
                latest = max(m.all_steps())
                if step is None or latest > step:
                    step, mngr = latest, m
        elif which == "best":
            if _BEST not in found:
                raise FileNotFoundError(
                    f"No checkpoint in {_subdir(dirpath, _BEST)!r}.")
            mngr = found[_BEST]
            scores, mode = _scores(mngr)
            step = _best_of(scores, mode)
            if step is None:
                raise FileNotFoundError(
                    f"The checkpoints in {_subdir(dirpath, _BEST)!r} have no "
                    "recorded metric.")
        else:
            step = int(which)
            holders = [m for m in found.values() if step in m.all_steps()]
            if not holders:
                available = sorted({s for m in found.values()
                                    for s in m.all_steps()})
                raise ValueError(
                    f"`which={step}` is not a saved step of {dirpath!r}; "
                    f"available steps: {available}.")
            mngr = holders[0]
        target = trainer.state_dict()
        state = mngr.restore(step, args=ocp.args.StandardRestore(target))
    finally:
        for m in readers.values():
            if m is not None:
                m.close()
    trainer.load_state_dict(state)
    return int(trainer.step)


def restore_checkpoint(trainer, dirpath, which="last") -> int:
    """Loads a checkpoint written by :class:`ModelCheckpoint` into a trainer.

    Works in a fresh process: build the trainer as for training, restore,
    then call ``fit`` again.

    Args:
      trainer: a :class:`~artifex_fn.training.trainer.Trainer` built with the
        same model and optimizer structure as the one that was saved; its
        current ``state_dict()`` gives the structure and dtypes to restore.
      dirpath: the ``CheckpointConfig.dirpath`` of the run.
      which: ``"last"`` (the most recent saved step, found in ``last``,
        or in ``best`` when ``last`` is absent or older), ``"best"`` (the
        best by the monitored metric, among equal scores the latest) or a
        step number.

    Returns:
      The restored step (the new ``trainer.step``).

    Raises:
      FileNotFoundError: if ``dirpath`` holds no checkpoint.
      ValueError: for a bad ``which`` or a step that was not saved.
    """
    if not isinstance(dirpath, (str, os.PathLike)):
        raise ValueError(
            f"`dirpath` must be a path (str or os.PathLike), got {dirpath!r}.")
    return _restore_into(trainer, _normalize_path(dirpath), which)


class ModelCheckpoint(Callback):
    """Saves the trainer's state, keeping the best and the latest checkpoints.

    On every ``on_train_batch_end`` where ``trainer.step`` is a multiple of
    ``config.every_n_steps``, reads the ``monitor`` metric (the only host
    sync it adds, and only on those steps) and saves ``trainer.state_dict()``
    with it: under ``<dirpath>/best`` if it ranks among the ``save_top_k``
    best (Orbax deletes the checkpoint it displaces), and under
    ``<dirpath>/last`` (only the most recent kept) if ``save_last``. A
    ``NaN`` score is never kept as a best one. ``on_train_end`` waits for
    background writes and closes the managers; a later ``fit`` reopens them.

    Training must continue from the latest checkpoint of ``dirpath`` or a
    later state: if the directory holds checkpoints numbered after
    ``trainer.step`` when training begins (a fresh trainer pointed at an old
    run, or a trainer restored to an earlier checkpoint), ``on_train_begin``
    raises rather than mixing two runs; restore first, or use another
    ``dirpath``.

    Args:
      config: a :class:`CheckpointConfig`.

    Example::

      ckpt = ModelCheckpoint(CheckpointConfig(
          dirpath="checkpoints/grpo", monitor="mean_reward", mode="max",
          save_top_k=1))
      trainer.fit(data, num_steps=1000, callbacks=[ckpt])
      ckpt.restore(trainer, "best")
    """

    def __init__(self, config: CheckpointConfig):
        if not isinstance(config, CheckpointConfig):
            raise TypeError(
                "`config` must be a CheckpointConfig, got "
                f"{type(config).__name__}.")
        self.config = config
        self._best_mngr = None
        self._last_mngr = None
        self._scores: dict[int, float] | None = None

    # -- managers ---------------------------------------------------------
    def _options(self, **kwargs) -> ocp.CheckpointManagerOptions:
        return ocp.CheckpointManagerOptions(
            create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=bool(self.config.async_save), **kwargs)

    def _open(self, trainer) -> None:
        if self._best_mngr is not None:
            return
        cfg = self.config
        monitor = cfg.monitor
        best = ocp.CheckpointManager(
            _subdir(cfg.dirpath, _BEST),
            item_handlers=ocp.StandardCheckpointHandler(),
            options=self._options(
                max_to_keep=None if cfg.save_top_k == -1 else cfg.save_top_k,
                best_fn=lambda metrics: metrics[monitor], best_mode=cfg.mode,
                keep_checkpoints_without_metrics=False))
        last = None
        if cfg.save_last:
            last = ocp.CheckpointManager(
                _subdir(cfg.dirpath, _LAST),
                item_handlers=ocp.StandardCheckpointHandler(),
                options=self._options(max_to_keep=1))
        try:
            ranking = self._check_directory(trainer, best, last)
        except Exception:
            for m in (best, last):
                if m is not None:
                    m.close()
            raise
        self._best_mngr, self._last_mngr = best, last
        self._scores = {s: score for s, (score, _, _) in ranking.items()}

    def _check_directory(self, trainer, best, last):
        """The existing ranking; refuses a directory of another run."""
        cfg = self.config
        later = sorted({int(s) for m in (best, last) if m is not None
                        for s in m.all_steps() if s > trainer.step})
        if later:
            raise ValueError(
                f"{cfg.dirpath!r} holds checkpoints of steps {later}, after "
                f"the trainer's step {trainer.step}: resume with "
                "`restore_checkpoint(trainer, dirpath)` before training, or "
                "set CheckpointConfig.dirpath to a new directory.")
        ranking = _ranking(best)
        other = sorted({(monitor, mode) for _, monitor, mode
                        in ranking.values()} - {(cfg.monitor, cfg.mode)})
        if other:
            raise ValueError(
                f"The best checkpoints in {cfg.dirpath!r} are ranked by "
                f"(monitor, mode) {other}, not ({cfg.monitor!r}, "
                f"{cfg.mode!r}): use the same `monitor` and `mode`, or "
                "another dirpath.")
        return ranking

    def wait_until_finished(self) -> None:
        """Blocks until background checkpoint writes are complete."""
        for m in (self._best_mngr, self._last_mngr):
            if m is not None:
                m.wait_until_finished()

    def close(self) -> None:
        """Waits for pending writes and closes the Orbax managers."""
        managers = (self._best_mngr, self._last_mngr)
        self._best_mngr = self._last_mngr = None
        for m in managers:
            if m is not None:
                m.close()

    # -- hooks ------------------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        """Opens the checkpoint directories (see the class docstring)."""
        self._open(trainer)

    def on_train_batch_end(self, trainer, metrics: dict[str, Any],
                           step: int) -> None:
        """Saves the trainer's state if ``trainer.step`` is a save step."""
        cfg = self.config
        if cfg.monitor not in metrics:
            raise ValueError(
                f"`monitor={cfg.monitor!r}` is not among the step's metrics "
                f"{sorted(metrics)}; set CheckpointConfig.monitor to one of "
                "them.")
        number = int(trainer.step)
        if number % cfg.every_n_steps:
            return
        self._open(trainer)
        value = np.asarray(metrics[cfg.monitor])
        if value.size != 1:
            raise ValueError(
                f"metric {cfg.monitor!r} must be a scalar to rank "
                f"checkpoints, got shape {value.shape}.")
        score = float(value.reshape(()))
        state = trainer.state_dict()
        custom = {"monitor": cfg.monitor, "mode": cfg.mode}
        if self._enters_top_k(score):
            self._best_mngr.save(
                number, args=ocp.args.StandardSave(state),
                metrics={cfg.monitor: score}, custom_metadata=custom,
                force=True)
            kept = set(self._best_mngr.all_steps())
            self._scores[number] = score
            self._scores = {s: v for s, v in self._scores.items() if s in kept}
        if self._last_mngr is not None:
            self._last_mngr.save(number, args=ocp.args.StandardSave(state),
                                 custom_metadata=custom, force=True)

    def on_train_end(self, trainer) -> None:
        """Saves the final state to ``last`` and closes the managers.

        With ``every_n_steps > 1`` the last steps of a run may fall between
        save steps; the final state is written to ``<dirpath>/last`` (not
        ranked) so that a resumed run continues from where this one ended.
        """
        last = self._last_mngr
        if (last is not None and trainer.step > 0
                and trainer.step not in set(last.all_steps())):
            custom = {"monitor": self.config.monitor, "mode": self.config.mode}
            last.save(int(trainer.step),
                      args=ocp.args.StandardSave(trainer.state_dict()),
                      custom_metadata=custom, force=True)
        self.close()

    # -- queries ----------------------------------------------------------
    def _enters_top_k(self, score: float) -> bool:
        if math.isnan(score):
            return False
        k = self.config.save_top_k
        if k == -1 or len(self._scores) < k:
            return True
        if self.config.mode == "max":
            return score >= min(self._scores.values())
        return score <= max(self._scores.values())

    def _current_scores(self) -> dict[int, float]:
        if self._scores is not None:
            return self._scores
        mngr = _open_reader(_subdir(self.config.dirpath, _BEST))
        if mngr is None:
            return {}
        try:
            return _scores(mngr)[0]
        finally:
            mngr.close()

    @property
    def best_step(self) -> int | None:
        """Step of the best kept checkpoint, or None if there is none."""
        return _best_of(self._current_scores(), self.config.mode)

    @property
    def best_score(self) -> float | None:
        """``monitor`` value of the best kept checkpoint, or None."""
        scores = self._current_scores()
        step = _best_of(scores, self.config.mode)
        return None if step is None else scores[step]

    def restore(self, trainer, which="last") -> int:
        """Loads a checkpoint of this callback's directory into ``trainer``.

        Args:
          trainer: the trainer to load into (see :func:`restore_checkpoint`).
          which: ``"last"``, ``"best"`` or a step number.

        Returns:
          The restored step (the new ``trainer.step``).
        """
        self.wait_until_finished()
        return _restore_into(trainer, self.config.dirpath, which)
