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
  :func:`load_checkpoint`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


def _finite_or_none(x: float):
    x = float(x)
    return x if math.isfinite(x) else None


class MetricsWriter:
    """Appends per-iteration metrics of an ``[S, V]`` grid to ``metrics.jsonl``."""

    def __init__(self, path: str, *, points: list[dict[str, float]],
                 samples_per_iteration: int):
        self.path = path
        self.points = points
        self.samples_per_iteration = samples_per_iteration
        self._file = open(path, "w", encoding="utf-8")

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
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
        f.write("\n")


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
    fig.savefig(path)
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

    directory = os.path.abspath(directory)
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
