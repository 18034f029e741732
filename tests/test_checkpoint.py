"""ModelCheckpoint: top-k retention, exact resume across processes, crashes."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_fn.training.callbacks.base import Callback
from artifex_fn.training.callbacks.checkpoint import (CheckpointConfig,
                                                      ModelCheckpoint,
                                                      restore_checkpoint)
from artifex_fn.training import Trainer

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

# The metric "score" of step i (0-based) is SCORES[i]: the best checkpoints
# are not the latest ones.
SCORES = (0.5, 3.0, 1.0, 4.0, 2.0, 0.0, 1.5, 2.5, 1.0, 0.25)


class MLP(nnx.Module):
    """A small regression model."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.tanh(self.l1(x)))


class Regression(Trainer):
    """Least squares with noise drawn from the trainer key."""

    def compute_loss(self, model, batch, key):
        noise = 0.01 * jax.random.normal(key, batch["y"].shape)
        loss = jnp.mean((model(batch["x"])[:, 0] - batch["y"] - noise) ** 2)
        return loss, {"mean_reward": -loss, "score": batch["score"]}


def make_trainer():
    """A fresh trainer; the same initial state in every process."""
    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    return Regression(model, opt, key=1)


def make_batch(step):
    """The batch of 0-based step ``step``: a function of ``step`` only."""
    x = np.random.default_rng(step).normal(size=(8, 3)).astype(np.float32)
    return {"x": x, "y": np.sin(x).sum(1),
            "score": np.float32(SCORES[step % len(SCORES)])}


def fit_steps(trainer, n, callbacks=()):
    """Runs ``n`` steps on the batches of steps ``trainer.step, ...``."""
    return trainer.fit(make_batch, num_steps=n, callbacks=callbacks)


def state_arrays(trainer):
    """The trainer's full state as ``{key path: numpy array}``."""
    leaves = jax.tree_util.tree_leaves_with_path(trainer.state_dict())
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def save_state(trainer, path):
    """Writes :func:`state_arrays` to an ``.npz`` file."""
    np.savez(path, **state_arrays(trainer))


def assert_state_equal(trainer, expected):
    """Every array of the trainer's state equals ``expected`` exactly."""
    got = state_arrays(trainer)
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
        assert got[name].dtype == value.dtype, name


class Recorder(Callback):
    """Keeps the trainer's state after every step, by ``trainer.step``."""

    def __init__(self):
        self.states = {}

    def on_train_batch_end(self, trainer, metrics, step):
        self.states[trainer.step] = state_arrays(trainer)


