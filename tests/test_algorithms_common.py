"""Contracts shared by every algorithm: jit, vmap, recompilation, configs."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import artifex_fn as afn

from algo_fixtures import (ADAM, POLICY_CALLS, PROBLEMS, assert_trees_close,
                           init_params, linear_policy, np_log_prob_entropy,
                           stack_trees, tree_index, with_fields)

ALGOS = tuple(PROBLEMS)
POLICY_NAME = {"reinforce": "linear_policy", "ppo": "actor_critic",
               "grpo": "linear_policy", "dpo": "linear_policy"}

# One jitted single-state update and one jitted vmapped update per
# algorithm, shared by the tests below (same shapes, same static config).
SINGLE = {name: jax.jit(mod.update) for name, (mod, _) in PROBLEMS.items()}
VMAPPED = {name: jax.jit(jax.vmap(mod.update, in_axes=(0, None)))
           for name, (mod, _) in PROBLEMS.items()}


def _setup(name, seed=0):
    mod, problem = PROBLEMS[name]
    cfg, params, batch = problem(seed)
    return mod, cfg, params, batch


def _assert_metrics_close(a, b, rtol=1e-5, atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]),
                                   rtol=rtol, atol=atol, err_msg=k)


def _assert_discrete_metrics_clear_of_ties(name, state, batch):
    """The discrete metrics of ``update(state, batch)`` cannot depend on
    float32 rounding, so that two ways of computing them agree: no DPO
    reward margin within 1e-4 of 0 (for reward_accuracy), no PPO/GRPO
    ratio within 1.2e-4 of a clip bound ``1 -/+ clip_param`` (for
    clip_fraction).

    PPO's ratios come from epochs of shuffled minibatches, so rather than
    recomputing them the clip bounds are moved by 1.2e-4 either way: the
    clip fraction stays the same only if no ratio lies that close.
    """
    config = state.config
    if name == "dpo":
        def score(side):   # masked sum of token log-probs, in float64
            pos = np.argmax(np.asarray(side["observations"]), -1)
            logp, _ = np_log_prob_entropy(state.params, pos,
                                          np.asarray(side["actions"]))
            return (logp * np.asarray(side["mask"], np.float64)).sum(-1)

        margin = config.beta * (
            (score(batch["chosen"]) - np.asarray(batch["ref_chosen_log_probs"],
                                                 np.float64))
            - (score(batch["rejected"])
               - np.asarray(batch["ref_rejected_log_probs"], np.float64)))
        assert np.min(np.abs(margin)) > 1e-4
    elif name in ("ppo", "grpo"):
        fractions = {float(SINGLE[name](state.replace(
            config=dataclasses.replace(config, clip_param=config.clip_param
                                       + d)), batch)[1]["clip_fraction"])
            for d in (-1.2e-4, 0.0, 1.2e-4)}
        assert len(fractions) == 1, fractions


def _max_abs_diff(a, b):
    diffs = jax.tree_util.tree_map(lambda x, y: float(jnp.max(jnp.abs(x - y))),
                                   a, b)
    return max(jax.tree_util.tree_leaves(diffs))


# --------------------------------------------------------------------------
# jit / vmap / recompilation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALGOS)
def test_jit_update_matches_eager_update(name):
    """jax.jit(update) and the eager update give the same state and metrics."""
    mod, cfg, params, batch = _setup(name)
    state = mod.init(params, cfg, key=jax.random.PRNGKey(3))
    _assert_discrete_metrics_clear_of_ties(name, state, batch)
    eager_state, eager_metrics = mod.update(state, batch)
    jit_state, jit_metrics = SINGLE[name](state, batch)
    assert_trees_close(eager_state.params, jit_state.params, rtol=1e-5,
                       atol=1e-6)
    assert_trees_close(eager_state.opt_state, jit_state.opt_state,
                       rtol=1e-5, atol=1e-6)
    _assert_metrics_close(eager_metrics, jit_metrics)
    np.testing.assert_array_equal(eager_state.key, jit_state.key)
    assert int(eager_state.step) == int(jit_state.step) == 1
    assert _max_abs_diff(jit_state.params, params) > 0.0


@pytest.mark.parametrize("name", ALGOS)
def test_vmap_over_seeds_matches_separate_runs(name):
    """vmap over 4 states (params, keys) equals 4 independent updates."""
    mod, cfg, _, batch = _setup(name)
    states = [mod.init(init_params(10 + i), cfg, key=jax.random.PRNGKey(i))
              for i in range(4)]
    out_state, out_metrics = VMAPPED[name](stack_trees(states), batch)
    assert out_state.step.shape == (4,)
    for i, state in enumerate(states):
        _assert_discrete_metrics_clear_of_ties(name, state, batch)
        ref_state, ref_metrics = SINGLE[name](state, batch)
        assert_trees_close(tree_index(out_state.params, i), ref_state.params,
                           rtol=1e-5, atol=1e-6)
        _assert_metrics_close(tree_index(out_metrics, i), ref_metrics,
                              rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out_state.key[i], ref_state.key)
    assert _max_abs_diff(tree_index(out_state.params, 0),
                         tree_index(out_state.params, 1)) > 1e-3


HYPER_CASES = [
    ("reinforce", "entropy_coeff", (0.0, 0.05, 0.2, 0.5),
     (0.01, 0.1, 0.3, 1.0)),
    ("ppo", "clip_param", (0.02, 0.1, 0.2, 0.4), (0.05, 0.15, 0.3, 0.5)),
    ("grpo", "clip_param", (0.02, 0.1, 0.2, 0.4), (0.05, 0.15, 0.3, 0.5)),
    ("grpo", "beta", (0.0, 0.5, 2.0, 5.0), (0.1, 1.0, 3.0, 4.0)),
    ("dpo", "beta", (0.05, 0.2, 0.5, 2.0), (0.1, 0.3, 1.0, 3.0)),
]


@pytest.mark.parametrize("name,field,values_a,values_b", HYPER_CASES)
def test_vmap_over_hyperparameter_compiles_once(name, field, values_a,
                                                values_b):
    """Configs differing in one numeric field vmap without retracing."""
    mod, cfg, params, batch = _setup(name)
    f = VMAPPED[name]

    def states_for(values):
        return [mod.init(params, with_fields(cfg, **{field: v}),
                         key=jax.random.PRNGKey(0)) for v in values]

    states_a = states_for(values_a)
    out_a, metrics_a = f(stack_trees(states_a), batch)
    calls = POLICY_CALLS[POLICY_NAME[name]]
    size = f._cache_size()
    out_b, _ = f(stack_trees(states_for(values_b)), batch)
    assert POLICY_CALLS[POLICY_NAME[name]] == calls, "retraced"
    assert f._cache_size() == size == 1
    # Each member used its own value.
    np.testing.assert_allclose(getattr(out_b.config, field), values_b,
                               rtol=1e-6)
    for i, state in enumerate(states_a):
        ref_state, ref_metrics = SINGLE[name](state, batch)
        assert_trees_close(tree_index(out_a.params, i), ref_state.params,
                           rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics_a["loss"][i], ref_metrics["loss"],
                                   rtol=1e-5, atol=1e-6)
    # The values matter: the members' losses differ.
    assert np.ptp(np.asarray(metrics_a["loss"])) > 1e-4


@pytest.mark.parametrize("name", ALGOS)
def test_new_batch_values_do_not_retrace(name):
    """Same shapes, new values: no new trace; step counts the updates."""
    mod, problem = PROBLEMS[name]
    cfg, params, batch = problem(0)
    f = SINGLE[name]
    state, _ = f(mod.init(params, cfg), batch)
    state, _ = f(state, batch)
    calls = POLICY_CALLS[POLICY_NAME[name]]
    size = f._cache_size()
    for seed in (1, 2, 3):
        _, _, new_batch = problem(seed)
        state, metrics = f(state, new_batch)
    assert POLICY_CALLS[POLICY_NAME[name]] == calls, "retraced"
    assert f._cache_size() == size
    assert int(state.step) == 5
    assert np.isfinite(float(metrics["loss"]))


def test_policy_call_counter_sees_traces():
    """The counter used above does count a fresh trace."""
    mod, cfg, params, batch = _setup("reinforce")
    before = POLICY_CALLS["linear_policy"]
    jax.eval_shape(lambda s, b: mod.update(s, b), mod.init(params, cfg),
                   batch)
    assert POLICY_CALLS["linear_policy"] > before


@pytest.mark.parametrize("name", ALGOS)
def test_init_state_layout(name):
    """init: step 0, uint32[2] key (typed keys accepted), optional ref."""
    mod, cfg, params, _ = _setup(name)
    state = mod.init(params, cfg, key=jax.random.key(5))
    assert isinstance(state, afn.TrainState)
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    assert state.key.dtype == jnp.uint32 and state.key.shape == (2,)
    np.testing.assert_array_equal(
        state.key, jax.random.key_data(jax.random.key(5)))
    assert state.ref_params is None and state.config is cfg
    ref = mod.init(params, cfg, ref_params=params).ref_params
    assert ref is params


# --------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------

BAD_CONFIGS = [
    (afn.ppo.PPOConfig, dict(clip_param=-0.1), "clip_param"),
    (afn.ppo.PPOConfig, dict(gamma=1.5), "gamma"),
    (afn.ppo.PPOConfig, dict(gae_lambda=-0.5), "gae_lambda"),
    (afn.ppo.PPOConfig, dict(num_minibatches=0), "num_minibatches"),
    (afn.ppo.PPOConfig, dict(num_epochs=0), "num_epochs"),
    (afn.ppo.PPOConfig, dict(max_grad_norm=0.0), "max_grad_norm"),
    (afn.reinforce.REINFORCEConfig, dict(gamma=-0.1), "gamma"),
    (afn.reinforce.REINFORCEConfig, dict(gamma=math.nan), "gamma"),
    (afn.reinforce.REINFORCEConfig, dict(entropy_coeff=-1.0),
     "entropy_coeff"),
    (afn.reinforce.REINFORCEConfig, dict(baseline="median"), "baseline"),
    (afn.grpo.GRPOConfig, dict(num_generations=0), "num_generations"),
    (afn.grpo.GRPOConfig, dict(beta=-0.01), "beta"),
    (afn.grpo.GRPOConfig, dict(loss_aggregation="sum"), "loss_aggregation"),
    (afn.grpo.GRPOConfig, dict(kl_estimator="k4"), "kl_estimator"),
    (afn.grpo.GRPOConfig, dict(scale_rewards="max"), "scale_rewards"),
    (afn.dpo.DPOConfig, dict(beta=0), "beta"),
    (afn.dpo.DPOConfig, dict(loss_type="robust", label_smoothing=0.5),
     "label_smoothing"),
    (afn.dpo.DPOConfig, dict(label_smoothing=1.5), "label_smoothing"),
    (afn.dpo.DPOConfig, dict(loss_type="kto"), "loss_type"),
    (afn.dpo.DPOConfig, dict(reference_free=True, loss_type="ipo"),
     "loss_type"),
]


@pytest.mark.parametrize("cls,kwargs,field", BAD_CONFIGS,
                         ids=[f"{c.__name__}-{f}" for c, _, f in BAD_CONFIGS])
def test_bad_config_values_raise_naming_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_default_hyperparameters():
    """Defaults as documented in the guide."""
    r = afn.reinforce.REINFORCEConfig()
    assert (r.gamma, r.normalize_returns, r.entropy_coeff) == (0.99, True,
                                                               0.01)
    p = afn.ppo.PPOConfig()
    assert (p.gamma, p.gae_lambda, p.clip_param, p.vf_coeff,
            p.entropy_coeff, p.max_grad_norm) == (0.99, 0.95, 0.2, 0.5,
                                                  0.01, 0.5)
    g = afn.grpo.GRPOConfig()
    assert (g.num_generations, g.clip_param, g.beta, g.entropy_coeff,
            g.gamma) == (4, 0.2, 0.01, 0.01, 0.99)
    d = afn.dpo.DPOConfig()
    assert (d.beta, d.label_smoothing, d.reference_free) == (0.1, 0.0, False)


@pytest.mark.parametrize("cls", [afn.reinforce.REINFORCEConfig,
                                 afn.ppo.PPOConfig, afn.grpo.GRPOConfig,
                                 afn.dpo.DPOConfig])
def test_configs_are_frozen_pytrees(cls):
    """Assignment raises; numeric fields are leaves, callables are static."""
    cfg = cls(policy=linear_policy, optimizer=ADAM)
    first = dataclasses.fields(cfg)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, first, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.policy = None
    leaves = jax.tree_util.tree_leaves(cfg)
    assert leaves and all(isinstance(x, float) for x in leaves)
    assert jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(cfg), leaves) == cfg


@pytest.mark.parametrize("name", ALGOS)
def test_missing_optimizer_or_policy_is_a_clear_error(name):
    mod, cfg, params, batch = _setup(name)
    with pytest.raises(ValueError, match="optimizer"):
        mod.init(params, with_fields(cfg, optimizer=None))
    state = mod.init(params, with_fields(cfg, policy=None))
    with pytest.raises(ValueError, match="policy"):
        jax.jit(mod.update)(state, batch)


# --- minibatch shuffling ------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from artifex_fn._src.algorithms.batching import shuffle_indices  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(n=st.integers(0, 3000), seed=st.integers(0, 2**31 - 1))
def test_shuffle_indices_is_a_permutation(n, seed):
    p = np.asarray(shuffle_indices(jax.random.PRNGKey(seed), n))
    assert p.dtype == np.int32 and p.shape == (n,)
    np.testing.assert_array_equal(np.sort(p), np.arange(n))


def test_shuffle_indices_is_uniform():
    """All 24 orders of 4 rows equally likely (chi-square), and every row
    equally likely at every position of a 512-row shuffle."""
    keys = jax.random.split(jax.random.PRNGKey(3), 24_000)
    perms = np.asarray(jax.jit(jax.vmap(lambda k: shuffle_indices(k, 4)))(keys))
    codes = perms @ (4 ** np.arange(4))
    counts = np.unique(codes, return_counts=True)[1]
    assert len(counts) == 24
    chi2 = np.sum((counts - 1000.0) ** 2 / 1000.0)
    assert chi2 < 49.7, chi2          # 23 dof, p = 0.001
    perms = np.asarray(jax.jit(jax.vmap(lambda k: shuffle_indices(k, 512)))(
        keys[:4096]))
    first = np.bincount(perms[:, 0], minlength=512)   # row at position 0
    chi2 = np.sum((first - 8.0) ** 2 / 8.0)
    assert chi2 < 650, chi2            # 511 dof, p = 0.001
    # Neighbouring rows are not kept together (a sort bug would do that).
    assert np.mean(np.abs(np.diff(perms, axis=1)) == 1) < 0.01


@pytest.mark.parametrize("n, rounds", [(16, 1), (512, 2), (5000, 3)])
def test_shuffle_indices_matches_its_definition(n, rounds):
    """Each round sorts (random high bits | current position): a NumPy
    replay of the rounds gives the same permutation. Ties in a round's
    random bits thus keep the previous round's random order."""
    b = max(1, math.ceil(math.log2(n)))
    low = np.uint32((1 << b) - 1)
    key = jax.random.PRNGKey(7)
    order = np.arange(n)
    for k in jax.random.split(key, rounds):
        bits = np.asarray(jax.random.bits(k, (n,), jnp.uint32))
        packed = (bits & ~low) | np.arange(n, dtype=np.uint32)
        order = order[np.argsort(packed)]
    np.testing.assert_array_equal(np.asarray(shuffle_indices(key, n)), order)


def test_shuffle_indices_large_n_falls_back():
    n = (1 << 20) + 3
    p = np.asarray(jax.jit(lambda k: shuffle_indices(k, n))(
        jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(np.sort(p), np.arange(n))
