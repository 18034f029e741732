"""Tests for selective log-softmax and masked per-sequence reductions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import artifex_fn as afn

# Jitted entry points: one compilation per input signature.
_token_log_probs = jax.jit(afn.token_log_probs,
                           static_argnames="chunk_size")
_sequence_log_probs = jax.jit(afn.sequence_log_probs,
                              static_argnames=("normalize", "axis"))
_sequence_lengths = jax.jit(afn.sequence_lengths, static_argnames="axis")


def _reference(logits, tokens):
    lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lsm, tokens[..., None], axis=-1)[..., 0]


def _data(seed, shape, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(scale * rng.normal(size=shape), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, shape[-1], size=shape[:-1]),
                         jnp.int32)
    return logits, tokens


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2 ** 31 - 1),
       st.sampled_from([(7,), (3, 11), (2, 5, 16)]), st.floats(0.1, 20.0))
def test_matches_log_softmax_gather(seed, shape, scale):
    """Equals take_along_axis(log_softmax(logits), tokens) in float32."""
    logits, tokens = _data(seed, shape, scale)
    out = _token_log_probs(logits, tokens)
    assert out.shape == shape[:-1] and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _reference(logits, tokens), rtol=1e-5,
                               atol=1e-5)
    assert np.all(np.asarray(out) <= 0.0)


def test_hand_value_and_large_logits():
    """Uniform logits give -log V; huge logits do not overflow."""
    out = _token_log_probs(jnp.zeros((1, 2, 4)), jnp.array([[0, 3]]))
    np.testing.assert_allclose(out, np.full((1, 2), -np.log(4.0)), rtol=1e-6)
    big = jnp.array([[1e4, 1e4 - 1.0, -1e4]])
    out = _token_log_probs(big, jnp.array([1]))
    expected = -1.0 - np.log1p(np.exp(-1.0))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, [expected], atol=1e-3)


def test_precision_does_not_depend_on_logit_offset():
    """Exactly representable logits near 1024 keep float32 accuracy."""
    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=(4, 50)) * 8.0) / 8.0 + 1024.0
    tokens = rng.integers(0, 50, size=4)
    out = _token_log_probs(jnp.asarray(logits, jnp.float32),
                           jnp.asarray(tokens, jnp.int32))
    shifted = logits - logits.max(axis=-1, keepdims=True)
    ref = (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True)))
    ref = np.take_along_axis(ref, tokens[:, None], axis=-1)[:, 0]
    # jax.nn.log_softmax in float32 is within ~3e-7 of this reference.
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


_tlp_grad = jax.jit(jax.grad(
    lambda x, t, chunk_size=None: jnp.sum(_token_log_probs(
        x, t, chunk_size=chunk_size))), static_argnames=("chunk_size",))


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 16])
def test_chunked_equals_unchunked(chunk_size):
    """chunk_size (dividing the 10 rows or not) gives identical results."""
    logits, tokens = _data(0, (2, 5, 13))
    full = _token_log_probs(logits, tokens)
    chunked = _token_log_probs(logits, tokens, chunk_size=chunk_size)
    assert chunked.shape == (2, 5)
    np.testing.assert_allclose(chunked, full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        _tlp_grad(logits, tokens, chunk_size=chunk_size),
        _tlp_grad(logits, tokens), rtol=1e-5, atol=1e-6)


def test_invalid_chunk_size():
    """Non-positive chunk sizes are rejected."""
    logits, tokens = _data(0, (2, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        _token_log_probs(logits, tokens, chunk_size=0)


def test_temperature_divides_logits():
    """temperature=T equals log_softmax(logits / T)."""
    logits, tokens = _data(1, (3, 9))
    for temperature in (0.5, 2.0):
        out = _token_log_probs(logits, tokens, temperature=temperature)
        np.testing.assert_allclose(out, _reference(logits / temperature,
                                                   tokens), rtol=1e-5,
                                   atol=1e-6)
    chunked = _token_log_probs(logits, tokens, temperature=0.5,
                               chunk_size=2)
    np.testing.assert_allclose(chunked, _reference(logits / 0.5, tokens),
                               rtol=1e-5, atol=1e-6)
    hot = _token_log_probs(logits, tokens, temperature=1e6)
    np.testing.assert_allclose(hot, np.full(3, -np.log(9.0)), rtol=1e-4)


def test_bfloat16_logits_give_float32_close_to_float32_maths():
    """bfloat16 logits give float32 log-probs close to the float32 result."""
    logits, tokens = _data(2, (4, 6, 64), scale=4.0)
    half = logits.astype(jnp.bfloat16)
    out = _token_log_probs(half, tokens)
    assert out.dtype == jnp.float32
    # Reference: the same (rounded) logits, all maths in float32.
    np.testing.assert_allclose(out, _reference(half, tokens), rtol=0,
                               atol=2e-2)
    np.testing.assert_allclose(
        _token_log_probs(half, tokens, chunk_size=5), out, rtol=0, atol=1e-6)


def test_float64_logits():
    """float64 logits are computed and returned in float64."""
    with jax.enable_x64(True):
        logits = jnp.array([[0.0, 1e-12, 0.0]], jnp.float64)
        out = _token_log_probs(logits, jnp.array([1]))
        assert out.dtype == jnp.float64
        lse = np.log(2.0 + np.exp(1e-12))
        np.testing.assert_allclose(out, [1e-12 - lse], rtol=1e-15)


def test_tokens_validation():
    """Tokens of the wrong shape or dtype raise naming ``tokens``."""
    logits = jnp.zeros((2, 3, 5))
    with pytest.raises(ValueError, match="tokens"):
        afn.token_log_probs(logits, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="tokens"):
        afn.token_log_probs(logits, jnp.zeros((2, 3, 1), jnp.int32))
    with pytest.raises(ValueError, match="tokens"):
        afn.token_log_probs(logits, jnp.zeros((2, 3), jnp.float32))


def test_gradient_is_onehot_minus_softmax():
    """d log p_y / d z = onehot(y) - softmax(z)."""
    logits, tokens = _data(3, (2, 3, 7))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(_token_log_probs(
        x, tokens))))(logits)
    expected = (jax.nn.one_hot(tokens, 7) - jax.nn.softmax(logits, axis=-1))
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Compiled memory
# --------------------------------------------------------------------------

_MEM_SHAPE = (8, 128, 4096)
_FULL_F32_BYTES = 4 * 8 * 128 * 4096


def _temp_bytes(dtype, **kwargs):
    logits = jax.ShapeDtypeStruct(_MEM_SHAPE, dtype)
    tokens = jax.ShapeDtypeStruct(_MEM_SHAPE[:-1], jnp.int32)
    compiled = jax.jit(lambda x, t: afn.token_log_probs(x, t, **kwargs)
                       ).lower(logits, tokens).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("memory_analysis() is not available on this backend")
    return stats.temp_size_in_bytes


def test_no_full_log_softmax_for_float32_logits():
    """float32 logits: no [B, L, V] temporary is materialised."""
    assert _temp_bytes(jnp.float32) < _FULL_F32_BYTES // 8


def test_no_float32_copy_for_bfloat16_logits():
    """bfloat16 logits: no float32 [B, L, V] copy of the logits."""
    assert _temp_bytes(jnp.bfloat16) < _FULL_F32_BYTES // 4


def test_dividing_chunk_size_bounds_float32_temporaries():
    """A chunk size dividing the rows keeps temporaries to a few chunks."""
    assert _temp_bytes(jnp.float32, chunk_size=64) < _FULL_F32_BYTES // 4


def test_non_dividing_chunk_size_bounds_temporaries():
    """A chunk size that does not divide the rows must not copy the logits."""
    assert _temp_bytes(jnp.float32, chunk_size=100) < _FULL_F32_BYTES // 4


# --------------------------------------------------------------------------
# Per-sequence reductions
# --------------------------------------------------------------------------


def test_sequence_log_probs_sum_and_mean_ignore_padding():
    """Masked sum / mean; -inf and NaN in padding are ignored."""
    lp = jnp.array([[-1.0, -2.0, -jnp.inf, jnp.nan],
                    [-0.5, -0.5, -0.5, -0.5],
                    [jnp.nan, -jnp.inf, -3.0, 0.0]])
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_allclose(_sequence_log_probs(lp, mask),
                               [-3.0, -2.0, 0.0])
    np.testing.assert_allclose(
        _sequence_log_probs(lp, mask, normalize=True), [-1.5, -0.5, 0.0])
    grad = jax.grad(lambda x: jnp.sum(_sequence_log_probs(
        x, mask, normalize=True)))(lp)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, np.asarray(mask) * [[0.5], [0.25], [0.]])


def test_sequence_log_probs_defaults_and_axis():
    """No mask sums everything; ``axis`` selects the token axis."""
    lp = jnp.array([[-1.0, -2.0], [-3.0, -4.0]])
    np.testing.assert_allclose(_sequence_log_probs(lp), [-3.0, -7.0])
    np.testing.assert_allclose(_sequence_log_probs(lp, axis=0),
                               [-4.0, -6.0])
    np.testing.assert_allclose(
        _sequence_log_probs(lp, jnp.array([1, 0])), [-1.0, -3.0])
    with pytest.raises(ValueError, match="mask"):
        _sequence_log_probs(lp, jnp.ones(3))


def test_sequence_lengths():
    """Counts of valid tokens, float32, from int or bool masks."""
    out = _sequence_lengths(jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]]))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, [2.0, 1.0, 0.0])
    np.testing.assert_array_equal(
        _sequence_lengths(jnp.array([[True, True, True]])), [3.0])
    np.testing.assert_array_equal(
        _sequence_lengths(jnp.array([[1, 0], [1, 1]]), axis=0),
        [2.0, 1.0])


def test_pipeline_into_dpo():
    """token_log_probs then sequence_log_probs give log pi(y|x)."""
    logits, tokens = _data(5, (2, 4, 6))
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    seq = _sequence_log_probs(_token_log_probs(logits, tokens), mask)
    ref = np.sum(np.where(np.asarray(mask) > 0,
                          np.asarray(_reference(logits, tokens)), 0.0),
                 axis=-1)
    np.testing.assert_allclose(seq, ref, rtol=1e-5)
