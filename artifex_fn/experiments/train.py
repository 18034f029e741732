"""``train``: one task, one algorithm, many seeds and sweep points, files out.

Everything is checked before anything is traced: every setting and
hyper-parameter against its task's declared range
(:class:`artifex_fn.experiments.tasks.Range`), the budget against one
iteration, the output directory. Bad values raise a ValueError naming the
field, the value and the valid range; a failed write raises
:class:`artifex_fn.experiments.outputs.WriteError` naming the file.

A run stops cleanly on Ctrl-C (SIGINT) at the end of the running chunk: it
saves its whole state in ``out/state/`` and its outputs so far, and
``resume=True`` continues it later, bit for bit as if it had never
stopped (same machine, same device count).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from artifex_fn.experiments import outputs
from artifex_fn.experiments import runner
from artifex_fn.experiments import tasks as tasks_lib

# What a run writes into its directory; ``overwrite`` removes these only.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "curve.png",
             "samples.txt", "checkpoint", "state")
# The fields a resumed run must share with the saved one.
RESUME_FIELDS = ("task", "algo", "settings", "hparams", "sweep", "seeds",
                 "seed", "chunks")
SIGINT_MODES = ("stop", "stop-then-kill", None)


def check_value(t, algo: str, name: str, value):
    """``value`` of the setting or hyper-parameter ``name``, checked.

    Returns it as its declared type (bool, int or float). Raises a
    ValueError naming the field, the value and the valid range, or, for an
    unknown name, listing the valid ones.
    """
    ranges = t.ranges(algo)
    if name not in ranges:
        settings, hparams = t.settings(algo), t.hparams(algo)
        raise ValueError(
            f"{name!r} is not a setting or hyper-parameter of "
            f"{t.name}/{algo}; settings: {sorted(settings)}; "
            f"hyper-parameters: {sorted(hparams)}.")
    try:
        return ranges[name].check(name, value)
    except ValueError as e:
        raise ValueError(f"{e} ({t.name}/{algo})") from None


def check_sweep(t, algo: str, name: str, values) -> list[float]:
    """The values of a ``sweep`` over ``name``, checked (see :func:`check_value`)."""
    hparams = t.hparams(algo)
    if name not in hparams:
        kind = ("a setting (it changes shapes or loop lengths)"
                if name in t.settings(algo) else "not a hyper-parameter")
        raise ValueError(
            f"cannot sweep {name!r}: {kind} of {t.name}/{algo}; sweepable: "
            f"{', '.join(sorted(hparams))}.")
    if (isinstance(values, (str, bytes, Mapping))
            or not isinstance(values, (Sequence, np.ndarray))):
        raise ValueError(f"the values of {name!r} must be a list of numbers, "
                         f"got {values!r}")
    if len(values) == 0:
        raise ValueError(f"sweep over {name!r} has no values.")
    return [check_value(t, algo, name, v) for v in values]


def _check_int(label: str, value, minimum: int) -> int:
    return tasks_lib.Range.count(minimum).check(label, value)


def resolve(task: str, algo: str, *, steps: int | None = None,
            overrides: Mapping[str, Any] | None = None):
    """Splits ``overrides`` into settings and hyper-parameters of the task.

    Returns ``(task, settings, hparams)``. Every value is checked against
    its declared range, the settings against each other, and the budget
    (``steps``, or the task's own) against one iteration; a ValueError
    names the field, the value and the valid range (unknown names: the
    valid ones).
    """
    t = tasks_lib.get_task(task)
    tasks_lib.check_algo(t, algo)
    settings, hparams = t.settings(algo), t.hparams(algo)
    for name, value in (overrides or {}).items():
        value = check_value(t, algo, name, value)
        if name in hparams:
            hparams[name] = float(value)
        else:
            settings[name] = value
    key = t.steps_key[algo]
    if steps is not None:
        if (isinstance(steps, bool) or not isinstance(steps, numbers.Real)
                or not math.isfinite(steps) or int(steps) < 1):
            raise ValueError(f"--steps must be >= 1, got {steps}.")
        settings[key] = _check_int("--steps", steps, 1)
    try:
        t.check_settings(algo, settings)
    except ValueError as e:
        raise ValueError(f"{e} ({task}/{algo})") from None
    per_iteration, formula, unit = t.iteration_budget(algo, settings)
    if settings[key] < per_iteration:
        given = (f"--steps {settings[key]}" if steps is not None else
                 f"{key}={settings[key]}" + (
                     "" if key in (overrides or {}) else " (the default)"))
        raise ValueError(
            f"{given} is less than one iteration of {task}/{algo} "
            f"({formula} = {per_iteration} {unit}); use --steps >= "
            f"{per_iteration}.")
    return t, settings, hparams


def budget_note(t, algo: str, settings: Mapping[str, Any]) -> str | None:
    """A note when the budget is not a whole number of iterations.

    The run then trains the whole iterations it holds (the budget rounded
    down); None when nothing is rounded.
    """
    key = t.steps_key[algo]
    per_iteration, formula, unit = t.iteration_budget(algo, settings)
    total = settings[key]
    if per_iteration <= 1 or total % per_iteration == 0:
        return None
    n = total // per_iteration
    return (f"note: {key}={total} is not a multiple of one iteration of "
            f"{t.name}/{algo} ({formula} = {per_iteration} {unit}); training "
            f"{n} iteration{'s' * (n > 1)} = {n * per_iteration} {unit}.")


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


def _is_run_file(name: str) -> bool:
    return (name in RUN_FILES or name.startswith("checkpoint.")
            or name.startswith(".state."))


def prepare_out(out: str, *, overwrite: bool = False,
                resume: bool = False) -> None:
    """Checks (and creates, or with ``overwrite`` empties) the directory ``out``.

    A directory that is not empty is refused unless ``overwrite`` (its
    run files are removed; anything else in it is refused, never deleted)
    or ``resume`` (it must hold the saved state of an interrupted run).
    Raises a ValueError naming the path.
    """
    if overwrite and resume:
        raise ValueError("--overwrite and --resume exclude each other.")
    if not out:
        raise ValueError("--out must be a directory path, got ''.")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory.")
    if os.path.isdir(out):
        try:
            entries = sorted(os.listdir(out))
        except OSError as e:
            raise ValueError(f"--out {out}: cannot read it "
                             f"({e.strerror or e}).") from None
        if resume:
            if outputs.state_path(os.path.join(out, "state")) is None:
                raise ValueError(
                    f"--resume: {out} holds no saved state of an interrupted "
                    f"run (no {os.path.join(out, 'state')}); pass --overwrite "
                    f"to start again.")
        elif entries and not overwrite:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4
                                               else "")
            raise ValueError(
                f"--out {out} is not empty ({shown}); pass --overwrite to "
                f"replace it or --resume to continue the run saved there.")
        elif entries:
            foreign = [e for e in entries if not _is_run_file(e)]
            if foreign:
                raise ValueError(
                    f"--overwrite: {out} holds files that are not a run's "
                    f"({', '.join(foreign[:4])}); refusing to delete them, "
                    f"choose another --out.")
            for name in entries:
                path = os.path.join(out, name)
                try:
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)
                except OSError as e:
                    raise ValueError(f"--overwrite: cannot remove {path} "
                                     f"({e.strerror or e}).") from None
    else:
        if resume:
            raise ValueError(f"--resume: {out} does not exist.")
        try:
            os.makedirs(out)
        except OSError as e:
            raise ValueError(f"--out {out}: cannot create it "
                             f"({e.strerror or e}).") from None
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: not writable "
                         f"({e.strerror or e}).") from None


class _StopFlag:
    """``should_stop`` for the runner, set by the SIGINT handler."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested


@contextlib.contextmanager
def _stop_on_sigint(mode: str | None):
    """While inside, a first SIGINT only sets the yielded flag.

    A second one raises KeyboardInterrupt (``mode="stop"``) or ends the
    process at once (``"stop-then-kill"``: the default action, even inside
    a compiled call). Nothing is installed outside the main thread or with
    ``mode=None``.
    """
    flag = _StopFlag()
    if (mode is None
            or threading.current_thread() is not threading.main_thread()):
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        print("artifex-fn: interrupted; stopping after the current chunk to "
              "save the run (Ctrl-C again aborts without saving)",
              file=sys.stderr, flush=True)
        if mode == "stop-then-kill":
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None
                      else signal.SIG_DFL)


