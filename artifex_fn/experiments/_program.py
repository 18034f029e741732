"""The shape every experiment takes: pure ``init``/``step`` over traced hyper-parameters.

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
* ``params(carry)`` picks what a checkpoint stores.

All four are pure and jit/vmap-safe; the runner composes
``vmap(seeds) o vmap(sweep values) o scan(iterations)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Program:
    """A task compiled into pure functions (see the module docstring).

    Attributes:
      init: ``(key, hparams) -> carry``.
      step: ``(carry, hparams) -> (carry, metrics)``; one iteration.
      evaluate: ``(carry, key, hparams) -> metrics``.
      params: ``carry -> pytree`` saved by checkpoints.
      num_iterations: iterations of a full run.
      samples_per_iteration: environment steps (or generated samples) per
        iteration, for throughput figures.
      curve: the metric plotted as the learning curve.
      score: the evaluation metric quoted as "before -> after".
      description: one line for progress bars and summaries.
    """
    init: Callable[..., Any]
    step: Callable[..., Any]
    evaluate: Callable[..., Any]
    params: Callable[[Any], Any]
    num_iterations: int
    samples_per_iteration: int
    curve: str
    score: str
    description: str = ""
