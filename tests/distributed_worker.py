"""Runs each algorithm's update on several meshes; prints the differences.

Run by ``tests/test_distributed.py`` in a subprocess (the device count of
a JAX process is fixed at start-up):

* ``python distributed_worker.py devices`` with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8``: every case's
  update on 1, 2, 4 and 8 devices (and FSDP, and micro-batched) against the
  plain single-device ``jax.jit(update)``; prints one JSON line per case
  with the largest relative difference of parameters and metrics.
* ``python distributed_worker.py host RANK PORT OUT``: one of two
  processes of a ``jax.distributed`` run on localhost; rank 0 writes the
  result to ``OUT`` (JSON).
* ``python distributed_worker.py single OUT``: the same problem in one
  process, for comparison.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np

MODE = sys.argv[1] if len(sys.argv) > 1 else "devices"
if MODE == "host":
    import jax

    import artifex_fn as afn

    afn.distributed.initialize(f"localhost:{sys.argv[3]}", num_processes=2,
                               process_id=int(sys.argv[2]))
else:
    import jax

    import artifex_fn as afn

import distrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

SGD = optax.sgd(0.5)
D, V = 6, 5          # feature size, number of actions / vocabulary
B, L, G = 24, 5, 4   # rows, tokens, group size (groups of 4 straddle 8 devices)


def _rng(seed):
    return np.random.default_rng(seed)


def _mask(rng, n, length):
    lengths = rng.integers(0, length + 1, n)
    lengths[0] = 0            # one sequence without any valid token
    lengths[1] = length
    return (np.arange(length)[None] < lengths[:, None]).astype(np.float32)


def token_policy(params, obs):
    return distrax.Categorical(logits=obs @ params["w"] + params["b"])


def actor_critic(params, obs):
    return obs @ params["w"] + params["b"], obs @ params["v"]


def _params(seed=0):
    rng = _rng(seed)
    return {"w": jnp.asarray(0.5 * rng.standard_normal((D, V)), jnp.float32),
            "b": jnp.asarray(0.5 * rng.standard_normal(V), jnp.float32),
            "v": jnp.asarray(0.5 * rng.standard_normal(D), jnp.float32)}


def _reference(params, seed):
    """A reference model that really differs from ``params``.

    (Adding a constant to every logit of a row, as ``params + c`` does for
    this linear policy, leaves its log-probs unchanged: KL and implicit
    rewards would all be rounding noise.)
    """
    rng = _rng(seed)
    return jax.tree_util.tree_map(
        lambda x: x + jnp.asarray(0.3 * rng.standard_normal(x.shape),
                                  x.dtype), params)


def _token_log_probs(params, obs, actions, mask=None):
    """``[B, L]`` float64 log-probs of ``actions`` under ``token_policy``."""
    logits = (np.asarray(obs, np.float64) @ np.asarray(params["w"], np.float64)
              + np.asarray(params["b"], np.float64))
    logits = logits - logits.max(-1, keepdims=True)
    log_sm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    out = np.take_along_axis(log_sm, np.asarray(actions)[..., None], -1)[..., 0]
    return out if mask is None else np.where(np.asarray(mask) > 0, out, 0.0)


def _clip_margin(log_ratio, valid, clip):
    """Smallest distance of a valid log-ratio from ``log(1 -+ clip)``."""
    bounds = np.log([1.0 - clip, 1.0 + clip])
    lr = np.asarray(log_ratio)[np.asarray(valid) > 0]
    return float(np.min(np.abs(lr[:, None] - bounds[None, :])))


def grpo_margin(state, batch):
    """How far the discrete ``clip_fraction`` is from a tie: the smallest
    distance of a token's log-ratio (at ``state.params``, where the update
    evaluates its metrics) from the clip bounds."""
    lp = _token_log_probs(state.params, batch["observations"],
                          batch["actions"])
    return _clip_margin(lp - np.asarray(batch["log_probs"], np.float64),
                        batch["mask"], state.config.clip_param)


def grpo_problem(aggregation, seed=1):
    rng = _rng(seed)
    params = _params()
    ref = _reference(params, seed=11)
    rewards = rng.integers(0, 3, B).astype(np.float32)
    rewards[:G] = 1.0        # one group with zero reward variance
    batch = dict(
        observations=jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32),
        actions=jnp.asarray(rng.integers(0, V, (B, L))),
        rewards=jnp.asarray(rewards),
        log_probs=jnp.asarray(-1.6 + 0.3 * rng.standard_normal((B, L)),
                              jnp.float32),
        mask=jnp.asarray(_mask(rng, B, L)))
    config = afn.grpo.GRPOConfig(
        num_generations=G, beta=0.05, loss_aggregation=aggregation,
        policy=token_policy, optimizer=SGD, max_grad_norm=10.0)
    state = afn.grpo.init(params, config, ref_params=ref)
    return afn.grpo.update, state, batch


def _ppo_batch(rng, n_env=8, t=6):
    """A ``[n_env, t]`` PPO trajectory batch with terminations."""
    return dict(
        observations=jnp.asarray(rng.standard_normal((n_env, t, D)),
                                 jnp.float32),
        actions=jnp.asarray(rng.integers(0, V, (n_env, t))),
        rewards=jnp.asarray(rng.standard_normal((n_env, t)), jnp.float32),
        dones=jnp.asarray(rng.random((n_env, t)) < 0.2),
        values=jnp.asarray(rng.standard_normal((n_env, t + 1)), jnp.float32),
        log_probs=jnp.asarray(-1.6 + 0.3 * rng.standard_normal((n_env, t)),
                              jnp.float32))


def ppo_problem(seed=2):
    rng = _rng(seed)
    batch = _ppo_batch(rng)
    batch["mask"] = jnp.asarray(_mask(rng, 8, 6))
    config = afn.ppo.PPOConfig(num_epochs=2, num_minibatches=2,
                               value_clip_param=0.2, policy=actor_critic,
                               optimizer=SGD)
    state = afn.ppo.init(_params(), config, key=jax.random.key(3))
    return afn.ppo.update, state, batch


def reinforce_problem(seed=3):
    rng = _rng(seed)
    batch = dict(
        observations=jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32),
        actions=jnp.asarray(rng.integers(0, V, (B, L))),
        rewards=jnp.asarray(rng.standard_normal((B, L)), jnp.float32),
        dones=jnp.asarray(rng.random((B, L)) < 0.2),
        mask=jnp.asarray(_mask(rng, B, L)))
    config = afn.reinforce.REINFORCEConfig(baseline="mean", policy=token_policy,
                                           optimizer=SGD)
    return afn.reinforce.update, afn.reinforce.init(_params(), config), batch


def dpo_problem(reference_free, seed=4):
    rng = _rng(seed)

    def side():
        return dict(
            observations=jnp.asarray(rng.standard_normal((B, L, D)),
                                     jnp.float32),
            actions=jnp.asarray(rng.integers(0, V, (B, L))),
            mask=jnp.asarray(_mask(rng, B, L)))

    batch = dict(chosen=side(), rejected=side())
    config = afn.dpo.DPOConfig(reference_free=reference_free,
                               policy=token_policy, optimizer=SGD)
    ref = _reference(_params(), seed=12)
    return afn.dpo.update, afn.dpo.init(_params(), config,
                                        ref_params=ref), batch


def dpo_margin(state, batch):
    """How far ``reward_accuracy`` (the fraction of pairs with margin > 0)
    is from a tie: the smallest |chosen - rejected implicit reward| at
    ``state.params`` over pairs with any valid token (pairs with none
    have a margin of exactly 0 on every machine)."""
    cfg = state.config

    def seq(params, side, mean):
        lp = _token_log_probs(params, side["observations"], side["actions"],
                              side["mask"])
        n = np.asarray(side["mask"]).sum(-1)
        return lp.sum(-1) / np.maximum(n, 1.0) if mean else lp.sum(-1), n

    (pc, nc), (pr, nr) = (seq(state.params, batch[k], cfg.reference_free)
                          for k in ("chosen", "rejected"))
    if cfg.reference_free:
        margin = cfg.beta * (pc - pr)
    else:
        rc, _ = seq(state.ref_params, batch["chosen"], False)
        rr, _ = seq(state.ref_params, batch["rejected"], False)
        margin = cfg.beta * ((pc - rc) - (pr - rr))
    live = (nc + nr) > 0
    return float(np.min(np.abs(margin[live])))


def _replay(state, rows, loss_fn, log_probs, *loss_args):
    """Replays an epochs-of-minibatches update step by step from the
    public pieces (the update's shuffles, ``loss_fn(params, minibatch,
    config, *loss_args)``'s gradient, clipping, SGD(0.5)); returns
    ``(smallest distance of a valid log-ratio from the clip bounds,
    replayed params)``. ``log_probs(params, minibatch)`` is the float64
    policy."""
    from artifex_fn._src.algorithms.batching import shuffle_indices

    cfg = state.config
    n, k = rows["mask"].shape[0], cfg.num_minibatches
    _, *epoch_keys = jax.random.split(state.key, cfg.num_epochs + 1)

    # One compiled program a step (gradient, clipping, SGD(0.5)) instead of
    # a dozen eager operations: the replay's cost is its compilation.
    @jax.jit
    def sgd_step(params, mb):
        grads, _ = jax.grad(loss_fn, has_aux=True)(
            params, mb, cfg, *[f(mb, cfg) for f in loss_args])
        norm = optax.global_norm(grads)
        scale = jnp.minimum(1.0, cfg.max_grad_norm / jnp.maximum(norm, 1e-30))
        return jax.tree_util.tree_map(lambda p, g: p - 0.5 * scale * g,
                                      params, grads)

    rows = jax.tree_util.tree_map(np.asarray, rows)
    permute = jax.jit(shuffle_indices, static_argnums=1)
    params, worst = state.params, np.inf
    for epoch_key in epoch_keys:
        perm = np.asarray(permute(epoch_key, n))
        for j in range(k):
            idx = perm[j * (n // k):(j + 1) * (n // k)]
            mb = jax.tree_util.tree_map(lambda x: x[idx], rows)
            worst = min(worst, _clip_margin(
                log_probs(params, mb)
                - np.asarray(mb["log_probs"], np.float64), mb["mask"],
                cfg.clip_param))
            params = sgd_step(params, mb)
    return worst, params


def ppo_margin(state, batch):
    """How far PPO's ``clip_fraction`` is from a tie at every minibatch
    step (:func:`_replay`, flat samples)."""
    samples, _ = jax.jit(afn.ppo.prepare, static_argnums=1)(batch,
                                                            state.config)
    return _replay(state, samples, afn.ppo.minibatch_loss,
                   lambda p, mb: _token_log_probs(p, mb["observations"],
                                                  mb["actions"]))


def grpo_epochs_problem(seed=2):
    """GRPO with two epochs of two shuffled minibatches and truncated
    completions masked out (``truncated`` flags a third of the rows)."""
    update, state, batch = grpo_problem("grpo", seed=seed)
    truncated = np.zeros(B, bool)
    truncated[2::3] = True
    batch = dict(batch, truncated=jnp.asarray(truncated))
    state = state.replace(config=dataclasses.replace(
        state.config, num_epochs=2, num_minibatches=2,
        mask_truncated_completions=True))
    return update, state, batch


def grpo_epochs_margin(state, batch):
    """How far ``clip_fraction`` is from a tie at every step of a
    multi-epoch GRPO update (:func:`_replay`: whole-batch advantages, each
    minibatch's denominators)."""
    rows = jax.jit(lambda s, b: afn.grpo.with_reference_log_probs(
        s, afn.grpo.prepare(b, s.config)[0]))(state, batch)
    return _replay(state, rows, afn.grpo.rows_loss,
                   lambda p, mb: _token_log_probs(p, mb["observations"],
                                                  mb["actions"]),
                   afn.grpo.totals_of)


def seq_policy(params, obs):
    """Sequence actor-critic: token logits ``[n, L, V]`` and values
    ``[n, L]`` from one feature row per sequence."""
    return (jnp.einsum("nd,dlv->nlv", obs, params["w"]),
            obs @ params["v"])


def _seq_params(seed=0):
    rng = _rng(seed)
    return {"w": jnp.asarray(0.3 * rng.standard_normal((D, L, V)),
                             jnp.float32),
            "v": jnp.asarray(0.3 * rng.standard_normal((D, L)), jnp.float32)}


def _seq_log_probs(params, obs, actions):
    """``[n, L]`` float64 log-probs of ``actions`` under ``seq_policy``."""
    logits = np.einsum("nd,dlv->nlv", np.asarray(obs, np.float64),
                       np.asarray(params["w"], np.float64))
    logits = logits - logits.max(-1, keepdims=True)
    log_sm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.take_along_axis(log_sm, np.asarray(actions)[..., None],
                              -1)[..., 0]


def ppo_seq_problem(seed=6):
    """RLHF-PPO on sequences: scores ``[B]``, per-token KL to a reference
    (``state.ref_params``), GAE over the completion mask, the adaptive
    KL coefficient, two epochs of two minibatches of sequences."""
    rng = _rng(seed)
    lengths = rng.integers(1, L + 1, B)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.float32)
    params = _seq_params()
    obs = jnp.asarray(rng.standard_normal((B, D)), jnp.float32)
    actions = jnp.asarray(rng.integers(0, V, (B, L)))
    # Sampled from the policy: the old log-probs are its own.
    old = jnp.asarray(_seq_log_probs(params, obs, actions), jnp.float32)
    batch = dict(observations=obs, actions=actions,
                 rewards=jnp.asarray(rng.standard_normal(B), jnp.float32),
                 log_probs=old,
                 values=jnp.asarray(rng.standard_normal((B, L)), jnp.float32),
                 mask=jnp.asarray(mask))
    config = afn.ppo.PPOConfig(num_epochs=2, num_minibatches=2, beta=0.1,
                               kl_target=0.5, kl_horizon=100.0,
                               policy=seq_policy, optimizer=SGD)
    state = afn.ppo.init(params, config, key=jax.random.key(5),
                         ref_params=_reference(params, seed=13))
    return afn.ppo.update, state, batch


