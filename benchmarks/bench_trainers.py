"""Benchmark: cost of the NNX trainer shell over the pure jitted update.

A trainer step reads the model's arrays out of the ``nnx.Module`` and
``nnx.Optimizer``, calls the compiled algorithm update, and writes the
results back. This script measures what that shell adds, per algorithm and
model size, against ``jax.jit(algorithm.update)`` called on a pure
``TrainState`` with the same model (``nnx.merge`` inside the policy), the
same optimiser and the same batch.

Both sides are timed end to end including ``block_until_ready`` on the
metrics and the new parameters, in interleaved rounds (trainer, pure,
trainer, ...) so background load hits them alike; the table gives the
median step time of each and the ratio trainer / pure. A ratio near 1.0
means the shell is free; the absolute difference is the per-step Python
overhead of reading and writing the variables (it does not grow with the
batch, only with the number of variables).

The last rows time GRPO's generation step (sample ``G`` outputs per
prompt, score them, update; one compiled call) for a one-step Gaussian
policy and a token model, against the trainer step on the same rollout
batch collected beforehand.

Usage::

    python benchmarks/bench_trainers.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message="jax.core.pytype_aval_mappings is deprecated",
        category=DeprecationWarning)
    import distrax

import artifex_fn as afn
from artifex_fn import sampling
from artifex_fn import training


class MLP(nnx.Module):
    def __init__(self, n_in, width, depth, n_out, rngs, value_head=False):
        sizes = [n_in] + [width] * depth
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:])])
        self.head = nnx.Linear(sizes[-1], n_out, rngs=rngs)
        self.value = (nnx.Linear(sizes[-1], 1, rngs=rngs) if value_head
                      else None)

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.gelu(layer(x))
        if self.value is not None:
            return self.head(x), self.value(x)[..., 0]
        return self.head(x)


class Gaussian(nnx.Module):
    def __init__(self, rngs, width):
        self.net = MLP(2, width, 2, 2, rngs)
        self.log_std = nnx.Param(jnp.zeros(2))

    def __call__(self, c):
        return distrax.MultivariateNormalDiag(self.net(c),
                                              jnp.exp(self.log_std[...]))


class TokenModel(nnx.Module):
    def __init__(self, rngs, vocab, width):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.net = MLP(width, width, 2, vocab, rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        h = jnp.cumsum(h, axis=1) / jnp.arange(1, tokens.shape[1] + 1)[:, None]
        return self.net(h)


N_OBS, N_ACT = 16, 8


def _batch(algo, b, t, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    shape = (b, t) if algo == "ppo" else (b,)
    d = dict(observations=jax.random.normal(k[0], shape + (N_OBS,)),
             actions=jax.random.randint(k[1], shape, 0, N_ACT),
             rewards=jax.random.normal(k[2], shape),
             log_probs=jnp.full(shape, -float(np.log(N_ACT))))
    if algo == "reinforce":
        del d["log_probs"]
    if algo == "ppo":
        d.update(values=jnp.zeros(shape), dones=jnp.zeros(shape))
    if algo == "dpo":
        side = lambda a: dict(observations=d["observations"], actions=a)
        return dict(chosen=side(d["actions"]),
                    rejected=side((d["actions"] + 1) % N_ACT))
    return d


ALGOS = {
    "reinforce": (training.REINFORCETrainer, afn.reinforce,
                  afn.reinforce.REINFORCEConfig()),
    "ppo": (training.PPOTrainer, afn.ppo,
            afn.ppo.PPOConfig(num_epochs=2, num_minibatches=2)),
    "grpo": (training.GRPOTrainer, afn.grpo, afn.grpo.GRPOConfig()),
    "dpo": (training.DPOTrainer, afn.dpo,
            afn.dpo.DPOConfig(reference_free=True)),
}


def _time(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def _interleaved(fns, rounds, per_round=5):
    times = {name: [] for name in fns}
    for r in range(rounds):
        names = list(fns)
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            times[name] += _time(fns[name], per_round)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_algorithm(algo, width, depth, b, t, rounds):
    trainer_cls, module, config = ALGOS[algo]
    tx = optax.adam(1e-4)
    make = lambda: MLP(N_OBS, width, depth, N_ACT, nnx.Rngs(0),
                       value_head=(algo == "ppo"))
    model = make()
    trainer = trainer_cls(model, nnx.Optimizer(model, tx, wrt=nnx.Param),
                          config)
    pure_model = make()
    graphdef, params = nnx.split(pure_model, nnx.Param)
    policy = lambda p, o: nnx.merge(graphdef, p)(o)
    state = module.init(nnx.as_pure(params), dataclasses.replace(
        config, policy=policy, optimizer=tx))
    update = jax.jit(module.update)
    batch = _batch(algo, b, t)
    box = {"state": state}

    def pure_step():
        box["state"], metrics = update(box["state"], batch)
        return metrics, box["state"].params

    def trainer_step():
        metrics = trainer.train_step(batch)
        return metrics, trainer._params.read()

    for fn in (pure_step, trainer_step):
        jax.block_until_ready(fn())
    med = _interleaved({"trainer": trainer_step, "pure": pure_step}, rounds)
    n_vars = len(trainer._params) + len(trainer._opt_state)
    return med["trainer"], med["pure"], n_vars


def bench_generation(kind, width, rounds):
    tx = optax.adam(1e-4)
    if kind == "one-step":
        model = Gaussian(nnx.Rngs(0), width)
        gen = sampling.GenerationConfig()
        prompts = jax.random.normal(jax.random.key(0), (16, 2))
        reward = lambda s, c: -jnp.sum((s - c) ** 2, axis=-1)
    else:
        model = TokenModel(nnx.Rngs(0), 32, width)
        gen = sampling.GenerationConfig(max_new_tokens=16, eos_token_id=1)
        prompts = jax.random.randint(jax.random.key(0), (16, 8), 2, 32)
        reward = lambda s, c: jnp.mean((s == 5).astype(jnp.float32), axis=1)
    trainer = training.GRPOTrainer(
        model, nnx.Optimizer(model, tx, wrt=nnx.Param),
        afn.grpo.GRPOConfig(num_generations=4), generation=gen)
    batch = dict(observations=prompts)
    trainer.train_step(batch, reward, jax.random.key(0))
    roll = trainer.last_rollout
    rollout_batch = dict(
        observations=(dict(prompt=jnp.repeat(prompts, 4, axis=0),
                           completion=roll["samples"])
                      if gen.autoregressive else jnp.repeat(prompts, 4, 0)),
        actions=roll["samples"], rewards=roll["rewards"],
        log_probs=jnp.zeros(roll["mask"].shape if roll["mask"] is not None
                            else roll["rewards"].shape))
    if roll["mask"] is not None:
        rollout_batch["mask"] = roll["mask"]
    trainer.train_step(rollout_batch)
    keys = iter(jax.random.split(jax.random.key(1), 100000))
    med = _interleaved({
        "generate": lambda: trainer.train_step(batch, reward, next(keys)),
        "update": lambda: trainer.train_step(rollout_batch)}, rounds)
    return med["generate"], med["update"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds of 5 calls each")
    args = parser.parse_args()
    rounds = args.repeats or (3 if args.quick else 8)
    sizes = [("small", 64, 2, 64, 8)]
    if not args.quick:
        sizes.append(("medium", 512, 4, 256, 16))
    print(f"backend: {jax.default_backend()}  devices: {jax.devices()}")
    print(f"{'algorithm':10s} {'model':7s} {'vars':>5s} {'trainer ms':>11s} "
          f"{'pure ms':>9s} {'ratio':>6s} {'overhead us':>12s}")
    for algo in ALGOS:
        for name, width, depth, b, t in sizes:
            tr, pu, n_vars = bench_algorithm(algo, width, depth, b, t, rounds)
            print(f"{algo:10s} {name:7s} {n_vars:5d} {tr * 1e3:11.3f} "
                  f"{pu * 1e3:9.3f} {tr / pu:6.2f} {(tr - pu) * 1e6:12.0f}")
    print()
    print(f"{'GRPO generation':16s} {'generate+update ms':>19s} "
          f"{'update only ms':>15s} {'ratio':>6s}")
    for kind in ("one-step", "tokens"):
        g, u = bench_generation(kind, 64, rounds)
        print(f"{kind:16s} {g * 1e3:19.3f} {u * 1e3:15.3f} {g / u:6.2f}")


if __name__ == "__main__":
    main()
