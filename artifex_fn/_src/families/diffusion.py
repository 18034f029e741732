"""Denoising diffusion (DDPM, Ho et al. 2020) as pure ``init``/``update``.

The forward process adds Gaussian noise over ``T`` steps with variances
``beta_t``; with ``alpha_t = 1 - beta_t`` and ``abar_t = prod_{s<=t}
alpha_s`` it has the closed form

.. math::
    x_t = \\sqrt{\\bar\\alpha_t}\\, x_0 + \\sqrt{1-\\bar\\alpha_t}\\,\\epsilon,
    \\qquad \\epsilon \\sim N(0, I).

A network ``eps_theta(x_t, t)`` is trained with the "simple" loss
``E_{t, x_0, eps} ||eps - eps_theta(x_t, t)||^2`` (Ho et al. 2020, eq. 14;
here the mean over all elements). Schedules, the reverse chain (one
``distrax`` Gaussian per step) and the DDPO view of it (Black et al. 2023)
are in :mod:`artifex_fn._src.families.diffusion_sampling`; they are
re-exported with this module's names by :mod:`artifex_fn.families.diffusion`.

The training state is a :class:`DiffusionState`: a ``TrainState`` whose
extra field ``ema_params`` holds the exponential moving average of the
parameters, updated after every optimiser step (sample from it).
``ref_params`` is left ``None``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import chex
import jax
import jax.numpy as jnp
import optax

from artifex_fn._src import checks
from artifex_fn._src.algorithms.batching import batch_array
from artifex_fn._src.algorithms.config import pytree_config
from artifex_fn._src.algorithms.gradients import keyed_gradient_step
from artifex_fn._src.algorithms.state import TrainState
from artifex_fn._src.algorithms.state import init_state
from artifex_fn._src.families.diffusion_sampling import NoiseSchedule
from artifex_fn._src.families.diffusion_sampling import SCHEDULES
from artifex_fn._src.families.diffusion_sampling import noise_schedule
from artifex_fn._src.families.diffusion_sampling import q_sample


@pytree_config(static=("num_timesteps", "schedule", "apply",
                       "optimizer"))
class DiffusionConfig:
    """Hyper-parameters of DDPM training.

    Attributes:
      num_timesteps: number of diffusion steps ``T`` (sets shapes).
      schedule: ``"linear"`` or ``"cosine"`` (see :func:`noise_schedule`).
      beta_start, beta_end: the linear schedule's end points, in ``(0, 1)``.
      cosine_s: the cosine schedule's offset, ``>= 0``.
      max_beta: upper clip of the cosine schedule's betas, in ``(0, 1)``.
        Nichol & Dhariwal use ``0.999``; for short chains a lower clip
        (e.g. ``0.5``) bounds the reverse step's gain ``1 / sqrt(alpha_t)``
        at the cost of a little signal left in ``x_T``.
      ema_decay: decay of the parameters' moving average, in ``[0, 1]``.
      max_grad_norm: optional global-norm gradient clipping.
      apply: ``(params, x_t [B, ...], t int32 [B]) -> eps_hat [B, ...]``.
      optimizer: an optax ``GradientTransformation``.
    """
    num_timesteps: int = 1000
    schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008
    max_beta: float = 0.999
    ema_decay: float = 0.999
    max_grad_norm: float | None = None
    apply: Callable[..., Any] | None = None
    optimizer: optax.GradientTransformation | None = None

    def __post_init__(self):
        checks.check_int(self.num_timesteps, "num_timesteps", lo=1)
        checks.check_choice(self.schedule, SCHEDULES, "schedule")
        checks.check_hparam(self.beta_start, "beta_start", lo=0.0, hi=1.0,
                            lo_open=True, hi_open=True)
        checks.check_hparam(self.beta_end, "beta_end", lo=0.0, hi=1.0,
                            lo_open=True, hi_open=True)
        if (isinstance(self.beta_start, (int, float))
                and isinstance(self.beta_end, (int, float))
                and self.beta_start > self.beta_end):
            raise ValueError(
                f"`beta_start` ({self.beta_start}) must be <= `beta_end` "
                f"({self.beta_end}).")
        checks.check_hparam(self.cosine_s, "cosine_s", lo=0.0)
        checks.check_hparam(self.max_beta, "max_beta", lo=0.0, hi=1.0,
                            lo_open=True, hi_open=True)
        checks.check_hparam(self.ema_decay, "ema_decay", lo=0.0, hi=1.0)
        checks.check_hparam(self.max_grad_norm, "max_grad_norm", lo=0.0,
                            lo_open=True, optional=True)


@chex.dataclass(frozen=True)
class DiffusionState(TrainState):
    """A ``TrainState`` plus ``ema_params``, the parameters' moving average."""
    ema_params: Any = None


