"""Tests for entropy, exact KL and the sample-based KL estimators."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import artifex_fn as afn
from artifex_fn import testing as aft

# Jitted entry points: one compilation per input signature.
_entropy_from_log_probs = jax.jit(afn.entropy_from_log_probs,
                                  static_argnames="axis")
_entropy_from_logits = jax.jit(afn.entropy_from_logits,
                               static_argnames="axis")
_kl_from_log_probs = jax.jit(afn.kl_from_log_probs, static_argnames="axis")
_kl_from_logits = jax.jit(afn.kl_from_logits, static_argnames="axis")
_kl_estimate = jax.jit(afn.kl_estimate, static_argnames="estimator")

_LOGITS = st.floats(-8.0, 8.0, allow_nan=False, allow_infinity=False,
                    width=32)


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


# --------------------------------------------------------------------------
# Entropy
# --------------------------------------------------------------------------


_entropies = jax.jit(lambda lp, z: (_entropy_from_log_probs(lp),
                                    _entropy_from_logits(z)))


@pytest.mark.parametrize("num_actions", [1, 7, 1000])
def test_entropy_of_uniform_is_log_num_actions(num_actions):
    """H(uniform over A) = log A, from log-probs and from logits."""
    lp = jnp.full((3, num_actions), -math.log(num_actions))
    from_lp, from_logits = _entropies(lp, jnp.full((3, num_actions), 2.5))
    np.testing.assert_allclose(from_lp, [math.log(num_actions)] * 3,
                               atol=1e-5)
    np.testing.assert_allclose(from_logits, [math.log(num_actions)] * 3,
                               atol=1e-5)


def test_entropy_hand_value():
    """H([0.1, 0.2, 0.7]) matches the textbook sum."""
    p = np.array([0.1, 0.2, 0.7])
    expected = -np.sum(p * np.log(p))
    out = _entropy_from_log_probs(jnp.log(jnp.asarray(p, jnp.float32)))
    np.testing.assert_allclose(out, expected, rtol=1e-6)


_entropy_pair = jax.jit(lambda z: (
    _entropy_from_logits(z),
    _entropy_from_log_probs(jax.nn.log_softmax(z))))


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, st.sampled_from([(5,), (2, 3), (2, 2, 6)]),
                  elements=_LOGITS))
def test_entropy_from_logits_equals_entropy_of_log_softmax(logits):
    """entropy_from_logits(z) == entropy_from_log_probs(log_softmax(z))."""
    a, b = _entropy_pair(jnp.asarray(logits))
    assert a.shape == logits.shape[:-1]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    lp = _np_log_softmax(logits)
    np.testing.assert_allclose(a, -np.sum(np.exp(lp) * lp, axis=-1),
                               rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(a) >= -1e-6)
    assert np.all(np.asarray(a) <= math.log(logits.shape[-1]) + 1e-5)


def test_entropy_axis_argument():
    """The action axis can be chosen with ``axis``."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)),
                         jnp.float32)
    np.testing.assert_allclose(_entropy_from_logits(logits, axis=0),
                               _entropy_from_logits(logits.T), rtol=1e-6)


def test_entropy_with_impossible_actions_is_finite():
    """-inf logits/log-probs contribute nothing (0 * log 0 = 0)."""
    logits = jnp.array([[0.0, 1.0, -jnp.inf], [-jnp.inf, 3.0, -jnp.inf]])
    out = _entropy_from_logits(logits)
    expected0 = float(_entropy_from_logits(jnp.array([0.0, 1.0])))
    np.testing.assert_allclose(out, [expected0, 0.0], atol=1e-6)
    out_lp = _entropy_from_log_probs(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(out_lp, [expected0, 0.0], atol=1e-6)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(out_lp))


def _masked_entropy_via_log_probs(z):
    return _entropy_from_log_probs(jax.nn.log_softmax(z))


def _masked_kl_from_logits(z):
    return _kl_from_logits(z, jnp.array([0.5, -0.5, -jnp.inf]))


