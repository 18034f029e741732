"""The ``artifex-fn`` command line at its boundaries.

Out-of-range settings and hyper-parameters of every task, malformed config
files, bad flags and output directories are refused with one error line
before anything is compiled; a full disk is one line and exit status 1;
Ctrl-C stops a run at a chunk boundary, and ``--resume`` finishes it with
the parameters of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import errno
import importlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from artifex_fn import experiments
from artifex_fn.experiments import cli
from artifex_fn.experiments import outputs
from artifex_fn.experiments import tasks

# The module (the package's ``train`` attribute is the function).
train_lib = importlib.import_module("artifex_fn.experiments.train")

# The conftest's compilation cache, handed on to the CLI subprocesses.
_CACHE_DIR = jax.config.jax_compilation_cache_dir


@pytest.fixture(autouse=True)
def _no_persistent_cache(monkeypatch, tmp_path):
    # In-process CLI calls leave the test process's JAX config alone, and
    # a default --out (runs/...) would land in tmp_path.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    monkeypatch.chdir(tmp_path)
    jax.devices()


@pytest.fixture
def no_program(monkeypatch):
    """Fails the test if a task's program is built (or anything compiled)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the program was built before the error")
    monkeypatch.setattr(tasks.Task, "program", refuse)


def _cli(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _error_line(err: str) -> str:
    """The one error line of a refused command (after argparse's usage)."""
    assert "Traceback" not in err
    prefixes = ("artifex-fn: error:", "artifex-fn train: error:")
    lines = [l for l in err.splitlines() if l.startswith(prefixes)]
    assert len(lines) == 1, err
    others = [l for l in err.splitlines() if l.strip() and l not in lines
              and not l.startswith(("usage:", " "))]   # argparse's usage
    assert not others, err
    return lines[0]


def _bad_values(valid: tasks.Range):
    """Values just outside ``valid``."""
    if valid.kind == "bool":
        return ["2"]
    bad = []
    if math.isfinite(valid.lo):
        bad.append(valid.lo if valid.lo_open else valid.lo - 1)
    if math.isfinite(valid.hi):
        bad.append(valid.hi if valid.hi_open else valid.hi + 0.5)
    if valid.kind == "int":
        bad.append(valid.lo + 0.5)
    else:
        bad.append("nan")
    return [f"{b:g}" if isinstance(b, float) else str(b) for b in bad]


TASK_ALGOS = [(t.name, a) for t in experiments.TASKS.values() for a in t.algos]


# --- every task declares its ranges ------------------------------------------

@pytest.mark.parametrize("task,algo", TASK_ALGOS)
def test_every_field_has_a_range_and_its_default_is_in_it(task, algo):
    t = experiments.get_task(task)
    settings, hparams = t.settings(algo), t.hparams(algo)
    ranges = t.ranges(algo)
    assert set(ranges) == set(settings) | set(hparams)
    for name, value in {**settings, **hparams}.items():
        assert ranges[name].check(name, value) == value, name


@pytest.mark.parametrize("task,algo", TASK_ALGOS)
def test_out_of_range_values_are_refused_before_compiling(
        task, algo, tmp_path, capsys, no_program):
    """Every setting and hyper-parameter, through --set, --sweep, a config
    file and ``train()``: one line naming the field, the value and the
    range, exit status 2, no output directory."""
    t = experiments.get_task(task)
    hparams = t.hparams(algo)
    out = tmp_path / "run"
    base = ["train", "--task", task, "--algo", algo, "--out", str(out)]
    for name, valid in t.ranges(algo).items():
        for bad in _bad_values(valid):
            code, _, err = _cli(base + ["--set", f"{name}={bad}"], capsys)
            line = _error_line(err)
            assert code == 2, (name, bad, err)
            assert f"--set {name}={bad}: {name} must be {valid}" in line
            assert f"({task}/{algo})" in line
            if name not in hparams:
                continue
            code, _, err = _cli(
                base + ["--sweep", f"{name}={hparams[name]},{bad}"], capsys)
            line = _error_line(err)
            assert code == 2 and f"{name} must be {valid}" in line, err
            assert line.split(": ")[2].startswith("--sweep"), line
            value = float(bad)
            with pytest.raises(ValueError, match=f"{name} must be"):
                train_lib.train(task, algo, overrides={name: value},
                                out=str(out), log=None)
            with pytest.raises(ValueError, match=f"{name} must be"):
                train_lib.train(task, algo, sweep={name: [value]},
                                out=str(out), log=None)
    # A config file's value names the file and the field.
    cfg = tmp_path / "run.json"
    name = sorted(hparams)[0]
    cfg.write_text(json.dumps(dict(task=task, algo=algo,
                                   hparams={name: -1.0})))
    code, _, err = _cli(["train", "--config", str(cfg), "--out", str(out)],
                        capsys)
    assert code == 2
    assert (f"--config {cfg}: hparams.{name}: {name} must be"
            in _error_line(err))
    assert not out.exists()


# --- flags -------------------------------------------------------------------

_PPO = ["--task", "cartpole", "--algo", "ppo"]
FLAG_CASES = [
    (_PPO + ["--chunks", "0"], "--chunks must be >= 1, got 0."),
    (_PPO + ["--chunks", "-3"], "--chunks must be >= 1, got -3."),
    (_PPO + ["--steps", "10"],
     "--steps 10 is less than one iteration of cartpole/ppo (num_envs * "
     "num_steps = 512 environment steps); use --steps >= 512."),
    (_PPO + ["--steps", "1000", "--set", "num_envs=8"],
     "--steps 1000 is less than one iteration of cartpole/ppo (num_envs * "
     "num_steps = 1024 environment steps); use --steps >= 1024."),
    (_PPO + ["--steps", "0"], "--steps must be >= 1, got 0."),
    (_PPO + ["--set", "total_timesteps=100"],
     "total_timesteps=100 is less than one iteration of cartpole/ppo"),
    (_PPO + ["--set", "num_envs=4096"],
     "total_timesteps=500000 (the default) is less than one iteration"),
    (["--task", "cartpole", "--algo", "reinforce", "--steps", "8"],
     "(num_envs = 16 episodes); use --steps >= 16."),
    (_PPO + ["--set", "num_envs=0"],
     "--set num_envs=0: num_envs must be an integer >= 1, got 0"),
    (_PPO + ["--set", "num_envs=2.5"], "num_envs must be an integer >= 1"),
    (_PPO + ["--set", "num_minibatches=3"],
     "num_minibatches=3 must divide num_envs * num_steps = 512"),
    (_PPO + ["--set", "anneal_lr=maybe"],
     "--set anneal_lr=maybe: the value must be a number or true/false."),
    (_PPO + ["--set", "learning_rate=1"],
     "'learning_rate' is not a setting or hyper-parameter of cartpole/ppo"),
    (_PPO + ["--set", "lr"], "--set expects NAME=VALUE"),
    (_PPO + ["--sweep", "num_envs=4,8"],
     "cannot sweep 'num_envs': a setting (it changes shapes or loop lengths)"),
    (_PPO + ["--sweep", "lr="], "sweep over 'lr' has no values."),
    (_PPO + ["--sweep", "lr=a,b"], "values must be numbers"),
    (_PPO + ["--seeds", "0"], "--seeds must be >= 1, got 0."),
    (_PPO + ["--seeds", "four"], "argument --seeds: invalid int value"),
    (_PPO + ["--seed", "-1"], "--seed must be >= 0, got -1."),
    (["--task", "lm", "--algo", "grpo", "--set", "d_model=33"],
     "d_model must be a multiple of the 2 attention heads, got 33 (lm/grpo)"),
    (["--task", "diffusion", "--algo", "dpo", "--set",
      "label_smoothing=0.5"], "label_smoothing must be in [0, 0.5), got 0.5"),
    (_PPO + ["--resume", "--overwrite"],
     "--overwrite and --resume exclude each other."),
]


@pytest.mark.parametrize("argv,message", FLAG_CASES,
                         ids=[" ".join(a[4:]) for a, _ in FLAG_CASES])
def test_bad_flags(argv, message, tmp_path, capsys, no_program):
    out = tmp_path / "run"
    code, _, err = _cli(["train"] + argv + ["--out", str(out)], capsys)
    assert code == 2
    assert message in _error_line(err)
    assert not out.exists()


def test_budget_rounding_note():
    t, settings, _ = train_lib.resolve("cartpole", "ppo", steps=1000)
    assert train_lib.budget_note(t, "ppo", settings) == (
        "note: total_timesteps=1000 is not a multiple of one iteration of "
        "cartpole/ppo (num_envs * num_steps = 512 environment steps); "
        "training 1 iteration = 512 environment steps.")
    t, settings, _ = train_lib.resolve("cartpole", "ppo", steps=1024)
    assert train_lib.budget_note(t, "ppo", settings) is None
    t, settings, _ = train_lib.resolve("lm", "grpo", steps=7)
    assert train_lib.budget_note(t, "grpo", settings) is None


def test_help_lists_the_new_flags(capsys):
    code, out, _ = _cli(["train", "--help"], capsys)
    assert code == 0
    for text in ("--overwrite", "--resume", "Ctrl-C", "exit status"):
        assert text in out
    code, out, _ = _cli(["tasks"], capsys)
    assert code == 0 and "gamma=0.99 (in [0, 1])" in out and "(> 0)" in out


# --- config files ------------------------------------------------------------

_HEAD = 'task = "cartpole"\nalgo = "ppo"\n'
CONFIG_CASES = [
    ("bad.toml", _HEAD + "seeds = \n", "invalid TOML: Invalid value (at line 3"),
    ("bad.json", '{"task": "cartpole",}', "invalid JSON: Expecting property "
     "name enclosed in double quotes (at line 1, column 21)"),
    ("unknown.toml", _HEAD + "sedes = 4\n",
     "unknown key 'sedes' (did you mean 'seeds'?); allowed: algo, chunks"),
    ("seeds.toml", _HEAD + 'seeds = "four"\n',
     "seeds must be an integer >= 1, got 'four'."),
    ("bool.json", '{"seeds": true}', "seeds must be an integer >= 1, got True."),
    ("steps.json", '{"steps": 1.5}', "steps must be an integer >= 1, got 1.5."),
    ("chunks.toml", _HEAD + "chunks = 0\n",
     "chunks must be an integer >= 1, got 0."),
    ("task.toml", "task = 3\n", "task must be a string, got 3."),
    ("settings.toml", _HEAD + "settings = 3\n",
     "settings must be a table of NAME = VALUE, got 3."),
    ("sweep.json", '{"sweep": {"lr": 0.1}}',
     "sweep must be a table of NAME = [VALUES]"),
    ("sweepval.toml", _HEAD + "[sweep]\nlr = [1e-3, -1]\n",
     "sweep.lr: lr must be > 0, got -1 (cartpole/ppo)"),
    ("hparams.toml", _HEAD + "[hparams]\ngamma = 1.5\n",
     "hparams.gamma: gamma must be in [0, 1], got 1.5 (cartpole/ppo)"),
    ("section.toml", _HEAD + "[settings]\nlr = 0.1\n",
     "settings.lr: 'lr' is a hyper-parameter of cartpole/ppo; put it under "
     "hparams."),
    ("name.toml", _HEAD + "[hparams]\nlearning_rate = 0.1\n",
     "hparams.learning_rate: 'learning_rate' is not a setting or "
     "hyper-parameter of cartpole/ppo"),
    ("list.json", "[1, 2]", "must hold a table of keys"),
    ("latin1.toml", b"task = '\xe9'\n", "not UTF-8 text (byte 8)."),
    ("missing.toml", None, "no such file."),
    ("folder.toml", "dir", "is a directory, not a file."),
]


@pytest.mark.parametrize("name,content,message", CONFIG_CASES,
                         ids=[c[0] for c in CONFIG_CASES])
def test_malformed_config_files(name, content, message, tmp_path, capsys,
                                no_program):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "run"
    code, _, err = _cli(["train", "--config", str(path), "--out", str(out)],
                        capsys)
    assert code == 2
    line = _error_line(err)
    assert line.startswith(f"artifex-fn: error: --config {path}: "), line
    assert message in line
    assert not out.exists()


# --- output directories ------------------------------------------------------

def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def test_out_errors(tmp_path, capsys, no_program):
    base = ["train"] + _PPO + ["--steps", "512"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    cases = [
        (["--out", str(a_file)], f"--out {a_file}: exists and is not a "
                                 f"directory."),
        (["--out", str(a_file / "sub")],
         f"--out {a_file / 'sub'}: cannot create it (Not a directory)."),
        (["--out", str(full)], f"--out {full} is not empty (notes.txt); pass "
                               f"--overwrite to replace it or --resume to "
                               f"continue the run saved there."),
        (["--out", str(full), "--overwrite"],
         f"--overwrite: {full} holds files that are not a run's (notes.txt); "
         f"refusing to delete them"),
        (["--out", str(full), "--resume"],
         f"--resume: {full} holds no saved state of an interrupted run"),
        (["--out", str(tmp_path / "nowhere"), "--resume"],
         f"--resume: {tmp_path / 'nowhere'} does not exist."),
        (["--out", ""], "--out must be a directory path"),
    ]
    for argv, message in cases:
        code, _, err = _cli(base + argv, capsys)
        assert code == 2 and message in _error_line(err), (argv, err)
    assert (full / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.skipif(_is_root(), reason="root writes to read-only folders")
def test_out_read_only(tmp_path, capsys, no_program):
    base = ["train"] + _PPO + ["--steps", "512"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = _cli(base + ["--out", str(locked)], capsys)
        assert code == 2
        assert f"--out {locked}: not writable" in _error_line(err)
        code, _, err = _cli(base + ["--out", str(locked / "sub")], capsys)
        assert code == 2
        assert f"--out {locked / 'sub'}: cannot create it" in _error_line(err)
    finally:
        locked.chmod(0o700)


def test_out_not_writable_any_user(tmp_path, capsys, no_program,
                                   monkeypatch):
    """A read-only file system (simulated: root ignores permissions)."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(train_lib.tempfile, "TemporaryFile", read_only)
    out = tmp_path / "run"
    code, _, err = _cli(["train"] + _PPO + ["--out", str(out)], capsys)
    assert code == 2
    assert _error_line(err).endswith(
        f"--out {out}: not writable ({os.strerror(errno.EROFS)}).")


def test_overwrite_clears_only_a_runs_files(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint" / "x").mkdir(parents=True)
    (out / "state").mkdir()
    (out / ".state.tmp").mkdir()
    for name in ("config.json", "metrics.jsonl", "summary.json", "curve.png",
                 "state/manifest.json"):
        (out / name).write_text("old")
    train_lib.prepare_out(str(out), overwrite=True)
    assert os.listdir(out) == []
    train_lib.prepare_out(str(out))              # empty: accepted as is
    (out / "config.json").write_text("old")
    with pytest.raises(ValueError, match="is not empty"):
        train_lib.prepare_out(str(out))


# --- write errors ------------------------------------------------------------

def _enospc(*args):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *args)


@pytest.fixture
def disk_full_on(monkeypatch):
    """``disk_full_on(name)``: writes to files called ``name`` by
    :mod:`outputs` fail with ENOSPC (the file opens; the write fails)."""
    def arm(target):
        real_open = open

        class Full:
            def __init__(self, f):
                self._f = f

            def write(self, data):
                raise _enospc()

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

        def fake_open(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            if os.path.basename(str(path)) == target and "r" not in mode:
                return Full(f)
            return f

        monkeypatch.setattr(outputs, "open", fake_open, raising=False)
    return arm


# A small CartPole PPO run: 40 iterations of 512 steps in 8 chunks, 2 seeds;
# every run of this module compiles this one program (then the cache).
_RUN = ["train", "--task", "cartpole", "--algo", "ppo", "--seeds", "2",
        "--steps", "20480", "--chunks", "8", "--set", "num_envs=4",
        "--set", "eval_envs=4", "--devices", "1", "--no-plot",
        "--no-progress"]


def test_disk_full_writing_config_is_one_line(tmp_path, capsys, disk_full_on):
    disk_full_on("config.json")
    out = tmp_path / "run"
    code, _, err = _cli(_RUN + ["--out", str(out)], capsys)
    assert code == 1
    assert err == (f"artifex-fn: error: no space left on device while "
                   f"writing {out / 'config.json'}\n")


def test_disk_full_during_training_is_one_line(tmp_path, capsys,
                                               disk_full_on):
    disk_full_on("metrics.jsonl")
    out = tmp_path / "run"
    code, _, err = _cli(_RUN + ["--out", str(out)], capsys)
    assert code == 1
    assert err == (f"artifex-fn: error: no space left on device while "
                   f"writing {out / 'metrics.jsonl'}\n")


def test_disk_full_after_training_with_overwrite(tmp_path, capsys,
                                                 disk_full_on):
    """--overwrite clears the previous run first: what is left after the
    failed write is this run's, not a mix of both; the budget that is not
    a whole number of iterations is rounded down with a note."""
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    for name in ("summary.json", "curve.png", "metrics.jsonl", "config.json"):
        (out / name).write_text("stale")
    disk_full_on("summary.json")
    argv = [a if a != "20480" else "20500" for a in _RUN]
    code, stdout, err = _cli(argv + ["--out", str(out), "--overwrite"], capsys)
    assert code == 1
    assert err == (f"artifex-fn: error: no space left on device while "
                   f"writing {out / 'summary.json'}\n")
    assert "note: total_timesteps=20500 is not a multiple" in stdout
    assert "training 40 iterations = 20480 environment steps" in stdout
    assert sorted(os.listdir(out)) == ["checkpoint", "config.json",
                                       "metrics.jsonl", "summary.json"]
    assert (out / "summary.json").read_text() == ""
    assert json.loads((out / "config.json").read_text())["iterations"] == 40
    assert len(outputs.read_metrics(str(out / "metrics.jsonl"))) == 40 * 2


def test_write_errors_name_the_path(tmp_path, monkeypatch):
    """Checkpoints (orbax), curves (matplotlib) and saved states raise a
    WriteError naming the path."""
    import orbax.checkpoint as ocp

    def full(*args, **kwargs):
        raise _enospc()

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
    with pytest.raises(outputs.WriteError, match="no space left on device "
                       "while writing .*checkpoint$"):
        outputs.save_checkpoint(str(tmp_path / "checkpoint"),
                                dict(w=np.zeros(2)))
    import matplotlib.figure
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    with pytest.raises(outputs.WriteError, match="curve.png$"):
        outputs.plot_curve(str(tmp_path / "curve.png"),
                           dict(r=np.zeros((1, 1, 3))), curve="r",
                           points=[{}], samples_per_iteration=1, title="t")
    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(outputs.WriteError, match="state$"):
        outputs.save_state(str(tmp_path / "state"), {}, {})
    assert sorted(os.listdir(tmp_path)) == []     # no half-written state
    e = outputs.WriteError("x/y", PermissionError(errno.EACCES,
                                                  "Permission denied"))
    assert str(e) == "permission denied while writing x/y"


def test_python_train_checks_its_arguments(tmp_path, no_program):
    out = str(tmp_path / "run")
    for kwargs, message in (
            (dict(chunks=0), "--chunks must be an integer >= 1, got 0"),
            (dict(seeds=0), "--seeds must be an integer >= 1, got 0"),
            (dict(steps=100), "--steps 100 is less than one iteration"),
            (dict(overrides=dict(gamma=1.5)), "gamma must be in"),
            (dict(sweep=dict(lr="0.1")), "must be a list of numbers"),
            (dict(sigint="ignore"), "`sigint` must be one of")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")
                           .replace("[", r"\[")):
            train_lib.train("cartpole", "ppo", out=out, log=None, **kwargs)
    assert not os.path.exists(out)


# --- Ctrl-C and --resume -----------------------------------------------------

def _subprocess_env():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=_CACHE_DIR or "")
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split()
        if "force_host_platform_device_count" not in f)
    return env


_CLI = [sys.executable, "-m", "artifex_fn.experiments.cli"]


def _interrupt_after_first_chunk(argv, out):
    """Starts ``argv``, sends SIGINT once the first chunk's metrics are
    written; returns ``(returncode, stdout, stderr)``."""
    proc = subprocess.Popen(_CLI + argv, env=_subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and metrics.stat().st_size > 0:
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.005)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout, stderr


def _leaves(out):
    return jax.tree_util.tree_leaves(experiments.load_checkpoint(str(out)))


def test_interrupt_then_resume_is_bit_exact(tmp_path, capsys):
    """SIGINT after the first chunk: exit 130, one line with the command
    that resumes; the resumed run ends with the parameters, metrics and
    evaluation of an uninterrupted run, bit for bit."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    # The reference and the resumed run run here when this process has the
    # subprocesses' single device; the interrupted run is a subprocess.
    here = len(jax.devices()) == 1

    def run(argv):
        if here:
            code, _, err = _cli(argv, capsys)
            return code, err
        proc = subprocess.run(  # pragma: no cover - the session's XLA_FLAGS
            _CLI + argv, text=True, capture_output=True,
            env=_subprocess_env(), timeout=600)
        return proc.returncode, proc.stderr  # pragma: no cover

    code, err = run(_RUN + ["--out", str(ref)])
    assert code == 0, err[-3000:]

    argv = _RUN + ["--out", str(out)]
    code, stdout, err = _interrupt_after_first_chunk(argv, out)
    if code == 0:  # pragma: no cover - the run outpaced the signal; again
        code, stdout, err = _interrupt_after_first_chunk(
            argv + ["--overwrite"], out)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and stdout == ""
    hints = [l for l in err.splitlines() if "--resume" in l]
    assert len(hints) == 1, err
    assert [l for l in err.splitlines() if l not in hints] == [
        "artifex-fn: interrupted; stopping after the current chunk to save "
        "the run (Ctrl-C again aborts without saving)"]
    command = shlex.split(hints[0].split("resume with: ", 1)[1])
    assert command == ["artifex-fn"] + argv + ["--resume"]

    summary = json.loads((out / "summary.json").read_text())
    done = summary["iterations_done"]
    assert summary["interrupted"] and summary["iterations"] == 40
    assert 5 <= done < 40 and done % 5 == 0, done
    assert f"interrupted after {done} of 40 iterations" in hints[0]
    assert sorted(os.listdir(out)) == ["checkpoint", "config.json",
                                       "metrics.jsonl", "state",
                                       "summary.json"]
    assert len(outputs.read_metrics(str(out / "metrics.jsonl"))) == done * 2
    partial = _leaves(out)
    assert all(np.shape(x)[:2] == (2, 1) for x in partial)

    # A different run is refused, before anything is built.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks.Task, "program", None)
        for change in (["--seeds", "4"], ["--steps", "10240"],
                       ["--set", "lr=1e-3"], ["--chunks", "4"]):
            code, _, err2 = _cli(argv + change + ["--resume"], capsys)
            assert code == 2, err2
            assert (f"--resume: the run saved in {out} has "
                    in _error_line(err2))

    code, err = run(command[1:])
    assert code == 0, err[-3000:]
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    want, got = _leaves(ref), _leaves(out)
    assert len(want) == len(got) > 0
    assert all(np.array_equal(a, b) for a, b in zip(want, got))
    assert not all(np.array_equal(a, b) for a, b in zip(partial, got))
    assert ((out / "metrics.jsonl").read_text()
            == (ref / "metrics.jsonl").read_text())
    s_ref = json.loads((ref / "summary.json").read_text())
    s_out = json.loads((out / "summary.json").read_text())
    assert s_out["after"] == s_ref["after"]
    assert s_out["before"] == s_ref["before"]
    assert not s_out["interrupted"] and s_out["iterations_done"] == 40
