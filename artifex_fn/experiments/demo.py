"""``artifex-fn demo``: a short tour of the library doing its job.

Three runs, each a single compiled program with a progress bar, a learning
curve and a checkpoint under ``--out``:

1. PPO on gymnax CartPole-v1, 4 seeds at once (the standard 500k-step
   configuration);
2. GRPO on a tiny causal language model, rewarded when its four sampled
   digits sum to 26;
3. GRPO (DDPO) on a 2-D diffusion model, rewarded when its samples land in
   a wedge holding 2 of the 8 modes of its training data.

It ends with a table of the before/after figures.
"""

from __future__ import annotations

import os
import time

TOUR = (
    # (task, algo, seeds, steps, quick steps, overrides in quick mode)
    ("cartpole", "ppo", 4, None, 8192, {}),
    ("lm", "grpo", 1, None, 3, {"pretrain_steps": 20}),
    ("diffusion", "grpo", 1, None, 3, {"pretrain_steps": 20}),
)


def demo(*, out: str = os.path.join("runs", "demo"), quick: bool = False,
         progress: bool = True, sigint: str | None = "stop",
         log=print) -> list[dict]:
    """Runs the tour; returns the summaries (see :func:`train`).

    Each run replaces the files of the previous tour's run under ``out``
    (``overwrite=True``). On Ctrl-C (``sigint``, as for :func:`train`) the
    running run stops and saves itself, and the tour ends there: the last
    summary is then marked ``interrupted``.
    """
    from artifex_fn.experiments.train import train

    rows, summaries = [], []
    start = time.perf_counter()
    for task, algo, seeds, steps, quick_steps, quick_overrides in TOUR:
        log(f"\n== {task} / {algo}: {seeds} seed{'s' * (seeds > 1)} ==")
        t0 = time.perf_counter()
        summary = train(task, algo, seeds=seeds,
                        steps=quick_steps if quick else steps,
                        overrides=quick_overrides if quick else None,
                        out=os.path.join(out, f"{task}-{algo}"),
                        progress=progress, overwrite=True, sigint=sigint,
                        log=log)
        summary["wall_seconds"] = time.perf_counter() - t0
        summaries.append(summary)
        if summary["interrupted"]:
            return summaries
        p = summary["points"][0]
        rows.append((f"{task}/{algo}", summary["score"], p["before"],
                     p["after"], p["after_min"], seeds,
                     summary["wall_seconds"]))
    log("\n" + _table(rows))
    log(f"total {time.perf_counter() - start:.0f} s; curves, metrics and "
        f"checkpoints in {out}/")
    return summaries


def _table(rows) -> str:
    head = ("run", "score", "before", "after", "worst seed", "seeds",
            "wall s")
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    for name, score, before, after, worst, seeds, wall in rows:
        lines.append(f"| {name} | {score} | {before:.3f} | {after:.3f} | "
                     f"{worst:.3f} | {seeds} | {wall:.0f} |")
    return "\n".join(lines)