def reward_model_problem(seed=7):
    """Bradley-Terry pairs of sequences scored by a linear head on the
    mean of masked token features, with per-pair margins and centering."""
    rng = _rng(seed)

    def side():
        # Every side has a valid token (two empty sides would tie exactly).
        lengths = rng.integers(1, L + 1, B)
        return dict(tokens=jnp.asarray(rng.standard_normal((B, L, D)),
                                       jnp.float32),
                    mask=jnp.asarray((np.arange(L)[None] < lengths[:, None])
                                     .astype(np.float32)))

    def model(params, obs):
        m = obs["mask"][..., None]
        mean = jnp.sum(obs["tokens"] * m, 1) / jnp.maximum(jnp.sum(m, 1), 1)
        return mean @ params["w"] + params["b"]

    batch = dict(chosen=side(), rejected=side(),
                 margin=jnp.asarray(rng.uniform(0, 0.5, B), jnp.float32))
    params = {"w": jnp.asarray(rng.standard_normal(D), jnp.float32),
              "b": jnp.asarray(0.1, jnp.float32)}
    config = afn.reward_model.RewardModelConfig(
        center_coeff=0.01, max_grad_norm=1.0, model=model, optimizer=SGD)
    return (afn.reward_model.update,
            afn.reward_model.init(params, config), batch)


