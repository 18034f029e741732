"""The key-value-cache sampler: the decoder protocol of TinyCausalLM, cached
against recompute decoding, ragged left-padded prompts, stop tokens, the
sampling transform (temperature, top-k, top-p), prompt buckets and the
cache size, and the trainers that generate through it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from algo_fixtures import draw_margin
from artifex_fn import sampling
from artifex_fn.families.autoregressive import TinyCausalLM
from artifex_fn.grpo import GRPOConfig
from artifex_fn.sampling import GenerationConfig
from artifex_fn.training import AutoregressiveTrainer
from artifex_fn.training import GRPOTrainer

V = 32
TOL = 1e-5
# A draw this far (relative probability) from a CDF boundary cannot flip
# between two samplers whose logits agree to 1e-5.
DRAW_MARGIN = 1e-4


def _model(seed=0, **kw):
    kw = dict(dict(d_model=32, num_heads=2, num_layers=2), **kw)
    return TinyCausalLM(V, rngs=nnx.Rngs(seed), **kw)


MODEL = _model()


def _prompts(seed, b, length):
    return jax.random.randint(jax.random.key(seed), (b, length), 3, V)


GENERATE = jax.jit(
    lambda model, prompts, mask, key, use_cache, top_k, top_p, temperature:
    sampling.generate(model, prompts, key, prompt_mask=mask,
                      max_new_tokens=12, stop_token_ids=(1, 2),
                      use_cache=use_cache, top_k=top_k, top_p=top_p,
                      temperature=temperature),
    static_argnames=("use_cache", "top_k", "temperature"))


# -- the model's protocol --------------------------------------------------

@jax.jit
def _stepwise(model, tokens, valid):
    """The full forward, and prefill of 6 tokens then one at a time."""
    positions = sampling.prompt_positions(valid)
    full = model(tokens, positions=positions, attention_mask=valid)
    cache = model.init_cache(3, 11)
    got, cache = model(tokens[:, :6], positions=positions[:, :6],
                       attention_mask=valid, cache=cache)
    steps = [got]
    for t in range(6, 11):
        logits, cache = model(tokens[:, t:t + 1],
                              positions=positions[:, t:t + 1],
                              attention_mask=valid, cache=cache)
        steps.append(logits)
    return full, jnp.concatenate(steps, axis=1), cache


def test_cached_logits_equal_full_forward_at_every_step():
    """Every step's logits are the full causal forward's, with and without
    left padding."""
    tokens = _prompts(1, 3, 11)
    valid = jnp.array([[0, 0, 0] + [1] * 8, [1] * 11, [0] * 6 + [1] * 5])
    full, got, cache = _stepwise(MODEL, tokens, valid)
    rows = valid > 0   # padded positions' outputs are never used
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(full)[rows],
                               atol=TOL, rtol=TOL)
    assert int(cache["index"]) == 11


@jax.jit
def _padded_and_shifted(model, tokens):
    """Logits of ``tokens``: plain, after 4 pad tokens, and with every
    position shifted by 37."""
    b, t = tokens.shape
    padded = jnp.concatenate([jnp.full((b, 4), 9), tokens], axis=1)
    valid = jnp.concatenate([jnp.zeros((b, 4)), jnp.ones((b, t))], axis=1)
    return (model(tokens),
            model(padded, positions=sampling.prompt_positions(valid),
                  attention_mask=valid)[:, 4:],
            model(tokens, positions=jnp.arange(t) + 37))


def test_padding_and_position_shifts_do_not_change_the_logits():
    """Left padding is invisible; rotary logits depend on relative
    positions only."""
    plain, padded, shifted = _padded_and_shifted(MODEL, _prompts(2, 2, 7))
    np.testing.assert_allclose(padded, plain, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(shifted, plain, atol=1e-4, rtol=1e-4)


def test_model_checks_its_inputs():
    with pytest.raises(ValueError, match="attention_mask"):
        MODEL(_prompts(0, 2, 4), attention_mask=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="even head width"):
        TinyCausalLM(V, d_model=6, num_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_len"):
        TinyCausalLM(V, max_len=4, rngs=nnx.Rngs(0))(_prompts(0, 1, 5))


# -- cached against recompute sampling -------------------------------------

SAMPLERS = [dict(temperature=1.0, top_k=None, top_p=None),
            dict(temperature=0.7, top_k=10, top_p=0.9)]


@pytest.mark.parametrize("kw", SAMPLERS, ids=["plain", "top_k_top_p"])
def test_cached_and_recompute_samplers_draw_the_same_tokens(kw):
    prompts, mask = sampling.pad_prompts(
        [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]], bucketing=8)
    key = jax.random.key(0)   # its draws keep the margin in every case
    cached = GENERATE(MODEL, prompts, mask, key, True, kw["top_k"],
                      kw["top_p"], kw["temperature"])
    recompute = GENERATE(MODEL, prompts, mask, key, False, kw["top_k"],
                         kw["top_p"], kw["temperature"])
    assert draw_margin(MODEL, prompts, mask, recompute, key, **kw) > (
        DRAW_MARGIN)
    np.testing.assert_array_equal(cached.tokens, recompute.tokens)
    np.testing.assert_array_equal(cached.mask, recompute.mask)
    np.testing.assert_allclose(cached.log_probs, recompute.log_probs,
                               atol=TOL, rtol=TOL)
    # The loss's policy gives the behaviour log-probs: ratios are 1.
    policy = sampling.token_policy(
        MODEL, dict(prompt=prompts, completion=cached.tokens,
                    prompt_mask=mask), kw["temperature"], top_k=kw["top_k"],
        top_p=kw["top_p"])
    np.testing.assert_allclose(
        np.exp(policy.log_prob(cached.tokens) * cached.mask
               - cached.log_probs), 1.0, atol=TOL)


def test_greedy_paths_agree_where_the_top_two_logits_are_apart():
    prompts = _prompts(5, 4, 6)
    key = jax.random.key(0)
    cached = GENERATE(MODEL, prompts, None, key, True, None, None, 0)
    recompute = GENERATE(MODEL, prompts, None, key, False, None, None, 0)
    logits = np.asarray(sampling.completion_logits(MODEL, prompts,
                                                   recompute.tokens))
    top2 = np.sort(logits, -1)[..., -2:]
    valid = np.asarray(recompute.mask) > 0
    assert (top2[..., 1] - top2[..., 0])[valid].min() > 1e-3
    np.testing.assert_array_equal(cached.tokens, recompute.tokens)
    # greedy: every drawn token is the argmax of its step's logits
    np.testing.assert_array_equal(
        np.asarray(cached.tokens)[valid], np.argmax(logits, -1)[valid])


def test_left_padded_prompts_give_the_unpadded_tokens_and_log_probs():
    """Row i of a ragged batch draws what row i of a batch of unpadded
    prompts of its length draws (the key's noise depends on the row)."""
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15], [16]]
    prompts, mask = sampling.pad_prompts(rows, bucketing=8)
    key = jax.random.key(6)
    ragged = GENERATE(MODEL, prompts, mask, key, True, None, 0.95, 1.0)
    for i, row in list(enumerate(rows))[1::2]:   # lengths 2 and 1
        alone = GENERATE(MODEL, jnp.asarray([row] * 4), None, key, True,
                         None, 0.95, 1.0)
        np.testing.assert_array_equal(ragged.tokens[i], alone.tokens[i])
        np.testing.assert_allclose(ragged.log_probs[i], alone.log_probs[i],
                                   atol=TOL, rtol=TOL)


