"""Arithmetic posed in words: GRPO and DPO fine-tuning of a small causal LM
that reads and writes text, each run one compiled program.

Task. A question ``"What is seven plus two?"`` (operands ``zero`` ...
``nine``, ``plus`` or ``minus``: :data:`QUESTIONS`, 200 of them) is
formatted as a chat turn (:class:`artifex_fn.text.ChatTemplate`:
``<|user|>What is seven plus two?<|end|><|assistant|>``); the model
answers ``"= 9"`` and ends with ``<|end|>``. The reward reads the decoded
text: the number after ``=`` is compared with :func:`answer` of the
decoded question (1 or 0; :func:`rewards`, the rule of
:func:`artifex_fn.training.exact_answer_reward`).

Tokenizer. A byte-level BPE (:class:`artifex_fn.text.BPETokenizer`)
trained at set-up on the questions and every answer (vocabulary
:data:`VOCAB_SIZE`, the special tokens of :data:`artifex_fn.text.
SPECIAL_TOKENS`), cached on disk (:func:`cache_dir`).

Pre-training. A :class:`~artifex_fn.families.autoregressive.TinyCausalLM`
learns the answers by teacher forcing on question-answer texts whose answer
is right with probability ``correct_fraction`` (0.25) and otherwise a random
one of the 28 possible values: it ends knowing the format and leaning
towards the right answer, with an exact-answer success near
``0.25 + 0.75 / 28`` once it has learnt them (0.205 measured after 3000
steps at batch 128, 67 s on a 2-core CPU). The pre-training is one
``lax.scan`` of
:func:`artifex_fn.families.autoregressive.update`, run once per model
setting (not per seed) and cached on disk; its parameters are the reference
``pi_ref`` of both algorithms.

GRPO. Each iteration draws ``num_groups`` questions, samples
``num_generations`` answers of each with the key-value-cache sampler
(:func:`artifex_fn.sampling.generate`, left-padded prompts), scores them
from the decoded text (a ``jax.pure_callback`` inside the compiled
program) and takes one :func:`artifex_fn.grpo.update` step with the
sampler's behaviour log-probs. ``score``: ``success``, the exact-answer rate
of one sampled answer for each question.

DPO. Questions are split (``split_seed``) into training (80%) and held-out
ones. A pair is a question with its right answer (chosen) and a random
wrong one (rejected). ``score``: ``reward_accuracy`` on ``eval_pairs``
held-out pairs; ``success`` is reported too.

:data:`HPARAMS` are traced (sweepable); :data:`SETTINGS` are static.
:data:`TEST_SETTINGS` are tiny overrides for smoke tests.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from artifex_fn import dpo
from artifex_fn import grpo
from artifex_fn import text
from artifex_fn.experiments import lm
from artifex_fn.experiments._program import Program
from artifex_fn.experiments._program import adam
from artifex_fn.experiments._program import gaussian_init
from artifex_fn.experiments._program import resolve_settings
from artifex_fn.experiments._program import with_learning_rate
from artifex_fn.experiments.tasks import Range
from artifex_fn.families import autoregressive as ar
from artifex_fn.families.autoregressive import TinyCausalLM
from artifex_fn.lora import add_lora
from artifex_fn.sampling import generate
from artifex_fn.sampling import prompt_positions
from artifex_fn.sampling import token_policy

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven",
         "eight", "nine")
OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b}
QUESTIONS = tuple(f"What is {WORDS[a]} {op} {WORDS[b]}?"
                  for op in OPS for a in range(10) for b in range(10))
VALUES = tuple(range(-9, 19))        # every possible answer
VOCAB_SIZE = 300
NUM_HEADS = 2
PRETRAIN_LR = 3e-3
TEMPLATE = text.ChatTemplate()
_QUESTION = re.compile(r"What is (\w+) (plus|minus) (\w+)\?")
ANSWER_FORMAT = r"= -?\d+"

MODEL_SETTINGS = dict(pretrain_steps=3000, pretrain_batch=128, d_model=64,
                      num_layers=2, correct_fraction=0.25, eval_repeats=2)
# A model pre-trained in seconds (a stronger signal: half the answers
# right), for examples and tests: it too knows the format and leans towards
# the right answers (success about 0.2).
SMALL_MODEL = dict(pretrain_steps=600, pretrain_batch=64, d_model=32,
                   correct_fraction=0.5)
# GRPO's practical knobs (all off by default): several updates per
# generation (`num_epochs`, `num_minibatches`), dynamic sampling (generate
# `num_groups` groups, train on `keep_groups` whose rewards differ; 0: off)
# and LoRA adapters of rank `lora_rank` on the frozen pre-trained model,
# which is then the reference (0: full fine-tuning).
GRPO_KNOBS = dict(num_epochs=1, num_minibatches=1, keep_groups=0,
                  lora_rank=0)
SETTINGS = dict(
    grpo=dict(MODEL_SETTINGS, iterations=600, num_groups=32,
              num_generations=8, **GRPO_KNOBS),
    dpo=dict(MODEL_SETTINGS, iterations=300, batch_pairs=64,
             eval_pairs=256, split_seed=0))
HPARAMS = dict(grpo=dict(lr=1e-3, beta=0.04, clip_param=0.2,
                         entropy_coeff=0.0),
               dpo=dict(lr=1e-3, beta=0.5))

# The algorithms' ranges are the lm task's; the model settings differ.
_COUNT = Range.count()
RANGES = {algo: dict({k: v for k, v in lm.RANGES[algo].items()
                      if k != "eval_samples"},
                     correct_fraction=Range.unit(), eval_repeats=_COUNT)
          for algo in ("grpo", "dpo")}
RANGES["grpo"].update(num_epochs=_COUNT, num_minibatches=_COUNT,
                      keep_groups=Range.count(0), lora_rank=Range.count(0))
# Online DPO, KTO and ORPO (programs in arith_preference, re-exported at
# the end of this module).
RANGES["online_dpo"] = dict(
    {k: v for k, v in RANGES["grpo"].items()
     if k not in ("clip_param", "entropy_coeff", "num_epochs",
                  "num_minibatches", "keep_groups", "lora_rank")},
    beta=Range.positive(), rpo_alpha=Range.non_negative())
_PAIR_RANGES = {k: v for k, v in RANGES["dpo"].items() if k != "beta"}
RANGES["kto"] = dict(_PAIR_RANGES, batch_examples=Range.count(2),
                     beta=Range.positive(),
                     desirable_weight=Range.non_negative(),
                     undesirable_weight=Range.non_negative())
del RANGES["kto"]["batch_pairs"]
RANGES["orpo"] = dict(_PAIR_RANGES, lambda_=Range.non_negative())

_TEST_COMMON = dict(iterations=2, pretrain_steps=2, pretrain_batch=8,
                    d_model=16, num_layers=1, eval_repeats=1)
TEST_SETTINGS = dict(
    grpo=dict(_TEST_COMMON, num_groups=2, num_generations=4),
    dpo=dict(_TEST_COMMON, batch_pairs=8, eval_pairs=16),
    online_dpo=dict(_TEST_COMMON, num_groups=2, num_generations=4),
    kto=dict(_TEST_COMMON, batch_examples=8, eval_pairs=16),
    orpo=dict(_TEST_COMMON, batch_pairs=8, eval_pairs=16))


def check_settings(algo: str, settings: dict) -> None:
    """Constraints between settings that their ranges cannot express."""
    d = settings["d_model"]
    if d % NUM_HEADS or (d // NUM_HEADS) % 2:
        raise ValueError(f"d_model must be {NUM_HEADS} heads times an even "
                         f"head width, got {d}")
    if algo != "grpo":
        return
    groups = settings["keep_groups"] or settings["num_groups"]
    if settings["keep_groups"] > settings["num_groups"]:
        raise ValueError(
            f"keep_groups ({settings['keep_groups']}) must not exceed "
            f"num_groups ({settings['num_groups']}), the groups generated")
    if (groups * settings["num_generations"]) % settings["num_minibatches"]:
        raise ValueError(
            f"num_minibatches ({settings['num_minibatches']}) must divide the "
            f"{groups * settings['num_generations']} samples of an update")


# -- text: questions, answers, tokenizer -------------------------------------

def answer(question: str) -> int | None:
    """The value asked by ``question`` (``None`` if it is not one)."""
    m = _QUESTION.search(question)
    if m is None or m.group(1) not in WORDS or m.group(3) not in WORDS:
        return None
    return OPS[m.group(2)](WORDS.index(m.group(1)), WORDS.index(m.group(3)))


def completion_text(value: int) -> str:
    """The answer text for ``value``: ``"= 9"``."""
    return f"= {value}"


def cache_dir() -> str:
    """Where the tokenizer and the pre-trained model are cached:
    ``$ARTIFEX_FN_CACHE`` or ``~/.cache/artifex_fn``, then ``arith/``."""
    root = os.environ.get("ARTIFEX_FN_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "artifex_fn")
    return os.path.join(root, "arith")


def corpus() -> list[str]:
    """The texts the tokenizer is trained on: every formatted question and
    every answer."""
    return ([TEMPLATE.format(q) for q in QUESTIONS]
            + [completion_text(v) + TEMPLATE.end for v in VALUES])


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()
                          ).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def tokenizer() -> text.BPETokenizer:
    """The task's byte-level BPE, trained once and cached on disk."""
    texts = corpus()
    path = os.path.join(cache_dir(), f"tokenizer-{VOCAB_SIZE}-"
                        f"{_fingerprint(texts)}.json")
    return text.BPETokenizer.train(texts, vocab_size=VOCAB_SIZE,
                                   cache_path=path)


