"""The registry of tasks the CLI can train: name -> algorithms, defaults, builder."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class Task:
    """A trainable task.

    Attributes:
      name: the ``--task`` name.
      module: module holding ``SETTINGS``, ``HPARAMS`` (dicts keyed by
        algorithm) and ``program(algo, settings)``.
      algos: valid ``--algo`` values.
      steps_key: per algorithm, the setting that ``--steps`` sets.
      steps_unit: what one step of ``--steps`` is, for ``--help``.
      summary: one line for ``--help``.
    """
    name: str
    module: str
    algos: tuple[str, ...]
    steps_key: dict[str, str]
    steps_unit: str
    summary: str

    def load(self):
        return importlib.import_module(self.module)

    def settings(self, algo: str) -> dict[str, Any]:
        return dict(self.load().SETTINGS[algo])

    def hparams(self, algo: str) -> dict[str, float]:
        return dict(self.load().HPARAMS[algo])

    def program(self, algo: str, settings: dict[str, Any]):
        return self.load().program(algo, settings)


TASKS: dict[str, Task] = {
    "cartpole": Task(
        name="cartpole", module="artifex_fn.experiments.cartpole",
        algos=("ppo", "reinforce"),
        steps_key=dict(ppo="total_timesteps", reinforce="total_episodes"),
        steps_unit="environment steps (ppo) or episodes (reinforce)",
        summary="gymnax CartPole-v1; the whole run is one compiled program"),
    "lm": Task(
        name="lm", module="artifex_fn.experiments.lm", algos=("grpo", "dpo"),
        steps_key=dict(grpo="iterations", dpo="iterations"),
        steps_unit="RL updates",
        summary="tiny causal LM on digit strings: pre-train, then reward "
                "'digits sum to 26' (GRPO) or preference pairs (DPO)"),
    "diffusion": Task(
        name="diffusion", module="artifex_fn.experiments.diffusion",
        algos=("grpo", "dpo"),
        steps_key=dict(grpo="iterations", dpo="iterations"),
        steps_unit="RL updates",
        summary="2-D DDPM on an 8-mode ring: pre-train, then steer samples "
                "into a wedge (DDPO with GRPO, or online Diffusion-DPO)"),
}


def get_task(name: str) -> Task:
    """The task called ``name``; the error lists the valid names."""
    if name not in TASKS:
        raise ValueError(
            f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}.")
    return TASKS[name]


def check_algo(task: Task, algo: str) -> None:
    if algo not in task.algos:
        raise ValueError(
            f"task {task.name!r} does not support --algo {algo!r}; valid: "
            f"{', '.join(task.algos)}.")
