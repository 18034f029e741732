"""A tiny language model: pre-training, then GRPO and DPO fine-tuning.

1. Pre-train :class:`~artifex_fn.training.trainers.autoregressive.TinyCausalLM`
   (two causal self-attention blocks) with the ``AutoregressiveTrainer`` on
   random digit strings ``BOS d1 .. dK EOS`` (vocabulary: 0 pad, 1 BOS/EOS,
   2..11 the digits). The pre-trained model samples uniform digits, so a
   completion of ``K = 4`` digits has the target digit sum 26 only rarely
   (282 of the 10**4 strings: 2.8%).
2. GRPO (Shao et al. 2024) on the verifiable reward "the ``K`` completion
   tokens are digits summing to ``TARGET``", 8 completions per prompt,
   with a KL penalty to the frozen pre-trained model. Success is the
   exact-match rate of fresh samples after training.
3. DPO (Rafailov et al. 2023), starting again from the pre-trained model
   (also the frozen reference), on preference pairs: chosen, a string with
   the target sum; rejected, another string (for half of the training
   pairs, the chosen string with one digit changed, which teaches the exact
   sum). All strings are split in two: the held-out pairs use chosen and
   rejected strings never seen in training, and the score is the
   implicit-reward accuracy on them.

Run ``python examples/lm_grpo_dpo.py [--quick] [--seed N] [--plot PATH]``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from artifex_fn.families import autoregressive as ar
from artifex_fn.toy_data import digit_strings
from artifex_fn.toy_data import digit_sum
from artifex_fn.training import DPOConfig
from artifex_fn.training import DPOTrainer
from artifex_fn.training import GenerationConfig
from artifex_fn.training import GRPOConfig
from artifex_fn.training import GRPOTrainer
from artifex_fn.training.trainers.autoregressive import AutoregressiveConfig
from artifex_fn.training.trainers.autoregressive import AutoregressiveTrainer
from artifex_fn.training.trainers.autoregressive import TinyCausalLM

PAD, BOS, EOS = 0, 1, 1
VOCAB = 12
K = 4          # completion length
TARGET = 26    # required digit sum: 282 of the 10**4 strings


@jax.jit
def success(completions):
    """1.0 where all ``K`` tokens are digits summing to ``TARGET``."""
    digits = (completions >= 2) & (completions <= 11)
    return (jnp.all(digits, axis=-1)
            & (digit_sum(completions) == TARGET)).astype(jnp.float32)


def reward_fn(samples, conditions):
    """GRPO's verifiable reward (exact match of the digit sum)."""
    del conditions
    return success(samples)


@jax.jit
def _pretrain_batch(key):
    digits = digit_strings(key, 128, K)
    ends = jnp.full((128, 1), BOS, jnp.int32)
    return dict(tokens=jnp.concatenate([ends, digits, ends], axis=1))


def _sample_success(model, key, n=1024):
    """Success rate of ``n`` fresh completions (temperature 1)."""
    prompts = jnp.full((n, 1), BOS, jnp.int32)
    comp, _ = _generate(nnx.graphdef(model), nnx.as_pure(nnx.state(model)),
                        prompts, key)
    return float(jnp.mean(success(comp))), comp


@functools.partial(jax.jit, static_argnums=0)
def _generate(graphdef, state, prompts, key):
    model = nnx.merge(graphdef, state)
    return ar.generate(lambda m, t: m(t), model, prompts, key,
                       max_new_tokens=K)


def _preference_splits(seed):
    """All ``10**K`` strings, split by target sum and train/held-out.

    Returns ``(good, bad, hard), (good_test, bad_test)``: ``hard`` holds
    training pairs ``(chosen, rejected)`` that differ in one digit (the
    rejected one from the training split), which teach the exact sum.
    """
    rng = np.random.default_rng(seed)
    strings = np.array(list(itertools.product(range(10), repeat=K))) + 2
    is_good = strings.sum(1) - 2 * K == TARGET
    good, bad = rng.permutation(strings[is_good]), rng.permutation(
        strings[~is_good])
    n_good, n_bad = (2 * len(good)) // 3, len(bad) // 2
    good_train, bad_train = good[:n_good], bad[:n_bad]
    bad_set = {tuple(row) for row in bad_train}
    hard = []
    for row in good_train:
        for pos, digit in itertools.product(range(K), range(2, 12)):
            other = row.copy()
            other[pos] = digit
            if tuple(other) in bad_set:
                hard.append((row, other))
    hard = np.array(hard)
    return (good_train, bad_train, hard), (good[n_good:], bad[n_bad:])


def _side(completion):
    completion = jnp.asarray(completion, jnp.int32)
    n = completion.shape[0]
    prompt = jnp.full((n, 1), BOS, jnp.int32)
    return dict(observations=dict(prompt=prompt, completion=completion),
                actions=completion, mask=jnp.ones((n, K), jnp.float32))


