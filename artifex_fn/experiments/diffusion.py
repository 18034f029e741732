"""GRPO (DDPO) and online Diffusion-DPO steer a 2-D DDPM into a reward wedge.

**Pre-training** (inside ``init``). A DDPM (Ho et al. 2020) with ``T = 20``
steps learns the 8-mode ring :func:`artifex_fn.toy_data.gaussian_mixture_2d`
(modes at angles ``k * 45`` degrees, radius 2, std 0.1). The noise predictor
``eps_theta(x_t, t)`` is a small MLP with a learned timestep embedding,
trained by ``lax.scan`` over :func:`artifex_fn.families.diffusion.update`
(loss ``E ||eps - eps_theta(x_t, t)||^2``, Adam with a step size
cosine-decayed by an optax schedule, an EMA of the weights). The schedule is Nichol & Dhariwal's cosine
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

i.e. DPO with the chains as ``[B, T]`` "sequences" and the reference
log-probs from ``ref_params``. Pairs are drawn
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
``p = 0.25``) against ``2p(1-p)`` for a single pair. Groups whose
rewards all agree are **ties**: a binary reward carries no preference
between them, so they are left out of the loss. All of this is
:func:`artifex_fn.online_dpo.update` on the ``[N * K, T]`` chains: the
loss and DPO's metrics (``loss``, ``reward_accuracy``, ...) are means over
the decisive pairs, and ``decisive_pairs`` is their fraction. No secondary
score breaks ties: e.g. preferring the sample nearer the wedge's centre angle
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
The pre-training, chains, reward and evaluation are public:
``examples/diffusion_grpo.py`` fine-tunes the same model with the NNX
trainers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

from artifex_fn import grpo
from artifex_fn import online_dpo
from artifex_fn.experiments._program import Program
from artifex_fn.experiments._program import adam
from artifex_fn.experiments._program import gaussian_init
from artifex_fn.experiments._program import resolve_settings
from artifex_fn.experiments._program import scalars
from artifex_fn.experiments._program import with_learning_rate
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

MODEL_SETTINGS = dict(hidden=128, pretrain_steps=800, pretrain_batch=512)
_COMMON_SETTINGS = dict(MODEL_SETTINGS, inner_updates=2, eval_samples=1024,
                        iterations=30)
SETTINGS = dict(grpo=dict(_COMMON_SETTINGS, num_groups=32, group_size=8),
                dpo=dict(_COMMON_SETTINGS, num_pairs=128, group_size=4))
HPARAMS = dict(
    grpo=dict(lr=3e-4, beta=0.01, clip_param=0.2, pretrain_lr=5e-3),
    dpo=dict(lr=3e-4, beta=1.0, label_smoothing=0.0, pretrain_lr=5e-3))

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
RANGES = dict(
    grpo=dict(_COMMON_RANGES, num_groups=_COUNT, beta=Range.non_negative(),
              clip_param=Range.non_negative()),
    dpo=dict(_COMMON_RANGES, num_pairs=_COUNT, beta=Range.positive(),
             label_smoothing=Range(0.0, 0.5, hi_open=True)))


def in_region(x):
    """``1.0`` where the angle of ``x [..., 2]`` lies in the wedge, else ``0.0``."""
    angle = jnp.arctan2(x[..., 1], x[..., 0])
    return ((angle >= WEDGE[0]) & (angle <= WEDGE[1])).astype(jnp.float32)


def ddpm_config(**fields) -> diffusion.DiffusionConfig:
    """The DDPM: ``T = 20`` steps, cosine betas clipped at 0.5, EMA."""
    return diffusion.DiffusionConfig(
        num_timesteps=NUM_TIMESTEPS, schedule="cosine", max_beta=0.5,
        ema_decay=EMA_DECAY, **fields)


def schedule() -> diffusion.NoiseSchedule:
    return diffusion.schedule_of(ddpm_config())


def model_fns(hidden: int):
    """``(graphdef, init_params(key), eps_apply(params, x_t, t))`` for
    :class:`EpsMLP` (see
    :func:`~artifex_fn.experiments._program.gaussian_init`)."""
    graphdef, init_params = gaussian_init(
        EpsMLP(NUM_TIMESTEPS, hidden, rngs=nnx.Rngs(0)))

    def eps_apply(params, x_t, t):
        return nnx.merge(graphdef, params)(x_t, t)

    return graphdef, init_params, eps_apply


def pretrain(key, s, init_params, eps_apply, pretrain_lr):
    """DDPM pre-training by ``lax.scan``.

    ``pretrain_steps`` Adam steps on fresh batches ``[pretrain_batch, 2]``
    of the ring, step size ``pretrain_lr`` cosine-decayed to
    ``PRETRAIN_LR_FLOOR`` of it. Returns ``(ema_params, losses
    [pretrain_steps])``.
    """
    steps, batch = s["pretrain_steps"], s["pretrain_batch"]
    config = ddpm_config(apply=eps_apply, optimizer=adam(
        schedule=optax.cosine_decay_schedule(1.0, steps,
                                             alpha=PRETRAIN_LR_FLOOR)))
    k_params, k_state, k_data, k_t, k_noise = jax.random.split(key, 5)
    state = with_learning_rate(
        diffusion.init(init_params(k_params), config, key=k_state),
        pretrain_lr)
    # All data, timesteps and noise drawn up front (three PRNG calls to
    # compile instead of four inside the loop body).
    data = dict(
        x=gaussian_mixture_2d(k_data, steps * batch).reshape(steps, batch, 2),
        t=jax.random.randint(k_t, (steps, batch), 0, NUM_TIMESTEPS),
        noise=jax.random.normal(k_noise, (steps, batch, 2)))

    def body(state, minibatch):
        state, metrics = diffusion.update(state, minibatch)
        return state, metrics["loss"]

    state, losses = lax.scan(body, state, data)
    return state.ema_params, losses


def pretrained_model(key, *, pretrain_lr: float = 5e-3, **settings):
    """A pre-trained :class:`EpsMLP` (an NNX module, the EMA weights) and
    its loss curve; ``settings`` override :data:`MODEL_SETTINGS`."""
    s = dict(MODEL_SETTINGS, **settings)
    graphdef, init_params, eps_apply = model_fns(s["hidden"])
    params, losses = jax.jit(functools.partial(
        pretrain, s=s, init_params=init_params, eps_apply=eps_apply))(
            key, pretrain_lr=pretrain_lr)
    return nnx.merge(graphdef, params), losses


def grouped_chains(eps_apply, params, key, num_starts: int, group: int):
    """``num_starts * group`` chains (:func:`diffusion.sample_chain`); each
    run of ``group`` consecutive chains shares its ``x_T``."""
    k_T, k_chain = jax.random.split(key)
    x_T = jnp.repeat(jax.random.normal(k_T, (num_starts, 2)), group, axis=0)
    return diffusion.sample_chain(eps_apply, params, x_T, k_chain,
                                  schedule())


def evaluate_chains(eps_apply, params, ref_params, key, n: int):
    """Metrics of ``n`` fresh chains: ``in_region`` (fraction in the
    wedge), ``modes_covered``, ``high_quality``, ``mode_entropy`` and
    ``kl_to_pretrained`` (see the module docstring)."""
    x0, trajectory, _ = grouped_chains(eps_apply, params, key, n, 1)
    kl = diffusion.chain_kl(eps_apply, params, ref_params, trajectory,
                            schedule())
    cov = mixture_coverage(x0)
    return scalars(dict(
        in_region=jnp.mean(in_region(x0)),
        modes_covered=cov["modes_covered"], high_quality=cov["high_quality"],
        mode_entropy=cov["mode_entropy"], kl_to_pretrained=jnp.mean(kl)))


def _program(algo: str, settings) -> Program:
    s = resolve_settings(f"diffusion/{algo}", SETTINGS[algo], RANGES[algo],
                         settings)
    _, init_params, eps_apply = model_fns(s["hidden"])
    policy = diffusion.ddpo_policy(eps_apply, schedule())
    optimizer = adam()
    group = s["group_size"]
    num_starts = s["num_groups"] if algo == "grpo" else s["num_pairs"]
    module = grpo if algo == "grpo" else online_dpo

    def config(hp):
        if algo == "grpo":
            return grpo.GRPOConfig(
                num_generations=group, beta=hp["beta"],
                clip_param=hp["clip_param"], entropy_coeff=0.0,
                policy=policy, optimizer=optimizer)
        return online_dpo.OnlineDPOConfig(
            num_generations=group, beta=hp["beta"],
            label_smoothing=hp["label_smoothing"], policy=policy,
            optimizer=optimizer)

    def init(key, hp):
        k_pre, k_state, k_run = jax.random.split(key, 3)
        params, _ = pretrain(k_pre, s, init_params, eps_apply,
                             hp["pretrain_lr"])
        state = module.init(params, config(hp), key=k_state,
                            ref_params=params)
        return dict(train=with_learning_rate(state, hp["lr"]), key=k_run)

    def step(carry, hp):
        del hp
        state = carry["train"]
        key, k_chains = jax.random.split(carry["key"])
        _, trajectory, log_probs = grouped_chains(
            eps_apply, state.params, k_chains, num_starts, group)
        rewards = in_region(trajectory[-1])
        if algo == "grpo":
            batch = diffusion.ddpo_batch(trajectory, log_probs, rewards)
        else:
            # The chains as [N * K, T] "sequences" in groups of K; the pairs
            # are chosen by online_dpo.update (ties left out).
            chains = diffusion.ddpo_batch(trajectory, log_probs, rewards)
            batch = dict(observations=chains["observations"],
                         actions=chains["actions"], rewards=rewards)
        # Reference log-probs once per rollout, not once per inner update.
        batch = module.with_reference_log_probs(state, batch)
        state, metrics = lax.scan(lambda st, _: module.update(st, batch),
                                  state, None, length=s["inner_updates"])
        metrics = jax.tree_util.tree_map(lambda m: m[-1], metrics)
        return dict(train=state, key=key), scalars(metrics)

    def evaluate(carry, key, hp):
        del hp
        state = carry["train"]
        return evaluate_chains(eps_apply, state.params, state.ref_params, key,
                               s["eval_samples"])

    description = ("GRPO (DDPO) steering a 2-D DDPM into a wedge"
                   if algo == "grpo" else
                   "online Diffusion-DPO steering a 2-D DDPM into a wedge")
    return Program(init=init, step=step, evaluate=evaluate,
                   num_iterations=s["iterations"],
                   samples_per_iteration=num_starts * group,
                   curve="mean_reward",
                   score="in_region", description=description)


grpo_program = functools.partial(_program, "grpo")
dpo_program = functools.partial(_program, "dpo")