def stop_ids(tok) -> tuple[int, ...]:
    """``<|end|>`` and the end-of-sequence token."""
    return (tok.encode(TEMPLATE.end)[0], tok.eos_token_id)


class Data:
    """The questions and answers as token arrays (NumPy, built once).

    Attributes:
      prompts, prompt_mask: ``[200, Lp]`` left-padded chat prompts.
      answers, answer_mask: ``[28, Nc]`` every answer text with its
        ``<|end|>``, right-padded.
      correct: ``[200]`` row of :data:`VALUES` answering each question.
    """

    def __init__(self, tok):
        self.tok = tok
        self.prompts, self.prompt_mask = text.encode_prompts(
            tok, list(QUESTIONS), template=TEMPLATE)
        rows = [tok.encode(completion_text(v)) + [stop_ids(tok)[0]]
                for v in VALUES]
        width = max(map(len, rows))
        self.answers = np.full((len(rows), width), tok.pad_token_id,
                               np.int32)
        self.answer_mask = np.zeros((len(rows), width), np.float32)
        for i, r in enumerate(rows):
            self.answers[i, :len(r)] = r
            self.answer_mask[i, :len(r)] = 1.0
        self.correct = np.array([VALUES.index(answer(q)) for q in QUESTIONS],
                                np.int32)

    @property
    def max_new_tokens(self) -> int:
        return self.answers.shape[1]