@pytest.mark.parametrize("fn", [afn.entropy_from_logits,
                                _masked_entropy_via_log_probs,
                                _masked_kl_from_logits],
                         ids=["entropy_from_logits",
                              "entropy_from_log_probs",
                              "kl_from_logits"])
def test_gradient_with_impossible_actions_is_finite(fn):
    """Masked (-inf) actions get zero gradient; the others are unaffected."""
    z = jnp.array([0.0, 1.0, -jnp.inf])
    grad = jax.grad(fn)(z)
    assert np.all(np.isfinite(grad))
    if fn is _masked_kl_from_logits:
        ref = jax.grad(lambda x: _kl_from_logits(
            x, jnp.array([0.5, -0.5])))(z[:2])
    else:
        ref = jax.grad(_entropy_from_logits)(z[:2])
    np.testing.assert_allclose(grad[:2], ref, rtol=1e-5, atol=1e-6)
    assert grad[2] == 0.0


def test_entropy_gradient_matches_closed_form():
    """dH/dz_i = -p_i (log p_i + H) for H = entropy(softmax(z))."""
    z = jnp.array([0.3, -1.2, 2.0, 0.0])
    grad = jax.grad(_entropy_from_logits)(z)
    lp = _np_log_softmax(np.asarray(z))
    p = np.exp(lp)
    h = -np.sum(p * lp)
    np.testing.assert_allclose(grad, -p * (lp + h), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Exact KL
# --------------------------------------------------------------------------


def test_kl_hand_value():
    """KL([.5, .5] || [.25, .75]) = 0.5 log(4/3)."""
    p = jnp.log(jnp.array([0.5, 0.5]))
    q = jnp.log(jnp.array([0.25, 0.75]))
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(0.5 / 0.75)
    np.testing.assert_allclose(_kl_from_log_probs(p, q), expected,
                               rtol=1e-6)
    np.testing.assert_allclose(
        _kl_from_logits(jnp.zeros(2), jnp.log(jnp.array([1.0, 3.0]))),
        expected, rtol=1e-6)
    # Not symmetric: KL(q || p) is a different number.
    reverse = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    np.testing.assert_allclose(_kl_from_log_probs(q, p), reverse,
                               rtol=1e-6)


_kl_forms = jax.jit(lambda zp, zq: (
    _kl_from_logits(zp, zq),
    _kl_from_log_probs(jax.nn.log_softmax(zp), jax.nn.log_softmax(zq)),
    _kl_from_logits(zp, zp)))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(1, 1), (3, 2), (4, 7)]), st.data())
def test_kl_is_nonnegative_and_matches_numpy(shape, data):
    """KL(p || q) >= 0, KL(p || p) = 0 and both forms match NumPy."""
    zp = data.draw(hnp.arrays(np.float32, shape, elements=_LOGITS))
    zq = data.draw(hnp.arrays(np.float32, shape, elements=_LOGITS))
    lp, lq = _np_log_softmax(zp), _np_log_softmax(zq)
    expected = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    kl, kl_lp, kl_self = _kl_forms(jnp.asarray(zp), jnp.asarray(zq))
    assert kl.shape == shape[:1]
    np.testing.assert_allclose(kl, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(kl_lp, expected, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(kl) >= -1e-5)
    np.testing.assert_allclose(kl_self, 0.0, atol=1e-6)


def test_kl_with_impossible_actions():
    """-inf where p = 0 gives finite KL; -inf only in q gives +inf."""
    p = jnp.array([0.0, 1.0, -jnp.inf])
    q = jnp.array([1.0, 0.0, -jnp.inf])
    out = _kl_from_logits(p, q)
    expected = float(_kl_from_logits(p[:2], q[:2]))
    assert np.isfinite(out)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    lp = jax.nn.log_softmax(p)
    np.testing.assert_allclose(_kl_from_log_probs(lp, lp), 0.0, atol=0)
    # q excludes an action that p can take: the divergence is infinite.
    assert _kl_from_logits(jnp.zeros(2), jnp.array([0.0, -jnp.inf])) \
        == jnp.inf


def test_kl_shape_mismatch_raises():
    """Mismatched shapes raise ValueError naming the offending argument."""
    with pytest.raises(ValueError, match="q_log_probs"):
        afn.kl_from_log_probs(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="q_logits"):
        afn.kl_from_logits(jnp.zeros((2, 3)), jnp.zeros((3,)))
    with pytest.raises(ValueError, match="logits"):
        afn.entropy_from_logits(jnp.float32(1.0))


# --------------------------------------------------------------------------
# Sample-based estimators
# --------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, st.sampled_from([(1,), (2, 8)]),
                  elements=st.floats(-15.0, 0.0, width=32)),
       st.data(), st.sampled_from(["k1", "k2", "k3"]))
