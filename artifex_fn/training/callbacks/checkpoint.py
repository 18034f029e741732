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

Each checkpoint also records a SHA-256 checksum of every saved array (of its
bytes, shape and dtype). It is computed on the host from the very arrays
handed to Orbax, before an asynchronous write starts, and stored in the
checkpoint's ``_CHECKPOINT_METADATA`` (the ``"checksums"`` entry of its
custom metadata), which Orbax writes into the temporary directory: the
checksums are committed together with the arrays they describe. Restoring
verifies a checkpoint before loading it: the files every checkpoint has
(``_CHECKPOINT_METADATA``, the item's ``_METADATA`` and, for OCDBT, its
``manifest.ocdbt``) must be present and readable, Orbax must read every
array, and each array read back must match its checksum. Otherwise
:class:`CheckpointCorruptError` names the checkpoint's directory and step
and the file or array (pytree path) at fault; a corrupt checkpoint is never
loaded. The same step is often saved under both ``best`` and ``last``: when
one copy is corrupt or incomplete, the other is restored, with a warning
naming the corrupt copy and the one used. A step with no intact copy raises;
another step is never restored in its place. Checkpoints written without
checksums restore as before, unverified, with a warning.

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

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from artifex_fn.training.callbacks.base import Callback

_BEST = "best"
_LAST = "last"
# Files of an Orbax checkpoint (one StandardCheckpointHandler item).
_ITEM = "default"
_STEP_METADATA = "_CHECKPOINT_METADATA"
_ITEM_METADATA = "_METADATA"
_OCDBT_MANIFEST = "manifest.ocdbt"
# The checksums' entry in the checkpoint's custom metadata.
_CHECKSUMS = "checksums"
_ALGORITHM = "sha256"
# States of at least this many bytes are hashed by several threads.
_PARALLEL_HASH_BYTES = 64 << 20


class CheckpointCorruptError(OSError):
    """A checkpoint is corrupt or incomplete and was not loaded.

    Attributes:
      path: the checkpoint's directory (``<dirpath>/last/<step>``), or the
        run's ``dirpath`` when several copies failed.
      step: the checkpoint's step.
      array: pytree path (``jax.tree_util.keystr``) of an array that does
        not match its checksum, or None.
    """

    def __init__(self, message: str, *, path: str | None = None,
                 step: int | None = None, array: str | None = None):
        super().__init__(message)
        self.path = path
        self.step = step
        self.array = array


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


# -- checksums ----------------------------------------------------------

def _digest(leaf) -> dict[str, Any]:
    """``{"shape", "dtype", "sha256"}`` of one array of a saved state.

    The digest covers the dtype, the shape and the bytes in C order; it is
    None for an array this process cannot read whole (sharded over other
    hosts), which is then not verified.
    """
    if not hasattr(leaf, "dtype"):
        leaf = np.asarray(leaf)
    dtype, shape = str(leaf.dtype), [int(n) for n in np.shape(leaf)]
    if isinstance(leaf, jax.Array):
        if not leaf.is_fully_addressable:
            return {"shape": shape, "dtype": dtype, _ALGORITHM: None}
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
    host = np.ascontiguousarray(np.asarray(leaf))
    h = hashlib.sha256(f"{dtype}{tuple(shape)}".encode())
    h.update(host.reshape(-1).view(np.uint8))
    return {"shape": shape, "dtype": dtype, _ALGORITHM: h.hexdigest()}


def _checksums(state) -> dict[str, Any]:
    """The checksums entry of a checkpoint of ``state``.

    A large state is hashed by a few threads, one array each (``hashlib``
    releases the GIL); a small one in this thread.
    """
    leaves = jax.tree_util.tree_leaves_with_path(state)
    values = [leaf for _, leaf in leaves]
    total = sum(int(getattr(leaf, "nbytes", 0)) for leaf in values)
    workers = min(8, os.cpu_count() or 1, len(values))
    if total >= _PARALLEL_HASH_BYTES and workers > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(_digest, values))
    else:
        digests = [_digest(leaf) for leaf in values]
    return {"algorithm": _ALGORITHM, "arrays": {
        jax.tree_util.keystr(path): digest
        for (path, _), digest in zip(leaves, digests)}}


# -- reading one checkpoint ----------------------------------------------

def _step_dir(mngr: ocp.CheckpointManager, step: int) -> epath.Path:
    return epath.Path(mngr.directory) / (
        ocp.step.standard_name_format().build_name(int(step)))


def _corrupt(step_dir, step: int, what: str,
             array: str | None = None) -> CheckpointCorruptError:
    what = what if what.endswith(".") else what + "."
    return CheckpointCorruptError(
        f"Checkpoint step {step} at {str(step_dir)!r} is corrupt or "
        f"incomplete: {what}", path=str(step_dir), step=int(step),
        array=array)