@functools.lru_cache(maxsize=None)
def data() -> Data:
    return Data(tokenizer())


def score_text(completions: list[str], prompts: list[str]) -> np.ndarray:
    """``[B, 2]`` float32: per answer, exact (the number after ``=`` is
    :func:`answer` of its question) and format (the whole answer is
    ``= <number>``)."""
    out = np.zeros((len(completions), 2), np.float32)
    for i, (c, p) in enumerate(zip(completions, prompts)):
        m = re.search(r"=\s*(-?\d+)", c)
        out[i, 0] = m is not None and m.group(1) == str(answer(p))
        out[i, 1] = re.fullmatch(ANSWER_FORMAT, c.strip()) is not None
    return out


def text_scores(samples, prompts):
    """``[B, 2]`` :func:`score_text` of the decoded answers ``samples
    [B, N]`` and questions ``prompts [B, Lp]``, on the host through
    ``jax.pure_callback`` (so inside the compiled, vmapped program; the
    same rules as ``artifex_fn.training.exact_answer_reward`` and
    ``format_reward``, which run between compiled calls instead)."""
    tok = tokenizer()

    def host(samples, prompts):
        return score_text(text.decode_completions(tok, samples),
                          text.decode_prompts(tok, prompts))

    return jax.pure_callback(
        host, jax.ShapeDtypeStruct((samples.shape[0], 2), jnp.float32),
        samples, prompts, vmap_method="sequential")


