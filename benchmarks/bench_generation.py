"""Benchmark: token generation and the GRPO step of a small language model.

Three samplers at batch 32, prompt 16, temperature 1 over the whole
vocabulary, no row stopping early, on a causal transformer of 2 layers,
width 128, 4 heads, MLP 512, vocabulary 512:

* **cached**: :func:`artifex_fn.sampling.generate` on
  :class:`~artifex_fn.families.autoregressive.TinyCausalLM` (prefill, then a
  ``lax.while_loop`` over a key-value cache that grows in segments to
  prompt + new tokens - 1 slots);
* **recompute**: the same function and model with ``use_cache=False`` (the
  whole buffer rerun at every step: the path models without the decoder
  protocol take);
* **tunix**: ``tunix.generate.sampler.Sampler`` (google-tunix, optional)
  on tunix's Qwen3 at the same shape (its MLP is SwiGLU: 3 matrices instead
  of 2), cache of prompt + new tokens, through its public call (which also
  tokenizes and detokenizes on the host, about 8 ms per call); see
  ``benchmarks/tunix_baseline.py``.

Then the GRPO step (8 prompts x 4 generations, 32 new tokens, beta 0.04, a
reference model, Adam) split into its phases, against tunix's
``GRPOLearner`` phases on the same shapes: **generate** (the sampler),
**reference** (the reference model's log-probs of the completions),
**update** (one gradient step on the collected groups) and **step** (the
whole step: the library's ``GRPOTrainer.train_step(batch, reward_fn, key)``
is one compiled program; tunix's is its learner's ``train`` call). Last,
the forward and forward+backward of both models on ``[32, 48]`` tokens.

All programs run in one process, in interleaved rounds, and the tables give
medians; ratios are library / baseline times (or baseline / library
throughputs) of the same run. Targets: cached at least 5x the recompute
path at 256 new tokens, time per new token at 256 at most 1.5x that at 64,
at least 1.0x tunix's tokens/s, and a GRPO step at most 1.0x tunix's.

Usage::

    python benchmarks/bench_generation.py [--quick] [--repeats N] [--no-tunix]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model  # noqa: E402

from artifex_fn import grpo  # noqa: E402
from artifex_fn import sampling  # noqa: E402
from artifex_fn.families.autoregressive import TinyCausalLM  # noqa: E402
from artifex_fn.training import GRPOTrainer  # noqa: E402

SHAPE = dict(vocab_size=512, num_layers=2, d_model=128, num_heads=4,
             mlp_ratio=4)
BATCH, PROMPT = 32, 16


def library_model(seed=0):
    return TinyCausalLM(SHAPE["vocab_size"], d_model=SHAPE["d_model"],
                        num_heads=SHAPE["num_heads"],
                        num_layers=SHAPE["num_layers"],
                        mlp_ratio=SHAPE["mlp_ratio"], rngs=nnx.Rngs(seed))


def _block(tree):
    return jax.block_until_ready(tree)


def library_sampler(model, new_tokens, *, use_cache, seed=0):
    """A warm ``run() -> tokens generated`` of ``sampling.generate``."""
    graphdef, state = nnx.split(model)
    prompts = jax.random.randint(jax.random.key(seed), (BATCH, PROMPT), 0,
                                 SHAPE["vocab_size"])
    gen = jax.jit(lambda state, key: sampling.generate(
        nnx.merge(graphdef, state), prompts, key, max_new_tokens=new_tokens,
        use_cache=use_cache))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 10_000))
    _block(gen(state, next(keys)))

    def run():
        out = _block(gen(state, next(keys)))
        return int(out.mask.sum())
    return run


def _rounds(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, timed in interleaved rounds."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


# -- GRPO step ---------------------------------------------------------------

def library_grpo(*, num_prompts=8, num_generations=4, new_tokens=32,
                 beta=0.04, seed=0):
    """The library's GRPO step phases on the benchmark shape (warm)."""
    model = library_model(seed)
    reference = copy.deepcopy(model)
    opt = nnx.Optimizer(model, optax.adam(1e-5), wrt=nnx.Param)
    config = grpo.GRPOConfig(num_generations=num_generations, beta=beta)
    gen = sampling.GenerationConfig(max_new_tokens=new_tokens)
    trainer = GRPOTrainer(model, opt, config, reference_model=reference,
                          generation=gen, key=seed)
    prompts = np.asarray(jax.random.randint(
        jax.random.key(seed), (num_prompts, PROMPT), 0,
        SHAPE["vocab_size"]))
    rows = jnp.repeat(prompts, num_generations, axis=0)
    target = SHAPE["vocab_size"] // 2

    def reward(samples, conditions):
        del conditions
        return jnp.sum(samples == target, axis=-1).astype(jnp.float32)

    keys = iter(jax.random.split(jax.random.key(seed + 1), 10_000))
    g_def, _ = nnx.split(model)
    r_def, r_state = nnx.split(reference)

    @jax.jit
    def generate(state, key):
        return sampling.generate(nnx.merge(g_def, state), rows, key,
                                 max_new_tokens=new_tokens)

    @jax.jit
    def reference_log_probs(r_state, completions):
        policy = sampling.token_policy(nnx.merge(r_def, r_state), dict(
            prompt=rows, completion=completions))
        return policy.log_prob(completions)

    out = _block(generate(nnx.state(model), next(keys)))
    ref = _block(reference_log_probs(r_state, out.tokens))
    batch = dict(observations=dict(prompt=rows, completion=out.tokens),
                 actions=out.tokens, log_probs=out.log_probs, mask=out.mask,
                 rewards=reward(out.tokens, rows), ref_log_probs=ref)
    step_batch = dict(observations=prompts)
    _block(trainer.train_step(batch))
    _block(trainer.train_step(step_batch, reward, next(keys)))
    return {
        "generate": lambda: _block(generate(nnx.state(model), next(keys))),
        "reference": lambda: _block(reference_log_probs(r_state,
                                                        out.tokens)),
        "update": lambda: _block(trainer.train_step(batch)),
        "step": lambda: _block(trainer.train_step(step_batch, reward,
                                                  next(keys))),
    }


