"""Tests for KTO and ORPO: the losses (``afn.kto_loss``, ``afn.orpo_loss``),
the algorithms (``afn.kto``, ``afn.orpo``) and their trainers."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import artifex_fn as afn
from artifex_fn import training

from algo_fixtures import (ADAM, N_ACT, N_OBS, SGD, assert_all_finite,
                           assert_trees_close, init_params, lengths_mask,
                           linear_policy, np_log_prob_entropy, stack_trees,
                           token_obs, tree_index)

RTOL, ATOL = 1e-5, 1e-6
L = 5          # tokens per response
B = 6          # examples (KTO) or pairs (ORPO): micro-batches of 2 and 3

_kto_loss = jax.jit(afn.kto_loss)
_orpo_loss = jax.jit(afn.orpo_loss)
_kto_update = jax.jit(afn.kto.update)
_kto_eval = jax.jit(afn.kto.loss)
_orpo_update = jax.jit(afn.orpo.update)
_orpo_eval = jax.jit(afn.orpo.loss)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _f32(x):
    return jnp.asarray(x, jnp.float32)


# -- layer 1: the losses ------------------------------------------------------

def _np_kto(policy, ref, desirable, kl, beta, w_d, w_u):
    rho = np.asarray(policy, np.float64) - np.asarray(ref, np.float64)
    z = max(float(kl), 0.0)
    loss = np.where(desirable, w_d * (1.0 - _sigmoid(beta * (rho - z))),
                    w_u * (1.0 - _sigmoid(beta * (z - rho))))
    return loss, beta * rho


@pytest.mark.parametrize("kl", [0.7, -2.0])
def test_kto_loss_by_hand(kl):
    """Both labels, weights, and the clamp of the reference point at 0."""
    rng = np.random.default_rng(0)
    policy = rng.normal(-6.0, 2.0, 5)
    ref = rng.normal(-6.0, 2.0, 5)
    desirable = np.array([True, False, True, True, False])
    out = _kto_loss(_f32(policy), _f32(ref), jnp.asarray(desirable), kl,
                    beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    assert isinstance(out, afn.KTOLoss) and out.loss.shape == (5,)
    loss, rewards = _np_kto(policy, ref, desirable, kl, 0.3, 1.5, 0.7)
    np.testing.assert_allclose(out.loss, loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.rewards, rewards, rtol=RTOL, atol=ATOL)
    if kl < 0:   # a negative KL estimate acts as 0
        zero = _kto_loss(_f32(policy), _f32(ref), jnp.asarray(desirable),
                         0.0, beta=0.3, desirable_weight=1.5,
                         undesirable_weight=0.7)
        np.testing.assert_array_equal(out.loss, zero.loss)


def test_kto_gradient_by_hand_treats_the_reference_point_as_constant():
    """dL/d log pi: -w_D beta s(1 - s) with s = sigmoid(beta (z - rho))
    (desirable), +w_U beta s(1 - s) with s = sigmoid(beta (rho - z))
    (undesirable); z computed from the policy itself passes no gradient,
    nor do the reference log-probs or the rewards."""
    policy = np.array([-3.0, -8.0, -1.0, -4.0])
    ref = np.array([-3.5, -7.0, -2.0, -6.0])
    desirable = np.array([True, False, False, True])
    beta, w_d, w_u = 0.5, 1.2, 0.8

    def total(p, r):
        kl = jnp.mean(p - r)   # z depends on the policy: stop_gradient
        return jnp.sum(afn.kto_loss(p, r, jnp.asarray(desirable), kl,
                                    beta=beta, desirable_weight=w_d,
                                    undesirable_weight=w_u).loss)

    g_p, g_r = jax.jit(jax.grad(total, argnums=(0, 1)))(_f32(policy),
                                                        _f32(ref))
    rho = policy - ref
    z = max(rho.mean(), 0.0)
    s_d = _sigmoid(beta * (z - rho))
    s_u = _sigmoid(beta * (rho - z))
    want = np.where(desirable, -w_d * beta * s_d * (1 - s_d),
                    w_u * beta * s_u * (1 - s_u))
    np.testing.assert_allclose(g_p, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g_r, np.zeros(4))
    rewards_grad = jax.grad(lambda p: jnp.sum(afn.kto_loss(
        p, _f32(ref), jnp.asarray(desirable), 0.0).rewards))(_f32(policy))
    np.testing.assert_array_equal(rewards_grad, np.zeros(4))


def test_kto_extreme_log_ratios_are_finite():
    """Huge log-ratios saturate without NaN in either branch or gradient."""
    p = _f32([1e4, -1e4, 1e4, -1e4])
    d = jnp.array([True, True, False, False])
    f = lambda x: jnp.sum(afn.kto_loss(x, jnp.zeros(4), d, 0.0,
                                       beta=1.0).loss)
    np.testing.assert_allclose(
        afn.kto_loss(p, jnp.zeros(4), d, 0.0, beta=1.0).loss,
        [0.0, 1.0, 1.0, 0.0], atol=1e-6)
    assert_all_finite(jax.grad(f)(p))


def _np_log_odds(a):
    return a - np.log1p(-np.exp(a))


def test_orpo_loss_and_log_odds_by_hand():
    """log-odds = (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l)) on mean
    token log-probs (length 0 counted as 1); rewards lambda * a."""
    chosen = np.array([-2.0, -9.0, -0.5, -3.0])
    rejected = np.array([-6.0, -4.0, -1.5, -0.2])
    len_c = np.array([2.0, 3.0, 1.0, 0.0])
    len_r = np.array([3.0, 1.0, 5.0, 2.0])
    out = _orpo_loss(_f32(chosen), _f32(rejected), _f32(len_c), _f32(len_r),
                     lambda_=0.25)
    assert isinstance(out, afn.ORPOLoss)
    a_w = chosen / np.maximum(len_c, 1.0)
    a_l = rejected / np.maximum(len_r, 1.0)
    log_odds = (a_w - a_l) - (np.log1p(-np.exp(a_w)) - np.log1p(-np.exp(a_l)))
    np.testing.assert_allclose(out.log_odds, log_odds, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.loss, -0.25 * np.log(_sigmoid(log_odds)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.chosen_rewards, 0.25 * a_w, rtol=1e-6)
    np.testing.assert_allclose(out.rejected_rewards, 0.25 * a_l, rtol=1e-6)
    # The odds of p = 1/2 are 1, of p = 1/3 are 1/2: log-odds ratio log 2.
    half = _orpo_loss(_f32([math.log(0.5)]), _f32([math.log(1 / 3)]),
                      jnp.ones(1), jnp.ones(1), lambda_=1.0)
    np.testing.assert_allclose(half.log_odds, [math.log(2.0)], rtol=1e-5)


def test_orpo_is_finite_as_the_mean_log_prob_goes_to_zero():
    """a -> 0^- (p -> 1) and a = 0 (an empty response): finite value and
    gradient; at and above the clamp (-1e-6) the value is the clamp's."""
    chosen = _f32([-1e-3, -1e-6, -1e-9, 0.0])
    rejected = _f32([-2.0, -2.0, -2.0, -2.0])
    ones = jnp.ones(4)
    out = _orpo_loss(chosen, rejected, ones, ones, lambda_=1.0)
    assert_all_finite(out)
    np.testing.assert_allclose(out.log_odds[0],
                               _np_log_odds(-1e-3) - _np_log_odds(-2.0),
                               rtol=1e-4)
    np.testing.assert_allclose(out.log_odds[1:], out.log_odds[1], rtol=1e-6)
    grads = jax.grad(lambda c: jnp.sum(afn.orpo_loss(
        c, rejected, ones, ones, lambda_=1.0).loss))(chosen)
    assert_all_finite(grads)
    np.testing.assert_array_equal(grads[2:], [0.0, 0.0])


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(-60.0, 0.0, width=32), min_size=2, max_size=2),
       st.floats(0.0, 2.0))
