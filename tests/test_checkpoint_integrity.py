"""Checkpoints that notice corruption: checksums, missing or unreadable
files, and restoring the intact copy of a step saved under both ``best`` and
``last``."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pathlib
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_fn.training.callbacks.base import Callback
from artifex_fn.training.callbacks.checkpoint import (CheckpointConfig,
                                                      CheckpointCorruptError,
                                                      ModelCheckpoint,
                                                      restore_checkpoint)
from artifex_fn.training import Trainer

# A read that fails leaves Orbax's other reads of the same restore to fail
# unawaited; Python reports those when it collects them, at the latest when
# this module's tests end (see `_collect_failed_reads`).
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")

# Steps 1..4 score 1, 3, 2, 4. With save_top_k=2 and mode "max", `best`
# keeps steps 2 and 4 and `last` keeps step 4: step 4 has two copies, step 2
# one.
SCORES = (1.0, 3.0, 2.0, 4.0)
# Arrays over 1 KiB are written to Orbax's data files (smaller ones are
# inlined in its index, whose nodes carry their own checksums), as zstd
# frames: the 4 KiB random table is incompressible, so its bytes are stored
# as they are, where the test can find and change them.
HIDDEN = 256
TABLE = "['rest']['table']"


class Wide(nnx.Module):
    """A small regression model with a 4 KiB kernel and an untrained
    4 KiB table of random bits."""

    def __init__(self, rngs, hidden):
        self.l1 = nnx.Linear(4, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, 1, rngs=rngs)
        bits = np.random.default_rng(0).integers(0, 2**32, size=1024,
                                                 dtype=np.uint32)
        self.table = nnx.Variable(jnp.asarray(bits))

    def __call__(self, x):
        return self.l2(jax.nn.tanh(self.l1(x)))


class Regression(Trainer):
    """Least squares; reports the batch's ``score`` for ranking."""

    def compute_loss(self, model, batch, key):
        loss = jnp.mean((model(batch["x"])[:, 0] - batch["y"]) ** 2)
        return loss, {"score": batch["score"]}


def make_trainer(hidden=HIDDEN):
    """A fresh trainer; the same initial state every time."""
    model = Wide(nnx.Rngs(0), hidden)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    return Regression(model, opt, key=1)


def make_batch(step):
    x = np.random.default_rng(step).normal(size=(8, 4)).astype(np.float32)
    return {"x": x, "y": np.sin(x).sum(1),
            "score": np.float32(SCORES[step])}


def state_arrays(trainer):
    """The trainer's full state as ``{key path: numpy array}``."""
    leaves = jax.tree_util.tree_leaves_with_path(trainer.state_dict())
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def assert_state_equal(trainer, expected):
    """Every array of the trainer's state equals ``expected`` bit for bit."""
    got = state_arrays(trainer)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name


class Recorder(Callback):
    """Keeps the trainer's state after every step, by ``trainer.step``."""

    def __init__(self):
        self.states = {}

    def on_train_batch_end(self, trainer, metrics, step):
        self.states[trainer.step] = state_arrays(trainer)


