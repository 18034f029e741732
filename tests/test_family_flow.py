"""Tests for the flow-matching family (``artifex_fn.families.flow``) and
:class:`~artifex_fn.training.trainers.flow.FlowTrainer`."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import artifex_fn as afn
from artifex_fn import toy_data
from artifex_fn.families import flow as F
from artifex_fn.families.flow import FlowConfig
from artifex_fn.training import FlowTrainer

# Compiled once: eager calls would dispatch (and compile) op by op.
gaussian_mixture_2d = jax.jit(toy_data.gaussian_mixture_2d, static_argnums=1)
mixture_coverage = jax.jit(toy_data.mixture_coverage)


def linear_apply(params, x, t):
    """``v = w * x + c * t``: the loss is computable by hand."""
    return params["w"] * x + params["c"] * t[:, None]


PARAMS = dict(w=jnp.asarray(0.5), c=jnp.asarray(-1.0))


# -- paths and the loss -------------------------------------------------------

def test_conditional_path_by_hand():
    x0 = jnp.array([[1.0, -1.0]])
    x1 = jnp.array([[3.0, 2.0]])
    x_t, u = F.conditional_path(x0, x1, jnp.array([0.25]), sigma_min=0.1)
    # (1 - 0.9 * 0.25) x0 + 0.25 x1 and x1 - 0.9 x0 (Lipman et al. 2023).
    np.testing.assert_allclose(x_t, [[0.775 + 0.75, -0.775 + 0.5]], rtol=1e-6)
    np.testing.assert_allclose(u, [[2.1, 2.9]], rtol=1e-6)
    x_t, u = F.conditional_path(x0, x1, jnp.array([1.0]))
    np.testing.assert_allclose(x_t, x1)
    np.testing.assert_allclose(u, x1 - x0)


@pytest.mark.parametrize("sigma_min", [0.0, 0.2])
def test_loss_by_hand(sigma_min):
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(4, 2)).astype(np.float32)
    x0 = rng.normal(size=(4, 2)).astype(np.float32)
    t = np.array([0.0, 0.3, 0.6, 1.0], np.float32)
    config = F.FlowConfig(sigma_min=sigma_min, apply=linear_apply)
    x_t = (1 - (1 - sigma_min) * t[:, None]) * x0 + t[:, None] * x1
    target = x1 - (1 - sigma_min) * x0
    v = 0.5 * x_t - 1.0 * t[:, None]
    want = np.mean((v - target) ** 2)
    value, metrics = jax.jit(F.loss)(PARAMS, dict(x=x1, x0=x0, t=t), config,
                                     jax.random.key(0))
    assert float(value) == pytest.approx(want, rel=1e-5)
    assert float(metrics["pair_cost"]) == pytest.approx(
        np.mean(np.sum((x1 - x0) ** 2, -1)), rel=1e-5)


def test_loss_errors():
    config = F.FlowConfig(apply=linear_apply)
    with pytest.raises(ValueError, match="apply"):
        F.loss(PARAMS, jnp.ones((2, 2)), F.FlowConfig(), jax.random.key(0))
    with pytest.raises(ValueError, match="`x0` must be like"):
        F.loss(PARAMS, dict(x=jnp.ones((2, 2)), x0=jnp.ones((3, 2))), config,
               jax.random.key(0))
    with pytest.raises(ValueError, match="returned shape"):
        F.loss(PARAMS, jnp.ones((2, 2)),
               dataclasses.replace(config, apply=lambda p, x, t: x[:, 0]),
               jax.random.key(0))


# -- minibatch optimal transport ----------------------------------------------

def test_sinkhorn_plan_has_uniform_marginals_and_near_optimal_cost():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 2)), rng.normal(size=(5, 2))
    cost = np.sum((a[:, None] - b[None]) ** 2, -1)
    cost = cost / cost.max()
    reg = 0.01
    plan = np.asarray(jax.jit(F.sinkhorn_plan, static_argnames="num_iters")(
        cost, reg=reg, num_iters=500))
    np.testing.assert_allclose(plan.sum(0), 0.2, atol=1e-3)
    np.testing.assert_allclose(plan.sum(1), 0.2, atol=1e-3)
    # Exact OT between uniform point clouds is an assignment (Birkhoff);
    # the entropic plan's cost is within reg * log(n m) of it.
    best = min(sum(cost[i, j] for i, j in enumerate(p)) / 5
               for p in itertools.permutations(range(5)))
    transport = float(np.sum(plan * cost))
    assert best - 1e-6 <= transport <= best + reg * np.log(25)


def test_ot_pairing_shortens_pairs():
    x0 = jax.random.normal(jax.random.key(0), (128, 2))
    x1 = gaussian_mixture_2d(jax.random.key(1), 128)
    idx = jax.jit(F.ot_pairing)(x0, x1, jax.random.key(2))
    assert idx.shape == (128,)
    independent = jnp.mean(jnp.sum((x1 - x0) ** 2, -1))
    paired = jnp.mean(jnp.sum((x1 - x0[idx]) ** 2, -1))
    assert float(paired) < 0.6 * float(independent)
    # Most noise points are used once: the plan is close to a permutation.
    assert len(np.unique(np.asarray(idx))) > 0.6 * 128
    config = F.FlowConfig(path="ot", apply=linear_apply)
    _, metrics = jax.jit(F.loss)(PARAMS, dict(x=x1, x0=x0), config,
                                 jax.random.key(3))
    assert float(metrics["pair_cost"]) < 0.6 * float(independent)


# -- ODE samplers -------------------------------------------------------------

def test_sample_ode_orders_of_accuracy():
    def decay(params, x, t):
        return -x

    # float64: RK4's error at 20 steps (~2e-8) is below float32's rounding
    # of the result (~3e-8), where the ratio of errors would be noise.
    errors = {}
    with jax.enable_x64(True):
        x0 = jnp.ones((2, 1), jnp.float64)
        for method in F.ODE_METHODS:
            errors[method] = [
                abs(float(F.sample_ode(decay, None, x0, num_steps=n,
                                       method=method)[0, 0]) - np.exp(-1.0))
                for n in (10, 20)]
    # Halving the step divides the error by about 2, 4 and 16.
    ratios = {m: e[0] / e[1] for m, e in errors.items()}
    assert 1.8 < ratios["euler"] < 2.2
    assert 3.6 < ratios["midpoint"] < 4.4
    assert 13.0 < ratios["rk4"] < 19.0
    assert errors["rk4"][1] < 1e-7


def test_sample_ode_time_dependence_trajectory_and_backwards():
    def field(params, x, t):  # dx/dt = 2t: x(1) = x(0) + 1
        return jnp.broadcast_to(2.0 * t[:, None], x.shape)

    x0 = jnp.zeros((3, 2))
    x1, traj = F.sample_ode(field, None, x0, num_steps=4, method="midpoint",
                            return_trajectory=True)
    np.testing.assert_allclose(x1, 1.0, rtol=1e-6)
    assert traj.shape == (5, 3, 2)
    np.testing.assert_allclose(traj[:, 0, 0], np.linspace(0, 1, 5) ** 2,
                               rtol=1e-6)
    back = F.sample_ode(field, None, x1, num_steps=4, method="midpoint",
                        t0=1.0, t1=0.0)
    np.testing.assert_allclose(back, 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="method"):
        F.sample_ode(field, None, x0, method="heun")
    with pytest.raises(ValueError, match="num_steps"):
        F.sample_ode(field, None, x0, num_steps=0)


# -- init / update ------------------------------------------------------------

def test_update_is_sgd_on_the_loss_and_vmaps():
    config = F.FlowConfig(apply=linear_apply, optimizer=optax.sgd(0.1))
    batch = dict(x=jnp.ones((4, 2)), x0=jnp.zeros((4, 2)),
                 t=jnp.array([0.1, 0.4, 0.7, 0.9]))
    grads = jax.jit(jax.grad(lambda p: F.loss(p, batch, config,
                                              jax.random.key(0))[0]))(PARAMS)
    update = jax.jit(F.update)
    state, metrics = update(F.init(PARAMS, config), batch)
    for k in PARAMS:
        assert float(state.params[k]) == pytest.approx(
            float(PARAMS[k] - 0.1 * grads[k]), rel=1e-5)
    assert set(metrics) == {"loss", "pair_cost", "grad_norm"}
    # Seeds and sigma_min values stacked on one axis: one compilation.
    keys = jax.random.split(jax.random.key(0), 3)
    sigmas = jnp.array([0.0, 0.1, 0.2])
    states = jax.jit(jax.vmap(lambda k, s: F.init(
        PARAMS, dataclasses.replace(config, sigma_min=s), key=k)))(keys,
                                                                   sigmas)
    _, metrics = jax.jit(jax.vmap(F.update, in_axes=(0, None)))(
        states, jnp.ones((8, 2)))
    assert metrics["loss"].shape == (3,)
    # Far apart, not just different after rounding to 6 decimals (where a
    # loss next to a rounding boundary could go either way).
    assert np.min(np.diff(np.sort(np.asarray(metrics["loss"])))) > 1e-4
    assert len(set(np.asarray(metrics["loss"]).round(6).tolist())) == 3


@pytest.mark.parametrize("field, value, match", [
    ("sigma_min", 1.0, "sigma_min"),
    ("sigma_min", -0.1, "sigma_min"),
    ("path", "vp", "path"),
    ("ot_reg", 0.0, "ot_reg"),
    ("ot_iters", 0, "ot_iters"),
    ("max_grad_norm", -1.0, "max_grad_norm"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        F.FlowConfig(**{field: value})


# -- the NNX trainer ----------------------------------------------------------

class Velocity(nnx.Module):
    """``v_theta(x_t, t)``: MLP on ``x_t`` and Fourier features of ``t``."""

    data_shape = (2,)

    def __init__(self, hidden=128, *, rngs):
        self.inp = nnx.Linear(2 + 8, hidden, rngs=rngs)
        self.h1 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.h2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 2, rngs=rngs)

    def __call__(self, x, t):
        freqs = jnp.pi * jnp.arange(1, 5, dtype=jnp.float32)
        tf = jnp.concatenate([jnp.sin(t[:, None] * freqs),
                              jnp.cos(t[:, None] * freqs)], -1)
        h = nnx.silu(self.inp(jnp.concatenate([x, tf], -1)))
        h = nnx.silu(self.h1(h))
        return self.out(nnx.silu(self.h2(h)))


@nnx.jit
def _velocity():
    """``Velocity`` initialised in one compiled call (not op by op)."""
    return Velocity(rngs=nnx.Rngs(0))


def _trainer(steps, lr=5e-3, **kw):
    model = _velocity()
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05))
    return FlowTrainer(model, nnx.Optimizer(model, tx, wrt=nnx.Param),
                       FlowConfig(**kw), key=0)


def test_trainer_learns_the_ring_of_gaussians():
    steps = 600
    trainer = _trainer(steps)
    data = gaussian_mixture_2d(jax.random.key(1), steps * 256).reshape(
        steps, 256, 2)
    losses = [trainer.train_step(data[i])["loss"] for i in range(steps)]
    assert np.mean(losses[-50:]) < 0.75 * np.mean(losses[:10])
    x = trainer.sample(2048, key=0, num_steps=20, method="midpoint")
    cov = mixture_coverage(x)
    assert int(cov["modes_covered"]) == 8
    assert float(cov["high_quality"]) > 0.6
    assert float(cov["mode_entropy"]) > 0.95 * np.log(8)
    x, ref = np.asarray(x), np.asarray(
        gaussian_mixture_2d(jax.random.key(2), 4096))
    np.testing.assert_allclose(np.mean(x, 0), np.mean(ref, 0), atol=0.15)
    np.testing.assert_allclose(np.cov(x.T), np.cov(ref.T), atol=0.3)


def test_trainer_loss_matches_pure_loss_and_validates():
    trainer = _trainer(10, sigma_min=0.1, path="ot", ot_iters=20)
    batch = dict(x=jnp.ones((4, 2)), x0=jnp.zeros((4, 2)),
                 t=jnp.array([0.1, 0.4, 0.7, 0.9]))
    config = dataclasses.replace(trainer.config,
                                 apply=lambda m, x, t: m(x, t))

    @nnx.jit
    def both(model):
        key = jax.random.key(0)
        return (F.loss(model, batch, config, key)[0],
                trainer.compute_loss(model, batch, key)[0])

    want, got = both(trainer.model)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    metrics = trainer.train_step(batch)
    assert set(metrics) >= {"loss", "pair_cost", "grad_norm"}
    x = trainer.sample(5, key=1, method="euler", num_steps=3)
    assert x.shape == (5, 2)
    model, opt = trainer.model, trainer.optimizer
    with pytest.raises(ValueError, match="config.apply"):
        FlowTrainer(model, opt, FlowConfig(apply=linear_apply))
    with pytest.raises(TypeError, match="FlowConfig"):
        FlowTrainer(model, opt, afn.grpo.GRPOConfig())
    with pytest.raises(ValueError, match="missing the key 'x'"):
        trainer.train_step({"y": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="method"):
        trainer.sample(2, key=0, method="heun")
