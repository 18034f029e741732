"""The shape every experiment takes, and the pieces the tasks share.

A :class:`Program` is what :func:`artifex_fn.experiments.run` needs to train
many seeds and hyper-parameter values of one task inside one compiled
function:

* ``init(key, hparams) -> carry`` builds everything a run carries
  (algorithm state, environment state, counters) from a PRNG key and a dict
  of scalar hyper-parameters (traced, so they can be ``vmap``-ed over);
* ``step(carry, hparams) -> (carry, metrics)`` runs one iteration (collect
  data, update) and returns scalar metrics;
* ``evaluate(carry, key, hparams) -> metrics`` scores the current policy
  (the "before"/"after" figures);
* ``params(carry)`` picks what a checkpoint stores (by default
  ``carry["train"].params``, the algorithm state's parameters).

All four are pure and jit/vmap-safe; the runner composes
``vmap(seeds) o vmap(sweep values) o scan(iterations)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Program:
    """A task compiled into pure functions (see the module docstring).

    Attributes:
      init: ``(key, hparams) -> carry``.
      step: ``(carry, hparams) -> (carry, metrics)``; one iteration.
      evaluate: ``(carry, key, hparams) -> metrics``.
      num_iterations: iterations of a full run.
      samples_per_iteration: environment steps (or generated samples) per
        iteration, for throughput figures.
      curve: the metric plotted as the learning curve.
      score: the evaluation metric quoted as "before -> after".
      description: one line for progress bars and summaries.
      postfix: further metrics shown next to ``curve`` on the progress bar.
      params: ``carry -> pytree`` saved by checkpoints.
      show: optional ``(params, key) -> list[str]``, host side: a few
        samples as text from ``params`` (``None``: the model before
        fine-tuning), written to ``samples.txt`` before and after.
    """
    init: Callable[..., Any]
    step: Callable[..., Any]
    evaluate: Callable[..., Any]
    num_iterations: int
    samples_per_iteration: int
    curve: str
    score: str
    description: str = ""
    postfix: tuple[str, ...] = ()
    params: Callable[[Any], Any] = lambda carry: carry["train"].params
    show: Callable[[Any, Any], list[str]] | None = None


def resolve_settings(where: str, defaults: Mapping[str, Any],
                     ranges: Mapping[str, Any],
                     settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """``defaults`` overridden by ``settings``, each value checked against
    its :class:`~artifex_fn.experiments.tasks.Range`; unknown names raise."""
    unknown = sorted(set(settings or {}) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {where} settings {unknown}; valid: "
                         f"{sorted(defaults)}.")
    return {k: ranges[k].check(k, v)
            for k, v in dict(defaults, **(settings or {})).items()}


def adam(*, eps: float = 1e-8, flat: bool = False, schedule=None):
    """Adam whose learning rate lives in the optimiser state.

    ``optax.inject_hyperparams`` keeps the (traced, sweepable) peak
    learning rate in the state, set by :func:`with_learning_rate`; the
    optional ``schedule`` (``count -> factor``, an optax schedule) scales
    every step. ``flat`` updates one flat parameter vector (a handful of
    operations instead of a copy of Adam per tensor: compile time).
    """
    def make(learning_rate):
        tx = optax.adam(learning_rate, eps=eps)
        return optax.flatten(tx) if flat else tx

    tx = optax.inject_hyperparams(make)(learning_rate=0.0)
    return tx if schedule is None else optax.chain(
        tx, optax.scale_by_schedule(schedule))


def with_learning_rate(state, lr):
    """An algorithm state whose :func:`adam` runs at the peak rate ``lr``."""
    return state.replace(opt_state=optax.tree_utils.tree_set(
        state.opt_state, learning_rate=jnp.asarray(lr, jnp.float32)))


def gaussian_init(module: nnx.Module):
    """``(graphdef, init_params(key))`` for modules shaped like ``module``.

    ``init_params`` draws every leaf that ``module`` initialised randomly as
    an i.i.d. Gaussian with that leaf's standard deviation in ``module``
    (lecun-normal kernels, ``1/sqrt(D)`` embeddings) and keeps the
    constant ones (zero biases, unit layer-norm scales), all from one
    ``jax.random.normal`` call: a module's own per-tensor
    (truncated-normal) initialisers compile several times more slowly
    inside a vmapped ``init``.
    """
    graphdef, template = nnx.split(module)
    leaves, treedef = jax.tree_util.tree_flatten(template)
    leaves = [np.asarray(x) for x in leaves]
    scales = [None if np.all(x == x.flat[0]) else float(np.std(x))
              for x in leaves]
    total = sum(x.size for x, s in zip(leaves, scales) if s is not None)

    def init_params(key):
        z = jax.random.normal(key, (total,))
        out, i = [], 0
        for x, s in zip(leaves, scales):
            if s is None:
                out.append(jnp.asarray(x))
            else:
                out.append(s * z[i:i + x.size].reshape(x.shape))
                i += x.size
        return jax.tree_util.tree_unflatten(treedef, out)

    return graphdef, init_params


def scalars(metrics: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Metrics as float32 scalars (the runner's history is numeric)."""
    return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