def steps_in(path):
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pristine run directory (asynchronous saves) and the state after
    each step."""
    root = tmp_path_factory.mktemp("pristine") / "run"
    trainer, rec = make_trainer(), Recorder()
    ckpt = ModelCheckpoint(CheckpointConfig(
        dirpath=root, monitor="score", mode="max", save_top_k=2))
    trainer.fit(make_batch, num_steps=4, callbacks=[ckpt, rec])
    assert steps_in(root / "best") == [2, 4]
    assert steps_in(root / "last") == [4]
    return root, rec.states


@pytest.fixture(scope="module", autouse=True)
def _collect_failed_reads():
    yield
    gc.collect()


@pytest.fixture
def run(saved, tmp_path):
    """A copy of the pristine run to corrupt, and the recorded states."""
    root, states = saved
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    return copy, states


# -- corrupting a checkpoint ----------------------------------------------

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def array_data_files(step_dir):
    """Orbax's files of array chunks, smallest first.

    OCDBT keeps its index nodes (which carry checksums) and the chunks of
    arrays over 1 KiB in files under ``d/`` directories; chunks are zstd
    frames, so a file of chunks starts with the zstd magic number.
    """
    files = [p for p in (step_dir / "default").rglob("*")
             if p.is_file() and p.parent.name == "d"
             and p.read_bytes()[:4] == ZSTD_MAGIC]
    assert files, f"no file of array chunks in {step_dir}"
    return sorted(files, key=lambda p: (p.stat().st_size, p.name))


def largest_data_file(step_dir):
    return array_data_files(step_dir)[-1]


def overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def overwrite_table_bytes(step_dir):
    """Inverts 64 bytes of the table's chunk, which Orbax stores raw (not
    compressed) and reads back without noticing the change."""
    raw = np.asarray(make_trainer().model.table.get_value()).tobytes()
    probe = raw[len(raw) // 2 - 32:len(raw) // 2 + 32]
    for path in array_data_files(step_dir):
        at = path.read_bytes().find(probe)
        if at >= 0:
            overwrite(path, at, bytes(b ^ 0xFF for b in probe))
            return path
    raise AssertionError(f"the table's bytes are in no file of {step_dir}")


def truncate(path, size=None):
    """Cuts ``path`` to ``size`` bytes (default: half of it)."""
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2 if size is None else size)


# name: (corrupt(step_dir), pattern of the error message's cause)
CORRUPTIONS = {
    "64 bytes of a data file overwritten": (
        overwrite_table_bytes,
        r"array \['rest'\]\['table'\] does not match its saved sha256 "
        r"checksum"),
    # Within the file's first chunk (every chunk there is over 1 KiB).
    "data file truncated": (
        lambda d: truncate(largest_data_file(d), 1000),
        r"Orbax could not read it \(reading array '[\w.]+' failed\)"),
    "data file deleted": (
        lambda d: largest_data_file(d).unlink(),
        r"Orbax could not read it \(reading array '[\w.]+' failed\)"),
    "_METADATA deleted": (
        lambda d: (d / "default" / "_METADATA").unlink(),
        r"the file 'default/_METADATA' is missing"),
    "_METADATA truncated": (
        lambda d: truncate(d / "default" / "_METADATA"),
        r"the file 'default/_METADATA' is unreadable \(truncated or "
        r"overwritten\)"),
    "_CHECKPOINT_METADATA deleted": (
        lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
        r"the file '_CHECKPOINT_METADATA' is missing"),
    "_CHECKPOINT_METADATA truncated": (
        lambda d: truncate(d / "_CHECKPOINT_METADATA"),
        r"the file '_CHECKPOINT_METADATA' is unreadable"),
    "manifest.ocdbt deleted": (
        lambda d: (d / "default" / "manifest.ocdbt").unlink(),
        r"the file 'default/manifest.ocdbt' is missing"),
    "array directory deleted": (
        lambda d: shutil.rmtree(d / "default"),
        r"the array directory 'default' is missing"),
}


def corrupt(run_dir, where, step, kind):
    """Applies corruption ``kind`` to ``<run_dir>/<where>/<step>``."""
    step_dir = run_dir / where / str(step)
    CORRUPTIONS[kind][0](step_dir)
    return step_dir


# -- intact checkpoints ---------------------------------------------------

def test_round_trip_is_bit_exact_and_unwarned(run):
    run_dir, states = run
    trainer = make_trainer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for which, step in (("last", 4), ("best", 4), (2, 2), (4, 4)):
            assert restore_checkpoint(trainer, run_dir, which) == step
            assert_state_equal(trainer, states[step])


def test_checksums_describe_the_arrays_of_the_saved_step(run):
    # Saves are asynchronous and training went on after each: the checksums
    # are those of the state at the saved step.
    run_dir, states = run
    for where, step in (("best", 2), ("best", 4), ("last", 4)):
        meta = json.loads(
            (run_dir / where / str(step) / "_CHECKPOINT_METADATA").read_text())
        record = meta["custom_metadata"]["checksums"]
        assert record["algorithm"] == "sha256"
        assert set(record["arrays"]) == set(states[step])
        for name, value in states[step].items():
            entry = record["arrays"][name]
            assert (entry["shape"], entry["dtype"]) == (
                list(value.shape), str(value.dtype)), name
            h = hashlib.sha256(f"{value.dtype}{value.shape}".encode())
            h.update(value.tobytes())
            assert entry["sha256"] == h.hexdigest(), name


def test_harmless_deletions_still_restore(run):
    # Orbax does not read these back: the arrays still match their checksums.
    run_dir, states = run
    step_dir = run_dir / "best" / "2"
    (step_dir / "default" / "_sharding").unlink()
    trainer = make_trainer()
    assert restore_checkpoint(trainer, run_dir, 2) == 2
    assert_state_equal(trainer, states[2])


# -- the only copy corrupt -----------------------------------------------

@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_only_copy_raises_naming_path_and_cause(run, kind):
    run_dir, states = run
    step_dir = corrupt(run_dir, "best", 2, kind)
    trainer = make_trainer()
    before = state_arrays(trainer)
    with pytest.raises(CheckpointCorruptError,
                       match=CORRUPTIONS[kind][1]) as info:
        restore_checkpoint(trainer, run_dir, 2)
    message = str(info.value)
    assert message.startswith(
        f"Checkpoint step 2 at '{step_dir}' is corrupt or incomplete: ")
    assert "No other copy of step 2 exists. Other saved steps: [4]" in message
    assert (info.value.path, info.value.step) == (str(step_dir), 2)
    if kind == "64 bytes of a data file overwritten":
        assert info.value.array == TABLE
    assert_state_equal(trainer, before)   # nothing was loaded


def test_overwritten_bytes_that_orbax_reads_silently_are_caught(run):
    # Without the checksums, Orbax restores the overwritten chunk into a
    # different state, without an error; with them, the array is named.
    run_dir, states = run
    step_dir = corrupt(run_dir, "best", 2,
                       "64 bytes of a data file overwritten")
    unverified = run_dir.parent / "unverified"
    shutil.copytree(run_dir, unverified)
    strip_checksums(unverified / "best" / "2")
    trainer = make_trainer()
    with pytest.warns(RuntimeWarning, match="has no checksums"):
        assert restore_checkpoint(trainer, unverified, 2) == 2
    restored = state_arrays(trainer)
    changed = [name for name, value in states[2].items()
               if restored[name].tobytes() != value.tobytes()]
    assert changed == [TABLE]

    with pytest.raises(CheckpointCorruptError) as info:
        restore_checkpoint(make_trainer(), run_dir, 2)
    assert info.value.array == TABLE
    assert str(info.value).startswith(
        f"Checkpoint step 2 at '{step_dir}' is corrupt or incomplete: array "
        f"{TABLE} does not match its saved sha256 checksum (")


def test_corrupt_latest_is_not_replaced_by_an_earlier_step(run):
    run_dir, states = run
    shutil.rmtree(run_dir / "best" / "4")   # last/4 is the only copy
    corrupt(run_dir, "last", 4, "data file truncated")
    trainer = make_trainer()
    with pytest.raises(CheckpointCorruptError,
                       match=r"last/4' is corrupt or incomplete: .* No other "
                       r"copy of step 4 exists\. Other saved steps: \[2\]"):
        restore_checkpoint(trainer, run_dir)
    assert trainer.step == 0
    assert restore_checkpoint(trainer, run_dir, 2) == 2   # when asked for
    assert_state_equal(trainer, states[2])


# -- two copies of a step ------------------------------------------------

FALLBACK_KINDS = ("64 bytes of a data file overwritten", "data file truncated",
                  "_METADATA deleted")


@pytest.mark.parametrize("kind", FALLBACK_KINDS)
@pytest.mark.parametrize("which,bad,good", [
    ("last", "last", "best"), (4, "last", "best"), ("best", "best", "last")])
def test_corrupt_copy_falls_back_to_the_intact_one(run, kind, which, bad,
                                                   good):
    run_dir, states = run
    corrupt(run_dir, bad, 4, kind)
    trainer = make_trainer()
    with pytest.warns(RuntimeWarning) as record:
        assert restore_checkpoint(trainer, run_dir, which) == 4
    assert_state_equal(trainer, states[4])
    (warning,) = [w for w in record if w.category is RuntimeWarning]
    message = str(warning.message)
    assert message.startswith(
        f"Checkpoint step 4 at '{run_dir / bad / '4'}' is corrupt or "
        "incomplete: ")
    assert message.endswith(
        f"Restored the copy at '{run_dir / good / '4'}' instead.")
    assert pathlib.Path(warning.filename).name == os.path.basename(__file__)


def test_model_checkpoint_restore_falls_back_too(run):
    run_dir, states = run
    corrupt(run_dir, "last", 4, "64 bytes of a data file overwritten")
    ckpt = ModelCheckpoint(CheckpointConfig(dirpath=run_dir, monitor="score",
                                            mode="max", save_top_k=2))
    trainer = make_trainer()
    with pytest.warns(RuntimeWarning, match=r"last/4' is corrupt or "
                      r"incomplete: .*Restored the copy at '.*best/4'"):
        assert ckpt.restore(trainer) == 4
    assert_state_equal(trainer, states[4])


def test_both_copies_corrupt_raises_naming_both(run):
    run_dir, states = run
    last = corrupt(run_dir, "last", 4, "64 bytes of a data file overwritten")
    best = corrupt(run_dir, "best", 4, "_METADATA deleted")
    trainer = make_trainer()
    with pytest.raises(CheckpointCorruptError,
                       match=r"No intact copy of step 4 in ") as info:
        restore_checkpoint(trainer, run_dir, 4)
    message = str(info.value)
    assert f"'{last}' is corrupt or incomplete: array {TABLE}" in message
    assert f"'{best}' is corrupt or incomplete: the file " in message
    assert "Other saved steps: [2]" in message
    assert trainer.step == 0


def test_best_with_an_unreadable_metric_is_not_guessed(run):
    run_dir, states = run
    corrupt(run_dir, "best", 4, "_CHECKPOINT_METADATA deleted")
    with pytest.raises(CheckpointCorruptError,
                       match=r"steps \[4\] in '.*best' have no readable "
                       r"metric .* restore a step by number"):
        restore_checkpoint(make_trainer(), run_dir, "best")


# -- checkpoints without checksums, other trainers -----------------------

def strip_checksums(step_dir):
    """Makes ``step_dir`` look like a checkpoint saved without checksums."""
    path = step_dir / "_CHECKPOINT_METADATA"
    meta = json.loads(path.read_text())
    del meta["custom_metadata"]["checksums"]
    path.write_text(json.dumps(meta))


def test_checkpoint_without_checksums_restores_unverified(run):
    run_dir, states = run
    for step_dir in (run_dir / "best" / "2", run_dir / "best" / "4",
                     run_dir / "last" / "4"):
        strip_checksums(step_dir)
    trainer = make_trainer()
    with pytest.warns(RuntimeWarning, match=r"last/4' has no checksums .* "
                      r"restored without verification"):
        assert restore_checkpoint(trainer, run_dir) == 4
    assert_state_equal(trainer, states[4])

    # Unreadable data is still reported as such, with its path.
    step_dir = corrupt(run_dir, "best", 2, "data file truncated")
    with pytest.raises(CheckpointCorruptError,
                       match=CORRUPTIONS["data file truncated"][1]) as info:
        restore_checkpoint(trainer, run_dir, 2)
    assert info.value.path == str(step_dir)
    assert_state_equal(trainer, states[4])


def test_checkpoint_of_another_model_is_a_mismatch_not_corruption(run):
    run_dir, _ = run
    other = make_trainer(hidden=128)
    with pytest.raises(ValueError, match=(
            r"does not hold the state of this trainer .* \['params'\]\['l1'\]"
            r"\['kernel'\] has shape \(4, 256\) in the checkpoint, \(4, 128\) "
            r"in the trainer")):
        restore_checkpoint(other, run_dir)