def _read_json(step_dir, step: int, path: epath.Path) -> Any:
    """The JSON content of ``path``, a file every checkpoint has."""
    name = os.path.relpath(str(path), str(step_dir)) if "://" not in str(
        path) else path.name
    if not path.exists():
        raise _corrupt(step_dir, step, f"the file {name!r} is missing.")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _corrupt(
            step_dir, step, f"the file {name!r} is unreadable (truncated or "
            f"overwritten): {err}.") from err


def _check_files(step_dir: epath.Path, step: int) -> dict[str, Any]:
    """Checks the files every checkpoint has; returns its custom metadata."""
    meta = _read_json(step_dir, step, step_dir / _STEP_METADATA)
    custom = meta.get("custom_metadata") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not (custom is None
                                          or isinstance(custom, dict)):
        raise _corrupt(step_dir, step, f"the file {_STEP_METADATA!r} is not "
                       "an Orbax step metadata file.")
    item = step_dir / _ITEM
    if not item.is_dir():
        raise _corrupt(step_dir, step,
                       f"the array directory {_ITEM!r} is missing.")
    if not isinstance(_read_json(step_dir, step, item / _ITEM_METADATA), dict):
        raise _corrupt(step_dir, step, f"the file "
                       f"'{_ITEM}/{_ITEM_METADATA}' is not an Orbax tree "
                       "metadata file.")
    if (any(item.glob("ocdbt.process_*"))
            and not (item / _OCDBT_MANIFEST).exists()):
        raise _corrupt(step_dir, step, f"the file "
                       f"'{_ITEM}/{_OCDBT_MANIFEST}' is missing.")
    return custom or {}


def _expected(record, step_dir, step: int) -> dict[str, dict[str, Any]]:
    """The per-array checksums of a checkpoint's ``checksums`` entry."""
    arrays = record.get("arrays") if isinstance(record, dict) else None
    if (not isinstance(arrays, dict) or record.get("algorithm") != _ALGORITHM
            or not all(isinstance(v, dict) and {"shape", "dtype", _ALGORITHM}
                       <= set(v) for v in arrays.values())):
        raise _corrupt(step_dir, step, f"the {_CHECKSUMS!r} entry of "
                       f"{_STEP_METADATA!r} is malformed.")
    return arrays


