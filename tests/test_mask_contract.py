"""The mask contract: padded entries contribute exactly zero, in values and
in gradients, whatever they hold.

Every math function that reads per-token or per-step data, and every
algorithm update, is evaluated twice on the same batch: once with finite
random numbers in the padding, once with NaN, +inf or -inf there (and, for
token ids, ``-1``). Both must agree bit for bit, in the results and in the
gradients; the gradients must be finite and exactly zero on the padding.
Each is drawn in float32, bfloat16 and float64. Agreement with the sliced
rows (the padding removed) is checked against NumPy on the valid entries.

The shapes are fixed (``B`` rows of ``L`` steps, ``A`` actions) and only the
row lengths, numbers, poison and dtype are drawn, so each dtype compiles
one program.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import artifex_fn as afn
from artifex_fn import testing as aft

from algo_fixtures import examples

B, L, A = 3, 6, 5
POISONS = (math.nan, math.inf, -math.inf)
DTYPES = ("float32", "bfloat16", "float64")

PROPERTY = settings(max_examples=examples(25, ci_share=4), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
MODES = afn.AGGREGATION_MODES

# Float inputs of the math functions: [B, L] per-token arrays (those named
# here) and [B, L, A] logits.
TOKEN_INPUTS = ("lp", "old", "ref", "adv", "values", "targets",
                "old_values", "rewards", "next_values")
LOGIT_INPUTS = ("logits", "q_logits", "p_log_probs", "q_log_probs")


# --------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------


@st.composite
def padded_batches(draw, dtypes=DTYPES):
    """``(lengths, seed, poison, dtype)``; a row may be empty."""
    lengths = draw(st.lists(st.integers(0, L), min_size=B, max_size=B))
    return (np.asarray(lengths), draw(st.integers(0, 2**31 - 1)),
            draw(st.sampled_from(POISONS)), draw(st.sampled_from(dtypes)))


def _log_softmax(z):
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _inputs(lengths, seed, poison):
    """``(clean, poisoned, mask)`` float64 NumPy inputs.

    Both share the valid entries; the clean padding holds finite random
    numbers, the poisoned padding ``poison`` (token ids: ``-1``).
    """
    rng = np.random.default_rng(seed)
    mask = np.arange(L)[None, :] < lengths[:, None]
    lp = np.log(rng.uniform(0.05, 1.0, (B, L)))
    clean = dict(
        lp=lp, old=lp + 0.3 * rng.normal(size=(B, L)),
        ref=lp + 0.3 * rng.normal(size=(B, L)),
        adv=rng.normal(size=(B, L)), values=rng.normal(size=(B, L + 1)),
        targets=rng.normal(size=(B, L)),
        old_values=rng.normal(size=(B, L)), rewards=rng.normal(size=(B, L)),
        next_values=rng.normal(size=(B, L)),
        logits=2.0 * rng.normal(size=(B, L, A)),
        q_logits=2.0 * rng.normal(size=(B, L, A)),
        p_log_probs=_log_softmax(rng.normal(size=(B, L, A))),
        q_log_probs=_log_softmax(rng.normal(size=(B, L, A))),
        tokens=rng.integers(0, A, (B, L)),
        terminated=rng.random((B, L)) < 0.2,
        truncated=rng.random((B, L)) < 0.2)
    poisoned = dict(clean)
    for name in TOKEN_INPUTS + LOGIT_INPUTS:
        x = clean[name].copy()
        if name == "values":   # V(s_0..s_L): V(s_n) is read, the rest not
            pad = np.arange(L + 1)[None, :] > lengths[:, None]
        else:
            pad = ~mask
        x[pad] = poison
        poisoned[name] = x
    poisoned["tokens"] = np.where(mask, clean["tokens"], -1)
    for name in TOKEN_INPUTS:  # the clean padding must differ from valid
        clean[name] = np.where(np.isfinite(poisoned[name]), clean[name],
                               clean[name] + 7.0)
    return clean, poisoned, mask


def _cast(inputs, dtype):
    out = {}
    for k, v in inputs.items():
        if k in TOKEN_INPUTS or k in LOGIT_INPUTS:
            out[k] = jnp.asarray(v, dtype)
        else:
            out[k] = jnp.asarray(v)
    return out


# --------------------------------------------------------------------------
# Every masked math function, as (value, gradients) in one program.
# --------------------------------------------------------------------------


def _functions():
    """``name -> f(x, mask)``; ``x`` holds the inputs named above."""
    agg = afn.aggregate_loss
    f = {}
    for mode in MODES:
        f[f"aggregate_{mode}"] = (
            lambda x, m, mode=mode: agg(x["lp"], m, mode=mode))
    f["policy_gradient_loss"] = lambda x, m: afn.policy_gradient_loss(
        x["lp"], x["adv"], mask=m)
    for level in ("token", "sequence"):
        f[f"importance_ratio_{level}"] = (
            lambda x, m, level=level: afn.importance_ratio(
                x["lp"], x["old"], level=level, mask=m))
        f[f"clipped_surrogate_{level}"] = (
            lambda x, m, level=level: afn.clipped_surrogate_loss(
                x["lp"], x["old"], x["adv"], clip_param_high=0.3,
                dual_clip=3.0, level=level, mask=m))
    f["clip_fraction"] = lambda x, m: afn.clip_fraction(
        afn.importance_ratio(x["lp"], x["old"], mask=m), mask=m)
    f["value_loss"] = lambda x, m: afn.value_loss(
        x["values"][:, :L], x["targets"], mask=m)
    f["value_loss_clipped_huber"] = lambda x, m: afn.value_loss(
        x["values"][:, :L], x["targets"], old_values=x["old_values"],
        value_clip_param=0.2, huber_delta=1.0, mask=m)
    for est in ("k1", "k2", "k3"):
        f[f"kl_estimate_{est}"] = (
            lambda x, m, est=est: afn.kl_estimate(x["lp"], x["ref"],
                                                  estimator=est, mask=m))
    f["entropy_from_logits"] = lambda x, m: afn.entropy_from_logits(
        x["logits"], mask=m)
    f["entropy_from_log_probs"] = lambda x, m: afn.entropy_from_log_probs(
        x["p_log_probs"], mask=m)
    f["kl_from_logits"] = lambda x, m: afn.kl_from_logits(
        x["logits"], x["q_logits"], mask=m)
    f["kl_from_log_probs"] = lambda x, m: afn.kl_from_log_probs(
        x["p_log_probs"], x["q_log_probs"], mask=m)
    f["token_log_probs"] = lambda x, m: afn.token_log_probs(
        x["logits"], x["tokens"], mask=m)
    f["token_log_probs_chunked_temperature"] = lambda x, m: (
        afn.token_log_probs(x["logits"], x["tokens"], mask=m, chunk_size=4,
                            temperature=0.7))
    f["sequence_log_probs"] = lambda x, m: afn.sequence_log_probs(x["lp"], m)
    f["sequence_log_probs_mean"] = lambda x, m: afn.sequence_log_probs(
        x["lp"], m, normalize=True)
    f["normalize_advantages"] = lambda x, m: afn.normalize_advantages(
        x["adv"], mask=m)
    f["normalize_advantages_rows"] = lambda x, m: afn.normalize_advantages(
        x["adv"], mask=m, axis=-1, ddof=1)
    for method in ("scan", "associative"):
        kw = dict(gamma=0.9, method=method, stop_target_gradients=False)
        f[f"discounted_returns_{method}"] = (
            lambda x, m, kw=kw: afn.discounted_returns(
                x["rewards"], terminated=x["terminated"],
                truncated=x["truncated"], mask=m, **kw))
        f[f"discounted_returns_next_values_{method}"] = (
            lambda x, m, kw=kw: afn.discounted_returns(
                x["rewards"], truncated=x["truncated"],
                next_values=x["next_values"], mask=m, **kw))
        for name, fn in (("gae", afn.gae_advantages),
                         ("lambda_returns", afn.lambda_returns)):
            f[f"{name}_plus_one_{method}"] = (
                lambda x, m, kw=kw, fn=fn: fn(
                    x["rewards"], x["values"], lambda_=0.8,
                    terminated=x["terminated"], truncated=x["truncated"],
                    mask=m, **kw))
            f[f"{name}_bootstrap_{method}"] = (
                lambda x, m, kw=kw, fn=fn: fn(
                    x["rewards"], x["values"][:, :L], lambda_=0.8,
                    bootstrap_value=x["values"][:, 0] * 0.5,
                    terminated=x["terminated"], mask=m, **kw))
            f[f"{name}_next_values_{method}"] = (
                lambda x, m, kw=kw, fn=fn: fn(
                    x["rewards"], x["values"][:, :L], lambda_=0.8,
                    next_values=x["next_values"], truncated=x["truncated"],
                    mask=m, **kw))
    return f


FUNCTIONS = _functions()
# clip_fraction is an indicator: it has no gradient to check.
NO_GRAD = ("clip_fraction",)


def _weights(shape):
    """Fixed, irregular cotangent weights of an output shape."""
    n = math.prod(shape)
    return (1.0 + jnp.arange(n, dtype=jnp.float32) % 7).reshape(shape) / 7.0


# The associative scan shares the padding clean-up with the sequential one
# (it runs before either); it is checked in float32 only, which keeps the
# bfloat16 and float64 programs small.
SCAN_ONLY = tuple(n for n in FUNCTIONS if not n.endswith("_associative"))


@functools.partial(jax.jit, static_argnames="names")
def _evaluate(x, mask, names=tuple(FUNCTIONS)):
    """``name -> (value, {input: gradient})`` for the named functions."""
    out = {}
    float_names = [k for k in TOKEN_INPUTS + LOGIT_INPUTS]
    for name in names:
        fn = FUNCTIONS[name]
        value = fn(x, mask)
        grads = {}
        if name not in NO_GRAD:
            def scalar(floats, fn=fn):
                y = fn(dict(x, **floats), mask).astype(jnp.float32)
                return jnp.sum(y * _weights(y.shape))
            grads = jax.grad(scalar)({k: x[k] for k in float_names})
            grads = {k: g for k, g in grads.items()}
        out[name] = (value, grads)
    return out


def _run(inputs, mask, dtype):
    """Evaluates on the host-side inputs in ``dtype`` (float64 under x64)."""
    x = _cast(inputs, dtype)
    names = tuple(FUNCTIONS) if dtype == jnp.float32 else SCAN_ONLY
    out = _evaluate(x, jnp.asarray(mask), names=names)
    return jax.tree_util.tree_map(
        lambda a: np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16
                             else a), out)


def _poisoned(lengths, seed, poison):
    """float32 results on the poisoned inputs, the clean inputs, the mask."""
    clean, poisoned, mask = _inputs(lengths, seed, poison)
    return _run(poisoned, mask, jnp.float32), clean, mask


def _both(lengths, seed, poison, dtype):
    clean, poisoned, mask = _inputs(lengths, seed, poison)
    if dtype == "float64":
        with jax.enable_x64(True):
            return (_run(clean, mask, jnp.float64),
                    _run(poisoned, mask, jnp.float64), clean, mask)
    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    return _run(clean, mask, dt), _run(poisoned, mask, dt), clean, mask


def _padding_of(name, lengths, mask):
    if name == "values":
        return np.arange(L + 1)[None, :] > lengths[:, None]
    if name in LOGIT_INPUTS:
        return np.broadcast_to(~mask[..., None], (B, L, A))
    return ~mask


@PROPERTY
@given(padded_batches())
def test_poisoned_padding_changes_nothing(case):
    """NaN, +inf or -inf in the padding: bit-identical values and
    gradients, finite everywhere, zero gradient on every padded entry."""
    lengths, seed, poison, dtype = case
    clean, poisoned, _, mask = _both(lengths, seed, poison, dtype)
    for name, (value, grads) in clean.items():
        p_value, p_grads = poisoned[name]
        assert np.all(np.isfinite(p_value)), (name, dtype, poison)
        np.testing.assert_array_equal(p_value, value, err_msg=name)
        for key, g in grads.items():
            pg = p_grads[key]
            assert np.all(np.isfinite(pg)), (name, key, dtype, poison)
            np.testing.assert_array_equal(pg, g, err_msg=f"{name} d{key}")
            pad = _padding_of(key, lengths, mask)
            assert np.all(pg[pad] == 0.0), (name, key)


@PROPERTY
@given(padded_batches(dtypes=("float32",)))
def test_padded_outputs_are_zero_and_equal_the_sliced_rows(case):
    """Per-token results are zero on padding; the sequence-level ones equal
    NumPy on the valid entries alone (the sliced rows)."""
    lengths, seed, poison, _ = case
    out, clean, mask = _poisoned(lengths, seed, poison)
    per_token = [n for n in FUNCTIONS if not n.startswith(
        ("aggregate", "sequence_log_probs", "importance_ratio"))]
    for name in per_token:
        assert np.all(out[name][0][~mask] == 0.0), name
    assert np.all(out["importance_ratio_token"][0][~mask] == 1.0)
    lp = clean["lp"]
    for mode in MODES:
        expected = aft.np_aggregate_loss(
            np.where(mask, lp, 0.0), mask, mode=mode)
        np.testing.assert_allclose(out[f"aggregate_{mode}"][0], expected,
                                   rtol=1e-5, atol=1e-6, err_msg=mode)
    for i, n in enumerate(lengths):
        row = lp[i, :n]
        np.testing.assert_allclose(out["sequence_log_probs"][0][i],
                                   row.sum(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["sequence_log_probs_mean"][0][i],
                                   row.mean() if n else 0.0, rtol=1e-5,
                                   atol=1e-6)
        if n:
            log_ratio = np.mean(row - clean["old"][i, :n])
            np.testing.assert_allclose(
                out["importance_ratio_sequence"][0][i, :n],
                np.exp(log_ratio), rtol=1e-5)
            adv_row = clean["adv"][i, :n]
            expected = np.zeros(n) if n < 2 or np.ptp(adv_row) == 0 else (
                (adv_row - adv_row.mean())
                / (adv_row.std(ddof=1) + 1e-8))
            np.testing.assert_allclose(
                out["normalize_advantages_rows"][0][i, :n], expected,
                rtol=1e-4, atol=1e-5)
    valid_adv = clean["adv"][mask]
    np.testing.assert_allclose(
        out["normalize_advantages"][0][mask],
        aft.np_normalize_advantages(valid_adv), rtol=1e-4, atol=1e-5)
    logits = clean["logits"]
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_softmax, clean["tokens"][..., None],
                                -1)[..., 0]
    np.testing.assert_allclose(out["token_log_probs"][0][mask],
                               picked[mask], rtol=1e-5, atol=1e-5)


@PROPERTY
@given(padded_batches(dtypes=("float32",)), st.sampled_from(("returns",
                                                            "lambda", "gae")))
def test_recursions_equal_the_sliced_rows(case, kind):
    """Returns, lambda-returns and GAE on a right-padded batch equal, row
    by row, the NumPy loops on the sliced rows, for T + 1 values
    (``V(s_L)`` read), T values with ``bootstrap_value`` and next values."""
    lengths, seed, poison, _ = case
    out, clean, mask = _poisoned(lengths, seed, poison)
    kw = dict(gamma=0.9)
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        r = clean["rewards"][i:i + 1, :n]
        term = clean["terminated"][i:i + 1, :n]
        trunc = clean["truncated"][i:i + 1, :n]
        nv = clean["next_values"][i:i + 1, :n]
        v = clean["values"][i:i + 1]
        for method in ("scan", "associative"):
            if kind == "returns":
                cases = {
                    "discounted_returns": aft.np_discounted_returns(
                        r, terminated=term, truncated=trunc, **kw),
                    "discounted_returns_next_values":
                        aft.np_discounted_returns(r, truncated=trunc,
                                                  next_values=nv, **kw)}
            else:
                fn = (aft.np_gae_advantages if kind == "gae" else
                      aft.np_lambda_returns)
                prefix = "gae" if kind == "gae" else "lambda_returns"
                cases = {
                    f"{prefix}_plus_one": fn(
                        r, v[:, :n + 1], lambda_=0.8, terminated=term,
                        truncated=trunc, **kw),
                    f"{prefix}_bootstrap": fn(
                        r, v[:, :n], lambda_=0.8, terminated=term,
                        bootstrap_value=v[:, 0] * 0.5, **kw),
                    f"{prefix}_next_values": fn(
                        r, v[:, :n], lambda_=0.8, truncated=trunc,
                        next_values=nv, **kw)}
            for name, expected in cases.items():
                got = out[f"{name}_{method}"][0][i, :n]
                np.testing.assert_allclose(got, expected[0], rtol=1e-4,
                                           atol=1e-4, err_msg=name)


# --------------------------------------------------------------------------
# Algorithm updates.
# --------------------------------------------------------------------------

D, V = 3, 5   # observation features, vocabulary / actions


def _token_policy(params, obs):
    return obs @ params["w"]


def _actor_critic(params, obs):
    return obs @ params["w"], obs @ params["v"]


def _algo_params():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(D, V)), jnp.float32),
            "v": jnp.asarray(rng.normal(size=(D,)), jnp.float32)}


def _grpo_state(micro):
    cfg = afn.grpo.GRPOConfig(num_generations=2, beta=0.1,
                              loss_aggregation="grpo",
                              num_micro_batches=micro, policy=_token_policy,
                              optimizer=optax.sgd(0.1), max_grad_norm=1.0)
    return afn.grpo.init(_algo_params(), cfg)


ALGOS = {
    "grpo": lambda: _grpo_state(1),
    "grpo_micro_batches": lambda: _grpo_state(2),
    "grpo_reference_params": lambda: afn.grpo.init(
        _algo_params(), afn.grpo.GRPOConfig(
            num_generations=2, policy=_token_policy,
            optimizer=optax.sgd(0.1)),
        ref_params=jax.tree_util.tree_map(lambda p: 0.5 * p,
                                          _algo_params())),
    "ppo": lambda: afn.ppo.init(_algo_params(), afn.ppo.PPOConfig(
        num_minibatches=2, policy=_actor_critic, optimizer=optax.sgd(0.1),
        value_clip_param=0.2)),
    "reinforce": lambda: afn.reinforce.init(
        _algo_params(), afn.reinforce.REINFORCEConfig(
            baseline="mean", policy=_token_policy, optimizer=optax.sgd(0.1))),
    "dpo": lambda: afn.dpo.init(
        _algo_params(), afn.dpo.DPOConfig(policy=_token_policy,
                                          optimizer=optax.sgd(0.1)),
        ref_params=jax.tree_util.tree_map(lambda p: 0.5 * p,
                                          _algo_params())),
    "simpo": lambda: afn.dpo.init(_algo_params(), afn.dpo.DPOConfig(
        reference_free=True, policy=_token_policy, optimizer=optax.sgd(0.1))),
}
UPDATES = {"grpo": afn.grpo.update, "ppo": afn.ppo.update,
           "reinforce": afn.reinforce.update, "dpo": afn.dpo.update,
           "simpo": afn.dpo.update}
BA = 4   # rows of an algorithm batch (2 groups of 2 for GRPO)


def _algo_batch(algo, lengths, seed, poison):
    """``(clean, poisoned)`` batches of ``BA`` rows of ``L`` tokens."""
    rng = np.random.default_rng(seed)
    mask = np.arange(L)[None, :] < lengths[:, None]
    pad = ~mask

    def floats(*shape, scale=1.0):
        return (scale * rng.normal(size=shape)).astype(np.float32)

    def pair(x, fill):
        bad = np.array(x, copy=True)
        bad[pad] = fill
        return x, bad

    obs, obs_p = pair(floats(BA, L, D), poison)
    act, act_p = pair(rng.integers(0, V, (BA, L)), -1)
    if algo in ("dpo", "simpo"):
        act2, act2_p = pair(rng.integers(0, V, (BA, L)), -1)
        side = lambda o, a: dict(observations=o, actions=a, mask=mask)
        return (dict(chosen=side(obs, act), rejected=side(obs, act2)),
                dict(chosen=side(obs_p, act_p), rejected=side(obs_p, act2_p)))
    lp, lp_p = pair(np.log(rng.uniform(0.1, 1, (BA, L))).astype(np.float32),
                    poison)
    rewards, rewards_p = pair(floats(BA, L), poison)
    if algo.startswith("grpo"):
        clean = dict(observations=obs, actions=act, log_probs=lp, mask=mask,
                     rewards=floats(BA))
        poisoned = dict(clean, observations=obs_p, actions=act_p,
                        log_probs=lp_p)
        if algo != "grpo_reference_params":
            ref, ref_p = pair(lp + floats(BA, L, scale=0.2), poison)
            clean["ref_log_probs"], poisoned["ref_log_probs"] = ref, ref_p
        return clean, poisoned
    if algo == "reinforce":
        clean = dict(observations=obs, actions=act, rewards=rewards,
                     mask=mask, dones=np.zeros((BA, L), bool))
        return clean, dict(clean, observations=obs_p, actions=act_p,
                           rewards=rewards_p)
    values = floats(BA, L + 1)
    values_p = values.copy()
    values_p[np.arange(L + 1)[None, :] > lengths[:, None]] = poison
    dones = rng.random((BA, L)) < 0.2
    clean = dict(observations=obs, actions=act, rewards=rewards,
                 log_probs=lp, values=values, dones=dones, mask=mask)
    return clean, dict(clean, observations=obs_p, actions=act_p,
                       rewards=rewards_p, log_probs=lp_p, values=values_p)


@functools.lru_cache(maxsize=None)
def _jitted_update(algo):
    return jax.jit(UPDATES[algo.split("_")[0]])


@pytest.mark.parametrize("algo", ALGOS)
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, L), min_size=BA, max_size=BA),
       st.integers(0, 2**31 - 1), st.sampled_from(POISONS))
def test_update_ignores_what_the_padding_holds(algo, lengths, seed, poison):
    """One update with NaN or inf in every padded input (observations,
    log-probs, reference log-probs, rewards, values; token ids -1) gives
    bit for bit the parameters and metrics of the clean batch."""
    lengths = np.asarray(lengths)
    state = ALGOS[algo]()
    clean, poisoned = _algo_batch(algo, lengths, seed, poison)
    update = _jitted_update(algo)
    s1, m1 = update(state, clean)
    s2, m2 = update(state, poisoned)
    for leaf1, leaf2 in zip(jax.tree_util.tree_leaves(s1.params),
                            jax.tree_util.tree_leaves(s2.params)):
        assert np.all(np.isfinite(leaf2)), algo
        np.testing.assert_array_equal(leaf2, leaf1)
    for key in m1:
        assert np.isfinite(m2[key]), (algo, key)
        np.testing.assert_array_equal(m2[key], m1[key], err_msg=key)


# --------------------------------------------------------------------------
# Advantage normalisers at extreme spreads.
# --------------------------------------------------------------------------


@jax.jit
def _normalisers(x, eps):
    """Values and gradients of the three normalisers (groups of 4)."""
    fns = dict(
        global_=lambda v: afn.normalize_advantages(v, eps=eps),
        group=lambda v: afn.group_advantages(v, group_size=4,
                                             eps=eps).advantages,
        batch=lambda v: afn.group_advantages(v, group_size=4, eps=eps,
                                             scale="batch").advantages)
    values = {k.rstrip("_"): f(x) for k, f in fns.items()}
    grads = {k.rstrip("_"): jax.grad(lambda v, f=f: jnp.sum(
        f(v) * _weights(x.shape)))(x) for k, f in fns.items()}
    return values, grads


def _np_standardize(x, eps=0.0):
    x = np.asarray(x, np.float64)
    return (x - x.mean()) / (x.std() + eps)


@settings(max_examples=40, deadline=None)
@given(st.integers(-30, 30), st.integers(0, 2**31 - 1),
       st.sampled_from((0.0, 1e-8)))
def test_normalisers_are_right_at_any_scale(exponent, seed, eps):
    """normalize_advantages and group_advantages of ``x * 10^k`` for
    ``|k| <= 30`` in float32: the float64 formula's values (``eps``
    included), finite gradients. Squaring such spreads directly
    overflows (``1e20^2``) or underflows (``1e-20^2``) in float32."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=8)
    x = (base * 10.0 ** exponent).astype(np.float32)
    values, grads = _normalisers(jnp.asarray(x), jnp.float32(eps))
    np.testing.assert_allclose(values["global"], _np_standardize(x, eps),
                               rtol=2e-4, atol=2e-5)
    for g in range(2):
        part = x[4 * g:4 * g + 4]
        np.testing.assert_allclose(values["group"][4 * g:4 * g + 4],
                                   _np_standardize(part, eps), rtol=2e-4,
                                   atol=2e-5)
    for name, grad in grads.items():
        assert np.all(np.isfinite(grad)), (name, exponent)


