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
contiguous) of the prompt ``BOS`` per group, with their behaviour log-probs
``[B, K]``, scores the verifiable reward ``r_i = 1[y_i is K digits summing to
TARGET]`` and takes one :func:`artifex_fn.grpo.update` step. Every token of
``y_i`` shares the group-relative advantage

.. math::
    A_i = (r_i - \\mathrm{mean}_g\\, r) / (\\mathrm{std}_g\\, r + \\epsilon),

in the clipped surrogate, plus ``beta`` times the k3 estimate of
``KL(pi || pi_ref)`` per token (Shao et al. 2024, eq. 4). ``score``:
``success``, the exact-match rate of ``eval_samples`` fresh samples.

DPO (Rafailov et al. 2023). The ``10**K`` strings are split once, at
program-build time (``split_seed``), into training strings (2/3 of the good,
target-sum ones, 1/2 of the bad ones) and held-out strings. A training batch
holds ``batch_pairs`` pairs ``(y_w, y_l)`` drawn in the step with
``jax.random``: half of them a good string and a bad one-digit edit of it
(which teaches the exact sum), half a random good and a random bad string.
One :func:`artifex_fn.dpo.update` step minimises

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
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from artifex_fn import dpo
from artifex_fn import grpo
from artifex_fn._src.sampling import token_policy
from artifex_fn.experiments._program import Program
from artifex_fn.experiments.tasks import Range
from artifex_fn.families import autoregressive as ar
from artifex_fn.families.autoregressive import TinyCausalLM
from artifex_fn.toy_data import digit_strings
from artifex_fn.toy_data import digit_sum

PAD, BOS, EOS = 0, 1, 1
VOCAB = 12
K = 4          # completion length
TARGET = 26    # required digit sum: 282 of the 10**4 strings
PRETRAIN_LR = 3e-3

_COMMON_SETTINGS = dict(pretrain_steps=300, pretrain_batch=128, d_model=32,
                        num_layers=2, eval_samples=512)
GRPO_SETTINGS = dict(_COMMON_SETTINGS, iterations=150, num_groups=16,
                     num_generations=8)
GRPO_HPARAMS = dict(lr=3e-3, beta=0.01, clip_param=0.2, entropy_coeff=0.0)

DPO_SETTINGS = dict(_COMMON_SETTINGS, iterations=300, batch_pairs=128,
                    eval_pairs=512, split_seed=0)
DPO_HPARAMS = dict(lr=3e-3, beta=0.1)

# The valid values of each setting and hyper-parameter, checked before
# anything is traced. A GRPO group needs two completions: the advantage of
# a group of one is always 0. ``d_model`` must also be even (two attention
# heads; :func:`check_settings`).
_COUNT = Range.count()
_COMMON_RANGES = dict(pretrain_steps=_COUNT, pretrain_batch=_COUNT,
                      d_model=_COUNT, num_layers=_COUNT, eval_samples=_COUNT,
                      iterations=_COUNT)
GRPO_RANGES = dict(_COMMON_RANGES, num_groups=_COUNT,
                   num_generations=Range.count(2), lr=Range.positive(),
                   beta=Range.non_negative(), clip_param=Range.non_negative(),
                   entropy_coeff=Range.non_negative())
DPO_RANGES = dict(_COMMON_RANGES, batch_pairs=_COUNT, eval_pairs=_COUNT,
                  split_seed=Range.count(0), lr=Range.positive(),
                  beta=Range.positive())
NUM_HEADS = 2

# A few steps of a one-block model: compiles and runs quickly, learns nothing.
_TEST_COMMON = dict(iterations=2, pretrain_steps=2, pretrain_batch=8,
                    num_layers=1, eval_samples=16)
TEST_SETTINGS = dict(
    grpo=dict(_TEST_COMMON, num_groups=2, num_generations=4),
    dpo=dict(_TEST_COMMON, batch_pairs=8, eval_pairs=16))


