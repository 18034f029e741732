"""PPO on CartPole-v1: the library's compiled program against a hand-written one.

Prints environment steps per second (median of ``--repeats`` runs after the
compile), compile time, and the wall time of S seeds relative to one seed.

* ``baseline``: ``cartpole_baseline.py``, plain JAX + optax, no library;
* ``library``: :func:`artifex_fn.experiments.cartpole.ppo_program`, the
  whole run one ``jit`` (``vmap`` over seeds when S > 1);
* ``runner``: :func:`artifex_fn.experiments.run` as the CLI calls it (20
  compiled chunks, metrics to the host after each, progress bar off).

Usage: ``python benchmarks/bench_cartpole.py [--quick] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cartpole_baseline  # noqa: E402

from artifex_fn.experiments import cartpole  # noqa: E402
from artifex_fn.experiments import runner  # noqa: E402


def _time(fn, args, repeats):
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times)), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="100k steps instead of 500k")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    steps = 100_000 if args.quick else 500_000

    train_base, base_steps = cartpole_baseline.make_train(
        dict(cartpole_baseline.CONFIG, total_timesteps=steps))
    program = cartpole.ppo_program(dict(total_timesteps=steps))
    hp = {k: jnp.float32(v) for k, v in cartpole.PPO_HPARAMS.items()}
    lib_steps = program.num_iterations * program.samples_per_iteration
    assert lib_steps == base_steps

    def lib_run(key):
        carry = program.init(key, hp)
        carry, metrics = jax.lax.scan(lambda c, _: program.step(c, hp), carry,
                                      None, length=program.num_iterations)
        return program.params(carry), metrics["episode_return"]

    def base_run(key):
        return train_base(key)

    rows = []
    for name, fn in (("baseline", base_run), ("library", lib_run)):
        for seeds in (1, 4, 8):
            keys = jax.random.split(jax.random.PRNGKey(0), seeds)
            if seeds == 1:
                jitted = jax.jit(lambda k, fn=fn: fn(k[0]))
            else:
                jitted = jax.jit(jax.vmap(fn))
            c, t, out = _time(jitted, (keys,), args.repeats)
            final = np.asarray(out[1]).reshape(seeds, -1)[:, -8:]
            rows.append((name, seeds, c, t, np.nanmean(final)))

    # The CLI path: chunked runner with metrics copied back per chunk.
    runner_rows = []
    for seeds in (1, 8):
        times = []
        for _ in range(max(1, args.repeats - 1)):
            result = runner.run(program, hparams=cartpole.PPO_HPARAMS,
                                num_seeds=seeds, chunks=20, progress=False)
            times.append(result.run_seconds)
        runner_rows.append((seeds, result.compile_seconds,
                            float(np.median(times)),
                            float(np.mean(result.after["eval_return"]))))

    base1 = next(r for r in rows if r[0] == "baseline" and r[1] == 1)[4]
    lib1 = next(r for r in rows if r[0] == "library" and r[1] == 1)[4]
    print(f"\nPPO CartPole-v1, {steps:,} env steps per seed, "
          f"{os.cpu_count()} cores, {jax.default_backend()}, median of "
          f"{args.repeats}\n")
    print("| program | seeds | compile s | run s | env steps/s "
          "| vs baseline 1 seed | wall vs same program 1 seed | "
          "final train return |")
    print("|---|---|---|---|---|---|---|---|")
    for name, seeds, c, t, ret in rows:
        one = base1 if name == "baseline" else lib1
        sps = seeds * steps / t
        print(f"| {name} | {seeds} | {c:.1f} | {t:.2f} | "
              f"{sps:,.0f} | {sps / (steps / base1):.2f}x | "
              f"{t / one:.2f}x | {ret:.0f} |")
    for seeds, c, t, ret in runner_rows:
        sps = seeds * steps / t
        print(f"| runner (CLI path, 20 chunks) | {seeds} | "
              f"{c:.1f} | {t:.2f} | {sps:,.0f} | {sps / (steps / base1):.2f}x"
              f" | {t / runner_rows[0][2]:.2f}x | eval {ret:.0f} |")


if __name__ == "__main__":
    main()
