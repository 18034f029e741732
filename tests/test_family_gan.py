"""GAN family: the losses by hand, the alternating update against a
step-by-step reference, jit/vmap, the NNX trainer (equal to the pure update,
checkpoint round trip) and learning a 2-D mixture."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_fn.families import gan
from artifex_fn.toy_data import gaussian_mixture_2d
from artifex_fn.toy_data import mixture_coverage
from artifex_fn.toy_data import mixture_means
from artifex_fn.families.gan import GANConfig
from artifex_fn.training import GANTrainer

G_OPT, D_OPT = optax.adam(0.01), optax.sgd(0.1)


def sp(x):
    return math.log1p(math.exp(x))


# -- losses by hand ---------------------------------------------------------

@pytest.mark.parametrize("loss", ["non_saturating", "minimax"])
def test_cross_entropy_discriminator_loss(loss):
    real, fake = jnp.array([0.0, 2.0]), jnp.array([0.0, -1.0])
    # -log sigmoid(r) = softplus(-r); -log(1 - sigmoid(f)) = softplus(f)
    expected = (sp(0.0) + sp(-2.0)) / 2 + (sp(0.0) + sp(-1.0)) / 2
    np.testing.assert_allclose(
        gan.discriminator_loss(real, fake, loss_type=loss), expected,
        rtol=1e-6)


def test_hinge_and_least_squares_discriminator_losses():
    real, fake = jnp.array([0.5, 2.0]), jnp.array([-2.0, 0.5])
    # relu(1 - r) = [.5, 0] -> .25; relu(1 + f) = [0, 1.5] -> .75
    np.testing.assert_allclose(
        gan.discriminator_loss(real, fake, loss_type="hinge"), 1.0,
        rtol=1e-6)
    # ((1-1)^2 + (3-1)^2) / 4 + (0^2 + 2^2) / 4
    np.testing.assert_allclose(
        gan.discriminator_loss(jnp.array([1.0, 3.0]), jnp.array([0.0, 2.0]),
                               loss_type="least_squares"), 2.0, rtol=1e-6)


@pytest.mark.parametrize("loss, logits, expected", [
    ("non_saturating", [0.0, 1.0], (sp(0.0) + sp(-1.0)) / 2),
    ("minimax", [0.0, 1.0], -(sp(0.0) + sp(1.0)) / 2),
    ("hinge", [1.0, 3.0], -2.0),
    ("least_squares", [1.0, 3.0], 1.0),
])
def test_generator_losses(loss, logits, expected):
    np.testing.assert_allclose(
        gan.generator_loss(jnp.array(logits), loss_type=loss), expected,
        rtol=1e-6)


def test_non_saturating_gradient_does_not_vanish_when_d_wins():
    """Goodfellow et al. 2014, sec. 3: for D(G(z)) -> 0 the minimax
    generator gradient vanishes, the non-saturating one tends to -1."""
    fake = jnp.array([-10.0])
    g_minimax = jax.grad(
        lambda f: gan.generator_loss(f, loss_type="minimax"))(fake)
    g_ns = jax.grad(
        lambda f: gan.generator_loss(f, loss_type="non_saturating"))(fake)
    assert abs(float(g_minimax[0])) < 1e-4
    np.testing.assert_allclose(g_ns, [-1.0], atol=1e-4)


def test_optimal_discriminator_balances_the_cross_entropy():
    """For one real and one fake point the cross-entropy loss is minimal at
    D = p_data / (p_data + p_g) (Goodfellow et al. 2014, prop. 1): with
    equal densities at a point, logit 0 is stationary."""
    grad = jax.grad(lambda l: gan.discriminator_loss(l, l))(jnp.zeros(3))
    np.testing.assert_allclose(grad, 0.0, atol=1e-7)


# -- the pure update --------------------------------------------------------

LATENT = 2


def lin_gen(p, z):
    return z @ p["w"] + p["b"]


def lin_disc(p, x):
    return jnp.tanh(x @ p["v"]) @ p["u"]


def params(seed=0):
    rng = np.random.default_rng(seed)

    def f(*shape):
        return jnp.asarray(rng.normal(size=shape) * 0.5, jnp.float32)

    return dict(generator=dict(w=f(LATENT, 2), b=f(2)),
                discriminator=dict(v=f(2, 4), u=f(4)))


CONFIG = GANConfig(loss_type="non_saturating", d_steps=2, latent_dim=LATENT,
                   generator=lin_gen, discriminator=lin_disc,
                   g_optimizer=G_OPT, d_optimizer=D_OPT)
X = jnp.asarray(np.random.default_rng(3).normal(size=(6, 2)) + 1.0,
                jnp.float32)
UPDATE = jax.jit(gan.update)


@jax.jit
def reference_update(state, x):
    """The two players' steps written out one by one (d_steps = 2)."""
    g, d = state.params["generator"], state.params["discriminator"]
    opt_g, opt_d = state.opt_state["generator"], state.opt_state["discriminator"]
    _, d_key, g_key = jax.random.split(state.key, 3)
    d_losses = []
    for k in jax.random.split(d_key, 2):
        z = jax.random.normal(k, (x.shape[0], LATENT))

        def d_obj(d_):
            real, fake = lin_disc(d_, x), lin_disc(d_, lin_gen(g, z))
            return jnp.mean(jax.nn.softplus(-real) + jax.nn.softplus(fake))

        d_losses.append(d_obj(d))
        upd, opt_d = D_OPT.update(jax.grad(d_obj)(d), opt_d, d)
        d = optax.apply_updates(d, upd)
    z = jax.random.normal(g_key, (x.shape[0], LATENT))

    def g_obj(g_):
        return jnp.mean(jax.nn.softplus(-lin_disc(d, lin_gen(g_, z))))

    g_loss = g_obj(g)
    upd, opt_g = G_OPT.update(jax.grad(g_obj)(g), opt_g, g)
    return optax.apply_updates(g, upd), d, jnp.mean(jnp.stack(d_losses)), g_loss


