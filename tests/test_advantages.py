"""Tests for group-relative advantages and advantage normalisation.

Property tests run a jitted function that evaluates every (baseline, scale)
combination at once; drawn reward batches are cycled to a fixed number of
groups so that only a few shapes are compiled.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import artifex_fn as afn
from artifex_fn import testing as aft

from algo_fixtures import examples

BASELINES = ("mean", "rloo")
SCALES = ("group", "batch", "none")
GROUPS = 6
EPS_VALUES = (0.0, 1e-8, 1e-6, 1e-2)

# Group sizes up to 6 keep the number of compiled shapes small.
_GROUPED = aft.grouped_rewards(max_group_size=6)
_PAIRS_UP = aft.grouped_rewards(max_group_size=6, min_group_size=2)


PROPERTY = settings(max_examples=examples(40, ci_share=8), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------


def _legal(baseline, scale, group_size, ddof, n):
    if baseline == "rloo" and group_size < 2:
        return False
    if scale == "group" and ddof >= group_size:
        return False
    if scale == "batch" and ddof >= n:
        return False
    return True


@functools.partial(jax.jit, static_argnames="group_size")
def _all_group(rewards, eps, *, group_size):
    """Every legal (baseline, scale, ddof) combination for ddof 0 and 1."""
    out = {}
    for ddof in (0, 1):
        for baseline in BASELINES:
            for scale in SCALES:
                if _legal(baseline, scale, group_size, ddof,
                          rewards.shape[-1]):
                    out[baseline, scale, ddof] = afn.group_advantages(
                        rewards, group_size=group_size, baseline=baseline,
                        scale=scale, ddof=ddof, eps=eps)
    return out


def _canonical_groups(rewards, group_size):
    """Cycles the groups of a drawn batch to ``GROUPS`` groups."""
    groups = np.asarray(rewards).reshape(-1, group_size)
    return groups[np.arange(GROUPS) % groups.shape[0]].reshape(-1)


def _group_outputs(rewards, group_size, *, ddof=0, eps=0.0):
    """Float64 advantages for every legal combination (as NumPy arrays)."""
    with jax.enable_x64(True):
        out = _all_group(jnp.asarray(rewards, jnp.float64), jnp.float64(eps),
                         group_size=group_size)
        return {k[:2]: (np.asarray(v.advantages), np.asarray(v.zero_std))
                for k, v in out.items() if k[2] == ddof}


def _constant_groups(rewards, group_size):
    g = np.asarray(rewards).reshape(-1, group_size)
    return np.all(g == g[:, :1], axis=1)


# --------------------------------------------------------------------------
# group_advantages: agreement with the reference.
# --------------------------------------------------------------------------


@PROPERTY
@given(data=_GROUPED, ddof=st.sampled_from((0, 1)),
       eps=st.sampled_from(EPS_VALUES))
def test_group_advantages_matches_reference(data, ddof, eps):
    """Every legal baseline x scale combination equals np_group_advantages."""
    rewards, size = data
    rewards = _canonical_groups(rewards, size)
    out = _group_outputs(rewards, size, ddof=ddof, eps=eps)
    expected = {(b, s) for b in BASELINES for s in SCALES
                if _legal(b, s, size, ddof, rewards.size)}
    assert set(out) == expected
    for (baseline, scale), (adv, zero_std) in out.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            ref_adv, ref_zero = aft.np_group_advantages(
                rewards, size, baseline=baseline, scale=scale, ddof=ddof,
                eps=eps)
        assert adv.dtype == np.float64
        np.testing.assert_allclose(adv, ref_adv, rtol=1e-6, atol=1e-6,
                                   err_msg=f"{baseline} {scale}")
        np.testing.assert_array_equal(zero_std, ref_zero)


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("scale", SCALES)
def test_group_advantages_float32_matches_reference(baseline, scale):
    """float32 results agree with the float64 reference."""
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=24).astype(np.float32)
    rewards[4:8] = 0.5  # one constant group
    out = afn.group_advantages(rewards, group_size=4, baseline=baseline,
                               scale=scale, ddof=1)
    ref, ref_zero = aft.np_group_advantages(rewards, 4, baseline=baseline,
                                            scale=scale, ddof=1)
    assert out.advantages.dtype == jnp.float32
    np.testing.assert_allclose(out.advantages, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.zero_std, ref_zero)


# --------------------------------------------------------------------------
# group_advantages: properties.
# --------------------------------------------------------------------------


@PROPERTY
@given(data=_GROUPED, ddof=st.sampled_from((0, 1)),
       eps=st.sampled_from(EPS_VALUES))
def test_mean_baseline_gives_zero_mean_per_group(data, ddof, eps):
    """With the mean baseline every group's advantages sum to zero."""
    rewards, size = data
    rewards = _canonical_groups(rewards, size)
    out = _group_outputs(rewards, size, ddof=ddof, eps=eps)
    for scale in SCALES:
        if ("mean", scale) in out:
            adv = out["mean", scale][0].reshape(-1, size)
            np.testing.assert_allclose(adv.mean(axis=1), 0.0, atol=1e-9)