def test_orpo_matches_the_formula_wherever_it_is_defined(a, lam):
    a_w, a_l = (min(x, -1e-3) for x in a)
    out = _orpo_loss(_f32([a_w]), _f32([a_l]), jnp.ones(1), jnp.ones(1),
                     lambda_=lam)
    log_odds = _np_log_odds(np.float64(a_w)) - _np_log_odds(np.float64(a_l))
    np.testing.assert_allclose(out.log_odds, [log_odds], rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(
        out.loss, [lam * np.logaddexp(0.0, -log_odds)], rtol=1e-4,
        atol=1e-5)


def test_losses_reject_bad_input_naming_the_argument():
    z2, z3 = jnp.zeros(2), jnp.zeros(3)
    d2 = jnp.array([True, False])
    for kwargs, name in [(dict(beta=0.0), "beta"),
                         (dict(desirable_weight=-1.0), "desirable_weight"),
                         (dict(undesirable_weight=-0.1),
                          "undesirable_weight")]:
        with pytest.raises(ValueError, match=name):
            afn.kto_loss(z2, z2, d2, 0.0, **kwargs)
    with pytest.raises(ValueError, match="ref_log_probs"):
        afn.kto_loss(z2, z3, d2, 0.0)
    with pytest.raises(ValueError, match="desirable"):
        afn.kto_loss(z2, z2, jnp.array([True]), 0.0)
    with pytest.raises(ValueError, match="kl_ref"):
        afn.kto_loss(z2, z2, d2, z3)
    with pytest.raises(ValueError, match="lambda_"):
        afn.orpo_loss(z2, z2, z2, z2, lambda_=-0.1)
    with pytest.raises(ValueError, match="rejected_log_probs"):
        afn.orpo_loss(z2, z3, z2, z2)
    with pytest.raises(ValueError, match="chosen_lengths"):
        afn.orpo_loss(z2, z2, z3, z3)


# -- layer 2: KTO -------------------------------------------------------------

def _side(rng, n):
    _, obs = token_obs(n, L)
    return dict(observations=obs,
                actions=jnp.asarray(rng.integers(0, N_ACT, (n, L))),
                mask=lengths_mask(rng.integers(1, L + 1, n), L))


def kto_problem(seed=0, n_kl=4):
    """``(config, params, batch)``: ``B`` labelled responses with reference
    log-probs and ``n_kl`` mismatched rows with theirs."""
    rng = np.random.default_rng(seed)
    batch = dict(_side(rng, B),
                 desirable=jnp.asarray([True, False, True, True, False,
                                        False]),
                 ref_log_probs=_f32(rng.normal(-5.0, 1.0, B)),
                 kl=_side(rng, n_kl),
                 kl_ref_log_probs=_f32(rng.normal(-6.0, 1.0, n_kl)))
    cfg = afn.kto.KTOConfig(beta=0.5, desirable_weight=1.3,
                            undesirable_weight=0.9, policy=linear_policy,
                            optimizer=ADAM)
    return cfg, init_params(seed), batch


def _np_sums(params, rows):
    pos = np.argmax(np.asarray(rows["observations"]), -1)
    logp, _ = np_log_prob_entropy(params, pos, np.asarray(rows["actions"]))
    mask = np.asarray(rows["mask"], np.float64)
    return (np.where(mask > 0, logp, 0.0) * mask).sum(-1), mask.sum(-1)


def _np_kto_metrics(cfg, params, batch, kl_ref=None, ref=None):
    policy, _ = _np_sums(params, batch)
    ref = np.asarray(batch["ref_log_probs"], np.float64) if ref is None \
        else ref
    if "kl" in batch:
        kl_policy, _ = _np_sums(params, batch["kl"])
        kl_ref = (np.asarray(batch["kl_ref_log_probs"], np.float64)
                  if kl_ref is None else kl_ref)
        z = max(np.mean(kl_policy - kl_ref), 0.0)
    else:
        z = max(np.mean(policy - ref), 0.0)
    d = np.asarray(batch["desirable"])
    loss, rewards = _np_kto(policy, ref, d, z, cfg.beta,
                            cfg.desirable_weight, cfg.undesirable_weight)
    return {"loss": loss.mean(), "kl": z, "logratio": (policy - ref).mean(),
            "rewards/chosen": rewards[d].mean() if d.any() else 0.0,
            "rewards/rejected": rewards[~d].mean() if (~d).any() else 0.0}


def _assert_metrics(got, want, rtol=1e-5, atol=1e-6):
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=rtol, atol=atol,
                                   err_msg=k)


