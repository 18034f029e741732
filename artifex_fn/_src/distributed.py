"""Data-parallel (and FSDP) placement on a ``jax.sharding.Mesh``.

The engine is JAX's own: arrays carry a ``NamedSharding`` and ``jax.jit``
partitions the program (GSPMD). Nothing here changes the maths: a jitted
``update`` computes the same global function whatever the placement, so
every reduction of the algorithms (token means, per-sequence means,
group advantages, advantage normalisation, metrics) stays a reduction over
the *whole* batch; XLA inserts the all-reduces. Results differ from one
device's only by the order of floating-point sums.

Layout:

* the batch is split along its leading (sample) axis over every axis of the
  mesh (``("data", "fsdp")`` for :func:`make_mesh`'s meshes);
* parameters and optimiser state are replicated, or, with ``fsdp=True``,
  each array at least ``min_fsdp_size`` large is split along its largest
  dimension divisible by the ``"fsdp"`` axis size (ZeRO-3 / FSDP style:
  XLA gathers a parameter where it is used);
* scalars, PRNG keys and Python numbers are replicated / left as they are.

Multi-host: call :func:`initialize` in every process first; the mesh then
spans the devices of all processes. Pass ``process_local=True`` to
:func:`shard_batch` when each process holds only its own rows, and the same
state in every process to :func:`place_state`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, **kwargs) -> None:
    """``jax.distributed.initialize`` with CPU collectives enabled.

    Call it once per process before any other JAX call. On CPU, JAX needs a
    collectives implementation for cross-process all-reduces; this selects
    ``gloo`` (shipped with jaxlib) unless one is already set. On GPU/TPU
    clusters with a scheduler (SLURM, Cloud TPU) the arguments can be left
    out; keyword arguments go to ``jax.distributed.initialize``.
    """
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id, **kwargs)


def make_mesh(data: int | None = None, fsdp: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all devices).

    Args:
      data: size of the data-parallel axis (default: all devices not used
        by ``fsdp``).
      fsdp: size of the parameter-sharding axis (1: plain data parallel).
      devices: the devices to use, in order (default ``jax.devices()``,
        which spans every process after :func:`initialize`).

    Returns:
      A ``Mesh`` with axes ``("data", "fsdp")`` of ``data * fsdp`` devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(fsdp, int) or fsdp < 1:
        raise ValueError(f"`fsdp` must be an int >= 1, got {fsdp!r}.")
    if data is None:
        data = len(devices) // fsdp
    if not isinstance(data, int) or data < 1 or data * fsdp > len(devices):
        raise ValueError(
            f"a mesh of data={data!r} x fsdp={fsdp} devices does not fit the "
            f"{len(devices)} available devices.")
    grid = np.asarray(devices[:data * fsdp], dtype=object).reshape(data, fsdp)
    return Mesh(grid, (DATA_AXIS, FSDP_AXIS))


def _mesh_size(mesh: Mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _batch_axes(mesh: Mesh, axes):
    axes = tuple(mesh.axis_names) if axes is None else tuple(
        (axes,) if isinstance(axes, str) else axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"mesh has axes {tuple(mesh.axis_names)}; unknown "
                         f"batch axes {unknown}.")
    return axes


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, axes: str | Sequence[str] | None = None
                   ) -> NamedSharding:
    """Leading axis split over ``axes`` (default: all axes of ``mesh``)."""
    return NamedSharding(mesh, P(_batch_axes(mesh, axes)))


def _is_static(x) -> bool:
    """Python scalars and strings stay as they are (they may set shapes)."""
    return isinstance(x, (bool, int, float, complex, str)) or x is None


def _put(x, sharding: NamedSharding):
    """``x`` as a global array with ``sharding`` (identical in every process)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda index: host[index])


def shard_batch(batch, mesh: Mesh, *, axes: str | Sequence[str] | None = None,
                process_local: bool = False):
    """Places ``batch`` with its leading (sample) axis split over the mesh.

    Args:
      batch: a pytree (dict) of arrays with a common leading sample axis.
        0-d arrays are replicated; Python numbers and strings are left as
        they are (``batch["group_size"]`` stays a static int).
      mesh: the mesh.
      axes: mesh axes to split over (default: all of them).
      process_local: each process passes only its own rows (multi-host);
        the global batch is their concatenation in process order.

    Returns:
      The batch as global ``jax.Array`` s.

    Raises:
      ValueError: naming the array whose leading size the number of
        devices does not divide.
    """
    axes = _batch_axes(mesh, axes)
    sharding = NamedSharding(mesh, P(axes))
    n_dev = _mesh_size(mesh, axes)
    n_local = n_dev // jax.process_count() if process_local else n_dev

    def place(path, x):
        if _is_static(x):
            return x
        if np.ndim(x) == 0:
            return _put(x, replicated(mesh))
        size = np.shape(x)[0]
        if size % n_local:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)} has leading size {size}, "
                f"which the {n_local} {'local ' if process_local else ''}"
                f"devices of mesh axes {axes} do not divide.")
        if process_local:
            return jax.make_array_from_process_local_data(
                sharding, np.asarray(x))
        return _put(x, sharding)

    return jax.tree_util.tree_map_with_path(place, batch)


