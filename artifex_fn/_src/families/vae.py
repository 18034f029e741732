"""Variational autoencoders (Kingma & Welling 2014) as ``init``/``update``.

The loss is the negative evidence lower bound with the reparameterised
Gaussian posterior ``q(z|x) = N(mu(x), diag(sigma^2(x)))`` and the standard
normal prior:

.. math::
    -\\mathrm{ELBO}(x) = \\mathbb{E}_{q(z|x)}[-\\log p(x|z)]
      + \\mathrm{KL}(q(z|x) \\,\\|\\, \\mathcal{N}(0, I)),

estimated with one sample ``z = mu + sigma * eps``, ``eps ~ N(0, I)``.
Training minimises ``reconstruction + w_t * KL'`` where ``w_t`` warms up
linearly from 0 to ``beta`` (beta-VAE, Higgins et al. 2017; KL annealing,
Bowman et al. 2016) and ``KL'`` optionally floors each latent dimension's
batch-mean KL at ``free_bits`` (Kingma et al. 2016).

The model enters only through ``config.encode(params, x) -> (mean,
log_var)`` and ``config.decode(params, z) -> logits | mean``; ``params``
is forwarded untouched, so it may be a pytree of arrays or a Flax NNX
module.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax

from artifex_fn._src import checks
from artifex_fn._src.algorithms.batching import batch_array
from artifex_fn._src.algorithms.config import pytree_config
from artifex_fn._src.algorithms.gradients import keyed_gradient_step
from artifex_fn._src.algorithms.state import TrainState
from artifex_fn._src.algorithms.state import init_state

_LIKELIHOODS = ("bernoulli", "gaussian")


@pytree_config(static=("likelihood", "encode", "decode",
                       "optimizer"))
class VAEConfig:
    """Hyper-parameters and model functions of a VAE.

    Attributes:
      beta: final weight of the KL term, ``>= 0`` (1: the ELBO; beta-VAE,
        Higgins et al. 2017, for other values).
      kl_anneal_steps: the KL weight rises linearly from 0 to ``beta`` over
        this many updates (Bowman et al. 2016); 0 disables the warm-up.
      free_bits: floor ``lambda >= 0`` on each latent dimension's
        batch-mean KL (Kingma et al. 2016); 0 disables it.
      likelihood: ``"bernoulli"`` (``decode`` returns logits, targets in
        ``[0, 1]``) or ``"gaussian"`` (``decode`` returns the mean; fixed
        observation std ``obs_std``).
      obs_std: standard deviation of the Gaussian likelihood, ``> 0``.
      max_grad_norm: optional global-norm gradient clipping.
      encode: ``(params, x [B, ...]) -> (mean [B, D], log_var [B, D])``.
      decode: ``(params, z [B, D]) -> [B, ...]`` logits or means.
      optimizer: an optax ``GradientTransformation``.
    """
    beta: float = 1.0
    kl_anneal_steps: int = 0
    free_bits: float = 0.0
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    obs_std: float = 1.0
    max_grad_norm: float | None = None
    encode: Callable[..., Any] | None = None
    decode: Callable[..., Any] | None = None
    optimizer: optax.GradientTransformation | None = None

    def __post_init__(self):
        checks.check_hparam(self.beta, "beta", lo=0.0)
        checks.check_hparam(self.kl_anneal_steps, "kl_anneal_steps", lo=0.0)
        if isinstance(self.kl_anneal_steps, float) and not (
                self.kl_anneal_steps.is_integer()):
            raise ValueError("`kl_anneal_steps` must be a whole number of "
                             f"steps, got {self.kl_anneal_steps!r}.")
        checks.check_hparam(self.free_bits, "free_bits", lo=0.0)
        checks.check_hparam(self.obs_std, "obs_std", lo=0.0, lo_open=True)
        checks.check_hparam(self.max_grad_norm, "max_grad_norm", lo=0.0,
                            lo_open=True, optional=True)
        checks.check_choice(self.likelihood, _LIKELIHOODS, "likelihood")
        for name in ("encode", "decode"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise ValueError(f"`{name}` must be callable or None.")


# ---------------------------------------------------------------------------
# The pieces of the ELBO
# ---------------------------------------------------------------------------


def gaussian_kl(mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """Per-dimension ``KL(N(mean, exp(log_var)) || N(0, 1))``.

    .. math::
        \\mathrm{KL}_j = \\tfrac12 (\\mu_j^2 + \\sigma_j^2 - 1
          - \\log \\sigma_j^2)

    (Kingma & Welling 2014, appendix B).

    Args:
      mean: ``[..., D]`` posterior means.
      log_var: ``[..., D]`` posterior log-variances.

    Returns:
      ``[..., D]`` KL divergences (sum over the last axis for the total).
    """
    mean, log_var = jnp.asarray(mean), jnp.asarray(log_var)
    if mean.shape != log_var.shape:
        raise ValueError(f"`mean` {tuple(mean.shape)} and `log_var` "
                         f"{tuple(log_var.shape)} must have the same shape.")
    return 0.5 * (jnp.square(mean) + jnp.exp(log_var) - 1.0 - log_var)


def free_bits_kl(kl_per_dim: jax.Array, free_bits) -> jax.Array:
    """KL term with a per-dimension floor (Kingma et al. 2016, eq. 15).

    .. math::
        \\tilde{\\mathrm{KL}} = \\sum_j \\max(\\lambda,
          \\mathbb{E}_{x \\in \\text{batch}}[\\mathrm{KL}_j(x)])

    With ``lambda = 0`` this is the batch-mean KL. Dimensions whose mean KL
    is below ``lambda`` get no gradient, so the encoder can use them
    without paying for the first ``lambda`` nats.

    Args:
      kl_per_dim: ``[B, D]`` per-example, per-dimension KL.
      free_bits: the floor ``lambda >= 0`` (scalar).

    Returns:
      Scalar clamped KL.
    """
    kl_per_dim = jnp.asarray(kl_per_dim)
    if kl_per_dim.ndim != 2:
        raise ValueError("`kl_per_dim` must be [B, D], got shape "
                         f"{tuple(kl_per_dim.shape)}.")
    return jnp.sum(jnp.maximum(jnp.mean(kl_per_dim, axis=0), free_bits))


def kl_weight(step, *, beta, kl_anneal_steps) -> jax.Array:
    """Linearly annealed KL weight ``beta * min(1, step / kl_anneal_steps)``.

    Step 0 has weight 0; ``kl_anneal_steps = 0`` gives ``beta`` at every
    step (Bowman et al. 2016).

    Args:
      step: number of updates applied so far (scalar, may be traced).
      beta: final weight.
      kl_anneal_steps: length of the warm-up.

    Returns:
      Scalar float32 weight.
    """
    step = jnp.asarray(step, jnp.float32)
    n = jnp.asarray(kl_anneal_steps, jnp.float32)
    frac = jnp.where(n > 0, jnp.clip(step / jnp.maximum(n, 1.0), 0.0, 1.0),
                     1.0)
    return jnp.asarray(beta, jnp.float32) * frac


def reconstruction_loss(outputs: jax.Array, x: jax.Array, *,
                        likelihood: str = "bernoulli",
                        obs_std=1.0) -> jax.Array:
    """Per-example negative log-likelihood ``-log p(x|z)``, summed over pixels.

    Bernoulli (``outputs`` are logits, ``x`` in ``[0, 1]``):
    ``sum_i softplus(l_i) - x_i l_i``. Gaussian (``outputs`` are means):
    ``sum_i (x_i - m_i)^2 / (2 s^2) + log(s) + log(2 pi) / 2``.

    Args:
      outputs: ``[B, ...]`` decoder outputs.
      x: ``[B, ...]`` data of the same shape.
      likelihood: ``"bernoulli"`` or ``"gaussian"``.
      obs_std: Gaussian observation std ``s``.

    Returns:
      ``[B]`` negative log-likelihoods.
    """
    outputs, x = jnp.asarray(outputs), jnp.asarray(x, jnp.float32)
    if outputs.shape != x.shape:
        raise ValueError(f"the decoder returned shape {tuple(outputs.shape)}; "
                         f"expected the data's shape {tuple(x.shape)}.")
    if likelihood == "bernoulli":
        nll = optax.sigmoid_binary_cross_entropy(outputs, x)
    elif likelihood == "gaussian":
        s = jnp.asarray(obs_std, jnp.float32)
        nll = (jnp.square(x - outputs) / (2.0 * s ** 2) + jnp.log(s)
               + 0.5 * jnp.log(2.0 * jnp.pi))
    else:
        raise ValueError(f"`likelihood` must be one of {_LIKELIHOODS}, got "
                         f"{likelihood!r}.")
    return jnp.sum(nll.reshape(nll.shape[0], -1), axis=-1)


def reparameterize(key, mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """``z = mean + exp(log_var / 2) * eps`` with ``eps ~ N(0, I)``.

    Args:
      key: PRNG key.
      mean, log_var: ``[B, D]`` posterior parameters.

    Returns:
      ``[B, D]`` latents, differentiable in ``mean`` and ``log_var``.
    """
    eps = jax.random.normal(key, jnp.shape(mean), jnp.result_type(mean))
    return mean + jnp.exp(0.5 * log_var) * eps


def output_mean(outputs: jax.Array, likelihood: str = "bernoulli"):
    """The decoder's mean ``E[x|z]``: sigmoid of logits, or the mean itself."""
    return jax.nn.sigmoid(outputs) if likelihood == "bernoulli" else outputs


