"""Tests of the progress bar, metric loggers and profiler callbacks."""

import csv
import dataclasses
import glob
import io
import itertools
import json
import math
import os
import pathlib
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_fn.training.callbacks.logging import (
    CSVLoggerCallback,
    JSONLLoggerCallback,
    TensorBoardLoggerCallback,
    TensorBoardLoggerConfig,
    WandbLoggerCallback,
    WandbLoggerConfig,
    scalar_metrics,
)
from artifex_fn.training.callbacks.profiling import (
    JAXProfiler,
    ProfilingConfig,
)
from artifex_fn.training.callbacks.progress import ProgressBarCallback
from artifex_fn.training import Trainer


# -- helpers ---------------------------------------------------------------
class _Model(nnx.Module):
    def __init__(self, rngs):
        self.l = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
        return self.l(x)


class _Reg(Trainer):
    def compute_loss(self, model, batch, key):
        err = model(batch["x"])[:, 0] - batch["y"]
        return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err)),
                                    "per_example": err}


_BATCH = {"x": jnp.arange(12.0).reshape(4, 3) / 10.0,
          "y": jnp.asarray([0.0, 1.0, 2.0, 3.0])}


def _trainer():
    model = _Model(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.01), wrt=nnx.Param)
    return _Reg(model, opt)


def _batches(step=None):
    """An endless iterable of the same batch (``fit`` stops at num_steps)."""
    return itertools.repeat(_BATCH)