def test_update_is_d_steps_then_a_generator_step():
    state = gan.init(params(), CONFIG, key=jax.random.PRNGKey(4))
    new, metrics = UPDATE(state, X)
    g, d, d_loss, g_loss = reference_update(state, X)
    for got, want in ((new.params["generator"], g),
                      (new.params["discriminator"], d)):
        for a, b in zip(jax.tree_util.tree_leaves(got),
                        jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["d_loss"], d_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["g_loss"], g_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"],
                               metrics["d_loss"] + metrics["g_loss"])
    assert int(new.step) == 1
    assert set(metrics) == {"loss", "d_loss", "g_loss", "real_logit",
                            "fake_logit", "d_accuracy", "d_grad_norm",
                            "g_grad_norm"}


def test_vmap_over_seeds_matches_separate_runs():
    states = [gan.init(params(s), CONFIG, key=jax.random.PRNGKey(s))
              for s in range(3)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)
    out, metrics = jax.jit(jax.vmap(gan.update, in_axes=(0, None)))(
        stacked, X)
    assert out.step.shape == (3,)
    for i, s in enumerate(states):
        ref, ref_m = UPDATE(s, X)
        for a, b in zip(jax.tree_util.tree_leaves(ref.params),
                        jax.tree_util.tree_leaves(out.params)):
            np.testing.assert_allclose(b[i], a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["g_loss"][i], ref_m["g_loss"],
                                   rtol=1e-5)


def test_loss_and_sample():
    total, m = gan.loss(params(), {"x": X}, CONFIG, jax.random.PRNGKey(0))
    np.testing.assert_allclose(total, m["d_loss"] + m["g_loss"], rtol=1e-6)
    x = gan.sample(params(), CONFIG, jax.random.PRNGKey(0), num_samples=5)
    assert x.shape == (5, 2)
    np.testing.assert_allclose(
        x, gan.sample(params()["generator"], CONFIG, jax.random.PRNGKey(0),
                      num_samples=5))


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type="wasserstein"), "loss_type"),
    (dict(d_steps=0), "d_steps"),
    (dict(latent_dim=0), "latent_dim"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(generator="G"), "generator"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GANConfig(**kwargs)


def test_init_and_shape_errors():
    with pytest.raises(ValueError, match="d_optimizer"):
        gan.init(params(), dataclasses.replace(CONFIG, d_optimizer=None))
    with pytest.raises(ValueError, match="'generator' and 'discriminator'"):
        gan.init(params()["generator"], CONFIG)
    with pytest.raises(ValueError, match="loss"):
        gan.generator_loss(jnp.zeros(2), loss_type="wgan")
    bad = dataclasses.replace(CONFIG, discriminator=lambda p, x: x)
    with pytest.raises(ValueError, match=r"logits \[B\]"):
        gan.loss(params(), X, bad, jax.random.PRNGKey(0))


# -- the NNX trainer --------------------------------------------------------

class MLP(nnx.Module):
    def __init__(self, din, dout, rngs, hidden=64):
        self.l1 = nnx.Linear(din, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.l3 = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))


@nnx.jit
def _models(kg, kd):
    return MLP(4, 2, nnx.Rngs(kg)), MLP(2, 1, nnx.Rngs(kd))


ADAM = optax.adam(1e-3, b1=0.5)


def make(seed=0, config=None):
    g, d = _models(jax.random.key(seed), jax.random.key(seed + 100))
    trainer = GANTrainer(
        g, nnx.Optimizer(g, ADAM, wrt=nnx.Param),
        config or GANConfig(latent_dim=4), discriminator=d,
        d_optimizer=nnx.Optimizer(d, ADAM, wrt=nnx.Param), key=seed)
    return g, d, trainer


@pytest.fixture(scope="module")
def ring():
    data = jax.jit(gaussian_mixture_2d, static_argnums=1)(
        jax.random.key(5), 256 * 700)
    return data.reshape(700, 256, 2)


