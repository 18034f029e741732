"""Fine-tune a VAE's encoder with PPO for reconstruction reward.

1. Pre-train a tiny VAE on procedurally drawn 8x8 digits with
   :class:`~artifex_fn.training.trainers.vae.VAETrainer` (negative ELBO).
2. Treat the encoder as a policy: given an image it is a Gaussian over
   latents, ``pi(z|x) = N(mu(x), diag(sigma^2(x)))``, with a value head
   ``V(x)`` on its (gradient-stopped) hidden features. An action is a
   sampled latent; the frozen decoder turns it into an image and the reward
   is minus its squared reconstruction error. Each image is a one-step
   episode, so PPO's advantage is ``r - V(x)``.
3. Fine-tune the encoder with :class:`~artifex_fn.training.PPOTrainer`.

The ELBO's KL term pulls the posterior means towards the prior; the reward
has no such term, so the fine-tuned encoder's mean latents decode closer to
the input. The script reports the held-out reconstruction error (decoding
the posterior mean) before and after fine-tuning.

Run ``python examples/vae_ppo.py [--quick] [--seed N] [--plot out.png]``.
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
from artifex_fn.families.vae import VAEConfig
from artifex_fn.ppo import PPOConfig
from artifex_fn.toy_data import digits_8x8
from artifex_fn.training import PPOTrainer
from artifex_fn.training import VAETrainer

LATENT, HIDDEN, PIXELS = 8, 64, 64


class Encoder(nnx.Module):
    """``x [B, 8, 8] -> (mean, log_var) [B, LATENT]``, plus a value head."""

    def __init__(self, rngs):
        self.hidden = nnx.Linear(PIXELS, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, 2 * LATENT, rngs=rngs)
        self.value_head = nnx.Linear(HIDDEN, 1, rngs=rngs)

    def features(self, x):
        return jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))

    def __call__(self, x):
        mean, log_var = jnp.split(self.out(self.features(x)), 2, axis=-1)
        return mean, log_var

    def policy_outputs(self, x):
        """PPO's actor-critic: ``(N(mean, exp(log_var / 2)), V(x) [B])``."""
        h = self.features(x)
        mean, log_var = jnp.split(self.out(h), 2, axis=-1)
        value = self.value_head(jax.lax.stop_gradient(h))[:, 0]
        return distrax.MultivariateNormalDiag(mean, jnp.exp(0.5 * log_var)), value


class Decoder(nnx.Module):
    """``z [B, LATENT] -> logits [B, 8, 8]``."""

    def __init__(self, rngs):
        self.hidden = nnx.Linear(LATENT, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, PIXELS, rngs=rngs)

    def __call__(self, z):
        return self.out(jax.nn.relu(self.hidden(z))).reshape(-1, 8, 8)


class VAE(nnx.Module):
    """The model :class:`VAETrainer` trains: ``encode`` and ``decode``."""

    latent_dim = LATENT

    def __init__(self, rngs):
        self.encoder = Encoder(rngs)
        self.decoder = Decoder(rngs)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)


def per_image_error(decoder, latents, images):
    """Squared error ``[B]`` of the decoder's mean image, summed over pixels."""
    recon = jax.nn.sigmoid(decoder(latents))
    return jnp.sum(jnp.square(recon - images), axis=(1, 2))


@nnx.jit
def heldout_error(encoder, decoder, images):
    """Mean reconstruction error decoding the posterior mean latents."""
    mean, _ = encoder(images)
    return jnp.mean(per_image_error(decoder, mean, images))


@nnx.jit(static_argnums=4)
def rollout(encoder, decoder, dataset, key, batch):
    """``batch`` one-step episodes on random training images: sample latents,
    score them with the frozen decoder."""
    k_idx, k_z = jax.random.split(key)
    images = dataset[jax.random.randint(k_idx, (batch,), 0, dataset.shape[0])]
    dist, values = encoder.policy_outputs(images)
    latents = dist.sample(seed=k_z)
    rewards = -per_image_error(decoder, latents, images)
    return dict(observations=images, actions=latents,
                log_probs=dist.log_prob(latents), values=values,
                rewards=rewards, dones=jnp.ones_like(rewards))


