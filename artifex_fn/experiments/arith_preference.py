"""Online DPO, KTO and ORPO on the arith text task.

The task, tokenizer, pre-trained model (the reference) and evaluation are
those of :mod:`artifex_fn.experiments.arith`, which re-exports these
programs as ``artifex-fn train --task arith --algo online_dpo|kto|orpo``.

Online DPO (:mod:`artifex_fn.online_dpo`). Each iteration draws
``num_groups`` questions and samples ``num_generations`` answers of each
from the current policy; the exact-answer reward read from the decoded
text ranks them, and one DPO step is taken on the best against the worst
answer of every group that holds both a right and a wrong one (the
others are ties). ``score``: ``success``.

KTO (:mod:`artifex_fn.kto`). The DPO task's preference pairs, split into
unpaired examples: each batch holds ``batch_examples`` answers, half of
them right answers to random training questions (desirable), half wrong
answers to other random training questions (undesirable), so no example
has a partner. KTO's reference point ``z_ref`` is estimated on mismatched
rows: each answer after the question of the next example (Ethayarajh et
al. 2024, section 4.1). ``score``: ``reward_accuracy`` of the implicit
reward ``beta * log(pi / pi_ref)`` on held-out pairs.

ORPO (:mod:`artifex_fn.orpo`). The DPO task's pairs, with no reference
model: the negative log-likelihood of the right answer plus ``lambda_``
times the odds-ratio term. ``score``: ``reward_accuracy`` on held-out pairs
of ORPO's reward, the mean per-token log-probability.

Every program reports ``success`` and ``format`` of sampled answers too,
and its reference log-probs come from one table of the pre-trained
model's scores of all 200 x 28 question-answer texts, computed in
``init``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from artifex_fn import kto
from artifex_fn import online_dpo
from artifex_fn import orpo
from artifex_fn.experiments import arith
from artifex_fn.experiments._program import Program
from artifex_fn.experiments._program import adam
from artifex_fn.experiments._program import resolve_settings
from artifex_fn.experiments._program import with_learning_rate

_PAIRS = dict(arith.MODEL_SETTINGS, iterations=300, eval_pairs=256,
              split_seed=0)
SETTINGS = dict(
    online_dpo=dict(arith.MODEL_SETTINGS, iterations=600, num_groups=32,
                    num_generations=8),
    kto=dict(_PAIRS, batch_examples=128),
    orpo=dict(_PAIRS, batch_pairs=64))
HPARAMS = dict(online_dpo=dict(lr=1e-3, beta=0.1, rpo_alpha=0.0),
               kto=dict(lr=1e-3, beta=0.5, desirable_weight=1.0,
                        undesirable_weight=1.0),
               orpo=dict(lr=1e-3, lambda_=0.1))


def online_dpo_program(settings: dict | None = None) -> Program:
    """Online DPO on the exact-answer reward read from the text (module
    docstring). Metrics per iteration add ``rewards/exact/*`` and
    ``rewards/format/*`` over every sampled answer and
    ``decisive_pairs``."""
    s = resolve_settings("arith/online_dpo", SETTINGS["online_dpo"],
                         arith.RANGES["online_dpo"], settings)
    arith.check_settings("online_dpo", s)
    g = s["num_generations"]
    optimizer = adam(flat=True)
    graphdef, _, _ = arith.model_fns(s)
    params0, nll = arith.pretrained(s)
    merge = arith._merge(graphdef)

    def config(hp):
        return online_dpo.OnlineDPOConfig(
            num_generations=g, beta=hp["beta"], rpo_alpha=hp["rpo_alpha"],
            max_grad_norm=1.0, policy=arith._policy(graphdef),
            optimizer=optimizer)

    def init(key, hp):
        k_state, k_run = jax.random.split(key)
        state = online_dpo.init(params0, config(hp), key=k_state,
                                ref_params=params0)
        return dict(train=with_learning_rate(state, hp["lr"]), key=k_run,
                    pretrain_nll=jnp.asarray(nll[-1], jnp.float32))

    def step(carry, hp):
        del hp
        train = carry["train"]
        key, k_rows, k_sample = jax.random.split(carry["key"], 3)
        rows = jnp.repeat(jax.random.randint(
            k_rows, (s["num_groups"],), 0, len(arith.QUESTIONS)), g)
        obs, out = arith.sample(merge, train.params, k_sample, rows)
        scores = arith.text_scores(out.tokens, obs["prompt"])
        info = arith.grpo.reward_metrics(
            dict(exact=scores[:, 0], format=scores[:, 1]), group_size=g)
        train, metrics = online_dpo.update(train, dict(
            observations=obs, actions=out.tokens, mask=out.mask,
            rewards=scores[:, 0]))
        return dict(carry, train=train, key=key), dict(metrics, **info)

    def evaluate(carry, key, hp):
        del hp
        return arith.sample_metrics(merge, carry["train"].params, key,
                                    s["eval_repeats"])

    return Program(
        init=init, step=step, evaluate=evaluate,
        num_iterations=s["iterations"],
        samples_per_iteration=s["num_groups"] * g,
        curve="rewards/exact/mean", score="success",
        description="online DPO on arithmetic in words, answers ranked by "
                    "the reward read from the text",
        postfix=("decisive_pairs",),
        show=lambda params, key: arith.show_samples(
            merge, params0 if params is None else params, key))


# -- KTO and ORPO: pairs and unpaired examples of the DPO task ----------------

def _scorer(policy, d):
    """``(params, questions, answers) -> ([n] log-prob sums, [n] lengths)``
    of the answer texts."""
    def score(params, q, a):
        side = arith.side(d, q, a)
        lp = jnp.sum(policy(params, side["observations"]).log_prob(
            side["actions"]) * side["mask"], axis=-1)
        return lp, jnp.sum(side["mask"], axis=-1)
    return score


def _reference_table(score, params):
    """The reference's log-prob sums of all 200 x 28 question-answer texts."""
    every_q = jnp.repeat(jnp.arange(len(arith.QUESTIONS)),
                         len(arith.VALUES))
    every_a = jnp.tile(jnp.arange(len(arith.VALUES)), len(arith.QUESTIONS))
    # The barrier keeps XLA from constant-folding the 5600 texts.
    lp, _ = score(params, *jax.lax.optimization_barrier((every_q, every_a)))
    return lp.reshape(len(arith.QUESTIONS), len(arith.VALUES))


def _pair_program(algo, s, config, step_batch, update, held_accuracy,
                  description, curve):
    """The shared frame of the KTO and ORPO programs: the pre-trained
    model, the reference table, held-out pairs, evaluation."""
    d = arith.data()
    optimizer = adam(flat=True)
    graphdef, _, _ = arith.model_fns(s)
    params0, nll = arith.pretrained(s)
    policy = arith._policy(graphdef)
    score = _scorer(policy, d)
    train_q, held_q = arith.split_questions(s["split_seed"])
    held = arith.preference_pairs(d, held_q,
                                  jax.random.key(s["split_seed"] + 1),
                                  s["eval_pairs"])

    def init(key, hp):
        k_state, k_run = jax.random.split(key)
        module = kto if algo == "kto" else orpo
        state = module.init(params0, config(hp, policy, optimizer),
                            key=k_state)
        return dict(train=with_learning_rate(state, hp["lr"]), key=k_run,
                    ref_log_probs=_reference_table(score, params0),
                    pretrain_nll=jnp.asarray(nll[-1], jnp.float32))

    def step(carry, hp):
        del hp
        key, k_batch = jax.random.split(carry["key"])
        batch = step_batch(d, train_q, k_batch, carry["ref_log_probs"])
        train, metrics = update(carry["train"], batch)
        return dict(carry, train=train, key=key), metrics

    def evaluate(carry, key, hp):
        q, right, wrong = held
        params = carry["train"].params
        # Policy and reference scored by one batched pass (identical
        # arithmetic: before training every KTO margin is exactly 0).
        both = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]),
                                      params, params0)
        lp, n = jax.vmap(score, in_axes=(0, None, None))(
            both, jnp.concatenate([q, q]), jnp.concatenate([right, wrong]))
        (lc, lr), (nc, nr) = jnp.split(lp[0], 2), jnp.split(n[0], 2)
        rc, rr = jnp.split(lp[1], 2)
        accuracy, margin = held_accuracy(hp, lc, nc, lr, nr, rc, rr)
        samples = arith.sample_metrics(graphdef, params, key,
                                       s["eval_repeats"])
        return dict(reward_accuracy=accuracy, reward_margin=margin,
                    **samples)

    return Program(
        init=init, step=step, evaluate=evaluate,
        num_iterations=s["iterations"],
        samples_per_iteration=s.get("batch_examples",
                                    s.get("batch_pairs", 0)),
        curve=curve, score="reward_accuracy", description=description,
        show=lambda params, key: arith.show_samples(
            graphdef, params0 if params is None else params, key))


def kto_program(settings: dict | None = None) -> Program:
    """KTO on unpaired right (desirable) and wrong (undesirable) answers
    (module docstring); ``z_ref`` on mismatched question-answer rows."""
    s = resolve_settings("arith/kto", SETTINGS["kto"], arith.RANGES["kto"],
                         settings)
    arith.check_settings("kto", s)
    n = s["batch_examples"]

    def config(hp, policy, optimizer):
        return kto.KTOConfig(beta=hp["beta"],
                             desirable_weight=hp["desirable_weight"],
                             undesirable_weight=hp["undesirable_weight"],
                             policy=policy, optimizer=optimizer)

    def step_batch(d, train_q, key, table):
        k_good, k_bad = jax.random.split(key)
        # Two independent draws of questions: no example has a partner.
        q1, right, _ = arith.preference_pairs(d, train_q, k_good, n // 2)
        q2, _, wrong = arith.preference_pairs(d, train_q, k_bad, n - n // 2)
        q = jnp.concatenate([q1, q2])
        a = jnp.concatenate([right, wrong])
        desirable = jnp.arange(n) < n // 2
        # Mismatched rows for z_ref: each answer after the next question.
        q_kl = jnp.roll(q, -1)
        return dict(arith.side(d, q, a), desirable=desirable,
                    ref_log_probs=table[q, a],
                    kl=arith.side(d, q_kl, a),
                    kl_ref_log_probs=table[q_kl, a])

    def held_accuracy(hp, lc, nc, lr, nr, rc, rr):
        del nc, nr
        margin = hp["beta"] * ((lc - rc) - (lr - rr))
        return jnp.mean((margin > 0).astype(jnp.float32)), jnp.mean(margin)

    return _pair_program(
        "kto", s, config, step_batch, kto.update, held_accuracy,
        "KTO on arithmetic in words: unpaired right and wrong answers",
        curve="loss")


def orpo_program(settings: dict | None = None) -> Program:
    """ORPO on right-versus-wrong pairs, no reference model (module
    docstring)."""
    s = resolve_settings("arith/orpo", SETTINGS["orpo"],
                         arith.RANGES["orpo"], settings)
    arith.check_settings("orpo", s)
    n = s["batch_pairs"]

    def config(hp, policy, optimizer):
        return orpo.ORPOConfig(lambda_=hp["lambda_"], policy=policy,
                               optimizer=optimizer)

    def step_batch(d, train_q, key, table):
        del table
        q, right, wrong = arith.preference_pairs(d, train_q, key, n)
        return dict(chosen=arith.side(d, q, right),
                    rejected=arith.side(d, q, wrong))

    def held_accuracy(hp, lc, nc, lr, nr, rc, rr):
        del rc, rr
        # ORPO's reward: lambda times the mean per-token log-prob.
        margin = hp["lambda_"] * (lc / jnp.maximum(nc, 1.0)
                                  - lr / jnp.maximum(nr, 1.0))
        return jnp.mean((margin > 0).astype(jnp.float32)), jnp.mean(margin)

    return _pair_program(
        "orpo", s, config, step_batch, orpo.update, held_accuracy,
        "ORPO on arithmetic in words: right vs wrong answers, no reference",
        curve="reward_accuracy")