def fsdp_sharding(shape, mesh: Mesh, *, axis: str = FSDP_AXIS,
                  min_size: int = 1024) -> NamedSharding:
    """FSDP sharding of one array: its largest dimension that ``axis``
    divides is split; arrays smaller than ``min_size`` (or without such a
    dimension) are replicated."""
    n = mesh.shape[axis] if axis in mesh.axis_names else 1
    if n == 1 or math.prod(shape) < min_size:
        return replicated(mesh)
    dims = sorted((d for d in range(len(shape)) if shape[d] % n == 0),
                  key=lambda d: -shape[d])
    if not dims:
        return replicated(mesh)
    spec = [None] * len(shape)
    spec[dims[0]] = axis
    return NamedSharding(mesh, P(*spec))


def _leaf_sharding(x, mesh, fsdp, min_fsdp_size):
    if fsdp and np.ndim(x) > 0:
        return fsdp_sharding(np.shape(x), mesh, min_size=min_fsdp_size)
    return replicated(mesh)


def state_shardings(state, mesh: Mesh, *, fsdp: bool = False,
                    min_fsdp_size: int = 1024) -> list[NamedSharding]:
    """The shardings :func:`place_state` gives ``state``'s leaves, in
    ``jax.tree_util.tree_leaves`` order."""
    return [_leaf_sharding(x, mesh, fsdp, min_fsdp_size)
            for x in jax.tree_util.tree_leaves(state)]


def _map_leaves(fn, tree, shardings):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [fn(x, s) for x, s in zip(leaves, shardings)])


def place_state(state, mesh: Mesh, *, fsdp: bool = False,
                min_fsdp_size: int = 1024):
    """Places a state (any pytree: a ``TrainState``, params) on ``mesh``.

    Replicated, or FSDP-sharded with ``fsdp=True`` (see the module
    docstring). In multi-host runs every process passes the same state.
    """
    shardings = state_shardings(state, mesh, fsdp=fsdp,
                                min_fsdp_size=min_fsdp_size)
    return _map_leaves(_put, state, shardings)


def data_parallel(update: Callable[..., Any], mesh: Mesh, *,
                  fsdp: bool = False, min_fsdp_size: int = 1024,
                  batch_axes: str | Sequence[str] | None = None,
                  process_local: bool = False,
                  donate_state: bool = False) -> Callable[..., Any]:
    """``update(state, batch) -> (state, metrics)`` run over ``mesh``.

    Returns a function of the same signature that places the state
    (:func:`place_state`) and the batch (:func:`shard_batch`) and calls
    ``jax.jit(update)``; the returned state keeps its placement, metrics
    are replicated. Any algorithm's ``update`` works unchanged, and gives
    the single-device result up to summation order.

    Args:
      update: e.g. ``artifex_fn.grpo.update``.
      mesh: e.g. :func:`make_mesh`.
      fsdp: shard parameters and optimiser state along ``"fsdp"``.
      min_fsdp_size: arrays smaller than this stay replicated.
      batch_axes: mesh axes the batch is split over (default: all).
      process_local: the batch holds this process's rows only.
      donate_state: let XLA reuse the input state's buffers.

    Example:
      >>> import jax, optax, jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> mesh = afn.distributed.make_mesh()
      >>> config = afn.grpo.GRPOConfig(
      ...     num_generations=2, optimizer=optax.sgd(0.1),
      ...     policy=lambda p, obs: obs * p["w"])
      >>> state = afn.grpo.init({"w": jnp.ones(())}, config)
      >>> batch = dict(observations=jnp.ones((4, 3)),
      ...              actions=jnp.zeros((4,), jnp.int32),
      ...              rewards=jnp.array([1.0, 0.0, 0.0, 1.0]),
      ...              log_probs=jnp.full((4,), -jnp.log(3.0)))
      >>> step = afn.distributed.data_parallel(afn.grpo.update, mesh)
      >>> state, metrics = step(state, batch)
      >>> int(state.step)
      1
    """
    replicate = replicated(mesh)

    def constrained(state, batch):
        new, metrics = update(state, batch)
        new = _map_leaves(jax.lax.with_sharding_constraint, new,
                          state_shardings(new, mesh, fsdp=fsdp,
                                          min_fsdp_size=min_fsdp_size))
        metrics = jax.tree_util.tree_map(
            lambda m: jax.lax.with_sharding_constraint(m, replicate), metrics)
        return new, metrics

    compiled = jax.jit(constrained,
                       donate_argnums=(0,) if donate_state else ())

    @functools.wraps(update)
    def step(state, batch):
        state = place_state(state, mesh, fsdp=fsdp,
                            min_fsdp_size=min_fsdp_size)
        batch = shard_batch(batch, mesh, axes=batch_axes,
                            process_local=process_local)
        return compiled(state, batch)

    step.jitted = compiled
    return step
