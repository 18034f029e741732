"""A tiny language model fine-tuned with the NNX trainers: GRPO, then DPO.

The task that ``artifex-fn train --task lm`` runs as one compiled program
(:mod:`artifex_fn.experiments.lm`: data, reward, pre-training, preference
pairs), fine-tuned here with the trainer-level API and the task's
hyper-parameters (DPO with 256 pairs a step instead of 128):

1. pre-train a ``TinyCausalLM`` on random digit strings ``BOS d1 .. d4 EOS``
   (``lm.pretrained_model``). It then samples near-uniform digits, so a
   completion sums to 26 only rarely (282 of the 10**4 strings, 2.8%);
2. ``GRPOTrainer`` samples 8 completions of ``BOS`` per group token by token
   (``GenerationConfig``), rewards "the 4 digits sum to 26" and penalises
   the KL to the frozen pre-trained model;
3. ``DPOTrainer``, again from the pre-trained model (also its frozen
   reference), on preference pairs: chosen, a string with the target sum;
   rejected, another string (for half of the pairs the chosen one with one
   digit changed, which teaches the exact sum). The score is the
   implicit-reward accuracy on held-out pairs of strings never trained on.

Run ``python examples/lm_grpo_dpo.py [--quick] [--seed N]``.
"""

from __future__ import annotations

import time

import jax
import optax
from flax import nnx

from artifex_fn.dpo import DPOConfig
from artifex_fn.experiments import lm
from artifex_fn.experiments.demo import example_main
from artifex_fn.grpo import GRPOConfig
from artifex_fn.sampling import GenerationConfig
from artifex_fn.training import DPOTrainer
from artifex_fn.training import GRPOTrainer

TOKENS = GenerationConfig(max_new_tokens=lm.K, pad_token_id=lm.PAD)


def reward_fn(samples, conditions):
    """GRPO's verifiable reward: 1 when the 4 digits sum to 26."""
    del conditions
    return lm.success(samples)


@nnx.jit
def sample_metrics(model, key):
    """Exact-match rate of 1024 fresh completions and distinct solutions."""
    return lm.sample_metrics(lambda m, tokens: m(tokens), model, key, 1024)


@jax.jit
def training_pairs(prefs, key):
    chosen, rejected = lm.training_pairs(prefs, key, 256)
    return dict(chosen=lm.side(chosen), rejected=lm.side(rejected))


def run(*, quick: bool = False, seed: int = 0) -> dict:
    """Pre-trains, fine-tunes with GRPO and with DPO; returns the numbers.

    ``before``/``after`` hold ``pretrain_nll`` (per-token NLL at the first
    and last pre-training step), ``grpo_success`` (exact-match rate of the
    pre-trained and the GRPO model), ``dpo_accuracy``/``dpo_margin``
    (held-out implicit-reward accuracy and margin) and ``dpo_success``;
    plus ``grpo_distinct_solutions``, ``grpo_curve`` and ``seconds``.
    """
    start = time.perf_counter()
    pre_steps, grpo_steps, dpo_steps = ((100, 60, 60) if quick
                                        else (300, 150, 300))
    k_pre, k_grpo, k_dpo, k_eval = jax.random.split(jax.random.key(seed), 4)
    base, nll = lm.pretrained_model(k_pre, pretrain_steps=pre_steps)
    sampled = sample_metrics(base, k_eval)

    policy = nnx.clone(base)
    grpo = GRPOTrainer(
        policy, nnx.Optimizer(policy, optax.adam(3e-3), wrt=nnx.Param),
        GRPOConfig(num_generations=8, beta=0.01, entropy_coeff=0.0),
        generation=TOKENS, reference_model=base, key=seed)
    prompts = dict(observations=lm.prompts(16))
    curve = [grpo.train_step(prompts, reward_fn,
                             jax.random.fold_in(k_grpo, i))["mean_reward"]
             for i in range(grpo_steps)]
    grpo_sampled = sample_metrics(policy, k_eval)

    prefs = lm.preference_data(seed, 512)
    held_out = dict(chosen=lm.side(prefs.held_chosen),
                    rejected=lm.side(prefs.held_rejected))
    model = nnx.clone(base)
    dpo = DPOTrainer(
        model, nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param),
        DPOConfig(beta=0.1), generation=TOKENS, reference_model=base,
        key=seed)
    _, dpo_before = dpo.compute_loss(model, held_out)
    for i in range(dpo_steps):
        dpo.train_step(training_pairs(prefs, jax.random.fold_in(k_dpo, i)))
    _, dpo_after = dpo.compute_loss(model, held_out)

    def numbers(nll, sampled, dpo_metrics, dpo_success):
        return dict(pretrain_nll=float(nll), grpo_success=float(
            sampled["success"]), dpo_success=float(dpo_success),
            dpo_accuracy=float(dpo_metrics["reward_accuracy"]),
            dpo_margin=float(dpo_metrics["reward_margin"]))

    return dict(
        before=numbers(nll[0], sampled, dpo_before, sampled["success"]),
        after=numbers(nll[-1], grpo_sampled, dpo_after,
                      sample_metrics(model, k_eval)["success"]),
        grpo_distinct_solutions=int(grpo_sampled["distinct_solutions"]),
        grpo_curve=[float(r) for r in curve],
        seconds=time.perf_counter() - start)


if __name__ == "__main__":
    example_main(run, __doc__)
