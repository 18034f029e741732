"""Benchmark: one update on 1 vs 8 (forced host) devices; the overhead.

A GRPO step on a token policy (``[B, L, D] @ [D, V]`` logits, B = 256
sequences of L = 64 tokens, V = 512) and a PPO phase (4 epochs x 4
minibatches on 8 x 128 steps) run

* as plain ``jax.jit(update)`` in a process with one CPU device (the
  baseline), and in the 8-device process;
* through :func:`artifex_fn.distributed.data_parallel` on meshes of 1, 2, 4
  and 8 devices, and on a 4 x 2 FSDP mesh;
* with ``num_micro_batches=4`` on one device.

``--xla_force_host_platform_device_count=8`` splits this machine's CPU
into 8 "devices" that share the same cores, so no speed-up is expected:
the table shows what partitioning and the all-reduces cost. Every variant
is timed in interleaved rounds (median of the per-round means) and
compared with the baseline row measured in the same run.

Usage: ``python benchmarks/bench_distributed.py [--rounds R]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

ROUNDS = 7
CALLS = 3


def _problems():
    import distrax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import artifex_fn as afn

    rng = np.random.default_rng(0)
    b, length, d, v = 256, 64, 64, 512

    def token_policy(params, obs):
        return distrax.Categorical(logits=obs @ params["w"])

    grpo_batch = dict(
        observations=jnp.asarray(rng.standard_normal((b, length, d)),
                                 jnp.float32),
        actions=jnp.asarray(rng.integers(0, v, (b, length))),
        rewards=jnp.asarray(rng.random(b), jnp.float32),
        log_probs=jnp.full((b, length), -np.log(v), jnp.float32),
        mask=jnp.asarray(np.arange(length)[None]
                         < rng.integers(1, length + 1, b)[:, None],
                         jnp.float32))
    grpo_config = afn.grpo.GRPOConfig(num_generations=8, policy=token_policy,
                                      optimizer=optax.adam(1e-3))
    grpo_state = afn.grpo.init(
        {"w": jnp.asarray(0.02 * rng.standard_normal((d, v)), jnp.float32)},
        grpo_config)

    n_env, t, hidden = 8, 128, 256

    def actor_critic(params, obs):
        h = jnp.tanh(obs @ params["h"])
        return h @ params["pi"], h @ params["v"]

    ppo_batch = dict(
        observations=jnp.asarray(rng.standard_normal((n_env, t, 16)),
                                 jnp.float32),
        actions=jnp.asarray(rng.integers(0, 4, (n_env, t))),
        rewards=jnp.asarray(rng.standard_normal((n_env, t)), jnp.float32),
        dones=jnp.asarray(rng.random((n_env, t)) < 0.02),
        values=jnp.zeros((n_env, t + 1), jnp.float32),
        log_probs=jnp.full((n_env, t), -np.log(4.0), jnp.float32))
    ppo_config = afn.ppo.PPOConfig(num_epochs=4, num_minibatches=4,
                                   policy=actor_critic,
                                   optimizer=optax.adam(3e-4))
    ppo_params = {
        "h": jnp.asarray(0.1 * rng.standard_normal((16, hidden)), jnp.float32),
        "pi": jnp.asarray(0.1 * rng.standard_normal((hidden, 4)), jnp.float32),
        "v": jnp.asarray(0.1 * rng.standard_normal(hidden), jnp.float32)}
    ppo_state = afn.ppo.init(ppo_params, ppo_config, key=jax.random.key(0))
    return {"grpo": (afn.grpo.update, grpo_state, grpo_batch),
            "ppo": (afn.ppo.update, ppo_state, ppo_batch)}


def _time(fn, state, batch):
    import jax
    t0 = time.perf_counter()
    for _ in range(CALLS):
        out = fn(state, batch)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / CALLS


def _measure(variants, rounds):
    """Compile time and per-round step times of every variant."""
    import jax
    compile_s, samples = {}, {name: [] for name in variants}
    for name, (fn, state, batch) in variants.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(state, batch))
        compile_s[name] = time.perf_counter() - t0
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].append(_time(*variants[name]))
    return {n: dict(compile_s=compile_s[n], step_s=samples[n])
            for n in names}


def child(rounds):
    import jax

    import artifex_fn as afn

    variants = {}
    for algo, (update, state, batch) in _problems().items():
        variants[(algo, "jit")] = (jax.jit(update), state, batch)
        if len(jax.devices()) == 8:
            for n in (1, 2, 4, 8):
                mesh = afn.distributed.make_mesh(data=n)
                step = afn.distributed.data_parallel(update, mesh)
                placed = afn.distributed.place_state(state, mesh)
                variants[(algo, f"mesh {n}")] = (step, placed, batch)
            mesh = afn.distributed.make_mesh(data=4, fsdp=2)
            step = afn.distributed.data_parallel(update, mesh, fsdp=True)
            variants[(algo, "fsdp 4x2")] = (
                step, afn.distributed.place_state(state, mesh, fsdp=True),
                batch)
        else:
            micro = state.replace(config=dataclasses.replace(
                state.config, num_micro_batches=4))
            variants[(algo, "micro 4")] = (jax.jit(update), micro, batch)
    out = _measure(variants, rounds)
    print(json.dumps({f"{a}|{v}": r for (a, v), r in out.items()}))


def _run_child(devices, rounds):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if "force_host_platform_device_count" not in f]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    proc = subprocess.run([sys.executable, __file__, "--child",
                           "--rounds", str(rounds)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--child", action="store_true",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.rounds)
        return
    import statistics
    one = _run_child(1, args.rounds)
    eight = _run_child(8, args.rounds)
    rows = [("1 device", k, v) for k, v in one.items()]
    rows += [("8 forced", k, v) for k, v in eight.items()]
    print(f"\nOne update, median of {args.rounds} rounds x {CALLS} calls; "
          f"{os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| update | process | placement | compile s | step ms | "
          "vs plain jit, 1-device process |")
    print("|---|---|---|---|---|---|")
    for algo in ("grpo", "ppo"):
        base = statistics.median(one[f"{algo}|jit"]["step_s"])
        for process, key, r in rows:
            a, variant = key.split("|")
            if a != algo:
                continue
            med = statistics.median(r["step_s"])
            print(f"| {algo} | {process} | {variant} | {r['compile_s']:.2f} "
                  f"| {1e3 * med:.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
