"""Tests for the diffusion family (``artifex_fn.families.diffusion``) and
:class:`~artifex_fn.training.trainers.diffusion.DiffusionTrainer`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import artifex_fn as afn
from artifex_fn import toy_data
from artifex_fn.families import diffusion as D
from artifex_fn.families.diffusion import DiffusionConfig
from artifex_fn.training import DiffusionTrainer

RTOL, ATOL = 1e-5, 1e-6
ADAM = optax.adam(1e-2)

# Compiled once: eager calls would dispatch (and compile) op by op.
gaussian_mixture_2d = jax.jit(toy_data.gaussian_mixture_2d, static_argnums=1)
mixture_coverage = jax.jit(toy_data.mixture_coverage)


def linear_apply(params, x, t):
    """``eps_hat = w * x + b[t]``: every quantity is computable by hand."""
    return params["w"] * x + params["b"][t][:, None]


def linear_params(T, w=0.5):
    return dict(w=jnp.asarray(w, jnp.float32),
                b=jnp.linspace(-0.2, 0.3, T).astype(jnp.float32))


def np_linear_schedule(T, b0, b1):
    betas = np.linspace(b0, b1, T)
    abar = np.cumprod(1 - betas)
    prev = np.concatenate([[1.0], abar[:-1]])
    post = betas * (1 - prev) / (1 - abar)
    post[0] = post[1]
    return betas, abar, prev, post


# -- schedules ----------------------------------------------------------------

def test_linear_schedule_matches_formulas():
    s = D.noise_schedule(5, beta_start=0.1, beta_end=0.5)
    betas, abar, prev, post = np_linear_schedule(5, 0.1, 0.5)
    np.testing.assert_allclose(s.betas, betas, rtol=RTOL)
    np.testing.assert_allclose(s.alphas, 1 - betas, rtol=RTOL)
    np.testing.assert_allclose(s.alpha_bars, abar, rtol=RTOL)
    np.testing.assert_allclose(s.alpha_bars_prev, prev, rtol=RTOL)
    np.testing.assert_allclose(s.posterior_variance, post, rtol=RTOL)
    assert s.num_timesteps == 5
    # beta_tilde_1 = beta_1 (1 - abar_0) / (1 - abar_1) by hand.
    assert s.posterior_variance[1] == pytest.approx(0.2 * 0.1 / (1 - 0.72),
                                                    rel=1e-5)


def test_cosine_schedule_matches_nichol_dhariwal():
    T, s_off = 10, 0.008
    s = D.noise_schedule(T, schedule="cosine", cosine_s=s_off, max_beta=0.6)
    f = np.cos((np.arange(T + 1) / T + s_off) / (1 + s_off) * np.pi / 2) ** 2
    abar = f / f[0]
    betas = np.minimum(1 - abar[1:] / abar[:-1], 0.6)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-5)
    np.testing.assert_allclose(s.alpha_bars, np.cumprod(1 - betas), rtol=1e-4)
    assert float(s.betas.max()) == pytest.approx(0.6)


def test_q_sample_and_inverses():
    s = D.noise_schedule(4, beta_start=0.1, beta_end=0.4)
    x0 = jnp.array([[1.0, -2.0], [0.5, 0.0]])
    noise = jnp.array([[0.3, 0.1], [-1.0, 2.0]])
    t = jnp.array([0, 3])
    x_t = D.q_sample(x0, t, noise, s)
    abar = np.array([0.9, 0.3024])[:, None]
    np.testing.assert_allclose(
        x_t, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise, rtol=RTOL)
    np.testing.assert_allclose(D.predict_x0(x_t, t, noise, s), x0, atol=1e-5)
    # The eps-parameterised mean equals the true posterior mean
    # (sqrt(abar_prev) beta / (1 - abar)) x0 + (sqrt(alpha)(1 - abar_prev)
    # / (1 - abar)) x_t  (Ho et al. 2020, eq. 7).
    betas, abar_np, prev, _ = np_linear_schedule(4, 0.1, 0.4)
    b, a, p = betas[t][:, None], abar_np[t][:, None], prev[t][:, None]
    want = (np.sqrt(p) * b / (1 - a) * np.asarray(x0)
            + np.sqrt(1 - b) * (1 - p) / (1 - a) * np.asarray(x_t))
    np.testing.assert_allclose(D.posterior_mean(x_t, t, noise, s), want,
                               rtol=1e-4, atol=1e-5)


# -- the loss -----------------------------------------------------------------

def test_loss_by_hand():
    T = 4
    config = D.DiffusionConfig(num_timesteps=T, beta_start=0.1, beta_end=0.4,
                               apply=linear_apply)
    params = linear_params(T)
    x0 = np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 1.0]], np.float32)
    noise = np.array([[0.3, 0.1], [-1.0, 2.0], [0.5, 0.5]], np.float32)
    t = np.array([0, 3, 1])
    _, abar, _, _ = np_linear_schedule(T, 0.1, 0.4)
    a = abar[t][:, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    eps_hat = 0.5 * x_t + np.asarray(params["b"])[t][:, None]
    want = np.mean((noise - eps_hat) ** 2)
    value, metrics = jax.jit(D.loss)(params, dict(x=x0, t=t, noise=noise),
                                     config, jax.random.key(0))
    assert float(value) == pytest.approx(want, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)


def test_loss_random_draws_cover_timesteps_and_accept_arrays():
    T = 8
    config = D.DiffusionConfig(num_timesteps=T, apply=linear_apply)
    params = linear_params(T)
    x = jnp.ones((16, 2))
    loss = jax.jit(D.loss)
    v1, _ = loss(params, x, config, jax.random.key(1))
    v2, _ = loss(params, {"x": x}, config, jax.random.key(1))
    v3, _ = loss(params, x, config, jax.random.key(2))
    assert float(v1) == float(v2) and float(v1) != float(v3)


def test_loss_errors():
    config = D.DiffusionConfig(num_timesteps=4, apply=linear_apply)
    params = linear_params(4)
    with pytest.raises(ValueError, match="apply"):
        D.loss(params, jnp.ones((2, 2)),
               dataclasses.replace(config, apply=None), jax.random.key(0))
    with pytest.raises(ValueError, match="`t` must be"):
        D.loss(params, dict(x=jnp.ones((2, 2)), t=jnp.zeros((3,), int)),
               config, jax.random.key(0))
    with pytest.raises(ValueError, match="returned shape"):
        D.loss(params, jnp.ones((2, 2)),
               dataclasses.replace(config, apply=lambda p, x, t: x[:, :1]),
               jax.random.key(0))
    with pytest.raises(ValueError, match="missing the key 'x'"):
        D.loss(params, dict(y=jnp.ones((2, 2))), config, jax.random.key(0))


# -- reverse steps and chains -------------------------------------------------

@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_step_distribution_by_hand(variance):
    T = 4
    s = D.noise_schedule(T, beta_start=0.1, beta_end=0.4)
    betas, abar, _, post = np_linear_schedule(T, 0.1, 0.4)
    params = linear_params(T)
    x = np.array([[1.0, -1.0], [0.2, 0.4]], np.float32)
    t = np.array([3, 0])
    dist = D.step_distribution(linear_apply, params, x, t, s,
                               variance=variance)
    eps = 0.5 * x + np.asarray(params["b"])[t][:, None]
    b, a = betas[t][:, None], abar[t][:, None]
    mean = (x - b / np.sqrt(1 - a) * eps) / np.sqrt(1 - b)
    var = (post if variance == "posterior" else betas)[t][:, None]
    np.testing.assert_allclose(dist.mean(), mean, rtol=1e-5)
    np.testing.assert_allclose(dist.stddev(), np.broadcast_to(
        np.sqrt(var), x.shape), rtol=1e-5)
    y = np.array([[0.0, 0.5], [1.0, -1.0]], np.float32)
    want = np.sum(-0.5 * (y - mean) ** 2 / var - 0.5 * np.log(2 * np.pi * var),
                  axis=-1)
    np.testing.assert_allclose(dist.log_prob(y), want, rtol=1e-5)


def test_step_distribution_flattens_batch_axes():
    T = 5
    s = D.noise_schedule(T, schedule="cosine")
    params = linear_params(T)
    x = jax.random.normal(jax.random.key(0), (3, 4, 2))
    t = jax.random.randint(jax.random.key(1), (3, 4), 0, T)

    @jax.jit
    def means(x, t):
        dist = D.step_distribution(linear_apply, params, x, t, s)
        row = D.step_distribution(linear_apply, params, x[1], t[1], s)
        scalar = D.step_distribution(linear_apply, params, x[0], 2, s)
        assert dist.batch_shape == (3, 4) and scalar.batch_shape == (4,)
        return dist.mean(), row.mean()

    full, row = means(x, t)
    np.testing.assert_allclose(full[1], row, rtol=1e-6)
    with pytest.raises(ValueError, match="leading axes"):
        D.step_distribution(linear_apply, params, x, t[:, :2], s)
    with pytest.raises(ValueError, match="variance"):
        D.step_std(t, s, variance="learned")


def test_sample_chain_log_probs_and_ddpo_batch_agree():
    T, B = 6, 5
    s = D.noise_schedule(T, schedule="cosine", max_beta=0.5)
    params = linear_params(T)
    x_T = jax.random.normal(jax.random.key(0), (B, 2))
    rewards = jnp.arange(B, dtype=jnp.float32)

    @jax.jit
    def run(params, x_T, key):
        x0, traj, log_probs = D.sample_chain(linear_apply, params, x_T, key, s)
        # Step k goes from traj[k] at t = T-1-k to traj[k+1].
        by_step = jnp.stack([
            D.step_distribution(linear_apply, params, traj[k], T - 1 - k,
                                s).log_prob(traj[k + 1]) for k in range(T)])
        batch = D.ddpo_batch(traj, log_probs, rewards)
        recomputed = D.ddpo_policy(linear_apply, s)(
            params, batch["observations"]).log_prob(batch["actions"])
        return x0, traj, log_probs, by_step, batch, recomputed

    x0, traj, log_probs, by_step, batch, recomputed = run(
        params, x_T, jax.random.key(1))
    assert traj.shape == (T + 1, B, 2) and log_probs.shape == (T, B)
    np.testing.assert_array_equal(traj[0], x_T)
    np.testing.assert_array_equal(traj[-1], x0)
    np.testing.assert_array_equal(D.chain_timesteps(T), np.arange(T)[::-1])
    np.testing.assert_allclose(by_step, log_probs, rtol=1e-5)
    assert batch["observations"]["x"].shape == (B, T, 2)
    np.testing.assert_array_equal(batch["observations"]["t"][2],
                                  np.arange(T)[::-1])
    np.testing.assert_array_equal(batch["actions"][:, 0], traj[1])
    np.testing.assert_array_equal(batch["rewards"], rewards)
    np.testing.assert_allclose(recomputed, batch["log_probs"], rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="trajectory"):
        D.ddpo_batch(traj[:-1], log_probs)


def test_chain_kl_is_the_gaussian_formula():
    T, B = 4, 3
    s = D.noise_schedule(T, beta_start=0.1, beta_end=0.4)
    p, q = linear_params(T, 0.5), linear_params(T, 0.3)

    @jax.jit
    def run(p, q):
        _, traj, _ = D.sample_chain(linear_apply, p, jnp.ones((B, 2)),
                                    jax.random.key(0), s)
        return (traj, D.chain_kl(linear_apply, p, q, traj, s),
                D.chain_kl(linear_apply, p, p, traj, s))

    traj, kl, kl_self = run(p, q)
    betas, abar, _, post = np_linear_schedule(T, 0.1, 0.4)
    want = np.zeros(B)
    for k in range(T):
        t = T - 1 - k
        x = np.asarray(traj[k])
        # Means differ through eps only: dmu = beta dw x / sqrt((1-abar) a).
        dmu = betas[t] / np.sqrt((1 - abar[t]) * (1 - betas[t])) * 0.2 * x
        want += np.sum(dmu ** 2, axis=-1) / (2 * post[t])
    np.testing.assert_allclose(kl, want, rtol=1e-4)
    np.testing.assert_allclose(kl_self, 0.0, atol=1e-6)


def test_ddpo_policy_drives_pure_grpo_on_policy():
    """On freshly sampled chains GRPO's first ratio is one (approx_kl 0)."""
    T, G = 5, 4
    s = D.noise_schedule(T, schedule="cosine", max_beta=0.5)
    config = afn.grpo.GRPOConfig(num_generations=G, beta=0.0,
                                 policy=D.ddpo_policy(linear_apply, s),
                                 optimizer=optax.sgd(1e-2))

    @jax.jit
    def run(params, key):
        x_T = jnp.repeat(jax.random.normal(key, (2, 2)), G, axis=0)
        x0, traj, lp = D.sample_chain(linear_apply, params, x_T, key, s)
        batch = D.ddpo_batch(traj, lp, (x0[:, 0] > 0).astype(jnp.float32))
        return afn.grpo.update(afn.grpo.init(params, config), batch)

    state, metrics = run(linear_params(T), jax.random.key(1))
    assert abs(float(metrics["approx_kl"])) < 1e-6
    assert float(metrics["clip_fraction"]) == 0.0
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1


