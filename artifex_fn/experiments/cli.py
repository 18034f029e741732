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
    program's operations are too small to use two cores. Sets JAX's
    ``jax_num_cpu_devices`` option; no effect on GPUs and TPUs, when
    ``XLA_FLAGS`` already sets a device count, or when JAX's backends
    already exist in this process (the option then refuses a change).
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
    if n <= 1 or "xla_force_host_platform_device_count" in os.environ.get(
            "XLA_FLAGS", ""):
        return
    import jax
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:   # the backends exist: too late to split the CPU
        pass


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


# Top-level keys of a --config file and what each must be.
CONFIG_KEYS = dict(
    task="a string", algo="a string", seeds="an integer >= 1",
    seed="an integer >= 0", steps="an integer >= 1", out="a string",
    chunks="an integer >= 1", settings="a table of NAME = VALUE",
    hparams="a table of NAME = VALUE", sweep="a table of NAME = [VALUES]")


def _is_int(value, minimum: int) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)
            and value >= minimum)


def _load_config_file(path: str) -> dict:
    """A JSON or TOML file with any of: task, algo, seeds, seed, steps, out,
    chunks, settings {name: value}, hparams {name: value}, sweep {name:
    [values]}.

    ``.toml`` files are read as TOML, any other as JSON. Raises ValueError
    with one line naming the file and what is wrong in it: unreadable,
    not valid TOML/JSON (with the parser's line and column), unknown key,
    wrong type.
    """
    where = f"--config {path}"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file.") from None
    except IsADirectoryError:
        raise ValueError(f"{where}: is a directory, not a file.") from None
    except OSError as e:
        raise ValueError(f"{where}: cannot read it ({e.strerror or e}).") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {e.start}).") from None
    if path.endswith(".toml"):
        import tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{where}: invalid TOML: {e}.") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON: {e.msg} (at line "
                             f"{e.lineno}, column {e.colno}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: must hold a table of keys "
                         f"({', '.join(CONFIG_KEYS)}), got "
                         f"{type(data).__name__}.")
    for key, value in data.items():
        if key not in CONFIG_KEYS:
            import difflib
            close = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}; allowed: "
                             f"{', '.join(sorted(CONFIG_KEYS))}.")
        ok = {"task": isinstance(value, str) and value,
              "algo": isinstance(value, str) and value,
              "out": isinstance(value, str) and value,
              "seeds": _is_int(value, 1), "seed": _is_int(value, 0),
              "steps": _is_int(value, 1), "chunks": _is_int(value, 1),
              "settings": isinstance(value, dict),
              "hparams": isinstance(value, dict),
              "sweep": isinstance(value, dict) and all(
                  isinstance(v, list) for v in value.values())}[key]
        if not ok:
            raise ValueError(f"{where}: {key} must be {CONFIG_KEYS[key]}, "
                             f"got {value!r}.")
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
        description="""\
Train TASK with ALGO. All seeds and sweep points run inside one compiled
program (jax.vmap over seeds and hyper-parameters, lax.scan over
iterations). Writes config.json, metrics.jsonl, summary.json, curve.png and
checkpoint/ into --out.

Every value is checked against its valid range before anything is compiled
(`artifex-fn tasks` lists the ranges). Ctrl-C stops at the end of the
running chunk, saves the run (state/) and prints the command that resumes
it; a second Ctrl-C aborts at once, without saving.

exit status: 0 done, 2 usage or configuration error, 1 a file could not be
written, 130 interrupted.""",
        epilog=_tasks_help() + """

examples:
  artifex-fn train --algo ppo --task cartpole --seeds 8
  artifex-fn train --algo ppo --task cartpole --sweep lr=1e-4,3e-4,1e-3
  artifex-fn train --algo grpo --task lm --steps 100 --set beta=0.02
  artifex-fn train --config run.toml --seeds 4""")
    tr.add_argument("--task", help="task name (see below)")
    tr.add_argument("--algo", help="algorithm: reinforce, ppo, grpo, dpo, "
                                   "online_dpo, kto or orpo (each task "
                                   "supports some)")
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
                         "diffusion); at least one iteration's worth, "
                         "rounded down to whole iterations (with a note); "
                         "default: the task's standard budget")
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
                    help="output directory, new or empty (default "
                         "runs/TASK-ALGO-TIME)")
    tr.add_argument("--overwrite", action="store_true",
                    help="--out may hold a previous run: its files are "
                         "deleted first (other files are never deleted)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the interrupted run saved in --out (the "
                         "same command plus --resume; settings, "
                         "hyper-parameters, sweep, seeds, seed and chunks "
                         "must be the saved run's)")
    tr.add_argument("--config", default=None, metavar="FILE",
                    help="TOML (.toml) or JSON file with task, algo, seeds, "
                         "seed, steps, chunks, out, settings{}, hparams{}, "
                         "sweep{}; command-line flags win")
    tr.add_argument("--chunks", type=int, default=None,
                    help="split the iterations into about this many compiled "
                         "chunks (>= 1); metrics and the progress bar update "
                         "after each, and Ctrl-C stops at the end of one "
                         "(default 20; 1 = one call for the whole run)")
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


def _error(message: str) -> int:
    """One line on stderr for an I/O failure at run time; exit status 1."""
    print(f"artifex-fn: error: {message}", file=sys.stderr)
    return 1


def _resume_command(argv, out: str, out_given: bool) -> str:
    """The command that continues an interrupted run: the same one with
    ``--resume`` (and ``--out`` when it was chosen automatically)."""
    import shlex
    tokens = [a for a in argv  # --overwrite, or an abbreviation of it
              if not (a.startswith("--ov") and "--overwrite".startswith(a))]
    if not out_given:
        tokens += ["--out", out]
    if "--resume" not in tokens:
        tokens.append("--resume")
    return shlex.join(["artifex-fn"] + tokens)