class Scripted:
    """A decoder that emits ``script[row, i]`` as the i-th completion token
    and counts the decoding steps it runs (a host callback per call)."""

    def __init__(self, script, prompt_len):
        self.script = jnp.asarray(script)
        self.prompt_len = prompt_len
        self.calls = []

    def init_cache(self, batch_size, max_length):
        self.calls.append(max_length)
        return dict(index=jnp.zeros((), jnp.int32),
                    slots=jnp.zeros((batch_size, max_length)))

    def __call__(self, tokens, *, positions=None, attention_mask=None,
                 cache=None):
        t = tokens.shape[1]
        if cache is not None and t == 1:
            jax.debug.callback(lambda: STEPS.append(1))
        start = 0 if cache is None else cache["index"]
        step = start + jnp.arange(t) - (self.prompt_len - 1)
        nxt = jnp.take(self.script, jnp.clip(step, 0, self.script.shape[1]
                                             - 1), axis=1)
        logits = 50.0 * jax.nn.one_hot(nxt, V)
        if cache is None:
            return logits
        return logits, dict(cache, index=start + t)


STEPS = []


def test_rows_stop_at_any_stop_token_and_the_loop_ends_early():
    script = [[4, 5, 1, 6, 7, 8, 9, 9], [4, 2, 6, 6, 6, 6, 6, 6],
              [4, 4, 4, 4, 4, 4, 4, 4]]
    model = Scripted(script, prompt_len=2)
    STEPS.clear()
    out = sampling.generate(model, jnp.ones((3, 2), jnp.int32),
                            jax.random.key(0), max_new_tokens=8,
                            stop_token_ids=(1, 2), pad_token_id=0)
    np.testing.assert_array_equal(out.tokens, [[4, 5, 1, 0, 0, 0, 0, 0],
                                               [4, 2, 0, 0, 0, 0, 0, 0],
                                               [4] * 8])
    np.testing.assert_array_equal(out.mask, [[1, 1, 1, 0, 0, 0, 0, 0],
                                             [1, 1, 0, 0, 0, 0, 0, 0],
                                             [1] * 8])
    np.testing.assert_allclose(out.log_probs[out.mask == 0], 0.0)
    assert len(STEPS) == 7   # 7 decoding steps after the prefill
    STEPS.clear()
    sampling.generate(Scripted(script[:2], prompt_len=2),
                      jnp.ones((2, 2), jnp.int32), jax.random.key(0),
                      max_new_tokens=8, stop_token_ids=(1, 2))
    assert len(STEPS) == 2   # both rows done after token 3: 2 steps


