"""Tests for text in, text out: tokenizers, chat templates, prompt batches,
decoding, and the reward functions that read decoded text."""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from artifex_fn import text
from artifex_fn.text import (SPECIAL_TOKENS, BPETokenizer, ByteTokenizer,
                             ChatTemplate, Tokenizer, decode_completions,
                             decode_prompts, encode_prompts)
from artifex_fn.training import (ClippedReward, CompositeReward,
                                 ConstantReward, ScaledReward, TextReward,
                                 ThresholdReward, exact_answer_reward,
                                 format_reward, is_host_reward)

PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END = range(7)
K = len(SPECIAL_TOKENS)

# Text pieces with special-token strings embedded among arbitrary unicode.
_pieces = st.lists(st.one_of(st.text(max_size=12),
                             st.sampled_from(SPECIAL_TOKENS)), max_size=8)


def _corpus():
    """A small generated corpus: sums, chat turns and a little prose."""
    lines = [f"What is {a} + {b}? {a} + {b} = {a + b}"
             for a in range(12) for b in range(12)]
    lines += [f"<|user|>add {a} and {a * 3}<|end|><|assistant|>= {a * 4}"
              for a in range(20)]
    lines += ["the quick brown fox jumps over the lazy dog",
              "héllo wörld, ça va? 数字 and emoji 🎉"] * 5
    return lines


@functools.lru_cache(maxsize=None)
def _bpe():
    return BPETokenizer.train(_corpus(), vocab_size=300)


def _byte_tokens(tok, *texts, width):
    """Right-padded completion ids ``[B, width]`` (pad after the text)."""
    rows = [tok.encode(t) for t in texts]
    return np.array([r + [tok.pad_token_id] * (width - len(r)) for r in rows],
                    np.int32)


# --- ByteTokenizer ---------------------------------------------------------

def test_text_without_a_utf8_encoding_is_a_clear_error():
    with pytest.raises(ValueError, match="lone surrogate"):
        ByteTokenizer().encode("ab\ud800")


def test_byte_tokenizer_layout_and_special_tokens_are_single_ids():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == K + 256
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        PAD, BOS, EOS)
    assert tok.special_tokens == SPECIAL_TOKENS
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.encode(special) == [i]
    assert tok.encode("aé") == [K + 97, K + 0xC3, K + 0xA9]
    assert tok.encode("<|user|>x<|end|>") == [USER, K + ord("x"), END]
    # A string that merely looks like a special token is bytes.
    assert tok.encode("<|usr|>") == [K + b for b in b"<|usr|>"]


@settings(max_examples=200, deadline=None)
@given(_pieces)
def test_byte_tokenizer_round_trip_with_embedded_special_tokens(pieces):
    tok = ByteTokenizer()
    joined = "".join(pieces)
    ids = tok.encode(joined)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == joined
    assert tok.decode(np.asarray(ids, np.int32), False) == joined


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(st.characters(blacklist_characters="<",
                                               blacklist_categories=("Cs",)),
                                  max_size=12),
                          st.sampled_from(SPECIAL_TOKENS)), max_size=8))
def test_byte_tokenizer_skips_special_tokens(pieces):
    tok = ByteTokenizer()
    plain = "".join(p for p in pieces if p not in SPECIAL_TOKENS)
    assert tok.decode(tok.encode("".join(pieces))) == plain


def test_byte_tokenizer_decode_never_raises():
    tok = ByteTokenizer()
    # A lone continuation byte, an id past the vocabulary, a negative id.
    ids = [K + 0x80, K + ord("a"), tok.vocab_size, -1, EOS]
    assert tok.decode(ids) == "\ufffda\ufffd\ufffd"
    assert tok.decode(ids, skip_special_tokens=False) == (
        "\ufffda\ufffd\ufffd<|eos|>")
    # A multi-byte character cut short.
    assert tok.decode([K + b for b in "é".encode()][:1]) == "\ufffd"
    assert tok.decode([]) == ""
    assert tok.decode(jnp.asarray([K + 104, K + 105])) == "hi"