def test_kto_loss_and_metrics_by_hand():
    cfg, params, batch = kto_problem(1)
    want = _np_kto_metrics(cfg, params, batch)
    assert want["kl"] > 0   # the mismatched rows' estimate is used
    loss, m = _kto_eval(params, batch, cfg)
    np.testing.assert_allclose(loss, want["loss"], rtol=RTOL, atol=ATOL)
    _assert_metrics(m, want)
    # Without `kl` rows the batch's own rows give the reference point;
    # with a large negative log-ratio it is clamped to 0.
    own = {k: v for k, v in batch.items() if not k.startswith("kl")}
    _, m = _kto_eval(params, own, cfg)
    _assert_metrics(m, _np_kto_metrics(cfg, params, own))
    low = dict(own, ref_log_probs=own["ref_log_probs"] + 50.0)
    _, m = _kto_eval(params, low, cfg)
    assert float(m["kl"]) == 0.0
    _assert_metrics(m, _np_kto_metrics(cfg, params, low))
    # No undesirable example: its mean reward is 0.
    all_good = dict(own, desirable=jnp.ones(B, bool))
    _, m = _kto_eval(params, all_good, cfg)
    assert float(m["rewards/rejected"]) == 0.0


def test_kto_update_is_a_gradient_step_with_the_reference_point_fixed():
    cfg, params, batch = kto_problem(2)
    cfg = dataclasses.replace(cfg, optimizer=SGD)
    new, m = _kto_update(afn.kto.init(params, cfg), batch)
    grads = jax.jit(jax.grad(lambda p: afn.kto.loss(p, batch, cfg)[0]))(
        params)
    want = jax.tree_util.tree_map(lambda p, g: p - g, params, grads)
    assert_trees_close(new.params, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(grads),
                               rtol=1e-5)
    _assert_metrics(m, _np_kto_metrics(cfg, params, batch))