def _check_settings(algo, defaults, settings):
    """Defaults overridden by ``settings``; unknown keys and non-ints raise."""
    unknown = set(settings or {}) - set(defaults)
    if unknown:
        raise ValueError(f"unknown lm/{algo} settings {sorted(unknown)}; "
                         f"valid: {sorted(defaults)}.")
    s = dict(defaults, **(settings or {}))
    for name, value in s.items():
        if (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                or value < (0 if name == "split_seed" else 1)):
            raise ValueError(f"setting `{name}` must be a positive int, got "
                             f"{value!r}.")
    return s


# -- model, pre-training, sampling ------------------------------------------

def _model_fns(s):
    """Returns ``(init_params(key), apply(params, tokens [B, L]))``.

    ``apply`` gives next-token logits ``[B, L, V]``.

    ``init_params`` draws every tensor the module initialises randomly as an
    i.i.d. Gaussian with that tensor's default scale (lecun-normal kernels,
    ``1/sqrt(D)`` embeddings, measured once on a template module), and keeps
    the constant ones (zero biases, unit layer-norm scales). It is one
    ``jax.random.normal`` call: the module's own per-tensor (truncated-normal)
    initialisers compile several times more slowly.
    """
    def build(rngs):
        return TinyCausalLM(VOCAB, max_len=K + 2, d_model=s["d_model"],
                            num_heads=NUM_HEADS, num_layers=s["num_layers"],
                            rngs=rngs)

    graphdef, template = nnx.split(build(nnx.Rngs(0)))
    leaves, treedef = jax.tree_util.tree_flatten(template)
    leaves = [np.asarray(x) for x in leaves]
    constant = [bool(np.all(x == x.flat[0])) for x in leaves]
    total = sum(x.size for x, c in zip(leaves, constant) if not c)

    def init_params(key):
        z = jax.random.normal(key, (total,))
        out, i = [], 0
        for x, c in zip(leaves, constant):
            if c:
                out.append(jnp.asarray(x))
            else:
                out.append(float(np.std(x)) * z[i:i + x.size].reshape(x.shape))
                i += x.size
        return jax.tree_util.tree_unflatten(treedef, out)

    def apply(params, tokens):
        return nnx.merge(graphdef, params)(tokens)

    return init_params, apply


def _adam(learning_rate):
    # One flat parameter vector for the optimiser: a handful of ops instead
    # of a copy of Adam per tensor (compile time).
    return optax.flatten(optax.adam(learning_rate))


def _optimizer():
    # The learning rate lives in the optimiser state (inject_hyperparams), so
    # it can be traced and swept while the transformation is static.
    return optax.inject_hyperparams(_adam)(learning_rate=0.0)


def _set_lr(opt_state, lr):
    return opt_state._replace(
        hyperparams={**opt_state.hyperparams, "learning_rate": lr})


def _pretrain(apply, s):
    """``(params, key) -> (params, last nll)``: teacher forcing on uniform
    digit strings ``[pretrain_batch, K + 2]``, ``pretrain_steps`` Adam
    steps."""
    config = ar.AutoregressiveConfig(pad_token_id=PAD, apply=apply,
                                     optimizer=_adam(PRETRAIN_LR))
    n = s["pretrain_batch"]
    bos = jnp.full((n, 1), BOS, jnp.int32)
    eos = jnp.full((n, 1), EOS, jnp.int32)

    def pretrain(params, key):
        k_state, k_data = jax.random.split(key)
        state = ar.init(params, config, key=k_state)

        def body(state, k):
            # The scan carries arrays only; the config keeps Python numbers
            # (a traced ``scheduled_sampling`` would select the two-pass path).
            tokens = jnp.concatenate([bos, digit_strings(k, n, K), eos], 1)
            state, metrics = ar.update(state.replace(config=config),
                                       dict(tokens=tokens))
            return state.replace(config=None), metrics["nll"]

        state, nll = jax.lax.scan(
            body, state.replace(config=None),
            jax.random.split(k_data, s["pretrain_steps"]))
        return state.params, nll[-1]

    return pretrain