def test_kl_estimate_matches_reference(log_probs, data, estimator):
    """k1/k2/k3 equal the NumPy reference; k2, k3 are non-negative."""
    ref = data.draw(hnp.arrays(np.float32, log_probs.shape,
                               elements=st.floats(-15.0, 0.0, width=32)))
    out = _kl_estimate(jnp.asarray(log_probs), jnp.asarray(ref),
                       estimator=estimator)
    expected = aft.np_kl_estimate(log_probs, ref, estimator)
    assert out.dtype == jnp.float32 and out.shape == log_probs.shape
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    if estimator in ("k2", "k3"):
        assert np.all(np.asarray(out) >= 0.0)


def test_kl_estimate_hand_values():
    """Per-sample values for log r = log(0.25 / 0.5) = -log 2."""
    lp = jnp.log(jnp.array([0.5]))
    ref = jnp.log(jnp.array([0.25]))
    log2 = math.log(2.0)
    np.testing.assert_allclose(_kl_estimate(lp, ref, estimator="k1"),
                               [log2], rtol=1e-6)
    np.testing.assert_allclose(_kl_estimate(lp, ref, estimator="k2"),
                               [0.5 * log2 ** 2], rtol=1e-6)
    np.testing.assert_allclose(_kl_estimate(lp, ref, estimator="k3"),
                               [0.5 - 1.0 + log2], rtol=1e-6)
    # The default estimator is k3.
    np.testing.assert_allclose(_kl_estimate(lp, ref), [log2 - 0.5],
                               rtol=1e-6)
    np.testing.assert_allclose(_kl_estimate(lp, lp), [0.0], atol=0)


@jax.jit
def _sampled_estimates(key, p_logits, q_logits):
    lp, lq = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
    actions = jax.random.categorical(key, p_logits, shape=(200_000,))
    k1 = _kl_estimate(lp[actions], lq[actions], estimator="k1")
    k3 = _kl_estimate(lp[actions], lq[actions], estimator="k3")
    return (_kl_from_log_probs(lp, lq), jnp.mean(k1), jnp.mean(k3),
            jnp.var(k1), jnp.var(k3))


def test_unbiased_estimators_average_to_exact_kl():
    """With a ~ p, mean(k1) and mean(k3) approximate KL(p || q)."""
    rng = np.random.default_rng(42)
    p_logits = jnp.asarray(rng.normal(size=6), jnp.float32)
    q_logits = p_logits + jnp.asarray(0.7 * rng.normal(size=6), jnp.float32)
    exact, k1, k3, v1, v3 = map(float, _sampled_estimates(
        jax.random.PRNGKey(42), p_logits, q_logits))
    assert exact > 0.05
    np.testing.assert_allclose(k1, exact, rtol=0.05, atol=5e-3)
    np.testing.assert_allclose(k3, exact, rtol=0.05, atol=5e-3)
    # k3 has lower variance than k1 here (Schulman 2020).
    assert v3 < v1