def test_kto_reference_log_probs_from_ref_params():
    cfg, params, batch = kto_problem(3)
    bare = {k: v for k, v in batch.items() if "ref_log_probs" not in k}
    ref_params = init_params(30)
    _, m = _kto_update(afn.kto.init(params, cfg, ref_params=ref_params), bare)
    ref, _ = _np_sums(ref_params, batch)
    kl_ref, _ = _np_sums(ref_params, batch["kl"])
    _assert_metrics(m, _np_kto_metrics(cfg, params, batch, kl_ref=kl_ref,
                                       ref=ref), rtol=1e-4, atol=1e-5)
    # The reference is the policy: log-ratios, z and rewards are 0 and
    # every loss is w * sigmoid(0).
    _, m = _kto_update(afn.kto.init(params, cfg, ref_params=params), bare)
    d = np.asarray(batch["desirable"])
    np.testing.assert_allclose(
        m["loss"], np.mean(np.where(d, 1.3, 0.9) * 0.5), rtol=1e-5)
    np.testing.assert_allclose(m["kl"], 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="ref_log_probs"):
        _kto_update(afn.kto.init(params, cfg), bare)
    with pytest.raises(ValueError, match="kl_ref_log_probs"):
        _kto_update(afn.kto.init(params, cfg),
                    dict(bare, ref_log_probs=batch["ref_log_probs"]))