# ---------------------------------------------------------------------------
# Loss, init, update, samplers
# ---------------------------------------------------------------------------


def _data(batch):
    if isinstance(batch, dict):
        return jnp.asarray(batch_array(batch, "x"))
    return jnp.asarray(batch)


def _require(config, name):
    fn = getattr(config, name)
    if fn is None:
        raise ValueError(f"`config.{name}` is None: pass a function "
                         + ("`(params, x) -> (mean, log_var)`."
                            if name == "encode" else
                            "`(params, z) -> logits or mean`."))
    return fn


def _encode(params, x, config):
    out = _require(config, "encode")(params, x)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError("`config.encode` must return (mean, log_var).")
    mean, log_var = jnp.asarray(out[0]), jnp.asarray(out[1])
    if mean.ndim != 2 or mean.shape != log_var.shape or (
            mean.shape[0] != x.shape[0]):
        raise ValueError(
            f"`config.encode` must return mean and log_var of shape [B, D] "
            f"with B={x.shape[0]}; got {tuple(mean.shape)} and "
            f"{tuple(log_var.shape)}.")
    return mean, log_var


def loss(params, batch, config: VAEConfig, key, *, step=None):
    """Negative ELBO with annealed, optionally floored KL.

    .. math::
        L = \\frac1B \\sum_b -\\log p(x_b|z_b) + w_t \\tilde{\\mathrm{KL}}

    Args:
      params: model parameters, forwarded to ``config.encode/decode``.
      batch: data ``x [B, ...]`` or a dict with ``"x"``.
      config: a :class:`VAEConfig`.
      key: PRNG key for the reparameterisation noise.
      step: update count for the KL warm-up (None: the full weight
        ``beta``).

    Returns:
      ``(loss, metrics)``; metrics ``loss, reconstruction_loss`` (batch
      mean of ``-log p(x|z)``), ``kl`` (batch mean of the total KL, before
      the floor), ``kl_weight`` and ``elbo`` (``-(reconstruction_loss +
      kl)``, the unweighted bound per example).
    """
    x = _data(batch)
    mean, log_var = _encode(params, x, config)
    z = reparameterize(key, mean, log_var)
    outputs = _require(config, "decode")(params, z)
    rec = jnp.mean(reconstruction_loss(outputs, x,
                                       likelihood=config.likelihood,
                                       obs_std=config.obs_std))
    kl_dims = gaussian_kl(mean, log_var)
    kl = jnp.mean(jnp.sum(kl_dims, axis=-1))
    kl_term = free_bits_kl(kl_dims, config.free_bits)
    if step is None:
        weight = jnp.asarray(config.beta, jnp.float32)
    else:
        weight = kl_weight(step, beta=config.beta,
                           kl_anneal_steps=config.kl_anneal_steps)
    total = rec + weight * kl_term
    return total, dict(loss=total, reconstruction_loss=rec, kl=kl,
                       kl_weight=weight, elbo=-(rec + kl))


