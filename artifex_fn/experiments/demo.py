"""``artifex-fn demo``: a short tour of the library doing its job.

Three runs, each a single compiled program with a progress bar, a learning
curve and a checkpoint under ``--out``:

1. PPO on gymnax CartPole-v1, 4 seeds at once (the standard 500k-step
   configuration);
2. GRPO on a tiny causal language model, rewarded when its four sampled
   digits sum to 26;
3. GRPO (DDPO) on a 2-D diffusion model, rewarded when its samples land in
   a wedge holding 2 of the 8 modes of its training data.

It ends with a table of the before/after figures. :func:`example_main` is
the command line of the scripts in ``examples/``.
"""

from __future__ import annotations

import argparse
import inspect
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


def example_main(run, doc: str, argv=None) -> dict:
    """The command line of the scripts in ``examples/``.

    Parses ``--quick``, ``--seed N`` and, when ``run`` takes ``plot``,
    ``--plot PATH``; calls ``run`` with them and prints the table of its
    result's ``before`` and ``after`` dicts (same keys), then its other
    numbers (``seconds``, ...). Returns the result.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the short run that the tests check")
    parser.add_argument("--seed", type=int, default=0)
    if "plot" in inspect.signature(run).parameters:
        parser.add_argument("--plot", metavar="PATH",
                            help="save a figure there")
    result = run(**vars(parser.parse_args(argv)))
    width = max(len(name) for name in result["before"]) + 2
    print(f"{'':{width}}{'before':>10}{'after':>10}")
    for name, before in result["before"].items():
        print(f"{name:{width}}" + "".join(
            f"{v:10d}" if isinstance(v, int) else f"{v:10.3f}"
            for v in (before, result["after"][name])))
    for name, value in result.items():
        if isinstance(value, (int, float)):
            print(f"{name}: {value:.4g}")
    return result