def run_script(script, *args):
    """Runs ``script`` in a fresh Python process; returns its exit code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), str(TESTS_DIR)]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        env=env, cwd=str(REPO_ROOT), capture_output=True, text=True,
        timeout=300)
    return proc


def steps_in(path):
    """Committed checkpoint steps in an Orbax directory, sorted."""
    if not path.exists():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


# -- retention ------------------------------------------------------------

@pytest.mark.parametrize("mode,best,best_step",
                         [("max", [2, 4], 4), ("min", [1, 6], 6)])
def test_save_top_k_keeps_the_k_best_steps(tmp_path, mode, best, best_step):
    # Steps 1..7 score 0.5, 3, 1, 4, 2, 0, 1.5 (checkpoint n = trainer.step).
    trainer = make_trainer()
    ckpt = ModelCheckpoint(CheckpointConfig(
        dirpath=tmp_path, monitor="score", mode=mode, save_top_k=2))
    rec = Recorder()
    fit_steps(trainer, 7, [ckpt, rec])

    assert steps_in(tmp_path / "best") == best
    assert steps_in(tmp_path / "last") == [7]   # the latest is not a best
    (other,) = set(best) - {best_step}
    assert ckpt.best_step == best_step
    assert ckpt.best_score == SCORES[best_step - 1]

    fresh = make_trainer()
    assert ckpt.restore(fresh, "best") == best_step
    assert_state_equal(fresh, rec.states[best_step])
    assert ckpt.restore(fresh, other) == other
    assert_state_equal(fresh, rec.states[other])
    assert restore_checkpoint(fresh, tmp_path) == 7
    assert_state_equal(fresh, rec.states[7])

    # Read back by a new callback object, as in a new process.
    reopened = ModelCheckpoint(CheckpointConfig(
        dirpath=tmp_path, monitor="score", mode=mode, save_top_k=2))
    assert reopened.best_step == best_step
    with pytest.raises(ValueError, match=r"`which=3` is not a saved step"):
        restore_checkpoint(fresh, tmp_path, 3)
    # The kept checkpoints are not re-ranked by another metric.
    relabelled = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path,
                                                  monitor="loss"))
    with pytest.raises(ValueError, match=r"ranked by \(monitor, mode\) "
                       rf"\[\('score', '{mode}'\)\]"):
        relabelled.on_train_begin(fresh)   # fresh is at step 7: no later one
    # A fresh trainer must not write into a directory of a later run.
    with pytest.raises(ValueError, match=r"after the trainer's step 0"):
        fit_steps(make_trainer(), 1, [reopened])


def test_save_top_k_minus_one_keeps_all_and_last_falls_back_to_best(
        tmp_path):
    trainer = make_trainer()
    ckpt = ModelCheckpoint(CheckpointConfig(
        dirpath=str(tmp_path), monitor="score", mode="max", save_top_k=-1,
        every_n_steps=2, save_last=False, async_save=False))
    rec = Recorder()
    fit_steps(trainer, 7, [ckpt, rec])
    assert steps_in(tmp_path / "best") == [2, 4, 6]
    assert not (tmp_path / "last").exists()
    assert (ckpt.best_step, ckpt.best_score) == (4, 4.0)

    fresh = make_trainer()
    assert restore_checkpoint(fresh, tmp_path, "last") == 6
    assert_state_equal(fresh, rec.states[6])


class _CountingScalar:
    """A metric value that counts its conversions to a host array."""

    def __init__(self, value):
        self.value = value
        self.reads = 0

    def __array__(self, dtype=None, copy=None):
        self.reads += 1
        return np.asarray(self.value, dtype=dtype)


def test_monitor_is_read_only_on_save_steps(tmp_path):
    trainer = make_trainer()
    ckpt = ModelCheckpoint(CheckpointConfig(
        dirpath=tmp_path, monitor="loss", every_n_steps=3, async_save=False))
    ckpt.on_train_begin(trainer)
    values = {}
    for n in range(1, 8):
        trainer.step = n   # what fit has done after n steps
        values[n] = _CountingScalar(float(10 - n))
        ckpt.on_train_batch_end(trainer, {"loss": values[n]}, n - 1)
    ckpt.on_train_end(trainer)
    assert {n: v.reads for n, v in values.items() if v.reads} == {3: 1, 6: 1}
    assert steps_in(tmp_path / "best") == [6]
    # the final state (step 7, between save steps) is kept for resuming
    assert steps_in(tmp_path / "last") == [7]


# -- validation -----------------------------------------------------------

def test_spec_usage_and_absolute_dirpath():
    cfg = CheckpointConfig(dirpath="checkpoints/grpo", monitor="mean_reward",
                           mode="max", save_top_k=1)
    assert cfg.dirpath == os.path.abspath("checkpoints/grpo")
    ckpt = ModelCheckpoint(cfg)
    assert ckpt.config is cfg
    assert not os.path.exists(cfg.dirpath)   # nothing written before saving


@pytest.mark.parametrize("field,value,match", [
    ("mode", "highest", r"`mode` must be 'min' or 'max', got 'highest'"),
    ("save_top_k", 0, r"`save_top_k` must be an int >= 1, or -1"),
    ("save_top_k", -2, r"`save_top_k` must be an int >= 1, or -1"),
    ("save_top_k", 1.0, r"`save_top_k` must be an int"),
    ("save_top_k", True, r"`save_top_k` must be an int"),
    ("every_n_steps", 0, r"`every_n_steps` must be an int >= 1, got 0"),
    ("monitor", "", r"`monitor` must be the non-empty name"),
    ("dirpath", "", r"`dirpath` must be a non-empty path"),
    ("dirpath", None, r"`dirpath` must be a non-empty path"),
    ("save_last", "yes", r"`save_last` must be True or False"),
])
def test_config_rejects_bad_values(field, value, match):
    kwargs = dict(dirpath="ckpt")
    kwargs[field] = value
    with pytest.raises(ValueError, match=match):
        CheckpointConfig(**kwargs)


def test_missing_monitor_names_available_metrics(tmp_path):
    ckpt = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path,
                                            monitor="reward"))
    metrics = {"loss": jnp.float32(1.0), "mean_reward": jnp.float32(-1.0)}
    with pytest.raises(ValueError, match=r"`monitor='reward'` is not among "
                       r"the step's metrics \['loss', 'mean_reward'\]"):
        ckpt.on_train_batch_end(make_trainer(), metrics, 0)
    with pytest.raises(TypeError, match="CheckpointConfig"):
        ModelCheckpoint({"dirpath": tmp_path})


def test_restore_errors(tmp_path):
    trainer = make_trainer()
    with pytest.raises(FileNotFoundError, match="No checkpoint in"):
        restore_checkpoint(trainer, tmp_path / "missing")
    with pytest.raises(ValueError, match=r"`which` must be 'last', 'best'"):
        restore_checkpoint(trainer, tmp_path, "first")


# -- processes ------------------------------------------------------------

_RESUME_FIRST = """
    import os, sys
    import test_checkpoint as tc
    from artifex_fn.training.callbacks.checkpoint import (
        CheckpointConfig, ModelCheckpoint)
    out = sys.argv[1]
    reference = tc.make_trainer()
    tc.fit_steps(reference, 10)
    tc.save_state(reference, os.path.join(out, "uninterrupted.npz"))
    trainer = tc.make_trainer()
    ckpt = ModelCheckpoint(CheckpointConfig(
        dirpath=os.path.join(out, "ckpt"), monitor="mean_reward", mode="max",
        save_top_k=1, every_n_steps=2))
    tc.fit_steps(trainer, 6, [ckpt])
    os._exit(0)   # no cleanup, as if the job were killed after step 6