# -- init / update ------------------------------------------------------------

def test_update_applies_adam_and_the_ema():
    T = 4
    config = D.DiffusionConfig(num_timesteps=T, apply=linear_apply,
                               optimizer=optax.sgd(0.1), ema_decay=0.9)
    params = linear_params(T)
    state = D.init(params, config, key=jax.random.key(0))
    assert isinstance(state, D.DiffusionState)
    batch = dict(x=jnp.ones((4, 2)), t=jnp.array([0, 1, 2, 3]),
                 noise=jnp.zeros((4, 2)))
    grads = jax.grad(lambda p: D.loss(p, batch, config,
                                      jax.random.key(0))[0])(params)
    new, metrics = jax.jit(D.update)(state, batch)
    expect = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    np.testing.assert_allclose(new.params["b"], expect["b"], rtol=1e-5)
    # Step 0 decays with min(0.9, 1/10) = 0.1.
    assert float(metrics["ema_decay"]) == pytest.approx(0.1)
    np.testing.assert_allclose(
        new.ema_params["b"], 0.1 * params["b"] + 0.9 * expect["b"], rtol=1e-5)
    assert int(new.step) == 1 and not np.array_equal(new.key, state.key)
    assert float(D.ema_decay_at(0.9, 1000)) == pytest.approx(0.9)