def reward_model_margin(state, batch):
    """How far ``accuracy`` (pairs with r_chosen > r_rejected at the
    pre-update parameters) is from a tie."""
    model = state.config.model
    gap = (np.asarray(model(state.params, batch["chosen"]), np.float64)
           - np.asarray(model(state.params, batch["rejected"]), np.float64))
    return float(np.min(np.abs(gap)))


def ppo_seq_margin(state, batch):
    """How far ``clip_fraction`` is from a tie at every minibatch step of
    the sequence update (:func:`_replay`)."""
    samples = jax.jit(lambda s, b: afn.ppo.prepare(
        afn.ppo.with_reference_log_probs(s, b), s.config)[0])(state, batch)
    return _replay(state, samples, afn.ppo.minibatch_loss,
                   lambda p, mb: _seq_log_probs(p, mb["observations"],
                                                mb["actions"]))


def online_dpo_problem(seed=8):
    """Online DPO: 6 groups of 4 sampled responses ranked by rewards (two
    groups tied), DPO on best against worst with a reference."""
    rng = _rng(seed)
    rewards = rng.integers(0, 3, B).astype(np.float32)
    rewards[4:8] = 1.0                       # a tie
    rewards[12:16] = 0.0                     # another
    batch = dict(
        observations=jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32),
        actions=jnp.asarray(rng.integers(0, V, (B, L))),
        mask=jnp.asarray(_mask(rng, B, L)), rewards=jnp.asarray(rewards))
    config = afn.online_dpo.OnlineDPOConfig(
        num_generations=G, beta=0.5, policy=token_policy, optimizer=SGD)
    state = afn.online_dpo.init(_params(), config,
                                ref_params=_reference(_params(), seed=14))
    return afn.online_dpo.update, state, batch