@PROPERTY
@given(data=_PAIRS_UP)
def test_rloo_is_rescaled_mean_baseline(data):
    """rloo == G / (G - 1) * (r - group mean) with scale='none'."""
    rewards, size = data
    rewards = _canonical_groups(rewards, size)
    out = _group_outputs(rewards, size)
    np.testing.assert_allclose(out["rloo", "none"][0],
                               size / (size - 1) * out["mean", "none"][0],
                               rtol=1e-12, atol=1e-12)
    # The leave-one-out form: r_i minus the mean of the other samples.
    g = rewards.astype(np.float64).reshape(-1, size)
    loo = g - (g.sum(axis=1, keepdims=True) - g) / (size - 1)
    np.testing.assert_allclose(out["rloo", "none"][0], loo.reshape(-1),
                               rtol=1e-9, atol=1e-9)


@PROPERTY
@given(data=_GROUPED, ddof=st.sampled_from((0, 1)),
       const_group=st.integers(0, GROUPS - 1), value=st.floats(-5, 5))
def test_zero_variance_groups_give_exact_zeros(data, ddof, const_group,
                                               value):
    """Constant groups give exactly 0.0 and no NaN anywhere, even at eps=0."""
    rewards, size = data
    rewards = _canonical_groups(rewards, size)
    rewards.reshape(-1, size)[const_group] = value
    constant = _constant_groups(rewards, size)
    out = _group_outputs(rewards, size, ddof=ddof, eps=0.0)
    for key, (adv, zero_std) in out.items():
        assert np.all(np.isfinite(adv)), key
        np.testing.assert_array_equal(zero_std, constant)
        assert np.all(adv.reshape(-1, size)[constant] == 0.0), key


@PROPERTY
@given(data=_GROUPED, shift_seed=st.integers(0, 2**16))
def test_invariant_to_per_group_shift(data, shift_seed):
    """Adding a constant to all rewards of a group changes nothing."""
    rewards, size = data
    # Rewards on a 1/8 grid, so that the shifted rewards are exact.
    rewards = np.round(_canonical_groups(rewards, size) * 8) / 8
    shift = np.random.default_rng(shift_seed).integers(-20, 20, GROUPS)
    shifted = rewards + np.repeat(shift, size)
    out = _group_outputs(rewards, size, eps=1e-6)
    out_shifted = _group_outputs(shifted, size, eps=1e-6)
    for key in out:
        np.testing.assert_allclose(out_shifted[key][0], out[key][0],
                                   rtol=1e-9, atol=1e-9, err_msg=str(key))
        np.testing.assert_array_equal(out_shifted[key][1], out[key][1])


@PROPERTY
@given(data=_PAIRS_UP, ddof=st.sampled_from((0, 1)))
def test_group_scale_gives_unit_std(data, ddof):
    """scale='group', eps=0: unit std (same ddof) in non-constant groups."""
    rewards, size = data
    rewards = _canonical_groups(rewards, size)
    adv = _group_outputs(rewards, size, ddof=ddof)["mean", "group"][0]
    adv = adv.reshape(-1, size)
    varying = ~_constant_groups(rewards, size)
    if varying.any():
        np.testing.assert_allclose(adv[varying].std(axis=1, ddof=ddof), 1.0,
                                   rtol=1e-9)


@PROPERTY
@given(data=_GROUPED, ddof=st.sampled_from((0, 1)))
def test_batch_scale_gives_unit_std(data, ddof):
    """scale='batch', eps=0: the row's advantages have unit std."""
    rewards, size = data
    rewards = _canonical_groups(rewards, size)
    adv = _group_outputs(rewards, size, ddof=ddof)["mean", "batch"][0]
    if not _constant_groups(rewards, size).all():
        np.testing.assert_allclose(adv.std(ddof=ddof), 1.0, rtol=1e-9)