def test_cache_is_sized_to_the_call():
    """Caches grow in segments to exactly prompt + new tokens - 1 slots."""
    model = Scripted([[4] * 200], prompt_len=16)
    jax.jit(lambda p, k: sampling.generate(model, p, k, max_new_tokens=200)
            ).lower(jnp.ones((1, 16), jnp.int32), jax.random.key(0))
    assert model.calls == [64, 128, 192, 215]
    assert sampling.cache_windows(16, 79) == (64, 79)
    assert sampling.cache_windows(70, 80) == (80,)


def test_grow_cache_pads_the_slot_axis_and_refuses_other_changes():
    small = MODEL.init_cache(2, 3)
    small["layers"][0]["k"] = small["layers"][0]["k"] + 1.0
    small["index"] = jnp.asarray(3)
    big = sampling.grow_cache(small, MODEL.init_cache(2, 5))
    k = np.asarray(big["layers"][0]["k"])
    assert k.shape[2] == 5 and (k[:, :, :3] == 1).all() and (
        k[:, :, 3:] == 0).all()
    assert int(big["index"]) == 3
    with pytest.raises(ValueError, match="one axis"):
        sampling.grow_cache(small, MODEL.init_cache(3, 5))


# -- the sampling transform ------------------------------------------------

def test_transform_logits_by_hand():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
    masked = sampling.MASKED_LOGIT
    got = sampling.transform_logits(logits, top_k=2)
    np.testing.assert_allclose(got, [[masked, np.log(0.4), masked,
                                      np.log(0.3)]], rtol=1e-6)
    # top-p 0.65: 0.4 + 0.3 = 0.7 reaches it; 0.6 (0.4 + 0.2) would not.
    got = sampling.transform_logits(logits, top_p=0.65)
    np.testing.assert_allclose(got, [[masked, np.log(0.4), masked,
                                      np.log(0.3)]], rtol=1e-6)
    got = sampling.transform_logits(logits, top_p=0.35)
    assert (np.asarray(got) > masked).sum() == 1
    # temperature then top-p; kept tokens always in the support
    got = sampling.transform_logits(logits, temperature=0.5, top_p=0.35,
                                    keep=jnp.array([0]))
    np.testing.assert_allclose(got, [[2 * np.log(0.1), 2 * np.log(0.4),
                                      masked, masked]], rtol=1e-6)
    # ties at the k-th value are kept
    tied = sampling.transform_logits(jnp.array([[1.0, 2.0, 2.0, 0.0]]),
                                     top_k=1)
    np.testing.assert_allclose(tied, [[masked, 2.0, 2.0, masked]])


def test_categorical_draws_follow_the_probabilities():
    probs = np.array([0.1, 0.0, 0.45, 0.3, 0.15])
    keys = jax.random.split(jax.random.key(0), 40000)
    draws = np.asarray(jax.vmap(lambda k: sampling.categorical(
        k, jnp.log(jnp.asarray(probs))))(keys))
    freq = np.bincount(draws, minlength=5) / len(draws)
    assert freq[1] == 0.0
    # 5 standard errors of a frequency from 40000 draws
    np.testing.assert_allclose(freq, probs, atol=5 * np.sqrt(0.25 / 40000))


def test_pad_prompts_and_buckets():
    p, m = sampling.pad_prompts([[3, 4, 5], [6]], pad_token_id=9)
    np.testing.assert_array_equal(p, [[9, 3, 4, 5], [9, 9, 9, 6]])
    np.testing.assert_array_equal(m, [[0, 1, 1, 1], [0, 0, 0, 1]])
    p, m = sampling.pad_prompts(np.ones((2, 5), np.int32), bucketing=4)
    assert p.shape == (2, 8) and m.sum() == 10
    assert [sampling.bucket_length(n) for n in (1, 2, 3, 5, 8, 9)] == [
        1, 2, 4, 8, 8, 16]
    assert sampling.bucket_length(5, None) == 5
    with pytest.raises(ValueError, match="prompt_bucketing"):
        sampling.bucket_length(5, "pow3")


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(stop_token_ids=(3, -1)),
                                 r"stop_token_ids\[1\]"),
    (dict(prompt_bucketing=0), "prompt_bucketing"),
    (dict(temperature=0.0), "temperature")])
