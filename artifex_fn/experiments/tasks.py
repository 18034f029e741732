"""The registry of tasks the CLI can train: name -> algorithms, defaults, builder.

Every task module declares, per algorithm, the valid :class:`Range` of each
setting and hyper-parameter (``RANGES``), so that ``train`` rejects a value
before anything is traced: hyper-parameters are traced inside the compiled
program, where the algorithms' own range checks never see them.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
from typing import Any


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of one setting or hyper-parameter.

    Attributes:
      lo, hi: bounds (``-inf``/``inf``: none).
      lo_open, hi_open: exclude the bound itself.
      kind: ``"float"`` (any finite real number in the bounds), ``"int"``
        (an integer in the bounds; an integral float is accepted) or
        ``"bool"`` (true/false; 0/1 and the strings "true"/"false"
        accepted).

    >>> str(Range.unit()), str(Range.positive()), str(Range.count())
    ('in [0, 1]', '> 0', 'an integer >= 1')
    >>> Range.unit().check("gamma", 1.5)
    Traceback (most recent call last):
    ...
    ValueError: gamma must be in [0, 1], got 1.5
    """
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    kind: str = "float"

    @classmethod
    def positive(cls) -> "Range":
        return cls(0.0, lo_open=True)

    @classmethod
    def non_negative(cls) -> "Range":
        return cls(0.0)

    @classmethod
    def unit(cls, *, hi_open: bool = False) -> "Range":
        return cls(0.0, 1.0, hi_open=hi_open)

    @classmethod
    def count(cls, minimum: int = 1) -> "Range":
        return cls(minimum, kind="int")

    @classmethod
    def flag(cls) -> "Range":
        return cls(kind="bool")

    def __str__(self) -> str:
        if self.kind == "bool":
            return "true or false"
        fmt = lambda x: f"{x:g}"
        lo, hi = math.isfinite(self.lo), math.isfinite(self.hi)
        if lo and hi:
            bounds = (f"in {'(' if self.lo_open else '['}{fmt(self.lo)}, "
                      f"{fmt(self.hi)}{')' if self.hi_open else ']'}")
        elif lo:
            bounds = f"{'>' if self.lo_open else '>='} {fmt(self.lo)}"
        elif hi:
            bounds = f"{'<' if self.hi_open else '<='} {fmt(self.hi)}"
        else:
            bounds = "finite"
        if self.kind == "int":
            return "an integer" + ("" if bounds == "finite" else f" {bounds}")
        return bounds

    def check(self, name: str, value):
        """``value`` as the type of this range (bool, int or float); raises
        a ValueError naming ``name``, the value and the range otherwise."""
        error = ValueError(f"{name} must be {self}, got {value!r}")
        if self.kind == "bool":
            if isinstance(value, (bool, numbers.Integral)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise error
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise error
        value = float(value) if self.kind == "float" else value
        if not math.isfinite(value):
            raise error
        if self.kind == "int":
            if value != int(value):
                raise error
            value = int(value)
        if (value < self.lo or (self.lo_open and value == self.lo)
                or value > self.hi or (self.hi_open and value == self.hi)):
            raise error
        return value


@dataclasses.dataclass(frozen=True)
class Task:
    """A trainable task.

    Attributes:
      name: the ``--task`` name.
      module: module holding ``SETTINGS``, ``HPARAMS`` and ``RANGES``
        (dicts keyed by algorithm) and ``<algo>_program(settings)``.
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
        check_algo(self, algo)
        return getattr(self.load(), f"{algo}_program")(settings)

    def ranges(self, algo: str) -> dict[str, Range]:
        """The valid :class:`Range` of every setting and hyper-parameter."""
        return dict(self.load().RANGES[algo])

    def check_settings(self, algo: str, settings: dict[str, Any]) -> None:
        """Constraints between settings (e.g. a divisor); raises ValueError."""
        check = getattr(self.load(), "check_settings", None)
        if check is not None:
            check(algo, settings)

    def iteration_budget(self, algo: str,
                         settings: dict[str, Any]) -> tuple[int, str, str]:
        """How much of the ``--steps`` budget one iteration uses.

        Returns ``(amount, formula, unit)``, e.g. ``(512, "num_envs *
        num_steps", "environment steps")``; tasks whose budget counts
        iterations use ``(1, "", "RL updates")``.
        """
        budget = getattr(self.load(), "iteration_budget", None)
        if budget is None:
            return 1, "", "RL updates"
        return budget(algo, settings)


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
    "arith": Task(
        name="arith", module="artifex_fn.experiments.arith",
        algos=("grpo", "dpo", "online_dpo", "kto", "orpo"),
        steps_key=dict(grpo="iterations", dpo="iterations",
                       online_dpo="iterations", kto="iterations",
                       orpo="iterations"),
        steps_unit="RL updates",
        summary="arithmetic posed in words to a small LM with a BPE "
                "tokenizer; reward read from the decoded text (GRPO, online "
                "DPO), right-vs-wrong answer pairs (DPO, ORPO) or unpaired "
                "right and wrong answers (KTO)"),
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
