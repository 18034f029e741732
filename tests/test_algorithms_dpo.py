"""Tests for DPO and SimPO (``artifex_fn.dpo``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import artifex_fn as afn
from artifex_fn import testing as aft

from algo_fixtures import (B, L, N_ACT, assert_all_finite, dpo_problem,
                           init_params, np_log_prob_entropy,
                           token_obs, with_fields)

_loss = jax.jit(afn.dpo.loss)
_update = jax.jit(afn.dpo.update)

RTOL, ATOL = 1e-5, 1e-6
LOG2 = math.log(2.0)


def _flat_batch(seed=0, n=6):
    rng = np.random.default_rng(seed)
    arrays = {k: rng.normal(-5.0, 1.5, n) for k in (
        "chosen_log_probs", "rejected_log_probs", "ref_chosen_log_probs",
        "ref_rejected_log_probs")}
    return {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}


def _np_args(batch):
    return [np.asarray(batch[k], np.float64) for k in (
        "chosen_log_probs", "rejected_log_probs", "ref_chosen_log_probs",
        "ref_rejected_log_probs")]


@pytest.mark.parametrize("loss_type,smoothing", [
    ("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0),
    ("robust", 0.2)])
def test_flat_loss_matches_reference(loss_type, smoothing):
    """Flat log-prob batch: mean of the per-pair reference loss."""
    batch = _flat_batch(1)
    cfg = afn.dpo.DPOConfig(beta=0.3, loss_type=loss_type,
                            label_smoothing=smoothing)
    loss, m = _loss(None, batch, cfg)
    expected, _, _ = aft.np_dpo_loss(*_np_args(batch), beta=0.3,
                                     loss_type=loss_type,
                                     label_smoothing=smoothing)
    np.testing.assert_allclose(loss, expected.mean(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["dpo_loss"], expected.mean(), rtol=RTOL,
                               atol=ATOL)


def test_flat_metrics_by_hand():
    """Implicit rewards are beta * log-ratios; accuracy counts margin > 0."""
    batch = _flat_batch(2)
    c, r, rc, rr = _np_args(batch)
    margin = 0.3 * ((c - rc) - (r - rr))
    assert 0 < np.mean(margin > 0) < 1
    # No margin within float32 rounding of 0, where the sign (and so the
    # accuracy) could depend on the machine.
    assert np.min(np.abs(margin)) > 1e-4
    _, m = _loss(None, batch, afn.dpo.DPOConfig(beta=0.3))
    np.testing.assert_allclose(m["reward_accuracy"], np.mean(margin > 0),
                               atol=1e-7)
    np.testing.assert_allclose(m["chosen_reward"], np.mean(0.3 * (c - rc)),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["rejected_reward"], np.mean(0.3 * (r - rr)),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["reward_margin"], margin.mean(), rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(m["chosen_log_probs"], c.mean(), rtol=RTOL)
    np.testing.assert_allclose(m["rejected_log_probs"], r.mean(), rtol=RTOL)
    loss = -np.mean(np.log(1.0 / (1.0 + np.exp(-margin))))
    np.testing.assert_allclose(m["loss"], loss, rtol=RTOL)


def test_equal_log_ratios_give_log_two():
    """Chosen and rejected log-ratios equal: sigmoid loss log 2, margin 0."""
    batch = _flat_batch(3)
    shift = batch["chosen_log_probs"] - batch["ref_chosen_log_probs"]
    batch = dict(batch, rejected_log_probs=batch["ref_rejected_log_probs"]
                 + shift)
    loss, m = _loss(None, batch, afn.dpo.DPOConfig(beta=0.7))
    np.testing.assert_allclose(loss, LOG2, rtol=1e-5)
    np.testing.assert_allclose(m["reward_margin"], 0.0, atol=1e-5)


def test_reference_free_is_simpo_with_lengths():
    """reference_free=True: SimPO on length-normalised log-probs."""
    rng = np.random.default_rng(4)
    batch = dict(_flat_batch(4),
                 chosen_lengths=jnp.asarray(rng.integers(1, 9, 6),
                                            jnp.float32),
                 rejected_lengths=jnp.asarray(rng.integers(1, 9, 6),
                                              jnp.float32))
    cfg = afn.dpo.DPOConfig(beta=2.0, simpo_margin=0.5, reference_free=True)
    loss, m = _loss(None, batch, cfg)
    c, r = _np_args(batch)[:2]
    lc = np.asarray(batch["chosen_lengths"])
    lr = np.asarray(batch["rejected_lengths"])
    expected, r_w, r_l = aft.np_simpo_loss(c, r, lc, lr, beta=2.0, margin=0.5)
    # Reward margins clear of 0: reward_accuracy is exact on any machine.
    assert np.min(np.abs(r_w - r_l)) > 1e-4
    np.testing.assert_allclose(loss, expected.mean(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["chosen_reward"], r_w.mean(), rtol=RTOL)
    np.testing.assert_allclose(m["rejected_reward"], r_l.mean(), rtol=RTOL)
    np.testing.assert_allclose(m["reward_accuracy"], np.mean(r_w > r_l),
                               atol=1e-7)


def _np_sequence_log_probs(params, side):
    pos = np.argmax(np.asarray(side["observations"]), -1)
    logp, _ = np_log_prob_entropy(params, pos, np.asarray(side["actions"]))
    mask = np.asarray(side["mask"], np.float64)
    return (logp * mask).sum(-1), mask.sum(-1)


def test_nested_batch_scores_masked_log_prob_sums():
    """{'chosen': ..., 'rejected': ...}: DPO on masked token log-prob sums."""
    cfg, params, batch = dpo_problem(5)
    sum_c, _ = _np_sequence_log_probs(params, batch["chosen"])
    sum_r, _ = _np_sequence_log_probs(params, batch["rejected"])
    ref_c = np.asarray(batch["ref_chosen_log_probs"], np.float64)
    ref_r = np.asarray(batch["ref_rejected_log_probs"], np.float64)
    expected, rw, rl = aft.np_dpo_loss(sum_c, sum_r, ref_c, ref_r,
                                       beta=cfg.beta)
    loss, m = _loss(params, batch, cfg)
    np.testing.assert_allclose(loss, expected.mean(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["chosen_log_probs"], sum_c.mean(),
                               rtol=RTOL)
    np.testing.assert_allclose(m["rejected_log_probs"], sum_r.mean(),
                               rtol=RTOL)
    np.testing.assert_allclose(m["reward_margin"], np.mean(rw - rl),
                               rtol=1e-4, atol=ATOL)


def test_nested_batch_simpo_uses_length_normalised_scores():
    """reference_free=True on responses: per-token mean log-probs."""
    cfg, params, batch = dpo_problem(6)
    cfg = with_fields(cfg, reference_free=True, beta=2.0, simpo_margin=0.3)
    sum_c, len_c = _np_sequence_log_probs(params, batch["chosen"])
    sum_r, len_r = _np_sequence_log_probs(params, batch["rejected"])
    assert not np.array_equal(len_c, len_r)
    expected, r_w, _ = aft.np_simpo_loss(sum_c, sum_r, len_c, len_r,
                                         beta=2.0, margin=0.3)
    loss, m = _loss(params, batch, cfg)
    np.testing.assert_allclose(loss, expected.mean(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["chosen_reward"], r_w.mean(), rtol=RTOL)


def _without_refs(batch):
    return {k: v for k, v in batch.items() if not k.startswith("ref_")}


def test_missing_reference_log_probs_raise():
    """reference_free=False needs reference log-probs: never a silent SimPO."""
    cfg, params, batch = dpo_problem(7)
    no_ref = _without_refs(batch)
    with pytest.raises(ValueError, match="reference"):
        _loss(params, no_ref, cfg)
    with pytest.raises(ValueError, match="reference"):
        _update(afn.dpo.init(params, cfg), no_ref)
    flat = _flat_batch(7)
    with pytest.raises(ValueError, match="ref_rejected_log_probs"):
        _loss(None, {k: v for k, v in flat.items()
                     if k != "ref_rejected_log_probs"}, cfg)


def test_update_needs_responses_to_score():
    """Flat log-probs carry no gradient: update rejects them."""
    cfg, params, _ = dpo_problem(8)
    with pytest.raises(ValueError, match="chosen"):
        _update(afn.dpo.init(params, cfg), _flat_batch(8))


def test_reference_params_supply_reference_log_probs():
    """state.ref_params scores the reference; ref == params gives log 2."""
    cfg, params, batch = dpo_problem(9)
    no_ref = _without_refs(batch)
    _, m = _update(afn.dpo.init(params, cfg, ref_params=params), no_ref)
    np.testing.assert_allclose(m["loss"], LOG2, rtol=1e-5)
    np.testing.assert_allclose(m["reward_margin"], 0.0, atol=1e-6)

    ref_params = init_params(90)
    sum_c, _ = _np_sequence_log_probs(params, batch["chosen"])
    sum_r, _ = _np_sequence_log_probs(params, batch["rejected"])
    ref_c, _ = _np_sequence_log_probs(ref_params, batch["chosen"])
    ref_r, _ = _np_sequence_log_probs(ref_params, batch["rejected"])
    expected, _, _ = aft.np_dpo_loss(sum_c, sum_r, ref_c, ref_r,
                                     beta=cfg.beta)
    _, m = _update(afn.dpo.init(params, cfg, ref_params=ref_params), no_ref)
    np.testing.assert_allclose(m["loss"], expected.mean(), rtol=1e-4)


def test_identical_chosen_and_rejected_are_finite_and_inert():
    """Same response on both sides: loss log 2 and a zero gradient."""
    cfg, params, batch = dpo_problem(10)
    same = dict(batch, rejected=batch["chosen"],
                ref_rejected_log_probs=batch["ref_chosen_log_probs"])
    state, m = _update(afn.dpo.init(params, cfg), same)
    np.testing.assert_allclose(m["loss"], LOG2, rtol=1e-5)
    assert float(m["grad_norm"]) == 0.0
    assert_all_finite((state.params, m))
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params,
                           params)


def test_empty_masks_are_finite():
    """Responses without valid tokens score 0 and give finite updates."""
    cfg, params, batch = dpo_problem(11)
    empty = {name: dict(batch[name], mask=jnp.zeros((B, L), jnp.float32))
             for name in ("chosen", "rejected")}
    empty = dict(batch, **empty)
    state, m = _update(afn.dpo.init(params, cfg), empty)
    assert_all_finite((state.params, m))
    assert float(m["chosen_log_probs"]) == 0.0
    assert float(m["grad_norm"]) == 0.0


def _preference_pairs(rng, n):
    """Chosen responses use tokens {0, 1}, rejected ones tokens {2, 3}."""
    _, obs = token_obs(B)
    chosen = rng.integers(0, 2, (n, L))
    rejected = rng.integers(2, N_ACT, (n, L))
    mask = jnp.ones((B, L), jnp.float32)
    ref = jnp.full((n,), -L * math.log(N_ACT), jnp.float32)
    side = lambda a: dict(observations=obs, actions=jnp.asarray(a),
                          mask=mask)
    return [dict(chosen=side(chosen[i:i + B]), rejected=side(
        rejected[i:i + B]), ref_chosen_log_probs=ref[i:i + B],
        ref_rejected_log_probs=ref[i:i + B]) for i in range(0, n, B)]


def test_learns_separable_preferences():
    """Train pairs reach accuracy 1.0; held-out pairs are ranked too."""
    rng = np.random.default_rng(12)
    train = _preference_pairs(rng, 4 * B)
    held_out = _preference_pairs(rng, 2 * B)
    cfg, _, _ = dpo_problem(0)
    params = init_params(0, scale=0.0)     # the uniform reference policy
    state = afn.dpo.init(params, cfg)
    _, m0 = _loss(state.params, train[0], cfg)
    assert float(m0["reward_accuracy"]) == 0.0   # all margins are zero
    for i in range(60):
        state, _ = _update(state, train[i % len(train)])
    for batch in train + held_out:
        loss, m = _loss(state.params, batch, cfg)
        assert float(m["reward_accuracy"]) == 1.0
        assert float(loss) < 0.5 * LOG2