@pytest.mark.parametrize("k", [2, 3])
def test_kto_micro_batches_equal_the_plain_update(k):
    """The reference point is a whole-batch statistic, computed once: a
    step over k micro-batches is the plain step (4 kl rows: split for
    k = 2, in one piece for k = 3)."""
    cfg, params, batch = kto_problem(4)
    if k == 2:   # reference log-probs from ref_params, micro-batched too
        batch = {k_: v for k_, v in batch.items()
                 if "ref_log_probs" not in k_}
    ref_params = init_params(54)   # z > 0 for both batches
    plain = _kto_update(afn.kto.init(params, cfg, ref_params=ref_params),
                        batch)
    micro = _kto_update(afn.kto.init(params, dataclasses.replace(
        cfg, num_micro_batches=k), ref_params=ref_params), batch)
    assert_trees_close(micro[0].params, plain[0].params, rtol=1e-5,
                       atol=1e-5)
    _assert_metrics(micro[1], plain[1])
    assert float(plain[1]["kl"]) > 0


def _nan_padding(rows):
    """The rows with NaN observations and out-of-range actions where
    ``mask == 0``."""
    pad = np.asarray(rows["mask"]) == 0
    obs = np.asarray(rows["observations"]).copy()
    obs[pad] = np.nan
    actions = np.asarray(rows["actions"]).copy()
    actions[pad] = 10 ** 6
    return dict(rows, observations=jnp.asarray(obs),
                actions=jnp.asarray(actions))


def test_kto_nan_in_masked_padding_changes_nothing():
    cfg, params, batch = kto_problem(5)
    dirty = dict(_nan_padding(batch), kl=_nan_padding(batch["kl"]))
    clean = _kto_update(afn.kto.init(params, cfg), batch)
    noisy = _kto_update(afn.kto.init(params, cfg), dirty)
    assert_all_finite((noisy[0].params, noisy[1]))
    assert_trees_close(noisy[0].params, clean[0].params, rtol=0, atol=0)
    _assert_metrics(noisy[1], clean[1], rtol=0, atol=0)


def test_kto_jit_and_vmap_over_seeds():
    cfg, _, batch = kto_problem(6)
    states = [afn.kto.init(init_params(60 + i), cfg,
                           key=jax.random.PRNGKey(i)) for i in range(3)]
    out, metrics = jax.jit(jax.vmap(afn.kto.update, in_axes=(0, None)))(
        stack_trees(states), batch)
    for i, state in enumerate(states):
        ref_state, ref_metrics = _kto_update(state, batch)
        assert_trees_close(tree_index(out.params, i), ref_state.params,
                           rtol=1e-5, atol=1e-6)
        _assert_metrics(tree_index(metrics, i), ref_metrics, atol=1e-5)


def test_kto_bad_input_names_the_field():
    cfg, params, batch = kto_problem(7)
    state = afn.kto.init(params, cfg)
    bad = [
        ({k: v for k, v in batch.items() if k != "desirable"}, "desirable"),
        (dict(batch, desirable=jnp.ones(B)), r"batch\['desirable'\]"),
        (dict(batch, desirable=jnp.ones(B - 1, bool)),
         r"batch\['desirable'\]"),
        (dict(batch, ref_log_probs=jnp.zeros(B + 1)),
         r"batch\['ref_log_probs'\]"),
        (dict(batch, kl_ref_log_probs=jnp.zeros(1)),
         r"batch\['kl_ref_log_probs'\]"),
        (dict(batch, kl={"observations": batch["kl"]["observations"]}),
         "actions"),
        ({k: v for k, v in batch.items() if k != "kl"},
         r"batch\['kl'\], which is missing"),
        (dict(batch, mask=jnp.ones((B, L + 1))), r"batch\['mask'\]"),
        (dict(batch, ref_logprobs=batch["ref_log_probs"]), "unknown keys"),
    ]
    for b, match in bad:
        with pytest.raises(ValueError, match=match):
            afn.kto.update(state, b)
    for field, value in [("beta", 0.0), ("desirable_weight", -1.0),
                         ("undesirable_weight", math.nan),
                         ("num_micro_batches", 0),
                         ("max_grad_norm", -1.0)]:
        with pytest.raises(ValueError, match=field):
            afn.kto.KTOConfig(**{field: value})