def test_byte_tokenizer_custom_special_tokens():
    tok = ByteTokenizer(("<pad>", "<eos>", "<|eos|>", "<sep>"))
    assert (tok.vocab_size, tok.pad_token_id, tok.eos_token_id,
            tok.bos_token_id) == (260, 0, 2, None)
    assert tok.encode("a<sep>b") == [4 + 97, 3, 4 + 98]
    assert ByteTokenizer() == ByteTokenizer()
    assert hash(ByteTokenizer()) == hash(ByteTokenizer())
    with pytest.raises(ValueError, match="<\\|eos\\|>"):
        ByteTokenizer(("<|pad|>", "<|end|>"))
    with pytest.raises(ValueError, match="duplicates"):
        ByteTokenizer(("<|pad|>", "<|eos|>", "<|pad|>"))
    with pytest.raises(ValueError, match="one string"):
        ByteTokenizer("<|eos|>")


def test_user_tokenizer_satisfies_the_protocol():
    @dataclasses.dataclass
    class Chars:
        vocab_size: int = 128
        pad_token_id: int = 0
        eos_token_id: int = 1
        bos_token_id: int | None = None
        special_tokens: tuple = ("\x00", "\x01")

        def encode(self, s):
            return [ord(c) for c in s]

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids
                           if not (skip_special_tokens and i < 2))

    tok = Chars()
    assert isinstance(tok, Tokenizer)
    assert not isinstance(object(), Tokenizer)
    ids, _ = encode_prompts(tok, ["ab", "c"])
    assert ids.tolist() == [[97, 98], [0, 99]]
    assert decode_prompts(tok, ids) == ["ab", "c"]
    assert decode_completions(tok, [[104, 105, 1, 120]]) == ["hi"]


# --- BPETokenizer ----------------------------------------------------------

def test_bpe_special_tokens_vocab_and_compression():
    tok = _bpe()
    assert isinstance(tok, Tokenizer)
    assert tok.special_tokens == SPECIAL_TOKENS
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        PAD, BOS, EOS)
    assert K + 256 < tok.vocab_size <= 300
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.encode(special) == [i]
    line = "What is 3 + 4? 3 + 4 = 7"
    assert len(tok.encode(line)) < len(line.encode())  # merges were learnt
    ids = tok.encode("<|user|>What is 3 + 4?<|end|><|assistant|>")
    assert ids[0] == USER and ids[-2:] == [END, ASSISTANT]
    assert all(i >= K for i in ids[1:-2])


@pytest.mark.parametrize("line", _corpus()[::17] + [
    "unseen: Ωμέγα ∑ 🚀\n\ttabs  and  spaces ", ""])
def test_bpe_round_trip(line):
    tok = _bpe()
    ids = tok.encode(line)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == line
    assert tok.decode(ids) == re.sub(r"<\|[a-z]+\|>", "", line)


@settings(max_examples=50, deadline=None)
@given(_pieces)
def test_bpe_round_trip_of_any_text(pieces):
    tok = _bpe()
    joined = "".join(pieces)
    assert tok.decode(tok.encode(joined), skip_special_tokens=False) == joined


def test_bpe_decode_never_raises():
    tok = _bpe()
    lone = tok.backend.token_to_id("Ã")  # the first byte of "é" alone
    assert tok.decode([lone]) == "\ufffd"
    ids = tok.encode("ab")
    assert tok.decode(ids + [tok.vocab_size + 5, -3] + ids) == (
        "ab\ufffd\ufffdab")


def test_bpe_training_is_deterministic():
    a = BPETokenizer.train(_corpus(), vocab_size=300)
    b = BPETokenizer.train(_corpus(), vocab_size=300)
    assert a.backend.to_str() == b.backend.to_str()
    assert a.backend.get_vocab() == _bpe().backend.get_vocab()
    for line in _corpus()[::7]:
        assert a.encode(line) == b.encode(line) == _bpe().encode(line)