def rewards():
    """``(exact, format)``: the two columns of :func:`text_scores` as
    rewards ``(samples, prompts) -> [B]``."""
    return ((lambda s, p: text_scores(s, p)[:, 0]),
            (lambda s, p: text_scores(s, p)[:, 1]))


# -- model and pre-training --------------------------------------------------

def model_fns(s):
    """``(graphdef, init_params(key), apply(params, tokens))``; ``apply``
    treats pad tokens as left padding (positions from the rest)."""
    tok = tokenizer()
    graphdef, init_params = gaussian_init(TinyCausalLM(
        tok.vocab_size, d_model=s["d_model"], num_heads=NUM_HEADS,
        num_layers=s["num_layers"], mlp_ratio=4, rngs=nnx.Rngs(0)))
    pad = tok.pad_token_id

    def apply(params, tokens):
        valid = tokens != pad
        return nnx.merge(graphdef, params)(
            tokens, positions=prompt_positions(valid), attention_mask=valid)

    return graphdef, init_params, apply


def pretrain_batch(d: Data, key, n: int, correct_fraction):
    """``n`` question-answer token rows, the answer right with probability
    ``correct_fraction``; the loss mask covers the answer tokens."""
    k_q, k_right, k_wrong = jax.random.split(key, 3)
    q = jax.random.randint(k_q, (n,), 0, len(QUESTIONS))
    right = jax.random.bernoulli(k_right, correct_fraction, (n,))
    a = jnp.where(right, jnp.asarray(d.correct)[q],
                  jax.random.randint(k_wrong, (n,), 0, len(VALUES)))
    tokens = jnp.concatenate([jnp.asarray(d.prompts)[q],
                              jnp.asarray(d.answers)[a]], axis=1)
    mask = jnp.concatenate([jnp.zeros(d.prompts.shape, jnp.float32)[q],
                            jnp.asarray(d.answer_mask)[a]], axis=1)
    # The last prompt token predicts the first answer token.
    return dict(tokens=tokens, mask=mask)


# XLA options of the pre-training program (None: JAX's). It is one long
# loop, run once and cached; a process that compiles everything else at a
# low optimisation level (a test session) may set full optimisation here.
PRETRAIN_COMPILER_OPTIONS: dict | None = None


def _pretrain(s):
    d = data()
    _, init_params, apply = model_fns(s)
    config = ar.AutoregressiveConfig(pad_token_id=d.tok.pad_token_id,
                                     apply=apply, optimizer=adam(flat=True))

    @functools.partial(jax.jit, compiler_options=PRETRAIN_COMPILER_OPTIONS)
    def run(key):
        k_init, k_state, k_data = jax.random.split(key, 3)
        state = with_learning_rate(
            ar.init(init_params(k_init), config, key=k_state), PRETRAIN_LR)

        def body(state, k):
            state, metrics = ar.update(state.replace(config=config),
                                       pretrain_batch(d, k, s["pretrain_batch"],
                                                      s["correct_fraction"]))
            return state.replace(config=None), metrics["nll"]

        state, nll = jax.lax.scan(body, state.replace(config=None),
                                  jax.random.split(k_data,
                                                   s["pretrain_steps"]))
        return state.params, nll

    return run(jax.random.key(0))


_MODEL_KEYS = ("pretrain_steps", "pretrain_batch", "d_model", "num_layers",
               "correct_fraction")


def pretrained(s):
    """``(params, nll [pretrain_steps])`` of the pre-trained model of
    settings ``s`` (key 0), from the disk cache when present."""
    key = {k: s[k] for k in _MODEL_KEYS}
    path = os.path.join(cache_dir(), "model-" + _fingerprint(
        dict(key, vocab=tokenizer().vocab_size, corpus=_fingerprint(
            corpus()), version=1)) + ".npz")
    graphdef, init_params, _ = model_fns(s)
    template = jax.eval_shape(init_params, jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if os.path.exists(path):
        with np.load(path) as f:
            arrays = [f[f"p{i}"] for i in range(len(leaves))]
            nll = f["nll"]
        if all(a.shape == x.shape for a, x in zip(arrays, leaves)):
            return jax.tree_util.tree_unflatten(
                treedef, [jnp.asarray(a) for a in arrays]), nll
    params, nll = jax.device_get(_pretrain(s))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, nll=np.asarray(nll), **{
        f"p{i}": np.asarray(x)
        for i, x in enumerate(jax.tree_util.tree_leaves(params))})
    os.replace(tmp, path)
    return params, np.asarray(nll)


