"""Bad and degenerate input to the math layer and the algorithms.

Every case here is a mistake a user makes: a hyper-parameter out of range,
a misspelt batch key, an array of the wrong shape. Each must give a clear
error naming the argument (and the expected shape or range) or, for a
traced value that cannot raise, NaN: never a silently wrong number.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import artifex_fn as afn

NAN = math.nan
R = jnp.ones((2, 3))
V4 = jnp.zeros((2, 4))
LP = jnp.full((2, 3), -1.0)


# --------------------------------------------------------------------------
# Hyper-parameters of the math functions: concrete values raise.
# --------------------------------------------------------------------------

MATH_CASES = [
    (lambda: afn.gae_advantages(R, V4, gamma=1.5, lambda_=0.9), "gamma"),
    (lambda: afn.gae_advantages(R, V4, gamma=-0.5, lambda_=0.9), "gamma"),
    (lambda: afn.gae_advantages(R, V4, gamma=NAN, lambda_=0.9), "gamma"),
    (lambda: afn.gae_advantages(R, V4, gamma=0.9, lambda_=1.2), "lambda_"),
    (lambda: afn.lambda_returns(R, V4, gamma=0.9, lambda_=-0.1), "lambda_"),
    (lambda: afn.discounted_returns(R, gamma=2.0), "gamma"),
    (lambda: afn.discounted_returns(R, gamma=jnp.array([0.9, 0.9, 1.1])),
     "gamma"),
    (lambda: afn.normalize_advantages(R, eps=-1.0), "eps"),
    (lambda: afn.normalize_advantages(R, ddof=-1), "ddof"),
    (lambda: afn.normalize_advantages(R, ddof=1.5), "ddof"),
    (lambda: afn.group_advantages(jnp.ones(4), group_size=2, eps=-1e-6),
     "eps"),
    (lambda: afn.group_advantages(jnp.ones(4), group_size=2, ddof=-1),
     "ddof"),
    (lambda: afn.clipped_surrogate_loss(LP, LP, R, clip_param=-0.2),
     "clip_param"),
    (lambda: afn.clipped_surrogate_loss(LP, LP, R, clip_param=1.5),
     "clip_param"),
    (lambda: afn.clipped_surrogate_loss(LP, LP, R, clip_param_high=-0.1),
     "clip_param_high"),
    (lambda: afn.clipped_surrogate_loss(LP, LP, R, dual_clip=0.5),
     "dual_clip"),
    (lambda: afn.clipped_surrogate_loss(LP, LP, R, max_log_ratio=0.0),
     "max_log_ratio"),
    (lambda: afn.clip_fraction(R, clip_param=-0.1), "clip_param"),
    (lambda: afn.importance_ratio(LP, LP, max_log_ratio=-1.0),
     "max_log_ratio"),
    (lambda: afn.value_loss(R, R, huber_delta=-1.0), "huber_delta"),
    (lambda: afn.value_loss(R, R, huber_delta=0.0), "huber_delta"),
    (lambda: afn.value_loss(R, R, old_values=R, value_clip_param=-0.1),
     "value_clip_param"),
    (lambda: afn.kl_estimate(LP, LP, clamp=0.0), "clamp"),
    (lambda: afn.kl_estimate(LP, LP, max_log_ratio=0.0), "max_log_ratio"),
    (lambda: afn.token_log_probs(jnp.zeros((2, 5)), jnp.zeros(2, int),
                                 temperature=0.0), "temperature"),
    (lambda: afn.token_log_probs(jnp.zeros((2, 5)), jnp.zeros(2, int),
                                 temperature=-1.0), "temperature"),
    (lambda: afn.token_log_probs(jnp.zeros((2, 5)), jnp.array([0, -1])),
     r"ids in \[0, 5\).*got -1"),
    (lambda: afn.token_log_probs(jnp.zeros((2, 5)), jnp.array([5, 0])),
     r"ids in \[0, 5\).*got 5"),
    (lambda: afn.token_log_probs(jnp.zeros((2, 5)), jnp.array([0, 9]),
                                 chunk_size=1), "got 9"),
    (lambda: afn.aggregate_loss(R, mode="seq_mean_token_sum_norm",
                                normalizer=0.0), "normalizer"),
    (lambda: afn.dpo_loss(*[jnp.zeros(2)] * 4, beta=0.0), "beta"),
    (lambda: afn.dpo_loss(*[jnp.zeros(2)] * 4, beta=-1.0), "beta"),
    (lambda: afn.dpo_loss(*[jnp.zeros(2)] * 4, label_smoothing=1.5),
     "label_smoothing"),
    (lambda: afn.dpo_loss(*[jnp.zeros(2)] * 4, loss_type="robust",
                          label_smoothing=0.5), "label_smoothing"),
    (lambda: afn.simpo_loss(*[jnp.ones(2)] * 4, beta=0.0), "beta"),
    (lambda: afn.simpo_loss(*[jnp.ones(2)] * 4, margin=NAN), "margin"),
]


@pytest.mark.parametrize("call, match", MATH_CASES)
def test_concrete_hyperparameter_out_of_range_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_range_errors_state_the_range():
    with pytest.raises(ValueError, match=r"`gamma` must be in \[0, 1\], "
                                         r"got 1\.5"):
        afn.discounted_returns(R, gamma=1.5)
    with pytest.raises(ValueError, match=r"`huber_delta` must be > 0, got"):
        afn.value_loss(R, R, huber_delta=0.0)


def test_padded_token_ids_and_discounts_are_not_checked():
    """Out-of-range ids or discounts in the padding are padding."""
    out = afn.token_log_probs(jnp.zeros((2, 5)), jnp.array([0, -1]),
                              mask=jnp.array([1, 0]))
    np.testing.assert_allclose(out, [-np.log(5.0), 0.0], rtol=1e-6)
    ret = afn.discounted_returns(jnp.ones((1, 3)), mask=jnp.array([[1, 1, 0]]),
                                 gamma=jnp.array([[0.5, 0.5, 7.0]]))
    np.testing.assert_allclose(ret, [[1.5, 1.0, 0.0]])


# --------------------------------------------------------------------------
# Traced values cannot raise: they give NaN, never a plausible number.
# --------------------------------------------------------------------------


def test_traced_out_of_range_gives_nan():
    gae = jax.jit(lambda g: afn.gae_advantages(R, V4, gamma=g, lambda_=0.9))
    assert np.all(np.isfinite(gae(0.9)))
    assert np.all(np.isnan(gae(1.5)))
    surrogate = jax.jit(lambda c: afn.clipped_surrogate_loss(
        LP, LP, R, dual_clip=c))
    assert np.all(np.isfinite(surrogate(2.0)))
    assert np.all(np.isnan(surrogate(0.5)))
    dpo = jax.jit(lambda b: afn.dpo_loss(*[jnp.zeros(2)] * 4, beta=b).loss)
    assert np.all(np.isnan(dpo(-1.0)))
    temp = jax.jit(lambda t: afn.token_log_probs(jnp.zeros((2, 5)),
                                                 jnp.zeros(2, int),
                                                 temperature=t))
    assert np.all(np.isnan(temp(0.0)))
    # A traced id out of range: NaN at that token only (not a wrapped id).
    ids = jax.jit(afn.token_log_probs)(jnp.zeros((3, 5)),
                                       jnp.array([1, -1, 5]))
    assert np.isfinite(ids[0]) and np.isnan(ids[1]) and np.isnan(ids[2])
    norm = jax.jit(lambda e: afn.normalize_advantages(jnp.arange(3.0),
                                                      eps=e))
    assert np.all(np.isnan(norm(-1.0)))


# --------------------------------------------------------------------------
# Algorithm configs.
# --------------------------------------------------------------------------

CONFIG_CASES = [
    (lambda: afn.grpo.GRPOConfig(beta=-1.0), "beta"),
    (lambda: afn.grpo.GRPOConfig(clip_param=-0.2), "clip_param"),
    (lambda: afn.grpo.GRPOConfig(clip_param=np.float32(2.0)), "clip_param"),
    (lambda: afn.grpo.GRPOConfig(beta=jnp.array(-1.0)), "beta"),
    (lambda: afn.grpo.GRPOConfig(gamma=1.5), "gamma"),
    (lambda: afn.grpo.GRPOConfig(advantage_eps=-1.0), "advantage_eps"),
    (lambda: afn.ppo.PPOConfig(gamma=1.5), "gamma"),
    (lambda: afn.ppo.PPOConfig(gae_lambda=-0.1), "gae_lambda"),
    (lambda: afn.ppo.PPOConfig(clip_param=-0.2), "clip_param"),
    (lambda: afn.ppo.PPOConfig(clip_param_high=-0.1), "clip_param_high"),
    (lambda: afn.ppo.PPOConfig(max_grad_norm=0.0), "max_grad_norm"),
    (lambda: afn.ppo.PPOConfig(vf_coeff=NAN), "vf_coeff"),
    (lambda: afn.reinforce.REINFORCEConfig(gamma=NAN), "gamma"),
    (lambda: afn.reinforce.REINFORCEConfig(entropy_coeff=-0.1),
     "entropy_coeff"),
    (lambda: afn.dpo.DPOConfig(beta=0.0), "beta"),
    (lambda: afn.dpo.DPOConfig(label_smoothing=1.5), "label_smoothing"),
    (lambda: afn.dpo.DPOConfig(simpo_margin=NAN), "simpo_margin"),
]


@pytest.mark.parametrize("make, match", CONFIG_CASES)
def test_config_out_of_range_raises_naming_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------------
# Algorithm batches.
# --------------------------------------------------------------------------

B, L, D, A = 8, 5, 3, 4
_RNG = np.random.default_rng(0)
OBS = jnp.asarray(_RNG.normal(size=(B, L, D)), jnp.float32)
ACT = jnp.asarray(_RNG.integers(0, A, (B, L)))
MASK = jnp.asarray(np.arange(L)[None] < _RNG.integers(1, L + 1, (B, 1)))
OLD = jnp.full((B, L), -np.log(A), jnp.float32)
REF = OLD + jnp.asarray(0.1 * _RNG.normal(size=(B, L)), jnp.float32)


def _policy(params, obs):
    return obs @ params["w"]


def _actor_critic(params, obs):
    return obs @ params["w"], obs @ params["v"]


def _two_values(params, obs):
    return obs @ params["w"], jnp.stack([obs @ params["v"]] * 2, -1)


PARAMS = {"w": jnp.asarray(_RNG.normal(size=(D, A)), jnp.float32),
          "v": jnp.asarray(_RNG.normal(size=(D,)), jnp.float32)}
SGD = optax.sgd(0.1)


def _grpo(**batch):
    base = dict(observations=OBS, actions=ACT, rewards=jnp.arange(B, dtype=float),
                log_probs=OLD, mask=MASK)
    state = afn.grpo.init(PARAMS, afn.grpo.GRPOConfig(
        num_generations=4, policy=_policy, optimizer=SGD))
    return afn.grpo.update(state, {k: v for k, v in dict(base, **batch).items()
                                   if v is not None})


def _ppo(policy=_actor_critic, **batch):
    base = dict(observations=OBS, actions=ACT, rewards=jnp.ones((B, L)),
                log_probs=OLD, values=jnp.zeros((B, L + 1)),
                dones=jnp.zeros((B, L), bool))
    state = afn.ppo.init(PARAMS, afn.ppo.PPOConfig(
        num_epochs=1, policy=policy, optimizer=SGD))
    return afn.ppo.update(state, {k: v for k, v in dict(base, **batch).items()
                                  if v is not None})


def _reinforce(**batch):
    base = dict(observations=OBS, actions=ACT, rewards=jnp.ones((B, L)),
                mask=MASK)
    state = afn.reinforce.init(PARAMS, afn.reinforce.REINFORCEConfig(
        policy=_policy, optimizer=SGD))
    return afn.reinforce.update(state, {k: v for k, v in dict(
        base, **batch).items() if v is not None})


def _dpo(batch):
    state = afn.dpo.init(PARAMS, afn.dpo.DPOConfig(
        reference_free=True, policy=_policy, optimizer=SGD))
    return afn.dpo.update(state, batch)


SIDE = dict(observations=OBS, actions=ACT, mask=MASK)

BATCH_CASES = [
    # Misspelt or unknown keys are errors listing the expected keys.
    (lambda: _grpo(ref_logprobs=REF), r"unknown keys \['ref_logprobs'\]"),
    (lambda: _grpo(log_probs=None), r"missing \['log_probs'\]"),
    (lambda: _ppo(value=jnp.zeros((B, L))), r"unknown keys \['value'\]"),
    (lambda: _reinforce(log_probs=OLD), r"unknown keys \['log_probs'\].*"
                                        r"'extras'"),
    (lambda: _dpo(dict(chosen=SIDE, rejected=SIDE, ref=1.0)),
     r"unknown keys \['ref'\]"),
    (lambda: _dpo(dict(chosen=dict(SIDE, masks=MASK), rejected=SIDE)),
     r"unknown keys \['masks'\]"),
    # Shapes: never reshaped to fit.
    (lambda: _grpo(ref_log_probs=REF.T),
     r"batch\['ref_log_probs'\]` must have shape \(8, 5\).*got \(5, 8\)"),
    (lambda: _grpo(ref_log_probs=REF[:, :-1]), r"batch\['ref_log_probs'\]"),
    (lambda: _grpo(rewards=jnp.zeros(6)),
     r"batch\['log_probs'\]` must be \[B\].*B = 6"),
    (lambda: _grpo(observations=OBS[:6]), r"batch\['observations'\]"),
    (lambda: _grpo(mask=MASK[:, :2]), r"batch\['mask'\]"),
    (lambda: _grpo(dones=jnp.zeros(B)), r"batch\['dones'\]"),
    (lambda: _ppo(log_probs=jnp.zeros((B, L + 1))),
     r"batch\['log_probs'\]` must have shape \(8, 5\)"),
    (lambda: _ppo(values=jnp.zeros((B, L + 2))),
     r"batch\['values'\]` must have shape \(8, 5\).*or \(8, 6\)"),
    (lambda: _ppo(dones=jnp.zeros((B, L - 1))), r"batch\['dones'\]"),
    (lambda: _ppo(actions=ACT[:, :-1]), r"batch\['actions'\]"),
    (lambda: _ppo(bootstrap_value=jnp.zeros(B + 1)),
     r"batch\['bootstrap_value'\]"),
    (lambda: _ppo(policy=_two_values), r"value head must return shape"),
    (lambda: _ppo(policy=_policy), r"\(distribution_or_logits, value\)"),
    (lambda: _reinforce(actions=ACT[:6]), r"batch\['actions'\]"),
    (lambda: _reinforce(mask=MASK[:, :2]), r"batch\['mask'\]"),
    (lambda: _reinforce(dones=jnp.zeros((B, L + 1))), r"batch\['dones'\]"),
    (lambda: _reinforce(actions=OBS.astype(jnp.float32)[..., 0]),
     r"integer ids"),
    (lambda: _dpo(dict(chosen=SIDE, rejected=dict(
        observations=OBS[:4], actions=ACT[:4]))), r"8 pairs.*4"),
    (lambda: _dpo(dict(chosen=dict(SIDE, mask=MASK[:, :3]), rejected=SIDE)),
     r"batch\['chosen'\]\['mask'\]"),
]


@pytest.mark.parametrize("call, match", BATCH_CASES)
def test_bad_batch_names_the_key_and_shape(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_group_size_error_blames_the_group_size_only_when_rows_agree():
    with pytest.raises(ValueError, match="multiple of the group size 4"):
        _grpo(observations=OBS[:6], actions=ACT[:6], rewards=jnp.zeros(6),
              log_probs=OLD[:6], mask=MASK[:6])


def test_dpo_token_array_batch_shows_the_expected_structure():
    with pytest.raises(TypeError, match=r"must be a dict with 'observations'"
                                        r".*'chosen': \{'observations'"):
        _dpo(dict(chosen=ACT, rejected=ACT))


def test_extras_are_carried_and_never_read():
    s1, m1 = _grpo()
    s2, m2 = _grpo(extras=dict(ids=np.arange(B), note="anything"))
    np.testing.assert_array_equal(s1.params["w"], s2.params["w"])
    assert float(m1["loss"]) == float(m2["loss"])


def test_traced_config_out_of_range_gives_nan_parameters_and_metrics():
    """vmap over clip_param values: the legal point trains, the illegal
    one gives NaN (never a clipped or otherwise plausible result)."""
    state = afn.grpo.init(PARAMS, afn.grpo.GRPOConfig(
        num_generations=4, policy=_policy, optimizer=SGD))
    batch = dict(observations=OBS, actions=ACT, rewards=jnp.arange(B, dtype=float),
                 log_probs=OLD, mask=MASK)

    def run(clip, beta):
        s = state.replace(config=dataclasses.replace(
            state.config, clip_param=clip, beta=beta))
        new, metrics = afn.grpo.update(s, batch)
        return new.params, metrics

    params, metrics = jax.jit(jax.vmap(run))(jnp.array([0.2, -0.2, 0.2]),
                                             jnp.array([0.0, 0.0, -1.0]))
    assert np.all(np.isfinite(params["w"][0]))
    assert np.all(np.isnan(params["w"][1])) and np.all(np.isnan(params["w"][2]))
    assert np.isfinite(metrics["loss"][0]) and np.isnan(metrics["loss"][1])
    ppo_state = afn.ppo.init(PARAMS, afn.ppo.PPOConfig(
        num_epochs=1, policy=_actor_critic, optimizer=SGD))
    ppo_batch = dict(observations=OBS, actions=ACT, rewards=jnp.ones((B, L)),
                     log_probs=OLD, values=jnp.zeros((B, L + 1)))

    def ppo_run(gamma):
        new, metrics = afn.ppo.update(ppo_state.replace(
            config=dataclasses.replace(ppo_state.config, gamma=gamma)),
            ppo_batch)
        return new.params, metrics

    params, metrics = jax.jit(ppo_run)(1.5)
    assert np.all(np.isnan(params["w"])) and np.isnan(metrics["loss"])
    # Returned to the host, the config's value is concrete again: it raises.
    with pytest.raises(ValueError, match="gamma"):
        jax.jit(lambda g: afn.ppo.update(ppo_state.replace(
            config=dataclasses.replace(ppo_state.config, gamma=g)),
            ppo_batch))(1.5)