def _pairs(good, bad, n, rng, hard=None):
    """``n`` preference pairs; half of them from ``hard`` when given."""
    chosen = good[rng.integers(0, len(good), n)]
    rejected = bad[rng.integers(0, len(bad), n)]
    if hard is not None:
        pick = hard[rng.integers(0, len(hard), n // 2)]
        chosen[:n // 2], rejected[:n // 2] = pick[:, 0], pick[:, 1]
    return dict(chosen=_side(chosen), rejected=_side(rejected))


def run(*, quick: bool = False, seed: int = 0, plot: str | None = None):
    """Pre-trains, fine-tunes with GRPO and DPO; returns the numbers.

    Returns a dict with ``before`` and ``after`` dicts of scalars:
    ``pretrain_nll`` (per-token NLL at the first and last pre-training
    step; the data's entropy is ``K log 10 / (K + 1)``), ``grpo_success``
    (exact-match rate of 1024 fresh samples of the pre-trained and the
    GRPO model), ``dpo_accuracy`` / ``dpo_margin`` (implicit-reward
    accuracy and mean margin on held-out pairs) and ``dpo_success`` (the
    exact-match rate of the DPO model's samples); plus
    ``grpo_distinct_solutions``, the training curves and ``seconds``.
    """
    start = time.time()
    pre_steps, grpo_steps, dpo_steps = ((100, 40, 60) if quick
                                        else (300, 150, 300))
    key = jax.random.key(seed)
    k_model, k_pre, k_eval, k_grpo, k_eval2, k_eval3 = jax.random.split(key, 6)

    # 1. pre-training with the family trainer --------------------------------
    model = nnx.jit(lambda: TinyCausalLM(
        VOCAB, max_len=K + 2, d_model=32, num_heads=2, num_layers=2,
        rngs=nnx.Rngs(k_model)))()
    trainer = AutoregressiveTrainer(
        model, nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param),
        AutoregressiveConfig(pad_token_id=PAD), key=seed)
    pre_curve = []
    for i in range(pre_steps):
        m = trainer.train_step(_pretrain_batch(jax.random.fold_in(k_pre, i)))
        pre_curve.append(m["nll"])
    pre_curve = [float(x) for x in pre_curve]
    base = nnx.clone(model)   # frozen pre-trained copy

    # 2. GRPO on the verifiable reward ---------------------------------------
    success_before, _ = _sample_success(base, k_eval)
    policy = nnx.clone(base)
    grpo = GRPOTrainer(
        policy, nnx.Optimizer(policy, optax.adam(3e-3), wrt=nnx.Param),
        GRPOConfig(num_generations=8, beta=0.01, entropy_coeff=0.0),
        generation=GenerationConfig(max_new_tokens=K, pad_token_id=PAD),
        reference_model=base, key=seed)
    prompts = dict(observations=jnp.full((16, 1), BOS, jnp.int32))
    grpo_curve = []
    for i in range(grpo_steps):
        m = grpo.train_step(prompts, reward_fn, jax.random.fold_in(k_grpo, i))
        grpo_curve.append(m["mean_reward"])
    grpo_curve = [float(x) for x in grpo_curve]
    success_after, samples = _sample_success(policy, k_eval2)
    hits = np.asarray(samples)[np.asarray(success(samples)) > 0]
    distinct = len({tuple(row) for row in hits})

    # 3. DPO on preference pairs, evaluated on held-out strings --------------
    (good, bad, hard), (good_test, bad_test) = _preference_splits(seed)
    rng = np.random.default_rng(seed)
    held_out = _pairs(good_test, bad_test, 512, rng)
    dpo_model = nnx.clone(base)
    dpo = DPOTrainer(
        dpo_model, nnx.Optimizer(dpo_model, optax.adam(3e-3), wrt=nnx.Param),
        DPOConfig(beta=0.1), reference_model=base,
        generation=GenerationConfig(max_new_tokens=K, pad_token_id=PAD),
        key=seed)
    _, before = dpo.compute_loss(dpo_model, held_out)
    dpo_curve = []
    for i in range(dpo_steps):
        dpo.train_step(_pairs(good, bad, 256, rng, hard))
        if (i + 1) % 30 == 0:
            dpo_curve.append(dpo.compute_loss(dpo_model, held_out)[1][
                "reward_accuracy"])
    dpo_curve = [float(x) for x in dpo_curve]
    _, after = dpo.compute_loss(dpo_model, held_out)
    dpo_success, _ = _sample_success(dpo_model, k_eval3)

    results = dict(
        before=dict(pretrain_nll=pre_curve[0], grpo_success=success_before,
                    dpo_accuracy=float(before["reward_accuracy"]),
                    dpo_margin=float(before["reward_margin"]),
                    dpo_success=success_before),
        after=dict(pretrain_nll=pre_curve[-1], grpo_success=success_after,
                   dpo_accuracy=float(after["reward_accuracy"]),
                   dpo_margin=float(after["reward_margin"]),
                   dpo_success=dpo_success),
        grpo_distinct_solutions=distinct, pretrain_curve=pre_curve,
        grpo_curve=grpo_curve, dpo_curve=dpo_curve,
        seconds=time.time() - start)
    if plot:
        _plot(results, plot)
    return results


def _plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(results["pretrain_curve"])
    axes[0].axhline(K * np.log(10) / (K + 1), ls="--", c="k", lw=0.8)
    axes[0].set(title="pre-training NLL / token", xlabel="step")
    axes[1].plot(results["grpo_curve"])
    axes[1].set(title=f"GRPO: P(digit sum = {TARGET})", xlabel="step",
                ylim=(0, 1.02))
    steps = 30 * (1 + np.arange(len(results["dpo_curve"])))
    axes[2].plot(steps, results["dpo_curve"], marker="o")
    axes[2].set(title="DPO: held-out pair accuracy", xlabel="step",
                ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    r = run(quick=args.quick, seed=args.seed, plot=args.plot)
    rows = (("pre-training NLL / token", "pretrain_nll"),
            ("GRPO exact-match success rate", "grpo_success"),
            ("DPO held-out reward accuracy", "dpo_accuracy"),
            ("DPO held-out reward margin", "dpo_margin"),
            ("DPO model exact-match success rate", "dpo_success"))
    print(f"{'metric':<36}{'before':>10}{'after':>10}")
    for name, key in rows:
        print(f"{name:<36}{r['before'][key]:>10.3f}{r['after'][key]:>10.3f}")
    print(f"distinct solutions among GRPO samples: "
          f"{r['grpo_distinct_solutions']}")
    print(f"wall time: {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