def test_bpe_cache_trains_once_then_loads(tmp_path, monkeypatch):
    path = tmp_path / "deep" / "dir" / "tok.json"
    first = BPETokenizer.train(_corpus(), vocab_size=300, cache_path=path)
    assert path.is_file()
    assert os.listdir(path.parent) == ["tok.json"]  # no temporary left
    mtime = path.stat().st_mtime_ns
    reference = _bpe()   # trained (or cached) before training is patched out

    def no_training(*args, **kwargs):
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr(text.BPETokenizer, "save", no_training)
    monkeypatch.setattr("tokenizers.trainers.BpeTrainer", no_training)
    second = BPETokenizer.train(["other texts"], vocab_size=400,
                                cache_path=path)
    assert path.stat().st_mtime_ns == mtime
    line = "What is 5 + 6? 5 + 6 = 11"
    assert second.encode(line) == first.encode(line) == reference.encode(line)
    assert second.vocab_size == first.vocab_size


def test_bpe_cache_with_other_special_tokens_raises(tmp_path):
    path = tmp_path / "tok.json"
    BPETokenizer.train(_corpus(), vocab_size=300, cache_path=path)
    other = ("<|pad|>", "<|eos|>")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        BPETokenizer.train(_corpus(), vocab_size=300, special_tokens=other,
                           cache_path=path)


def test_bpe_save_load_and_bad_input(tmp_path):
    tok = _bpe()
    path = tmp_path / "a" / "tok.json"
    tok.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode("7 + 8 = 15") == tok.encode("7 + 8 = 15")
    custom = BPETokenizer.train(["a b c"] * 3, vocab_size=262,
                                special_tokens=("<pad>", "<|eos|>"))
    assert (custom.pad_token_id, custom.eos_token_id, custom.bos_token_id,
            custom.special_tokens) == (0, 1, None, ("<pad>", "<|eos|>"))
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="one string"):
        BPETokenizer.train("abc", vocab_size=300)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        BPETokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        BPETokenizer.load(tmp_path / "bad.json")


# --- ChatTemplate ----------------------------------------------------------

def test_chat_template_exact_strings():
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"}]
    t = ChatTemplate()
    assert t.format(chat) == ("<|system|>Be brief.<|end|><|user|>2+2?<|end|>"
                              "<|assistant|>4<|end|><|user|>3+3?<|end|>"
                              "<|assistant|>")
    assert t.format(chat[:2], add_generation_prompt=False) == (
        "<|system|>Be brief.<|end|><|user|>2+2?<|end|>")
    assert t.format("hi") == "<|user|>hi<|end|><|assistant|>"
    assert t.format([]) == "<|assistant|>"
    plain = ChatTemplate(system="S: ", user="U: ", assistant="A: ", end="\n")
    assert plain.format(chat[1:3]) == "U: 2+2?\nA: 4\nA: "