"""

_RESUME_SECOND = """
    import os, sys
    import test_checkpoint as tc
    from artifex_fn.training.callbacks.checkpoint import (
        CheckpointConfig, ModelCheckpoint, restore_checkpoint)
    out = sys.argv[1]
    trainer = tc.make_trainer()
    assert restore_checkpoint(trainer, os.path.join(out, "ckpt")) == 6
    ckpt = ModelCheckpoint(CheckpointConfig(
        dirpath=os.path.join(out, "ckpt"), monitor="mean_reward", mode="max",
        save_top_k=1, every_n_steps=2))
    tc.fit_steps(trainer, 4, [ckpt])
    tc.save_state(trainer, os.path.join(out, "resumed.npz"))
"""


def test_resume_in_a_new_process_is_exact(tmp_path):
    first = run_script(_RESUME_FIRST, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert steps_in(tmp_path / "ckpt" / "last") == [6]
    second = run_script(_RESUME_SECOND, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert steps_in(tmp_path / "ckpt" / "last") == [10]

    expected = dict(np.load(tmp_path / "uninterrupted.npz"))
    resumed = dict(np.load(tmp_path / "resumed.npz"))
    assert set(resumed) == set(expected)
    assert any(k.startswith("['params']") for k in expected)
    assert any(k.startswith("['opt_state']") for k in expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    assert int(resumed["['step']"]) == 10
    np.testing.assert_array_equal(resumed["['key']"], expected["['key']"])


_CRASH = """
    import os, sys
    import test_checkpoint as tc
    from orbax.checkpoint._src.path import atomicity
    from artifex_fn.training.callbacks.checkpoint import (
        CheckpointConfig, ModelCheckpoint)
    out = sys.argv[1]
    trainer = tc.make_trainer()
    ckpt = ModelCheckpoint(CheckpointConfig(
        dirpath=os.path.join(out, "ckpt"), monitor="score", mode="max",
        save_top_k=1, async_save=False))
    rec = tc.Recorder()
    tc.fit_steps(trainer, 3, [ckpt, rec])   # best: step 2, last: step 3
    for n, arrays in rec.states.items():
        tc.np.savez(os.path.join(out, f"state_{n}.npz"), **arrays)

    async def die(self, *args, **kwargs):
        # The arrays are written to the temporary directory; the process
        # dies before Orbax commits (renames) it.
        os._exit(1)

    atomicity.AtomicRenameTemporaryPath.finalize = die
    tc.fit_steps(trainer, 1, [ckpt])   # step 4 scores best: saving it dies
    sys.exit(3)
"""


def test_crash_during_save_keeps_previous_checkpoints(tmp_path):
    proc = run_script(_CRASH, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    best_dir = tmp_path / "ckpt" / "best"
    assert any(p.name.startswith("4.") for p in best_dir.iterdir()), (
        "the save of step 4 did not start")
    assert steps_in(best_dir) == [2]

    saved = {n: dict(np.load(tmp_path / f"state_{n}.npz")) for n in (2, 3)}
    trainer = make_trainer()
    cfg = CheckpointConfig(dirpath=tmp_path / "ckpt", monitor="score",
                           mode="max", save_top_k=1, async_save=False)
    ckpt = ModelCheckpoint(cfg)
    assert (ckpt.best_step, ckpt.best_score) == (2, 3.0)
    assert restore_checkpoint(trainer, cfg.dirpath, "best") == 2
    assert_state_equal(trainer, saved[2])
    assert restore_checkpoint(trainer, cfg.dirpath) == 3
    assert_state_equal(trainer, saved[3])

    # Training resumes over the leftovers of the interrupted save.
    fit_steps(trainer, 1, [ckpt])
    assert (ckpt.best_step, ckpt.best_score) == (4, 4.0)
    assert sorted(p.name for p in best_dir.iterdir()) == ["4"]
