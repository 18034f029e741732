"""What a run leaves in its ``--out`` directory.

* ``config.json``: the resolved task, algorithm, settings, hyper-parameters,
  sweep, seeds and library versions (enough to rerun it);
* ``metrics.jsonl``: one JSON object per (iteration, seed, sweep point),
  appended after every compiled chunk, so an interrupted run keeps its
  curve;
* ``summary.json``: evaluations before and after training per seed and
  sweep point, their means, compile time and throughput;
* ``curve.png``: the learning curve, mean over seeds with the min-max band,
  one line per sweep point;
* ``checkpoint/``: the final parameters of every run (an orbax checkpoint
  of a pytree with leading ``[seeds, sweep points]`` axes), read back by
  :func:`load_checkpoint`;
* ``state/`` (only while a run is interrupted): everything needed to
  continue it bit for bit, written by :func:`save_state` (the whole carry
  of the compiled loop, the metrics so far and a JSON manifest).

Every write raises :class:`WriteError`, an ``OSError`` whose message names
the file, when the operating system refuses it (disk full, permissions).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import platform
import shutil
import time
from typing import Any, Mapping

import numpy as np


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def made_on() -> str:
    """When and where a figure or table was made: date, CPU, CPU count."""
    return (f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, "
            f"{os.cpu_count()} CPUs")


class WriteError(OSError):
    """Writing one of a run's files failed; ``str()`` names the path."""

    def __init__(self, path: str, cause: OSError):
        self.path = path
        self.cause = cause
        if cause.errno == errno.ENOSPC:
            what = "no space left on device"
        elif cause.strerror:
            what = cause.strerror[:1].lower() + cause.strerror[1:]
        else:
            what = str(cause) or type(cause).__name__
        super().__init__(cause.errno, f"{what} while writing {path}")

    def __str__(self) -> str:
        return self.strerror


