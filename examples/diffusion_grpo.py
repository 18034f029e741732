"""A 2-D diffusion model steered into a reward region by the NNX GRPO trainer (DDPO).

The ``grpo`` algorithm of ``artifex-fn train --task diffusion`` (its module
:mod:`artifex_fn.experiments.diffusion` has the maths) run with the
trainer-level API and the task's defaults:

1. pre-train a DDPM (an MLP with a timestep embedding, ``T = 20`` cosine
   steps) on the 8-mode ring (``diffusion_task.pretrained_model``);
2. fine-tune it with ``GRPOTrainer`` in the DDPO formulation (Black et al.
   2023): the denoising chain is an MDP whose policy at step ``t`` is the
   Gaussian reverse step ``p_theta(x_{t-1} | x_t)`` (``apply_fn=ddpo_policy``).
   A chain is one "sequence" of ``T`` actions rewarded by its final
   sample: 1 inside the wedge of angles ``[22.5, 112.5]`` degrees, which
   holds 2 of the 8 modes (a base rate of about 25%), else 0. Chains come
   in groups of 8 sharing their starting noise ``x_T``, so the
   group-normalised advantage compares denoising paths from one start. The
   frozen pre-trained model is the KL reference (``beta = 0.01``).

The KL reported is the exact sum over steps of ``KL(p_theta(.|x_t) ||
p_ref(.|x_t))`` along fine-tuned chains, in nats per chain.

Run ``python examples/diffusion_grpo.py [--quick] [--seed N] [--plot
out.png]``.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
import optax
from flax import nnx

from artifex_fn.experiments import diffusion as diffusion_task
from artifex_fn.experiments.demo import example_main
from artifex_fn.families import diffusion
from artifex_fn.grpo import GRPOConfig
from artifex_fn.training import GRPOTrainer

NUM_GROUPS, GROUP_SIZE, INNER_UPDATES = 32, 8, 2


def _eps(model, x_t, t):
    return model(x_t, t)


@nnx.jit
def rollout(model, key):
    """``NUM_GROUPS`` groups of chains as a GRPO batch with its rewards."""
    _, trajectory, log_probs = diffusion_task.grouped_chains(
        _eps, model, key, NUM_GROUPS, GROUP_SIZE)
    return diffusion.ddpo_batch(trajectory, log_probs,
                                diffusion_task.in_region(trajectory[-1]))


@nnx.jit
def evaluate(model, reference, key):
    """The task's metrics of 2048 chains, and their final samples."""
    x0, _, _ = diffusion_task.grouped_chains(_eps, model, key, 2048, 1)
    return diffusion_task.evaluate_chains(_eps, model, reference, key,
                                          2048), x0


def run(*, quick: bool = False, seed: int = 0, plot: str | None = None
        ) -> dict:
    """Pre-trains, fine-tunes with GRPO and returns before/after numbers.

    ``before``/``after`` hold ``in_region`` (fraction of 2048 samples in
    the wedge), ``high_quality``, ``modes_covered``, ``mode_entropy`` and
    ``kl_to_pretrained``; plus ``reward_history`` (mean reward of each
    rollout) and ``seconds``.
    """
    start = time.perf_counter()
    pre_steps, pre_lr, iterations = (400, 1e-2, 12) if quick else (
        800, 5e-3, 30)
    k_pre, k_rl, k_eval = jax.random.split(jax.random.key(seed), 3)
    reference, _ = diffusion_task.pretrained_model(
        k_pre, pretrain_lr=pre_lr, pretrain_steps=pre_steps)
    policy = nnx.clone(reference)
    before, x_before = evaluate(policy, reference, k_eval)

    grpo = GRPOTrainer(
        policy, nnx.Optimizer(policy, optax.adam(3e-4), wrt=nnx.Param),
        GRPOConfig(num_generations=GROUP_SIZE, beta=0.01, clip_param=0.2,
                   entropy_coeff=0.0),
        reference_model=reference, key=seed,
        apply_fn=diffusion.ddpo_policy(_eps, diffusion_task.schedule()))
    history = []
    for i in range(iterations):
        batch = rollout(policy, jax.random.fold_in(k_rl, i))
        for _ in range(INNER_UPDATES):
            metrics = grpo.train_step(batch)
        history.append(metrics["mean_reward"])
    after, x_after = evaluate(policy, reference, k_eval)
    if plot:
        _plot(plot, np.asarray(x_before), np.asarray(x_after))
    return dict(before={k: float(v) for k, v in before.items()},
                after={k: float(v) for k, v in after.items()},
                reward_history=[float(r) for r in history],
                seconds=time.perf_counter() - start)


def _plot(path, before, after):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharex=True, sharey=True)
    for ax, pts, title in ((axes[0], before, "pre-trained"),
                           (axes[1], after, "after GRPO (DDPO)")):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        for angle in diffusion_task.WEDGE:
            ax.plot([0, 3 * math.cos(angle)], [0, 3 * math.sin(angle)],
                    "r--", lw=1)
        ax.set(title=title, aspect="equal", xlim=(-3, 3), ylim=(-3, 3))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    example_main(run, __doc__)
