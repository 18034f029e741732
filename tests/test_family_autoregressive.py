"""Autoregressive models: cross-entropy, scheduled sampling, generation,
and learning synthetic strings with the NNX trainer."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_fn import sampling
from artifex_fn.families import autoregressive as ar
from artifex_fn.training import AutoregressiveTrainer
from artifex_fn.families.autoregressive import TinyCausalLM

V = 5


def bigram(params, tokens):
    """Causal by construction: the logits at j depend on token j only."""
    return params["table"][tokens]


def _table(seed=0):
    return dict(table=jax.random.normal(jax.random.key(seed), (V, V)))


def top_gaps(logits, k=1):
    """Gap between the k-th and (k+1)-th largest value of each row."""
    s = np.sort(np.asarray(logits, np.float64), -1)
    return s[..., -k] - s[..., -k - 1]


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.sum(np.exp(x - x.max()))) - x.max()


CFG = ar.AutoregressiveConfig(apply=bigram, optimizer=optax.adam(0.1))
LOSS = jax.jit(ar.loss)   # eager calls would compile op by op
UPDATE = jax.jit(ar.update)


def test_cross_entropy_with_padding_matches_hand_computation():
    params = _table()
    table = np.asarray(params["table"])
    tokens = jnp.array([[1, 2, 3, 0], [4, 4, 0, 0]])   # 0 is padding
    loss, m = LOSS(params, dict(tokens=tokens), CFG, jax.random.key(0))
    # Valid (input -> target) pairs: 1->2, 2->3, 4->4.
    nll = [-log_softmax(table[1])[2], -log_softmax(table[2])[3],
           -log_softmax(table[4])[4]]
    np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(m["nll"], np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(m["perplexity"], np.exp(np.mean(nll)),
                               rtol=1e-5)
    assert float(m["num_tokens"]) == 3.0
    # No near-tie under the argmax: the accuracy is exact on any machine.
    assert top_gaps(table[[1, 2, 4]]).min() > 1e-4
    correct = [table[1].argmax() == 2, table[2].argmax() == 3,
               table[4].argmax() == 4]
    np.testing.assert_allclose(m["accuracy"], np.mean(correct))
    # Label smoothing: (1 - eps) nll + eps * mean_v(-log p_v).
    eps = 0.2
    smooth = [(1 - eps) * n - eps * log_softmax(table[i]).mean()
              for n, i in zip(nll, (1, 2, 4))]
    loss_s, _ = LOSS(params, dict(tokens=tokens),
                        dataclasses.replace(CFG, label_smoothing=eps),
                        jax.random.key(0))
    np.testing.assert_allclose(loss_s, np.mean(smooth), rtol=1e-5)
    # An explicit mask overrides the pad id (here: only the first target).
    mask = jnp.array([[1, 1, 0, 0], [0, 0, 0, 0]])
    loss_m, m = LOSS(params, dict(tokens=tokens, mask=mask), CFG,
                        jax.random.key(0))
    np.testing.assert_allclose(loss_m, nll[0], rtol=1e-5)
    assert float(m["num_tokens"]) == 1.0


def test_mix_predictions_replaces_valid_positions_after_the_first():
    inputs = jnp.array([[1, 2, 3, 4], [1, 2, 0, 0]])
    preds = jnp.array([[7, 8, 9, 6], [7, 8, 9, 6]])
    valid = (inputs != 0).astype(jnp.float32)
    mixed, replaced = ar.mix_predictions(inputs, preds, valid, 1.0,
                                         jax.random.key(0))
    np.testing.assert_array_equal(mixed, [[1, 7, 8, 9], [1, 7, 0, 0]])
    np.testing.assert_array_equal(replaced, [[0, 1, 1, 1], [0, 1, 0, 0]])
    mixed, replaced = ar.mix_predictions(inputs, preds, valid, 0.0,
                                         jax.random.key(0))
    np.testing.assert_array_equal(mixed, inputs)
    _, replaced = ar.mix_predictions(jnp.ones((2000, 5), jnp.int32),
                                     jnp.zeros((2000, 5), jnp.int32),
                                     jnp.ones((2000, 5)), 0.3,
                                     jax.random.key(1))
    assert abs(float(replaced[:, 1:].mean()) - 0.3) < 0.02


def test_scheduled_sampling_feeds_model_predictions():
    # A peaked table: the model always predicts token (t + 1) mod V.
    table = 30.0 * jax.nn.one_hot((jnp.arange(V) + 1) % V, V)
    params = dict(table=table)
    tokens = jnp.array([[1, 3, 3, 3]])
    cfg = dataclasses.replace(CFG, scheduled_sampling=1.0)
    loss, m = LOSS(params, dict(tokens=tokens), cfg, jax.random.key(0))
    # Inputs become [1, 2, 3] (own predictions), targets stay [3, 3, 3].
    lp = [log_softmax(np.asarray(table[i]))[3] for i in (1, 2, 3)]
    np.testing.assert_allclose(loss, -np.mean(lp), rtol=1e-5)
    assert float(m["sampling_probability"]) == 1.0
    tf_loss, _ = LOSS(params, dict(tokens=tokens), CFG, jax.random.key(0))
    assert float(tf_loss) > float(loss) + 5.0
    # Under jit the probability is traced: p = 0 gives teacher forcing.
    jitted = LOSS(params, dict(tokens=tokens),
                              dataclasses.replace(cfg, scheduled_sampling=0.0),
                              jax.random.key(0))[0]
    np.testing.assert_allclose(jitted, tf_loss, rtol=1e-6)


def test_linear_schedule_follows_the_step():
    cfg = dataclasses.replace(CFG, scheduled_sampling=0.0,
                              scheduled_sampling_final=0.5,
                              scheduled_sampling_steps=4)
    got = [float(ar.scheduled_sampling_probability(cfg, s))
           for s in (0, 2, 4, 10)]
    np.testing.assert_allclose(got, [0.0, 0.25, 0.5, 0.5])
    state = ar.init(_table(), cfg, key=jax.random.key(0))
    tokens = dict(tokens=jnp.array([[1, 2, 3, 4]]))
    probs = []
    for _ in range(3):
        state, m = UPDATE(state, tokens)
        probs.append(float(m["sampling_probability"]))
    np.testing.assert_allclose(probs, [0.0, 0.125, 0.25])


def test_jit_and_vmap_update_over_seeds():
    tokens = dict(tokens=jax.random.randint(jax.random.key(0), (8, 6), 1, V))
    cfg = dataclasses.replace(CFG, scheduled_sampling=0.25)
    states = [ar.init(_table(i), cfg, key=jax.random.key(i))
              for i in range(2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    out, metrics = jax.jit(jax.vmap(ar.update, in_axes=(0, None)))(stacked,
                                                                   tokens)
    assert metrics["loss"].shape == (2,)
    for i, state in enumerate(states):
        ref, ref_m = UPDATE(state, tokens)
        np.testing.assert_allclose(out.params["table"][i], ref.params["table"],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["loss"][i], ref_m["loss"],
                                   rtol=1e-5)


class PositionLogits(nnx.Module):
    """Fixed random logits per position (ignores the tokens: causal)."""

    def __init__(self, length, vocab, seed):
        self.logits = nnx.Param(
            3.0 * jax.random.normal(jax.random.key(seed), (length, vocab)))

    def __call__(self, tokens):
        logits = self.logits[...][:tokens.shape[1]]
        return jnp.broadcast_to(logits, tokens.shape + logits.shape[-1:])


def _logits_model(seed=0, length=8, vocab=10):
    model = PositionLogits(length, vocab, seed)
    return model, lambda m, t: m(t)


def test_top_k_never_leaves_the_top_k():
    model, apply = _logits_model()
    prompts = jnp.zeros((2000, 2), jnp.int32)
    comp, mask, _ = jax.jit(lambda k: sampling.generate(
        lambda t: apply(model, t), prompts, k, max_new_tokens=5,
        temperature=3.0, top_k=3))(jax.random.key(0))
    table = np.asarray(model.logits[...])
    # The top 3 (and the top 1) of each row are clear of the next logit, so
    # which tokens they are cannot depend on rounding.
    assert top_gaps(table[1:6], k=3).min() > 1e-4
    assert top_gaps(table).min() > 1e-4
    for i in range(5):
        top = set(np.argsort(table[1 + i])[-3:])
        seen = set(np.unique(np.asarray(comp[:, i])))
        assert seen == top, (i, seen, top)
    assert float(mask.min()) == 1.0
    # top_k=1 is greedy.
    greedy = sampling.sample_next_token(jax.random.key(0),
                                        jnp.asarray(table), top_k=1)
    np.testing.assert_array_equal(greedy, table.argmax(-1))


def test_zero_temperature_is_greedy():
    model, apply = _logits_model(seed=1)
    prompts = jnp.zeros((4, 1), jnp.int32)
    logits = np.asarray(model.logits[...])[:6]
    # Clear top-1 gaps: no tie under the argmax, and at temperature 1e-4
    # any other token has probability below exp(-100).
    assert top_gaps(logits).min() > 1e-2
    expected = logits.argmax(-1)
    for temperature in (0.0, 1e-4):
        comp, _, _ = sampling.generate(lambda t: apply(model, t), prompts,
                                    jax.random.key(3), max_new_tokens=6,
                                    temperature=temperature)
        np.testing.assert_array_equal(comp, np.tile(expected, (4, 1)))


def test_generation_stops_at_eos_and_pads():
    table = 30.0 * jax.nn.one_hot((jnp.arange(V) + 1) % V, V)
    params = dict(table=table)   # deterministic: 1 -> 2 -> 3 -> 4 -> 0
    comp, mask, _ = sampling.generate(lambda t: bigram(params, t),
                                   jnp.array([[1], [3]]), jax.random.key(0),
                                   max_new_tokens=4, eos_token_id=4,
                                   pad_token_id=0)
    np.testing.assert_array_equal(comp, [[2, 3, 4, 0], [4, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0]])


def test_config_validation():
    with pytest.raises(ValueError, match="scheduled_sampling"):
        ar.AutoregressiveConfig(scheduled_sampling=1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        ar.AutoregressiveConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="scheduled_sampling_steps"):
        ar.AutoregressiveConfig(scheduled_sampling_steps=0)
    with pytest.raises(ValueError, match="config.apply"):
        ar.init({}, ar.AutoregressiveConfig(optimizer=optax.sgd(0.1)))
    with pytest.raises(ValueError, match=r"\[B, L\] with L >= 2"):
        ar.loss(_table(), dict(tokens=jnp.ones((2,), jnp.int32)), CFG,
                jax.random.key(0))
    with pytest.raises(ValueError, match=r"logits \[B, L, V\]"):
        ar.loss(_table(), dict(tokens=jnp.ones((2, 3), jnp.int32)),
                dataclasses.replace(CFG, apply=lambda p, t: t),
                jax.random.key(0))
    with pytest.raises(ValueError, match="top_k"):
        sampling.sample_next_token(jax.random.key(0), jnp.zeros((1, 3)),
                                   top_k=0)


def _counting_strings(key, n, length=6, bos=1):
    """``BOS d d+1 d+2 ...`` (mod 10), digits as tokens 2..11."""
    start = jax.random.randint(key, (n, 1), 0, 10)
    digits = (start + jnp.arange(length - 1)) % 10 + 2
    return jnp.concatenate([jnp.full((n, 1), bos), digits], 1).astype(
        jnp.int32)


def test_trainer_learns_counting_strings_and_generates():
    model = nnx.jit(lambda: TinyCausalLM(12, max_len=6, d_model=32,
                                         num_heads=2, rngs=nnx.Rngs(0)))()
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    cfg = ar.AutoregressiveConfig(scheduled_sampling=0.0,
                                  scheduled_sampling_final=0.25,
                                  scheduled_sampling_steps=100)
    trainer = AutoregressiveTrainer(model, opt, cfg, key=0)
    data = jax.jit(_counting_strings, static_argnums=1)
    first = trainer.train_step(dict(tokens=data(jax.random.key(0), 64)))
    for i in range(150):
        m = trainer.train_step(dict(tokens=data(jax.random.key(i + 1), 64)))
    assert trainer._generic_step._cache_size() == 1
    assert float(m["sampling_probability"]) == 0.25
    # After the first digit the string is determined: NLL -> log(10) / 5.
    assert float(first["nll"]) > 2.0 > 1.0 > float(m["nll"])
    prompts = data(jax.random.key(999), 200)[:, :2]
    comp, mask, _ = trainer.generate(prompts, key=0, max_new_tokens=4,
                                  temperature=0.0)
    expected = (prompts[:, 1:2] - 2 + jnp.arange(1, 5)) % 10 + 2
    assert float(jnp.mean(jnp.all(comp == expected, axis=1))) > 0.95
    assert model(prompts).shape == (200, 2, 12)