def pretrained_model(**settings) -> TinyCausalLM:
    """The pre-trained :class:`TinyCausalLM` (an NNX module); ``settings``
    override :data:`MODEL_SETTINGS`."""
    s = dict(MODEL_SETTINGS, **settings)
    graphdef, _, _ = model_fns(s)
    return nnx.merge(graphdef, pretrained(s)[0])


# -- sampling and evaluation -------------------------------------------------

def _merge(graphdef, *frozen):
    """``params -> module``: the model rebuilt from its trained parameters
    (and, for LoRA, the frozen base state)."""
    if not isinstance(graphdef, nnx.GraphDef):
        return graphdef     # already a function
    return lambda params: nnx.merge(graphdef, params, *frozen)


def _policy(graphdef):
    merge = _merge(graphdef)

    def policy(params, observations):
        return token_policy(merge(params), observations)
    return policy


def sample(graphdef, params, key, rows):
    """Answers of the questions ``rows`` sampled at temperature 1:
    ``(observations, Generation)``. ``graphdef`` may be a ``params ->
    module`` function instead."""
    d = data()
    prompts = jnp.asarray(d.prompts)[rows]
    mask = jnp.asarray(d.prompt_mask)[rows]
    out = generate(_merge(graphdef)(params), prompts, key,
                   prompt_mask=mask, max_new_tokens=d.max_new_tokens,
                   stop_token_ids=stop_ids(d.tok),
                   pad_token_id=d.tok.pad_token_id)
    return dict(prompt=prompts, prompt_mask=mask, completion=out.tokens), out


def sample_metrics(graphdef, params, key, repeats: int):
    """``success`` (exact answers) and ``format`` (``= <number>``) of one
    sampled answer per question, ``repeats`` times."""
    rows = jnp.tile(jnp.arange(len(QUESTIONS)), repeats)
    obs, out = sample(graphdef, params, key, rows)
    scores = jnp.mean(text_scores(out.tokens, obs["prompt"]), axis=0)
    return dict(success=scores[0], format=scores[1])


def show_samples(graphdef, params, key, num: int = 8) -> list[str]:
    """``num`` questions and sampled answers as text (host side)."""
    d = data()
    rows = np.linspace(0, len(QUESTIONS) - 1, num).astype(np.int32)
    obs, out = jax.jit(functools.partial(sample, _merge(graphdef)))(
        params, key, jnp.asarray(rows))
    answers = text.decode_completions(d.tok, out.tokens, out.mask)
    return [f"{QUESTIONS[r]} -> {a!r} (right: {completion_text(answer(QUESTIONS[r]))})"
            for r, a in zip(rows, answers)]


def _build(algo, s, config_of):
    """The model's graph, the policy and ``init``: the cached pre-trained
    parameters (the reference) and the algorithm state."""
    graphdef, _, _ = model_fns(s)
    params, nll = pretrained(s)
    policy = _policy(graphdef)
    module = grpo if algo == "grpo" else dpo

    def init(key, hp):
        k_state, k_run = jax.random.split(key)
        state = module.init(params, config_of(hp, policy), key=k_state,
                            ref_params=params)
        return dict(train=with_learning_rate(state, hp["lr"]), key=k_run,
                    pretrain_nll=jnp.asarray(nll[-1], jnp.float32))

    return graphdef, params, policy, init


# -- GRPO ---------------------------------------------------------------------

def lora_model(s, rank: int):
    """The pre-trained model with LoRA adapters of ``rank`` on every linear
    layer: ``(merge, adapters)``, where ``merge(adapters)`` is the module
    over the frozen base and ``merge(zeros_like(adapters))`` is the base
    itself (the reference, no second copy)."""
    graphdef, _, _ = model_fns(s)
    model = nnx.merge(graphdef, pretrained(s)[0])
    add_lora(model, rank=rank, rngs=nnx.Rngs(1))
    lora_def, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
    adapters, base = nnx.as_pure(adapters), nnx.as_pure(base)
    return _merge(lora_def, base), adapters