def test_leading_batch_axes_equal_row_loop():
    """[P, N] rewards equal looping over the P rows (batch scale per row)."""
    rng = np.random.default_rng(1)
    rewards = rng.integers(0, 3, size=(3, 2, 12)).astype(np.float32)
    rewards[0, 1, :4] = 1.0
    batched = _all_group(jnp.asarray(rewards), 1e-6, group_size=4)
    for key, res in batched.items():
        if key[2] != 0:
            continue
        assert res.advantages.shape == (3, 2, 12)
        assert res.zero_std.shape == (3, 2, 3)
        for i in range(3):
            for j in range(2):
                ref, ref_zero = aft.np_group_advantages(
                    rewards[i, j], 4, baseline=key[0], scale=key[1],
                    eps=1e-6)
                np.testing.assert_allclose(res.advantages[i, j], ref,
                                           rtol=1e-5, atol=1e-5)
                np.testing.assert_array_equal(res.zero_std[i, j], ref_zero)


def test_vmap_equals_leading_axis():
    """jax.vmap over a leading axis equals the batched call."""
    rng = np.random.default_rng(2)
    rewards = jnp.asarray(rng.normal(size=(3, 8)).astype(np.float32))
    f = functools.partial(afn.group_advantages, group_size=4, scale="batch")
    mapped = jax.jit(jax.vmap(f))(rewards)
    batched = jax.jit(f)(rewards)
    np.testing.assert_allclose(mapped.advantages, batched.advantages,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(mapped.zero_std, batched.zero_std)


# --------------------------------------------------------------------------
# group_advantages: hand-computed cases.
# --------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    """GRPO, RLOO and Dr. GRPO on written-out examples."""
    r = jnp.array([1.0, 0.0, 1.0, 0.0])
    # Mean 0.5, population std 0.5: (r - 0.5) / 0.5.
    out = afn.group_advantages(r, group_size=4, eps=0.0)
    np.testing.assert_allclose(out.advantages, [1.0, -1.0, 1.0, -1.0])
    np.testing.assert_array_equal(out.zero_std, [False])
    # Sample std sqrt(1/3): 0.5 / sqrt(1/3) = sqrt(3) / 2.
    out = afn.group_advantages(r, group_size=4, ddof=1, eps=0.0)
    h = np.sqrt(3.0) / 2.0
    np.testing.assert_allclose(out.advantages, [h, -h, h, -h], rtol=1e-6)
    # Leave-one-out: 1 - 1/3 and 0 - 2/3, unscaled.
    out = afn.group_advantages(r, group_size=4, baseline="rloo",
                               scale="none")
    np.testing.assert_allclose(out.advantages,
                               [2 / 3, -2 / 3, 2 / 3, -2 / 3], rtol=1e-6)
    # Dr. GRPO: centred only.
    out = afn.group_advantages(r, group_size=4, scale="none")
    np.testing.assert_allclose(out.advantages, [0.5, -0.5, 0.5, -0.5])
    # Default eps: 0.5 / (0.5 + 1e-6).
    out = afn.group_advantages(r, group_size=4)
    np.testing.assert_allclose(out.advantages,
                               np.array([1, -1, 1, -1]) * 0.5 / (0.5 + 1e-6),
                               rtol=1e-6)


def test_group_advantages_hand_computed_two_groups():
    """Two groups of two, one of them constant."""
    r = jnp.array([1.0, 0.0, 2.0, 2.0])
    out = afn.group_advantages(r, group_size=2, eps=0.0)
    np.testing.assert_allclose(out.advantages, [1.0, -1.0, 0.0, 0.0])
    np.testing.assert_array_equal(out.zero_std, [False, True])
    # Batch scale: centred [0.5, -0.5, 0, 0] has std sqrt(0.125).
    out = afn.group_advantages(r, group_size=2, scale="batch", eps=0.0)
    c = 0.5 / np.sqrt(0.125)
    np.testing.assert_allclose(out.advantages, [c, -c, 0.0, 0.0], rtol=1e-6)
    # Leave-one-out with G = 2: r_i - r_j.
    out = afn.group_advantages(r, group_size=2, baseline="rloo",
                               scale="none")
    np.testing.assert_allclose(out.advantages, [1.0, -1.0, 0.0, 0.0])


def test_group_size_one():
    """Groups of one sample are constant: zero advantage, flagged."""
    out = afn.group_advantages(jnp.array([3.0, -1.0, 2.0]), group_size=1,
                               scale="none")
    np.testing.assert_array_equal(out.advantages, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(out.zero_std, [True, True, True])


# --------------------------------------------------------------------------
# group_advantages: bad input.
# --------------------------------------------------------------------------


_G = np.arange(8, dtype=np.float32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rewards=np.zeros(7), group_size=4), "group_size"),
    (dict(rewards=_G, group_size=0), "group_size"),
    (dict(rewards=_G, group_size=-2), "group_size"),
    (dict(rewards=_G, group_size=4.0), "group_size"),
    (dict(rewards=_G, group_size="4"), "group_size"),
    (dict(rewards=_G, group_size=1, baseline="rloo"), "rloo"),
    (dict(rewards=_G, group_size=4, ddof=4), "ddof"),
    (dict(rewards=_G, group_size=4, ddof=5), "ddof"),
    (dict(rewards=_G, group_size=4, ddof=8, scale="batch"), "ddof"),
    (dict(rewards=_G, group_size=4, scale="global"), "scale"),
    (dict(rewards=_G, group_size=4, baseline="median"), "baseline"),
    (dict(rewards=np.float32(1.0), group_size=1), "rewards"),
])
def test_group_advantages_bad_input(kwargs, match):
    """Invalid arguments raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        afn.group_advantages(**kwargs)


def test_group_ddof_only_checked_where_used():
    """ddof >= group_size is legal with scale='none' or 'batch'."""
    out = afn.group_advantages(_G, group_size=2, ddof=2, scale="none")
    np.testing.assert_allclose(out.advantages, np.tile([-0.5, 0.5], 4))
    out = afn.group_advantages(_G, group_size=2, ddof=3, scale="batch",
                               eps=0.0)
    c = 0.5 / np.sqrt(8 * 0.25 / 5)
    np.testing.assert_allclose(out.advantages, np.tile([-c, c], 4),
                               rtol=1e-6)


# --------------------------------------------------------------------------
# normalize_advantages.
# --------------------------------------------------------------------------

_SHAPE = (4, 8)


@functools.partial(jax.jit, static_argnames=("axis", "ddof"))
def _normalize(x, mask, eps, *, axis=None, ddof=0):
    return afn.normalize_advantages(x, mask=mask, eps=eps, axis=axis,
                                    ddof=ddof)


_ADVANTAGES = hnp.arrays(
    np.float32, _SHAPE,
    elements=st.one_of(st.sampled_from([0.0, 1.0]),
                       st.floats(-10, 10, width=32)))
_MASKS = hnp.arrays(np.bool_, _SHAPE)


@PROPERTY
@given(x=_ADVANTAGES, mask=_MASKS, use_mask=st.booleans(),
       ddof=st.sampled_from((0, 1)), eps=st.sampled_from(EPS_VALUES))
def test_normalize_matches_reference(x, mask, use_mask, ddof, eps):
    """Global (masked) normalisation equals np_normalize_advantages."""
    if not use_mask:
        mask = np.ones_like(mask)
    ref = aft.np_normalize_advantages(x, mask, eps=eps, ddof=ddof)
    with jax.enable_x64(True):
        out = np.asarray(_normalize(jnp.asarray(x, jnp.float64),
                                    jnp.asarray(mask), jnp.float64(eps),
                                    ddof=ddof))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, ref, rtol=1e-7, atol=1e-7)
    assert np.all(out[~mask] == 0.0)


@PROPERTY
@given(x=_ADVANTAGES, mask=_MASKS, ddof=st.sampled_from((0, 1)))
def test_normalize_per_row_equals_row_by_row(x, mask, ddof):
    """axis=-1 normalises each row on its own."""
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)
        eps = jnp.float64(1e-8)
        out = np.asarray(_normalize(x64, jnp.asarray(mask), eps, axis=-1,
                                    ddof=ddof))
        out_1 = np.asarray(_normalize(x64, jnp.asarray(mask), eps, axis=1,
                                      ddof=ddof))
    np.testing.assert_array_equal(out, out_1)
    for i in range(_SHAPE[0]):
        ref = aft.np_normalize_advantages(x[i], mask[i], eps=1e-8, ddof=ddof)
        np.testing.assert_allclose(out[i], ref, rtol=1e-7, atol=1e-7)


@PROPERTY
@given(x=_ADVANTAGES, mask=_MASKS)
def test_normalize_gives_zero_mean_unit_std(x, mask):
    """Valid entries end with mean 0 and std 1; padded entries are 0."""
    out = np.asarray(_normalize(jnp.asarray(x), jnp.asarray(mask),
                                jnp.float32(0.0)), np.float64)
    assert np.all(np.isfinite(out))
    assert np.all(out[~mask] == 0.0)
    valid = x[mask].astype(np.float64)
    if valid.size == 0 or valid.max() == valid.min():
        assert np.all(out == 0.0)
    elif valid.std() > 1e-3:
        np.testing.assert_allclose(out[mask].mean(), 0.0, atol=1e-5)
        np.testing.assert_allclose(out[mask].std(), 1.0, rtol=1e-4)


def test_normalize_hand_computed():
    """Docstring example and a masked example."""
    out = afn.normalize_advantages(jnp.array([1.0, 2.0, 3.0]), eps=0.0)
    np.testing.assert_allclose(out, [-1.2247449, 0.0, 1.2247449], rtol=1e-6)
    # Valid [1, 3]: mean 2, std 1; the masked 100 is left out and set to 0.
    out = afn.normalize_advantages(jnp.array([1.0, 100.0, 3.0]),
                                   mask=jnp.array([1, 0, 1]), eps=0.0)
    np.testing.assert_allclose(out, [-1.0, 0.0, 1.0], rtol=1e-6)
    out = afn.normalize_advantages(jnp.array([1.0, 3.0]), eps=0.0, ddof=1)
    s = 1.0 / np.sqrt(2.0)
    np.testing.assert_allclose(out, [-s, s], rtol=1e-6)


def test_normalize_constant_and_all_masked():
    """Constant input gives exact zeros; an all-masked input gives zeros."""
    ones = jnp.ones(_SHAPE, bool)
    x = jnp.full(_SHAPE, 0.1, jnp.float32)
    assert np.all(np.asarray(_normalize(x, ones, 1e-8)) == 0.0)
    assert np.all(np.asarray(_normalize(x, ones, 1e-8, axis=-1)) == 0.0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=_SHAPE), jnp.float32)
    out = np.asarray(_normalize(x, jnp.zeros(_SHAPE, bool), 1e-8))
    assert np.all(out == 0.0) and np.all(np.isfinite(out))
    # A constant row and an all-masked row next to ordinary rows.
    x = x.at[1].set(7.0)
    mask = ones.at[2].set(False)
    out = np.asarray(_normalize(x, mask, 1e-8, axis=-1))
    assert np.all(np.isfinite(out))
    assert np.all(out[1:3] == 0.0)
    for i in (0, 3):
        np.testing.assert_allclose(out[i], aft.np_normalize_advantages(x[i]),
                                   rtol=1e-5, atol=1e-5)


def test_normalize_mask_broadcasts():
    """A [T] mask applies to every row."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4)), jnp.float32)
    m = jnp.array([1, 1, 1, 0])
    out = afn.normalize_advantages(x, mask=m)
    full = afn.normalize_advantages(x, mask=jnp.broadcast_to(m, (2, 4)))
    np.testing.assert_array_equal(out, full)


