"""Tests for importance ratios, policy-gradient, PPO and value losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

import artifex_fn as afn
from artifex_fn import testing as aft


# Jitted entry points: one compilation per input signature.
_clipped_surrogate_loss = jax.jit(afn.clipped_surrogate_loss,
                                  static_argnames="level")
_importance_ratio = jax.jit(afn.importance_ratio, static_argnames="level")
_policy_gradient_loss = jax.jit(afn.policy_gradient_loss)
_clip_fraction = jax.jit(afn.clip_fraction)
_value_loss = jax.jit(afn.value_loss)
_aggregate_loss = jax.jit(afn.aggregate_loss, static_argnames="mode")


def _lp(ratios):
    """Log-probs whose ratio to zero old log-probs is ``ratios``."""
    return jnp.log(jnp.asarray(ratios, jnp.float32))


# --------------------------------------------------------------------------
# Clipped surrogate against the NumPy reference
# --------------------------------------------------------------------------

_clipped_jit = jax.jit(
    lambda lp, old, adv, lo, hi, dual: _clipped_surrogate_loss(
        lp, old, adv, clip_param=lo, clip_param_high=hi, dual_clip=dual))

_SHAPE = (3, 5)


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(np.float32, _SHAPE, elements=st.floats(-4.0, 0.0, width=32)),
    hnp.arrays(np.float32, _SHAPE, elements=st.floats(-4.0, 0.0, width=32)),
    hnp.arrays(np.float32, _SHAPE, elements=st.floats(-3.0, 3.0, width=32)),
    st.floats(0.01, 0.5),
    st.one_of(st.none(), st.floats(0.01, 0.6)),
    st.one_of(st.none(), st.floats(1.0, 5.0)),
)
def test_clipped_surrogate_matches_reference(lp, old, adv, clip, clip_high,
                                             dual_clip):
    """Per-token loss equals the NumPy loop for every clip setting."""
    out = _clipped_jit(jnp.asarray(lp), jnp.asarray(old), jnp.asarray(adv),
                       clip, clip_high, dual_clip)
    expected = aft.np_clipped_surrogate_loss(
        lp, old, adv, clip_param=clip, clip_param_high=clip_high,
        dual_clip=dual_clip)
    assert out.shape == _SHAPE and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------


def test_clipped_surrogate_hand_values():
    """Positive and negative advantages, inside and outside [0.8, 1.2]."""
    ratios = [1.1, 1.5, 0.5, 0.5, 1.5, 0.9]
    adv = jnp.array([2.0, 2.0, 2.0, -1.0, -1.0, -1.0])
    out = _clipped_surrogate_loss(_lp(ratios), jnp.zeros(6), adv)
    expected = [
        -2.2,   # A > 0, inside: -r A
        -2.4,   # A > 0, r > 1 + eps: clipped to -(1.2) A
        -1.0,   # A > 0, r < 1 - eps: pessimistic min keeps -r A
        0.8,    # A < 0, r < 1 - eps: clipped to -(0.8) A
        1.5,    # A < 0, r > 1 + eps: pessimistic min keeps -r A
        0.9,    # A < 0, inside
    ]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_clip_higher_moves_only_the_upper_bound():
    """clip_param_high > clip_param (DAPO) widens only the upper clip bound."""
    ratios = [1.25, 1.5, 0.5, 0.7]
    adv = jnp.array([1.0, 1.0, -1.0, -1.0])
    sym = _clipped_surrogate_loss(_lp(ratios), jnp.zeros(4), adv,
                                  clip_param=0.2)
    high = _clipped_surrogate_loss(_lp(ratios), jnp.zeros(4), adv,
                                   clip_param=0.2, clip_param_high=0.28)
    np.testing.assert_allclose(sym, [-1.2, -1.2, 0.8, 0.8], rtol=1e-6)
    np.testing.assert_allclose(high, [-1.25, -1.28, 0.8, 0.8], rtol=1e-6)
    low = _clipped_surrogate_loss(_lp(ratios), jnp.zeros(4), adv,
                                  clip_param=0.1, clip_param_high=0.28)
    np.testing.assert_allclose(low, [-1.25, -1.28, 0.9, 0.9], rtol=1e-6)


def test_dual_clip_bounds_negative_advantages():
    """With dual_clip = c the loss of A < 0 is at most -c A."""
    ratios = [5.0, 2.0, 5.0, 100.0]
    adv = jnp.array([-1.0, -1.0, 1.0, -0.5])
    plain = _clipped_surrogate_loss(_lp(ratios), jnp.zeros(4), adv)
    dual = _clipped_surrogate_loss(_lp(ratios), jnp.zeros(4), adv,
                                   dual_clip=3.0)
    np.testing.assert_allclose(plain, [5.0, 2.0, -1.2, 50.0], rtol=1e-5)
    np.testing.assert_allclose(dual, [3.0, 2.0, -1.2, 1.5], rtol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(_clipped_surrogate_loss(
        x, jnp.zeros(4), adv, dual_clip=3.0)))(_lp(ratios))
    np.testing.assert_allclose(grad, [0.0, 2.0, 0.0, 0.0], atol=1e-5)


def test_clipped_surrogate_gradient_zero_where_clipped():
    """d loss / d log pi is -A r where unclipped and zero where clipped."""
    ratios = np.array([1.1, 1.5, 0.5, 0.5, 1.5, 0.9, 1.0])
    adv = jnp.array([2.0, 2.0, 2.0, -1.0, -1.0, -1.0, 3.0])
    old = jnp.array([-1.0, -2.0, -0.5, -3.0, -1.0, -0.2, -4.0])
    lp = old + _lp(ratios)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(
        _clipped_surrogate_loss(x, old, adv))))(lp)
    clipped = np.array([False, True, False, True, False, False, False])
    expected = np.where(clipped, 0.0, -np.asarray(adv) * ratios)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    # Old log-probs are constants.
    g_old = jax.grad(lambda o: jnp.sum(
        _clipped_surrogate_loss(lp, o, adv)))(old)
    np.testing.assert_array_equal(g_old, np.zeros(7))


def test_clipped_surrogate_extreme_log_ratios_are_finite():
    """Log-prob differences of 1e4 give finite losses and gradients."""
    lp = jnp.array([1e4, -1e4, 1e4, -1e4])
    adv = jnp.array([1.0, 1.0, -1.0, -1.0])
    f = lambda x: _clipped_surrogate_loss(x, jnp.zeros(4), adv)
    out = f(lp)
    assert np.all(np.isfinite(out))
    big = math.exp(20.0)
    np.testing.assert_allclose(
        out, [-1.2, -math.exp(-20.0), big, 0.8], rtol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(f(x)))(lp)
    assert np.all(np.isfinite(grad))
    ratio = _importance_ratio(lp, jnp.zeros(4))
    assert np.all(np.isfinite(ratio))
    np.testing.assert_allclose(ratio, [big, math.exp(-20.0)] * 2, rtol=1e-5)


# --------------------------------------------------------------------------
# Sequence-level ratios (GSPO) and broadcasting
# --------------------------------------------------------------------------


def test_sequence_ratio_is_exp_of_masked_mean_log_ratio():
    """GSPO ratio: exp(masked mean log-ratio), constant along the valid
    tokens of a sequence; padded tokens get 1."""
    lp = jnp.array([[-1.0, -2.0, -3.0, -50.0], [-0.5, -0.5, -0.5, -0.5]])
    old = jnp.array([[-1.5, -1.0, -3.3, 0.0], [-1.0, -0.2, -0.5, -0.9]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    ratio = _importance_ratio(lp, old, level="sequence", mask=mask)
    lr = np.asarray(lp - old)
    s0 = math.exp((lr[0, 0] + lr[0, 1] + lr[0, 2]) / 3.0)
    s1 = math.exp(lr[1].mean())
    np.testing.assert_allclose(ratio, [[s0] * 3 + [1.0], [s1] * 4],
                               rtol=1e-6)
    no_mask = _importance_ratio(lp[1:], old[1:], level="sequence")
    np.testing.assert_allclose(no_mask, [[s1] * 4], rtol=1e-6)
    # Padded tokens get no gradient through the sequence ratio.
    grad = jax.jit(jax.grad(lambda x: jnp.sum(_importance_ratio(
        x, old, level="sequence", mask=mask))))(lp)
    assert grad[0, 3] == 0.0
    # d/dlp_t of 3 * exp(mean of 3 log-ratios) is s0 for each valid token.
    np.testing.assert_allclose(grad[0, :3], [s0] * 3, rtol=1e-5)


def test_sequence_level_clipped_surrogate():
    """level='sequence' clips the sequence ratio for every valid token;
    padded tokens give zero."""
    lp = jnp.array([[0.3, 0.3, -9.0], [0.05, -0.05, 0.0]])
    old = jnp.zeros((2, 3))
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    adv = jnp.array([1.0, -2.0])
    out = _clipped_surrogate_loss(lp, old, adv, level="sequence",
                                  mask=mask)
    # Sequence 0: ratio e^0.3 ~ 1.35 -> clipped to 1.2; sequence 1: ratio 1.
    np.testing.assert_allclose(out, [[-1.2, -1.2, 0.0], [2.0] * 3],
                               rtol=1e-6)


def test_token_level_ratio_is_elementwise():
    """The token ratio is exp(log pi - log pi_old) elementwise; a mask
    sets padded tokens to 1 and leaves the others as they are."""
    lp = jnp.array([[0.1, -0.2], [0.0, 0.5]])
    ratio = _importance_ratio(lp, jnp.zeros((2, 2)))
    np.testing.assert_allclose(ratio, np.exp(np.asarray(lp)), rtol=1e-6)
    masked = _importance_ratio(lp, jnp.zeros((2, 2)),
                               mask=jnp.array([[1, 0], [0, 1]]))
    np.testing.assert_allclose(masked, [[np.exp(0.1), 1.0], [1.0, np.exp(0.5)]],
                               rtol=1e-6)


def test_per_sequence_advantages_broadcast_over_tokens():
    """[B] advantages act like [B, L] advantages repeated over tokens."""
    rng = np.random.default_rng(3)
    lp = jnp.asarray(-rng.random((3, 4)), jnp.float32)
    old = lp + jnp.asarray(0.3 * rng.normal(size=(3, 4)), jnp.float32)
    adv = jnp.array([1.0, -0.5, 2.0])
    full = jnp.broadcast_to(adv[:, None], (3, 4))
    np.testing.assert_allclose(
        _clipped_surrogate_loss(lp, old, adv),
        _clipped_surrogate_loss(lp, old, full), rtol=1e-6)
    np.testing.assert_allclose(_policy_gradient_loss(lp, adv),
                               -full * lp, rtol=1e-6)
    with pytest.raises(ValueError, match="advantages"):
        _clipped_surrogate_loss(lp, old, jnp.ones(4))
    with pytest.raises(ValueError, match="old_log_probs"):
        _clipped_surrogate_loss(lp, old[:, :2], adv)
    with pytest.raises(ValueError, match="level"):
        _importance_ratio(lp, old, level="group")


# --------------------------------------------------------------------------
# Vanilla policy gradient
# --------------------------------------------------------------------------


def test_policy_gradient_loss_and_stop_gradient():
    """-A log pi, with gradient -A wrt log pi and none wrt A."""
    lp = jnp.array([-1.0, -2.0, -0.1])
    adv = jnp.array([1.0, -1.0, 0.5])
    np.testing.assert_allclose(_policy_gradient_loss(lp, adv),
                               [1.0, -2.0, 0.05], rtol=1e-6)
    g_lp = jax.grad(lambda x: jnp.sum(_policy_gradient_loss(x, adv)))(lp)
    np.testing.assert_allclose(g_lp, -adv)
    g_adv = jax.grad(lambda a: jnp.sum(_policy_gradient_loss(lp, a)))(adv)
    np.testing.assert_array_equal(g_adv, np.zeros(3))
    g_adv2 = jax.grad(lambda a: jnp.sum(_clipped_surrogate_loss(
        lp, lp - 0.1, a)))(adv)
    np.testing.assert_array_equal(g_adv2, np.zeros(3))


# --------------------------------------------------------------------------
# Clip fraction
# --------------------------------------------------------------------------


def test_clip_fraction_hand_example():
    """Indicator of ratios outside [1 - clip_param, 1 + clip_param_high]."""
    ratio = jnp.array([0.7, 0.85, 1.0, 1.15, 1.25, 1.35])
    np.testing.assert_array_equal(_clip_fraction(ratio),
                                  [1, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(
        _clip_fraction(ratio, clip_param=0.1, clip_param_high=0.3),
        [1, 1, 0, 0, 0, 1])
    mean = _aggregate_loss(_clip_fraction(ratio))
    np.testing.assert_allclose(mean, 0.5)


# --------------------------------------------------------------------------
# Value loss
# --------------------------------------------------------------------------


def test_value_loss_squared_error():
    """0.5 (V - R)^2, with no gradient to the targets."""
    v = jnp.array([1.0, 3.0, -2.0])
    t = jnp.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(_value_loss(v, t), [0.5, 3.125, 4.5])
    g = jax.grad(lambda x: jnp.sum(_value_loss(x, t)))(v)
    np.testing.assert_allclose(g, v - t)
    g_t = jax.grad(lambda x: jnp.sum(_value_loss(v, x)))(t)
    np.testing.assert_array_equal(g_t, np.zeros(3))


def test_value_loss_clipped():
    """max(unclipped, clipped-around-old) loss, as in the PPO baselines."""
    v = jnp.array([1.5, 0.5, 2.0, 1.1])
    old = jnp.ones(4)
    t = jnp.array([3.0, 0.0, 1.0, 1.0])
    out = _value_loss(v, t, old_values=old, value_clip_param=0.2)
    expected = [
        max(0.5 * 1.5 ** 2, 0.5 * 1.8 ** 2),   # clipped branch (1.2) larger
        max(0.5 * 0.5 ** 2, 0.5 * 0.8 ** 2),   # clipped branch (0.8) larger
        max(0.5 * 1.0 ** 2, 0.5 * 0.2 ** 2),   # unclipped larger
        0.5 * 0.1 ** 2,                        # inside the clip range
    ]
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    g = jax.grad(lambda x: jnp.sum(_value_loss(
        x, t, old_values=old, value_clip_param=0.2)))(v)
    np.testing.assert_allclose(g, [0.0, 0.0, 1.0, 0.1], rtol=1e-5,
                               atol=1e-6)
    g_old = jax.grad(lambda o: jnp.sum(_value_loss(
        v, t, old_values=o, value_clip_param=0.2)))(old)
    np.testing.assert_array_equal(g_old, np.zeros(4))


def test_value_loss_huber():
    """Quadratic within delta, linear outside: delta (|d| - delta / 2)."""
    v = jnp.array([0.5, -3.0, 2.0])
    t = jnp.zeros(3)
    out = _value_loss(v, t, huber_delta=1.0)
    np.testing.assert_allclose(out, [0.125, 2.5, 1.5], rtol=1e-6)
    out2 = _value_loss(v, t, huber_delta=2.5)
    np.testing.assert_allclose(out2, [0.125, 2.5 * (3.0 - 1.25), 2.0],
                               rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(_value_loss(x, t, huber_delta=1.0)))(v)
    np.testing.assert_allclose(g, [0.5, -1.0, 1.0], rtol=1e-6)
    clipped = _value_loss(v, t, old_values=jnp.zeros(3), value_clip_param=1.0,
                          huber_delta=1.0)
    np.testing.assert_allclose(clipped, [0.125, 2.5, 1.5], rtol=1e-6)


def test_value_loss_argument_errors():
    """value_clip_param needs old_values; shapes must match."""
    with pytest.raises(ValueError, match="old_values"):
        afn.value_loss(jnp.zeros(3), jnp.zeros(3), value_clip_param=0.2)
    with pytest.raises(ValueError, match="targets"):
        afn.value_loss(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(ValueError, match="old_values"):
        afn.value_loss(jnp.zeros(3), jnp.zeros(3), old_values=jnp.zeros(2),
                       value_clip_param=0.2)


# --------------------------------------------------------------------------
# Numerical gradients and dtypes
# --------------------------------------------------------------------------


def test_check_grads_clipped_surrogate():
    """Autodiff matches finite differences away from the clip kinks."""
    with jax.enable_x64(True):
        old = jnp.array([-1.0, -0.5, -2.0, -1.5, -0.3], jnp.float64)
        # ratios 1.05, 1.6, 0.6, 0.95, 3.0 (far from 0.8 and 1.2)
        lp = old + jnp.log(jnp.array([1.05, 1.6, 0.6, 0.95, 3.0],
                                     jnp.float64))
        adv = jnp.array([1.0, 2.0, -1.5, -0.7, -1.0], jnp.float64)
        for kwargs in ({}, {"clip_param_high": 0.3}, {"dual_clip": 2.0}):
            f = lambda x, kw=kwargs: _clipped_surrogate_loss(
                x, old, adv, **kw)
            check_grads(f, (lp,), order=1, modes=("rev",))
        g = lambda x: _clipped_surrogate_loss(
            x, old[:2], adv[:2], level="sequence")
        lp_seq = old[:2] + jnp.array([0.05, -0.02], jnp.float64)
        check_grads(g, (lp_seq,), order=1, modes=("rev",))


def test_check_grads_value_loss():
    """Finite-difference check of the plain, clipped and Huber value loss."""
    with jax.enable_x64(True):
        v = jnp.array([0.5, -2.0, 1.3, 0.9], jnp.float64)
        t = jnp.array([0.0, 0.4, 3.0, 1.0], jnp.float64)
        old = jnp.array([0.0, -1.0, 1.0, 1.0], jnp.float64)
        check_grads(lambda x: _value_loss(x, t), (v,), order=1,
                    modes=("rev",))
        check_grads(lambda x: _value_loss(x, t, huber_delta=1.0), (v,),
                    order=1, modes=("rev",))
        check_grads(lambda x: _value_loss(x, t, old_values=old,
                                          value_clip_param=0.2),
                    (v,), order=1, modes=("rev",))


def test_dtypes_float64_and_bfloat16():
    """float64 stays float64; bfloat16 gives finite bfloat16 losses."""
    with jax.enable_x64(True):
        lp = jnp.array([-1.0, -2.0], jnp.float64)
        old = jnp.array([-1.0 - 1e-10, -2.0], jnp.float64)
        adv = jnp.array([1.0, 1.0], jnp.float64)
        out = _clipped_surrogate_loss(lp, old, adv)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, [-(1 + 1e-10), -1.0], rtol=1e-13)
        assert _importance_ratio(lp, old).dtype == jnp.float64
        assert _policy_gradient_loss(lp, adv).dtype == jnp.float64
        assert _value_loss(lp, adv).dtype == jnp.float64
    lp = jnp.array([-1.0, 1e4, -1e4, 0.1], jnp.bfloat16)
    old = jnp.zeros(4, jnp.bfloat16)
    adv = jnp.array([1.0, -1.0, -1.0, 1.0], jnp.bfloat16)
    out = _clipped_surrogate_loss(lp, old, adv)
    assert out.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    np.testing.assert_allclose(np.asarray(out, np.float32)[[0, 3]],
                               [-math.exp(-1.0), -math.exp(0.1)], rtol=1e-2)
    assert _value_loss(lp, old).dtype == jnp.bfloat16
    assert _clip_fraction(jnp.ones(2, jnp.bfloat16)).dtype == jnp.bfloat16


def test_clipped_surrogate_jit_with_traced_clip_params():
    """Clip ranges may be traced values (e.g. a schedule)."""
    f = jax.jit(lambda e: _clipped_surrogate_loss(
        _lp([1.5]), jnp.zeros(1), jnp.ones(1), clip_param=e,
        clip_param_high=2 * e))
    np.testing.assert_allclose(f(0.1), [-1.2], rtol=1e-6)
    np.testing.assert_allclose(f(0.3), [-1.5], rtol=1e-6)