def _state_arrays(state: runner.RunState) -> dict[str, np.ndarray]:
    arrays = {f"carry.{i}": np.asarray(x) for i, x in enumerate(state.carry)}
    arrays.update({f"metrics.{k}": v for k, v in state.metrics.items()})
    arrays.update({f"before.{k}": v for k, v in state.before.items()})
    return arrays


def _load_run_state(out: str, config: Mapping[str, Any]):
    """The saved state in ``out`` as ``(RunState, metrics bytes)``, after
    checking that it belongs to a run of ``config``."""
    manifest, arrays = outputs.load_state(os.path.join(out, "state"))
    saved = manifest.get("config", {})
    differ = [k for k in RESUME_FIELDS if saved.get(k) != config[k]]
    if differ:
        k = differ[0]
        raise ValueError(
            f"--resume: the run saved in {out} has {k}={saved.get(k)!r}, this "
            f"command {k}={config[k]!r}" + (
                f" (and differs in {', '.join(differ[1:])})" if differ[1:]
                else "") + "; repeat the original command with --resume, or "
            "pass --overwrite to start again.")
    metrics_path = os.path.join(out, "metrics.jsonl")
    size = os.path.getsize(metrics_path) if os.path.isfile(metrics_path) else -1
    if size < manifest["metrics_bytes"]:
        raise ValueError(f"--resume: {metrics_path} is shorter than the saved "
                         f"state says ({manifest['metrics_bytes']} bytes); "
                         f"pass --overwrite to start again.")
    try:
        state = runner.RunState(
            carry=[arrays[f"carry.{i}"]
                   for i in range(manifest["carry_leaves"])],
            iterations_done=int(manifest["iterations_done"]),
            chunk_length=int(manifest["chunk_length"]),
            num_iterations=int(manifest["num_iterations"]),
            metrics={k[len("metrics."):]: v for k, v in arrays.items()
                     if k.startswith("metrics.")},
            before={k[len("before."):]: v for k, v in arrays.items()
                    if k.startswith("before.")},
            run_seconds=float(manifest["run_seconds"]))
    except KeyError as e:
        raise ValueError(f"--resume: the saved state in {out} is incomplete "
                         f"(missing {e}); pass --overwrite to start "
                         f"again.") from None
    return state, int(manifest["metrics_bytes"])