def test_generation_config_checks_its_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(max_new_tokens=4, **kwargs)


def test_bad_prompts_are_refused_with_the_reason():
    prompts = jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="left-padded"):
        sampling.generate(MODEL, prompts, jax.random.key(0),
                          max_new_tokens=2,
                          prompt_mask=jnp.array([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="decoder protocol"):
        sampling.generate(lambda t: jnp.zeros(t.shape + (V,)), prompts,
                          jax.random.key(0), max_new_tokens=2,
                          prompt_mask=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="shape of `prompts`"):
        sampling.generate(MODEL, prompts, jax.random.key(0),
                          max_new_tokens=2, prompt_mask=jnp.ones((2, 4)))


# -- trainers --------------------------------------------------------------

def _grpo(model=None, **gen):
    model = model or _model(d_model=16, num_layers=1)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    generation = GenerationConfig(**dict(dict(max_new_tokens=6,
                                              eos_token_id=1), **gen))
    return GRPOTrainer(model, opt, GRPOConfig(num_generations=4, beta=0.0),
                       generation=generation, key=0)


def reward(samples, conditions):
    del conditions
    return jnp.mean((samples == 5).astype(jnp.float32), axis=-1)


def test_grpo_on_ragged_prompts_is_on_policy_learns_and_buckets():
    """One trainer (top-k, top-p, temperature 0.8): the first update's
    ratios are 1; prompt lengths 3, 5, 2, 7 compile one program per bucket
    (4 and 8); the reward rises."""
    trainer = _grpo(top_k=8, top_p=0.95, temperature=0.8)
    batches = [dict(observations=[[3, 4, 5], [6, 7], [8], [9, 10]]),
               dict(observations=[[3, 4, 5, 6, 7], [6, 7], [8], [9]]),
               dict(observations=np.full((4, 2), 6, np.int32),
                    prompt_mask=np.ones((4, 2))),
               dict(observations=[[3, 4, 5, 6, 7, 8, 9], [6], [8], [9]])]
    first = trainer.train_step(batches[0], reward, jax.random.key(1))
    assert abs(float(first["approx_kl"])) < 1e-10
    assert float(first["clip_fraction"]) == 0.0
    assert trainer.last_rollout["samples"].shape == (16, 6)
    widths = []
    for i in range(24):
        m = trainer.train_step(batches[i % 4], reward, i + 2)
        widths.append(trainer.last_rollout["conditions"].shape[1])
    assert widths[:4] == [4, 8, 2, 8]
    assert trainer._generate_update._cache_size() == 3
    assert float(m["mean_reward"]) > max(0.5, float(first["mean_reward"])
                                         + 0.3)


def test_bfloat16_parameters_and_cache_with_float32_losses():
    model = _model(d_model=16, num_layers=1, dtype=jnp.bfloat16,
                   param_dtype=jnp.bfloat16)
    trainer = _grpo(model, cache_dtype=jnp.bfloat16)
    m = trainer.train_step(dict(observations=[[3, 4, 5], [6, 7]]), reward,
                           jax.random.key(2))
    for name in ("loss", "policy_loss", "approx_kl", "entropy"):
        assert m[name].dtype == jnp.float32 and np.isfinite(m[name]), name
    assert model.head.kernel[...].dtype == jnp.bfloat16
    roll = trainer.last_rollout
    assert roll["log_probs"].dtype == jnp.float32
    # bfloat16 rounding may separate the cached and the full forward: the
    # first update's ratios are 1 to about bfloat16's precision.
    assert abs(float(m["approx_kl"])) < 1e-2


def test_autoregressive_trainer_generates_ragged_prompts_with_the_cache():
    model = _model(d_model=16, num_layers=1)
    trainer = AutoregressiveTrainer(
        model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param),
        key=0)
    out = trainer.generate([[3, 4, 5], [6]], key=1, max_new_tokens=5,
                           top_p=0.9, stop_token_ids=(1,))
    prompts, mask = sampling.pad_prompts([[3, 4, 5], [6]])
    want = sampling.generate(model, prompts, jax.random.key(1),
                             prompt_mask=mask, max_new_tokens=5, top_p=0.9,
                             stop_token_ids=(1,))
    np.testing.assert_array_equal(out.tokens, want.tokens)
    np.testing.assert_allclose(out.log_probs, want.log_probs, atol=TOL)