def _token_layout(rng, n):
    prompt = jnp.asarray(rng.integers(0, 9, (n, 3)))
    completion = jnp.asarray(rng.integers(0, 9, (n, L)))
    return dict(observations=dict(prompt=prompt, completion=completion),
                actions=completion,
                mask=lengths_mask(rng.integers(1, L + 1, n), L))


def test_pairs_to_unpaired():
    rng = np.random.default_rng(8)
    pairs = dict(chosen=_token_layout(rng, 3), rejected=_token_layout(rng, 3),
                 ref_chosen_log_probs=_f32([-1.0, -2.0, -3.0]),
                 ref_rejected_log_probs=_f32([-4.0, -5.0, -6.0]))
    out = afn.kto.pairs_to_unpaired(pairs)
    np.testing.assert_array_equal(out["desirable"], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["ref_log_probs"],
                                  [-1, -2, -3, -4, -5, -6])
    rows = np.concatenate([pairs["chosen"]["actions"],
                           pairs["rejected"]["actions"]])
    np.testing.assert_array_equal(out["actions"], rows)
    # kl rows: prompt i with the completion (and mask) of row i + 1.
    kl = out["kl"]
    np.testing.assert_array_equal(kl["observations"]["prompt"],
                                  out["observations"]["prompt"])
    np.testing.assert_array_equal(kl["actions"], np.roll(rows, -1, 0))
    np.testing.assert_array_equal(kl["observations"]["completion"],
                                  np.roll(rows, -1, 0))
    np.testing.assert_array_equal(kl["mask"], np.roll(out["mask"], -1, 0))
    # One-step layout: kl rows only when the observations are the prompts.
    obs = jnp.eye(N_OBS)[:2]
    side = lambda a: dict(observations=obs, actions=jnp.asarray(a))
    flat = dict(chosen=side([0, 1]), rejected=side([2, 3]))
    assert "kl" not in afn.kto.pairs_to_unpaired(flat)
    one_step = afn.kto.pairs_to_unpaired(flat, observations_are_prompts=True)
    np.testing.assert_array_equal(one_step["kl"]["actions"], [1, 2, 3, 0])
    np.testing.assert_array_equal(one_step["kl"]["observations"],
                                  one_step["observations"])
    single = dict(chosen=side([0]), rejected=side([2]))
    single = jax.tree_util.tree_map(lambda x: x[:1], single)
    assert "kl" not in afn.kto.pairs_to_unpaired(
        single, observations_are_prompts=True)
    with pytest.raises(ValueError, match="ref_rejected_log_probs"):
        afn.kto.pairs_to_unpaired({k: v for k, v in pairs.items()
                                   if k != "ref_rejected_log_probs"})
    short = dict(pairs, rejected=jax.tree_util.tree_map(
        lambda x: x[:, :2], pairs["rejected"]))
    with pytest.raises(ValueError, match="pad"):
        afn.kto.pairs_to_unpaired(short)


# -- layer 2: ORPO ------------------------------------------------------------

def orpo_problem(seed=0):
    rng = np.random.default_rng(seed)
    batch = dict(chosen=_side(rng, B), rejected=_side(rng, B))
    cfg = afn.orpo.ORPOConfig(lambda_=0.3, policy=linear_policy,
                              optimizer=ADAM)
    return cfg, init_params(seed), batch


def _np_orpo_metrics(params, batch, lam):
    c, len_c = _np_sums(params, batch["chosen"])
    r, len_r = _np_sums(params, batch["rejected"])
    a_c, a_r = c / np.maximum(len_c, 1), r / np.maximum(len_r, 1)
    log_odds = _np_log_odds(a_c) - _np_log_odds(a_r)
    or_loss = np.mean(lam * np.logaddexp(0.0, -log_odds))
    nll = -c.sum() / len_c.sum()
    return dict(loss=nll + or_loss, nll_loss=nll, or_loss=or_loss,
                log_odds=log_odds.mean(),
                reward_accuracy=np.mean(a_c > a_r),
                chosen_reward=lam * a_c.mean(),
                rejected_reward=lam * a_r.mean(),
                reward_margin=lam * (a_c - a_r).mean())


