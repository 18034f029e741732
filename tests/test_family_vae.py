"""VAE family: the ELBO's pieces by hand, the pure update under jit/vmap,
the NNX trainer against the pure update, and learning on 8x8 digits."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_fn.families import vae
from artifex_fn.toy_data import digits_8x8
from artifex_fn.families.vae import VAEConfig
from artifex_fn.training import VAETrainer

ADAM = optax.adam(1e-2)
# Compiled once for the whole module: eager random ops compile one small
# program per primitive and shape.
DIGITS = jax.jit(digits_8x8, static_argnums=1)


# -- a linear Gaussian VAE with pytree parameters ---------------------------

def lin_encode(params, x):
    h = x @ params["we"]
    return h, jnp.broadcast_to(params["log_var"], h.shape)


def lin_decode(params, z):
    return z @ params["wd"]


def lin_params(seed=0, d_in=3, d_z=2):
    rng = np.random.default_rng(seed)
    return dict(we=jnp.asarray(rng.normal(size=(d_in, d_z)), jnp.float32),
                wd=jnp.asarray(rng.normal(size=(d_z, d_in)), jnp.float32),
                log_var=jnp.asarray(rng.normal(size=(d_z,)) * 0.3,
                                    jnp.float32))


LIN_CONFIG = VAEConfig(likelihood="gaussian", beta=0.5, kl_anneal_steps=4,
                       free_bits=0.0, encode=lin_encode, decode=lin_decode,
                       optimizer=ADAM)
LIN_X = jnp.asarray(np.random.default_rng(7).normal(size=(5, 3)), jnp.float32)


# -- hand-computed pieces ---------------------------------------------------

def test_gaussian_kl_by_hand():
    mean = jnp.array([[1.0, 0.0, -2.0]])
    log_var = jnp.array([[0.0, math.log(2.0), math.log(0.5)]])
    expected = [0.5 * (1 + 1 - 1 - 0),
                0.5 * (0 + 2 - 1 - math.log(2.0)),
                0.5 * (4 + 0.5 - 1 - math.log(0.5))]
    np.testing.assert_allclose(vae.gaussian_kl(mean, log_var)[0], expected,
                               rtol=1e-6)
    # The prior itself has zero KL.
    np.testing.assert_allclose(vae.gaussian_kl(jnp.zeros(4), jnp.zeros(4)),
                               0.0)


@pytest.mark.parametrize("step, expected", [(0, 0.0), (1, 0.2), (5, 1.0),
                                            (10, 2.0), (25, 2.0)])
def test_kl_weight_anneals_linearly(step, expected):
    w = vae.kl_weight(step, beta=2.0, kl_anneal_steps=10)
    np.testing.assert_allclose(w, expected, rtol=1e-6)


def test_kl_weight_without_annealing_is_beta():
    for step in (0, 3, 1000):
        np.testing.assert_allclose(
            vae.kl_weight(step, beta=0.7, kl_anneal_steps=0), 0.7, rtol=1e-6)


def test_free_bits_clamps_batch_mean_per_dimension():
    kl = jnp.array([[0.1, 2.0, 0.6], [0.3, 1.0, 0.6]])   # means .2, 1.5, .6
    np.testing.assert_allclose(vae.free_bits_kl(kl, 0.0), 2.3, rtol=1e-6)
    np.testing.assert_allclose(vae.free_bits_kl(kl, 0.5), 0.5 + 1.5 + 0.6,
                               rtol=1e-6)
    np.testing.assert_allclose(vae.free_bits_kl(kl, 2.0), 6.0, rtol=1e-6)
    # Clamped dimensions get no gradient; the others get 1 / B per example.
    grad = jax.grad(vae.free_bits_kl)(kl, 0.5)
    np.testing.assert_allclose(grad, [[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]])


def test_reconstruction_losses_by_hand():
    logits = jnp.array([[0.0, 2.0]])
    x = jnp.array([[0.3, 1.0]])
    bern = vae.reconstruction_loss(logits, x, likelihood="bernoulli")
    np.testing.assert_allclose(
        bern, [math.log(2.0) + math.log1p(math.exp(-2.0))], rtol=1e-6)
    gauss = vae.reconstruction_loss(logits, x, likelihood="gaussian",
                                    obs_std=2.0)
    expected = sum((xi - mi) ** 2 / 8.0 + math.log(2.0)
                   + 0.5 * math.log(2 * math.pi)
                   for xi, mi in ((0.3, 0.0), (1.0, 2.0)))
    np.testing.assert_allclose(gauss, [expected], rtol=1e-6)
    with pytest.raises(ValueError, match="expected the data's shape"):
        vae.reconstruction_loss(logits, jnp.zeros((1, 3)))


@pytest.mark.parametrize("step", [None, 1])
def test_negative_elbo_by_hand(step):
    params, key = lin_params(), jax.random.PRNGKey(3)
    total, m = vae.loss(params, LIN_X, LIN_CONFIG, key, step=step)
    x = np.asarray(LIN_X, np.float64)
    mean = x @ np.asarray(params["we"], np.float64)
    log_var = np.broadcast_to(np.asarray(params["log_var"], np.float64),
                              mean.shape)
    eps = np.asarray(jax.random.normal(key, mean.shape), np.float64)
    z = mean + np.exp(0.5 * log_var) * eps
    recon = z @ np.asarray(params["wd"], np.float64)
    rec = np.mean(np.sum(0.5 * (x - recon) ** 2 + 0.5 * np.log(2 * np.pi),
                         axis=1))
    kl = np.mean(np.sum(0.5 * (mean ** 2 + np.exp(log_var) - 1 - log_var),
                        axis=1))
    weight = 0.5 if step is None else 0.5 * step / 4
    np.testing.assert_allclose(total, rec + weight * kl, rtol=1e-5)
    np.testing.assert_allclose(m["reconstruction_loss"], rec, rtol=1e-5)
    np.testing.assert_allclose(m["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(m["kl_weight"], weight, rtol=1e-6)
    np.testing.assert_allclose(m["elbo"], -(rec + kl), rtol=1e-5)
    assert set(m) == {"loss", "reconstruction_loss", "kl", "kl_weight",
                      "elbo"}


def test_reparameterisation_carries_gradients_to_the_encoder():
    params = lin_params()
    grads = jax.jit(jax.grad(lambda p: vae.loss(p, LIN_X, LIN_CONFIG,
                                        jax.random.PRNGKey(0))[0]))(params)
    for name in ("we", "wd", "log_var"):
        assert float(jnp.max(jnp.abs(grads[name]))) > 0, name


# -- the pure update: jit, vmap, the KL schedule ----------------------------

UPDATE = jax.jit(vae.update)
VUPDATE = jax.jit(jax.vmap(vae.update, in_axes=(0, None)))


def test_jit_update_anneals_the_kl_weight_with_the_step():
    state = vae.init(lin_params(), LIN_CONFIG, key=jax.random.PRNGKey(1))
    weights, keys = [], [np.asarray(state.key)]
    for _ in range(6):
        state, m = UPDATE(state, {"x": LIN_X})
        weights.append(float(m["kl_weight"]))
        keys.append(np.asarray(state.key))
    np.testing.assert_allclose(weights, [0.0, 0.125, 0.25, 0.375, 0.5, 0.5])
    assert int(state.step) == 6
    assert len({k.tobytes() for k in keys}) == 7  # a fresh key every step


def test_vmap_over_seeds_and_betas_matches_separate_runs():
    # beta is a leaf of the config: one compiled update serves all three.
    states = [vae.init(lin_params(s), dataclasses.replace(
        LIN_CONFIG, beta=0.25 * (s + 1), kl_anneal_steps=0),
        key=jax.random.PRNGKey(s)) for s in range(3)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)
    out, metrics = VUPDATE(stacked, LIN_X)
    for i, s in enumerate(states):
        ref, ref_m = UPDATE(s, LIN_X)
        np.testing.assert_allclose(out.params["we"][i], ref.params["we"],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["loss"][i], ref_m["loss"],
                                   rtol=1e-5)
        np.testing.assert_allclose(metrics["kl_weight"][i], 0.25 * (i + 1))


def test_samplers_shapes():
    params = lin_params()
    x = vae.sample(params, LIN_CONFIG, jax.random.PRNGKey(0), num_samples=4,
                   latent_dim=2)
    assert x.shape == (4, 3)
    r = vae.reconstruct(params, LIN_X, LIN_CONFIG)
    np.testing.assert_allclose(r, LIN_X @ params["we"] @ params["wd"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=-1.0), "beta"),
    (dict(kl_anneal_steps=-1), "kl_anneal_steps"),
    (dict(kl_anneal_steps=2.5), "kl_anneal_steps"),
    (dict(free_bits=-0.1), "free_bits"),
    (dict(likelihood="poisson"), "likelihood"),
    (dict(obs_std=0.0), "obs_std"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(encode=3), "encode"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig(**kwargs)


def test_missing_functions_and_bad_encoder_outputs():
    with pytest.raises(ValueError, match="config.optimizer"):
        vae.init(lin_params(), dataclasses.replace(LIN_CONFIG,
                                                   optimizer=None))
    with pytest.raises(ValueError, match="config.decode"):
        vae.init(lin_params(), dataclasses.replace(LIN_CONFIG, decode=None))
    bad = dataclasses.replace(LIN_CONFIG, encode=lambda p, x: x @ p["we"])
    with pytest.raises(ValueError, match="mean, log_var"):
        vae.loss(lin_params(), LIN_X, bad, jax.random.PRNGKey(0))


# -- the NNX trainer --------------------------------------------------------

class DigitVAE(nnx.Module):
    latent_dim = 4

    def __init__(self, rngs, hidden=64):
        self.e1 = nnx.Linear(64, hidden, rngs=rngs)
        self.e2 = nnx.Linear(hidden, 2 * self.latent_dim, rngs=rngs)
        self.d1 = nnx.Linear(self.latent_dim, hidden, rngs=rngs)
        self.d2 = nnx.Linear(hidden, 64, rngs=rngs)

    def encode(self, x):
        h = jax.nn.relu(self.e1(x.reshape(x.shape[0], -1)))
        mean, log_var = jnp.split(self.e2(h), 2, axis=-1)
        return mean, log_var

    def decode(self, z):
        return self.d2(jax.nn.relu(self.d1(z))).reshape(-1, 8, 8)


@nnx.jit
def _make_model(key):
    return DigitVAE(nnx.Rngs(key))


def make_model(seed):
    return _make_model(jax.random.key(seed))


def _trainer(seed=0, config=None, lr=3e-3):
    model = make_model(seed)
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
    return model, VAETrainer(model, opt, config or VAEConfig(
        kl_anneal_steps=10), key=seed)


@pytest.fixture(scope="module")
def digits():
    """300 training batches of 128 images and 256 held-out images."""
    images, _ = DIGITS(jax.random.key(1), 128 * 300 + 256)
    return images[:-256].reshape(300, 128, 8, 8), images[-256:]


def test_trainer_step_equals_pure_update(digits):
    model, trainer = _trainer()
    graphdef, params = nnx.split(model, nnx.Param)
    config = VAEConfig(kl_anneal_steps=10, optimizer=optax.adam(3e-3),
                       encode=lambda p, x: nnx.merge(graphdef, p).encode(x),
                       decode=lambda p, z: nnx.merge(graphdef, p).decode(z))
    state = vae.init(nnx.as_pure(params), config, key=trainer.key)
    update = jax.jit(vae.update)
    x = digits[1][:16]
    for _ in range(3):
        state, ref = update(state, x)
        got = trainer.train_step({"x": x})
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5,
                                       err_msg=k)
    pure = jax.tree_util.tree_leaves(state.params)
    live = jax.tree_util.tree_leaves(nnx.as_pure(nnx.state(model, nnx.Param)))
    for a, b in zip(pure, live):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert trainer.step == 3 and float(got["kl_weight"]) == pytest.approx(0.2)


def test_trainer_learns_digits(digits):
    model, trainer = _trainer(lr=3e-3)
    data, test_x = digits

    def error():
        recon = trainer.reconstruct(test_x)
        return float(jnp.mean(jnp.sum((recon - test_x) ** 2, axis=(1, 2))))

    before = error()
    first = trainer.train_step(data[0])
    last = trainer.fit(lambda i: data[i], num_steps=299)
    after = error()
    assert after < 0.25 * before, (before, after)
    assert float(last["reconstruction_loss"]) < 0.5 * float(
        first["reconstruction_loss"])
    assert float(last["elbo"]) > float(first["elbo"]) + 10.0
    samples = trainer.sample(5, key=0)
    assert samples.shape == (5, 8, 8)
    assert float(jnp.min(samples)) >= 0.0 and float(jnp.max(samples)) <= 1.0
    assert trainer.reconstruct(test_x[:3], key=1).shape == (3, 8, 8)


def test_trainer_config_errors():
    model = make_model(0)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    with pytest.raises(ValueError, match="encode"):
        VAETrainer(model, opt, VAEConfig(encode=lin_encode))
    with pytest.raises(TypeError, match="VAEConfig"):
        VAETrainer(model, opt, object())

    class NoDecoder(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros(2))

        def encode(self, x):
            return x, x

    plain = NoDecoder()
    with pytest.raises(TypeError, match="decode"):
        VAETrainer(plain, nnx.Optimizer(plain, optax.adam(1e-3),
                                        wrt=nnx.Param))
    with pytest.raises(ValueError, match="'x'"):
        VAETrainer(model, opt).train_step({"images": jnp.zeros((2, 8, 8))})