def test_normalize_dtypes():
    """float64 stays float64; bfloat16 stays bfloat16 and is finite."""
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=_SHAPE))
        out = _normalize(x, jnp.ones(_SHAPE, bool), 1e-8)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, aft.np_normalize_advantages(x),
                                   rtol=1e-12, atol=1e-12)
        out = _all_group(jnp.arange(18.0, dtype=jnp.float64), 1e-6,
                         group_size=3)
        assert all(v.advantages.dtype == jnp.float64 for v in out.values())
    x = jnp.asarray(rng.normal(size=_SHAPE), jnp.bfloat16)
    out = _normalize(x, jnp.ones(_SHAPE, bool), 1e-8, axis=-1)
    assert out.dtype == jnp.bfloat16
    out32 = np.asarray(out, np.float32)
    assert np.all(np.isfinite(out32))
    ref = np.stack([aft.np_normalize_advantages(np.asarray(r, np.float32))
                    for r in x])
    np.testing.assert_allclose(out32, ref, rtol=2e-2, atol=2e-2)
    out = jax.jit(functools.partial(afn.group_advantages, group_size=4))(
        x.reshape(-1))
    assert out.advantages.dtype == jnp.bfloat16
    adv = np.asarray(out.advantages, np.float32)
    assert np.all(np.isfinite(adv))
    ref, _ = aft.np_group_advantages(np.asarray(x, np.float32).reshape(-1), 4)
    np.testing.assert_allclose(adv, ref, rtol=2e-2, atol=2e-2)