def test_orpo_loss_and_metrics_by_hand():
    cfg, params, batch = orpo_problem(10)
    loss, m = _orpo_eval(params, batch, cfg)
    want = _np_orpo_metrics(params, batch, 0.3)
    np.testing.assert_allclose(loss, want["loss"], rtol=RTOL)
    _assert_metrics(m, want)
    # The NLL is a token mean over the batch, not a mean of per-pair means.
    c, len_c = _np_sums(params, batch["chosen"])
    assert abs(np.mean(c / len_c) - c.sum() / len_c.sum()) > 1e-3
    # Without masks every response has L tokens.
    full = {s: {k: v for k, v in batch[s].items() if k != "mask"}
            for s in ("chosen", "rejected")}
    ones = {s: dict(full[s], mask=jnp.ones((B, L))) for s in full}
    _, m_full = _orpo_eval(params, full, cfg)
    _assert_metrics(m_full, _np_orpo_metrics(params, ones, 0.3))


def test_orpo_update_micro_batches_nan_padding_jit_and_vmap():
    cfg, params, batch = orpo_problem(11)
    state = afn.orpo.init(params, cfg)
    plain = _orpo_update(state, batch)
    _assert_metrics(plain[1], _np_orpo_metrics(params, batch, 0.3))
    for k in (2, 3):
        micro = _orpo_update(afn.orpo.init(params, dataclasses.replace(
            cfg, num_micro_batches=k)), batch)
        assert_trees_close(micro[0].params, plain[0].params, rtol=1e-5,
                           atol=1e-5)
        _assert_metrics(micro[1], plain[1])
    dirty = {s: _nan_padding(batch[s]) for s in ("chosen", "rejected")}
    noisy = _orpo_update(state, dirty)
    assert_trees_close(noisy[0].params, plain[0].params, rtol=0, atol=0)
    states = [afn.orpo.init(init_params(70 + i), cfg) for i in range(3)]
    out, metrics = jax.jit(jax.vmap(afn.orpo.update, in_axes=(0, None)))(
        stack_trees(states), batch)
    for i, s in enumerate(states):
        ref_state, ref_metrics = _orpo_update(s, batch)
        assert_trees_close(tree_index(out.params, i), ref_state.params,
                           rtol=1e-5, atol=1e-6)
        _assert_metrics(tree_index(metrics, i), ref_metrics, atol=1e-5)


def test_orpo_empty_and_certain_responses_are_finite():
    """An empty chosen response (a = 0) gives a finite step."""
    cfg, params, batch = orpo_problem(12)
    empty = dict(batch, chosen=dict(batch["chosen"],
                                    mask=jnp.zeros((B, L))))
    state, m = _orpo_update(afn.orpo.init(params, cfg), empty)
    assert_all_finite((state.params, m))
    np.testing.assert_allclose(m["nll_loss"], 0.0, atol=1e-7)


def test_orpo_bad_input_names_the_field():
    cfg, params, batch = orpo_problem(13)
    state = afn.orpo.init(params, cfg)
    bad = [
        (dict(batch, ref_chosen_log_probs=jnp.zeros(B)), "unknown keys"),
        ({"chosen": batch["chosen"]}, "rejected"),
        (dict(batch, rejected={"observations": batch["rejected"][
            "observations"]}), "actions"),
        (dict(batch, rejected=jax.tree_util.tree_map(
            lambda x: x[:B - 1], batch["rejected"])), "pairs"),
        (dict(batch, chosen=dict(batch["chosen"], mask=jnp.ones((B, 2)))),
         r"batch\['chosen'\]\['mask'\]"),
    ]
    for b, match in bad:
        with pytest.raises(ValueError, match=match):
            afn.orpo.update(state, b)
    with pytest.raises(TypeError, match=r"batch\['chosen'\]"):
        afn.orpo.loss(params, dict(batch, chosen=jnp.zeros(B)), cfg)
    with pytest.raises(ValueError, match="ref_params"):
        afn.orpo.init(params, cfg, ref_params=params)
    with pytest.raises(ValueError, match="lambda_"):
        afn.orpo.ORPOConfig(lambda_=-1.0)
    with pytest.raises(ValueError, match="num_micro_batches"):
        afn.orpo.ORPOConfig(num_micro_batches=0)


