"""Tests for masked loss aggregation and its micro-batch parts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import artifex_fn as afn
from artifex_fn import testing as aft

MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
         "seq_mean_token_sum_norm")


# Jitted entry points: one compilation per input signature.
_aggregate_loss = jax.jit(afn.aggregate_loss, static_argnames="mode")
_aggregate_loss_parts = jax.jit(afn.aggregate_loss_parts,
                                static_argnames="mode")


@jax.jit
def _all_modes(loss, mask, normalizer):
    """aggregate_loss in every mode, plus Dr. GRPO with a given constant."""
    out = {m: _aggregate_loss(loss, mask, mode=m) for m in MODES}
    out["norm_c"] = _aggregate_loss(loss, mask,
                                    mode="seq_mean_token_sum_norm",
                                    normalizer=normalizer)
    return out


@jax.jit
def _all_parts(loss, mask):
    return {m: _aggregate_loss_parts(loss, mask, mode=m) for m in MODES}


@settings(max_examples=50, deadline=None)
@given(st.sampled_from([(1,), (5,), (3, 4), (2, 2, 3)]), st.data(),
       st.floats(1.0, 64.0))
def test_matches_reference(shape, data, normalizer):
    """Every mode equals the NumPy loop, for random (often empty) masks."""
    loss = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(
        -100.0, 100.0, width=32)))
    mask = data.draw(hnp.arrays(np.bool_, shape))
    out = _all_modes(jnp.asarray(loss), jnp.asarray(mask), normalizer)
    for mode in MODES:
        expected = aft.np_aggregate_loss(loss, mask, mode=mode)
        assert out[mode].shape == () and out[mode].dtype == jnp.float32
        np.testing.assert_allclose(out[mode], expected, rtol=1e-5,
                                   atol=1e-3, err_msg=mode)
    expected = aft.np_aggregate_loss(loss, mask,
                                     mode="seq_mean_token_sum_norm",
                                     normalizer=normalizer)
    np.testing.assert_allclose(out["norm_c"], expected, rtol=1e-5,
                               atol=1e-3)


_LOSS = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
_MASK = jnp.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]])


@pytest.mark.parametrize("mode,expected", [
    ("token_mean", 27.0 / 5.0),           # (1 + 2 + 7 + 8 + 9) / 5
    ("seq_mean_token_mean", 4.75),        # (1.5 + 8) / 2, empty row left out
    ("seq_mean_token_sum", 13.5),         # (3 + 24) / 2
    ("seq_mean_token_sum_norm", 3.0),     # 27 / (3 sequences * L = 3)
])
def test_hand_values(mode, expected):
    """Hand-computed values, with one all-padding sequence."""
    np.testing.assert_allclose(_aggregate_loss(_LOSS, _MASK, mode=mode),
                               expected, rtol=1e-6)


def test_docstring_example_and_normalizer():
    """Two sequences of lengths 3 and 1; a custom Dr. GRPO constant."""
    loss = jnp.array([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0]])
    got = [float(_aggregate_loss(loss, mask, mode=m)) for m in MODES]
    np.testing.assert_allclose(got, [1.75, 2.5, 3.5, 7.0 / 6.0], rtol=1e-6)
    np.testing.assert_allclose(
        _aggregate_loss(_LOSS, _MASK, mode="seq_mean_token_sum_norm",
                        normalizer=4.0), 27.0 / 12.0, rtol=1e-6)


def test_without_mask_and_token_mean_is_mean_of_valid_tokens():
    """No mask means all tokens; token_mean is the mean over valid tokens."""
    rng = np.random.default_rng(0)
    loss = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
    mask = jnp.asarray(rng.random((4, 7)) < 0.6)
    np.testing.assert_allclose(_aggregate_loss(loss), jnp.mean(loss),
                               rtol=1e-5)
    np.testing.assert_allclose(
        _aggregate_loss(loss, mask, mode="token_mean"),
        np.asarray(loss)[np.asarray(mask)].mean(), rtol=1e-5)
    np.testing.assert_allclose(
        _aggregate_loss(loss, mode="seq_mean_token_sum"),
        jnp.mean(jnp.sum(loss, axis=-1)), rtol=1e-5)
    # A [B, 1] mask broadcasts over tokens.
    row_mask = jnp.array([[1], [0], [1], [0]])
    np.testing.assert_allclose(
        _aggregate_loss(loss, row_mask),
        jnp.mean(loss[jnp.array([0, 2])]), rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_empty_mask_gives_zero_and_zero_gradient(mode):
    """An all-padding batch gives 0.0 (not NaN) and a zero gradient."""
    loss = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    mask = jnp.zeros((2, 2))
    f = jax.jit(jax.value_and_grad(
        lambda x: _aggregate_loss(x, mask, mode=mode)))
    value, grad = f(loss)
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, np.zeros((2, 2)))


@pytest.mark.parametrize("mode", MODES)
def test_nan_and_inf_in_padding_do_not_leak(mode):
    """NaN/inf at padding positions affect neither value nor gradient."""
    mask = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0]])
    clean = jnp.array([[1.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    dirty = jnp.array([[1.0, 2.0, jnp.nan, jnp.inf],
                       [3.0, -jnp.inf, jnp.nan, jnp.nan]])
    f = jax.jit(jax.value_and_grad(
        lambda x: _aggregate_loss(x, mask, mode=mode)))
    v_clean, g_clean = f(clean)
    v_dirty, g_dirty = f(dirty)
    assert np.isfinite(v_dirty)
    np.testing.assert_allclose(v_dirty, v_clean, rtol=1e-6)
    assert np.all(np.isfinite(g_dirty))
    np.testing.assert_allclose(g_dirty, g_clean, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(g_dirty)[np.asarray(mask) == 0],
                                  0.0)


def test_token_mean_gradient_weights():
    """d token_mean / d loss = mask / number of valid tokens."""
    grad = jax.grad(lambda x: _aggregate_loss(x, _MASK))(_LOSS)
    np.testing.assert_allclose(grad, np.asarray(_MASK) / 5.0, rtol=1e-6)
    grad = jax.grad(lambda x: _aggregate_loss(
        x, _MASK, mode="seq_mean_token_mean"))(_LOSS)
    np.testing.assert_allclose(
        grad, [[0.25, 0.25, 0.0], [0.0, 0.0, 0.0], [1 / 6, 1 / 6, 1 / 6]],
        rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, (6, 5),
                  elements=st.floats(-10.0, 10.0, width=32)),
       hnp.arrays(np.bool_, (6, 5)), st.sampled_from([1, 2, 3]))
def test_parts_of_disjoint_shards_sum_to_full_batch(loss, mask, split):
    """Summing parts over two shards of sequences, then dividing, is exact."""
    first = _all_parts(loss[:split], mask[:split])
    second = _all_parts(loss[split:], mask[split:])
    whole = _all_parts(loss, mask)
    full = _all_modes(loss, mask, 1.0)
    for mode in MODES:
        (n1, d1), (n2, d2) = first[mode], second[mode]
        den = float(d1 + d2)
        combined = float(n1 + n2) / den if den > 0 else 0.0
        np.testing.assert_allclose(combined, full[mode], rtol=1e-5,
                                   atol=1e-4, err_msg=mode)
        np.testing.assert_allclose(den, float(whole[mode][1]), rtol=1e-6,
                                   err_msg=mode)


def test_one_dimensional_loss_is_one_sequence():
    """A [L] loss is a single sequence in every mode."""
    loss = jnp.array([1.0, 2.0, 6.0])
    mask = jnp.array([1, 1, 0])
    got = [float(_aggregate_loss(loss, mask, mode=m)) for m in MODES]
    np.testing.assert_allclose(got, [1.5, 1.5, 3.0, 1.0], rtol=1e-6)


def test_argument_errors():
    """Unknown modes name ``mode``; a bad mask names ``mask``."""
    with pytest.raises(ValueError, match="mode"):
        afn.aggregate_loss(jnp.ones((2, 3)), mode="sum")
    with pytest.raises(ValueError, match="mode"):
        afn.aggregate_loss_parts(jnp.ones((2, 3)), mode="seq_mean")
    with pytest.raises(ValueError, match="mask"):
        afn.aggregate_loss(jnp.ones((2, 4)), jnp.ones(3))
    with pytest.raises(ValueError, match="mask"):
        afn.aggregate_loss(jnp.ones((2, 4)), jnp.ones((2, 2, 4)))
    with pytest.raises(ValueError, match="loss"):
        afn.aggregate_loss(jnp.float32(1.0))


def test_dtypes():
    """bfloat16 in, bfloat16 out; float64 stays float64."""
    out = _aggregate_loss(jnp.full((2, 3), 1.5, jnp.bfloat16),
                          jnp.array([[1, 1, 0], [1, 0, 0]]))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out), 1.5)
    with jax.enable_x64(True):
        loss = jnp.array([[1.0, 1.0 + 1e-12]], jnp.float64)
        out = _aggregate_loss(loss, mode="seq_mean_token_sum")
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, 2.0 + 1e-12, rtol=1e-15)
