"""Generative adversarial networks (Goodfellow et al. 2014) as ``init``/``update``.

A generator ``G(z)``, ``z ~ N(0, I)``, and a discriminator with logits
``D(x)`` play

.. math::
    \\min_G \\max_D\\; \\mathbb{E}_{x}[\\log \\sigma(D(x))]
      + \\mathbb{E}_{z}[\\log(1 - \\sigma(D(G(z))))].

One :func:`update` takes ``d_steps`` discriminator steps (fresh noise each,
the same real batch) and then one generator step against the updated
discriminator, each with its own optimiser. Losses (see
:func:`discriminator_loss` / :func:`generator_loss`):

* ``"minimax"``: the game above (Goodfellow et al. 2014, eq. 1);
* ``"non_saturating"``: the generator maximises ``log sigma(D(G(z)))``
  instead (Goodfellow et al. 2014, section 3);
* ``"hinge"``: ``relu(1 - D(x)) + relu(1 + D(G(z)))`` and ``-D(G(z))``
  (Lim & Ye 2017; Miyato et al. 2018);
* ``"least_squares"``: ``((D(x) - 1)^2 + D(G(z))^2) / 2`` and
  ``(D(G(z)) - 1)^2 / 2`` (Mao et al. 2017).

Parameters are ``{"generator": ..., "discriminator": ...}`` and the
optimiser state ``{"generator": ..., "discriminator": ...}``; the model
functions get only their own entry, forwarded untouched (a pytree of
arrays or an NNX module).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax
from jax import lax

from artifex_fn._src import checks
from artifex_fn._src.algorithms.batching import batch_array
from artifex_fn._src.algorithms.config import pytree_config
from artifex_fn._src.algorithms.gradients import optimizer_step
from artifex_fn._src.algorithms.state import TrainState

LOSS_TYPES = ("non_saturating", "minimax", "hinge", "least_squares")
_PARTS = ("generator", "discriminator")


@pytree_config(static=("loss_type", "d_steps", "latent_dim", "generator",
                       "discriminator", "g_optimizer", "d_optimizer"))
class GANConfig:
    """Hyper-parameters and model functions of a GAN.

    Attributes:
      loss_type: ``"non_saturating"``, ``"minimax"``, ``"hinge"`` or
        ``"least_squares"``.
      d_steps: discriminator steps per generator step, ``>= 1``.
      latent_dim: size ``D`` of the noise ``z ~ N(0, I_D)``.
      max_grad_norm: optional global-norm clipping of each player's
        gradients.
      generator: ``(params_g, z [B, D]) -> x [B, ...]``.
      discriminator: ``(params_d, x [B, ...]) -> logits [B]`` (or
        ``[B, 1]``).
      g_optimizer, d_optimizer: optax ``GradientTransformation`` s.
    """
    loss_type: Literal["non_saturating", "minimax", "hinge",
                       "least_squares"] = "non_saturating"
    d_steps: int = 1
    latent_dim: int = 2
    max_grad_norm: float | None = None
    generator: Callable[..., Any] | None = None
    discriminator: Callable[..., Any] | None = None
    g_optimizer: optax.GradientTransformation | None = None
    d_optimizer: optax.GradientTransformation | None = None

    def __post_init__(self):
        checks.check_choice(self.loss_type, LOSS_TYPES, "loss_type")
        checks.check_int(self.d_steps, "d_steps", lo=1)
        checks.check_int(self.latent_dim, "latent_dim", lo=1)
        checks.check_hparam(self.max_grad_norm, "max_grad_norm", lo=0.0,
                            lo_open=True, optional=True)
        for name in ("generator", "discriminator"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise ValueError(f"`{name}` must be callable or None.")


# ---------------------------------------------------------------------------
# Losses on logits
# ---------------------------------------------------------------------------


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, *,
                       loss_type: str = "non_saturating") -> jax.Array:
    """The discriminator's loss on real and generated logits.

    .. math::
        \\text{(non\\_saturating, minimax)}\\quad
          \\overline{\\mathrm{softplus}(-D(x))}
          + \\overline{\\mathrm{softplus}(D(G(z)))}
        \\\\
        \\text{(hinge)}\\quad \\overline{\\max(0, 1 - D(x))}
          + \\overline{\\max(0, 1 + D(G(z)))}
        \\\\
        \\text{(least\\_squares)}\\quad \\tfrac12\\overline{(D(x) - 1)^2}
          + \\tfrac12\\overline{D(G(z))^2}

    (``softplus(-l) = -log sigmoid(l)``; bars are batch means.)

    Args:
      real_logits: ``[B]`` discriminator outputs on data.
      fake_logits: ``[B']`` discriminator outputs on generated samples.
      loss_type: the loss family (see the module docstring).

    Returns:
      Scalar loss.
    """
    checks.check_choice(loss_type, LOSS_TYPES, "loss_type")
    real, fake = jnp.asarray(real_logits), jnp.asarray(fake_logits)
    if loss_type in ("non_saturating", "minimax"):
        return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(
            jax.nn.softplus(fake))
    if loss_type == "hinge":
        return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(
            jax.nn.relu(1.0 + fake))
    return 0.5 * jnp.mean(jnp.square(real - 1.0)) + 0.5 * jnp.mean(
        jnp.square(fake))


def generator_loss(fake_logits: jax.Array, *,
                   loss_type: str = "non_saturating") -> jax.Array:
    """The generator's loss on the discriminator's logits of its samples.

    .. math::
        \\text{(non\\_saturating)}\\; \\overline{\\mathrm{softplus}(-D(G(z)))}
        \\quad \\text{(minimax)}\\; -\\overline{\\mathrm{softplus}(D(G(z)))}
        \\\\
        \\text{(hinge)}\\; -\\overline{D(G(z))}
        \\quad \\text{(least\\_squares)}\\; \\tfrac12\\overline{(D(G(z)) - 1)^2}

    (minimax: ``log(1 - sigmoid(l)) = -softplus(l)``.)

    Args:
      fake_logits: ``[B]`` discriminator outputs on generated samples.
      loss_type: the loss family.

    Returns:
      Scalar loss.
    """
    checks.check_choice(loss_type, LOSS_TYPES, "loss_type")
    fake = jnp.asarray(fake_logits)
    if loss_type == "non_saturating":
        return jnp.mean(jax.nn.softplus(-fake))
    if loss_type == "minimax":
        return -jnp.mean(jax.nn.softplus(fake))
    if loss_type == "hinge":
        return -jnp.mean(fake)
    return 0.5 * jnp.mean(jnp.square(fake - 1.0))


# ---------------------------------------------------------------------------
# Objectives of the two players
# ---------------------------------------------------------------------------


def _require(config, name):
    fn = getattr(config, name)
    if fn is None:
        raise ValueError(
            f"`config.{name}` is None: pass a function "
            + ("`(params_g, z) -> x`." if name == "generator"
               else "`(params_d, x) -> logits [B]`."))
    return fn


def _logits(config, params_d, x):
    out = jnp.asarray(_require(config, "discriminator")(params_d, x))
    n = x.shape[0]
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape != (n,):
        raise ValueError(f"the discriminator must return logits [B] or "
                         f"[B, 1] with B={n}; got {tuple(out.shape)}.")
    return out


def _data(batch):
    if isinstance(batch, dict):
        return jnp.asarray(batch_array(batch, "x"))
    return jnp.asarray(batch)


def noise(key, num_samples: int, latent_dim: int) -> jax.Array:
    """``num_samples`` latent vectors ``z ~ N(0, I)``, shape
    ``[num_samples, latent_dim]``."""
    return jax.random.normal(key, (num_samples, latent_dim))


def discriminator_objective(params_d, params_g, real, z, config: GANConfig):
    """``(loss, metrics)`` of the discriminator; ``G`` gets no gradient.

    Metrics: ``d_loss``, ``real_logit`` and ``fake_logit`` (batch means),
    ``d_accuracy`` (fraction of real logits > 0 and fake logits < 0).
    """
    fake = lax.stop_gradient(_require(config, "generator")(params_g, z))
    real_logits = _logits(config, params_d, real)
    fake_logits = _logits(config, params_d, fake)
    d_loss = discriminator_loss(real_logits, fake_logits,
                                loss_type=config.loss_type)
    accuracy = 0.5 * (jnp.mean((real_logits > 0).astype(jnp.float32))
                      + jnp.mean((fake_logits < 0).astype(jnp.float32)))
    return d_loss, dict(d_loss=d_loss, real_logit=jnp.mean(real_logits),
                        fake_logit=jnp.mean(fake_logits),
                        d_accuracy=accuracy)


def generator_objective(params_g, params_d, z, config: GANConfig):
    """``(loss, metrics)`` of the generator against a fixed discriminator."""
    fake_logits = _logits(config, params_d,
                          _require(config, "generator")(params_g, z))
    g_loss = generator_loss(fake_logits, loss_type=config.loss_type)
    return g_loss, dict(g_loss=g_loss)


def loss(params, batch, config: GANConfig, key):
    """Both players' losses at ``params`` (no update), for evaluation.

    Args:
      params: ``{"generator": ..., "discriminator": ...}``.
      batch: real data ``x [B, ...]`` or ``{"x": x}``.
      config: a :class:`GANConfig`.
      key: PRNG key for the noise (``B`` latents).

    Returns:
      ``(d_loss + g_loss, metrics)``: the sum is only a number to log (the
      players minimise different objectives); metrics ``loss, d_loss,
      g_loss, real_logit, fake_logit, d_accuracy``.
    """
    real = _data(batch)
    z = noise(key, real.shape[0], config.latent_dim)
    g, d = _split(params)
    d_loss, metrics = discriminator_objective(d, g, real, z, config)
    g_loss, g_metrics = generator_objective(g, d, z, config)
    total = d_loss + g_loss
    return total, dict(metrics, **g_metrics, loss=total)


# ---------------------------------------------------------------------------
# init / update / sample
# ---------------------------------------------------------------------------


def _split(params):
    if not isinstance(params, dict) or set(params) != set(_PARTS):
        raise ValueError("`params` must be a dict with keys 'generator' and "
                         "'discriminator'.")
    return params["generator"], params["discriminator"]


def init(params, config: GANConfig, *, key=None) -> TrainState:
    """Initial :class:`TrainState` of both players.

    Args:
      params: ``{"generator": params_g, "discriminator": params_d}``.
      config: a :class:`GANConfig` with both optimisers set.
      key: PRNG key for the noise (default ``PRNGKey(0)``).

    Returns:
      A state whose ``opt_state`` is ``{"generator": ...,
      "discriminator": ...}``.
    """
    g, d = _split(params)
    for name in ("g_optimizer", "d_optimizer"):
        if getattr(config, name) is None:
            raise ValueError(f"`config.{name}` is None: pass an optax "
                             "GradientTransformation, e.g. optax.adam(1e-3).")
    _require(config, "generator")
    _require(config, "discriminator")
    if key is None:
        key = jax.random.PRNGKey(0)
    elif jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    opt_state = dict(generator=config.g_optimizer.init(g),
                     discriminator=config.d_optimizer.init(d))
    return TrainState(params=dict(generator=g, discriminator=d),
                      opt_state=opt_state,
                      step=jnp.zeros((), jnp.int32),
                      key=jnp.asarray(key), ref_params=None,
                      config=config)


def update(state: TrainState, batch):
    """``d_steps`` discriminator steps, then one generator step.

    Args:
      state: from :func:`init`.
      batch: real data ``x [B, ...]`` or ``{"x": x}``; every discriminator
        step uses it with fresh noise, the generator step draws ``B`` more
        latents.

    Returns:
      ``(state, metrics)`` with metrics ``loss`` (``d_loss + g_loss``),
      ``d_loss, real_logit, fake_logit, d_accuracy, d_grad_norm`` (means
      over the discriminator steps), ``g_loss, g_grad_norm``.
    """
    config = state.config
    real = _data(batch)
    n = real.shape[0]
    g, d = _split(state.params)
    key, d_key, g_key = jax.random.split(state.key, 3)

    def d_step(carry, k):
        params_d, opt_d = carry
        z = noise(k, n, config.latent_dim)
        grads, metrics = jax.grad(discriminator_objective, has_aux=True)(
            params_d, g, real, z, config)
        params_d, opt_d, norm = optimizer_step(
            params_d, opt_d, grads, config.d_optimizer, config.max_grad_norm)
        return (params_d, opt_d), dict(metrics, d_grad_norm=norm)

    (d, opt_d), d_metrics = lax.scan(
        d_step, (d, state.opt_state["discriminator"]),
        jax.random.split(d_key, config.d_steps))
    d_metrics = jax.tree_util.tree_map(jnp.mean, d_metrics)
    z = noise(g_key, n, config.latent_dim)
    grads, g_metrics = jax.grad(generator_objective, has_aux=True)(
        g, d, z, config)
    g, opt_g, g_norm = optimizer_step(
        g, state.opt_state["generator"], grads, config.g_optimizer,
        config.max_grad_norm)
    metrics = dict(d_metrics, **g_metrics, g_grad_norm=g_norm,
                   loss=d_metrics["d_loss"] + g_metrics["g_loss"])
    new_state = state.replace(
        params=dict(generator=g, discriminator=d),
        opt_state=dict(generator=opt_g, discriminator=opt_d),
        step=state.step + 1, key=key)
    return new_state, metrics


def sample(params, config: GANConfig, key, *, num_samples: int) -> jax.Array:
    """``G(z)`` for ``num_samples`` latents ``z ~ N(0, I)``.

    Args:
      params: ``{"generator": ..., "discriminator": ...}`` or the
        generator's own parameters.
      config: a :class:`GANConfig` (uses ``generator`` and ``latent_dim``).
      key: PRNG key.
      num_samples: number of samples.

    Returns:
      ``[num_samples, ...]`` generated samples.
    """
    checks.check_int(num_samples, "num_samples", lo=1)
    if isinstance(params, dict) and set(params) == set(_PARTS):
        params = params["generator"]
    z = noise(key, num_samples, config.latent_dim)
    return _require(config, "generator")(params, z)