# -- layer 3: trainers --------------------------------------------------------

class TokenPolicy(nnx.Module):
    """Logits of a linear map of one-hot position observations."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(N_OBS, N_ACT, rngs=rngs)

    def __call__(self, observations):
        return self.linear(observations)


def _labelled(rng, n):
    """Desirable responses use tokens {0, 1}, undesirable ones {2, 3}."""
    _, obs = token_obs(n, L)
    good = rng.integers(0, 2, (n, L))
    bad = rng.integers(2, N_ACT, (n, L))
    mask = jnp.ones((n, L))
    side = lambda a: dict(observations=obs, actions=jnp.asarray(a),
                          mask=mask)
    return dict(chosen=side(good), rejected=side(bad))


def _optimizer(model):
    return nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)


def test_kto_trainer_matches_the_pure_update_and_learns():
    rng = np.random.default_rng(20)
    model, reference = TokenPolicy(nnx.Rngs(0)), TokenPolicy(nnx.Rngs(1))
    params0 = nnx.as_pure(nnx.state(model, nnx.Param))
    ref_params = nnx.as_pure(nnx.state(reference, nnx.Param))
    cfg = afn.kto.KTOConfig(beta=0.5)
    trainer = training.KTOTrainer(model, _optimizer(model), cfg,
                                  reference_model=reference)
    batch = afn.kto.pairs_to_unpaired(_labelled(rng, 4))
    assert "kl" not in batch    # the observations hold the response
    graphdef = nnx.graphdef(model)
    pure_cfg = dataclasses.replace(
        cfg, policy=lambda p, obs: nnx.merge(graphdef, p)(obs),
        optimizer=optax.adam(0.1))
    state, want = jax.jit(afn.kto.update)(
        afn.kto.init(params0, pure_cfg, ref_params=ref_params), batch)
    first = trainer.train_step(batch)
    assert set(first) == set(want)
    _assert_metrics(first, want)
    assert_trees_close(nnx.as_pure(nnx.state(model, nnx.Param)),
                       state.params, rtol=1e-5, atol=1e-6)
    for _ in range(15):
        last = trainer.train_step(batch)
    assert float(last["loss"]) < 0.5 * float(first["loss"])
    assert float(last["rewards/chosen"]) > float(last["rewards/rejected"])
    no_ref = training.KTOTrainer(model, _optimizer(model), cfg)
    with pytest.raises(ValueError, match="ref_log_probs"):
        no_ref.train_step(batch)


def test_orpo_trainer_learns_and_refuses_a_reference():
    rng = np.random.default_rng(21)
    model = TokenPolicy(nnx.Rngs(2))
    trainer = training.ORPOTrainer(model, _optimizer(model),
                                   afn.orpo.ORPOConfig(lambda_=0.5))
    batch = _labelled(rng, 4)
    first = trainer.train_step(batch)
    for _ in range(15):
        last = trainer.train_step(batch)
    assert float(last["loss"]) < 0.5 * float(first["loss"])
    assert float(last["reward_accuracy"]) == 1.0
    _, held = trainer.compute_loss(model, _labelled(rng, 4))
    assert float(held["reward_accuracy"]) == 1.0
    with pytest.raises(ValueError, match="no reference"):
        training.ORPOTrainer(model, _optimizer(model),
                             reference_model=TokenPolicy(nnx.Rngs(3)))
    with pytest.raises(ValueError, match="no reference"):
        training.ORPOTrainer(model, _optimizer(model), lora_reference=True)