def success(completions):
    """Tokens ``[n, K]`` -> ``[n]``: 1.0 where all are digits summing to
    ``TARGET``."""
    digits = (completions >= 2) & (completions <= 11)
    return (jnp.all(digits, axis=-1)
            & (digit_sum(completions) == TARGET)).astype(jnp.float32)


def _distinct(completions, hits):
    """Number of distinct strings among the rows with ``hits > 0``."""
    code = jnp.sum(completions * (VOCAB ** jnp.arange(K)), axis=-1)
    code = jnp.sort(jnp.where(hits > 0, code, -1))
    new = jnp.concatenate([code[:1] >= 0, (code[1:] != code[:-1])
                           & (code[1:] >= 0)])
    return jnp.sum(new).astype(jnp.float32)


def _prompts(n):
    """The prompt ``[n, 1]``: ``BOS``."""
    return jnp.full((n, 1), BOS, jnp.int32)


def _sampler(apply):
    def sample(params, key, n):
        """``n`` completions ``[n, K]`` of ``BOS`` at temperature 1 and their
        per-token log-probs ``[n, K]``.

        The loop of :func:`artifex_fn.families.autoregressive.generate` (one
        ``fori_loop``, the fixed buffer ``[n, K]`` rerun at every position,
        no cache) that also keeps ``log pi(y_t | y_<t)`` of each drawn token,
        the behaviour log-probs GRPO needs, without a second forward pass.
        """
        buf = jnp.concatenate(
            [_prompts(n), jnp.full((n, K), PAD, jnp.int32)], axis=1)

        def body(i, carry):
            buf, logp = carry
            logits = ar.logits_of(apply, params, buf[:, :-1])
            step_logits = jax.lax.dynamic_index_in_dim(logits, i, axis=1,
                                                       keepdims=False)
            tok = ar.sample_next_token(jax.random.fold_in(key, i),
                                       step_logits)
            lp = jnp.take_along_axis(jax.nn.log_softmax(step_logits),
                                     tok[:, None], axis=-1)[:, 0]
            buf = jax.lax.dynamic_update_index_in_dim(
                buf, tok.astype(jnp.int32), i + 1, axis=1)
            logp = jax.lax.dynamic_update_index_in_dim(logp, lp, i, axis=1)
            return buf, logp

        buf, logp = jax.lax.fori_loop(0, K, body,
                                      (buf, jnp.zeros((n, K), jnp.float32)))
        return buf[:, 1:], logp
    return sample


def _sample_metrics(sample, params, key, n):
    comp, _ = sample(params, key, n)
    hits = success(comp)
    return dict(success=jnp.mean(hits),
                distinct_solutions=_distinct(comp, hits))


def _policy(apply):
    """``(params, {"prompt", "completion"}) -> Categorical [B, K]`` over the
    completion tokens."""
    def policy(params, observations):
        return token_policy(lambda tokens: apply(params, tokens), observations)
    return policy


# -- GRPO -------------------------------------------------------------------

