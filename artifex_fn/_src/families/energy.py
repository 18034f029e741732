"""Energy-based models trained by contrastive divergence with Langevin
negatives, as ``init``/``update``.

An energy ``E_theta(x)`` defines ``p_theta(x) ∝ exp(-E_theta(x))``. The
maximum-likelihood gradient is the difference of the energy gradient on
data and on model samples; the samples ("negatives") come from a short run
of Langevin dynamics (Du & Mordatch 2019, "Implicit Generation and
Generalization in Energy-Based Models"; Nijkamp et al. 2019, "Learning
Non-Convergent Non-Persistent Short-Run MCMC Toward Energy-Based Model"):

.. math::
    x_{k+1} = x_k - \\lambda \\nabla_x E_\\theta(x_k) + \\sigma\\,
      \\epsilon_k, \\qquad \\epsilon_k \\sim \\mathcal{N}(0, I),

started from uniform noise or, for a ``persistent`` fraction of the chains,
from a replay buffer of past negatives. With ``sigma = sqrt(2 lambda)`` the
chain targets ``p_theta`` exactly as ``lambda -> 0``; in practice ``sigma``
is set much smaller (Du & Mordatch 2019, Sec. 3.1). The loss is

.. math::
    L = \\mathbb{E}[E(x^+)] - \\mathbb{E}[E(x^-)]
      + \\alpha\\,(\\mathbb{E}[E(x^+)^2] + \\mathbb{E}[E(x^-)^2]),

the contrastive-divergence surrogate plus the energy-magnitude
regulariser of Du & Mordatch (2019, Sec. 3.3); negatives carry no gradient.

Batch: ``{"x": [B, ...]}`` (or the array itself), optionally
``"negatives": [M, ...]`` (sampled elsewhere; otherwise ``loss`` runs the
chains) and ``"buffer": [N, ...]`` (replay buffer the chains may start
from). :func:`persistent_update` also writes the new negatives back into
the buffer.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from artifex_fn._src import checks
from artifex_fn._src.algorithms.config import pytree_config
from artifex_fn._src.algorithms.gradients import keyed_gradient_step
from artifex_fn._src.algorithms.state import TrainState
from artifex_fn._src.algorithms.state import init_state


@pytree_config(static=("num_langevin_steps", "apply", "optimizer"))
class EnergyConfig:
    """Hyper-parameters of contrastive-divergence training.

    Attributes:
      num_langevin_steps: Langevin steps per chain ``K``, ``>= 1``.
      step_size: gradient step ``lambda`` of the dynamics, ``> 0``.
      noise_scale: standard deviation ``sigma`` of the injected noise,
        ``>= 0`` (``sqrt(2 * step_size)`` for exact Langevin).
      alpha: weight of the energy-magnitude regulariser, ``>= 0``.
      persistent: fraction of the chains started from the replay buffer,
        in ``[0, 1]`` (Du & Mordatch use 0.95); ``0`` is short-run MCMC
        from noise (Nijkamp et al. 2019).
      init_scale: chains from noise start uniform in
        ``[-init_scale, init_scale]``, ``> 0``.
      grad_clip: optional bound on each entry of ``grad_x E`` in the
        dynamics, ``> 0``.
      sample_clip: optional bound ``|x| <= sample_clip`` on the samples
        after every step, ``> 0``.
      max_grad_norm: optional global-norm clipping of the parameter update.
      apply: ``(params, x [B, ...]) -> energy [B]``.
      optimizer: an optax ``GradientTransformation``.
    """
    num_langevin_steps: int = 20
    step_size: float = 0.01
    noise_scale: float = 0.005
    alpha: float = 1.0
    persistent: float = 0.0
    init_scale: float = 1.0
    grad_clip: float | None = None
    sample_clip: float | None = None
    max_grad_norm: float | None = None
    apply: Callable[..., Any] | None = None
    optimizer: optax.GradientTransformation | None = None

    def __post_init__(self):
        checks.check_int(self.num_langevin_steps, "num_langevin_steps", lo=1)
        checks.check_hparam(self.step_size, "step_size", lo=0.0, lo_open=True)
        checks.check_hparam(self.noise_scale, "noise_scale", lo=0.0)
        checks.check_hparam(self.alpha, "alpha", lo=0.0)
        checks.check_hparam(self.persistent, "persistent", lo=0.0, hi=1.0)
        checks.check_hparam(self.init_scale, "init_scale", lo=0.0,
                            lo_open=True)
        for name in ("grad_clip", "sample_clip", "max_grad_norm"):
            checks.check_hparam(getattr(self, name), name, lo=0.0,
                                lo_open=True, optional=True)
        if self.apply is not None and not callable(self.apply):
            raise ValueError("`apply` must be callable (params, x) -> [B].")


def _require_apply(config: EnergyConfig) -> Callable:
    if config.apply is None:
        raise ValueError(
            "`config.apply` is None: pass a function "
            "`(params, x [B, ...]) -> energy [B]`.")
    return config.apply


def energies(apply: Callable, params, x) -> jax.Array:
    """``apply(params, x)`` checked to be one energy per row, ``[B]``."""
    e = jnp.asarray(apply(params, x))
    if e.shape == (x.shape[0], 1):
        e = e[:, 0]
    if e.shape != (x.shape[0],):
        raise ValueError(
            f"the energy function must map x {tuple(x.shape)} to energies "
            f"[{x.shape[0]}], got shape {tuple(e.shape)}.")
    return e


def langevin_sample(apply: Callable, params, x0: jax.Array, key: jax.Array,
                    *, num_steps: int, step_size: float | jax.Array,
                    noise_scale: float | jax.Array,
                    grad_clip: float | jax.Array | None = None,
                    sample_clip: float | jax.Array | None = None) -> jax.Array:
    """Runs ``num_steps`` of Langevin dynamics on ``E = apply(params, .)``.

    .. math::
        x_{k+1} = x_k - \\lambda\\, \\mathrm{clip}(\\nabla_x E(x_k))
          + \\sigma \\epsilon_k

    The rows evolve independently (the gradient of ``sum_b E(x_b)``). The
    result is wrapped in ``stop_gradient``: samples are constants of the
    contrastive-divergence loss.

    Args:
      apply: ``(params, x [B, ...]) -> energy [B]``.
      params: forwarded to ``apply`` (parameters or a model).
      x0: ``[B, ...]`` initial states.
      key: PRNG key for the noise.
      num_steps: number of steps ``K`` (a Python int).
      step_size: ``lambda``.
      noise_scale: ``sigma``.
      grad_clip: optional elementwise bound on the energy gradient.
      sample_clip: optional bound on ``|x|`` after every step.

    Returns:
      ``[B, ...]`` samples ``x_K``.
    """
    checks.check_int(num_steps, "num_steps", lo=0)
    x0 = jnp.asarray(x0)
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        raise ValueError(f"`x0` must be floating point, got {x0.dtype}.")

    def total_energy(x):
        return jnp.sum(energies(apply, params, x))

    grad_fn = jax.grad(total_energy)

    def body(k, x):
        g = grad_fn(x)
        if grad_clip is not None:
            g = jnp.clip(g, -grad_clip, grad_clip)
        noise = jax.random.normal(jax.random.fold_in(key, k), x.shape,
                                  x.dtype)
        x = x - step_size * g + noise_scale * noise
        if sample_clip is not None:
            x = jnp.clip(x, -sample_clip, sample_clip)
        return lax.stop_gradient(x)

    return lax.stop_gradient(lax.fori_loop(0, num_steps, body, x0))


def initial_samples(key: jax.Array, num_samples: int,
                    shape: tuple[int, ...], config: EnergyConfig,
                    buffer: jax.Array | None = None):
    """Chain starts ``[num_samples, *shape]``: uniform noise or
    replay-buffer draws.

    Each row independently comes from ``buffer`` (uniformly chosen entry)
    with probability ``config.persistent``, else from
    ``U[-init_scale, init_scale]``.
    """
    n = num_samples
    k_noise, k_pick, k_idx = jax.random.split(key, 3)
    noise = jax.random.uniform(k_noise, (n,) + tuple(shape), jnp.float32,
                               -1.0, 1.0) * config.init_scale
    if buffer is None:
        return noise
    buffer = jnp.asarray(buffer, noise.dtype)
    if buffer.shape[1:] != tuple(shape):
        raise ValueError(
            f"`buffer` must be [N, {', '.join(map(str, shape))}], got "
            f"{tuple(buffer.shape)}.")
    idx = jax.random.randint(k_idx, (n,), 0, buffer.shape[0])
    use = jax.random.bernoulli(k_pick, config.persistent, (n,))
    use = use.reshape((n,) + (1,) * len(shape))
    return jnp.where(use, buffer[idx], noise)


def sample_negatives(params, config: EnergyConfig, key: jax.Array,
                     num_samples: int, shape: tuple[int, ...], *,
                     buffer: jax.Array | None = None,
                     num_steps: int | None = None) -> jax.Array:
    """``num_samples`` Langevin samples ``[num_samples, *shape]`` of the
    model (no gradient).

    Chains start from :func:`initial_samples` and run
    ``num_steps`` (default ``config.num_langevin_steps``) steps.
    """
    apply = _require_apply(config)
    k_init, k_run = jax.random.split(key)
    x0 = initial_samples(k_init, num_samples, shape, config, buffer)
    return langevin_sample(
        apply, params, x0, k_run,
        num_steps=config.num_langevin_steps if num_steps is None
        else num_steps,
        step_size=config.step_size, noise_scale=config.noise_scale,
        grad_clip=config.grad_clip, sample_clip=config.sample_clip)


def contrastive_divergence_loss(pos_energy: jax.Array, neg_energy: jax.Array,
                                *, alpha: float | jax.Array = 1.0):
    """CD loss with the energy-magnitude regulariser of Du & Mordatch (2019).

    .. math::
        L = \\bar E^+ - \\bar E^- + \\alpha(\\overline{(E^+)^2}
          + \\overline{(E^-)^2})

    Args:
      pos_energy: ``[B]`` energies of data.
      neg_energy: ``[M]`` energies of model samples.
      alpha: regulariser weight.

    Returns:
      ``(loss, cd_term, reg_term)`` scalars.
    """
    pos = jnp.asarray(pos_energy, jnp.float32)
    neg = jnp.asarray(neg_energy, jnp.float32)
    cd = jnp.mean(pos) - jnp.mean(neg)
    reg = jnp.mean(pos ** 2) + jnp.mean(neg ** 2)
    return cd + alpha * reg, cd, reg


def positives_of(batch) -> jax.Array:
    """The data ``x [B, ...]`` of a batch (``batch["x"]`` or the array)."""
    x = batch.get("x") if isinstance(batch, dict) else batch
    if x is None:
        raise ValueError("batch is missing the key 'x' (data [B, ...]).")
    x = jnp.asarray(x)
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"`x` must be floating data [B, ...], got {x.dtype}"
            f"{list(x.shape)}.")
    return x


def loss(params, batch, config: EnergyConfig, key: jax.Array):
    """Contrastive-divergence loss; returns ``(loss, metrics)``.

    Negatives are ``batch["negatives"]`` when given, else ``B`` fresh
    Langevin samples (chains started from noise or ``batch["buffer"]``).

    Metrics: ``loss, cd_loss, reg_loss, energy_pos, energy_neg,
    energy_gap`` (``energy_neg - energy_pos``; positive when data has the
    lower energy).
    """
    apply = _require_apply(config)
    x = positives_of(batch)
    neg = batch.get("negatives") if isinstance(batch, dict) else None
    if neg is None:
        buffer = batch.get("buffer") if isinstance(batch, dict) else None
        neg = sample_negatives(lax.stop_gradient(params), config, key,
                               x.shape[0], x.shape[1:], buffer=buffer)
    neg = lax.stop_gradient(jnp.asarray(neg, x.dtype))
    if neg.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"`negatives` must be [M, {', '.join(map(str, x.shape[1:]))}], "
            f"got {tuple(neg.shape)}.")
    pos_e = energies(apply, params, x)
    neg_e = energies(apply, params, neg)
    total, cd, reg = contrastive_divergence_loss(pos_e, neg_e,
                                                 alpha=config.alpha)
    metrics = dict(loss=total, cd_loss=cd, reg_loss=reg,
                   energy_pos=lax.stop_gradient(jnp.mean(pos_e)),
                   energy_neg=lax.stop_gradient(jnp.mean(neg_e)),
                   energy_gap=lax.stop_gradient(jnp.mean(neg_e)
                                                - jnp.mean(pos_e)))
    return total, metrics


def init(params, config: EnergyConfig, *, key=None) -> TrainState:
    """Initial :class:`~artifex_fn.TrainState` (validates the optimizer)."""
    _require_apply(config)
    return init_state(params, config, key=key)


def update(state: TrainState, batch):
    """One CD gradient step (fresh negatives unless the batch has them)."""
    return keyed_gradient_step(state, loss, batch)


def push_to_buffer(buffer: jax.Array, samples: jax.Array, key: jax.Array):
    """Writes ``samples [M, ...]`` over ``M`` random entries of ``buffer``.

    ``M`` must not exceed the buffer size ``N``; the overwritten entries
    are distinct.
    """
    n, m = buffer.shape[0], samples.shape[0]
    if m > n or buffer.shape[1:] != samples.shape[1:]:
        raise ValueError(
            f"cannot push samples {tuple(samples.shape)} into a buffer "
            f"{tuple(buffer.shape)}: need matching trailing axes and M <= N.")
    idx = jax.random.permutation(key, n)[:m]
    return buffer.at[idx].set(samples.astype(buffer.dtype))


def persistent_update(state: TrainState, batch, buffer: jax.Array):
    """Update with a replay buffer of negatives (Du & Mordatch 2019).

    Samples ``B`` negatives with chains started from ``buffer`` (fraction
    ``config.persistent``) or noise, takes one CD step on them, and writes
    them back into the buffer.

    Returns:
      ``(state, buffer, metrics)``.
    """
    config = state.config
    x = positives_of(batch)
    key, k_neg, k_push = jax.random.split(state.key, 3)
    neg = sample_negatives(state.params, config, k_neg, x.shape[0],
                           x.shape[1:], buffer=buffer)
    batch = dict(batch if isinstance(batch, dict) else {}, x=x, negatives=neg)
    batch.pop("buffer", None)
    state, metrics = update(state.replace(key=key), batch)
    return state, push_to_buffer(buffer, neg, k_push), metrics