def schedule_of(config: DiffusionConfig) -> NoiseSchedule:
    """The :class:`NoiseSchedule` a config describes."""
    return noise_schedule(config.num_timesteps, schedule=config.schedule,
                          beta_start=config.beta_start,
                          beta_end=config.beta_end, cosine_s=config.cosine_s,
                          max_beta=config.max_beta)


def _require_apply(config):
    if config.apply is None:
        raise ValueError("`config.apply` is None: pass a function "
                         "`(params, x_t, t) -> eps_hat`.")
    return config.apply


def _data_of(batch):
    if isinstance(batch, dict):
        return jnp.asarray(batch_array(batch, "x"))
    return jnp.asarray(batch)


def loss(params, batch, config: DiffusionConfig, key):
    """Noise-prediction loss ``mean ||eps - eps_theta(x_t, t)||^2``.

    DDPM's simple objective (Ho et al. 2020, eq. 14) with
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, ``t ~ U{0..T-1}``.

    Args:
      params: forwarded to ``config.apply``.
      batch: data ``x0 [B, ...]``, or a dict with ``x`` and optionally
        ``t`` (int ``[B]``) and ``noise`` (like ``x``) to fix the randomness.
      config: a :class:`DiffusionConfig`.
      key: PRNG key for ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)``.

    Returns:
      ``(loss, {"loss"})``: the mean over all elements.
    """
    apply = _require_apply(config)
    x0 = _data_of(batch)
    if x0.ndim < 1:
        raise ValueError("the batch's `x` must be [B, ...], got a scalar.")
    schedule = schedule_of(config)
    k_t, k_n = jax.random.split(key)
    given = batch if isinstance(batch, dict) else {}
    t = given.get("t")
    t = (jax.random.randint(k_t, x0.shape[:1], 0, config.num_timesteps)
         if t is None else jnp.asarray(t, jnp.int32))
    noise = given.get("noise")
    noise = (jax.random.normal(k_n, x0.shape, x0.dtype) if noise is None
             else jnp.asarray(noise))
    if t.shape != x0.shape[:1] or noise.shape != x0.shape:
        raise ValueError(
            f"`t` must be [B] and `noise` like `x` {tuple(x0.shape)}; got "
            f"{tuple(t.shape)} and {tuple(noise.shape)}.")
    eps_hat = jnp.asarray(apply(params, q_sample(x0, t, noise, schedule), t))
    if eps_hat.shape != x0.shape:
        raise ValueError(f"`apply` returned shape {tuple(eps_hat.shape)}; "
                         f"expected {tuple(x0.shape)}.")
    value = jnp.mean((noise - eps_hat) ** 2)
    return value, dict(loss=value)


def ema_decay_at(ema_decay, step):
    """Decay used at update ``step``: ``min(ema_decay, (1+n) / (10+n))``.

    The warm-up (as in ``tf.train.ExponentialMovingAverage``) keeps early
    averages from being dominated by the initial parameters.
    """
    n = jnp.asarray(step, jnp.float32)
    return jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))


def ema_update(ema_params, params, ema_decay):
    """``ema_decay * ema + (1 - ema_decay) * params``, leaf by leaf."""
    return jax.tree_util.tree_map(
        lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema_params,
        params)


def init(params, config: DiffusionConfig, *, key=None) -> DiffusionState:
    """Initial :class:`DiffusionState`; ``ema_params`` starts at ``params``."""
    state = init_state(params, config, key=key)
    return DiffusionState(**{f: getattr(state, f) for f in (
        "params", "opt_state", "step", "key", "ref_params", "config")},
        ema_params=params)


def update(state: DiffusionState, batch):
    """One gradient step on :func:`loss`, then the EMA update.

    Returns ``(state, metrics)`` with ``loss``, ``grad_norm`` and
    ``ema_decay`` (the decay used, see :func:`ema_decay_at`).
    """
    decay = ema_decay_at(state.config.ema_decay, state.step)
    state, metrics = keyed_gradient_step(state, loss, batch)
    ema = ema_update(state.ema_params, state.params, decay)
    return state.replace(ema_params=ema), dict(metrics, ema_decay=decay)
