"""RLHF on the arith text task: a reward model, then PPO against it.

The classic preference pipeline (Ziegler et al. 2019, Ouyang et al. 2022)
on the text task of ``artifex-fn train --task arith``
(:mod:`artifex_fn.experiments.arith`: "What is seven plus two?" answered
"= 9", a small causal LM pre-trained to answer right about a fifth of the
time), with the NNX trainers:

1. **Reward model.** A :class:`~artifex_fn.reward_model.SequenceRewardModel`
   (a scalar head at the last token of the frozen pre-trained model, on
   its features and its log-likelihood of the text:
   :func:`~artifex_fn.reward_model.likelihood_features`) learns, with
   :class:`~artifex_fn.training.RewardModelTrainer`, from preference pairs
   of the training questions: the right answer against a random wrong one.
   Score: pair accuracy on the held-out questions (20%, never trained on).
   Fine-tuning the whole trunk on the hidden state alone instead reached
   only about 0.78 there: the small model memorises the 160 training
   questions instead of reading what it knows about the others.
2. **RLHF-PPO.** :class:`~artifex_fn.training.PPOTrainer` on an
   :class:`~artifex_fn.families.autoregressive.ActorCriticLM` (the
   pre-trained model with a value head on its trunk) samples one answer per
   question, scores it with the reward model alone (the true answer is
   never shown to PPO), and trains with a per-token KL penalty to the frozen
   pre-trained model (the reference), its coefficient adapted towards 2
   nats per answer (Ziegler et al.'s controller: with a fixed coefficient
   the policy found, after about 200 steps, answers the reward model
   over-rates, and its KL ran to 65 nats). Score: the true exact-answer
   success of sampled answers (four per question), read from the decoded
   text, on every question; and the mean KL to the reference per answer.

Run ``python examples/arith_rlhf.py [--quick] [--seed N] [--plot out.png]``;
the figure shows the reward model's score, the true success and the KL to
the reference per PPO step.
"""

from __future__ import annotations

import copy
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from artifex_fn import reward_model as rm
from artifex_fn import text
from artifex_fn.experiments import arith
from artifex_fn.experiments.demo import example_main
from artifex_fn.families.autoregressive import ActorCriticLM
from artifex_fn.ppo import PPOConfig
from artifex_fn.sampling import GenerationConfig
from artifex_fn.sampling import generate
from artifex_fn.training import PPOTrainer
from artifex_fn.training import RewardModelTrainer

FULL = dict(model=arith.MODEL_SETTINGS, rm_steps=600, rm_pairs=64,
            rm_lr=1e-2, ppo_steps=400, prompts=128, lr=5e-4, beta=0.1,
            kl_target=2.0)
QUICK = dict(model=dict(arith.MODEL_SETTINGS, **arith.SMALL_MODEL),
             rm_steps=200, rm_pairs=32, rm_lr=1e-2, ppo_steps=30,
             prompts=128, lr=1e-3, beta=0.1, kl_target=2.0)


def pairs(d, questions, rng, n):
    """Reward-model pairs: (question, right answer) against (question,
    wrong answer), as ``{"chosen", "rejected"}`` token/mask dicts."""
    q = rng.choice(questions, n)
    right = d.correct[q]
    wrong = (right + rng.integers(1, len(arith.VALUES), n)) % len(
        arith.VALUES)

    def side(a):
        return {"tokens": jnp.asarray(np.concatenate(
                    [d.prompts[q], d.answers[a]], axis=1)),
                "mask": jnp.asarray(np.concatenate(
                    [d.prompt_mask[q], d.answer_mask[a]], axis=1)),
                "response_mask": jnp.asarray(np.concatenate(
                    [np.zeros_like(d.prompt_mask[q]), d.answer_mask[a]],
                    axis=1))}

    return {"chosen": side(right), "rejected": side(wrong)}


def success(lm, key, d, repeats=4):
    """True exact-answer success and format rate of ``repeats`` sampled
    answers per question (read from the decoded text)."""
    prompts = jnp.asarray(np.tile(d.prompts, (repeats, 1)))
    prompt_mask = jnp.asarray(np.tile(d.prompt_mask, (repeats, 1)))

    @nnx.jit
    def run(lm, key):
        out = generate(lm, prompts, key, prompt_mask=prompt_mask,
                       max_new_tokens=d.max_new_tokens,
                       stop_token_ids=arith.stop_ids(d.tok),
                       pad_token_id=d.tok.pad_token_id)
        return jnp.mean(arith.text_scores(out.tokens, prompts), axis=0)
    s = run(lm, key)
    return float(s[0]), float(s[1])


