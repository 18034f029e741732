"""DDPM noise schedules, the reverse chain, and its DDPO view.

Schedule arrays are indexed by 0-based timesteps ``t = 0 .. T-1``; ``x_t``
is the sample after ``t + 1`` noising steps (Ho et al. 2020's ``t + 1``).
The reverse step from ``x_t`` is the Gaussian

.. math::
    p_\\theta(x_{t-1} | x_t) = N\\Big(\\tfrac{1}{\\sqrt{\\alpha_t}}
      \\big(x_t - \\tfrac{\\beta_t}{\\sqrt{1-\\bar\\alpha_t}}\\,
      \\epsilon_\\theta(x_t, t)\\big),\\ \\sigma_t^2 I\\Big)

with ``sigma_t^2 = beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)``
(``variance="posterior"``) or ``beta_t`` (``"beta"``). Every step, the last
one included, is a proper Gaussian (the zero posterior variance at ``t = 0``
is clipped to the one at ``t = 1``, as in Ho et al.'s code), so each has a
log-probability: the chain is the MDP of DDPO (Black et al. 2023), whose
policy at step ``t`` is :func:`step_distribution`. :func:`ddpo_batch` and
:func:`ddpo_policy` turn chains into batches and policies for
:mod:`artifex_fn.grpo` / :mod:`artifex_fn.reinforce` (one row per chain,
``T`` actions per row).
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp
from jax import lax

from artifex_fn._src import checks
from artifex_fn._src.algorithms.policies import distrax

SCHEDULES = ("linear", "cosine")
VARIANCES = ("posterior", "beta")


@chex.dataclass(frozen=True)
class NoiseSchedule:
    """The arrays ``[T]`` of a discrete noise schedule.

    Attributes:
      betas: forward-step variances ``beta_t``.
      alphas: ``1 - beta_t``.
      alpha_bars: ``abar_t = prod_{s<=t} alpha_s``.
      alpha_bars_prev: ``abar_{t-1}`` (``1`` at ``t = 0``).
      posterior_variance: ``beta_tilde_t = beta_t (1 - abar_{t-1}) /
        (1 - abar_t)``, with entry ``0`` (which is zero) set to entry ``1``.
    """
    betas: jax.Array
    alphas: jax.Array
    alpha_bars: jax.Array
    alpha_bars_prev: jax.Array
    posterior_variance: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def noise_schedule(num_timesteps: int, *, schedule: str = "linear",
                   beta_start: float = 1e-4, beta_end: float = 0.02,
                   cosine_s: float = 0.008,
                   max_beta: float = 0.999) -> NoiseSchedule:
    """Builds a DDPM noise schedule.

    * ``"linear"`` (Ho et al. 2020): ``beta_t`` evenly spaced from
      ``beta_start`` to ``beta_end`` (the paper uses ``1e-4, 0.02`` with
      ``T = 1000``; Nichol & Dhariwal scale both by ``1000 / T`` for
      shorter chains, which needs ``beta_end < 1``).
    * ``"cosine"`` (Nichol & Dhariwal 2021, eq. 17): ``abar_t = f(t) / f(0)``
      with ``f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2)``, and
      ``beta_t = min(1 - abar_t / abar_{t-1}, max_beta)``.

    Args:
      num_timesteps: ``T >= 1``.
      schedule: ``"linear"`` or ``"cosine"``.
      beta_start, beta_end: the linear schedule's end points.
      cosine_s: the cosine schedule's offset ``s``.
      max_beta: upper clip of the cosine schedule's betas.

    Returns:
      A :class:`NoiseSchedule` of float32 arrays ``[T]``.

    >>> s = noise_schedule(4, beta_start=0.1, beta_end=0.4)
    >>> [round(float(a), 4) for a in s.alpha_bars]  # cumprod(1 - beta)
    [0.9, 0.72, 0.504, 0.3024]
    """
    checks.check_int(num_timesteps, "num_timesteps", lo=1)
    checks.check_choice(schedule, SCHEDULES, "schedule")
    n = num_timesteps
    if schedule == "linear":
        betas = jnp.linspace(jnp.asarray(beta_start, jnp.float32),
                             jnp.asarray(beta_end, jnp.float32), n)
    else:
        steps = jnp.arange(n + 1, dtype=jnp.float32) / n
        f = jnp.cos((steps + cosine_s) / (1.0 + cosine_s) * jnp.pi / 2) ** 2
        abar = f / f[0]
        betas = jnp.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
    betas = betas.astype(jnp.float32)
    alphas = 1.0 - betas
    alpha_bars = jnp.cumprod(alphas)
    prev = jnp.concatenate([jnp.ones((1,), jnp.float32), alpha_bars[:-1]])
    post = betas * (1.0 - prev) / (1.0 - alpha_bars)
    post = post.at[0].set(post[1] if n > 1 else betas[0])
    return NoiseSchedule(betas=betas, alphas=alphas, alpha_bars=alpha_bars,
                         alpha_bars_prev=prev, posterior_variance=post)


def _take(arr, t, like):
    """``arr[t]`` broadcast against ``like`` (``t`` indexes leading axes)."""
    v = arr[t]
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def q_sample(x0, t, noise, schedule: NoiseSchedule):
    """Forward-process sample ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    Args:
      x0: data ``[B, ...]``; t: int timesteps ``[B]``; noise: like ``x0``.
      schedule: the :class:`NoiseSchedule`.

    Returns:
      ``x_t`` with the shape of ``x0``.
    """
    abar = _take(schedule.alpha_bars, t, x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def predict_x0(x_t, t, eps, schedule: NoiseSchedule):
    """``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
    abar = _take(schedule.alpha_bars, t, x_t)
    return (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def posterior_mean(x_t, t, eps, schedule: NoiseSchedule):
    """The reverse step's mean from a noise prediction ``eps``.

    ``mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)`` (Ho et
    al. 2020, eq. 11, with ``t`` 0-indexed); shapes as ``x_t``.
    """
    beta = _take(schedule.betas, t, x_t)
    abar = _take(schedule.alpha_bars, t, x_t)
    alpha = _take(schedule.alphas, t, x_t)
    return (x_t - beta / jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(alpha)


def step_std(t, schedule: NoiseSchedule, *, variance: str = "posterior"):
    """Reverse-step std ``sqrt(beta_tilde_t)`` or ``sqrt(beta_t)`` at ``t``."""
    checks.check_choice(variance, VARIANCES, "variance")
    table = (schedule.posterior_variance if variance == "posterior"
             else schedule.betas)
    return jnp.sqrt(table[t])


def step_distribution(apply: Callable, params, x_t, t,
                      schedule: NoiseSchedule, *,
                      variance: str = "posterior") -> distrax.Distribution:
    """The reverse step ``p_theta(x_{t-1} | x_t)`` as a distrax Gaussian.

    This is DDPO's policy (Black et al. 2023): the observation is
    ``(x_t, t)``, the action ``x_{t-1}``.

    Args:
      apply: ``(params, x [N, ...], t int32 [N]) -> eps_hat [N, ...]``.
      params: forwarded to ``apply`` unchanged.
      x_t: noisy samples ``[*batch, ...]``.
      t: int timesteps of shape ``batch`` (e.g. ``[B]`` or ``[B, T]``), or
        a scalar applied to every row of ``x_t``. The batch axes are
        flattened for ``apply``.
      schedule: the :class:`NoiseSchedule`.
      variance: ``"posterior"`` (``beta_tilde_t``) or ``"beta"``.

    Returns:
      ``Independent(Normal(mean, std))`` over the event axes of ``x_t``:
      ``log_prob`` and ``entropy`` have the batch shape.
    """
    x_t = jnp.asarray(x_t)
    t = jnp.asarray(t, jnp.int32)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, x_t.shape[:1])
    nb = t.ndim
    if x_t.shape[:nb] != t.shape:
        raise ValueError(
            f"`t` of shape {tuple(t.shape)} must match the leading axes of "
            f"`x_t`, which has shape {tuple(x_t.shape)}.")
    event = x_t.shape[nb:]
    eps = apply(params, x_t.reshape((-1,) + event), t.reshape(-1))
    eps = jnp.asarray(eps).reshape(x_t.shape)
    mean = posterior_mean(x_t, t, eps, schedule)
    std = step_std(t, schedule, variance=variance)
    std = jnp.broadcast_to(std.reshape(t.shape + (1,) * len(event)),
                           x_t.shape)
    dist = distrax.Normal(mean, std)
    return distrax.Independent(dist, len(event)) if event else dist


def chain_timesteps(num_timesteps: int) -> jax.Array:
    """The reverse chain's timesteps ``[T-1, T-2, ..., 0]`` (int32)."""
    return jnp.arange(num_timesteps - 1, -1, -1, dtype=jnp.int32)


def sample_chain(apply: Callable, params, x_T, key, schedule: NoiseSchedule,
                 *, variance: str = "posterior"):
    """Ancestral sampling of the whole reverse chain, with per-step log-probs.

    Args:
      apply: ``(params, x_t [B, ...], t [B]) -> eps_hat``.
      params: forwarded to ``apply``.
      x_T: starting noise ``[B, ...]`` (usually standard normal).
      key: PRNG key for the ``T`` steps' noise.
      schedule: the :class:`NoiseSchedule`.
      variance: ``"posterior"`` or ``"beta"`` (see :func:`step_std`).

    Returns:
      ``(x_0 [B, ...], trajectory [T+1, B, ...], log_probs [T, B])``:
      ``trajectory[k]`` is the sample after ``k`` reverse steps
      (``trajectory[0] = x_T``, ``trajectory[T] = x_0``) and ``log_probs[k]``
      the log-probability of step ``k``, taken at timestep ``T-1-k``
      (:func:`chain_timesteps`). Log-probs are differentiable in ``params``;
      stop their gradient to use them as behaviour log-probs.
    """
    x_T = jnp.asarray(x_T)
    b = x_T.shape[0]
    ts = chain_timesteps(schedule.num_timesteps)
    keys = jax.random.split(key, schedule.num_timesteps)

    def body(x, inputs):
        t, k = inputs
        dist = step_distribution(apply, params, x, jnp.full((b,), t),
                                 schedule, variance=variance)
        x_prev = lax.stop_gradient(dist.sample(seed=k))
        return x_prev, (x_prev, dist.log_prob(x_prev))

    x0, (xs, log_probs) = lax.scan(body, x_T, (ts, keys))
    return x0, jnp.concatenate([x_T[None], xs]), log_probs


def ddpo_batch(trajectory, log_probs, rewards=None):
    """A chain-per-row policy-gradient batch from :func:`sample_chain` output.

    Each chain is one sequence of ``T`` actions: row ``i``, step ``k`` has
    observation ``(x_{t}, t)`` with ``t = T-1-k`` and action ``x_{t-1}``.
    GRPO's per-token loss on such rows with a reward of the final sample is
    DDPO with group-normalised advantages (Black et al. 2023).

    Args:
      trajectory: ``[T+1, B, ...]``; log_probs: ``[T, B]``;
      rewards: optional ``[B]``.

    Returns:
      ``dict(observations={"x": [B, T, ...], "t": [B, T]}, actions
      [B, T, ...], log_probs [B, T] (gradient stopped), rewards [B])``.
    """
    trajectory, log_probs = jnp.asarray(trajectory), jnp.asarray(log_probs)
    n, b = log_probs.shape
    if trajectory.shape[:2] != (n + 1, b):
        raise ValueError(
            f"`trajectory` must be [T+1, B, ...] = [{n + 1}, {b}, ...] to "
            f"match `log_probs` [T, B]; got {tuple(trajectory.shape)}.")
    traj = jnp.swapaxes(trajectory, 0, 1)
    t = jnp.broadcast_to(chain_timesteps(n), (b, n))
    batch = dict(observations=dict(x=traj[:, :-1], t=t), actions=traj[:, 1:],
                 log_probs=lax.stop_gradient(log_probs.T))
    if rewards is not None:
        batch["rewards"] = jnp.asarray(rewards)
    return batch


def ddpo_policy(apply: Callable, schedule: NoiseSchedule, *,
                variance: str = "posterior") -> Callable:
    """``(params, {"x", "t"}) -> step distribution``: DDPO's policy.

    Plug it in as ``GRPOConfig(policy=...)`` (or REINFORCE/PPO) for
    :func:`ddpo_batch` batches.
    """
    def policy(params, observations):
        return step_distribution(apply, params, observations["x"],
                                 observations["t"], schedule,
                                 variance=variance)
    return policy


def chain_kl(apply: Callable, params, ref_params, trajectory,
             schedule: NoiseSchedule, *, variance: str = "posterior",
             ref_apply: Callable | None = None):
    """Exact per-chain ``sum_t KL(p_theta(.|x_t) || p_ref(.|x_t))`` ``[B]``.

    Both step distributions are Gaussians with the same covariance, so each
    term is ``||mu_theta - mu_ref||^2 / (2 sigma_t^2)``; summed along the
    given chains this is a single-sample estimate of the KL between the
    chains' path measures (exact in expectation over chains of ``theta``).
    """
    batch = ddpo_batch(trajectory, jnp.zeros(
        (trajectory.shape[0] - 1, trajectory.shape[1])))
    obs = batch["observations"]
    dist = step_distribution(apply, params, obs["x"], obs["t"], schedule,
                             variance=variance)
    ref = step_distribution(ref_apply or apply, ref_params, obs["x"],
                            obs["t"], schedule, variance=variance)
    return jnp.sum(dist.kl_divergence(ref), axis=-1)
