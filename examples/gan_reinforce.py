"""Fine-tune a GAN's generator with REINFORCE against its frozen discriminator.

1. Pre-train a tiny GAN on a ring of eight 2-D Gaussians with
   :class:`~artifex_fn.training.trainers.gan.GANTrainer` (non-saturating
   loss, five discriminator steps per generator step), stopping early so
   the generator is still imperfect.
2. Make the generator a policy: given noise ``z`` it is a Gaussian around
   its output, ``pi(x|z) = N(G(z), s^2 I)`` with a fixed ``s``. A sample
   ``x`` is an action; the reward is the frozen discriminator's
   ``log sigmoid(D(x))``.
3. Fine-tune with :class:`~artifex_fn.training.REINFORCETrainer`.

A frozen discriminator can be exploited (its logits keep growing in regions
it never saw) and maximising any fixed reward is mode-seeking, so the
reward carries a KL guard towards the pre-trained policy, as in RLHF
(Ziegler et al. 2019):

.. math::
    r'(x, z) = \\log\\sigma(D(x))
      - \\beta\\,[\\log\\pi(x|z) - \\log\\pi_{ref}(x|z)],

whose expectation is ``E[log sigma(D)] - beta * KL(pi || pi_ref)``. Each
noise vector is sampled ``K`` times and rewards are centred per noise
vector (a baseline that depends only on the state, so the gradient stays
unbiased), which makes the gradient far less noisy than a batch-wide
baseline.

The script reports the discriminator reward and the mixture coverage of
``G(z)`` (modes covered, fraction of high-quality samples) before and after.

Run ``python examples/gan_reinforce.py [--quick] [--seed N] [--plot out.png]``.
"""

from __future__ import annotations

import time

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from artifex_fn.experiments.demo import example_main
from artifex_fn.families.gan import GANConfig
from artifex_fn.reinforce import REINFORCEConfig
from artifex_fn.toy_data import gaussian_mixture_2d
from artifex_fn.toy_data import mixture_coverage
from artifex_fn.training import GANTrainer
from artifex_fn.training import REINFORCETrainer

LATENT, HIDDEN = 4, 64
POLICY_STD = 0.1     # std of the policy around G(z)
KL_COEF = 0.03       # beta of the KL guard
GROUP = 8            # samples per noise vector


class MLP(nnx.Module):
    """Two hidden ReLU layers."""

    def __init__(self, din, dout, rngs):
        self.l1 = nnx.Linear(din, HIDDEN, rngs=rngs)
        self.l2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
        self.l3 = nnx.Linear(HIDDEN, dout, rngs=rngs)

    def __call__(self, x):
        return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))


class Generator(nnx.Module):
    """``G(z)``; as a policy, ``N(G(z), POLICY_STD^2 I)``."""

    latent_dim = LATENT

    def __init__(self, rngs):
        self.net = MLP(LATENT, 2, rngs)
        # A plain Variable, not a Param: neither trainer changes it.
        self.std = nnx.Variable(jnp.full((2,), POLICY_STD, jnp.float32))

    def __call__(self, z):
        return self.net(z)

    def policy_outputs(self, z):
        return distrax.MultivariateNormalDiag(self.net(z), self.std[...])


def evaluate(generator, discriminator, key):
    """``G(z)`` for 2000 held-out ``z`` and its numbers (see :func:`run`)."""
    x, reward = _samples(generator, discriminator, key)
    cover = mixture_coverage(x)
    return x, dict(discriminator_reward=float(reward),
                   modes_covered=int(cover["modes_covered"]),
                   high_quality=float(cover["high_quality"]))


@nnx.jit
def _samples(generator, discriminator, key):
    x = generator(jax.random.normal(key, (2000, LATENT)))
    return x, jnp.mean(jax.nn.log_sigmoid(discriminator(x)[:, 0]))


