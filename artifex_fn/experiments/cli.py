"""The ``artifex-fn`` command line: ``train``, ``demo`` and ``tasks``."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _compilation_cache() -> None:
    """Keeps compiled programs in ``~/.cache/artifex_fn/xla`` between runs.

    JAX's persistent compilation cache: a second run of the same task,
    settings and shapes skips most of XLA's compile time. Set
    ``JAX_COMPILATION_CACHE_DIR`` to move it, or to an empty string to
    turn it off.
    """
    import jax

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if path is None:
        path = os.path.join(os.path.expanduser("~"), ".cache", "artifex_fn",
                            "xla")
    if path:
        jax.config.update("jax_compilation_cache_dir", path)


def _host_devices(requested: str, parser) -> None:
    """Splits the CPU into ``requested`` XLA host devices, before JAX starts.

    The runner then spreads the seeds over them (one core each): the
    seeds of a small network like CartPole's keep a core busy each, and one
    program's operations are too small to use two cores. No effect on GPUs
    and TPUs, when ``XLA_FLAGS`` already sets a device count, or when JAX's
    backends already exist in this process.
    """
    if requested == "auto":
        n = min(os.cpu_count() or 1, 8)
    else:
        try:
            n = int(requested)
        except ValueError:
            n = 0
        if n < 1:
            parser.error(f"--devices must be 'auto' or an int >= 1, got "
                         f"{requested!r}.")
    flags = os.environ.get("XLA_FLAGS", "")
    if n <= 1 or "xla_force_host_platform_device_count" in flags:
        return
    try:
        from jax._src import xla_bridge
        if xla_bridge.backends_are_initialized():
            return
    except (ImportError, AttributeError):  # pragma: no cover - jax internals
        pass
    os.environ["XLA_FLAGS"] = (
        flags + f" --xla_force_host_platform_device_count={n}").strip()


def _parse_assignment(text: str, flag: str, parser):
    if "=" not in text:
        parser.error(f"{flag} expects NAME=VALUE, got {text!r}.")
    name, value = text.split("=", 1)
    return name.strip(), value.strip()


def _number(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)


def _load_config_file(path: str) -> dict:
    """A JSON or TOML file with any of: task, algo, seeds, seed, steps, out,
    settings {name: value}, hparams {name: value}, sweep {name: [values]}."""
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".toml"):
        import tomllib
        data = tomllib.loads(raw.decode())
    else:
        data = json.loads(raw)
    allowed = {"task", "algo", "seeds", "seed", "steps", "out", "settings",
               "hparams", "sweep", "chunks"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed: "
                         f"{sorted(allowed)}.")
    return data


def _tasks_help() -> str:
    from artifex_fn.experiments.tasks import TASKS
    lines = ["tasks (--task) and their algorithms (--algo):"]
    for t in TASKS.values():
        lines.append(f"  {t.name:10s} {', '.join(t.algos):16s} {t.summary}")
        lines.append(f"  {'':10s} --steps counts {t.steps_unit}")
    lines.append("run `artifex-fn tasks` for every setting and "
                 "hyper-parameter with its default.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="artifex-fn",
        description="Reinforcement-learning fine-tuning with artifex_fn: "
                    "train a task over many seeds and hyper-parameter "
                    "values in one compiled JAX program.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tr = sub.add_parser(
        "train", help="train one task with one algorithm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train TASK with ALGO. All seeds and sweep points run "
                    "inside one compiled program (jax.vmap over seeds and "
                    "hyper-parameters, lax.scan over iterations). Writes "
                    "config.json, metrics.jsonl, summary.json, curve.png "
                    "and checkpoint/ into --out.",
        epilog=_tasks_help() + """