def grpo_program(settings: dict | None = None) -> Program:
    """GRPO on the digit-sum reward (see the module docstring)."""
    s = _check_settings("grpo", GRPO_SETTINGS, settings)
    g = s["num_generations"]
    batch = s["num_groups"] * g
    init_params, apply = _model_fns(s)
    pretrain = _pretrain(apply, s)
    sample = _sampler(apply)
    policy = _policy(apply)
    optimizer = _optimizer()

    def config(hp):
        return grpo.GRPOConfig(
            num_generations=g, clip_param=hp["clip_param"], beta=hp["beta"],
            entropy_coeff=hp["entropy_coeff"], policy=policy,
            optimizer=optimizer)

    def init(key, hp):
        k_params, k_pre, k_state, k_run = jax.random.split(key, 4)
        params, nll = pretrain(init_params(k_params), k_pre)
        state = grpo.init(params, config(hp), key=k_state, ref_params=params)
        state = state.replace(opt_state=_set_lr(state.opt_state, hp["lr"]))
        return dict(train=state, key=k_run, pretrain_nll=nll)

    def step(carry, hp):
        train = carry["train"]
        key, k_sample = jax.random.split(carry["key"])
        completions, log_probs = sample(train.params, k_sample, batch)
        observations = dict(prompt=_prompts(batch), completion=completions)
        batch_ = dict(observations=observations, actions=completions,
                      log_probs=jax.lax.stop_gradient(log_probs),
                      mask=jnp.ones((batch, K), jnp.float32),
                      rewards=success(completions))
        train = train.replace(config=config(hp),
                              opt_state=_set_lr(train.opt_state, hp["lr"]))
        train, metrics = grpo.update(train, batch_)
        return dict(carry, train=train, key=key), metrics

    def evaluate(carry, key, hp):
        del hp
        return _sample_metrics(sample, carry["train"].params, key,
                               s["eval_samples"])

    return Program(init=init, step=step, evaluate=evaluate,
                   params=lambda c: c["train"].params,
                   num_iterations=s["iterations"],
                   samples_per_iteration=batch, curve="mean_reward",
                   score="success",
                   description=f"GRPO on a tiny LM: {K} digits summing to "
                               f"{TARGET}")


# -- DPO --------------------------------------------------------------------

# Every string of K digits as tokens [10**K, K]; row i spells i in base 10.
ALL_STRINGS = (np.array(list(itertools.product(range(10), repeat=K)),
                        np.int32) + 2)


def _preference_splits(seed: int):
    """Rows of :data:`ALL_STRINGS`, split by target sum and train/held-out.

    Two thirds of the good strings and half of the bad ones train. Returns
    ``(good, bad, hard), (good_test, bad_test)`` int32 index arrays; ``hard
    [n, 2]`` pairs a good training string with every bad training string
    one digit away.
    """
    rng = np.random.default_rng(seed)
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
    as32 = lambda x: np.asarray(x, np.int32)
    return ((as32(good_train), as32(bad_train), as32(hard)),
            (as32(good[n_good:]), as32(bad[n_bad:])))


def _side(completion):
    """One side of DPO pairs: completions ``[n, K]`` of the prompt ``BOS``."""
    n = completion.shape[0]
    return dict(observations=dict(prompt=_prompts(n), completion=completion),
                actions=completion, mask=jnp.ones((n, K), jnp.float32))