def train(task: str, algo: str, *, seeds: int = 1, seed: int = 0,
          steps: int | None = None,
          overrides: Mapping[str, Any] | None = None,
          sweep: Mapping[str, Sequence[float]] | None = None,
          out: str | None = None, chunks: int = 20, progress: bool = True,
          plot: bool = True, checkpoint: bool = True,
          overwrite: bool = False, resume: bool = False,
          sigint: str | None = "stop", log=print) -> dict[str, Any]:
    """Trains ``task`` with ``algo`` and writes the run's files to ``out``.

    ``seeds`` runs and every point of ``sweep`` share one compiled program
    (see :func:`artifex_fn.experiments.runner.run`). Returns the summary
    (also written to ``out/summary.json``): ``before``/``after`` means and
    per-run values of the task's score, throughput and timings, and the
    paths written.

    Every argument is checked before anything is traced (ValueError naming
    the field, the value and the range). ``out`` must be new or empty,
    unless ``overwrite`` (its run files are removed first) or ``resume``
    (the interrupted run saved there continues; every field of
    :data:`RESUME_FIELDS` must be the saved run's). A failed write raises
    :class:`artifex_fn.experiments.outputs.WriteError`.

    ``sigint="stop"`` (in the main thread): Ctrl-C stops the run at the
    end of the running chunk, saves its state (``out/state/``), the
    checkpoint, the metrics and a summary with ``interrupted: True``, and
    returns that summary; a second Ctrl-C raises KeyboardInterrupt
    (``"stop-then-kill"``: ends the process at once); ``None`` leaves
    SIGINT alone.
    """
    if sigint not in SIGINT_MODES:
        raise ValueError(f"`sigint` must be one of {SIGINT_MODES}, got "
                         f"{sigint!r}.")
    t, settings, hparams = resolve(task, algo, steps=steps,
                                   overrides=overrides)
    sweep = {name: check_sweep(t, algo, name, values)
             for name, values in (sweep or {}).items()}
    seeds = _check_int("--seeds", seeds, 1)
    seed = _check_int("--seed", seed, 0)
    chunks = _check_int("--chunks", chunks, 1)
    _, points = runner.sweep_grid(hparams, sweep)
    if out is None:
        out = os.path.join("runs", f"{task}-{algo}-{time.strftime('%Y%m%d-%H%M%S')}")
    prepare_out(out, overwrite=overwrite, resume=resume)
    note = budget_note(t, algo, settings)
    if note is not None and log is not None:
        log(note)
    config = dict(task=task, algo=algo, seeds=seeds, seed=seed,
                  settings=settings, hparams=hparams, sweep=sweep,
                  chunks=chunks)
    state_dir = os.path.join(out, "state")
    run_state, keep_bytes = (_load_run_state(out, config) if resume
                             else (None, None))
    with _stop_on_sigint(sigint) as stop:
        program = t.program(algo, settings)
        if not resume:
            outputs.write_json(os.path.join(out, "config.json"), dict(
                config, iterations=program.num_iterations,
                samples_per_iteration=program.samples_per_iteration,
                command=" ".join(sys.argv), versions=_versions()))
        writer = outputs.MetricsWriter(
            os.path.join(out, "metrics.jsonl"), points=points,
            samples_per_iteration=program.samples_per_iteration,
            keep_bytes=keep_bytes)

        def save_state(state: runner.RunState) -> None:
            outputs.save_state(state_dir, dict(
                config=config, carry_leaves=len(state.carry),
                iterations_done=state.iterations_done,
                chunk_length=state.chunk_length,
                num_iterations=state.num_iterations,
                metrics_bytes=writer.position,
                run_seconds=state.run_seconds), _state_arrays(state))

        failed = True
        try:
            result = runner.run(program, hparams=hparams, sweep=sweep,
                                num_seeds=seeds, seed=seed, chunks=chunks,
                                progress=progress, on_chunk=writer.write_chunk,
                                should_stop=stop, on_stop=save_state,
                                resume=run_state)
            failed = False
        finally:
            try:
                writer.close()
            except OSError:
                if not failed:
                    raise
        return _finish(t, algo, program, result, out=out, points=points,
                       seeds=seeds, plot=plot, checkpoint=checkpoint,
                       log=log)