class _DeviceGetCounter:
    """Wraps ``jax.device_get`` and counts the calls."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self._orig = jax.device_get
        monkeypatch.setattr(jax, "device_get", self)

    def __call__(self, x):
        self.calls += 1
        return self._orig(x)


def _metrics(step):
    return {"loss": jnp.asarray(1.0 / (step + 1), jnp.float32),
            "count": jnp.asarray(step, jnp.int32)}


def _drive(cb, metrics_fn, num_steps, trainer=None):
    cb.on_train_begin(trainer)
    for step in range(num_steps):
        cb.on_train_batch_end(trainer, metrics_fn(step), step)
    cb.on_train_end(trainer)


# -- scalar_metrics -------------------------------------------------------
def test_scalar_metrics_keeps_numeric_scalars_with_one_transfer(monkeypatch):
    counter = _DeviceGetCounter(monkeypatch)
    out = scalar_metrics({
        "loss": jnp.asarray(0.25), "n": jnp.asarray(3, jnp.int32),
        "flag": jnp.asarray(False), "vec": jnp.ones(2), "name": "x",
        "py": 2.5, "np": np.float64(1.5), "cplx": jnp.asarray(1j),
        "nested": {"a": jnp.asarray(1.0)}})
    assert out == {"loss": 0.25, "n": 3, "flag": 0, "py": 2.5, "np": 1.5}
    assert type(out["n"]) is int and type(out["loss"]) is float
    assert counter.calls == 1
    assert scalar_metrics({"loss": jnp.asarray(1.0), "x": jnp.asarray(2.0)},
                          ("x", "missing")) == {"x": 2.0}
    assert scalar_metrics({"vec": jnp.ones(3)}) == {}
    assert counter.calls == 2  # nothing to fetch: no transfer.


# -- progress bar ----------------------------------------------------------
def _bar(buf, **kw):
    return ProgressBarCallback(disable=False, file=buf,
                               tqdm_kwargs={"mininterval": 0}, **kw)


def test_progress_bar_counts_every_step_and_shows_metrics(tmp_path):
    buf = io.StringIO()
    cb = _bar(buf, total=23)
    log = JSONLLoggerCallback(tmp_path / "m.jsonl")
    _trainer().fit(_batches(), num_steps=23, callbacks=[cb, log])
    assert cb.bar is None  # closed
    last = buf.getvalue().strip().split("\r")[-1]
    assert last.startswith("train")
    assert "23/23" in last
    assert "it/s" in last or "s/it" in last
    assert "mae" not in last and "grad_norm" not in last  # not selected
    # The last step's loss, with 4 significant digits.
    loss = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])[
        "loss"]
    assert f"loss={loss:.4g}]" in last
    assert cb.num_refreshes == 3  # steps 9, 19 and the end.


def test_progress_bar_unknown_total_and_all_metrics():
    buf = io.StringIO()
    cb = _bar(buf, metrics=None, refresh_every_n_steps=5)
    _trainer().fit(_batches(), num_steps=12, callbacks=[cb])
    last = buf.getvalue().strip().split("\r")[-1]
    assert "12it" in last
    for name in ("loss=", "mae=", "grad_norm="):
        assert name in last
    assert "per_example" not in last  # not a scalar


def test_progress_bar_converts_only_on_refresh_steps(monkeypatch):
    counter = _DeviceGetCounter(monkeypatch)
    buf = io.StringIO()
    cb = _bar(buf, refresh_every_n_steps=10)
    cb.on_train_begin(None)
    for step in range(25):
        cb.on_train_batch_end(None, _metrics(step), step)
        assert counter.calls == (step + 1) // 10
        assert cb.bar.n + cb._pending == step + 1
    cb.on_train_end(None)
    assert counter.calls == 3  # steps 9 and 19, then the final step.
    assert cb.num_refreshes == 3
    assert "loss=0.04" in buf.getvalue()  # 1 / 25 at the end.


def test_progress_bar_disabled_converts_nothing(monkeypatch):
    counter = _DeviceGetCounter(monkeypatch)
    cb = ProgressBarCallback(disable=True, refresh_every_n_steps=2)
    _drive(cb, _metrics, 7)
    assert counter.calls == 0


def test_progress_bar_starts_at_trainer_step():
    buf = io.StringIO()
    trainer = _trainer()
    trainer.fit(_batches(), num_steps=4)
    cb = _bar(buf, total=10, refresh_every_n_steps=3)
    trainer.fit(_batches(), num_steps=6, callbacks=[cb])
    assert "10/10" in buf.getvalue().strip().split("\r")[-1]


def test_progress_bar_closes_when_training_raises():
    cb = _bar(io.StringIO())

    def data():
        for step in range(10):
            if step == 3:
                raise RuntimeError("boom")
            yield _BATCH

    with pytest.raises(RuntimeError, match="boom"):
        _trainer().fit(data(), num_steps=10, callbacks=[cb])
    assert cb.bar is None


# -- CSV / JSONL -----------------------------------------------------------
def test_csv_logger_exact_contents(tmp_path):
    path = tmp_path / "sub" / "metrics.csv"
    cb = CSVLoggerCallback(path, log_every_n_steps=2)

    def metrics(step):
        m = {"loss": jnp.asarray(step * 0.5), "vec": jnp.ones(2)}
        if step != 3:
            m["acc"] = jnp.asarray(step, jnp.int32)
        if step >= 3:
            m["late"] = jnp.asarray(1.0)  # absent from the header: dropped.
        return m

    _drive(cb, metrics, 5)
    assert path.read_text() == ("step,loss,acc\n"
                                "1,0.5,1\n"
                                "3,1.5,\n"
                                "4,2.0,4\n")
    assert cb.num_logged == 3
    # A second run with the same callback appends under the same header.
    _drive(cb, metrics, 2)
    assert path.read_text().endswith("4,2.0,4\n1,0.5,1\n")


def test_csv_logger_append_reuses_existing_header(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("step,loss\n0,9.0\n")
    cb = CSVLoggerCallback(path, append=True)
    _drive(cb, lambda s: {"count": jnp.asarray(7), "loss": jnp.asarray(1.0)},
           1)
    assert path.read_text() == "step,loss\n0,9.0\n0,1.0\n"
    cb = CSVLoggerCallback(path)  # default: truncate
    _drive(cb, _metrics, 1)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert rows == [{"step": "0", "loss": "1.0", "count": "0"}]


def test_csv_logger_flushes_each_row(tmp_path):
    path = tmp_path / "m.csv"
    cb = CSVLoggerCallback(path)
    cb.on_train_begin(None)
    cb.on_train_batch_end(None, _metrics(0), 0)
    # Still open: the row is already on disk.
    assert path.read_text() == "step,loss,count\n0,1.0,0\n"
    cb.on_train_end(None)


def test_jsonl_logger_exact_contents(tmp_path):
    path = tmp_path / "m.jsonl"
    cb = JSONLLoggerCallback(path, log_every_n_steps=3)
    _drive(cb, lambda s: {"loss": jnp.asarray(s + 0.5), "step": 99,
                          "bad": jnp.asarray(float("nan")),
                          "vec": jnp.zeros(3)}, 7)
    lines = path.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [2, 5, 6]
    assert [r["loss"] for r in rows] == [2.5, 5.5, 6.5]
    assert all(set(r) == {"step", "loss", "bad"} for r in rows)
    assert all(math.isnan(r["bad"]) for r in rows)
    assert lines[0] == '{"step": 2, "loss": 2.5, "bad": NaN}'


def test_loggers_convert_only_on_log_steps(tmp_path, monkeypatch):
    counter = _DeviceGetCounter(monkeypatch)
    cb = JSONLLoggerCallback(tmp_path / "m.jsonl", log_every_n_steps=4)
    cb.on_train_begin(None)
    for step in range(10):
        cb.on_train_batch_end(None, _metrics(step), step)
        assert counter.calls == (step + 1) // 4
    cb.on_train_end(None)
    assert counter.calls == 3  # steps 3, 7 and the last step 9.
    # Ending on a log step does not log it twice.
    cb = JSONLLoggerCallback(tmp_path / "n.jsonl", log_every_n_steps=4)
    _drive(cb, _metrics, 8)
    assert len((tmp_path / "n.jsonl").read_text().splitlines()) == 2


def test_file_loggers_with_trainer_fit(tmp_path):
    csv_cb = CSVLoggerCallback(tmp_path / "a.csv")
    jsonl_cb = JSONLLoggerCallback(tmp_path / "a.jsonl", log_every_n_steps=2)
    _trainer().fit(_batches(), num_steps=5, callbacks=[csv_cb, jsonl_cb])
    text = (tmp_path / "a.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert set(rows[0]) == {"step", "loss", "grad_norm", "mae"}
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses, reverse=True)  # training makes progress
    lines = [json.loads(x) for x in
             (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 3, 4]
    assert [x["loss"] for x in lines] == pytest.approx(
        [losses[1], losses[3], losses[4]])


# -- TensorBoard -----------------------------------------------------------
def _read_events(log_dir):
    from tensorboardX.proto import event_pb2

    files = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    assert len(files) == 1
    data = pathlib.Path(files[0]).read_bytes()
    events, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        i += 12  # length and its checksum
        events.append(event_pb2.Event.FromString(data[i:i + n]))
        i += n + 4  # payload and its checksum
    return events


def test_tensorboard_logger_writes_readable_scalars(tmp_path):
    log_dir = str(tmp_path / "tb")
    cb = TensorBoardLoggerCallback(
        TensorBoardLoggerConfig(log_dir, log_every_n_steps=3))
    trainer = _trainer()
    trainer.fit(_batches(), num_steps=7, callbacks=[cb])
    assert cb.writer is None
    scalars = {}
    for ev in _read_events(log_dir):
        for v in ev.summary.value:
            scalars.setdefault(v.tag, []).append((ev.step, v.simple_value))
    assert set(scalars) == {"train/loss", "train/grad_norm", "train/mae"}
    for tag, values in scalars.items():
        assert [s for s, _ in values] == [2, 5, 6], tag
    losses = [v for _, v in scalars["train/loss"]]
    assert losses[0] > losses[-1] > 0


def test_tensorboard_logger_prefix_and_calls(tmp_path, monkeypatch):
    from tensorboardX import SummaryWriter

    calls = []
    orig = SummaryWriter.add_scalar

    def spy(self, tag, value, step=None, *a, **kw):
        calls.append((tag, value, step))
        return orig(self, tag, value, step, *a, **kw)

    monkeypatch.setattr(SummaryWriter, "add_scalar", spy)
    cb = TensorBoardLoggerCallback(TensorBoardLoggerConfig(
        tmp_path, log_every_n_steps=2, prefix="rl/"))
    _drive(cb, _metrics, 4)
    assert calls == [("rl/loss", 0.5, 1), ("rl/count", 1, 1),
                     ("rl/loss", 0.25, 3), ("rl/count", 3, 3)]


# -- Weights & Biases ------------------------------------------------------
@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """Offline, silent W&B writing only under ``tmp_path``."""
    pytest.importorskip("wandb")
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                       ("WANDB_DIR", tmp_path),
                       ("WANDB_CONFIG_DIR", tmp_path / "config"),
                       ("WANDB_CACHE_DIR", tmp_path / "cache"),
                       ("WANDB_DATA_DIR", tmp_path / "data"),
                       ("WANDB_DISABLE_GIT", "true"),
                       ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(var, str(value))
    monkeypatch.chdir(tmp_path)
    import wandb

    calls = []
    orig_init = wandb.init

    def init(*args, **kwargs):
        run = orig_init(*args, **kwargs)
        orig_log = run.log

        def log(data, step=None, **kw):
            calls.append((dict(data), step))
            return orig_log(data, step=step, **kw)

        run.log = log
        return run

    monkeypatch.setattr(wandb, "init", init)
    yield calls
    # W&B caches its settings (from the environment) process-wide.
    wandb.teardown()


def test_wandb_logger_offline_run(tmp_path, offline_wandb):
    cb = WandbLoggerCallback(WandbLoggerConfig(
        project="rl-finetuning", name="grpo-experiment",
        config={"algorithm": "GRPO", "num_generations": 4, "beta": 0.01},
        log_every_n_steps=10, dir=tmp_path / "wb", tags=("test",)))
    assert cb.run is None
    trainer = _trainer()
    trainer.fit(_batches(), num_steps=25, callbacks=[cb])
    assert [step for _, step in offline_wandb] == [9, 19, 24]
    for data, _ in offline_wandb:
        assert set(data) == {"train/loss", "train/grad_norm", "train/mae"}
        assert all(isinstance(v, float) for v in data.values())
    assert cb.num_logged == 3
    assert cb.run.name == "grpo-experiment"
    assert cb.run.config["algorithm"] == "GRPO"
    assert cb.run.config["num_generations"] == 4
    files = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" /
                          "run-*.wandb"))
    assert len(files) == 1
    blob = pathlib.Path(files[0]).read_bytes()
    assert b"train/loss" in blob and b"grpo-experiment" in blob


def test_wandb_logger_respects_env_mode_and_explicit_mode(tmp_path,
                                                          offline_wandb):
    cb = WandbLoggerCallback(WandbLoggerConfig(
        project="p", log_every_n_steps=2, mode="disabled"))
    _drive(cb, _metrics, 3)
    assert [s for _, s in offline_wandb] == [1, 2]
    assert not glob.glob(str(tmp_path / "**" / "*.wandb"), recursive=True)
    cb = WandbLoggerCallback(WandbLoggerConfig(
        project="p", log_every_n_steps=2, prefix="", dir=tmp_path / "env"))
    _drive(cb, _metrics, 2)  # WANDB_MODE=offline from the environment.
    assert offline_wandb[-1] == ({"loss": 0.5, "count": 1}, 1)
    assert glob.glob(str(tmp_path / "env" / "wandb" / "offline-run-*" /
                         "*.wandb"))


def test_wandb_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    cb = WandbLoggerCallback(WandbLoggerConfig(project="p"))
    with pytest.raises(ImportError, match="pip install wandb"):
        cb.on_train_begin(None)


# -- profiler --------------------------------------------------------------
def test_profiler_writes_trace_for_window(tmp_path):
    log_dir = tmp_path / "prof"
    prof = JAXProfiler(ProfilingConfig(log_dir=str(log_dir), start_step=1,
                                       end_step=3))
    trainer = _trainer()
    trainer.fit(_batches(), num_steps=5, callbacks=[prof])
    assert not prof.active and prof.done
    traces = glob.glob(str(log_dir / "**" / "*.xplane.pb"), recursive=True)
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


class _ProfilerSpy:
    """Replaces the profiler and ``block_until_ready`` with recorders."""

    def __init__(self, monkeypatch, trainer=None):
        self.events = []
        self.trainer = trainer
        monkeypatch.setattr(jax.profiler, "start_trace", self._start)
        monkeypatch.setattr(jax.profiler, "stop_trace", self._stop)
        monkeypatch.setattr(jax, "block_until_ready", self._block)

    def _now(self):
        return getattr(self.trainer, "step", None)

    def _start(self, log_dir, *a, **kw):
        self.events.append(("start", self._now()))

    def _stop(self):
        self.events.append(("stop", self._now()))

    def _block(self, tree):
        self.events.append(("block", self._now()))
        return tree


@pytest.mark.parametrize("start,end,num_steps,expected", [
    # Trace runs before step 2 (2 steps done) until step 4 finished.
    (2, 5, 8, [("block", 2), ("block", 2), ("block", 2), ("start", 2),
               ("block", 5), ("block", 5), ("block", 5), ("stop", 5)]),
    # start_step 0: started before any step, in on_train_begin.
    (0, 1, 3, [("block", 0), ("block", 0), ("start", 0),
               ("block", 1), ("block", 1), ("block", 1), ("stop", 1)]),
    # Training ends inside the window: stopped in on_train_end.
    (1, 50, 3, [("block", 1), ("block", 1), ("block", 1), ("start", 1),
                ("block", 3), ("block", 3), ("stop", 3)]),
    # Window never reached: nothing happens.
    (10, 20, 3, []),
])
def test_profiler_window_and_waits_before_stop(monkeypatch, start, end,
                                               num_steps, expected):
    trainer = _trainer()
    spy = _ProfilerSpy(monkeypatch, trainer)
    prof = JAXProfiler(ProfilingConfig(log_dir="unused", start_step=start,
                                       end_step=end))
    trainer.fit(_batches(), num_steps=num_steps, callbacks=[prof])
    assert spy.events == expected
    assert not prof.active


def test_profiler_stops_when_training_raises(monkeypatch):
    trainer = _trainer()
    spy = _ProfilerSpy(monkeypatch, trainer)
    prof = JAXProfiler(ProfilingConfig(log_dir="unused", start_step=1,
                                       end_step=10))

    def data():
        for step in range(10):
            if step == 3:
                raise RuntimeError("boom")
            yield _BATCH

    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(data(), num_steps=10, callbacks=[prof])
    assert [e for e, _ in spy.events if e != "block"] == ["start", "stop"]
    assert not prof.active and prof.done
    # One trace per callback: a later run inside the window is not traced.
    trainer.step = 1
    trainer.fit(_batches(), num_steps=3, callbacks=[prof])
    assert [e for e, _ in spy.events if e != "block"] == ["start", "stop"]


def test_profiler_in_hand_written_loop(monkeypatch):
    spy = _ProfilerSpy(monkeypatch)
    prof = JAXProfiler(ProfilingConfig(log_dir="unused", start_step=2,
                                       end_step=4))
    prof.on_train_begin(None)
    seen = []
    for step in range(6):
        prof.on_train_batch_end(None, _metrics(step), step)
        seen.append(prof.active)
    prof.on_train_end(None)
    assert seen == [False, True, True, False, False, False]
    assert [e for e, _ in spy.events] == ["block", "start", "block", "stop"]


# -- validation ------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: ProfilingConfig("d", start_step=-1, end_step=3), "start_step"),
    (lambda: ProfilingConfig("d", start_step=3, end_step=3), "end_step"),
    (lambda: ProfilingConfig("d", start_step=4, end_step=2), "end_step"),
    (lambda: ProfilingConfig("d", start_step=1.0, end_step=2), "start_step"),
    (lambda: ProfilingConfig("", start_step=0, end_step=2), "log_dir"),
    (lambda: WandbLoggerConfig(project="p", log_every_n_steps=0),
     "log_every_n_steps"),
    (lambda: WandbLoggerConfig(project=""), "project"),
    (lambda: WandbLoggerConfig(project="p", mode="cloud"), "mode"),
    (lambda: WandbLoggerConfig(project="p", tags="a"), "tags"),
    (lambda: TensorBoardLoggerConfig("d", log_every_n_steps=-2),
     "log_every_n_steps"),
    (lambda: TensorBoardLoggerConfig(None), "log_dir"),
    (lambda: CSVLoggerCallback("m.csv", log_every_n_steps=0),
     "log_every_n_steps"),
    (lambda: JSONLLoggerCallback("", log_every_n_steps=1), "path"),
    (lambda: ProgressBarCallback(refresh_every_n_steps=0),
     "refresh_every_n_steps"),
    (lambda: ProgressBarCallback(total=-1), "total"),
    (lambda: ProgressBarCallback(metrics="loss"), "metrics"),
])
def test_bad_configs_raise(make, match):
    with pytest.raises(ValueError, match=f"`{match}`"):
        make()


def test_configs_are_frozen_and_typed():
    cfg = WandbLoggerConfig(project="p", tags=["a", "b"])
    assert cfg.tags == ("a", "b") and cfg.log_every_n_steps == 50
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.project = "q"
    with pytest.raises(TypeError, match="WandbLoggerConfig"):
        WandbLoggerCallback({"project": "p"})
    with pytest.raises(TypeError, match="ProfilingConfig"):
        JAXProfiler({"log_dir": "d"})
    with pytest.raises(TypeError, match="TensorBoardLoggerConfig"):
        TensorBoardLoggerCallback("d")
    default = ProfilingConfig("d")
    assert (default.start_step, default.end_step) == (10, 20)