def _check_layout(expected, target, step_dir, step: int) -> None:
    """Raises if the saved arrays are not those of the trainer's state."""
    have = {jax.tree_util.keystr(p): leaf
            for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
    problems = []
    only_saved = sorted(set(expected) - set(have))
    only_trainer = sorted(set(have) - set(expected))
    if only_saved:
        problems.append(f"arrays only in the checkpoint: {only_saved}")
    if only_trainer:
        problems.append(f"arrays only in the trainer: {only_trainer}")
    for name in sorted(set(have) & set(expected)):
        saved = tuple(expected[name]["shape"])
        if saved != tuple(np.shape(have[name])):
            problems.append(f"{name} has shape {saved} in the checkpoint, "
                            f"{tuple(np.shape(have[name]))} in the trainer")
    if problems:
        raise ValueError(
            f"Checkpoint step {step} at {str(step_dir)!r} does not hold the "
            "state of this trainer (build it with the same model and "
            f"optimizer as the saved one): {'; '.join(problems[:8])}"
            + (f"; and {len(problems) - 8} more." if len(problems) > 8
               else "."))


def _path_names(path) -> tuple[str, ...]:
    """A key path as plain names, whatever the containers' types."""
    names = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return tuple(names)


def _orbax_layout_matches(mngr, step: int, target) -> bool:
    """Whether Orbax's metadata of ``step`` lists the target's arrays."""
    try:
        meta = mngr.item_metadata(step)
        saved = {_path_names(p): tuple(v.shape) for p, v
                 in jax.tree_util.tree_leaves_with_path(meta)
                 if hasattr(v, "shape")}
    except Exception:  # noqa: BLE001 - unknown layout: not diagnosed
        return False
    have = {_path_names(p): tuple(np.shape(v))
            for p, v in jax.tree_util.tree_leaves_with_path(target)}
    return saved == have


_TS_NOISE = re.compile(r"\s*(\[tensorstore_spec|See full TensorStore details)")


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the errors it was raised from, outermost first."""
    chain, e = [], err
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _describe(err: BaseException) -> str:
    """The innermost message of an Orbax/TensorStore read error, shortened."""
    chain = _chain(err)
    for e in reversed(chain):  # the innermost says which file/array failed
        text = _TS_NOISE.split(str(e), maxsplit=1)[0].strip()
        if text:
            break
    else:
        text = ""
    if len(text) > 600:
        text = text[:600] + "..."
    return f"{type(e).__name__}: {text}" if text else type(err).__name__


def _restore_copy(mngr: ocp.CheckpointManager, step: int, target):
    """Reads and verifies checkpoint ``step`` of one manager.

    Returns:
      The saved state, with the structure and dtypes of ``target``.

    Raises:
      CheckpointCorruptError: a file is missing or unreadable, or an array
        does not match its checksum.
      ValueError: the checkpoint's arrays are not those of ``target``.
    """
    step_dir = _step_dir(mngr, step)
    custom = _check_files(step_dir, step)
    record = custom.get(_CHECKSUMS)
    casts = {}
    if record is None:
        expected = None
        restore_target = target
        # Without checksums, a failed read is taken for corruption only if
        # Orbax's own metadata lists the trainer's arrays; otherwise its
        # error (e.g. another model's checkpoint) is raised as before.
        known_layout = _orbax_layout_matches(mngr, step, target)
    else:
        expected = dict(_expected(record, step_dir, step))
        _check_layout(expected, target, step_dir, step)
        known_layout = True
        # Arrays are read back in their saved dtype, verified, then cast to
        # the trainer's dtype (as Orbax would have cast them).

        def abstract(path, leaf):
            name = jax.tree_util.keystr(path)
            dtype = getattr(leaf, "dtype", None) or np.asarray(leaf).dtype
            saved = expected[name]["dtype"]
            if str(dtype) == saved:
                return leaf
            try:
                saved_dtype = jnp.dtype(saved)
            except TypeError:  # e.g. PRNG keys: read as the trainer's dtype
                expected[name] = dict(expected[name], **{_ALGORITHM: None})
                return leaf
            casts[name] = dtype
            return jax.ShapeDtypeStruct(np.shape(leaf), saved_dtype,
                                        sharding=getattr(leaf, "sharding",
                                                         None))

        restore_target = jax.tree_util.tree_map_with_path(abstract, target)
    try:
        state = mngr.restore(step,
                             args=ocp.args.StandardRestore(restore_target))
    except Exception as err:
        if not known_layout:
            raise
        match = re.search(r'Error reading "([^"/]+)/',
                          " ".join(str(e) for e in _chain(err)))
        raise _corrupt(
            step_dir, step, "Orbax could not read it"
            + (f" (reading array {match.group(1)!r} failed)" if match
               else "") + f": {_describe(err)}") from err
    if expected is None:
        warnings.warn(
            f"Checkpoint step {step} at {str(step_dir)!r} has no checksums "
            "(it was written by an earlier version): restored without "
            "verification.", RuntimeWarning, stacklevel=4)
        return state
    _verify(state, expected, step_dir, step)
    if casts:
        state = jax.tree_util.tree_map_with_path(
            lambda p, x: (x.astype(casts[jax.tree_util.keystr(p)])
                          if jax.tree_util.keystr(p) in casts else x), state)
    return state


def _verify(state, expected, step_dir, step: int) -> None:
    """Raises if an array read back differs from its saved checksum."""
    got = _checksums(state)["arrays"]
    bad = []
    for name, want in expected.items():
        if want[_ALGORITHM] is None:
            continue
        if name not in got:
            bad.append((name, "was not read back"))
            continue
        digest = got[name]
        if digest[_ALGORITHM] is None:
            continue
        if digest["shape"] != list(want["shape"]):
            bad.append((name, f"was read back with shape "
                        f"{tuple(digest['shape'])}, saved "
                        f"{tuple(want['shape'])}"))
        elif digest[_ALGORITHM] != want[_ALGORITHM]:
            bad.append((name, f"does not match its saved {_ALGORITHM} "
                        f"checksum ({want[_ALGORITHM][:12]}..., read back "
                        f"{digest[_ALGORITHM][:12]}...)"))
    if bad:
        first, why = bad[0]
        more = (f"; {len(bad) - 1} more array(s) differ: "
                f"{[n for n, _ in bad[1:6]]}" if len(bad) > 1 else "")
        raise _corrupt(step_dir, step, f"array {first} {why}{more}.",
                       array=first)


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
            step = None
            for m in found.values():  # 'last' first: it wins a tie
                latest = max(m.all_steps())
                if step is None or latest > step:
                    step = latest
            order = (_LAST, _BEST)
        elif which == "best":
            if _BEST not in found:
                raise FileNotFoundError(
                    f"No checkpoint in {_subdir(dirpath, _BEST)!r}.")
            scores, mode = _scores(found[_BEST])
            unranked = sorted(set(found[_BEST].all_steps()) - set(scores))
            if unranked:
                raise CheckpointCorruptError(
                    f"The checkpoints of steps {unranked} in "
                    f"{_subdir(dirpath, _BEST)!r} have no readable metric "
                    f"(their {_STEP_METADATA!r} is missing or corrupt), so "
                    "the best checkpoint is unknown; restore a step by "
                    "number (`which=<step>`) instead.",
                    path=_subdir(dirpath, _BEST), step=unranked[0])
            step = _best_of(scores, mode)
            if step is None:
                raise FileNotFoundError(
                    f"The checkpoints in {_subdir(dirpath, _BEST)!r} have no "
                    "recorded metric.")
            order = (_BEST, _LAST)
        else:
            step = int(which)
            order = (_LAST, _BEST)
        copies = [(name, found[name]) for name in order
                  if name in found and step in found[name].all_steps()]
        if not copies:
            available = sorted({s for m in found.values()
                                for s in m.all_steps()})
            raise ValueError(
                f"`which={step}` is not a saved step of {dirpath!r}; "
                f"available steps: {available}.")
        target = trainer.state_dict()
        failures = []
        for _, mngr in copies:
            try:
                state = _restore_copy(mngr, step, target)
            except CheckpointCorruptError as err:
                failures.append(err)
                continue
            used = str(_step_dir(mngr, step))
            break
        else:
            others = sorted({int(s) for m in found.values()
                             for s in m.all_steps()} - {step})
            hint = (f" Other saved steps: {others} (restore one with "
                    "`which=<step>`)." if others else "")
            if len(failures) == 1:
                err = failures[0]
                raise CheckpointCorruptError(
                    f"{err} No other copy of step {step} exists.{hint}",
                    path=err.path, step=step, array=err.array) from err
            raise CheckpointCorruptError(
                f"No intact copy of step {step} in {dirpath!r}: "
                + " ".join(str(e) for e in failures) + hint,
                path=dirpath, step=step,
                array=failures[0].array) from failures[-1]
        for err in failures:
            warnings.warn(
                f"{err} Restored the copy at {used!r} instead.",
                RuntimeWarning, stacklevel=3)
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

    The checkpoint is verified before it is loaded (see the module
    docstring): its metadata files must be present and readable, Orbax must
    read every array and each array must match the SHA-256 checksum saved
    with it. A step saved under both ``best`` and ``last`` has two copies:
    the preferred one (``last``, or ``best`` for ``which="best"``) is tried
    first and, if it is corrupt or incomplete, the other is restored and a
    ``RuntimeWarning`` names the corrupt copy and the one used. Another step
    is never restored in place of the requested one. A checkpoint saved
    without checksums is restored unverified, with a ``RuntimeWarning``.

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
      ValueError: for a bad ``which`` or a step that was not saved, or if
        the checkpoint's arrays (pytree paths, shapes) are not those of
        ``trainer.state_dict()``.
      CheckpointCorruptError: if no copy of the requested step is intact: a
        file is missing (``_CHECKPOINT_METADATA``, ``_METADATA``,
        ``manifest.ocdbt``, a data file) or unreadable (truncated,
        overwritten), or an array read back differs from its checksum. The
        message names each copy's directory and step and the file or array
        (pytree path) at fault; ``trainer`` is left unchanged.
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
    ``NaN`` score is never kept as a best one. Each save records the SHA-256
    checksum of every array, computed on the host from the arrays being
    saved (the state is hashed once for both directories), which
    :func:`restore_checkpoint` verifies. ``on_train_end`` waits for
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
        enters = self._enters_top_k(score)
        if not enters and self._last_mngr is None:
            return
        state = trainer.state_dict()
        custom = self._custom_metadata(state)
        if enters:
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
            state = trainer.state_dict()
            last.save(int(trainer.step), args=ocp.args.StandardSave(state),
                      custom_metadata=self._custom_metadata(state),
                      force=True)
        self.close()

    def _custom_metadata(self, state) -> dict[str, Any]:
        """What a checkpoint of ``state`` records besides its arrays.

        The checksums are computed here, from the arrays handed to Orbax,
        before an asynchronous save copies them: they describe exactly the
        saved state.
        """
        return {"monitor": self.config.monitor, "mode": self.config.mode,
                _CHECKSUMS: _checksums(state)}

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

        Raises:
          FileNotFoundError: as :func:`restore_checkpoint`.
          ValueError: as :func:`restore_checkpoint`.
          CheckpointCorruptError: as :func:`restore_checkpoint`.
        """
        self.wait_until_finished()
        return _restore_into(trainer, self.config.dirpath, which)