def test_update_vmaps_over_seeds_and_configs():
    """One compiled update runs a stack of seeds with different betas."""
    T = 4
    config = D.DiffusionConfig(num_timesteps=T, apply=linear_apply,
                               optimizer=ADAM)
    keys = jax.random.split(jax.random.key(0), 3)
    beta_ends = jnp.array([0.02, 0.2, 0.5])
    states = jax.vmap(lambda k, b: D.init(
        linear_params(T), dataclasses.replace(config, beta_end=b), key=k))(
            keys, beta_ends)
    x = jnp.ones((8, 2))
    new, metrics = jax.jit(jax.vmap(D.update, in_axes=(0, None)))(states, x)
    assert metrics["loss"].shape == (3,) and new.step.shape == (3,)
    # Far apart, not just different after rounding to 6 decimals (where a
    # loss next to a rounding boundary could go either way).
    assert np.min(np.diff(np.sort(np.asarray(metrics["loss"])))) > 1e-4
    assert len(set(np.asarray(metrics["loss"]).round(6).tolist())) == 3
    np.testing.assert_allclose(new.config.beta_end, beta_ends)


@pytest.mark.parametrize("field, value, match", [
    ("num_timesteps", 0, "num_timesteps"),
    ("schedule", "quadratic", "schedule"),
    ("beta_start", 0.0, "beta_start"),
    ("beta_end", 1.0, "beta_end"),
    ("beta_start", 0.5, "must be <= `beta_end`"),
    ("cosine_s", -0.1, "cosine_s"),
    ("max_beta", 1.0, "max_beta"),
    ("ema_decay", 1.5, "ema_decay"),
    ("max_grad_norm", 0.0, "max_grad_norm"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        D.DiffusionConfig(**{field: value})


def test_init_requires_an_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        D.init(linear_params(4), D.DiffusionConfig(num_timesteps=4))


# -- the NNX trainer ----------------------------------------------------------

class TinyEps(nnx.Module):
    """``eps_theta(x_t, t)``: MLP with a learned timestep embedding."""

    data_shape = (2,)

    def __init__(self, T, hidden=128, *, rngs):
        self.embed = nnx.Embed(T, hidden, rngs=rngs)
        self.inp = nnx.Linear(2, hidden, rngs=rngs)
        self.h1 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.h2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 2, rngs=rngs)

    def __call__(self, x, t):
        e = self.embed(t)
        h = nnx.silu(self.inp(x) + e)
        h = nnx.silu(self.h1(h) + e)
        return self.out(nnx.silu(self.h2(h)))


@nnx.jit(static_argnums=0)
def _tiny_eps(T):
    """``TinyEps(T)`` initialised in one compiled call (not op by op)."""
    return TinyEps(T, rngs=nnx.Rngs(0))


def _trainer(T=20, lr=1e-2, steps=1, **kw):
    model = _tiny_eps(T)
    tx = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), 0.05))
    config = DiffusionConfig(num_timesteps=T, schedule="cosine",
                             max_beta=0.5, **kw)
    return DiffusionTrainer(model, nnx.Optimizer(model, tx, wrt=nnx.Param),
                            config, key=0)


