"""NNX trainers: equal to the pure algorithms, compiled once, no host sync."""

from __future__ import annotations

import dataclasses
import warnings

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import artifex_fn as afn
from artifex_fn.dpo import DPOConfig
from artifex_fn.training import DPOTrainer
from artifex_fn.grpo import GRPOConfig
from artifex_fn.training import GRPOTrainer
from artifex_fn.ppo import PPOConfig
from artifex_fn.training import PPOTrainer
from artifex_fn.reinforce import REINFORCEConfig
from artifex_fn.training import REINFORCETrainer

OBS, ACT, B = 4, 3, 16


class Policy(nnx.Module):
    """Categorical policy; ``kind`` picks the output form."""

    def __init__(self, rngs, kind="logits"):
        self.hidden = nnx.Linear(OBS, 8, rngs=rngs)
        self.out = nnx.Linear(8, ACT, rngs=rngs)
        self.value = nnx.Linear(8, 1, rngs=rngs)
        self.kind = kind

    def __call__(self, x):
        h = jnp.tanh(self.hidden(x))
        logits = self.out(h)
        if self.kind == "logits":
            return logits
        if self.kind == "dist":
            return distrax.Categorical(logits=logits)
        value = self.value(h)[..., 0]
        if self.kind == "ac_dist":
            return distrax.Categorical(logits=logits), value
        return logits, value


def _pure_policy(graphdef):
    def policy(params, obs):
        return nnx.merge(graphdef, params)(obs)
    return policy


def _data(seed=0, t=None):
    k = jax.random.split(jax.random.key(seed), 4)
    shape = (B,) if t is None else (B, t)
    return dict(
        observations=jax.random.normal(k[0], shape + (OBS,)),
        actions=jax.random.randint(k[1], shape, 0, ACT),
        rewards=jax.random.normal(k[2], shape),
        log_probs=-1.0 + 0.1 * jax.random.normal(k[3], shape),
    )


def _make(trainer_cls, config, kind="logits", tx=None, **kw):
    model = Policy(nnx.Rngs(0), kind)
    opt = nnx.Optimizer(model, tx or optax.adam(1e-2), wrt=nnx.Param)
    return model, opt, trainer_cls(model, opt, config, **kw)


def _batches(algo, n):
    out = []
    for i in range(n):
        d = _data(i, t=5 if algo == "ppo" else None)
        if algo == "reinforce":
            out.append({k: d[k] for k in ("observations", "actions",
                                          "rewards")})
        elif algo == "ppo":
            d.update(values=0.1 * d["rewards"], dones=jnp.zeros_like(
                d["rewards"]).at[:, -1].set(1.0))
            out.append(d)
        elif algo == "grpo":
            out.append(d)
        else:
            side = lambda a: dict(observations=d["observations"], actions=a)
            out.append(dict(chosen=side(d["actions"]),
                            rejected=side((d["actions"] + 1) % ACT)))
    return out


CASES = {
    "reinforce": (REINFORCETrainer, REINFORCEConfig(), afn.reinforce, "logits"),
    "ppo": (PPOTrainer, PPOConfig(num_epochs=2, num_minibatches=4), afn.ppo,
            "ac"),
    "grpo": (GRPOTrainer, GRPOConfig(), afn.grpo, "dist"),
    "dpo": (DPOTrainer, DPOConfig(reference_free=True), afn.dpo, "logits"),
}


def _assert_discrete_metrics_clear_of_ties(algo, update, state, batch):
    """The discrete metrics of ``update(state, batch)`` cannot depend on
    float32 rounding: no DPO reward margin within 1e-4 of 0 (for
    reward_accuracy), no policy ratio within 1.2e-4 of a clip bound
    ``1 -/+ clip_param`` (for clip_fraction).

    PPO's ratios come from epochs of shuffled minibatches, so rather than
    recomputing them the clip bounds are moved by 1.2e-4 either way: the
    clip fraction stays the same only if no ratio lies that close.
    """
    config = state.config
    if algo == "dpo":
        def log_probs(side):
            logits = config.policy(state.params, side["observations"])
            return jnp.take_along_axis(jax.nn.log_softmax(logits),
                                       side["actions"][:, None], -1)[:, 0]

        margin = config.beta * (log_probs(batch["chosen"])
                                - log_probs(batch["rejected"]))
        assert np.min(np.abs(np.asarray(margin, np.float64))) > 1e-4
    elif algo in ("ppo", "grpo"):
        fractions = {float(update(state.replace(config=dataclasses.replace(
            config, clip_param=config.clip_param + d)), batch)[1][
                "clip_fraction"]) for d in (-1.2e-4, 0.0, 1.2e-4)}
        assert len(fractions) == 1, fractions