@nnx.jit(static_argnums=4)
def rollout(generator, reference, discriminator, key, batch):
    """``batch // GROUP`` noise vectors, ``GROUP`` actions each; KL-guarded
    rewards centred per noise vector."""
    k_z, k_x = jax.random.split(key)
    z = jnp.repeat(jax.random.normal(k_z, (batch // GROUP, LATENT)), GROUP,
                   axis=0)
    dist = generator.policy_outputs(z)
    x = dist.sample(seed=k_x)
    d_reward = jax.nn.log_sigmoid(discriminator(x)[:, 0])
    kl = dist.log_prob(x) - reference.policy_outputs(z).log_prob(x)
    shaped = (d_reward - KL_COEF * kl).reshape(-1, GROUP)
    rewards = (shaped - jnp.mean(shaped, axis=1, keepdims=True)).reshape(-1)
    batch = dict(observations=z, actions=x, rewards=rewards)
    return batch, jnp.mean(d_reward), jnp.mean(kl)


def run(*, quick: bool = False, seed: int = 0,
        plot: str | None = None) -> dict:
    """Pre-trains the GAN, fine-tunes the generator, returns numbers.

    ``before``/``after`` hold ``discriminator_reward`` (mean ``log
    sigmoid(D(G(z)))`` on held-out noise), ``modes_covered`` and
    ``high_quality`` (:func:`~artifex_fn.toy_data.mixture_coverage` of
    ``G(z)``); plus ``kl_to_pretrained`` (the KL guard's estimate over the
    last 10 rollouts) and ``seconds``.
    """
    start = time.time()
    pre_steps, rl_steps, batch = (300, 200, 256) if quick else (300, 600, 256)
    key = jax.random.key(seed)
    k_data, k_g, k_d, k_gan, k_rl, k_eval = jax.random.split(key, 6)
    data = jax.jit(gaussian_mixture_2d, static_argnums=1)(
        k_data, pre_steps * batch).reshape(pre_steps, batch, 2)

    # 1. Pre-train the GAN (briefly: the generator stays imperfect).
    generator, discriminator = nnx.jit(lambda kg, kd: (
        Generator(nnx.Rngs(kg)), MLP(2, 1, nnx.Rngs(kd))))(k_g, k_d)
    adam = optax.adam(1e-3, b1=0.5)
    gan = GANTrainer(
        generator, nnx.Optimizer(generator, adam, wrt=nnx.Param),
        GANConfig(loss_type="non_saturating", d_steps=5, latent_dim=LATENT),
        discriminator=discriminator,
        d_optimizer=nnx.Optimizer(discriminator, adam, wrt=nnx.Param),
        key=k_gan)
    gan.fit(lambda i: data[i], num_steps=pre_steps)

    x_before, before = evaluate(generator, discriminator, k_eval)

    # 2. REINFORCE on the generator; the discriminator and reference are
    #    frozen (no trainer holds their variables).
    reference = nnx.clone(generator)
    rl = REINFORCETrainer(
        generator, nnx.Optimizer(generator, optax.adam(3e-3), wrt=nnx.Param),
        REINFORCEConfig(entropy_coeff=0.0, baseline="none",
                        normalize_returns=True),
        key=k_rl)
    history = []
    for t in range(rl_steps):
        rl_batch, d_reward, kl = rollout(generator, reference, discriminator,
                                         jax.random.fold_in(k_rl, t), batch)
        rl.train_step(rl_batch)
        history.append((d_reward, kl))
    x_after, after = evaluate(generator, discriminator, k_eval)
    history = np.asarray(jax.device_get(history))
    result = dict(before=before, after=after,
                  kl_to_pretrained=float(np.mean(history[-10:, 1])),
                  seconds=time.time() - start)
    if plot is not None:
        _plot(plot, data[:8].reshape(-1, 2), x_before, x_after, history)
    return result


def _plot(path, real, before, after, history):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, x, title in ((axes[0], before, "pre-trained G(z)"),
                         (axes[1], after, "after REINFORCE")):
        ax.scatter(real[:, 0], real[:, 1], s=4, c="lightgray", label="data")
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, label="G(z)")
        ax.set(title=title, xlim=(-3, 3), ylim=(-3, 3), aspect="equal")
        ax.legend(loc="upper right", fontsize=7)
    axes[2].plot(history[:, 0], label="log sigmoid(D(x))")
    axes[2].plot(-KL_COEF * history[:, 1], label="-beta KL")
    axes[2].set(title="rollout rewards", xlabel="REINFORCE update")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    example_main(run, __doc__)