def online_dpo_margin(state, batch):
    """How far ``reward_accuracy`` is from a tie: the smallest |implicit
    reward margin| over the decisive pairs with a valid token."""
    cfg = state.config
    pairs, decisive, _ = afn.online_dpo.select_pairs(
        batch, group_size=cfg.num_generations)

    def ratio(side):
        lp = _token_log_probs(state.params, side["observations"],
                              side["actions"], side["mask"]).sum(-1)
        ref = _token_log_probs(state.ref_params, side["observations"],
                               side["actions"], side["mask"]).sum(-1)
        return lp - ref, np.asarray(side["mask"]).sum(-1)

    (rc, nc), (rr, nr) = ratio(pairs["chosen"]), ratio(pairs["rejected"])
    live = (np.asarray(decisive) > 0) & ((nc + nr) > 0)
    return float(np.min(np.abs(cfg.beta * (rc - rr))[live]))


def kto_problem(seed=9):
    """KTO: unpaired examples (two thirds desirable), the reference point
    on mismatched rows, reference log-probs from ``state.ref_params``."""
    rng = _rng(seed)

    def rows():
        return dict(
            observations=jnp.asarray(rng.standard_normal((B, L, D)),
                                     jnp.float32),
            actions=jnp.asarray(rng.integers(0, V, (B, L))),
            mask=jnp.asarray(_mask(rng, B, L)))

    batch = dict(rows(), desirable=jnp.asarray(np.arange(B) % 3 != 0),
                 kl=rows())
    config = afn.kto.KTOConfig(beta=0.5, desirable_weight=1.0,
                               undesirable_weight=1.5, policy=token_policy,
                               optimizer=SGD)
    # A reference below the policy on the kl rows: z_ref > 0, unclamped.
    state = afn.kto.init(_params(), config,
                         ref_params=_reference(_params(), seed=15))
    return afn.kto.update, state, batch


def orpo_problem(seed=10):
    """ORPO on pairs of masked token responses, no reference."""
    update, state, batch = dpo_problem(True, seed=seed)
    config = afn.orpo.ORPOConfig(lambda_=0.2, policy=token_policy,
                                 optimizer=SGD)
    return afn.orpo.update, afn.orpo.init(state.params, config), batch


def orpo_margin(state, batch):
    """How far ``reward_accuracy`` (pairs whose chosen response has the
    higher mean token log-prob) is from a tie, over pairs with a valid
    token (two empty responses tie at 0 on every machine)."""
    def mean_lp(side):
        lp = _token_log_probs(state.params, side["observations"],
                              side["actions"], side["mask"]).sum(-1)
        n = np.asarray(side["mask"]).sum(-1)
        return lp / np.maximum(n, 1.0), n

    (ac, nc), (ar, nr) = mean_lp(batch["chosen"]), mean_lp(batch["rejected"])
    live = (nc + nr) > 0
    return float(np.min(np.abs(ac - ar)[live]))


CASES = {
    # "bnpo" reduces like "dapo" (token_mean) within one update.
    **{f"grpo-{a}": (lambda a=a: grpo_problem(a))
       for a in ("grpo", "dapo", "dr_grpo")},
    "grpo-epochs": grpo_epochs_problem,
    "ppo": ppo_problem,
    "reinforce": reinforce_problem,
    "dpo": lambda: dpo_problem(False),
    "simpo": lambda: dpo_problem(True),
    "ppo-seq": ppo_seq_problem,
    "reward-model": reward_model_problem,
    "online-dpo": online_dpo_problem,
    "kto": kto_problem,
    "orpo": orpo_problem,
}
# Tie margin of each case's discrete metrics (clip_fraction,
# reward_accuracy) where its update evaluates them.
MARGINS = {"grpo-grpo": grpo_margin, "grpo-dapo": grpo_margin,
           "grpo-dr_grpo": grpo_margin, "dpo": dpo_margin,
           "simpo": dpo_margin, "reward-model": reward_model_margin,
           "online-dpo": online_dpo_margin, "orpo": orpo_margin}


def _with_micro_batches(state, k):
    return state.replace(config=dataclasses.replace(state.config,
                                                    num_micro_batches=k))