def grpo_program(settings: dict | None = None) -> Program:
    """GRPO on the exact-answer reward read from the text (module
    docstring), with the knobs of :data:`GRPO_KNOBS`.

    Metrics per iteration include ``rewards/exact/*`` and
    ``rewards/format/*`` over every generated answer (the reward trained on
    is ``exact``) and, with ``keep_groups``, ``dynamic_sampling/fill_rate``.
    """
    s = resolve_settings("arith/grpo", SETTINGS["grpo"], RANGES["grpo"],
                         settings)
    check_settings("grpo", s)
    g = s["num_generations"]
    optimizer = adam(flat=True)
    graphdef, _, _ = model_fns(s)
    params0, nll = pretrained(s)
    merge = _merge(graphdef)
    trained0, ref = params0, params0
    if s["lora_rank"]:
        merge, trained0 = lora_model(s, s["lora_rank"])
        ref = jax.tree_util.tree_map(jnp.zeros_like, trained0)

    def config(hp):
        return grpo.GRPOConfig(
            num_generations=g, clip_param=hp["clip_param"], beta=hp["beta"],
            entropy_coeff=hp["entropy_coeff"], num_epochs=s["num_epochs"],
            num_minibatches=s["num_minibatches"], policy=_policy(merge),
            optimizer=optimizer)

    def init(key, hp):
        k_state, k_run = jax.random.split(key)
        state = grpo.init(trained0, config(hp), key=k_state, ref_params=ref)
        return dict(train=with_learning_rate(state, hp["lr"]), key=k_run,
                    pretrain_nll=jnp.asarray(nll[-1], jnp.float32))

    keep = s["keep_groups"]

    def step(carry, hp):
        del hp
        train = carry["train"]
        key, k_rows, k_sample = jax.random.split(carry["key"], 3)
        rows = jnp.repeat(jax.random.randint(
            k_rows, (s["num_groups"],), 0, len(QUESTIONS)), g)
        obs, out = sample(merge, train.params, k_sample, rows)
        scores = text_scores(out.tokens, obs["prompt"])
        exact = scores[:, 0]
        info = grpo.reward_metrics(dict(exact=exact, format=scores[:, 1]),
                                   group_size=g)
        batch = dict(observations=obs, actions=out.tokens,
                     log_probs=out.log_probs, mask=out.mask, rewards=exact)
        if keep:
            batch, sel = grpo.select_batch(batch, num_groups=keep,
                                           group_size=g)
            info["dynamic_sampling/fill_rate"] = sel.fill_rate
        train, metrics = grpo.update(train, batch)
        return dict(carry, train=train, key=key), dict(metrics, **info)

    def evaluate(carry, key, hp):
        del hp
        return sample_metrics(merge, carry["train"].params, key,
                              s["eval_repeats"])

    return Program(
        init=init, step=step, evaluate=evaluate,
        num_iterations=s["iterations"],
        samples_per_iteration=s["num_groups"] * g,
        curve="rewards/exact/mean", score="success",
        description="GRPO on arithmetic in words, reward read from the text",
        postfix=("rewards/format/mean",) + (
            ("dynamic_sampling/fill_rate",) if keep else ()),
        show=lambda params, key: show_samples(
            merge, trained0 if params is None else params, key))


# -- DPO ----------------------------------------------------------------------

def split_questions(split_seed: int):
    """``(train, held_out)`` question rows: 80% / 20%."""
    order = np.random.default_rng(split_seed).permutation(len(QUESTIONS))
    n = (4 * len(QUESTIONS)) // 5
    return np.sort(order[:n]), np.sort(order[n:])


def preference_pairs(d: Data, questions, key, n: int):
    """``(question rows, chosen answer rows, rejected answer rows)`` of ``n``
    pairs: the right answer against a uniformly drawn wrong one."""
    k_q, k_w = jax.random.split(key)
    q = jnp.asarray(questions)[jax.random.randint(
        k_q, (n,), 0, len(questions))]
    right = jnp.asarray(d.correct)[q]
    wrong = (right + jax.random.randint(k_w, (n,), 1, len(VALUES))) % len(
        VALUES)
    return q, right, wrong