def _finish(t, algo, program, result, *, out, points, seeds, plot,
            checkpoint, log) -> dict[str, Any]:
    """Writes the checkpoint, curve and summary of a finished or stopped run."""
    task = t.name
    interrupted = result.interrupted
    files = dict(config="config.json", metrics="metrics.jsonl",
                 summary="summary.json")
    if checkpoint:
        outputs.save_checkpoint(os.path.join(out, "checkpoint"), result.params)
        files["checkpoint"] = "checkpoint"
    if plot and result.iterations_done:
        outputs.plot_curve(
            os.path.join(out, "curve.png"), result.metrics,
            curve=program.curve, points=points,
            samples_per_iteration=program.samples_per_iteration,
            title=f"{task} / {algo}: {program.description}")
        files["curve"] = "curve.png"
    if interrupted:
        files["state"] = "state"
    if program.show is not None and not interrupted:
        key = jax.random.key(0)
        first = jax.tree_util.tree_map(lambda x: x[0, 0], result.params)
        lines = (["before fine-tuning:"] + program.show(None, key)
                 + ["", "after fine-tuning (seed 0):"]
                 + program.show(first, key))
        with outputs.writing(os.path.join(out, "samples.txt")):
            with open(os.path.join(out, "samples.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
        files["samples"] = "samples.txt"
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
                       for k, v in result.metrics.items() if v.shape[-1]},
        interrupted=interrupted, iterations=result.num_iterations,
        iterations_done=result.iterations_done,
        files=files, out=out)
    outputs.write_json(os.path.join(out, "summary.json"), summary)
    if interrupted:
        return summary
    outputs.remove_state(os.path.join(out, "state"))
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
