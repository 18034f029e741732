"""``train``: one task, one algorithm, many seeds and sweep points, files out."""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from artifex_fn.experiments import outputs
from artifex_fn.experiments import runner
from artifex_fn.experiments import tasks as tasks_lib


def resolve(task: str, algo: str, *, steps: int | None = None,
            overrides: Mapping[str, Any] | None = None):
    """Splits ``overrides`` into settings and hyper-parameters of the task.

    Returns ``(task, settings, hparams)``; unknown names raise a ValueError
    that lists the valid ones.
    """
    t = tasks_lib.get_task(task)
    tasks_lib.check_algo(t, algo)
    settings, hparams = t.settings(algo), t.hparams(algo)
    for name, value in (overrides or {}).items():
        if name in hparams:
            hparams[name] = float(value)
        elif name in settings:
            default = settings[name]
            if isinstance(default, bool):
                value = value if isinstance(value, bool) else (
                    str(value).lower() in ("1", "true", "yes", "on"))
            elif isinstance(default, int):
                as_float = float(value)
                if as_float != int(as_float):
                    raise ValueError(
                        f"setting {name!r} must be an integer, got {value!r}.")
                value = int(as_float)
            settings[name] = value
        else:
            raise ValueError(
                f"{name!r} is not a setting or hyper-parameter of "
                f"{task}/{algo}; settings: {sorted(settings)}; "
                f"hyper-parameters: {sorted(hparams)}.")
    if steps is not None:
        if int(steps) < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}.")
        settings[t.steps_key[algo]] = int(steps)
    return t, settings, hparams


def _versions() -> dict[str, str]:
    from importlib import metadata
    out = dict(python=platform.python_version())
    for name in ("artifex-fn", "jax", "jaxlib", "flax", "optax", "distrax",
                 "gymnax"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def train(task: str, algo: str, *, seeds: int = 1, seed: int = 0,
          steps: int | None = None,
          overrides: Mapping[str, Any] | None = None,
          sweep: Mapping[str, Sequence[float]] | None = None,
          out: str | None = None, chunks: int = 20, progress: bool = True,
          plot: bool = True, checkpoint: bool = True,
          log=print) -> dict[str, Any]:
    """Trains ``task`` with ``algo`` and writes the run's files to ``out``.

    ``seeds`` runs and every point of ``sweep`` share one compiled program
    (see :func:`artifex_fn.experiments.runner.run`). Returns the summary
    (also written to ``out/summary.json``): ``before``/``after`` means and
    per-run values of the task's score, throughput and timings, and the
    paths written.
    """
    t, settings, hparams = resolve(task, algo, steps=steps,
                                   overrides=overrides)
    grid, points = runner.sweep_grid(hparams, sweep)
    program = t.program(algo, settings)
    if out is None:
        out = os.path.join("runs", f"{task}-{algo}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    config = dict(task=task, algo=algo, seeds=seeds, seed=seed,
                  settings=settings, hparams=hparams,
                  sweep={k: list(map(float, v)) for k, v in (sweep or {}).items()},
                  iterations=program.num_iterations,
                  samples_per_iteration=program.samples_per_iteration,
                  chunks=chunks, command=" ".join(sys.argv),
                  versions=_versions())
    outputs.write_json(os.path.join(out, "config.json"), config)
    writer = outputs.MetricsWriter(
        os.path.join(out, "metrics.jsonl"), points=points,
        samples_per_iteration=program.samples_per_iteration)
    try:
        result = runner.run(program, hparams=hparams, sweep=sweep,
                            num_seeds=seeds, seed=seed, chunks=chunks,
                            progress=progress, on_chunk=writer.write_chunk)
    finally:
        writer.close()
    files = dict(config="config.json", metrics="metrics.jsonl",
                 summary="summary.json")
    if plot:
        outputs.plot_curve(
            os.path.join(out, "curve.png"), result.metrics,
            curve=program.curve, points=points,
            samples_per_iteration=program.samples_per_iteration,
            title=f"{task} / {algo}: {program.description}")
        files["curve"] = "curve.png"
    if checkpoint:
        outputs.save_checkpoint(os.path.join(out, "checkpoint"), result.params)
        files["checkpoint"] = "checkpoint"
    score = program.score
    per_point = []
    for vi, point in enumerate(points):
        per_point.append(dict(
            point=point,
            before=float(np.mean(result.before[score][:, vi])),
            after=float(np.mean(result.after[score][:, vi])),
            after_per_seed=result.after[score][:, vi].tolist(),
            after_min=float(np.min(result.after[score][:, vi]))))
    summary = dict(
        task=task, algo=algo, score=score, seeds=seeds, points=per_point,
        before={k: v.tolist() for k, v in result.before.items()},
        after={k: v.tolist() for k, v in result.after.items()},
        compile_seconds=result.compile_seconds,
        run_seconds=result.run_seconds,
        samples=result.samples,
        samples_per_second=result.samples_per_second,
        devices=result.devices,
        final_metrics={k: v[..., -1].tolist()
                       for k, v in result.metrics.items()},
        files=files, out=out)
    outputs.write_json(os.path.join(out, "summary.json"), summary)
    if log is not None:
        for p in per_point:
            log(f"{task}/{algo} [{outputs.label_of(p['point'])}] {score}: "
                f"{p['before']:.3f} -> {p['after']:.3f} "
                f"(mean of {seeds} seed{'s' * (seeds > 1)}; worst seed "
                f"{p['after_min']:.3f})")
        spread = (f" over {result.devices} devices"
                  if result.devices > 1 else "")
        log(f"compile {result.compile_seconds:.1f} s, train "
            f"{result.run_seconds:.1f} s{spread}, "
            f"{result.samples_per_second:,.0f} samples/s; files in {out}")
    return summary