def side(d: Data, q, a):
    """One side of DPO pairs: answers ``a`` of questions ``q``."""
    completion = jnp.asarray(d.answers)[a]
    return dict(observations=dict(
        prompt=jnp.asarray(d.prompts)[q],
        prompt_mask=jnp.asarray(d.prompt_mask)[q], completion=completion),
        actions=completion, mask=jnp.asarray(d.answer_mask)[a])


def dpo_program(settings: dict | None = None) -> Program:
    """DPO on right-versus-wrong answer pairs (module docstring).

    ``init`` scores every question-answer text under ``pi_ref`` once
    (``[200, 28]`` sequence log-probs in the carry): the step runs no
    reference forward pass.
    """
    s = resolve_settings("arith/dpo", SETTINGS["dpo"], RANGES["dpo"],
                         settings)
    check_settings("dpo", s)
    n = s["batch_pairs"]
    d = data()
    optimizer = adam(flat=True)
    train_q, held_q = split_questions(s["split_seed"])
    held = preference_pairs(d, held_q, jax.random.key(s["split_seed"] + 1),
                            s["eval_pairs"])

    def config(hp, policy):
        return dpo.DPOConfig(beta=hp["beta"], policy=policy,
                             optimizer=optimizer)

    graphdef, params0, policy, pre_init = _build("dpo", s, config)

    def score(params, q, a):
        pair = side(d, q, a)
        return jnp.sum(policy(params, pair["observations"]).log_prob(
            pair["actions"]) * pair["mask"], axis=-1)

    every_q = jnp.repeat(jnp.arange(len(QUESTIONS)), len(VALUES))
    every_a = jnp.tile(jnp.arange(len(VALUES)), len(QUESTIONS))

    def init(key, hp):
        carry = pre_init(key, hp)
        # The barrier keeps XLA from constant-folding the 5600 texts.
        table = score(carry["train"].ref_params,
                      *jax.lax.optimization_barrier((every_q, every_a)))
        return dict(carry, ref_log_probs=table.reshape(len(QUESTIONS),
                                                       len(VALUES)))

    def step(carry, hp):
        del hp
        key, k_pairs = jax.random.split(carry["key"])
        q, right, wrong = preference_pairs(d, train_q, k_pairs, n)
        table = carry["ref_log_probs"]
        train, metrics = dpo.update(carry["train"], dict(
            chosen=side(d, q, right), rejected=side(d, q, wrong),
            ref_chosen_log_probs=table[q, right],
            ref_rejected_log_probs=table[q, wrong]))
        return dict(carry, train=train, key=key), metrics

    def evaluate(carry, key, hp):
        train = carry["train"]
        q, right, wrong = held
        # Policy and reference scored by one batched pass (identical
        # arithmetic: before training every margin is exactly 0).
        both = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]),
                                      train.params, train.ref_params)
        lp = jax.vmap(score, in_axes=(0, None, None))(
            both, jnp.concatenate([q, q]), jnp.concatenate([right, wrong]))
        chosen, rejected = jnp.split(lp, 2, axis=1)
        _, metrics = dpo.loss(train.params, dict(
            chosen_log_probs=chosen[0], rejected_log_probs=rejected[0],
            ref_chosen_log_probs=chosen[1],
            ref_rejected_log_probs=rejected[1]), config(hp, policy))
        samples = sample_metrics(graphdef, train.params, key,
                                 s["eval_repeats"])
        return dict(reward_accuracy=metrics["reward_accuracy"],
                    reward_margin=metrics["reward_margin"], **samples)

    return Program(
        init=init, step=step, evaluate=evaluate,
        num_iterations=s["iterations"], samples_per_iteration=n,
        curve="reward_accuracy", score="reward_accuracy",
        description="DPO on arithmetic in words: right vs wrong answers",
        show=lambda params, key: show_samples(
            graphdef, params0 if params is None else params, key))


# -- online DPO, KTO, ORPO (artifex_fn.experiments.arith_preference) ---------
# Imported last: that module builds on this one.
from artifex_fn.experiments import arith_preference as _preference  # noqa: E402

SETTINGS.update(_preference.SETTINGS)
HPARAMS.update(_preference.HPARAMS)
online_dpo_program = _preference.online_dpo_program
kto_program = _preference.kto_program
orpo_program = _preference.orpo_program
