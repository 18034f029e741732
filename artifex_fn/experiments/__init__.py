"""End-to-end experiments: tasks as pure programs, a seeds x sweep runner, the CLI.

``artifex-fn train --task cartpole --algo ppo --seeds 8`` (or
:func:`train` from Python) builds the task's :class:`Program` (pure
``init``/``step``/``evaluate`` over traced hyper-parameters), runs every seed
and sweep point inside one compiled program and writes ``config.json``,
``metrics.jsonl``, ``summary.json``, ``curve.png`` and ``checkpoint/``.
Tasks live in :mod:`artifex_fn.experiments.tasks`.
"""

from artifex_fn.experiments._program import Program
from artifex_fn.experiments.outputs import load_checkpoint
from artifex_fn.experiments.outputs import read_metrics
from artifex_fn.experiments.runner import RunResult
from artifex_fn.experiments.runner import run
from artifex_fn.experiments.runner import sweep_grid
from artifex_fn.experiments.tasks import TASKS
from artifex_fn.experiments.tasks import get_task
from artifex_fn.experiments.train import train

__all__ = ["Program", "RunResult", "TASKS", "get_task", "load_checkpoint",
           "read_metrics", "run", "sweep_grid", "train"]