def test_trainer_learns_the_ring_of_gaussians():
    steps = 400
    trainer = _trainer(steps=steps, ema_decay=0.99)
    data = gaussian_mixture_2d(jax.random.key(1), steps * 512).reshape(
        steps, 512, 2)
    losses = []
    for i in range(steps):
        metrics = trainer.train_step(data[i])
        if i % 50 == 0 or i >= steps - 50:
            losses.append(metrics["loss"])
    losses = np.asarray(losses)
    assert np.mean(losses[-50:]) < 0.7 * losses[0]
    x = trainer.sample(2048, key=0)
    cov = mixture_coverage(x)
    assert int(cov["modes_covered"]) == 8
    assert float(cov["high_quality"]) > 0.5
    x, ref = np.asarray(x), np.asarray(
        gaussian_mixture_2d(jax.random.key(2), 4096))
    np.testing.assert_allclose(np.mean(x, 0), np.mean(ref, 0), atol=0.15)
    np.testing.assert_allclose(np.cov(x.T), np.cov(ref.T), atol=0.3)


def test_trainer_loss_ema_state_and_sampling():
    T = 6
    trainer = _trainer(T=T, ema_decay=0.5)
    model = trainer.model
    batch = dict(x=jnp.ones((4, 2)), t=jnp.array([0, 1, 2, 5]),
                 noise=jnp.full((4, 2), 0.3))
    config = dataclasses.replace(trainer.config,
                                 apply=lambda m, x, t: m(x, t))

    @nnx.jit
    def both(model):
        key = jax.random.key(0)
        return (D.loss(model, batch, config, key)[0],
                trainer.compute_loss(model, batch, key)[0])

    want, got = both(model)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    metrics = trainer.train_step(batch)
    assert set(metrics) >= {"loss", "grad_norm", "ema_decay"}
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    ema = jax.tree.leaves(trainer.ema_params)
    for e, b, a in zip(ema, jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_allclose(e, 0.1 * b + 0.9 * a, rtol=1e-5, atol=1e-7)
    assert "ema_params" in trainer.state_dict()
    ema_model = trainer.ema_model()
    np.testing.assert_allclose(ema_model.out.kernel[...],
                               trainer.ema_params["out"]["kernel"])
    x0, traj, lp = trainer.sample(3, key=1, return_chain=True)
    assert x0.shape == (3, 2) and traj.shape == (T + 1, 3, 2)
    assert lp.shape == (T, 3)
    raw = trainer.sample(3, key=1, use_ema=False)
    assert raw.shape == (3, 2) and not np.allclose(raw, x0)


def test_trainer_validation():
    model = _tiny_eps(4)
    opt = nnx.Optimizer(model, ADAM, wrt=nnx.Param)
    with pytest.raises(ValueError, match="config.apply"):
        DiffusionTrainer(model, opt, DiffusionConfig(apply=linear_apply))
    with pytest.raises(ValueError, match="config.optimizer"):
        DiffusionTrainer(model, opt, DiffusionConfig(optimizer=optax.sgd(1.)))
    with pytest.raises(TypeError, match="DiffusionConfig"):
        DiffusionTrainer(model, opt, afn.grpo.GRPOConfig())
    trainer = DiffusionTrainer(model, opt, DiffusionConfig(num_timesteps=4))
    with pytest.raises(ValueError, match="missing the key 'x'"):
        trainer.train_step({"y": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="variance"):
        trainer.sample(2, key=0, variance="learned")