def test_kl_estimate_clamp_bounds_output():
    """``clamp`` clips the estimate to [-clamp, clamp]."""
    lp = jnp.array([0.0, -5.0, -0.1, -3.0])
    ref = jnp.array([-5.0, 0.0, 0.0, -3.0])
    for est in ("k1", "k2", "k3"):
        out = np.asarray(_kl_estimate(lp, ref, estimator=est, clamp=1.5))
        unclamped = aft.np_kl_estimate(lp, ref, est)
        np.testing.assert_allclose(out, np.clip(unclamped, -1.5, 1.5),
                                   rtol=1e-5, atol=1e-6)
    k1 = _kl_estimate(lp, ref, estimator="k1", clamp=1.5)
    np.testing.assert_allclose(k1[:2], [1.5, -1.5])


def test_kl_estimate_extreme_log_ratios_are_finite():
    """|log r| is clamped to max_log_ratio before exp."""
    lp = jnp.array([1e4, -1e4, 0.0])
    ref = jnp.zeros(3)
    for est in ("k1", "k2", "k3"):
        out = _kl_estimate(lp, ref, estimator=est)
        assert np.all(np.isfinite(out)), est
    k3 = _kl_estimate(lp, ref, estimator="k3")
    np.testing.assert_allclose(
        k3, [math.expm1(-20.0) + 20.0, math.expm1(20.0) - 20.0, 0.0],
        rtol=1e-5)
    k1 = _kl_estimate(lp, ref, estimator="k1", max_log_ratio=5.0)
    np.testing.assert_allclose(k1, [5.0, -5.0, 0.0])
    grad = jax.grad(lambda x: jnp.sum(_kl_estimate(x, ref)))(lp)
    assert np.all(np.isfinite(grad))


def test_kl_estimate_bfloat16_and_float64():
    """bfloat16 in gives finite bfloat16 out; float64 stays float64."""
    lp = jnp.array([-1.0, -2.0, 50.0, -50.0], jnp.bfloat16)
    ref = jnp.array([-1.5, -0.5, -50.0, 50.0], jnp.bfloat16)
    out = _kl_estimate(lp, ref)
    assert out.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    expected = aft.np_kl_estimate(np.asarray(lp, np.float32)[:2],
                                  np.asarray(ref, np.float32)[:2])
    np.testing.assert_allclose(np.asarray(out[:2], np.float32), expected,
                               rtol=1e-2)
    with jax.enable_x64(True):
        lp64 = jnp.array([-1.0, -2.0], jnp.float64)
        ref64 = jnp.array([-1.0 - 1e-9, -2.0], jnp.float64)
        out64 = _kl_estimate(lp64, ref64, estimator="k1")
        assert out64.dtype == jnp.float64
        # float32 would round the 1e-9 difference away entirely.
        np.testing.assert_allclose(out64, [1e-9, 0.0], rtol=1e-6, atol=0)
        ent = _entropy_from_logits(jnp.zeros(3, jnp.float64))
        assert ent.dtype == jnp.float64
        kl = _kl_from_logits(jnp.zeros(3, jnp.float64),
                             jnp.zeros(3, jnp.float64))
        assert kl.dtype == jnp.float64


def test_entropy_bfloat16_output():
    """Half-precision logits give a finite entropy in their own dtype."""
    out = _entropy_from_logits(jnp.zeros((2, 8), jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), math.log(8),
                               rtol=1e-2)


def test_kl_estimate_argument_errors():
    """Bad shapes name ``ref_log_probs``; unknown estimators name it."""
    with pytest.raises(ValueError, match="ref_log_probs"):
        afn.kl_estimate(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="estimator"):
        afn.kl_estimate(jnp.zeros(3), jnp.zeros(3), estimator="k4")


def test_kl_estimate_under_jit():
    """The estimators trace under jit with static options."""
    f = jax.jit(lambda a, b: afn.kl_estimate(a, b, estimator="k2",
                                             clamp=10.0))
    np.testing.assert_allclose(f(jnp.array([0.0, -1.0]), jnp.zeros(2)),
                               [0.0, 0.5], rtol=1e-6)