def _train_from_args(args, parser, argv) -> int:
    from artifex_fn.experiments import outputs
    from artifex_fn.experiments import tasks as tasks_lib
    from artifex_fn.experiments.train import check_sweep
    from artifex_fn.experiments.train import check_value
    from artifex_fn.experiments.train import train

    try:
        cfg = _load_config_file(args.config) if args.config else {}
    except ValueError as e:
        parser.error(str(e))
    where = f"--config {args.config}"
    task = args.task or cfg.get("task")
    algo = args.algo or cfg.get("algo")
    if not task or not algo:
        parser.error("train needs --task and --algo (or a --config file "
                     "naming them).\n" + _tasks_help())
    try:
        t = tasks_lib.get_task(task)
        tasks_lib.check_algo(t, algo)
    except ValueError as e:
        parser.error(str(e))
    hparam_names = set(t.hparams(algo))
    # Each value is checked where it was given, so that the error names it.
    overrides = {}
    for section in ("settings", "hparams"):
        for name, value in cfg.get(section, {}).items():
            label = f"{where}: {section}.{name}"
            if name in t.ranges(algo) and (
                    (name in hparam_names) != (section == "hparams")):
                other = "settings" if section == "hparams" else "hparams"
                parser.error(f"{label}: {name!r} is "
                             f"{'not ' * (section == 'hparams')}a "
                             f"hyper-parameter of {task}/{algo}; put it "
                             f"under {other}.")
            try:
                overrides[name] = check_value(t, algo, name, value)
            except ValueError as e:
                parser.error(f"{label}: {e}")
    for text in args.overrides:
        name, value = _parse_assignment(text, "--set", parser)
        try:
            value = _number(value)
        except ValueError:
            parser.error(f"--set {text}: the value must be a number or "
                         f"true/false.")
        try:
            overrides[name] = check_value(t, algo, name, value)
        except ValueError as e:
            parser.error(f"--set {text}: {e}")
    sweep = {}
    for name, values in cfg.get("sweep", {}).items():
        try:
            sweep[name] = check_sweep(t, algo, name, values)
        except ValueError as e:
            parser.error(f"{where}: sweep.{name}: {e}")
    for text in args.sweep:
        name, values = _parse_assignment(text, "--sweep", parser)
        try:
            values = [float(x) for x in values.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--sweep {text}: values must be numbers "
                         f"separated by commas.")
        try:
            sweep[name] = check_sweep(t, algo, name, values)
        except ValueError as e:
            parser.error(f"--sweep {text}: {e}")

    def flag(name: str, minimum: int, default):
        value = getattr(args, name)
        if value is None:
            return cfg.get(name, default)
        if value < minimum:
            parser.error(f"--{name} must be >= {minimum}, got {value}.")
        return value

    seeds = flag("seeds", 1, 1)
    seed = flag("seed", 0, 0)
    steps = flag("steps", 1, None)
    chunks = flag("chunks", 1, 20)
    out = args.out if args.out is not None else cfg.get("out")
    try:
        summary = train(task, algo, seeds=seeds, seed=seed, steps=steps,
                        overrides=overrides, sweep=sweep, out=out,
                        chunks=chunks, progress=not args.no_progress,
                        plot=not args.no_plot, overwrite=args.overwrite,
                        resume=args.resume, sigint="stop-then-kill")
    except ValueError as e:
        parser.error(str(e))
    except outputs.WriteError as e:
        return _error(str(e))
    if summary["interrupted"]:
        print(f"artifex-fn: interrupted after {summary['iterations_done']} "
              f"of {summary['iterations']} iterations, saved in "
              f"{summary['out']}; resume with: "
              f"{_resume_command(argv, summary['out'], out is not None)}",
              file=sys.stderr)
        return 130
    return 0


def _short(valid) -> str:
    return str(valid).replace("an integer", "int").replace(
        "true or false", "bool")


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
            ranges = t.ranges(algo)
            print(f"  --algo {algo}   (--steps sets {t.steps_key[algo]})")
            print("    settings:        " + ", ".join(
                f"{k}={v} ({_short(ranges[k])})"
                for k, v in settings.items()))
            print("    hyper-parameters: " + ", ".join(
                f"{k}={v:g} ({_short(ranges[k])})"
                for k, v in hparams.items()))
    return 0


def _demo_from_args(args, parser) -> int:
    from artifex_fn.experiments import outputs
    from artifex_fn.experiments.demo import demo
    try:
        summaries = demo(out=args.out, quick=args.quick,
                         progress=not args.no_progress,
                         sigint="stop-then-kill")
    except ValueError as e:
        parser.error(str(e))
    except outputs.WriteError as e:
        return _error(str(e))
    if summaries and summaries[-1]["interrupted"]:
        print(f"artifex-fn: demo interrupted; the stopped run is in "
              f"{summaries[-1]['out']}", file=sys.stderr)
        return 130
    return 0


def main(argv=None) -> int:
    """Runs the command line; returns the exit status.

    0: done; 2: a usage or configuration error (one line naming the flag,
    field or path); 1: a file could not be written at run time; 130:
    interrupted (Ctrl-C).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "tasks":
        return _print_tasks()
    try:
        _host_devices(args.devices, parser)
        _compilation_cache()
        if args.command == "train":
            return _train_from_args(args, parser, argv)
        return _demo_from_args(args, parser)
    except KeyboardInterrupt:
        print("artifex-fn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