def _pure(m):
    return nnx.as_pure(nnx.state(m, nnx.Param))


def test_trainer_equals_pure_update_and_resumes(ring):
    g, d, trainer = make()
    gd, dd = nnx.graphdef(g), nnx.graphdef(d)
    config = GANConfig(latent_dim=4, g_optimizer=ADAM, d_optimizer=ADAM,
                       generator=lambda p, z: nnx.merge(gd, p)(z),
                       discriminator=lambda p, x: nnx.merge(dd, p)(x))
    state = gan.init(dict(generator=_pure(g), discriminator=_pure(d)),
                     config, key=trainer.key)
    update = jax.jit(gan.update)

    @jax.jit
    def d_logits(state, x):
        """The logits of the update's discriminator step (d_steps = 1; the
        update's own key splits), which decide d_accuracy."""
        _, d_key, _ = jax.random.split(state.key, 3)
        z = gan.noise(jax.random.split(d_key, 1)[0], x.shape[0],
                      config.latent_dim)
        p = state.params
        fake = config.generator(p["generator"], z)
        return jnp.concatenate([config.discriminator(p["discriminator"], x),
                                config.discriminator(p["discriminator"],
                                                     fake)])

    assert config.d_steps == 1
    for i in range(2):
        # d_accuracy counts logit signs: none may be within rounding of 0.
        assert np.min(np.abs(np.asarray(d_logits(state, ring[i])))) > 1e-4
        state, ref = update(state, ring[i])
        got = trainer.train_step(ring[i])
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5,
                                       err_msg=k)
    for pure, live in ((state.params["generator"], _pure(g)),
                       (state.params["discriminator"], _pure(d))):
        for a, b in zip(jax.tree_util.tree_leaves(pure),
                        jax.tree_util.tree_leaves(live)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(trainer.d_optimizer.step[...]) == 2
    assert int(trainer.optimizer.step[...]) == 2

    # state_dict holds both players: resuming replays the same steps.
    saved = jax.tree_util.tree_map(jnp.copy, trainer.state_dict())
    assert {"d_params", "d_opt_state", "d_optimizer_step"} <= set(saved)
    for i in range(2, 4):
        trainer.train_step(ring[i])
    after = (_pure(g), _pure(d))
    trainer.load_state_dict(saved)
    assert trainer.step == 2
    for i in range(2, 4):
        trainer.train_step(ring[i])
    for a, b in zip(jax.tree_util.tree_leaves(after),
                    jax.tree_util.tree_leaves((_pure(g), _pure(d)))):
        np.testing.assert_array_equal(a, b)
    loss, metrics = trainer.compute_loss(g, ring[0], key=0)
    np.testing.assert_allclose(loss, metrics["d_loss"] + metrics["g_loss"],
                               rtol=1e-6)


def test_trainer_learns_the_mixture(ring):
    _, _, trainer = make(seed=1)
    before = trainer.sample(2000, key=0)
    untrained = mixture_coverage(before)
    # The untrained count sits at its bound (<= 2): every mode's nearest
    # sample is clear of the coverage radius 3 * std = 0.3, so rounding
    # cannot change which modes count as covered.
    d = np.linalg.norm(np.asarray(before, np.float64)[:, None]
                       - np.asarray(mixture_means(), np.float64), axis=-1)
    assert np.min(np.abs(d.min(0) - 0.3)) > 1e-4
    trainer.fit(ring, num_steps=700)
    trained = mixture_coverage(trainer.generate(2000, key=0))
    assert int(untrained["modes_covered"]) <= 2
    assert int(trained["modes_covered"]) >= int(
        untrained["modes_covered"]) + 5
    assert float(trained["high_quality"]) > float(
        untrained["high_quality"]) + 0.1


def test_trainer_errors():
    g, d = _models(jax.random.key(0), jax.random.key(1))
    og = nnx.Optimizer(g, ADAM, wrt=nnx.Param)
    od = nnx.Optimizer(d, ADAM, wrt=nnx.Param)
    with pytest.raises(ValueError, match="config.generator"):
        GANTrainer(g, og, GANConfig(generator=lin_gen), discriminator=d,
                   d_optimizer=od)
    with pytest.raises(ValueError, match="config.d_optimizer"):
        GANTrainer(g, og, GANConfig(d_optimizer=optax.sgd(1.0)),
                   discriminator=d, d_optimizer=od)
    with pytest.raises(TypeError, match="discriminator"):
        GANTrainer(g, og, discriminator=lambda x: x, d_optimizer=od)
    with pytest.raises(ValueError, match="not built for"):
        GANTrainer(g, og, discriminator=d, d_optimizer=og)
    trainer = GANTrainer(g, og, GANConfig(latent_dim=4), discriminator=d,
                         d_optimizer=od)
    with pytest.raises(ValueError, match="'x'"):
        trainer.train_step({"real": jnp.zeros((4, 2))})
    with pytest.raises(ValueError, match="d_params"):
        trainer.load_state_dict({"params": None})
