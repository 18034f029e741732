"""Conditional flow matching as pure ``init``/``update``, and ODE samplers.

A velocity field ``v_theta(x, t)`` transports noise ``x0 ~ N(0, I)`` at
``t = 0`` to data ``x1`` at ``t = 1``. Conditional flow matching (Lipman et
al. 2023) regresses it onto the velocity of a per-pair path; with the
optimal-transport path of minimum width ``sigma_min``

.. math::
    x_t = (1 - (1 - \\sigma_{min})\\, t)\\, x_0 + t\\, x_1, \\qquad
    u_t = x_1 - (1 - \\sigma_{min})\\, x_0,

and the loss ``E_{t ~ U[0,1], x0, x1} ||v_theta(x_t, t) - u_t||^2`` (here
the mean over all elements). With ``sigma_min = 0`` this is rectified flow
(Liu et al. 2023): ``x_t = (1 - t) x0 + t x1``, target ``x1 - x0``.

``path="rectified"`` pairs noise and data independently. ``path="ot"``
is OT-CFM (Tong et al. 2023): within each minibatch the noise is re-paired
with the data by an entropic optimal-transport plan (Sinkhorn iterations on
the squared-distance cost), which straightens the learned paths.

Samples solve ``dx/dt = v_theta(x, t)`` from ``t = 0`` to ``1`` with a
fixed-step Euler, midpoint or RK4 scheme (:func:`sample_ode`).
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
from artifex_fn._src.algorithms.gradients import keyed_gradient_step
from artifex_fn._src.algorithms.state import TrainState
from artifex_fn._src.algorithms.state import init_state

PATHS = ("rectified", "ot")
ODE_METHODS = ("euler", "midpoint", "rk4")


@pytree_config(static=("path", "ot_iters", "apply", "optimizer"))
class FlowConfig:
    """Hyper-parameters of (OT-)conditional flow matching.

    Attributes:
      sigma_min: width of the conditional path at ``t = 1``, in ``[0, 1)``
        (``0``: rectified flow).
      path: ``"rectified"`` (independent pairs) or ``"ot"`` (minibatch OT
        pairs, Tong et al. 2023).
      ot_reg: entropic regularisation of the OT plan, relative to the
        largest pairwise cost, ``> 0``.
      ot_iters: Sinkhorn iterations (sets the loop length), ``>= 1``.
      max_grad_norm: optional global-norm gradient clipping.
      apply: ``(params, x_t [B, ...], t float32 [B]) -> v_hat [B, ...]``.
      optimizer: an optax ``GradientTransformation``.
    """
    sigma_min: float = 0.0
    path: Literal["rectified", "ot"] = "rectified"
    ot_reg: float = 0.05
    ot_iters: int = 100
    max_grad_norm: float | None = None
    apply: Callable[..., Any] | None = None
    optimizer: optax.GradientTransformation | None = None

    def __post_init__(self):
        checks.check_hparam(self.sigma_min, "sigma_min", lo=0.0, hi=1.0,
                            hi_open=True)
        checks.check_choice(self.path, PATHS, "path")
        checks.check_hparam(self.ot_reg, "ot_reg", lo=0.0, lo_open=True)
        checks.check_int(self.ot_iters, "ot_iters", lo=1)
        checks.check_hparam(self.max_grad_norm, "max_grad_norm", lo=0.0,
                            lo_open=True, optional=True)


def _require_apply(config):
    if config.apply is None:
        raise ValueError("`config.apply` is None: pass a function "
                         "`(params, x_t, t) -> v_hat`.")
    return config.apply


def _bcast(t, like):
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def conditional_path(x0, x1, t, *, sigma_min=0.0):
    """Point and target velocity of the conditional OT path at time ``t``.

    Args:
      x0: noise ``[B, ...]``; x1: data ``[B, ...]``; t: times ``[B]``.
      sigma_min: the path's width at ``t = 1``.

    Returns:
      ``(x_t, u_t)``: ``(1 - (1 - sigma_min) t) x0 + t x1`` and
      ``x1 - (1 - sigma_min) x0`` (Lipman et al. 2023, eqs. 22-23).

    >>> x_t, u = conditional_path(jnp.zeros((1, 2)), jnp.ones((1, 2)),
    ...                           jnp.array([0.25]))
    >>> x_t, u
    (Array([[0.25, 0.25]], dtype=float32), Array([[1., 1.]], dtype=float32))
    """
    t = _bcast(jnp.asarray(t, jnp.float32), x0)
    x_t = (1.0 - (1.0 - sigma_min) * t) * x0 + t * x1
    return x_t, x1 - (1.0 - sigma_min) * x0


def sinkhorn_plan(cost, *, reg, num_iters: int):
    """Entropic OT plan ``[n, m]`` between uniform marginals (log domain).

    Solves ``min_P <P, C> - reg H(P)`` with ``P 1 = 1/n``, ``P^T 1 = 1/m``
    by ``num_iters`` Sinkhorn iterations on the dual potentials (Cuturi
    2013). ``cost`` is used as given; gradients do not flow through it.
    """
    cost = lax.stop_gradient(jnp.asarray(cost, jnp.float32))
    n, m = cost.shape
    log_k = -cost / reg
    log_a, log_b = -jnp.log(float(n)), -jnp.log(float(m))

    def body(_, fg):
        f, g = fg
        f = log_a - jax.nn.logsumexp(log_k + g[None, :], axis=1)
        g = log_b - jax.nn.logsumexp(log_k + f[:, None], axis=0)
        return f, g

    f, g = lax.fori_loop(0, num_iters, body,
                         (jnp.zeros((n,)), jnp.zeros((m,))))
    return jnp.exp(f[:, None] + log_k + g[None, :])


def ot_pairing(x0, x1, key, *, reg=0.05, num_iters: int = 100):
    """Indices ``[B]`` re-pairing noise ``x0`` with data ``x1`` by OT.

    For each data point ``j`` an index ``i`` is drawn from the column
    ``P[:, j]`` of the Sinkhorn plan of the squared-distance cost (divided
    by its maximum), as in OT-CFM (Tong et al. 2023); use
    ``x0[indices]`` as the partner of ``x1``.
    """
    a = x0.reshape(x0.shape[0], -1)
    b = x1.reshape(x1.shape[0], -1)
    cost = jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
    cost = cost / jnp.maximum(jnp.max(cost), 1e-12)
    plan = sinkhorn_plan(cost, reg=reg, num_iters=num_iters)
    logits = jnp.log(jnp.maximum(plan.T, 1e-30))
    return jax.random.categorical(key, logits, axis=-1)


def _data_of(batch):
    if isinstance(batch, dict):
        return jnp.asarray(batch_array(batch, "x"))
    return jnp.asarray(batch)


def loss(params, batch, config: FlowConfig, key):
    """Conditional flow-matching loss ``mean ||v_theta(x_t, t) - u_t||^2``.

    Args:
      params: forwarded to ``config.apply``.
      batch: data ``x1 [B, ...]``, or a dict with ``x`` and optionally
        ``x0`` (noise, like ``x``) and ``t`` (``[B]`` in ``[0, 1]``).
      config: a :class:`FlowConfig`.
      key: PRNG key for the noise, the times and the OT pairing.

    Returns:
      ``(loss, {"loss", "pair_cost"})`` where ``pair_cost`` is the mean
      squared distance ``||x1 - x0||^2`` of the (possibly OT) pairs.
    """
    apply = _require_apply(config)
    x1 = _data_of(batch)
    if x1.ndim < 1:
        raise ValueError("the batch's `x` must be [B, ...], got a scalar.")
    given = batch if isinstance(batch, dict) else {}
    k0, kt, kot = jax.random.split(key, 3)
    x0 = given.get("x0")
    x0 = (jax.random.normal(k0, x1.shape, x1.dtype) if x0 is None
          else jnp.asarray(x0))
    t = given.get("t")
    t = (jax.random.uniform(kt, x1.shape[:1]) if t is None
         else jnp.asarray(t, jnp.float32))
    if x0.shape != x1.shape or t.shape != x1.shape[:1]:
        raise ValueError(
            f"`x0` must be like `x` {tuple(x1.shape)} and `t` [B]; got "
            f"{tuple(x0.shape)} and {tuple(t.shape)}.")
    if config.path == "ot":
        x0 = x0[ot_pairing(x0, x1, kot, reg=config.ot_reg,
                           num_iters=config.ot_iters)]
    x_t, target = conditional_path(x0, x1, t, sigma_min=config.sigma_min)
    v = jnp.asarray(apply(params, x_t, t))
    if v.shape != x1.shape:
        raise ValueError(f"`apply` returned shape {tuple(v.shape)}; "
                         f"expected {tuple(x1.shape)}.")
    value = jnp.mean((v - target) ** 2)
    pair_cost = jnp.mean(jnp.sum((x1 - x0).reshape(x1.shape[0], -1) ** 2,
                                 axis=-1))
    return value, dict(loss=value, pair_cost=pair_cost)


def init(params, config: FlowConfig, *, key=None) -> TrainState:
    """Initial :class:`~artifex_fn.TrainState`."""
    return init_state(params, config, key=key)


def update(state: TrainState, batch):
    """One gradient step on :func:`loss`; returns ``(state, metrics)``.

    Metrics: ``loss``, ``pair_cost`` and ``grad_norm``.
    """
    return keyed_gradient_step(state, loss, batch)


def sample_ode(apply: Callable, params, x0, *, num_steps: int = 50,
               method: str = "midpoint", t0: float = 0.0, t1: float = 1.0,
               return_trajectory: bool = False):
    """Integrates ``dx/dt = apply(params, x, t)`` with a fixed step size.

    Args:
      apply: ``(params, x [B, ...], t float32 [B]) -> v [B, ...]``.
      params: forwarded to ``apply``.
      x0: starting points ``[B, ...]`` at time ``t0`` (noise for sampling).
      num_steps: number of steps ``N >= 1`` of size ``h = (t1 - t0) / N``.
      method: ``"euler"`` (1 evaluation per step), ``"midpoint"`` (2) or
        ``"rk4"`` (4, classical Runge-Kutta).
      t0, t1: integration interval (``t1 < t0`` integrates backwards).
      return_trajectory: also return the states ``[N+1, B, ...]``.

    Returns:
      ``x(t1)`` ``[B, ...]``, or ``(x(t1), trajectory)``.

    >>> f = lambda p, x, t: -x
    >>> x = sample_ode(f, None, jnp.ones((1, 1)), num_steps=20, method="rk4")
    >>> jnp.round(x, 4)  # exp(-1)
    Array([[0.3679]], dtype=float32)
    """
    checks.check_int(num_steps, "num_steps", lo=1)
    checks.check_choice(method, ODE_METHODS, "method")
    x0 = jnp.asarray(x0)
    b = x0.shape[0]
    h = (t1 - t0) / num_steps

    def v(x, t):
        return jnp.asarray(apply(params, x, jnp.full((b,), t, jnp.float32)))

    def step(x, t):
        if method == "euler":
            return x + h * v(x, t)
        if method == "midpoint":
            return x + h * v(x + 0.5 * h * v(x, t), t + 0.5 * h)
        k1 = v(x, t)
        k2 = v(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = v(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = v(x + h * k3, t + h)
        return x + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)

    def body(x, i):
        x = step(x, t0 + i * h)
        return x, (x if return_trajectory else None)

    x, xs = lax.scan(body, x0, jnp.arange(num_steps, dtype=jnp.float32))
    if return_trajectory:
        return x, jnp.concatenate([x0[None], xs])
    return x