@contextlib.contextmanager
def writing(path: str):
    """Turns an ``OSError`` raised inside into a :class:`WriteError` for ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(path, e) from e


def _finite_or_none(x: float):
    x = float(x)
    return x if math.isfinite(x) else None


class MetricsWriter:
    """Appends per-iteration metrics of an ``[S, V]`` grid to ``metrics.jsonl``.

    ``keep_bytes`` (resuming a run) keeps the file's first ``keep_bytes``
    bytes, the rows written up to the saved state, and appends after them;
    by default the file starts empty. ``position`` is the file's length
    after the last chunk written.
    """

    def __init__(self, path: str, *, points: list[dict[str, float]],
                 samples_per_iteration: int, keep_bytes: int | None = None):
        self.path = path
        self.points = points
        self.samples_per_iteration = samples_per_iteration
        with writing(path):
            if keep_bytes is None:
                self._file = open(path, "w", encoding="utf-8")
            else:
                self._file = open(path, "r+", encoding="utf-8")
                self._file.truncate(keep_bytes)
                self._file.seek(keep_bytes)
        self.position = 0 if keep_bytes is None else keep_bytes

    def write_chunk(self, first_iteration: int,
                    metrics: Mapping[str, np.ndarray]) -> None:
        names = sorted(metrics)
        arrays = [np.asarray(metrics[k], np.float64) for k in names]
        s, v, length = arrays[0].shape
        lines = []
        for j in range(length):
            it = first_iteration + j + 1
            for si in range(s):
                for vi in range(v):
                    row = dict(iteration=it,
                               samples=it * self.samples_per_iteration,
                               seed=si, **self.points[vi])
                    for k, a in zip(names, arrays):
                        row[k] = _finite_or_none(a[si, vi, j])
                    lines.append(json.dumps(row))
        with writing(self.path):
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
            self.position = self._file.tell()

    def close(self) -> None:
        with writing(self.path):
            self._file.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str, obj) -> None:
    """Writes ``obj`` as indented JSON (numpy arrays as lists)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n"
    with writing(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def label_of(point: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in point.items()) or "default"


def plot_curve(path: str, metrics: Mapping[str, np.ndarray], *, curve: str,
               points: list[dict[str, float]], samples_per_iteration: int,
               title: str) -> None:
    """Saves the learning curve of ``metrics[curve]`` (``[S, V, N]``) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(metrics[curve], np.float64)
    x = np.arange(1, y.shape[-1] + 1) * samples_per_iteration
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for vi, point in enumerate(points):
        runs = y[:, vi, :]
        mean = np.nanmean(runs, axis=0)
        line, = ax.plot(x, mean, lw=1.6, label=label_of(point))
        if runs.shape[0] > 1:
            ax.fill_between(x, np.nanmin(runs, axis=0), np.nanmax(runs, axis=0),
                            color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("environment steps" if samples_per_iteration > 1 and
                  "return" in curve else "samples")
    ax.set_ylabel(curve)
    spread = " (mean over %d seeds, band: min-max)" % y.shape[0] if (
        y.shape[0] > 1) else ""
    ax.set_title(title + spread, fontsize=9)
    ax.grid(alpha=0.3)
    if len(points) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with writing(path):
            fig.savefig(path)
    finally:
        plt.close(fig)


def _pure(tree):
    """NNX states and lists as plain nested dicts with string keys."""
    from flax import nnx
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    if isinstance(tree, Mapping):
        return {str(k): _pure(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {str(i): _pure(v) for i, v in enumerate(tree)}
    return np.asarray(tree)


def save_checkpoint(directory: str, params) -> str:
    """Writes ``params`` (any pytree of arrays) as an orbax checkpoint."""
    import orbax.checkpoint as ocp

    path = directory
    directory = os.path.abspath(directory)
    with writing(path):
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(directory, _pure(params), force=True)
    return directory


def load_checkpoint(directory: str):
    """Reads the parameters written by a run (leading ``[seeds, points]`` axes).

    Accepts the run's ``--out`` directory or its ``checkpoint`` folder.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if os.path.isdir(os.path.join(directory, "checkpoint")):
        directory = os.path.join(directory, "checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(directory)


# -- the resumable state of an interrupted run ---------------------------------

STATE_FORMAT = 1


def _write_state_files(directory: str, manifest: Mapping[str, Any],
                       arrays: Mapping[str, np.ndarray]) -> None:
    os.makedirs(directory)
    for name, write in (
            ("arrays.npz", lambda f: np.savez(f, **arrays)),
            ("manifest.json", lambda f: f.write(json.dumps(
                dict(manifest, format=STATE_FORMAT), indent=2, sort_keys=True,
                default=_jsonable).encode()))):
        with open(os.path.join(directory, name), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def save_state(directory: str, manifest: Mapping[str, Any],
               arrays: Mapping[str, np.ndarray]) -> None:
    """Writes a run's resumable state atomically into ``directory``.

    ``arrays`` go to ``arrays.npz``, ``manifest`` (JSON) to
    ``manifest.json``. Both are written into a temporary folder beside
    ``directory`` that is then renamed, so ``directory`` always holds a
    complete state: the new one, or (if the writing failed) the old one.
    """
    directory = directory.rstrip(os.sep)
    parent, name = os.path.split(directory)
    tmp = os.path.join(parent, f".{name}.tmp")
    old = os.path.join(parent, f".{name}.old")
    with writing(directory):
        for stale in (tmp, old):
            if os.path.lexists(stale):
                shutil.rmtree(stale)
        try:
            _write_state_files(tmp, manifest, arrays)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.lexists(directory):
            os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)


def state_path(directory: str) -> str | None:
    """The complete saved state at ``directory``, or None.

    Falls back to the previous state (``.NAME.old``) when a save stopped
    between its two renames.
    """
    directory = directory.rstrip(os.sep)
    parent, name = os.path.split(directory)
    for path in (directory, os.path.join(parent, f".{name}.old")):
        if os.path.isfile(os.path.join(path, "manifest.json")):
            return path
    return None


def load_state(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(manifest, arrays)`` written by :func:`save_state`.

    Raises ValueError (naming the folder) when the state cannot be read.
    """
    path = state_path(directory)
    if path is None:
        raise ValueError(f"{directory}: no saved state (manifest.json "
                         f"missing)")
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        with np.load(os.path.join(path, "arrays.npz"),
                     allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the saved state ({e})") from e
    if manifest.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: saved state of format "
                         f"{manifest.get('format')!r}; this version reads "
                         f"format {STATE_FORMAT}")
    return manifest, arrays


def remove_state(directory: str) -> None:
    """Removes a saved state and any leftovers of an unfinished save."""
    directory = directory.rstrip(os.sep)
    parent, name = os.path.split(directory)
    for path in (directory, os.path.join(parent, f".{name}.tmp"),
                 os.path.join(parent, f".{name}.old")):
        if os.path.lexists(path):
            with writing(path):
                shutil.rmtree(path)