@pytest.mark.parametrize("algo", sorted(CASES))
def test_trainer_equals_pure_update_and_compiles_once(algo):
    trainer_cls, config, module, kind = CASES[algo]
    tx = optax.adam(1e-2)
    model, opt, trainer = _make(trainer_cls, config, kind, tx=tx, key=3)
    graphdef, params0 = nnx.split(model, nnx.Param)
    pure_config = dataclasses.replace(config, policy=_pure_policy(graphdef),
                                      optimizer=tx)
    state = module.init(nnx.as_pure(params0), pure_config,
                        key=jax.random.key(3))
    update = jax.jit(module.update)
    batches = _batches(algo, 4)
    for batch in batches:
        metrics = trainer.train_step(batch)
        last = state  # the state of the last step, whose metrics we compare
        state, pure_metrics = update(state, batch)
    _assert_discrete_metrics_clear_of_ties(algo, update, last, batch)
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert set(metrics) == set(pure_metrics)
    for k in metrics:
        np.testing.assert_allclose(metrics[k], pure_metrics[k], rtol=1e-5,
                                   atol=1e-6, err_msg=k)
    # optimiser state and counters written back
    for a, b in zip(jax.tree.leaves(nnx.as_pure(opt.opt_state)),
                    jax.tree.leaves(state.opt_state)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    per_step = (config.num_epochs * config.num_minibatches
                if algo == "ppo" else 1)
    assert int(opt.step.get_value()) == 4 * per_step
    assert trainer.step == 4
    np.testing.assert_array_equal(trainer.key, state.key)
    assert trainer._update._cache_size() == 1


SPEC_METRICS = {
    "reinforce": {"policy_loss", "loss", "mean_reward", "reward_std",
                  "entropy"},
    "ppo": {"policy_loss", "value_loss", "entropy", "mean_reward",
            "advantage_mean", "kl_divergence"},
    "grpo": {"policy_loss", "approx_kl", "loss", "mean_reward",
             "group_advantage_std", "kl_penalty"},
    "dpo": {"dpo_loss", "reward_accuracy", "loss", "chosen_reward",
            "rejected_reward", "reward_margin"},
}


@pytest.mark.parametrize("algo", sorted(CASES))
def test_metrics_are_the_union_of_the_guides_lists_and_stay_on_device(algo):
    trainer_cls, config, _, kind = CASES[algo]
    _, _, trainer = _make(trainer_cls, config, kind)
    batches = _batches(algo, 2)
    trainer.train_step(batches[0])  # compile outside the guard
    with jax.transfer_guard_device_to_host("disallow"):
        metrics = trainer.train_step(batches[1])
    assert SPEC_METRICS[algo] <= set(metrics)
    assert all(isinstance(v, jax.Array) and v.shape == () for v in
               metrics.values())
    assert all(np.isfinite(float(v)) for v in metrics.values())


@pytest.mark.parametrize("kind", ["logits", "dist"])
def test_model_may_return_logits_or_a_distribution(kind):
    batch = _batches("reinforce", 1)[0]
    results = []
    for k in ("logits", kind):
        model, _, trainer = _make(REINFORCETrainer, REINFORCEConfig(), k)
        trainer.train_step(batch)
        results.append(nnx.as_pure(nnx.state(model, nnx.Param)))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_ppo_value_head_with_distribution_output():
    batch = _batches("ppo", 1)[0]
    out = []
    for kind in ("ac", "ac_dist"):
        model, _, trainer = _make(PPOTrainer, PPOConfig(num_epochs=1), kind)
        out.append(trainer.train_step(batch)["value_loss"])
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(distribution or logits, value\)"):
        _make(PPOTrainer, PPOConfig(), "logits")[2].train_step(batch)


def test_hyperparameters_are_traced_no_recompile():
    _, _, trainer = _make(GRPOTrainer, GRPOConfig(), "dist")
    batch = _batches("grpo", 1)[0]
    trainer.train_step(batch)
    trainer.config = dataclasses.replace(trainer.config, beta=0.5,
                                         clip_param=0.1)
    trainer.train_step(batch)
    assert trainer._update._cache_size() == 1
    # a static field (group size) recompiles once
    trainer.train_step(dict(batch, group_size=8))
    assert trainer._update._cache_size() == 2


def test_grpo_reference_model_equals_reference_log_probs_in_batch():
    batch = _batches("grpo", 1)[0]
    # The initial policy's ratios are clear of the clip bounds 0.8 and 1.2
    # (relative 1e-4): clip_fraction, compared below, cannot differ between
    # the two compiled programs by rounding.
    logp = Policy(nnx.Rngs(0), "dist")(batch["observations"]).log_prob(
        batch["actions"])
    ratio = np.exp(np.asarray(logp, np.float64)
                   - np.asarray(batch["log_probs"], np.float64))
    assert np.min(np.abs(ratio[:, None] / [0.8, 1.2] - 1.0)) > 1e-4
    ref = Policy(nnx.Rngs(7), "dist")
    ref_before = nnx.as_pure(nnx.state(ref))
    _, _, with_model = _make(GRPOTrainer, GRPOConfig(beta=0.1), "dist",
                             reference_model=ref)
    m1 = with_model.train_step(batch)
    ref_lp = ref(batch["observations"]).log_prob(batch["actions"])
    _, _, with_batch = _make(GRPOTrainer, GRPOConfig(beta=0.1), "dist")
    m2 = with_batch.train_step(dict(batch, ref_log_probs=ref_lp))
    for k in m1:
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-7,
                                   err_msg=k)
    assert float(m1["kl"]) > 0
    np.testing.assert_allclose(m1["kl_penalty"], 0.1 * m1["kl"], rtol=1e-6)
    # the reference never moves
    for a, b in zip(jax.tree.leaves(ref_before),
                    jax.tree.leaves(nnx.as_pure(nnx.state(ref)))):
        np.testing.assert_array_equal(a, b)
    # without a reference there is no KL term
    _, _, plain = _make(GRPOTrainer, GRPOConfig(beta=0.1), "dist")
    assert float(plain.train_step(batch)["kl"]) == 0.0