def dpo_program(settings: dict | None = None) -> Program:
    """DPO on digit-sum preference pairs (see the module docstring).

    The reference is frozen and the strings are few, so ``init`` scores all
    ``10**K`` of them once under ``pi_ref`` (sequence log-probs ``[10**K]``
    in the carry) and every batch carries ``ref_chosen_log_probs`` /
    ``ref_rejected_log_probs`` [``batch_pairs``] looked up in that table: the
    step runs no reference forward pass.
    """
    s = _check_settings("dpo", DPO_SETTINGS, settings)
    n = s["batch_pairs"]
    n_hard = n // 2
    init_params, apply = _model_fns(s)
    pretrain = _pretrain(apply, s)
    sample = _sampler(apply)
    policy = _policy(apply)
    optimizer = _optimizer()
    (good, bad, hard), (good_test, bad_test) = _preference_splits(
        s["split_seed"])
    rng = np.random.default_rng(s["split_seed"] + 1)
    m = s["eval_pairs"]
    held_chosen = good_test[rng.integers(0, len(good_test), m)]
    held_rejected = bad_test[rng.integers(0, len(bad_test), m)]
    held_out = jnp.asarray(np.concatenate([held_chosen, held_rejected]))
    strings = jnp.asarray(ALL_STRINGS)
    good, bad, hard = jnp.asarray(good), jnp.asarray(bad), jnp.asarray(hard)

    def config(hp):
        return dpo.DPOConfig(beta=hp["beta"], policy=policy,
                             optimizer=optimizer)

    def score(params, rows):
        """Sequence log-probs ``[n]`` of the rows ``rows`` of
        :data:`ALL_STRINGS` (``None``: all of them)."""
        side = _side(strings if rows is None else strings[rows])
        return jnp.sum(policy(params, side["observations"]).log_prob(
            side["actions"]), axis=-1)

    def pairs(key, ref_table):
        k1, k2, k3 = jax.random.split(key, 3)
        pick = hard[jax.random.randint(k3, (n_hard,), 0, len(hard))]
        chosen = jnp.concatenate([pick[:, 0], good[jax.random.randint(
            k1, (n - n_hard,), 0, len(good))]])
        rejected = jnp.concatenate([pick[:, 1], bad[jax.random.randint(
            k2, (n - n_hard,), 0, len(bad))]])
        return dict(chosen=_side(strings[chosen]),
                    rejected=_side(strings[rejected]),
                    ref_chosen_log_probs=ref_table[chosen],
                    ref_rejected_log_probs=ref_table[rejected])

    def init(key, hp):
        k_params, k_pre, k_state, k_run = jax.random.split(key, 4)
        params, nll = pretrain(init_params(k_params), k_pre)
        state = dpo.init(params, config(hp), key=k_state, ref_params=params)
        state = state.replace(opt_state=_set_lr(state.opt_state, hp["lr"]))
        return dict(train=state, key=k_run, pretrain_nll=nll,
                    ref_log_probs=score(params, None))

    def step(carry, hp):
        key, k_pairs = jax.random.split(carry["key"])
        train = carry["train"].replace(
            config=config(hp),
            opt_state=_set_lr(carry["train"].opt_state, hp["lr"]))
        train, metrics = dpo.update(train,
                                    pairs(k_pairs, carry["ref_log_probs"]))
        return dict(carry, train=train, key=key), metrics

    def evaluate(carry, key, hp):
        train = carry["train"]
        # Policy and reference scored by one batched pass (identical
        # arithmetic: before training every margin is exactly 0).
        both = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]),
                                      train.params, train.ref_params)
        lp = jax.vmap(score, in_axes=(0, None))(both, held_out)
        chosen, rejected = jnp.split(lp, 2, axis=1)
        flat = dict(chosen_log_probs=chosen[0], rejected_log_probs=rejected[0],
                    ref_chosen_log_probs=chosen[1],
                    ref_rejected_log_probs=rejected[1])
        params = train.params
        _, metrics = dpo.loss(params, flat, config(hp))
        samples = _sample_metrics(sample, params, key, s["eval_samples"])
        return dict(reward_accuracy=metrics["reward_accuracy"],
                    reward_margin=metrics["reward_margin"],
                    success=samples["success"])

    return Program(init=init, step=step, evaluate=evaluate,
                   params=lambda c: c["train"].params,
                   num_iterations=s["iterations"], samples_per_iteration=n,
                   curve="reward_accuracy", score="reward_accuracy",
                   description=f"DPO on a tiny LM: pairs ranked by digit sum "
                               f"{TARGET}")


def program(algo: str, settings: dict | None = None) -> Program:
    """The tiny-LM program for ``algo`` in ``{"grpo", "dpo"}``."""
    if algo == "grpo":
        return grpo_program(settings)
    if algo == "dpo":
        return dpo_program(settings)
    raise ValueError(f"lm supports --algo grpo or dpo, got {algo!r}.")


def check_settings(algo: str, settings: dict) -> None:
    """Constraints between settings that their ranges cannot express."""
    del algo
    if settings["d_model"] % NUM_HEADS:
        raise ValueError(f"d_model must be a multiple of the {NUM_HEADS} "
                         f"attention heads, got {settings['d_model']}")


HPARAMS: dict[str, dict[str, Any]] = dict(grpo=GRPO_HPARAMS, dpo=DPO_HPARAMS)
SETTINGS: dict[str, dict[str, Any]] = dict(grpo=GRPO_SETTINGS,
                                           dpo=DPO_SETTINGS)
RANGES: dict[str, dict[str, Range]] = dict(grpo=GRPO_RANGES, dpo=DPO_RANGES)
