"""The text task ``arith``: questions in words, a BPE tokenizer, rewards
read from the decoded text, and reduced GRPO and DPO runs that learn."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artifex_fn import experiments
from artifex_fn import text
from artifex_fn.experiments import arith

# A smaller pre-training (a few seconds) with a stronger signal: the model
# learns the format and leans towards the right answers, as at full size.
# This run and the docs' GRPO-on-text example (tests/test_docs.py, which
# asserts its reward rises) share it through the disk cache, on one test
# worker.
ARITH_GROUP = pytest.mark.xdist_group("arith-reduced")
REDUCED = dict(arith.SMALL_MODEL, eval_repeats=1)


def test_questions_answers_and_tokenizer():
    assert len(set(arith.QUESTIONS)) == 200
    assert arith.answer("What is seven minus nine?") == -2
    assert arith.answer("What is six plus six?") == 12
    assert arith.answer("What is ten plus six?") is None
    assert {arith.answer(q) for q in arith.QUESTIONS} == set(arith.VALUES)
    tok = arith.tokenizer()
    assert isinstance(tok, text.BPETokenizer) and tok.vocab_size == 300
    for q in arith.QUESTIONS[::17]:
        formatted = arith.TEMPLATE.format(q)
        assert tok.decode(tok.encode(formatted),
                          skip_special_tokens=False) == formatted
    d = arith.data()
    prompts = text.decode_prompts(tok, d.prompts, d.prompt_mask)
    assert prompts[:2] == list(arith.QUESTIONS[:2])
    answers = text.decode_completions(tok, d.answers, d.answer_mask)
    assert answers == [arith.completion_text(v) for v in arith.VALUES]


def test_rewards_read_the_decoded_answer():
    tok = arith.tokenizer()
    exact, fmt = arith.rewards()
    d = arith.data()
    q = np.array([arith.QUESTIONS.index("What is seven plus two?"),
                  arith.QUESTIONS.index("What is one minus three?"),
                  arith.QUESTIONS.index("What is one minus three?")])
    texts = ["= 9", "= -2", "=-3 or so"]
    rows = [tok.encode(t) + [arith.stop_ids(tok)[0]] for t in texts]
    width = max(map(len, rows))
    samples = np.array([r + [tok.pad_token_id] * (width - len(r))
                        for r in rows], np.int32)
    prompts = jnp.asarray(d.prompts[q])
    np.testing.assert_array_equal(jax.jit(exact)(samples, prompts),
                                  [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(fmt(samples, prompts), [1.0, 1.0, 0.0])


def test_pretrained_model_is_cached(monkeypatch):
    # Three steps: compiled at the suite's level, not the full optimisation
    # that conftest.py gives the long pre-training loops.
    monkeypatch.setattr(arith, "PRETRAIN_COMPILER_OPTIONS", None)
    s = dict(arith.MODEL_SETTINGS, pretrain_steps=3, pretrain_batch=4,
             d_model=16, num_layers=1)
    params, nll = arith.pretrained(s)
    assert nll.shape == (3,)

    def fail(_):
        raise AssertionError("pre-trained again instead of loading")
    monkeypatch.setattr(arith, "_pretrain", fail)
    again, _ = arith.pretrained(s)
    for a, b in zip(jax.tree_util.tree_leaves(params),
                    jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert os.environ["ARTIFEX_FN_CACHE"] in arith.cache_dir()


@ARITH_GROUP
def test_reduced_dpo_through_the_cli_writes_decoded_samples(tmp_path):
    """DPO ranks held-out pairs and raises success; the run's files
    include samples of decoded answers before and after. (30 iterations:
    held-out accuracy 0.90, success 0.205 -> 0.420.)"""
    out = tmp_path / "run"
    summary = experiments.train(
        "arith", "dpo", overrides=dict(REDUCED, iterations=30),
        out=str(out), chunks=1, progress=False, plot=False, log=None)
    before, after = summary["before"], summary["after"]
    assert before["reward_accuracy"][0][0] == 0.0
    assert after["reward_accuracy"][0][0] >= 0.8
    assert after["success"][0][0] >= before["success"][0][0] + 0.1
    assert summary["files"]["samples"] == "samples.txt"
    lines = (out / "samples.txt").read_text().splitlines()
    assert lines[0] == "before fine-tuning:"
    assert "after fine-tuning (seed 0):" in lines
    assert sum("What is" in line and "(right: = " in line
               for line in lines) == 16


def test_grpo_knobs_metrics_and_a_lora_policy_over_the_base():
    """The knobs' progress-bar entries and the LoRA policy: its trained
    parameters are the adapters alone, and zero adapters give the base's
    logits. (The knobs run, over seeds and a sweep, in
    ``tests/test_cli.py``'s grid, which also checks their metrics: the
    reward parts' statistics and the fill rate.)"""
    from flax import nnx

    s = dict(arith.TEST_SETTINGS["grpo"], num_groups=3, keep_groups=2,
             lora_rank=2)
    program = arith.grpo_program(s)
    assert program.curve == "rewards/exact/mean"
    assert program.postfix == ("rewards/format/mean",
                               "dynamic_sampling/fill_rate")
    full = dict(arith.MODEL_SETTINGS, **{k: s[k] for k in s
                                         if k in arith.MODEL_SETTINGS})
    merge, adapters = arith.lora_model(full, 2)
    carry = program.init(jax.random.key(0), arith.HPARAMS["grpo"])
    assert (jax.tree_util.tree_structure(program.params(carry))
            == jax.tree_util.tree_structure(adapters))
    graphdef, _, _ = arith.model_fns(full)
    base = nnx.merge(graphdef, arith.pretrained(full)[0])
    tokens = jnp.asarray(arith.data().prompts[:3])
    zero = merge(jax.tree_util.tree_map(jnp.zeros_like, adapters))
    np.testing.assert_allclose(zero(tokens), base(tokens), rtol=1e-6,
                               atol=1e-6)
    with pytest.raises(ValueError, match="keep_groups"):
        arith.grpo_program(dict(arith.TEST_SETTINGS["grpo"], keep_groups=3))


# Each on the small pre-trained model (REDUCED), a few seconds of updates.
# Seed 0's numbers: online DPO success 0.205 -> 0.435, format 0.96 (30
# iterations); KTO 0.205 -> 0.505, format 0.875, accuracy 0.934 (at 30
# iterations its format fell to 0.825); ORPO 0.205 -> 0.485, format
# 0.955, accuracy 0.969 (20 iterations).
_PREFERENCE_RUNS = {
    "online_dpo": dict(iterations=30),
    "kto": dict(iterations=40),
    "orpo": dict(iterations=20),
}


@ARITH_GROUP
@pytest.mark.parametrize("algo", sorted(_PREFERENCE_RUNS))
def test_reduced_online_dpo_kto_orpo_raise_success(algo):
    """Online DPO from its own ranked samples, KTO from unpaired right and
    wrong answers, ORPO from pairs without a reference: each raises the
    exact-answer success read from the text, and KTO and ORPO rank the
    held-out pairs (KTO's implicit reward starts at exactly 0: the policy
    is its reference)."""
    summary = experiments.train(
        "arith", algo, overrides=dict(REDUCED, **_PREFERENCE_RUNS[algo]),
        out=None, chunks=1, progress=False, plot=False, log=None)
    before, after = summary["before"], summary["after"]
    assert after["success"][0][0] >= before["success"][0][0] + 0.15
    assert after["format"][0][0] >= 0.85
    if algo == "kto":
        assert before["reward_accuracy"][0][0] == 0.0
    if algo != "online_dpo":
        assert after["reward_accuracy"][0][0] >= 0.9