def test_normalize_vmap_equals_rows():
    """jax.vmap over rows equals per-row calls and axis=-1."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=_SHAPE), jnp.float32)
    m = jnp.asarray(rng.random(_SHAPE) < 0.7)
    mapped = jax.jit(jax.vmap(
        lambda x, m: afn.normalize_advantages(x, mask=m)))(x, m)
    per_axis = _normalize(x, m, 1e-8, axis=-1)
    for i in range(_SHAPE[0]):
        ref = aft.np_normalize_advantages(x[i], m[i])
        np.testing.assert_allclose(mapped[i], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mapped, per_axis, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(advantages=np.zeros((2, 3)), mask=np.ones((3, 2))), "mask"),
    (dict(advantages=np.zeros((2, 3)), axis=2), "axis"),
    (dict(advantages=np.zeros((2, 3)), axis=(0, -3)), "axis"),
])
def test_normalize_bad_input(kwargs, match):
    """Invalid arguments raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        afn.normalize_advantages(**kwargs)


def test_normalize_ddof_not_below_valid_count_stays_bounded():
    """ddof >= valid count does not blow the result up by 1 / eps."""
    x = np.array([1.0, 2.0, 3.0], np.float32)
    m = np.array([1, 1, 0])
    out = np.asarray(afn.normalize_advantages(x, mask=m, ddof=2))
    ref = aft.np_normalize_advantages(x, m, ddof=2)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Gradients.