def test_dpo_reference_model_and_errors():
    batch = _batches("dpo", 1)[0]
    ref = Policy(nnx.Rngs(7))
    _, _, trainer = _make(DPOTrainer, DPOConfig(), reference_model=ref)
    m1 = trainer.train_step(batch)
    # one-step responses: the reference log-prob of each pair's action
    ref_c = jax.nn.log_softmax(ref(batch["chosen"]["observations"]))[
        jnp.arange(B), batch["chosen"]["actions"]]
    ref_r = jax.nn.log_softmax(ref(batch["rejected"]["observations"]))[
        jnp.arange(B), batch["rejected"]["actions"]]
    _, _, explicit = _make(DPOTrainer, DPOConfig())
    m2 = explicit.train_step(dict(batch, ref_chosen_log_probs=ref_c,
                                  ref_rejected_log_probs=ref_r))
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    _, _, no_ref = _make(DPOTrainer, DPOConfig())
    with pytest.raises(ValueError, match="reference_free=True"):
        no_ref.train_step(batch)


def test_dpo_flat_log_probs_warn_and_leave_params_unchanged():
    model, _, trainer = _make(DPOTrainer, DPOConfig(beta=0.1))
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    flat = dict(chosen_log_probs=jnp.array([-1.0, -2.0]),
                rejected_log_probs=jnp.array([-2.0, -1.0]),
                ref_chosen_log_probs=jnp.array([-1.5, -1.5]),
                ref_rejected_log_probs=jnp.array([-1.5, -1.5]))
    with pytest.warns(UserWarning, match="no gradient"):
        m = trainer.train_step(flat)
    # hand-computed: margins 0.1*(0.5 - -0.5)=0.1 and 0.1*(-0.5-0.5)=-0.1
    expected = np.mean([np.log1p(np.exp(-0.1)), np.log1p(np.exp(0.1))])
    np.testing.assert_allclose(m["dpo_loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(m["reward_accuracy"], 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.train_step(flat)  # warns once only
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_constructor_errors():
    model = Policy(nnx.Rngs(0))
    other = Policy(nnx.Rngs(1))
    other.extra = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    with pytest.raises(TypeError, match="nnx.Optimizer"):
        REINFORCETrainer(model, optax.adam(1e-3))
    with pytest.raises(ValueError, match="not built for `model`"):
        REINFORCETrainer(other, opt)
    with pytest.raises(ValueError, match="config.policy"):
        REINFORCETrainer(model, opt, REINFORCEConfig(policy=lambda p, o: o))
    with pytest.raises(TypeError, match="PPOConfig"):
        PPOTrainer(model, opt, GRPOConfig())
    with pytest.raises(TypeError, match="reference_model"):
        GRPOTrainer(model, opt, reference_model=lambda x: x)
    with pytest.raises(ValueError, match="does not use a reference model"):
        REINFORCETrainer(model, opt, reference_model=Policy(nnx.Rngs(2)))
    # default configs are the guide's defaults
    t = PPOTrainer(model, opt)
    assert (t.config.gamma, t.config.gae_lambda, t.config.clip_param,
            t.config.vf_coeff, t.config.entropy_coeff,
            t.config.max_grad_norm) == (0.99, 0.95, 0.2, 0.5, 0.01, 0.5)


def test_other_variables_are_read_only_and_visible():
    class WithStats(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(OBS, ACT, rngs=rngs)
            self.bn = nnx.BatchNorm(OBS, rngs=rngs)

        def __call__(self, x):
            return self.lin(self.bn(x, use_running_average=True))

    model = WithStats(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    trainer = REINFORCETrainer(model, opt)
    batch = _batches("reinforce", 1)[0]
    model.bn.mean.set_value(jnp.full((OBS,), 3.0))  # user edit seen
    m1 = trainer.compute_loss(model, batch)[1]
    model.bn.mean.set_value(jnp.zeros((OBS,)))
    m2 = trainer.compute_loss(model, batch)[1]
    assert float(m1["entropy"]) != float(m2["entropy"])
    trainer.train_step(batch)
    np.testing.assert_array_equal(model.bn.mean.get_value(), 0.0)


@pytest.mark.parametrize("algo", ["ppo", "grpo-generate"])
def test_resume_from_checkpoint_continues_exactly(algo, tmp_path):
    from artifex_fn.training.callbacks import CheckpointConfig
    from artifex_fn.training.callbacks import ModelCheckpoint
    from artifex_fn.training.callbacks import restore_checkpoint

    if algo == "ppo":
        cls, config, kind = PPOTrainer, PPOConfig(num_minibatches=4), "ac"
        data = lambda step: _batches("ppo", 1)[0] if step % 2 else (
            _batches("ppo", 2)[1])
        fit_kw = {}
    else:
        cls, config, kind = GRPOTrainer, GRPOConfig(beta=0.1), "dist"
        data = lambda step: dict(observations=_data(step)["observations"][:4])
        fit_kw = dict(reward_fn=lambda s, c: (s == 1).astype(jnp.float32),
                      key=11)

    def run(n, start=None, ckpt_dir=None):
        model, _, trainer = _make(cls, config, kind, key=5,
                                  reference_model=(Policy(nnx.Rngs(9), kind)
                                                   if algo != "ppo" else None))
        if start is not None:
            assert restore_checkpoint(trainer, start) == 6
        cbs = [] if ckpt_dir is None else [ModelCheckpoint(CheckpointConfig(
            dirpath=ckpt_dir, monitor="loss", async_save=False))]
        trainer.fit(data, num_steps=n, callbacks=cbs, **fit_kw)
        return trainer, nnx.as_pure(nnx.state(model, nnx.Param))

    full, p_full = run(10)
    run(6, ckpt_dir=tmp_path)
    resumed, p_res = run(4, start=tmp_path)
    assert resumed.step == full.step == 10
    np.testing.assert_array_equal(resumed.key, full.key)
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_res)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(nnx.as_pure(full.optimizer.opt_state)),
                    jax.tree.leaves(nnx.as_pure(
                        resumed.optimizer.opt_state))):
        np.testing.assert_array_equal(a, b)