@pytest.mark.parametrize("x, what", [
    (np.array([1e-37, 0, 0, 0], np.float32), "near the smallest"),
    (np.array([1.1754944e-38, 0, 0, 0], np.float32), "std below normal"),
    (np.array([1e-40, 0, 0, 0], np.float32), "subnormal"),
    (np.array([3e38, -3e38, 1e38, 0], np.float32), "near the largest"),
    (np.array([1e20, 1e20 + 1, 1e20, 1e20], np.float32), "lost spread"),
])
def test_normalisers_at_the_edges_of_float32_are_finite(x, what):
    """Spreads at the ends of the float32 range: a finite answer (the
    formula's where it is representable, zeros where the documented
    rule treats the values as equal) and finite gradients."""
    for eps in (0.0, 1e-6):
        values, grads = _normalisers(jnp.asarray(x), jnp.float32(eps))
        for name in values:
            assert np.all(np.isfinite(values[name])), (what, name, eps)
            assert np.all(np.isfinite(grads[name])), (what, name, eps)
    out = np.asarray(_normalisers(jnp.asarray(x),
                                  jnp.float32(0.0))[0]["global"])
    if what in ("near the smallest", "near the largest"):
        np.testing.assert_allclose(out, _np_standardize(
            x.astype(np.float64)), rtol=1e-5, atol=1e-6)
    else:   # below the normal range, or equal after rounding: constant
        assert np.all(out == 0.0)
        assert bool(afn.group_advantages(jnp.asarray(x),
                                         group_size=4).zero_std[0])
