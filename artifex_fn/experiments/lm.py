"""GRPO and DPO fine-tuning of a tiny causal language model, each run one
compiled program.

Data and model. Strings ``BOS d1 .. dK EOS`` of ``K = 4`` uniform digits
(vocabulary ``V = 12``: 0 pad, 1 BOS/EOS, digit ``d`` is token ``d + 2``)
pre-train a :class:`~artifex_fn.families.autoregressive.TinyCausalLM`
(``num_layers = 2`` causal self-attention blocks, width 32) by teacher
forcing: a ``lax.scan`` of :func:`artifex_fn.families.autoregressive.update`
inside ``init`` (300 Adam steps on batches ``[128, K + 2]``). The pre-trained
model samples near-uniform digit strings (per-token NLL close to the data's
``K log 10 / (K + 1)``), so a completion of the prompt ``BOS`` has the target
digit sum ``TARGET = 26`` only rarely (282 of the ``10**K`` strings, 2.8%).
The frozen pre-trained parameters are the reference ``pi_ref`` of both
algorithms (``ref_params``).

GRPO (Shao et al. 2024). Each iteration samples ``G = num_generations``
completions ``y_1 .. y_G`` (tokens ``[B, K]``, ``B = num_groups * G``, groups
contiguous) of the prompt ``BOS`` per group with
:func:`artifex_fn.sampling.generate`, scores the verifiable reward ``r_i =
1[y_i is K digits summing to TARGET]`` and takes one
:func:`artifex_fn.grpo.update` step. Every token of ``y_i`` shares the
group-relative advantage

.. math::
    A_i = (r_i - \\mathrm{mean}_g\\, r) / (\\mathrm{std}_g\\, r + \\epsilon),

in the clipped surrogate, plus ``beta`` times the k3 estimate of
``KL(pi || pi_ref)`` per token (Shao et al. 2024, eq. 4). ``score``:
``success``, the exact-match rate of ``eval_samples`` fresh samples.

DPO (Rafailov et al. 2023). The ``10**K`` strings are split once, at
program-build time (``split_seed``), into training strings (2/3 of the good,
target-sum ones, 1/2 of the bad ones) and held-out strings
(:func:`preference_data`). A training batch holds ``batch_pairs`` pairs
``(y_w, y_l)`` drawn in the step with ``jax.random``
(:func:`training_pairs`): half of them a good string and a bad one-digit
edit of it (which teaches the exact sum), half a random good and a random
bad string. One :func:`artifex_fn.dpo.update` step minimises

.. math::
    -\\log \\sigma\\big(\\beta [\\log \\tfrac{\\pi(y_w)}{\\pi_{ref}(y_w)}
      - \\log \\tfrac{\\pi(y_l)}{\\pi_{ref}(y_l)}]\\big)

averaged over the pairs. ``score``: ``reward_accuracy``, how often the
implicit reward ``beta log(pi / pi_ref)`` ranks ``y_w`` first on
``eval_pairs`` fixed held-out pairs (0 before training, where every margin
is 0); ``curve``: the same accuracy on the training batch.

:data:`HPARAMS` are traced (sweepable with ``vmap``); :data:`SETTINGS`
change shapes or loop lengths and are static (``iterations`` is the number
of RL updates). :data:`TEST_SETTINGS` are tiny overrides for smoke tests.
The data, reward, pre-training and preference pairs are public:
``examples/lm_grpo_dpo.py`` fine-tunes the same model with the NNX
trainers.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from artifex_fn import dpo
from artifex_fn import grpo
from artifex_fn.experiments._program import Program
from artifex_fn.experiments._program import adam
from artifex_fn.experiments._program import gaussian_init
from artifex_fn.experiments._program import resolve_settings
from artifex_fn.experiments._program import with_learning_rate
from artifex_fn.experiments.tasks import Range
from artifex_fn.families import autoregressive as ar
from artifex_fn.families.autoregressive import TinyCausalLM
from artifex_fn.sampling import generate
from artifex_fn.sampling import token_policy
from artifex_fn.toy_data import digit_strings
from artifex_fn.toy_data import digit_sum

PAD, BOS, EOS = 0, 1, 1
VOCAB = 12
K = 4          # completion length
TARGET = 26    # required digit sum: 282 of the 10**4 strings
NUM_HEADS = 2
PRETRAIN_LR = 3e-3

MODEL_SETTINGS = dict(pretrain_steps=300, pretrain_batch=128, d_model=32,
                      num_layers=2, eval_samples=512)
SETTINGS = dict(
    grpo=dict(MODEL_SETTINGS, iterations=150, num_groups=16,
              num_generations=8),
    dpo=dict(MODEL_SETTINGS, iterations=300, batch_pairs=128,
             eval_pairs=512, split_seed=0))
HPARAMS = dict(grpo=dict(lr=3e-3, beta=0.01, clip_param=0.2,
                         entropy_coeff=0.0),
               dpo=dict(lr=3e-3, beta=0.1))

# The valid values of each setting and hyper-parameter, checked before
# anything is traced. A GRPO group needs two completions: the advantage of
# a group of one is always 0. ``d_model`` must also be even (two attention
# heads; :func:`check_settings`).
_COUNT = Range.count()
_MODEL_RANGES = dict(pretrain_steps=_COUNT, pretrain_batch=_COUNT,
                     d_model=_COUNT, num_layers=_COUNT, eval_samples=_COUNT,
                     iterations=_COUNT, lr=Range.positive())
RANGES = dict(
    grpo=dict(_MODEL_RANGES, num_groups=_COUNT,
              num_generations=Range.count(2), beta=Range.non_negative(),
              clip_param=Range.non_negative(),
              entropy_coeff=Range.non_negative()),
    dpo=dict(_MODEL_RANGES, batch_pairs=_COUNT, eval_pairs=_COUNT,
             split_seed=Range.count(0), beta=Range.positive()))

# A few steps of a one-block model: compiles and runs quickly, learns nothing.
_TEST_COMMON = dict(iterations=2, pretrain_steps=2, pretrain_batch=8,
                    num_layers=1, eval_samples=16)
TEST_SETTINGS = dict(
    grpo=dict(_TEST_COMMON, num_groups=2, num_generations=4),
    dpo=dict(_TEST_COMMON, batch_pairs=8, eval_pairs=16))


def check_settings(algo: str, settings: dict) -> None:
    """Constraints between settings that their ranges cannot express."""
    del algo
    if settings["d_model"] % NUM_HEADS:
        raise ValueError(f"d_model must be a multiple of the {NUM_HEADS} "
                         f"attention heads, got {settings['d_model']}")


# -- model, data, pre-training, reward, sampling -----------------------------

def model_fns(s):
    """``(graphdef, init_params(key), apply(params, tokens [B, L]))`` of the
    :class:`TinyCausalLM` of settings ``s``; ``apply`` gives next-token
    logits ``[B, L, V]`` (see
    :func:`~artifex_fn.experiments._program.gaussian_init`)."""
    graphdef, init_params = gaussian_init(TinyCausalLM(
        VOCAB, max_len=K + 2, d_model=s["d_model"], num_heads=NUM_HEADS,
        num_layers=s["num_layers"], rngs=nnx.Rngs(0)))

    def apply(params, tokens):
        return nnx.merge(graphdef, params)(tokens)

    return graphdef, init_params, apply


def prompts(n: int):
    """The prompt ``[n, 1]``: ``BOS``."""
    return jnp.full((n, 1), BOS, jnp.int32)


def pretrain_tokens(key, n: int):
    """``n`` pre-training strings ``BOS d1 .. dK EOS`` ``[n, K + 2]``."""
    return jnp.concatenate([prompts(n), digit_strings(key, n, K),
                            jnp.full((n, 1), EOS, jnp.int32)], axis=1)


def pretrain_fn(apply, s):
    """``(params, key) -> (params, nll [pretrain_steps])``: teacher forcing on
    batches of :func:`pretrain_tokens`, ``pretrain_steps`` Adam steps."""
    config = ar.AutoregressiveConfig(pad_token_id=PAD, apply=apply,
                                     optimizer=adam(flat=True))

    def pretrain(params, key):
        k_state, k_data = jax.random.split(key)
        state = with_learning_rate(ar.init(params, config, key=k_state),
                                   PRETRAIN_LR)

        def body(state, k):
            # The scan carries arrays only; the config keeps Python numbers
            # (a traced ``scheduled_sampling`` would select the two-pass path).
            state, metrics = ar.update(state.replace(config=config), dict(
                tokens=pretrain_tokens(k, s["pretrain_batch"])))
            return state.replace(config=None), metrics["nll"]

        state, nll = jax.lax.scan(
            body, state.replace(config=None),
            jax.random.split(k_data, s["pretrain_steps"]))
        return state.params, nll

    return pretrain


def pretrained_model(key, **settings):
    """A pre-trained :class:`TinyCausalLM` (an NNX module) and its NLL
    curve ``[pretrain_steps]``; ``settings`` override
    :data:`MODEL_SETTINGS`."""
    s = dict(MODEL_SETTINGS, **settings)
    graphdef, init_params, apply = model_fns(s)
    k_init, k_pre = jax.random.split(key)
    params, nll = jax.jit(pretrain_fn(apply, s))(init_params(k_init), k_pre)
    return nnx.merge(graphdef, params), nll


def success(completions):
    """Tokens ``[n, K]`` -> ``[n]``: 1.0 where all are digits summing to
    ``TARGET``."""
    digits = (completions >= 2) & (completions <= 11)
    return (jnp.all(digits, axis=-1)
            & (digit_sum(completions) == TARGET)).astype(jnp.float32)


def sample(apply, params, key, n: int):
    """``n`` completions ``[n, K]`` of ``BOS`` at temperature 1."""
    return generate(functools.partial(apply, params), prompts(n), key,
                    max_new_tokens=K)[0]


def sample_metrics(apply, params, key, n: int):
    """``success`` (exact-match rate) of ``n`` fresh samples and the number
    of distinct strings among the successful ones."""
    comp = sample(apply, params, key, n)
    hits = success(comp)
    code = jnp.sum(comp * (VOCAB ** jnp.arange(K)), axis=-1)
    code = jnp.sort(jnp.where(hits > 0, code, -1))
    new = jnp.concatenate([code[:1] >= 0, (code[1:] != code[:-1])
                           & (code[1:] >= 0)])
    return dict(success=jnp.mean(hits),
                distinct_solutions=jnp.sum(new).astype(jnp.float32))


def _policy(apply):
    """``(params, {"prompt", "completion"}) -> Categorical [B, K]`` over the
    completion tokens."""
    def policy(params, observations):
        return token_policy(functools.partial(apply, params), observations)
    return policy


def _build(algo, s, config_of):
    """What both programs share: the model, its pre-training inside
    ``init`` and the algorithm state (``config_of(hp, policy)``)."""
    _, init_params, apply = model_fns(s)
    pretrain = pretrain_fn(apply, s)
    policy = _policy(apply)
    module = grpo if algo == "grpo" else dpo

    def init(key, hp):
        k_params, k_pre, k_state, k_run = jax.random.split(key, 4)
        params, nll = pretrain(init_params(k_params), k_pre)
        state = module.init(params, config_of(hp, policy), key=k_state,
                            ref_params=params)
        return dict(train=with_learning_rate(state, hp["lr"]), key=k_run,
                    pretrain_nll=nll[-1])

    return apply, policy, init


# -- GRPO -------------------------------------------------------------------

def grpo_program(settings: dict | None = None) -> Program:
    """GRPO on the digit-sum reward (see the module docstring)."""
    s = resolve_settings("lm/grpo", SETTINGS["grpo"], RANGES["grpo"],
                         settings)
    check_settings("grpo", s)
    g = s["num_generations"]
    batch = s["num_groups"] * g
    optimizer = adam(flat=True)
    apply, policy, init = _build("grpo", s, lambda hp, policy: (
        grpo.GRPOConfig(num_generations=g, clip_param=hp["clip_param"],
                        beta=hp["beta"], entropy_coeff=hp["entropy_coeff"],
                        policy=policy, optimizer=optimizer)))

    def step(carry, hp):
        del hp
        train = carry["train"]
        key, k_sample = jax.random.split(carry["key"])
        completions = sample(apply, train.params, k_sample, batch)
        observations = dict(prompt=prompts(batch), completion=completions)
        log_probs = policy(train.params, observations).log_prob(completions)
        train, metrics = grpo.update(train, dict(
            observations=observations, actions=completions,
            log_probs=jax.lax.stop_gradient(log_probs),
            rewards=success(completions)))
        return dict(carry, train=train, key=key), metrics

    def evaluate(carry, key, hp):
        del hp
        return sample_metrics(apply, carry["train"].params, key,
                              s["eval_samples"])

    return Program(init=init, step=step, evaluate=evaluate,
                   num_iterations=s["iterations"],
                   samples_per_iteration=batch, curve="mean_reward",
                   score="success",
                   description=f"GRPO on a tiny LM: {K} digits summing to "
                               f"{TARGET}")


# -- DPO --------------------------------------------------------------------

# Every string of K digits as tokens [10**K, K]; row i spells i in base 10.
ALL_STRINGS = (np.array(list(itertools.product(range(10), repeat=K)),
                        np.int32) + 2)


class Preferences(NamedTuple):
    """Rows of :data:`ALL_STRINGS` (int32 arrays), see
    :func:`preference_data`."""
    good: jax.Array            # training strings with the target sum
    bad: jax.Array             # training strings without it
    hard: jax.Array            # [n, 2]: (good, bad one-digit edit of it)
    held_chosen: jax.Array     # held-out pairs
    held_rejected: jax.Array


def preference_data(split_seed: int, eval_pairs: int) -> Preferences:
    """The strings split by target sum and into training and held-out ones.

    Two thirds of the good strings and half of the bad ones train; the
    ``eval_pairs`` held-out pairs join a held-out good and a held-out bad
    string, drawn with ``split_seed + 1``.
    """
    rng = np.random.default_rng(split_seed)
    is_good = ALL_STRINGS.sum(1) - 2 * K == TARGET
    good = rng.permutation(np.flatnonzero(is_good))
    bad = rng.permutation(np.flatnonzero(~is_good))
    n_good, n_bad = (2 * len(good)) // 3, len(bad) // 2
    good_train, bad_train = good[:n_good], bad[:n_bad]
    bad_set = set(bad_train.tolist())
    hard = []
    for i in good_train:
        digits = ALL_STRINGS[i] - 2
        for pos, d in itertools.product(range(K), range(10)):
            j = int(i + (d - digits[pos]) * 10 ** (K - 1 - pos))
            if j in bad_set:
                hard.append((i, j))
    rng = np.random.default_rng(split_seed + 1)
    good_test, bad_test = good[n_good:], bad[n_bad:]
    held = (good_test[rng.integers(0, len(good_test), eval_pairs)],
            bad_test[rng.integers(0, len(bad_test), eval_pairs)])
    return Preferences(*(jnp.asarray(x, jnp.int32) for x in (
        good_train, bad_train, hard) + held))


def training_pairs(prefs: Preferences, key, n: int):
    """``(chosen, rejected)`` rows of ``n`` training pairs: ``n // 2`` hard
    ones (a one-digit edit), the rest a random good and a random bad
    string."""
    k1, k2, k3 = jax.random.split(key, 3)
    n_hard = n // 2
    pick = prefs.hard[jax.random.randint(k3, (n_hard,), 0, len(prefs.hard))]
    chosen = jnp.concatenate([pick[:, 0], prefs.good[jax.random.randint(
        k1, (n - n_hard,), 0, len(prefs.good))]])
    rejected = jnp.concatenate([pick[:, 1], prefs.bad[jax.random.randint(
        k2, (n - n_hard,), 0, len(prefs.bad))]])
    return chosen, rejected


def side(rows):
    """One side of DPO pairs: the strings ``rows`` as completions of
    ``BOS``."""
    completion = jnp.asarray(ALL_STRINGS)[rows]
    n = completion.shape[0]
    return dict(observations=dict(prompt=prompts(n), completion=completion),
                actions=completion, mask=jnp.ones((n, K), jnp.float32))


def dpo_program(settings: dict | None = None) -> Program:
    """DPO on digit-sum preference pairs (see the module docstring).

    The reference is frozen and the strings are few, so ``init`` scores all
    ``10**K`` of them once under ``pi_ref`` (sequence log-probs ``[10**K]``
    in the carry) and every batch carries ``ref_chosen_log_probs`` /
    ``ref_rejected_log_probs`` [``batch_pairs``] looked up in that table: the
    step runs no reference forward pass.
    """
    s = resolve_settings("lm/dpo", SETTINGS["dpo"], RANGES["dpo"], settings)
    check_settings("dpo", s)
    n = s["batch_pairs"]
    optimizer = adam(flat=True)
    prefs = preference_data(s["split_seed"], s["eval_pairs"])
    held_out = jnp.concatenate([prefs.held_chosen, prefs.held_rejected])

    def config(hp, policy):
        return dpo.DPOConfig(beta=hp["beta"], policy=policy,
                             optimizer=optimizer)

    apply, policy, pretrained = _build("dpo", s, config)

    def score(params, rows):
        """Sequence log-probs ``[n]`` of the rows ``rows`` of
        :data:`ALL_STRINGS`."""
        pair = side(rows)
        return jnp.sum(policy(params, pair["observations"]).log_prob(
            pair["actions"]), axis=-1)

    def init(key, hp):
        carry = pretrained(key, hp)
        return dict(carry, ref_log_probs=score(
            carry["train"].ref_params, jnp.arange(len(ALL_STRINGS))))

    def step(carry, hp):
        del hp
        key, k_pairs = jax.random.split(carry["key"])
        chosen, rejected = training_pairs(prefs, k_pairs, n)
        table = carry["ref_log_probs"]
        train, metrics = dpo.update(carry["train"], dict(
            chosen=side(chosen), rejected=side(rejected),
            ref_chosen_log_probs=table[chosen],
            ref_rejected_log_probs=table[rejected]))
        return dict(carry, train=train, key=key), metrics

    def evaluate(carry, key, hp):
        train = carry["train"]
        # Policy and reference scored by one batched pass (identical
        # arithmetic: before training every margin is exactly 0).
        both = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]),
                                      train.params, train.ref_params)
        lp = jax.vmap(score, in_axes=(0, None))(both, held_out)
        chosen, rejected = jnp.split(lp, 2, axis=1)
        _, metrics = dpo.loss(train.params, dict(
            chosen_log_probs=chosen[0], rejected_log_probs=rejected[0],
            ref_chosen_log_probs=chosen[1],
            ref_rejected_log_probs=rejected[1]), config(hp, policy))
        samples = sample_metrics(apply, train.params, key, s["eval_samples"])
        return dict(reward_accuracy=metrics["reward_accuracy"],
                    reward_margin=metrics["reward_margin"],
                    success=samples["success"])

    return Program(init=init, step=step, evaluate=evaluate,
                   num_iterations=s["iterations"], samples_per_iteration=n,
                   curve="reward_accuracy", score="reward_accuracy",
                   description=f"DPO on a tiny LM: pairs ranked by digit sum "
                               f"{TARGET}")