def library_forward_backward(seq_len=48, seed=0):
    model = library_model(seed)
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(seed), (BATCH, seq_len), 0,
                                SHAPE["vocab_size"])

    def mean_log_prob(params):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    fwd = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens))
    bwd = jax.jit(jax.grad(mean_log_prob))
    _block(fwd(params))
    _block(bwd(params))
    return (lambda: _block(fwd(params)), lambda: _block(bwd(params)))


# -- tables ------------------------------------------------------------------

def sampler_table(tunix, repeats, quick):
    lengths = (64,) if quick else (64, 256)
    model = library_model()
    tmodel = tunix.make_model() if tunix else None
    rows = {}
    for n in lengths:
        fns = {"cached": library_sampler(model, n, use_cache=True)}
        # The recompute path at 256 tokens takes ~30 s a call: fewer rounds.
        fns["recompute"] = library_sampler(model, n, use_cache=False)
        if tunix:
            fns["tunix"] = tunix.make_sampler_run(
                tmodel, batch=BATCH, prompt_len=PROMPT, max_new_tokens=n)
        reps = {name: (max(2, repeats // 3) if name == "recompute"
                       and n > 64 else repeats) for name in fns}
        med = {}
        for name, fn in fns.items():  # interleave all but the slow one
            if reps[name] != repeats:
                med.update(_rounds({name: fn}, reps[name]))
        med.update(_rounds({k: f for k, f in fns.items()
                            if reps[k] == repeats}, repeats))
        rows[n] = med
    print(f"\nSampler: batch {BATCH}, prompt {PROMPT}, temperature 1, "
          f"no early stop (median s per call; tokens/s = batch x new "
          f"tokens / time)")
    head = f"{'new tokens':>10s} {'sampler':>10s} {'ms/call':>9s} " \
           f"{'tokens/s':>9s} {'ms/token':>9s} {'cached speed-up':>16s}"
    print(head)
    print("-" * len(head))
    for n, med in rows.items():
        for name, t in med.items():
            ratio = t / med["cached"]
            print(f"{n:10d} {name:>10s} {t * 1e3:9.1f} {BATCH * n / t:9.0f} "
                  f"{t / n * 1e3:9.3f} {ratio:15.2f}x")
    if len(rows) == 2:
        per = {n: rows[n]["cached"] / n for n in rows}
        print(f"cached: time per new token at 256 / at 64 = "
              f"{per[256] / per[64]:.2f} (target <= 1.5)")
        if tunix:
            per_t = {n: rows[n]["tunix"] / n for n in rows}
            print(f"tunix:  time per new token at 256 / at 64 = "
                  f"{per_t[256] / per_t[64]:.2f}")
    return rows


def grpo_table(tunix, repeats):
    lib = library_grpo()
    fns = {f"library {k}": f for k, f in lib.items()}
    if tunix:
        tmodel = tunix.make_model()
        for k, f in tunix.make_grpo_step(tmodel).items():
            fns[f"tunix {k}"] = f
    fwd, bwd = library_forward_backward()
    fns["library forward"], fns["library forward+backward"] = fwd, bwd
    if tunix:
        tf, tb = tunix.make_forward_backward(tunix.make_model())
        fns["tunix forward"], fns["tunix forward+backward"] = tf, tb
    med = _rounds(fns, repeats)
    print("\nGRPO step: 8 prompts x 4 generations, prompt 16, 32 new tokens, "
          "beta 0.04, reference model, Adam (median ms)")
    head = f"{'phase':>18s} {'library':>9s} {'tunix':>9s} {'ratio':>7s}"
    print(head)
    print("-" * len(head))
    for phase in ("generate", "reference", "update", "step", "forward",
                  "forward+backward"):
        a = med[f"library {phase}"]
        b = med.get(f"tunix {phase}")
        tail = (f"{b * 1e3:9.1f} {a / b:6.2f}x" if b is not None
                else f"{'-':>9s} {'-':>7s}")
        print(f"{phase:>18s} {a * 1e3:9.1f} {tail}")
    for side in ("library", "tunix"):
        if f"{side} forward" in med:
            print(f"{side}: backward / forward = "
                  f"{(med[side + ' forward+backward'] - med[side + ' forward']) / med[side + ' forward']:.1f}")
    return med


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="64 new tokens only, 3 rounds")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-tunix", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    tunix = None
    if not args.no_tunix:
        import tunix_baseline
        if tunix_baseline.AVAILABLE:
            tunix = tunix_baseline
        else:
            print(f"(no tunix column: {tunix_baseline.REASON}; "
                  f"pip install -e '.[bench-tunix]')")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
          f"UTC, {cpu_model()}, {os.cpu_count()} cores, jax "
          f"{jax.__version__}"
          + (f", tunix {tunix.VERSION}" if tunix else ""))
    sampler_table(tunix, repeats, args.quick)
    grpo_table(tunix, repeats)


if __name__ == "__main__":
    main()