def init(params, config: VAEConfig, *, key=None) -> TrainState:
    """Initial :class:`TrainState`: parameters, optimiser state, step 0, key."""
    _require(config, "encode")
    _require(config, "decode")
    return init_state(params, config, key=key)


def update(state: TrainState, batch):
    """One gradient step on the negative ELBO; returns ``(state, metrics)``.

    The KL weight uses ``state.step`` (see :func:`kl_weight`); metrics are
    those of :func:`loss` plus ``grad_norm``.
    """
    return keyed_gradient_step(
        state, functools.partial(loss, step=state.step), batch)


def reconstruct(params, x, config: VAEConfig, key=None) -> jax.Array:
    """Decoder mean of the encoding of ``x`` (``[B, ...]``).

    Uses the posterior mean latent when ``key`` is None, else one sample.
    """
    x = jnp.asarray(x)
    mean, log_var = _encode(params, x, config)
    z = mean if key is None else reparameterize(key, mean, log_var)
    return output_mean(_require(config, "decode")(params, z),
                       config.likelihood)


def sample(params, config: VAEConfig, key, *, num_samples: int,
           latent_dim: int) -> jax.Array:
    """Decoder means of ``num_samples`` latents from the prior ``N(0, I)``.

    Returns ``[num_samples, ...]`` (the decoder's output shape).
    """
    checks.check_int(num_samples, "num_samples", lo=1)
    checks.check_int(latent_dim, "latent_dim", lo=1)
    z = jax.random.normal(key, (num_samples, latent_dim))
    return output_mean(_require(config, "decode")(params, z),
                       config.likelihood)