def test_chat_template_errors():
    t = ChatTemplate()
    with pytest.raises(ValueError, match=r"'tool'.*system.*user.*assistant"):
        t.format([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        t.format([{"content": "x"}])
    with pytest.raises(ValueError, match="content"):
        t.format([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="`end`"):
        ChatTemplate(end="")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.user = "x"


# --- encode_prompts / decode ----------------------------------------------

def test_encode_prompts_left_pads_to_a_bucket():
    tok = ByteTokenizer()
    ids, mask = encode_prompts(tok, ["abc", "hello"])
    assert ids.dtype == np.int32 and mask.dtype == np.float32
    assert ids.shape == mask.shape == (2, 8)
    assert ids[0].tolist() == [PAD] * 5 + tok.encode("abc")
    assert ids[1].tolist() == [PAD] * 3 + tok.encode("hello")
    assert mask.tolist() == [[0.0] * 5 + [1.0] * 3, [0.0] * 3 + [1.0] * 5]
    assert encode_prompts(tok, ["abc", "hello"], bucketing=None)[0].shape == (
        2, 5)
    assert encode_prompts(tok, ["abc", "hello"], bucketing=3)[0].shape == (
        2, 6)
    assert decode_prompts(tok, ids, mask) == ["abc", "hello"]
    assert decode_prompts(tok, ids) == ["abc", "hello"]
    assert decode_prompts(tok, jnp.asarray(ids)) == ["abc", "hello"]


@pytest.mark.parametrize("make", [ByteTokenizer, _bpe], ids=["byte", "bpe"])
def test_encode_prompts_with_template_and_bos(make):
    tok = make()
    chats = [[{"role": "system", "content": "Add."},
              {"role": "user", "content": "What is 1 + 2?"}],
             "What is 10 + 11?"]
    ids, mask = encode_prompts(tok, chats, template=ChatTemplate(), bos=True)
    for row, m, chat in zip(ids, mask, chats):
        real = row[m > 0].tolist()
        assert real == [BOS] + tok.encode(ChatTemplate().format(chat))
        assert real[1] in (SYSTEM, USER) and real[-1] == ASSISTANT
        assert (row[m == 0] == PAD).all()
        assert m.tolist() == sorted(m.tolist())  # padding on the left only
    assert ids.shape[1] == 1 << (int(mask.sum(1).max()) - 1).bit_length()
    assert decode_prompts(tok, ids, mask) == [
        "Add.What is 1 + 2?", "What is 10 + 11?"]


def test_encode_prompts_errors():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="empty"):
        encode_prompts(tok, [])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        encode_prompts(tok, ["a", ""])
    with pytest.raises(ValueError, match="template"):
        encode_prompts(tok, [[{"role": "user", "content": "a"}]])
    with pytest.raises(ValueError, match="list"):
        encode_prompts(tok, "abc")
    with pytest.raises(ValueError, match="bos"):
        encode_prompts(ByteTokenizer(("<|pad|>", "<|eos|>")), ["a"], bos=True)
    # An empty string with a template or a BOS is not empty.
    assert encode_prompts(tok, [""], bos=True)[0].tolist() == [[BOS]]


def test_decode_completions_cuts_at_the_first_stop_token():
    tok = ByteTokenizer()
    h, i, x = (K + ord(c) for c in "hix")
    tokens = np.array([[h, i, EOS, x, x],
                       [h, END, i, EOS, x],
                       [x, USER, x, x, x],
                       [EOS, h, h, h, h]])
    assert decode_completions(tok, tokens) == ["hi", "h", "xxxx", ""]
    assert decode_completions(tok, jnp.asarray(tokens)) == [
        "hi", "h", "xxxx", ""]
    assert decode_completions(tok, tokens, stop_token_ids=[USER]) == [
        "hixx", "hix", "x", "hhhh"]
    assert decode_completions(tok, tokens, stop_token_ids=()) == [
        "hixx", "hix", "xxxx", "hhhh"]
    mask = np.array([[1, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 0, 0, 1],
                     [0, 1, 1, 0, 0]], np.float32)
    assert decode_completions(tok, tokens, mask) == ["h", "", "xx", "hh"]
    bpe = _bpe()
    row = bpe.encode("= 12") + [END] + bpe.encode("junk")
    assert decode_completions(bpe, [row]) == ["= 12"]
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        decode_completions(tok, [1, 2, 3])
    with pytest.raises(ValueError, match="mask"):
        decode_completions(tok, tokens, mask[:, :2])


# --- text rewards ----------------------------------------------------------

def _batch():
    """Completions ``[4, 8]`` and their prompts, with the hand answers."""
    tok = ByteTokenizer()
    questions = ["2 + 3", "10 + 5", "1 + 1", "4 + 4"]
    prompts, _ = encode_prompts(tok, questions, template=ChatTemplate())
    completions = _byte_tokens(tok, "= 5<|end|>", " = 15", "= 3<|eos|>",
                               "eight", width=8)
    return tok, prompts, completions


def _sum(prompt):
    a, b = re.findall(r"\d+", prompt)
    return int(a) + int(b)


def test_text_reward_on_concrete_arrays():
    tok, prompts, completions = _batch()

    def scorer(texts, prompt_texts):
        return [len(c) + 0.5 * len(p) for c, p in zip(texts, prompt_texts)]

    reward = TextReward(scorer, tok)
    out = reward(completions, prompts)
    assert out.dtype == jnp.float32 and out.shape == (4,)
    want = [len(c) + 0.5 * len(p) for c, p in zip(
        ["= 5", " = 15", "= 3", "eight"],
        ["2 + 3", "10 + 5", "1 + 1", "4 + 4"])]
    np.testing.assert_allclose(out, want)
    seen = []
    TextReward(lambda c, p: seen.append((c, p)) or [0] * len(c), tok)(
        completions)
    assert seen == [(["= 5", " = 15", "= 3", "eight"], None)]
    # Custom stops: the stop list replaces the default one.
    cut = TextReward(lambda c, p: [len(s) for s in c], tok,
                     stop_token_ids=[K + ord("=")])
    assert cut.stop_token_ids == (K + ord("="),)
    np.testing.assert_allclose(cut(completions), [0, 1, 0, 5])


def test_text_reward_checks_what_fn_returns():
    tok, _, completions = _batch()

    def too_short(texts, prompts):
        return [1.0] * (len(texts) - 1)

    with pytest.raises(ValueError, match="too_short.*expected"):
        TextReward(too_short, tok)(completions)

    def words(texts, prompts):
        return texts

    with pytest.raises(ValueError, match="words must return numbers"):
        TextReward(words, tok)(completions)


def test_text_reward_traced_without_callback_raises():
    tok, prompts, completions = _batch()
    reward = format_reward(r"= \d+", tokenizer=tok)
    with pytest.raises(TypeError, match="jit_reward=False.*callback=True"):
        jax.jit(reward)(completions, prompts)
    with pytest.raises(TypeError, match="host"):
        jax.vmap(reward)(completions[None])


def test_text_reward_callback_under_jit_and_vmap():
    tok, prompts, completions = _batch()
    host = exact_answer_reward(_sum, tokenizer=tok)
    device = exact_answer_reward(_sum, tokenizer=tok, callback=True)
    want = np.array([1.0, 1.0, 0.0, 0.0], np.float32)
    np.testing.assert_array_equal(host(completions, prompts), want)
    np.testing.assert_array_equal(device(completions, prompts), want)
    jitted = jax.jit(device)
    np.testing.assert_array_equal(jitted(completions, prompts), want)
    stacked = np.stack([completions, completions[::-1]])
    both = jax.jit(jax.vmap(device, in_axes=(0, None)))(stacked, prompts)
    assert both.shape == (2, 4) and both.dtype == jnp.float32
    np.testing.assert_array_equal(both[0], want)
    np.testing.assert_array_equal(
        both[1], host(completions[::-1], prompts))
    fmt = format_reward(r"=\s*\d+", tokenizer=tok, callback=True)
    np.testing.assert_array_equal(jax.jit(fmt)(completions), [1, 1, 1, 0])


def test_format_reward_by_hand():
    tok = ByteTokenizer()
    texts = ["= 12", "  = 7\n", "= 7 and more", "=-3", "x = 1"]
    tokens = _byte_tokens(tok, *texts, width=16)
    reward = format_reward(r"=\s?-?\d+", tokenizer=tok)
    want = [float(re.fullmatch(r"=\s?-?\d+", t.strip()) is not None)
            for t in texts]
    assert want == [1.0, 1.0, 0.0, 1.0, 0.0]
    np.testing.assert_array_equal(reward(tokens), want)


def test_exact_answer_reward_by_hand():
    tok = ByteTokenizer()
    questions = ["2 + 3", "0 - 7", "4 * 4", "9 / 3", "1 + 1"]
    answers = {"2 + 3": 5, "0 - 7": -7, "4 * 4": 16, "9 / 3": " 3 ",
               "1 + 1": 2}
    prompts, _ = encode_prompts(tok, questions)
    tokens = _byte_tokens(tok, "so = 5.", "=-7", "= 61", "=   3", "two",
                          width=8)
    reward = exact_answer_reward(answers.__getitem__, tokenizer=tok)
    np.testing.assert_array_equal(reward(tokens, prompts), [1, 1, 0, 1, 0])
    boxed = exact_answer_reward(answers.__getitem__, tokenizer=tok,
                                extract=r"(\d+)\.")
    np.testing.assert_array_equal(boxed(tokens, prompts), [1, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="prompts"):
        reward(tokens)
    with pytest.raises(ValueError, match="group"):
        exact_answer_reward(str, tokenizer=tok, extract=r"\d+")


def test_combinators_mix_text_and_array_rewards():
    tok, prompts, completions = _batch()
    fmt = format_reward(r"= ?\d+", tokenizer=tok)
    exact = exact_answer_reward(_sum, tokenizer=tok)
    fmt_want = np.array([1, 1, 1, 0], np.float32)
    exact_want = np.array([1, 1, 0, 0], np.float32)
    mixed = CompositeReward([fmt, exact], weights=[0.2, 0.8])
    np.testing.assert_allclose(mixed(completions, prompts),
                               0.2 * fmt_want + 0.8 * exact_want, rtol=1e-6)

    def short(samples, conditions=None):
        return -jnp.sum(samples != tok.pad_token_id, axis=1) / 10.0

    lengths = np.array([4, 5, 4, 5])  # tokens kept before the padding
    both = CompositeReward([exact, short])
    np.testing.assert_allclose(both(completions, prompts),
                               0.5 * exact_want - 0.5 * lengths / 10.0,
                               rtol=1e-6)
    np.testing.assert_allclose(
        ScaledReward(exact, 3.0)(completions, prompts), 3 * exact_want)
    np.testing.assert_array_equal(
        ThresholdReward(mixed, 0.5, 10.0, -1.0)(completions, prompts),
        [10, 10, -1, -1])
    np.testing.assert_allclose(
        ClippedReward(mixed, 0.1, 0.9)(completions, prompts),
        [0.9, 0.9, 0.2, 0.1], rtol=1e-6)
    # With callbacks the same mixture compiles.
    compiled = CompositeReward(
        [format_reward(r"= ?\d+", tokenizer=tok, callback=True),
         exact_answer_reward(_sum, tokenizer=tok, callback=True), short],
        weights=[0.2, 0.8, 1.0])
    np.testing.assert_allclose(
        jax.jit(compiled)(completions, prompts),
        0.2 * fmt_want + 0.8 * exact_want - lengths / 10.0, rtol=1e-6)


def test_is_host_reward():
    tok = ByteTokenizer()
    host = format_reward("x", tokenizer=tok)
    device = format_reward("x", tokenizer=tok, callback=True)
    array = ConstantReward(1.0)
    assert is_host_reward(host)
    assert not is_host_reward(device)
    assert not is_host_reward(array)
    assert not is_host_reward(lambda s, c=None: s)
    assert is_host_reward(CompositeReward([array, host]))
    assert not is_host_reward(CompositeReward([array, device]))
    assert is_host_reward(ScaledReward(ThresholdReward(
        CompositeReward([device, ClippedReward(host)])), 2.0))
    assert not is_host_reward(ClippedReward(ScaledReward(array)))