def _host(tree):
    """NumPy copy of a (replicated or sharded) pytree, on this process."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x,
                                                                tiled=True))
        return np.asarray(x)
    return jax.tree_util.tree_map(get, tree)


def _rel_diff(a, b):
    """Largest ``|a - b| / (1 + |b|)`` over two pytrees of the same shape."""
    worst = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, (x.shape, y.shape)
        if x.size:
            worst = max(worst, float(np.max(np.abs(x - y) / (1 + np.abs(y)))))
    return worst


def _result(state, metrics):
    return dict(params=_host(state.params), metrics=_host(metrics))


# Every case on 8 devices (3 rows a device: GRPO's groups of 4 straddle
# devices) and plain GRPO also on 2 (groups aligned with the 12 rows of
# a device; the other GRPO cases differ from it in what the 8-device
# variants already cover: aggregation, epochs, truncation); FSDP
# and devices-with-micro-batches for one case per algorithm family, and
# micro-batches alone for the two cases that no in-process test
# micro-batches (REINFORCE, SimPO).
VARIANTS = [(f"{n}dev", dict(data=n), 1) for n in (2, 8)]
MICRO = [("micro3", None, 3)]
MICRO_CASES = ("reinforce", "simpo")
EXTRA = [("fsdp4x2", dict(data=4, fsdp=2), 1), ("8dev-micro3", dict(data=8), 3)]
# 8 devices with 3 micro-batches each (one variant: the suite's time), no
# FSDP.
SEQ_CASES = ("ppo-seq", "reward-model", "online-dpo", "kto", "orpo")
EXTRA_CASES = ("grpo-grpo", "ppo", "dpo")


def run_aggregation():
    """The math layer alone: every aggregation mode, sharded rows."""
    rng = np.random.default_rng(5)
    loss = jnp.asarray(rng.standard_normal((B, L)), jnp.float32)
    mask = jnp.asarray(_mask(rng, B, L))
    for mode in afn.AGGREGATION_MODES:
        fn = jax.jit(lambda x, m, mode=mode: jax.value_and_grad(
            lambda y: afn.aggregate_loss(y, m, mode=mode))(x))
        reference = _host(fn(loss, mask))
        for n in (2, 8):
            mesh = afn.distributed.make_mesh(data=n)
            placed = afn.distributed.shard_batch(dict(x=loss, m=mask), mesh)
            got = _host(fn(placed["x"], placed["m"]))
            print(json.dumps(dict(case=f"aggregate-{mode}", variant=f"{n}dev",
                                  params=_rel_diff(got[1], reference[1]),
                                  metrics=_rel_diff(got[0], reference[0]),
                                  metric_names=["value"])), flush=True)


def run_devices():
    n_dev = len(jax.devices())
    assert n_dev == 8, f"expected 8 forced host devices, got {n_dev}"
    run_aggregation()
    for name, make in CASES.items():
        update, state, batch = make()
        reference = _result(*jax.jit(update)(state, batch))
        margin = None
        if name in ("ppo", "grpo-epochs", "ppo-seq"):
            replay = {"ppo": ppo_margin, "grpo-epochs": grpo_epochs_margin,
                      "ppo-seq": ppo_seq_margin}[name]
            margin, replayed = replay(state, batch)
            # The replay took the update's steps (else its margin means
            # nothing).
            assert _rel_diff(replayed, reference["params"]) < 1e-5
        elif name in MARGINS:
            margin = MARGINS[name](state, batch)
        variants = ((VARIANTS if name == "grpo-grpo" else VARIANTS[1:])
                    + (EXTRA if name in EXTRA_CASES else [])
                    + (EXTRA[1:] if name == "grpo-epochs" else [])
                    + (MICRO if name in MICRO_CASES else []))
        if name in SEQ_CASES:   # devices and micro-batches at once
            variants = EXTRA[1:]
        for label, mesh_shape, k in variants:
            if name == "ppo" and k == 3:
                k = 4          # minibatches of 24 samples; 4 divides 24 too
            s = _with_micro_batches(state, k) if k > 1 else state
            if mesh_shape is None:
                out = jax.jit(update)(s, batch)
            else:
                fsdp = mesh_shape.get("fsdp", 1) > 1
                mesh = afn.distributed.make_mesh(**mesh_shape)
                step = afn.distributed.data_parallel(
                    update, mesh, fsdp=fsdp, min_fsdp_size=1)
                out = step(s, batch)
                if fsdp:  # the 6 x 5 kernel really is split over "fsdp"
                    spec = out[0].params["w"].sharding.spec
                    assert "fsdp" in tuple(spec), spec
            got = _result(*out)
            print(json.dumps(dict(
                case=name, variant=label, margin=margin,
                params=_rel_diff(got["params"], reference["params"]),
                metrics=_rel_diff(got["metrics"], reference["metrics"]),
                metric_names=sorted(got["metrics"]))), flush=True)


DISCRETE = ("clip_fraction", "reward_accuracy", "d_accuracy", "accuracy")


def _trainer_cases():
    """``name -> (make_trainer, batches, step)`` for the trainer checks."""
    from flax import nnx

    from artifex_fn import training as T

    rng = _rng(6)

    class ActorCritic(nnx.Module):
        def __init__(self, rngs):
            self.pi = nnx.Linear(D, V, rngs=rngs)
            self.v = nnx.Linear(D, 1, rngs=rngs)

        def __call__(self, obs):
            return self.pi(obs), self.v(obs)[..., 0]

    class Tokens(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Linear(D, V, rngs=rngs)

        def __call__(self, obs):
            return self.w(obs)

    class VAE(nnx.Module):
        def __init__(self, rngs):
            self.enc = nnx.Linear(D, 4, rngs=rngs)
            self.dec = nnx.Linear(2, D, rngs=rngs)

        def encode(self, x):
            return tuple(jnp.split(self.enc(x), 2, axis=-1))

        def decode(self, z):
            return self.dec(z)

    class Field(nnx.Module):  # diffusion eps(x, t) and flow v(x, t)
        def __init__(self, rngs):
            self.x = nnx.Linear(2, 16, rngs=rngs)
            self.t = nnx.Linear(1, 16, rngs=rngs)
            self.out = nnx.Linear(16, 2, rngs=rngs)

        def __call__(self, x, t):
            t = jnp.asarray(t, jnp.float32).reshape(-1, 1)
            return self.out(jnp.tanh(self.x(x) + self.t(t)))

    class MLP(nnx.Module):
        def __init__(self, din, dout, rngs):
            self.a = nnx.Linear(din, 16, rngs=rngs)
            self.b = nnx.Linear(16, dout, rngs=rngs)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    adam = optax.adam(1e-2)

    def opt(model):
        return nnx.Optimizer(model, adam, wrt=nnx.Param)

    def ppo():
        m = ActorCritic(nnx.Rngs(0))
        return T.PPOTrainer(m, opt(m), afn.ppo.PPOConfig(num_minibatches=2),
                            key=1)

    def tokens(cls, config, key, reference=False):
        """A trainer of ``cls`` on a ``Tokens`` policy (and reference)."""
        def make():
            m = Tokens(nnx.Rngs(0))
            ref = dict(reference_model=Tokens(nnx.Rngs(1))) if reference else {}
            return cls(m, opt(m), config, key=key, **ref)
        return make

    def vae():
        m = VAE(nnx.Rngs(0))
        return T.VAETrainer(m, opt(m), afn.families.vae.VAEConfig(),
                            key=4)

    def diffusion():
        m = Field(nnx.Rngs(0))
        return T.DiffusionTrainer(
            m, opt(m), afn.families.diffusion.DiffusionConfig(
                num_timesteps=10), key=5)

    def flow():
        m = Field(nnx.Rngs(0))
        return T.FlowTrainer(m, opt(m), afn.families.flow.FlowConfig(),
                             key=6)

    def gan():
        g, d = MLP(2, 2, nnx.Rngs(0)), MLP(2, 1, nnx.Rngs(1))
        return T.GANTrainer(g, opt(g),
                            afn.families.gan.GANConfig(latent_dim=2),
                            discriminator=d, d_optimizer=opt(d), key=7)

    grpo = tokens(T.GRPOTrainer, afn.grpo.GRPOConfig(num_generations=G), 2,
                  reference=True)
    dpo = tokens(T.DPOTrainer, afn.dpo.DPOConfig(), 3, reference=True)
    kto = tokens(T.KTOTrainer, afn.kto.KTOConfig(), 9, reference=True)
    orpo = tokens(T.ORPOTrainer, afn.orpo.ORPOConfig(), 10)
    reinforce = tokens(T.REINFORCETrainer, afn.reinforce.REINFORCEConfig(),
                       11)

    def reward_model():
        from artifex_fn.families.autoregressive import TinyCausalLM
        lm = TinyCausalLM(V + 2, d_model=8, num_heads=2, num_layers=1,
                          rngs=nnx.Rngs(0))
        m = afn.reward_model.SequenceRewardModel(lm, 8, pad_token_id=0,
                                                 rngs=nnx.Rngs(1))
        return T.RewardModelTrainer(
            m, opt(m), afn.reward_model.RewardModelConfig(center_coeff=0.01),
            key=8)

    def token_side():
        lengths = rng.integers(1, L + 1, B)
        return dict(tokens=jnp.asarray(rng.integers(1, V + 2, (B, L))),
                    mask=jnp.asarray((np.arange(L)[None] < lengths[:, None])
                                     .astype(np.float32)))

    ppo_batch = _ppo_batch(rng)
    prompts = dict(observations=jnp.asarray(rng.standard_normal((8, D)),
                                            jnp.float32))

    def side():
        return dict(observations=jnp.asarray(
            rng.standard_normal((B, L, D)), jnp.float32),
            actions=jnp.asarray(rng.integers(0, V, (B, L))),
            mask=jnp.asarray(_mask(rng, B, L)))

    pairs = dict(chosen=side(), rejected=side())
    rm_pairs = dict(chosen=token_side(), rejected=token_side())
    x6 = jnp.asarray(rng.standard_normal((16, D)), jnp.float32)
    x2 = jnp.asarray(rng.standard_normal((16, 2)), jnp.float32)
    reward = lambda samples, conditions: (samples % 2).astype(jnp.float32)
    plain = lambda tr, b: tr.train_step(b)
    return {
        "PPOTrainer": (ppo, ppo_batch, plain),
        "REINFORCETrainer": (reinforce, {k: ppo_batch[k] for k in (
            "observations", "actions", "rewards")}, plain),
        "GRPOTrainer": (grpo, prompts, lambda tr, b: tr.train_step(
            b, reward, key=jax.random.key(9))),
        "DPOTrainer": (dpo, pairs, plain),
        # Unpaired rows: KTO's reference point z mixes rows of every device.
        "KTOTrainer": (kto, afn.kto.pairs_to_unpaired(pairs), plain),
        "ORPOTrainer": (orpo, pairs, plain),
        "VAETrainer": (vae, x6, plain),
        "DiffusionTrainer": (diffusion, x2, plain),
        "FlowTrainer": (flow, x2, plain),
        "GANTrainer": (gan, x2, plain),
        "RewardModelTrainer": (reward_model, rm_pairs, plain),
    }


def _trainer_params(trainer):
    from flax import nnx
    out = [nnx.state(trainer.model, nnx.Param)]
    if hasattr(trainer, "discriminator"):
        out.append(nnx.state(trainer.discriminator, nnx.Param))
    return _host(nnx.as_pure(out))


def run_trainers():
    """Every trainer, sharded over 8 devices (and FSDP), against plain."""
    assert len(jax.devices()) == 8
    for name, (make, batch, step) in _trainer_cases().items():
        meshes = {"8dev": (afn.distributed.make_mesh(), False)}
        if name in ("PPOTrainer", "VAETrainer"):
            meshes["fsdp4x2"] = (afn.distributed.make_mesh(data=4, fsdp=2),
                                 True)
        runs = {"plain": make()}
        for label, (mesh, fsdp) in meshes.items():
            runs[label] = make().shard(mesh, fsdp=fsdp, min_fsdp_size=1)
        metrics = {}
        for label, trainer in runs.items():
            for _ in range(2):
                metrics[label] = _host(step(trainer, batch))
        # Trainers' discrete metrics (clip_fraction, reward_accuracy,
        # d_accuracy) depend on inputs whose distance from a tie is not
        # computed here; the updates' discrete metrics are checked above
        # with their margins. Continuous metrics are all compared.
        metrics = {label: {k: v for k, v in m.items() if k not in DISCRETE}
                   for label, m in metrics.items()}
        want = _trainer_params(runs["plain"])
        for label in meshes:  # the state stayed on the whole mesh
            from flax import nnx
            leaves = jax.tree_util.tree_leaves(nnx.as_pure(nnx.state(
                runs[label].model, nnx.Param)))
            assert all(len(x.sharding.device_set) == 8 for x in leaves), label
            print(json.dumps(dict(
                case=name, variant=label,
                params=_rel_diff(_trainer_params(runs[label]), want),
                metrics=_rel_diff(metrics[label], metrics["plain"]),
                metric_names=sorted(metrics[label]))), flush=True)


def run_lm_generation():
    """Generating trainers on TinyCausalLM (key-value cache, ragged
    prompts, top-p), sharded over 8 devices against plain: GRPO (4 samples
    a prompt), RLHF-PPO (an actor-critic decoder, one sample a prompt,
    a per-token KL to a reference and the adaptive coefficient) and online
    DPO (4 samples a prompt ranked into pairs, a reference). For each:
    the tokens, the behaviour log-probs, the parameters and the metrics of
    a step, and the plain draws' distance from a flip (see
    ``draw_margin``)."""
    from flax import nnx

    from algo_fixtures import draw_margin
    from artifex_fn import sampling
    from artifex_fn import training
    from artifex_fn.families.autoregressive import ActorCriticLM
    from artifex_fn.families.autoregressive import TinyCausalLM
    gen = sampling.GenerationConfig(max_new_tokens=4, eos_token_id=1,
                                    top_p=0.95)

    def lm(seed=0):
        return TinyCausalLM(16, d_model=16, num_heads=2, num_layers=1,
                            rngs=nnx.Rngs(seed))

    def grpo():
        m = lm()
        return training.GRPOTrainer(
            m, nnx.Optimizer(m, SGD, wrt=nnx.Param),
            afn.grpo.GRPOConfig(num_generations=G, beta=0.0),
            generation=gen, key=0)

    def ppo():
        # One epoch of one minibatch: the ratios stay at 1 up to rounding,
        # far from the clip bounds.
        m = ActorCriticLM(lm(), rngs=nnx.Rngs(2))
        return training.PPOTrainer(
            m, nnx.Optimizer(m, SGD, wrt=nnx.Param),
            afn.ppo.PPOConfig(beta=0.05, kl_target=0.5, gamma=1.0,
                              num_epochs=1, num_minibatches=1),
            reference_model=lm(1), generation=gen, key=0)

    def online_dpo():
        m = lm()
        return training.OnlineDPOTrainer(
            m, nnx.Optimizer(m, SGD, wrt=nnx.Param),
            afn.online_dpo.OnlineDPOConfig(num_generations=G, beta=0.1),
            reference_model=lm(1), generation=gen, key=0)

    prompts = [[3, 4, 5], [6, 7], [8], [9, 10, 11, 12], [5], [6, 6],
               [7, 8, 9], [10]]
    reward = lambda samples, conditions: jnp.mean(
        (samples == 5).astype(jnp.float32), axis=-1)
    # Keys whose draws stay 2.4e-4 (GRPO, online DPO: the same draws) and
    # 1.1e-3 (PPO) from a flip.
    for name, make, group, key in (("GRPOTrainer-lm", grpo, G, 50),
                                   ("PPOTrainer-lm", ppo, 1, 50),
                                   ("OnlineDPOTrainer-lm", online_dpo, G, 50)):
        key = jax.random.key(key)
        plain, sharded = make(), make().shard(afn.distributed.make_mesh())
        metrics = {}
        for label, trainer in (("plain", plain), ("8dev", sharded)):
            metrics[label] = {k: v for k, v in _host(trainer.train_step(
                dict(observations=prompts), reward, key)).items()
                if k not in DISCRETE}
        a, b = plain.last_rollout, sharded.last_rollout
        # The plain step's draws (from the initial parameters, which a
        # fresh ``make()`` holds) against the prompts the trainer padded:
        # their distance from a flip.
        padded, mask = sampling.pad_prompts(prompts)
        padded, mask = np.repeat(padded, group, 0), np.repeat(mask, group, 0)
        assert np.array_equal(a["conditions"], padded)
        assert np.array_equal(a["prompt_mask"], mask)
        drawn = sampling.Generation(tokens=a["samples"], mask=a["mask"],
                                    log_probs=a["log_probs"])
        margin = draw_margin(make().model, padded, mask, drawn, key,
                             top_p=0.95, compiled=True)
        tokens_equal = bool(np.array_equal(a["samples"], b["samples"]))
        log_probs = float(np.max(np.abs(
            np.asarray(a["log_probs"]) - np.asarray(b["log_probs"]))))
        print(json.dumps(dict(
            case=name, variant="8dev", margin=margin,
            tokens_equal=tokens_equal, log_probs=log_probs,
            params=_rel_diff(_trainer_params(sharded),
                             _trainer_params(plain)),
            metrics=_rel_diff(metrics["8dev"], metrics["plain"]),
            metric_names=sorted(metrics["8dev"]))), flush=True)


def _runner_program():
    """A small program with the runner's whole contract (keys split every
    step, traced hyper-parameters, a pytree carry): noisy gradient descent
    on a random quadratic. It compiles in about a second; CartPole's
    program over host devices is run by ``tests/test_cli.py``."""
    from artifex_fn.experiments import Program

    def init(key, hp):
        k_a, k_w, k_run = jax.random.split(key, 3)
        a = jax.random.normal(k_a, (8, 4))
        return dict(a=a.T @ a / 8 + jnp.eye(4), w=jax.random.normal(k_w, (4,)),
                    key=k_run)

    def loss(carry):
        w = carry["w"]
        return 0.5 * w @ carry["a"] @ w

    def step(carry, hp):
        key, k_noise = jax.random.split(carry["key"])
        grad = carry["a"] @ carry["w"] + hp["noise"] * jax.random.normal(
            k_noise, (4,))
        carry = dict(carry, w=carry["w"] - hp["lr"] * grad, key=key)
        return carry, dict(loss=loss(carry))

    return Program(init=init, step=step,
                   evaluate=lambda c, key, hp: dict(loss=loss(c)),
                   params=lambda c: dict(w=c["w"]), num_iterations=12,
                   samples_per_iteration=1, curve="loss", score="loss")


def run_runner():
    """The experiment runner: 4 seeds split over 4 of the 8 devices
    against the same seeds on one device."""
    from artifex_fn.experiments import runner
    program = _runner_program()
    results = {}
    for label, shard in (("plain", False), ("4dev", "auto")):
        results[label] = runner.run(program, hparams=dict(lr=0.1, noise=0.5),
                                    num_seeds=4, chunks=3, progress=False,
                                    shard_seeds=shard)
    plain, split = results["plain"], results["4dev"]
    assert plain.devices == 1 and split.devices == 4, (plain.devices,
                                                      split.devices)
    # Seeds differ from each other (the split kept each seed's key).
    assert np.ptp(plain.after["loss"]) > 1e-3
    print(json.dumps(dict(
        case="runner", variant="4dev",
        params=_rel_diff(split.params, plain.params),
        metrics=_rel_diff(dict(split.metrics, **split.after),
                          dict(plain.metrics, **plain.after)),
        metric_names=sorted(split.metrics))), flush=True)


def _two_process_problem():
    update, state, batch = grpo_problem("grpo")
    return update, state, batch


def run_single(out):
    update, state, batch = _two_process_problem()
    margin = np.inf
    for _ in range(2):
        margin = min(margin, grpo_margin(state, batch))
        state, metrics = jax.jit(update)(state, batch)
    result = {k: np.asarray(v).tolist()
              for k, v in dict(_result(state, metrics)["params"],
                               **_result(state, metrics)["metrics"]).items()}
    with open(out, "w") as f:
        json.dump(dict(result, tie_margin=margin), f)


def run_host(rank, out):
    assert jax.process_count() == 2
    update, state, batch = _two_process_problem()
    mesh = afn.distributed.make_mesh()
    step = afn.distributed.data_parallel(update, mesh, process_local=True)
    half = B // 2
    local = jax.tree_util.tree_map(
        lambda x: np.asarray(x)[rank * half:(rank + 1) * half], batch)
    for _ in range(2):
        state, metrics = step(state, local)
    result = _result(state, metrics)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({k: np.asarray(v).tolist()
                       for k, v in dict(result["params"],
                                        **result["metrics"]).items()}, f)
    print(f"rank {rank}: {len(jax.devices())} global devices, "
          f"{len(jax.local_devices())} local", flush=True)


if __name__ == "__main__":
    if MODE == "devices":
        run_devices()
        run_trainers()
        run_lm_generation()
        run_runner()
    elif MODE == "single":
        run_single(sys.argv[2])
    elif MODE == "host":
        run_host(int(sys.argv[2]), sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {MODE!r}")
