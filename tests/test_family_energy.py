"""Energy-based models: CD loss, Langevin dynamics, learning a 2-D mixture."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_fn.families import energy
from artifex_fn import toy_data
from artifex_fn.training import EnergyTrainer


# Compiled once: eager toy-data calls dispatch (and compile) op by op.
gaussian_mixture_2d = jax.jit(toy_data.gaussian_mixture_2d, static_argnums=1,
                              static_argnames="num_modes")
mixture_coverage = jax.jit(toy_data.mixture_coverage)


def linear_energy(params, x):
    return x @ params["w"] + params["b"]


def quadratic_energy(params, x):
    """``0.5 (x - mu)^T diag(1 / var) (x - mu)``: target N(mu, diag(var))."""
    return 0.5 * jnp.sum((x - params["mu"]) ** 2 / params["var"], axis=-1)


def test_cd_loss_matches_hand_computation():
    params = dict(w=jnp.array([1.0, -2.0]), b=jnp.array(0.5))
    x = jnp.array([[1.0, 0.0], [0.0, 1.0]])      # energies 1.5, -1.5
    neg = jnp.array([[2.0, 1.0], [0.0, 0.0], [-1.0, 0.0]])  # 0.5, 0.5, -0.5
    cfg = energy.EnergyConfig(alpha=0.25, apply=linear_energy)
    loss, m = energy.loss(params, dict(x=x, negatives=neg), cfg,
                          jax.random.key(0))
    pos_mean, neg_mean = 0.0, 0.5 / 3
    reg = (1.5 ** 2 + 1.5 ** 2) / 2 + (0.25 + 0.25 + 0.25) / 3
    expected = pos_mean - neg_mean + 0.25 * reg
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(m["cd_loss"], pos_mean - neg_mean, rtol=1e-6)
    np.testing.assert_allclose(m["reg_loss"], reg, rtol=1e-6)
    np.testing.assert_allclose(m["energy_gap"], neg_mean - pos_mean, rtol=1e-6)
    # Negatives carry no gradient: d loss / d b = 1 - 1 + alpha * 2 mean(E).
    grads = jax.grad(lambda p: energy.loss(p, dict(x=x, negatives=neg), cfg,
                                           jax.random.key(0))[0])(params)
    np.testing.assert_allclose(
        grads["b"], 0.25 * (2 * 0.0 + 2 * neg_mean), rtol=1e-6)


def test_langevin_on_quadratic_energy_reaches_gaussian_moments():
    mu, var, h = jnp.array([1.0, -2.0]), jnp.array([0.5, 2.0]), 0.05
    params = dict(mu=mu, var=var)
    x0 = jax.random.uniform(jax.random.key(0), (4000, 2), minval=-4,
                            maxval=4)
    x = jax.jit(lambda p, x0, k: energy.langevin_sample(
        quadratic_energy, p, x0, k, num_steps=600, step_size=h,
        noise_scale=jnp.sqrt(2 * h)))(params, x0, jax.random.key(1))
    # The discretised chain is an AR(1) process with stationary variance
    # var / (1 - h / (2 var)); its mean is exact.
    np.testing.assert_allclose(x.mean(0), mu, atol=0.08)
    np.testing.assert_allclose(x.var(0), var / (1 - h / (2 * var)),
                               rtol=0.08)
    # Without noise the chain descends to the minimum.
    x = energy.langevin_sample(quadratic_energy, params, x0,
                               jax.random.key(1), num_steps=600,
                               step_size=h, noise_scale=0.0)
    np.testing.assert_allclose(x, jnp.broadcast_to(mu, x.shape), atol=1e-4)


def test_langevin_clips_and_stops_gradients():
    params = dict(w=jnp.array([100.0, -100.0]), b=jnp.array(0.0))
    x0 = jnp.zeros((3, 2))
    x = energy.langevin_sample(linear_energy, params, x0, jax.random.key(0),
                               num_steps=5, step_size=0.1, noise_scale=0.0,
                               grad_clip=1.0, sample_clip=0.3)
    np.testing.assert_allclose(x, jnp.tile(jnp.array([-0.3, 0.3]), (3, 1)))
    g = jax.grad(lambda p: jnp.sum(energy.langevin_sample(
        linear_energy, p, x0, jax.random.key(0), num_steps=3,
        step_size=0.1, noise_scale=0.0)))(params)
    assert float(jnp.abs(g["w"]).sum()) == 0.0


def test_initial_samples_mix_buffer_and_noise():
    cfg = energy.EnergyConfig(persistent=0.75, init_scale=2.0)
    buffer = jnp.full((10, 3), 7.0)
    x = jax.jit(energy.initial_samples, static_argnums=(1, 2))(
        jax.random.key(0), 4000, (3,), cfg, buffer)
    from_buffer = np.all(np.asarray(x) == 7.0, axis=1)
    assert abs(from_buffer.mean() - 0.75) < 0.03
    assert np.abs(np.asarray(x)[~from_buffer]).max() <= 2.0
    pushed = energy.push_to_buffer(buffer, jnp.zeros((4, 3)),
                                   jax.random.key(1))
    assert int(jnp.sum(jnp.all(pushed == 0.0, axis=1))) == 4


def _mlp_params(key, hidden=32):
    k1, k2 = jax.random.split(key)
    return dict(w1=jax.random.normal(k1, (2, hidden)) * 0.5,
                b1=jnp.zeros(hidden),
                w2=jax.random.normal(k2, (hidden,)) / jnp.sqrt(hidden))


def mlp_energy(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


CFG = energy.EnergyConfig(num_langevin_steps=5, step_size=0.05,
                          noise_scale=0.05, alpha=0.1, persistent=0.5,
                          init_scale=3.0, apply=mlp_energy,
                          optimizer=optax.adam(1e-3))
UPDATE = jax.jit(energy.update)


def test_jit_and_vmap_over_seeds_and_hyperparameters():
    x = gaussian_mixture_2d(jax.random.key(0), 16)
    states = [energy.init(_mlp_params(jax.random.key(i)),
                          dataclasses.replace(CFG, alpha=0.1 * (i + 1)),
                          key=jax.random.key(i)) for i in range(2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    out, metrics = jax.jit(jax.vmap(energy.update, in_axes=(0, None)))(
        stacked, dict(x=x))
    assert metrics["loss"].shape == (2,)
    for i, state in enumerate(states):
        ref, ref_m = UPDATE(state, dict(x=x))
        np.testing.assert_allclose(out.params["w1"][i], ref.params["w1"],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["loss"][i], ref_m["loss"],
                                   rtol=1e-5, atol=1e-6)
    assert int(out.step[0]) == 1


def test_persistent_update_refreshes_the_buffer():
    state = energy.init(_mlp_params(jax.random.key(0)), CFG,
                        key=jax.random.key(0))
    buffer = jnp.full((64, 2), 9.0)
    x = gaussian_mixture_2d(jax.random.key(0), 16)
    state, buffer2, m = jax.jit(energy.persistent_update)(state, dict(x=x),
                                                          buffer)
    assert int(state.step) == 1 and np.isfinite(float(m["loss"]))
    changed = np.any(np.asarray(buffer2) != 9.0, axis=1)
    assert changed.sum() == 16


def test_config_validation():
    with pytest.raises(ValueError, match="num_langevin_steps"):
        energy.EnergyConfig(num_langevin_steps=0)
    with pytest.raises(ValueError, match="step_size"):
        energy.EnergyConfig(step_size=0.0)
    with pytest.raises(ValueError, match="persistent"):
        energy.EnergyConfig(persistent=1.5)
    with pytest.raises(ValueError, match="alpha"):
        energy.EnergyConfig(alpha=-1.0)
    with pytest.raises(ValueError, match="config.apply"):
        energy.init({}, energy.EnergyConfig(optimizer=optax.sgd(0.1)))
    with pytest.raises(ValueError, match=r"energies \[2\]"):
        energy.loss(_mlp_params(jax.random.key(0)),
                    dict(x=jnp.zeros((2, 2)), negatives=jnp.zeros((2, 2))),
                    dataclasses.replace(CFG, apply=lambda p, x: x),
                    jax.random.key(0))
    with pytest.raises(ValueError, match="'x'"):
        energy.loss({}, dict(y=1), CFG, jax.random.key(0))


class EnergyMLP(nnx.Module):
    def __init__(self, rngs, hidden=64):
        self.l1 = nnx.Linear(2, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.l3 = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x):
        return self.l3(nnx.swish(self.l2(nnx.swish(self.l1(x)))))[:, 0]


def test_trainer_learns_mixture_energy_and_samples():
    model = EnergyMLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-3, b1=0.0), wrt=nnx.Param)
    cfg = energy.EnergyConfig(num_langevin_steps=40, step_size=0.05,
                              noise_scale=0.05, alpha=0.1, persistent=0.9,
                              init_scale=3.0)
    trainer = EnergyTrainer(model, opt, cfg, buffer_size=1000,
                            data_shape=(2,), key=0)
    # One batch size everywhere: every new size would compile again.
    noise = gaussian_mixture_2d(jax.random.key(1), 128, std=1.5)
    data = gaussian_mixture_2d(jax.random.key(2), 128)
    before = mixture_coverage(trainer.sample_negatives(
        128, jax.random.key(3), num_steps=100))
    for i in range(250):
        m = trainer.train_step(dict(x=gaussian_mixture_2d(
            jax.random.key(100 + i), 128)))
    assert trainer.step == 250 and trainer._generic_step._cache_size() == 1
    gap = float(model(noise).mean() - model(data).mean())
    assert gap > 0.1, gap
    assert np.isfinite(float(m["loss"]))
    samples = trainer.sample_negatives(128, jax.random.key(3), num_steps=100)
    after = mixture_coverage(samples)
    assert samples.shape == (128, 2)
    assert int(after["modes_covered"]) == 8
    # Samples of the untrained model are nowhere near the modes.
    assert float(before["high_quality"]) < 0.05
    assert float(after["high_quality"]) > 0.1, after
    assert trainer.buffer.shape == (1000, 2)


def test_trainer_rejects_bad_config():
    model = EnergyMLP(nnx.Rngs(0), hidden=4)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    with pytest.raises(ValueError, match="config.apply"):
        EnergyTrainer(model, opt, energy.EnergyConfig(apply=mlp_energy))
    trainer = EnergyTrainer(model, opt)
    with pytest.raises(ValueError, match="data shape"):
        trainer.sample_negatives(4)
