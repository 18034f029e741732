"""PPO on CartPole-v1: the library's compiled program against a hand-written one.

Prints environment steps per second (median of ``--repeats`` interleaved
rounds after the compile), compile time, and each program's ratio to the
baseline with the same seeds.

* ``baseline``: ``cartpole_baseline.py``, plain JAX + optax, no library,
  written as PureJaxRL's ``ppo.py`` is (per-step keys,
  ``jax.random.permutation``, returns of finished episodes), seeds
  ``vmap``-ed;
* ``library``: :func:`artifex_fn.experiments.cartpole.ppo_program`, seeds
  ``vmap``-ed;

both as 8 calls of one compiled ``lax.scan`` over 1/8 of the iterations,
the carry kept on the device. The one-device rows run in this process with
JAX's default CPU set-up, as a user's program does (a process split into
several XLA host devices gives each one part of the CPU, which slows a
one-device program down by up to 3x). The multi-device rows
(``--devices auto`` of the CLI: one host device per core, seeds split over
them) and the CLI's chunked runner run in a child process split that way.

Usage: ``python benchmarks/bench_cartpole.py [--quick] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CHILD = "--multi-device" in sys.argv
if CHILD and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
        f"{min(os.cpu_count() or 1, 8)}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cartpole_baseline  # noqa: E402
from _machine import cpu_model  # noqa: E402

from artifex_fn.experiments import cartpole  # noqa: E402
from artifex_fn.experiments import runner  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="100k steps instead of 500k")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--multi-device", action="store_true",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = 100_000 if args.quick else 500_000

    _, base_steps, base_init, base_update = cartpole_baseline.make_train(
        dict(cartpole_baseline.CONFIG, total_timesteps=steps))
    program = cartpole.ppo_program(dict(total_timesteps=steps))
    hp = {k: jnp.float32(v) for k, v in cartpole.HPARAMS["ppo"].items()}
    n_iter = program.num_iterations
    assert n_iter * program.samples_per_iteration == base_steps

    def lib_init(key):
        return program.init(key, hp)

    def lib_update(carry, _):
        carry, metrics = program.step(carry, hp)
        return carry, metrics["episode_return"]

    # Both programs run as 8 calls of one compiled scan over n_iter / 8
    # iterations, as the CLI does; the carry stays on the device between
    # calls, so this is the fully-jitted loop cut into a few calls.
    length = runner._chunk_length(n_iter, 8)

    def driver(init, update, seeds, split):
        def chunk(carry):
            return jax.lax.scan(update, carry, None, length=length)
        sharding = runner._seed_sharding(seeds) if split else None
        if seeds == 1:
            init_j = jax.jit(lambda k: init(k[0]))
            chunk_j = jax.jit(chunk, donate_argnums=0)
        elif sharding is None:
            init_j = jax.jit(jax.vmap(init))
            chunk_j = jax.jit(jax.vmap(chunk), donate_argnums=0)
        else:
            init_j = jax.jit(jax.vmap(init), in_shardings=sharding,
                             out_shardings=sharding)
            chunk_j = jax.jit(jax.vmap(chunk), donate_argnums=0,
                              in_shardings=sharding,
                              out_shardings=(sharding, sharding))

        def run_all(keys):
            carry = init_j(keys)
            outs = []
            for _ in range(n_iter // length):
                carry, out = chunk_j(carry)
                outs.append(out)
            jax.block_until_ready(carry)
            return np.concatenate([np.asarray(o) for o in outs], axis=-1)

        return init_j, chunk_j, run_all, (
            1 if sharding is None else len(sharding.device_set))

    # Compile everything first, then time the programs in interleaved
    # rounds so that load changes on the machine hit all of them alike.
    if not CHILD:
        plan = [(name, init, update, seeds, False)
                for seeds in (1, 4, 8)
                for name, init, update in (
                    ("baseline", base_init, base_update),
                    ("library", lib_init, lib_update))]
    else:
        plan = [(name, init, update, seeds, True)
                for seeds in (4, 8)
                for name, init, update in (
                    ("baseline", base_init, base_update),
                    ("library", lib_init, lib_update))]
    entries = []
    for name, init, update, seeds, split in plan:
        keys = jax.random.split(jax.random.PRNGKey(0), seeds)
        init_j, chunk_j, run_all, devices = driver(init, update, seeds, split)
        t0 = time.perf_counter()
        carry = init_j(keys)
        chunk_j.lower(carry).compile()
        compile_s = time.perf_counter() - t0
        out = run_all(keys)     # warm-up (and the jit cache entry)
        entries.append(dict(name=name, seeds=seeds, devices=devices,
                            run=run_all, keys=keys, compile=compile_s,
                            times=[], out=out))
    for _ in range(args.repeats):
        for e in entries:
            t0 = time.perf_counter()
            e["out"] = e["run"](e["keys"])
            e["times"].append(time.perf_counter() - t0)
    rows = []
    for e in entries:
        final = np.asarray(e["out"]).reshape(e["seeds"], -1)[:, -8:]
        rows.append((e["name"], e["seeds"], e["devices"], e["compile"],
                     float(np.median(e["times"])), np.nanmean(final)))

    # The CLI path: chunked runner with metrics copied back per chunk.
    runner_rows = []
    for seeds in ((1, 8) if CHILD else ()):
        times = []
        for _ in range(max(1, args.repeats - 1)):
            result = runner.run(program, hparams=cartpole.HPARAMS["ppo"],
                                num_seeds=seeds, chunks=20, progress=False)
            times.append(result.run_seconds)
        runner_rows.append((seeds, result.compile_seconds,
                            float(np.median(times)),
                            float(np.mean(result.after["eval_return"]))))

    if not CHILD:
        print(f"\nPPO CartPole-v1, {steps:,} env steps per seed, "
              f"{os.cpu_count()} cores, jax {jax.__version__}, "
              f"{cpu_model()}, median of {args.repeats} interleaved rounds\n")
        print("| program | seeds | devices | compile s | run s | env steps/s "
              "| library / baseline | final train return |")
        print("|---|---|---|---|---|---|---|---|")
    for name, seeds, devices, c, t, ret in rows:
        base = next(r for r in rows if r[0] == "baseline" and r[1] == seeds)
        ratio = (f"{base[4] / t:.2f}x" if name == "library" else "")
        print(f"| {name} | {seeds} | {devices} | {c:.1f} | {t:.2f} | "
              f"{seeds * steps / t:,.0f} | {ratio} | {ret:.0f} |")
    for seeds, c, t, ret in runner_rows:
        devices = runner._seed_sharding(seeds)
        devices = 1 if devices is None else len(devices.device_set)
        print(f"| runner (CLI path, 20 chunks) | {seeds} | {devices} | "
              f"{c:.1f} | {t:.2f} | {seeds * steps / t:,.0f} | | "
              f"eval {ret:.0f} |")
    if not CHILD:
        sys.stdout.flush()
        subprocess.run([sys.executable, os.path.abspath(__file__),
                        "--multi-device", "--repeats", str(args.repeats)]
                       + (["--quick"] if args.quick else []), check=True)


if __name__ == "__main__":
    main()