# --------------------------------------------------------------------------


def test_gradients_match_finite_differences():
    """Directional derivatives match central finite differences."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        x = jnp.asarray(rng.normal(size=(3, 5)))
        m = jnp.asarray(rng.random((3, 5)) < 0.8).at[:, 0].set(True)
        w = [jnp.asarray(rng.normal(size=(3, 5))) for _ in range(3)]

        def loss(x):
            outs = (afn.normalize_advantages(x, mask=m),
                    afn.normalize_advantages(x, mask=m, axis=-1),
                    afn.group_advantages(x.reshape(-1), group_size=5,
                                         ddof=1).advantages.reshape(3, 5))
            return sum(jnp.sum(wi * o) for wi, o in zip(w, outs))

        f = jax.jit(jax.value_and_grad(loss))
        _, grad = f(x)
        h = 1e-6
        for _ in range(3):
            d = jnp.asarray(rng.normal(size=(3, 5)))
            numeric = (f(x + h * d)[0] - f(x - h * d)[0]) / (2 * h)
            np.testing.assert_allclose(jnp.sum(grad * d), numeric,
                                       rtol=1e-6, atol=1e-6)


def test_gradients_finite_for_non_degenerate_input():
    """Weighted-sum gradients are finite and nonzero without constant slices."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)

    @jax.jit
    def grads(x):
        return (
            jax.grad(lambda x: jnp.sum(w * afn.normalize_advantages(x)))(x),
            jax.grad(lambda x: jnp.sum(w * afn.normalize_advantages(
                x, axis=-1)))(x),
            jax.grad(lambda x: jnp.sum(w * afn.group_advantages(
                x, group_size=3).advantages))(x),
        )

    for g in grads(x):
        assert np.all(np.isfinite(g))
        assert np.any(np.asarray(g) != 0.0)


@pytest.mark.parametrize("case", [
    "group_scale_group",
    "group_scale_batch_all_constant",
    "group_scale_none",
    "normalize_constant_row",
    "normalize_constant_global",
])
def test_gradients_finite_with_zero_variance(case):
    """grad of a weighted sum stays finite with zero-variance groups/rows."""
    rng = np.random.default_rng(9)
    w = jnp.asarray(rng.normal(size=4), jnp.float32)
    if case.startswith("group"):
        scale = case.split("_")[2]
        x = jnp.array([1.0, 1.0, 0.0, 1.0])
        if case.endswith("all_constant"):
            x = jnp.ones(4)

        def loss(x):
            return jnp.sum(w * afn.group_advantages(
                x, group_size=2, scale=scale).advantages)
    else:
        axis = -1 if case.endswith("row") else None
        x = jnp.array([[1.0, 1.0], [0.0, 1.0]])
        if axis is None:
            x = jnp.ones((2, 2))

        def loss(x):
            return jnp.sum(w.reshape(2, 2) * afn.normalize_advantages(
                x, axis=axis))

    g = np.asarray(jax.jit(jax.grad(loss))(x))
    assert np.all(np.isfinite(g)), g
