"""Runs a :class:`Program` over seeds and hyper-parameter values in one compiled program.

Every run is laid out on a grid ``[S seeds, V sweep values]``:

* ``init``, ``evaluate`` and the training loop are ``jax.vmap``-ed twice
  (seeds outside, sweep values inside; one seed's key is shared by all its
  sweep values, so the values are compared on common random numbers);
* the iterations run as ``lax.scan`` chunks of one compiled function, the
  carry donated between chunks; only the chunk's scalar metrics come back
  to the host (for the progress bar and ``metrics.jsonl``).

With several devices (GPUs, or a CPU split into one XLA host device per
core with JAX's ``jax_num_cpu_devices`` option, as ``artifex-fn`` does) the seed axis is split across them: ``jax.jit`` over a one-axis
``seed`` mesh, each device running its seeds' share of the same vmapped
program with no communication. On a 2-core CPU that halves the wall time of
8 CartPole PPO seeds (``benchmarks/bench_cartpole.py``). Results are those
of the unsplit program up to floating-point reassociation (a vmapped dot
over 4 seeds may round differently from one over 8).

A run can stop at a chunk boundary (``should_stop``) and continue later
from a :class:`RunState`, the whole carry copied to the host: the rest of
the run executes the same compiled chunk function on the same carry, so
on the same machine and device count the result is bit for bit that of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from artifex_fn.experiments._program import Program


@dataclasses.dataclass
class RunResult:
    """What :func:`run` returns.

    Attributes:
      hparams: ``{name: float32[V]}``, the value of every hyper-parameter
        at each sweep point.
      sweep: ``[{name: value}]`` per sweep point (empty dicts without a
        sweep).
      metrics: ``{name: float[S, V, N]}`` per-iteration training metrics.
      before, after: ``{name: float[S, V]}`` evaluations of the initial
        and the final carry.
      params: the final ``program.params(carry)`` with leading ``[S, V]``.
      compile_seconds, run_seconds: wall time of the first chunk's
        compilation and of the training loop (compilation excluded).
      samples: environment steps or samples of the whole grid.
      num_seeds: ``S``.
      devices: how many devices the seed axis was split over (1: none).
      iterations_done: iterations trained (``num_iterations`` unless
        interrupted).
      num_iterations: iterations of the whole run.
      state: the :class:`RunState` to continue from when the run stopped
        early (``should_stop``), else None.
    """
    hparams: dict[str, np.ndarray]
    sweep: list[dict[str, float]]
    metrics: dict[str, np.ndarray]
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    params: Any
    compile_seconds: float
    run_seconds: float
    samples: int
    num_seeds: int
    devices: int = 1
    iterations_done: int = 0
    num_iterations: int = 0
    state: "RunState | None" = None

    @property
    def interrupted(self) -> bool:
        return self.iterations_done < self.num_iterations

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.run_seconds, 1e-9)


@dataclasses.dataclass
class RunState:
    """Everything :func:`run` needs to continue a run after a chunk.

    Attributes:
      carry: the leaves of the loop's carry (``jax.tree_util.tree_leaves``
        order), host arrays: algorithm and optimiser state, environment
        state, PRNG keys, iteration counters.
      iterations_done: iterations already trained (a multiple of
        ``chunk_length``).
      chunk_length: iterations per compiled chunk.
      num_iterations: iterations of the whole run.
      metrics: ``{name: float[S, V, iterations_done]}`` so far.
      before: ``{name: float[S, V]}``, the evaluation before training.
      run_seconds: training time so far.
    """
    carry: list[np.ndarray]
    iterations_done: int
    chunk_length: int
    num_iterations: int
    metrics: dict[str, np.ndarray]
    before: dict[str, np.ndarray]
    run_seconds: float = 0.0


def _call(fn, *args):
    return fn(*args)


def _call_waiting(fn, *args):
    """``fn(*args)`` in a helper thread while this one waits in short steps.

    A compiled call (and XLA's compiler) holds its thread until it
    returns, and Python runs signal handlers in the main thread only
    between bytecodes: waiting here instead lets a Ctrl-C handler run at
    once, e.g. to say that the run will stop, or to let a second Ctrl-C
    end the process while the chunk still runs.
    """
    result = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # re-raised in the calling thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.05)
    if "error" in result:
        raise result["error"]
    return result["value"]


def _strong(tree):
    """``tree`` with every weakly typed number made strongly typed (same
    dtype).

    The runner keeps the carry strongly typed, after ``init`` and after
    every chunk: a carry rebuilt from saved host arrays (``resume``) is
    strongly typed too, so it has the exact types the compiled chunk was
    built for, and a resumed run computes what an uninterrupted one does.
    """
    def strong(x):
        dtype = jnp.result_type(x)
        if jnp.issubdtype(dtype, jnp.number) or dtype == jnp.bool_:
            return jnp.asarray(x, dtype)
        return x
    return jax.tree_util.tree_map(strong, tree)


def _as_leaf(x: np.ndarray, aval):
    """Host array ``x`` as a device array of ``aval``'s dtype."""
    x = np.asarray(x)
    if x.dtype != aval.dtype:
        x = x.view(aval.dtype) if x.dtype.itemsize == np.dtype(
            aval.dtype).itemsize else x.astype(aval.dtype)
    return jnp.asarray(x, aval.dtype)


def _restore_carry(leaves: Sequence[np.ndarray], template, sharding):
    """The carry of ``template``'s structure from saved host leaves."""
    avals, treedef = jax.tree_util.tree_flatten(template)
    if len(leaves) != len(avals):
        raise ValueError(f"the saved state has {len(leaves)} arrays; this "
                         f"program's carry has {len(avals)}")
    out = []
    for i, (x, aval) in enumerate(zip(leaves, avals)):
        if tuple(np.shape(x)) != tuple(aval.shape):
            raise ValueError(
                f"saved carry array {i} has shape {tuple(np.shape(x))}; this "
                f"program's carry needs {tuple(aval.shape)}")
        leaf = _as_leaf(x, aval)
        out.append(leaf if sharding is None else
                   jax.device_put(leaf, sharding))
    return jax.tree_util.tree_unflatten(treedef, out)


def sweep_grid(hparams: Mapping[str, float],
               sweep: Mapping[str, Sequence[float]] | None = None):
    """Cartesian product of ``sweep`` over the base ``hparams``.

    Returns ``(grid, points)``: ``grid`` maps every hyper-parameter to a
    ``float32[V]`` array and ``points`` lists the swept values of each of
    the ``V`` points.

    >>> grid, points = sweep_grid(dict(lr=1e-3, beta=0.1),
    ...                           dict(lr=[1e-3, 3e-3]))
    >>> grid["lr"].tolist(), grid["beta"].shape, points
    ([0.0010000000474974513, 0.003000000026077032], (2,), [{'lr': 0.001}, {'lr': 0.003}])
    """
    sweep = dict(sweep or {})
    unknown = sorted(set(sweep) - set(hparams))
    if unknown:
        raise ValueError(
            f"cannot sweep {unknown}: not a hyper-parameter of this task; "
            f"sweepable: {sorted(hparams)}.")
    for name, values in sweep.items():
        if len(values) == 0:
            raise ValueError(f"sweep over {name!r} has no values.")
    names = list(sweep)
    points = [dict(zip(names, combo))
              for combo in itertools.product(*(sweep[n] for n in names))]
    if not points:
        points = [{}]
    grid = {k: np.asarray([p.get(k, v) for p in points], np.float32)
            for k, v in hparams.items()}
    return grid, points


def _chunk_length(num_iterations: int, target_chunks: int) -> int:
    """Largest divisor of ``num_iterations`` giving at least ``target_chunks`` chunks."""
    if target_chunks <= 1:
        return num_iterations
    best = 1
    for d in range(1, num_iterations + 1):
        if num_iterations % d == 0 and num_iterations // d >= target_chunks:
            best = d
    return best


def _grid_fns(program: Program):
    """``init``/``evaluate``/``chunk`` vmapped over ``[seeds, sweep]``."""

    def over_grid(fn, seed_axes, sweep_axes):
        return jax.vmap(jax.vmap(fn, in_axes=sweep_axes), in_axes=seed_axes)

    grid_init = over_grid(program.init, (0, None), (None, 0))

    def init(keys, hp):
        return _strong(grid_init(keys, hp))

    evaluate = over_grid(program.evaluate, (0, None, None), (0, None, 0))
    return init, evaluate


def _seed_sharding(num_seeds: int):
    """A sharding that splits the seed axis over the host devices, or None."""
    devices = jax.devices()
    usable = [d for d in devices if d.platform == devices[0].platform]
    k = math.gcd(num_seeds, len(usable))
    if k <= 1:
        return None
    mesh = jax.sharding.Mesh(np.asarray(usable[:k]), ("seed",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seed"))


def run(program: Program, *, hparams: Mapping[str, float],
        sweep: Mapping[str, Sequence[float]] | None = None,
        num_seeds: int = 1, seed: int = 0, chunks: int = 20,
        progress: bool = True, on_chunk: Callable | None = None,
        shard_seeds: bool | str = "auto",
        should_stop: Callable[[], bool] | None = None,
        on_stop: Callable[[RunState], None] | None = None,
        resume: RunState | None = None) -> RunResult:
    """Trains ``num_seeds`` x (sweep points) runs of ``program`` at once.

    Args:
      program: the task (:class:`Program`).
      hparams: base value of every traced hyper-parameter.
      sweep: ``{name: [values]}``; the grid is their Cartesian product.
      num_seeds: ``S >= 1`` seeds, keys ``split(PRNGKey(seed), S)``.
      seed: base seed.
      chunks: roughly how many compiled chunks the iterations are split
        into (progress and metrics come back after each; 1 compiles the
        whole run as one call).
      progress: show a tqdm bar.
      on_chunk: optional ``(first_iteration, metrics {name: [S, V, L]})``
        called after each chunk.
      shard_seeds: ``"auto"`` (default) splits the seed axis across the
        devices when there are several and ``gcd(num_seeds, devices) >
        1``; ``False`` keeps every seed on the default device; ``True``
        is the same as ``"auto"`` (see the module docstring).
      should_stop: optional ``() -> bool`` asked before the first chunk
        and after each one; True stops the run there (e.g. on Ctrl-C).
        With it, compilation and every compiled call run in a helper
        thread while the calling thread waits, so that signal handlers
        run at once.
      on_stop: optional ``(RunState) -> None`` called as soon as the run
        stopped early, before the final evaluation (to save the state
        first).
      resume: a :class:`RunState` of this program, hyper-parameters,
        seeds and ``chunks`` to continue from: the rest of the run is
        that of the uninterrupted run, bit for bit on the same machine
        and devices.

    Returns:
      a :class:`RunResult` (its ``state`` set when it stopped early).
    """
    if not isinstance(num_seeds, int) or num_seeds < 1:
        raise ValueError(f"`num_seeds` must be an int >= 1, got {num_seeds!r}.")
    grid, points = sweep_grid(hparams, sweep)
    hp = {k: jnp.asarray(v) for k, v in grid.items()}
    keys = jax.random.split(jax.random.PRNGKey(seed), num_seeds)
    eval_key = jax.random.PRNGKey(seed + 1_000_003)
    init_fn, evaluate_fn = _grid_fns(program)
    n = program.num_iterations
    length = _chunk_length(n, chunks)

    def one(c, h):
        return jax.lax.scan(lambda c, _: program.step(c, h), c, None,
                            length=length)

    def chunk(carry, hp):
        carry, metrics = jax.vmap(jax.vmap(one), in_axes=(0, None))(carry, hp)
        return _strong(carry), metrics

    single = num_seeds == 1 and len(points) == 1
    if single:
        # One run: the program unbatched (a vmap over axes of size 1 costs
        # XLA's CPU backend up to a quarter of the step time), its outputs
        # given the [1, 1] grid axes.
        def grid_axes(tree):
            return jax.tree_util.tree_map(lambda x: x[None, None], tree)

        def first(hp):
            return {k: v[0] for k, v in hp.items()}

        def init_fn(keys, hp):
            return _strong(program.init(keys[0], first(hp)))

        def evaluate_fn(carry, key, hp):
            return grid_axes(program.evaluate(carry, key, first(hp)))

        def chunk(carry, hp):
            carry, metrics = one(carry, first(hp))
            return _strong(carry), grid_axes(metrics)

    if shard_seeds not in (True, False, "auto"):
        raise ValueError(f"`shard_seeds` must be True, False or 'auto', got "
                         f"{shard_seeds!r}.")
    sharding = (_seed_sharding(num_seeds)
                if shard_seeds and not single else None)
    if sharding is None:
        init_j = jax.jit(init_fn)
        eval_j = jax.jit(evaluate_fn)
        chunk_j = jax.jit(chunk, donate_argnums=0)
    else:
        # Every leaf of the carry and the metrics leads with the seed axis;
        # hyper-parameters and evaluation keys are replicated.
        rep = jax.sharding.NamedSharding(sharding.mesh,
                                         jax.sharding.PartitionSpec())
        keys = jax.device_put(keys, sharding)
        hp = jax.device_put(hp, rep)
        init_j = jax.jit(init_fn, in_shardings=(sharding, rep),
                         out_shardings=sharding)
        eval_j = jax.jit(evaluate_fn, in_shardings=(sharding, rep, rep),
                         out_shardings=sharding)
        chunk_j = jax.jit(chunk, donate_argnums=0,
                          in_shardings=(sharding, rep),
                          out_shardings=(sharding, sharding))

    num_chunks = n // length
    call = _call if should_stop is None else _call_waiting
    if resume is None:
        carry = call(init_j, keys, hp)
        before = call(lambda c: jax.device_get(eval_j(c, eval_key, hp)), carry)
        done, previous_seconds = 0, 0.0
        history: dict[str, list[np.ndarray]] = {}
    else:
        if (resume.num_iterations, resume.chunk_length) != (n, length):
            raise ValueError(
                f"the saved state is of a run of {resume.num_iterations} "
                f"iterations in chunks of {resume.chunk_length}; this one "
                f"has {n} in chunks of {length}")
        if resume.iterations_done % length or resume.iterations_done > n:
            raise ValueError(f"the saved state stopped after "
                             f"{resume.iterations_done} iterations, not at "
                             f"a chunk boundary")
        carry = _restore_carry(resume.carry, jax.eval_shape(init_j, keys, hp),
                               sharding)
        before = resume.before
        done, previous_seconds = resume.iterations_done, resume.run_seconds
        history = {k: [np.asarray(v)] for k, v in resume.metrics.items()}

    stop = should_stop if should_stop is not None else (lambda: False)
    compile_seconds = 0.0
    if done < n:
        t0 = time.perf_counter()
        compiled = call(lambda c: chunk_j.lower(c, hp).compile(), carry)
        compile_seconds = time.perf_counter() - t0

    bar = None
    if progress and done < n:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, initial=done,
                   desc=program.description or "train", unit="it",
                   dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for i in range(done // length, num_chunks):
            if stop():
                break
            carry, metrics = call(compiled, carry, hp)
            metrics = jax.device_get(metrics)
            for k, v in metrics.items():
                history.setdefault(k, []).append(np.asarray(v))
            done = (i + 1) * length
            if on_chunk is not None:
                on_chunk(i * length, metrics)
            if bar is not None:
                bar.update(length)
                shown = {name: f"{np.mean(metrics[name][..., -1]):.3g}"
                         for name in (program.curve,) + tuple(program.postfix)
                         if name in metrics}
                if shown:
                    bar.set_postfix(shown)
        jax.block_until_ready(carry)
    finally:
        if bar is not None:
            bar.close()
    run_seconds = previous_seconds + time.perf_counter() - t0
    metrics_so_far = {k: np.concatenate(v, axis=-1) for k, v in history.items()}
    state = None
    if done < n:
        state = RunState(
            carry=[np.asarray(x) for x in jax.device_get(
                jax.tree_util.tree_leaves(carry))],
            iterations_done=done, chunk_length=length, num_iterations=n,
            metrics=metrics_so_far,
            before={k: np.asarray(v) for k, v in before.items()},
            run_seconds=run_seconds)
        if on_stop is not None:
            on_stop(state)
    after = call(lambda c: jax.device_get(eval_j(c, eval_key, hp)), carry)
    params = program.params(carry)
    if single:
        params = jax.tree_util.tree_map(lambda x: x[None, None], params)
    params = jax.device_get(params)
    return RunResult(
        hparams=grid, sweep=points,
        metrics=metrics_so_far,
        before={k: np.asarray(v) for k, v in before.items()},
        after={k: np.asarray(v) for k, v in after.items()},
        params=params, compile_seconds=compile_seconds,
        run_seconds=run_seconds,
        samples=num_seeds * len(points) * done * program.samples_per_iteration,
        num_seeds=num_seeds,
        devices=1 if sharding is None else len(sharding.device_set),
        iterations_done=done, num_iterations=n, state=state)
