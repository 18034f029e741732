"""GRPO (DDPO) and online Diffusion-DPO steer a 2-D DDPM into a reward wedge.

**Pre-training** (inside ``init``). A DDPM (Ho et al. 2020) with ``T = 20``
steps learns the 8-mode ring :func:`artifex_fn.toy_data.gaussian_mixture_2d`
(modes at angles ``k * 45`` degrees, radius 2, std 0.1). The noise predictor
``eps_theta(x_t, t)`` is a small MLP with a learned timestep embedding,
trained by ``lax.scan`` over :func:`artifex_fn.families.diffusion.update`
(loss ``E ||eps - eps_theta(x_t, t)||^2``, Adam with a cosine-decayed step
size, an EMA of the weights). The schedule is Nichol & Dhariwal's cosine
with betas clipped at ``max_beta = 0.5`` instead of 0.999: with 20 steps the
last beta would otherwise be ~1 and the first reverse step would scale the
predicted noise by ``1 / sqrt(1 - beta_T) ~ 32``, so that tiny weight changes
move it by many standard deviations. The EMA weights become both the
policy's starting point and the frozen reference ``ref_params``. The
default 800 steps of 512 points (peak step size 5e-3) cover all 8 modes
with ~90% of samples within 3 std of a mode.

**The chain as a policy** (DDPO, Black et al. 2023). Reverse sampling from
``x_T ~ N(0, I)`` is an MDP of ``T`` steps: at step ``k`` (timestep
``t = T-1-k``) the observation is ``(x_t, t)`` and the action
``x_{t-1} ~ p_theta(. | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)``. A chain
``tau = (x_T, ..., x_0)`` has the exact log-density

.. math::
    \\log p_\\theta(\\tau) = \\log N(x_T; 0, I) + \\sum_{t} \\log
      p_\\theta(x_{t-1} | x_t),

(``sample_chain`` returns the ``[T, B]`` step terms). The reward is
``r(x_0) = 1`` when the final sample's angle lies in the wedge
``[22.5, 112.5]`` degrees, which holds the modes at 45 and 90 degrees (2 of
8, a base rate of ~0.25), else ``0``.

**algo "grpo"** (Shao et al. 2024 on DDPO chains). Each iteration draws
``num_groups`` starting noises, repeats each ``group_size`` times, samples
the chains with the current weights and turns them into a batch of
``[B, T]`` actions (:func:`diffusion.ddpo_batch`). The group-normalised
advantage ``A_i = (r_i - mean_g r) / std_g r`` is shared by every step of
chain ``i``; :func:`artifex_fn.grpo.update` then minimises the clipped
surrogate plus ``beta`` times the k3 estimate of ``KL(pi || pi_ref)`` per
step, ``inner_updates`` times on the same rollout (the ratio to the
behaviour log-probs is what the clip acts on). The defaults (32 groups of 8,
two updates per rollout, 30 iterations) take the in-wedge fraction from
~0.25 to ~0.99 at a KL of ~5 nats per chain.

**algo "dpo"** (Diffusion-DPO, Wallace et al. 2023, in its online form).
Wallace et al. only see final images, so they bound the intractable
``log p_theta(x_0)`` with the forward process. Here the whole chains are
sampled, so their exact log-densities are available: with preferred chain
``tau_w`` and dispreferred ``tau_l`` from the same ``x_T`` (whose density
cancels), the loss is DPO's (Rafailov et al. 2023)

.. math::
    -\\log\\sigma\\Big(\\beta \\sum_t \\big[\\log\\tfrac{p_\\theta(x^w_{t-1}|x^w_t)}
      {p_{ref}(x^w_{t-1}|x^w_t)} - \\log\\tfrac{p_\\theta(x^l_{t-1}|x^l_t)}
      {p_{ref}(x^l_{t-1}|x^l_t)}\\big]\\Big),

i.e. :func:`artifex_fn.dpo.update` with the chains as two ``[B, T]``
"sequences" and the reference log-probs from ``ref_params``. Pairs are drawn
from the **current** policy, not the reference (online DPO, as in Guo et al.
2024): the compared chains then lie where the policy puts its mass, so the
preferences keep informing it as it moves away from the pre-trained model
(with reference samples the data would stay fixed at a 25% base rate and
the implicit reward would be fitted only where the pre-trained model goes).
The frozen reference still anchors the implicit reward
``beta * log(p_theta / p_ref)``.

Each of ``num_pairs`` starting noises is shared by ``K = group_size``
chains; the pair is (a chain of highest reward, a chain of lowest reward),
the first such index of the group, which for exchangeable samples is a
uniformly random choice among the tied ones (best-vs-worst of K, as in the
iterative DPO of Yuan et al. 2024). With in-wedge rate ``p`` a group of 4
holds a decisive pair with probability ``1 - p^4 - (1-p)^4`` (0.68 at
``p = 0.25``) against ``2p(1-p)`` for a single pair. Groups whose rewards all agree are **ties**: a binary reward
carries no preference between them, so they are dropped by a zero
``mask`` on both sides. Their sequence log-probs and reference log-probs
are then all exactly ``0``, the DPO margin is identically ``0`` and the
pair adds the constant ``log 2`` with zero gradient; the loss is still
averaged over all pairs, so the step on the decisive ones is scaled by
their fraction (Adam's normalisation absorbs most of that), and DPO's
metrics (``loss``, ``reward_accuracy``, ...) average over all pairs, masked
ones included; ``decisive_pairs`` is the fraction kept. No secondary score
breaks ties: e.g. preferring the sample nearer the wedge's centre angle
(67.5 degrees) would pull mass *between* the two rewarded modes.

Sequence-level DPO has no per-step trust region, and pushing down the
likelihood of rejected chains also blurs samples off the modes: ``beta``
trades the two. With the defaults (``beta = 1``, 128 groups of 4, 30
iterations) about 0.9 of the samples end in the wedge with ~0.8 of high
quality; ``beta = 2`` gives ~0.8 and ~0.9; conservative DPO
(``label_smoothing = 0.1``, Mitchell 2023) stops near 0.7 with the
pre-trained quality kept.

**Evaluation** draws ``eval_samples`` chains (a fixed key gives the same
``x_T`` and noise before and after) and reports ``in_region`` (fraction in
the wedge), ``modes_covered``, ``high_quality`` and ``mode_entropy`` (from
:func:`mixture_coverage`; a sample is of high quality within 3 std of a
mode), and ``kl_to_pretrained``: the exact ``sum_t KL(p_theta(.|x_t) ||
p_ref(.|x_t))`` (:func:`diffusion.chain_kl`, Gaussians with equal variances)
along the policy's chains, averaged: a Monte-Carlo estimate, in nats per
chain, of the KL between the fine-tuned and pre-trained path measures,
which bounds the KL between their final-sample distributions.

Hyper-parameters in :data:`HPARAMS` are traced (sweepable with ``vmap``),
``pretrain_lr`` included; :data:`SETTINGS` fix shapes and loop lengths
(``iterations`` is the number of RL iterations). A smoke test can shrink
everything, e.g. ``dict(pretrain_steps=50, pretrain_batch=64, iterations=3,
eval_samples=128, num_groups=4, group_size=4)`` (``num_pairs`` for dpo);
compilation then dominates. To keep that short, the network's weights come
from one normal draw and the pre-training data, timesteps and noise are
drawn before the loop (``pretrain_steps * pretrain_batch * 5`` floats).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

from artifex_fn import dpo
from artifex_fn import grpo
from artifex_fn.experiments._program import Program
from artifex_fn.experiments.tasks import Range
from artifex_fn.families import diffusion
from artifex_fn.families.diffusion import EpsMLP
from artifex_fn.toy_data import gaussian_mixture_2d
from artifex_fn.toy_data import mixture_coverage

NUM_TIMESTEPS = 20
WEDGE = (math.radians(22.5), math.radians(112.5))
EMA_DECAY = 0.999
# Final pre-training step size as a fraction of the peak (cosine decay).
PRETRAIN_LR_FLOOR = 0.05

_COMMON_SETTINGS = dict(hidden=128, pretrain_steps=800, pretrain_batch=512,
                        inner_updates=2, eval_samples=1024)
GRPO_SETTINGS = dict(_COMMON_SETTINGS, iterations=30, num_groups=32,
                     group_size=8)
GRPO_HPARAMS = dict(lr=3e-4, beta=0.01, clip_param=0.2, pretrain_lr=5e-3)
DPO_SETTINGS = dict(_COMMON_SETTINGS, iterations=30, num_pairs=128,
                    group_size=4)
DPO_HPARAMS = dict(lr=3e-4, beta=1.0, label_smoothing=0.0, pretrain_lr=5e-3)

# The valid values of each setting and hyper-parameter, checked before
# anything is traced. A group needs two chains (GRPO: the advantage of a
# group of one is always 0; DPO: a pair). ``label_smoothing`` is the
# assumed probability that a preference is flipped: from 0.5 on the loss
# no longer prefers the chosen chain.
_COUNT = Range.count()
_COMMON_RANGES = dict(hidden=_COUNT, pretrain_steps=_COUNT,
                      pretrain_batch=_COUNT, inner_updates=_COUNT,
                      eval_samples=_COUNT, iterations=_COUNT,
                      group_size=Range.count(2), lr=Range.positive(),
                      pretrain_lr=Range.positive())
GRPO_RANGES = dict(_COMMON_RANGES, num_groups=_COUNT,
                   beta=Range.non_negative(), clip_param=Range.non_negative())
DPO_RANGES = dict(_COMMON_RANGES, num_pairs=_COUNT, beta=Range.positive(),
                  label_smoothing=Range(0.0, 0.5, hi_open=True))


def in_region(x):
    """``1.0`` where the angle of ``x [..., 2]`` lies in the wedge, else ``0.0``."""
    angle = jnp.arctan2(x[..., 1], x[..., 0])
    return ((angle >= WEDGE[0]) & (angle <= WEDGE[1])).astype(jnp.float32)


def _model_fns(hidden: int):
    """``(init_params(key), eps_apply(params, x_t, t))`` for :class:`EpsMLP`.

    ``init_params`` fills the module's parameter tree from ONE normal draw:
    kernels ``[fan_in, fan_out]`` get std ``1 / sqrt(fan_in)`` (LeCun
    normal), the ``t`` embedding ``[T, hidden]`` std ``1 / sqrt(hidden)``,
    biases zeros: the scales NNX's default initialisers use, without one
    PRNG call per layer (each such call adds a threefry kernel to compile).
    """
    graphdef, template = nnx.split(
        EpsMLP(NUM_TIMESTEPS, hidden, rngs=nnx.Rngs(0)))
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)

    def scale(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if "bias" in names:
            return 0.0
        if "embedding" in names:
            return 1.0 / math.sqrt(leaf.shape[1])
        return 1.0 / math.sqrt(leaf.shape[0])

    shapes = [leaf.shape for _, leaf in paths_leaves]
    scales = [scale(path, leaf) for path, leaf in paths_leaves]
    sizes = [math.prod(shape) for shape in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]

    def init_params(key):
        z = jax.random.normal(key, (sum(sizes),))
        leaves = [s_ * z[o:o + n].reshape(shape)
                  for s_, o, n, shape in zip(scales, offsets, sizes, shapes)]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def eps_apply(params, x_t, t):
        return nnx.merge(graphdef, params)(x_t, t)

    return init_params, eps_apply


def _optimizer():
    # The step size lives in the optimiser state (inject_hyperparams) so it
    # can be traced and swept while the transformation stays static.
    return optax.inject_hyperparams(optax.adam)(learning_rate=0.0)


def _set_lr(opt_state, lr):
    return opt_state._replace(
        hyperparams={**opt_state.hyperparams, "learning_rate": lr})


def _scalars(metrics):
    return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def _diffusion_config(eps_apply):
    return diffusion.DiffusionConfig(
        num_timesteps=NUM_TIMESTEPS, schedule="cosine", max_beta=0.5,
        ema_decay=EMA_DECAY, apply=eps_apply, optimizer=_optimizer())


def _pretrain(key, hp, s, init_params, eps_apply):
    """DDPM pre-training by ``lax.scan``.

    ``pretrain_steps`` Adam steps on fresh batches ``[pretrain_batch, 2]``
    of the ring, step size ``pretrain_lr`` cosine-decayed to
    ``PRETRAIN_LR_FLOOR`` of it. Returns ``(ema_params, losses
    [pretrain_steps])``.
    """
    config = _diffusion_config(eps_apply)
    k_params, k_state, k_data, k_t, k_noise = jax.random.split(key, 5)
    state = diffusion.init(init_params(k_params), config, key=k_state)
    steps, batch = s["pretrain_steps"], s["pretrain_batch"]
    # All data, timesteps and noise drawn up front (three PRNG calls to
    # compile instead of four inside the loop body).
    data = dict(
        x=gaussian_mixture_2d(k_data, steps * batch).reshape(steps, batch, 2),
        t=jax.random.randint(k_t, (steps, batch), 0, NUM_TIMESTEPS),
        noise=jax.random.normal(k_noise, (steps, batch, 2)))

    def body(state, inputs):
        i, minibatch = inputs
        frac = 0.5 * (1.0 + jnp.cos(jnp.pi * i / steps))
        lr = hp["pretrain_lr"] * (PRETRAIN_LR_FLOOR
                                  + (1.0 - PRETRAIN_LR_FLOOR) * frac)
        state = state.replace(opt_state=_set_lr(state.opt_state, lr))
        state, metrics = diffusion.update(state, minibatch)
        return state, metrics["loss"]

    state, losses = lax.scan(
        body, state, (jnp.arange(steps, dtype=jnp.float32), data))
    return state.ema_params, losses


def _grouped_chains(eps_apply, params, schedule, k_T, k_chain, num_starts,
                    group):
    """``num_starts * group`` chains; each run of ``group`` shares its ``x_T``."""
    x_T = jnp.repeat(jax.random.normal(k_T, (num_starts, 2)), group, axis=0)
    return diffusion.sample_chain(eps_apply, params, x_T, k_chain, schedule)


def _make_evaluate(eps_apply, schedule, num_samples: int):
    def evaluate(params, ref_params, key):
        x_T_key, chain_key = jax.random.split(key)
        x_T = jax.random.normal(x_T_key, (num_samples, 2))
        x0, trajectory, _ = diffusion.sample_chain(eps_apply, params, x_T,
                                                   chain_key, schedule)
        kl = diffusion.chain_kl(eps_apply, params, ref_params, trajectory,
                                schedule)
        cov = mixture_coverage(x0)
        return _scalars(dict(
            in_region=jnp.mean(in_region(x0)),
            modes_covered=cov["modes_covered"],
            high_quality=cov["high_quality"],
            mode_entropy=cov["mode_entropy"],
            kl_to_pretrained=jnp.mean(kl)))
    return evaluate


def _program(algo: str, s: dict) -> Program:
    init_params, eps_apply = _model_fns(s["hidden"])
    schedule = diffusion.schedule_of(_diffusion_config(eps_apply))
    policy = diffusion.ddpo_policy(eps_apply, schedule)
    optimizer = _optimizer()
    evaluate_params = _make_evaluate(eps_apply, schedule, s["eval_samples"])
    group = s["group_size"]
    if algo == "grpo":
        num_starts = s["num_groups"]
    else:
        num_starts = s["num_pairs"]
        if group < 2:
            raise ValueError(f"dpo needs `group_size` >= 2, got {group}.")

    def config(hp):
        if algo == "grpo":
            return grpo.GRPOConfig(
                num_generations=group, beta=hp["beta"],
                clip_param=hp["clip_param"], entropy_coeff=0.0,
                policy=policy, optimizer=optimizer)
        return dpo.DPOConfig(beta=hp["beta"],
                             label_smoothing=hp["label_smoothing"],
                             policy=policy, optimizer=optimizer)

    def init(key, hp):
        k_pre, k_state, k_run = jax.random.split(key, 3)
        params, _ = _pretrain(k_pre, hp, s, init_params, eps_apply)
        module = grpo if algo == "grpo" else dpo
        state = module.init(params, config(hp), key=k_state,
                            ref_params=params)
        state = state.replace(opt_state=_set_lr(state.opt_state, hp["lr"]))
        return dict(train=state, key=k_run)

    def grpo_batch(state, k_T, k_chain):
        _, trajectory, log_probs = _grouped_chains(
            eps_apply, state.params, schedule, k_T, k_chain, num_starts, group)
        batch = diffusion.ddpo_batch(trajectory, log_probs,
                                     in_region(trajectory[-1]))
        # Reference log-probs once per rollout, not once per inner update.
        return grpo.with_reference_log_probs(state, batch), {}

    def dpo_batch(state, k_T, k_chain):
        _, trajectory, _ = _grouped_chains(
            eps_apply, state.params, schedule, k_T, k_chain, num_starts, group)
        rewards = in_region(trajectory[-1]).reshape(num_starts, group)
        # Only the (observation, action) layout of ddpo_batch is used here:
        # both sides are re-scored by the policy and the reference.
        chains = diffusion.ddpo_batch(
            trajectory, jnp.zeros(trajectory.shape[:2])[1:])
        chains = jax.tree_util.tree_map(
            lambda x: x.reshape((num_starts, group) + x.shape[1:]),
            dict(observations=chains["observations"],
                 actions=chains["actions"]))
        best = jnp.argmax(rewards, axis=1)
        worst = jnp.argmin(rewards, axis=1)
        decisive = (jnp.max(rewards, 1) > jnp.min(rewards, 1)).astype(
            jnp.float32)
        mask = jnp.broadcast_to(decisive[:, None], (num_starts, NUM_TIMESTEPS))

        def side(index):
            return dict(jax.tree_util.tree_map(
                lambda x: jax.vmap(lambda xi, i: xi[i])(x, index), chains),
                mask=mask)

        batch = dpo.with_reference_log_probs(
            state, dict(chosen=side(best), rejected=side(worst)))
        return batch, dict(mean_reward=jnp.mean(rewards),
                           decisive_pairs=jnp.mean(decisive))

    make_batch = grpo_batch if algo == "grpo" else dpo_batch
    update = grpo.update if algo == "grpo" else dpo.update

    def step(carry, hp):
        state = carry["train"]
        state = state.replace(opt_state=_set_lr(state.opt_state, hp["lr"]))
        key, k_T, k_chain = jax.random.split(carry["key"], 3)
        batch, extra = make_batch(state, k_T, k_chain)

        def inner(state, _):
            return update(state, batch)

        state, metrics = lax.scan(inner, state, None,
                                  length=s["inner_updates"])
        metrics = jax.tree_util.tree_map(lambda m: m[-1], metrics)
        return (dict(train=state, key=key),
                _scalars(dict(metrics, **extra)))

    def evaluate(carry, key, hp):
        del hp
        state = carry["train"]
        return evaluate_params(state.params, state.ref_params, key)

    description = ("GRPO (DDPO) steering a 2-D DDPM into a wedge"
                   if algo == "grpo" else
                   "online Diffusion-DPO steering a 2-D DDPM into a wedge")
    return Program(init=init, step=step, evaluate=evaluate,
                   params=lambda c: c["train"].params,
                   num_iterations=s["iterations"],
                   samples_per_iteration=num_starts * group,
                   curve="mean_reward",
                   score="in_region", description=description)


SETTINGS: dict[str, dict[str, Any]] = dict(grpo=GRPO_SETTINGS,
                                           dpo=DPO_SETTINGS)
HPARAMS: dict[str, dict[str, Any]] = dict(grpo=GRPO_HPARAMS,
                                          dpo=DPO_HPARAMS)
RANGES: dict[str, dict[str, Range]] = dict(grpo=GRPO_RANGES, dpo=DPO_RANGES)


def program(algo: str, settings: dict | None = None) -> Program:
    """The 2-D diffusion program for ``algo`` in ``{"grpo", "dpo"}``."""
    if algo not in SETTINGS:
        raise ValueError(
            f"diffusion supports --algo {' or '.join(SETTINGS)}, got {algo!r}.")
    unknown = set(settings or {}) - set(SETTINGS[algo])
    if unknown:
        raise ValueError(f"unknown diffusion/{algo} settings {sorted(unknown)}; "
                         f"valid: {sorted(SETTINGS[algo])}.")
    return _program(algo, dict(SETTINGS[algo], **(settings or {})))