def run(quick: bool = False, seed: int = 0, plot: str | None = None) -> dict:
    cfg = QUICK if quick else FULL
    d = arith.data()
    tok = d.tok
    base = arith.pretrained_model(**cfg["model"])
    width = base.head.in_features
    train_q, held_q = arith.split_questions(0)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()

    # 1. The reward model: a scalar head on the frozen pre-trained model's
    # last-token features and its log-likelihood of the text.
    reward = rm.SequenceRewardModel(
        copy.deepcopy(base), width + 1, pad_token_id=tok.pad_token_id,
        stop_token_ids=arith.stop_ids(tok),
        features=rm.likelihood_features, rngs=nnx.Rngs(seed))
    head_only = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("trunk")))
    rm_trainer = RewardModelTrainer(
        reward, nnx.Optimizer(reward, optax.adam(cfg["rm_lr"]),
                              wrt=head_only))
    held = pairs(d, held_q, np.random.default_rng(1), 256)
    _, before_rm = rm_trainer.compute_loss(reward, held)
    for _ in range(cfg["rm_steps"]):
        rm_trainer.train_step(pairs(d, train_q, rng, cfg["rm_pairs"]))
    _, after_rm = rm_trainer.compute_loss(reward, held)
    rm_seconds = time.perf_counter() - t0

    # 2. RLHF-PPO against it.
    policy = ActorCriticLM(copy.deepcopy(base), rngs=nnx.Rngs(seed + 1))
    ppo_config = PPOConfig(beta=cfg["beta"], kl_target=cfg["kl_target"],
                           kl_horizon=200.0, gamma=1.0, gae_lambda=0.95,
                           vf_coeff=0.1, entropy_coeff=0.0, num_epochs=2,
                           max_grad_norm=1.0)
    # The learning rate decays linearly to zero over the run.
    trainer = PPOTrainer(
        policy, nnx.Optimizer(policy, optax.adam(optax.linear_schedule(
            cfg["lr"], 0.0, cfg["ppo_steps"] * ppo_config.num_epochs
            * ppo_config.num_minibatches)), wrt=nnx.Param),
        ppo_config,
        reference_model=base,
        generation=GenerationConfig(max_new_tokens=d.max_new_tokens,
                                    stop_token_ids=arith.stop_ids(tok),
                                    pad_token_id=tok.pad_token_id),
        key=seed)
    key = jax.random.key(seed)
    before = success(policy.lm, jax.random.fold_in(key, 1), d)
    curve = dict(score=[], kl=[], success=[])
    t1 = time.perf_counter()
    for i in range(cfg["ppo_steps"]):
        rows = rng.integers(0, len(arith.QUESTIONS), cfg["prompts"])
        m = trainer.train_step(
            {"observations": d.prompts[rows],
             "prompt_mask": d.prompt_mask[rows]}, reward,
            key=jax.random.fold_in(key, 100 + i))
        curve["score"].append(float(m["score"]))
        curve["kl"].append(float(m["kl"]))
        exact = arith.score_text(
            text.decode_completions(tok, trainer.last_rollout["samples"]),
            text.decode_prompts(tok, trainer.last_rollout["conditions"]))[
                :, 0]
        curve["success"].append(float(np.mean(exact)))
    ppo_seconds = time.perf_counter() - t1
    after = success(policy.lm, jax.random.fold_in(key, 2), d)
    if plot is not None:
        _plot(plot, curve, before[0], after[0], float(after_rm["accuracy"]))
    return dict(
        before=dict(rm_accuracy=float(before_rm["accuracy"]),
                    success=before[0], format=before[1]),
        after=dict(rm_accuracy=float(after_rm["accuracy"]),
                   success=after[0], format=after[1]),
        final_kl=float(np.mean(curve["kl"][-10:])),
        max_kl=float(np.max(curve["kl"])), curve=curve,
        rm_seconds=rm_seconds, ppo_seconds=ppo_seconds)


def _plot(path, curve, before, after, rm_accuracy):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from artifex_fn.experiments.outputs import made_on

    def smooth(x, w=10):
        x = np.asarray(x, float)
        return np.convolve(x, np.ones(w) / w, mode="valid") if len(x) > w \
            else x

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(smooth(curve["score"]))
    axes[0].set_title(f"reward-model score (RM held-out acc. "
                      f"{rm_accuracy:.3f})")
    axes[1].plot(smooth(curve["success"]))
    axes[1].axhline(before, ls=":", c="gray", label=f"before {before:.3f}")
    axes[1].axhline(after, ls="--", c="k", label=f"after {after:.3f}")
    axes[1].set_title("true exact-answer success of the samples")
    axes[1].legend(loc="lower right")
    axes[2].plot(smooth(curve["kl"]))
    axes[2].set_title("KL to the reference (nats per answer)")
    for ax in axes:
        ax.set_xlabel("PPO step (10-step mean)")
    fig.text(0.995, 0.005, made_on(), fontsize=6, ha="right", va="bottom",
             color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    example_main(run, __doc__)