def run(*, quick: bool = False, seed: int = 0,
        plot: str | None = None) -> dict:
    """Pre-trains the VAE, fine-tunes its encoder with PPO, returns numbers.

    ``before``/``after`` hold ``reconstruction_error`` (held-out, from the
    mean latent) and ``ppo_reward`` (mean reward of the first rollout / of
    the last five); plus ``pretrain_elbo`` (last step) and ``seconds``.
    """
    start = time.time()
    pre_steps, ppo_steps, batch = (300, 60, 256) if quick else (1500, 300, 256)
    key = jax.random.key(seed)
    k_data, k_model, k_vae, k_ppo = jax.random.split(key, 4)
    # One compiled call each for the data and the model (fewer compiles).
    images = jax.jit(digits_8x8, static_argnums=1)(k_data, 4096 + 1024)[0]
    train_x, test_x = images[:4096], images[4096:]

    # 1. Pre-train the VAE on the negative ELBO.
    vae = nnx.jit(lambda k: VAE(nnx.Rngs(k)))(k_model)
    vae_trainer = VAETrainer(
        vae, nnx.Optimizer(vae, optax.adam(2e-3), wrt=nnx.Param),
        VAEConfig(beta=1.0, kl_anneal_steps=pre_steps // 3), key=k_vae)
    n_train = train_x.shape[0]
    metrics = vae_trainer.fit(
        lambda i: train_x[(i * 128) % n_train:(i * 128) % n_train + 128],
        num_steps=pre_steps)
    error_before = float(heldout_error(vae.encoder, vae.decoder, test_x))

    # 2. Fine-tune the encoder with PPO; the decoder stays frozen.
    encoder, decoder = vae.encoder, vae.decoder
    ppo = PPOTrainer(
        encoder, nnx.Optimizer(encoder, optax.adam(1e-3), wrt=nnx.Param),
        PPOConfig(num_epochs=4, num_minibatches=4, clip_param=0.2,
                  entropy_coeff=0.0, vf_coeff=0.5, max_grad_norm=1.0),
        key=k_ppo)
    rewards, errors = [], []
    for t in range(ppo_steps):
        trajectory = rollout(encoder, decoder, train_x,
                             jax.random.fold_in(k_ppo, t), batch)
        ppo_metrics = ppo.train_step(trajectory)
        rewards.append(ppo_metrics["mean_reward"])
        if plot is not None and t % 10 == 0:
            errors.append((t, heldout_error(encoder, decoder, test_x)))
    error_after = float(heldout_error(encoder, decoder, test_x))
    rewards = np.asarray(jax.device_get(rewards))
    result = dict(
        before=dict(reconstruction_error=error_before,
                    ppo_reward=float(rewards[0])),
        after=dict(reconstruction_error=error_after,
                   ppo_reward=float(np.mean(rewards[-5:]))),
        pretrain_elbo=float(metrics["elbo"]), seconds=time.time() - start)
    if plot is not None:
        _plot(plot, rewards, errors, vae, test_x[:8], error_before)
    return result


def _plot(path, rewards, errors, vae, images, error_before):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(rewards)
    axes[0].set(title="PPO mean reward", xlabel="PPO update",
                ylabel="-squared error")
    steps, errs = zip(*errors) if errors else ((), ())
    axes[1].plot(steps, [float(e) for e in errs], marker="o")
    axes[1].axhline(error_before, color="gray", ls="--", label="pre-trained")
    axes[1].set(title="held-out error (mean latent)", xlabel="PPO update")
    axes[1].legend()
    recon = jax.nn.sigmoid(vae.decode(vae.encode(images)[0]))
    grid = np.concatenate([np.concatenate(list(images), axis=1),
                           np.concatenate(list(recon), axis=1)], axis=0)
    axes[2].imshow(grid, cmap="gray")
    axes[2].set(title="inputs (top) / fine-tuned reconstructions")
    axes[2].axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    example_main(run, __doc__)