examples:
  artifex-fn train --algo ppo --task cartpole --seeds 8
  artifex-fn train --algo ppo --task cartpole --sweep lr=1e-4,3e-4,1e-3
  artifex-fn train --algo grpo --task lm --steps 100 --set beta=0.02
  artifex-fn train --config run.toml --seeds 4""")
    tr.add_argument("--task", help="task name (see below)")
    tr.add_argument("--algo", help="algorithm: reinforce, ppo, grpo or dpo "
                                   "(each task supports some)")
    tr.add_argument("--seeds", type=int, default=None,
                    help="number of seeds trained at once with jax.vmap "
                         "(default 1)")
    tr.add_argument("--seed", type=int, default=None,
                    help="base seed; run i uses split(PRNGKey(seed), N)[i] "
                         "(default 0)")
    tr.add_argument("--steps", type=int, default=None,
                    help="training budget in the task's unit (environment "
                         "steps for cartpole/ppo, episodes for "
                         "cartpole/reinforce, RL updates for lm and "
                         "diffusion); default: the task's standard budget")
    tr.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="NAME=VALUE",
                    help="override a setting or hyper-parameter, e.g. "
                         "--set lr=1e-3 --set num_envs=8 (repeatable)")
    tr.add_argument("--sweep", action="append", default=[],
                    metavar="NAME=V1,V2,...",
                    help="sweep a hyper-parameter inside the same compiled "
                         "program (jax.vmap); several --sweep flags give the "
                         "Cartesian product; one curve per value")
    tr.add_argument("--out", default=None,
                    help="output directory (default runs/TASK-ALGO-TIME)")
    tr.add_argument("--config", default=None, metavar="FILE",
                    help="JSON or TOML file with task, algo, seeds, seed, "
                         "steps, out, settings{}, hparams{}, sweep{}; "
                         "command-line flags win")
    tr.add_argument("--chunks", type=int, default=None,
                    help="split the iterations into about this many compiled "
                         "chunks; metrics and the progress bar update after "
                         "each (default 20; 1 = one call for the whole run)")
    tr.add_argument("--devices", default="auto", metavar="N",
                    help="CPU: split the host into this many XLA devices "
                         "and spread the seeds over them, one core each "
                         "(default auto: the number of cores, at most 8; "
                         "1 keeps one device)")
    tr.add_argument("--no-progress", action="store_true",
                    help="no progress bar")
    tr.add_argument("--no-plot", action="store_true",
                    help="skip curve.png (no matplotlib needed)")

    demo = sub.add_parser(
        "demo", help="a short tour: PPO on CartPole, GRPO on the tiny LM "
                     "and on the 2-D diffusion model, before/after figures",
        description="Runs PPO on CartPole (4 seeds), GRPO on the tiny "
                    "language model and GRPO on the 2-D diffusion model, "
                    "prints before/after figures and writes each run's "
                    "files under --out.")
    demo.add_argument("--out", default=os.path.join("runs", "demo"),
                      help="output directory (default runs/demo)")
    demo.add_argument("--quick", action="store_true",
                      help="tiny budgets (a smoke test, not a result)")
    demo.add_argument("--devices", default="auto", metavar="N",
                      help="as for train")
    demo.add_argument("--no-progress", action="store_true",
                      help="no progress bars")

    sub.add_parser("tasks", help="list tasks, algorithms, settings and "
                                 "hyper-parameters with their defaults")
    return parser


def _train_from_args(args, parser) -> int:
    from artifex_fn.experiments.train import train

    cfg = _load_config_file(args.config) if args.config else {}
    task = args.task or cfg.get("task")
    algo = args.algo or cfg.get("algo")
    if not task or not algo:
        parser.error("train needs --task and --algo (or a --config file "
                     "naming them).\n" + _tasks_help())
    overrides = dict(cfg.get("settings", {}))
    overrides.update(cfg.get("hparams", {}))
    for text in args.overrides:
        name, value = _parse_assignment(text, "--set", parser)
        try:
            overrides[name] = _number(value)
        except ValueError:
            parser.error(f"--set {text!r}: the value must be a number or "
                         f"true/false.")
    sweep = {k: [float(x) for x in v] for k, v in cfg.get("sweep", {}).items()}
    for text in args.sweep:
        name, values = _parse_assignment(text, "--sweep", parser)
        try:
            sweep[name] = [float(x) for x in values.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--sweep {text!r}: values must be numbers "
                         f"separated by commas.")
    seeds = args.seeds if args.seeds is not None else cfg.get("seeds", 1)
    if seeds < 1:
        parser.error(f"--seeds must be >= 1, got {seeds}.")
    try:
        train(task, algo, seeds=seeds,
              seed=args.seed if args.seed is not None else cfg.get("seed", 0),
              steps=args.steps if args.steps is not None else cfg.get("steps"),
              overrides=overrides, sweep=sweep,
              out=args.out or cfg.get("out"),
              chunks=args.chunks or cfg.get("chunks", 20),
              progress=not args.no_progress, plot=not args.no_plot)
    except ValueError as e:
        parser.error(str(e))
    return 0


def _print_tasks() -> int:
    from artifex_fn.experiments.tasks import TASKS
    for t in TASKS.values():
        print(f"{t.name}: {t.summary}")
        for algo in t.algos:
            try:
                settings, hparams = t.settings(algo), t.hparams(algo)
            except ImportError as e:
                print(f"  {algo}: unavailable ({e})")
                continue
            print(f"  --algo {algo}   (--steps sets {t.steps_key[algo]})")
            print("    settings:        " + ", ".join(
                f"{k}={v}" for k, v in settings.items()))
            print("    hyper-parameters: " + ", ".join(
                f"{k}={v:g}" for k, v in hparams.items()))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "tasks":
        return _print_tasks()
    _host_devices(args.devices, parser)
    _compilation_cache()
    if args.command == "train":
        return _train_from_args(args, parser)
    from artifex_fn.experiments.demo import demo
    demo(out=args.out, quick=args.quick, progress=not args.no_progress)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
