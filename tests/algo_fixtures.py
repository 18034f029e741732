"""Tiny policies, batches and NumPy helpers shared by the algorithm tests.

Policies are linear maps over one-hot observations, so every log-probability
and entropy can be recomputed by hand in NumPy.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import artifex_fn as afn

N_OBS = 4
N_ACT = 4


def examples(n: int, ci_share: int = 2) -> int:
    """Hypothesis examples of the heaviest property tests: ``n`` locally
    (random examples, which keep looking for new counterexamples), a
    ``ci_share``-th of them under CI (the derandomized profile of
    ``tests/conftest.py``: the same examples on every run, fewer of them
    to keep the suite in its time budget)."""
    ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
    return max(5, n // ci_share) if ci else n

# Python-level calls of each policy. Under ``jax.jit`` a policy runs only
# while tracing, so an unchanged count across calls means no retrace.
POLICY_CALLS = collections.Counter()

# One optimiser object per kind, shared by the tests so that jitted updates
# with equal static config parts reuse their compilations.
ADAM = optax.adam(0.05)
SGD = optax.sgd(1.0)


def linear_policy(params, obs):
    """Logits ``obs @ w + b`` of a categorical policy."""
    POLICY_CALLS["linear_policy"] += 1
    return obs @ params["w"] + params["b"]


def actor_critic(params, obs):
    """``(logits, value)`` with a linear value head."""
    POLICY_CALLS["actor_critic"] += 1
    return obs @ params["w"] + params["b"], obs @ params["v"]


def init_params(seed=0, n_obs=N_OBS, n_act=N_ACT, scale=0.5):
    """Random float32 parameters of :func:`linear_policy`/:func:`actor_critic`.
    """
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(scale * rng.standard_normal((n_obs, n_act)),
                         jnp.float32),
        "b": jnp.asarray(scale * rng.standard_normal(n_act), jnp.float32),
        "v": jnp.asarray(scale * rng.standard_normal(n_obs), jnp.float32),
    }


def one_hot(idx, n=N_OBS):
    """float32 one-hot vectors; NumPy indices are encoded on the host."""
    if isinstance(idx, (np.ndarray, list, tuple)):
        return jnp.asarray(np.eye(n, dtype=np.float32)[np.asarray(idx)])
    return jax.nn.one_hot(idx, n, dtype=jnp.float32)


def np_sample(log_probs, rng):
    """Samples one index per row of ``[..., K]`` log-probabilities."""
    cdf = np.cumsum(np.exp(log_probs), axis=-1)
    u = rng.random(cdf.shape[:-1] + (1,)) * cdf[..., -1:]
    return np.minimum((cdf < u).sum(-1), cdf.shape[-1] - 1)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def np_logits(params, obs_idx):
    """Logits of :func:`linear_policy` for integer observations."""
    w = np.asarray(params["w"], np.float64)
    b = np.asarray(params["b"], np.float64)
    return w[np.asarray(obs_idx)] + b


def np_log_prob_entropy(params, obs_idx, actions):
    """Log-probabilities of ``actions`` and entropies, in float64."""
    logp_all = np_log_softmax(np_logits(params, obs_idx))
    actions = np.asarray(actions)
    logp = np.take_along_axis(logp_all, actions[..., None], axis=-1)[..., 0]
    entropy = -np.sum(np.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def np_values(params, obs_idx):
    return np.asarray(params["v"], np.float64)[np.asarray(obs_idx)]


def stack_trees(trees):
    """Stacks pytrees (states) along a new leading axis."""
    return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)


def tree_index(tree, i):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, (ta, tb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                                   atol=atol)


def assert_all_finite(tree):
    for leaf in jax.tree_util.tree_leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf))), leaf


# --------------------------------------------------------------------------
# One small problem per algorithm, used by the shared contract tests.
# --------------------------------------------------------------------------

# Every problem uses B = 8 rows of T = L = 6 steps or tokens, so that
# compiled programs (and eager primitives) are shared between tests.
B, T = 8, 6
G = 4
L = T


def lengths_mask(lengths, length=T):
    """``[n, length]`` float mask with ``lengths[i]`` leading ones."""
    lengths = np.asarray(lengths)
    return jnp.asarray(np.arange(length)[None] < lengths[:, None],
                       jnp.float32)


def _rng(seed):
    return np.random.default_rng(seed)


def reinforce_problem(seed=0):
    """``(config, params, batch)``: ``[B, T]`` rewards with dones and mask."""
    rng = _rng(seed)
    obs = rng.integers(0, N_OBS, (B, T))
    batch = dict(
        observations=one_hot(obs),
        actions=jnp.asarray(rng.integers(0, N_ACT, (B, T))),
        rewards=jnp.asarray(rng.standard_normal((B, T)), jnp.float32),
        dones=jnp.asarray(rng.random((B, T)) < 0.2),
        mask=lengths_mask([6, 5, 6, 3, 6, 1, 4, 6]))
    cfg = afn.reinforce.REINFORCEConfig(policy=linear_policy, optimizer=ADAM,
                                        entropy_coeff=0.05)
    return cfg, init_params(seed), batch


def ppo_problem(seed=0):
    """``(config, params, batch)`` with stale log-probs so that clipping acts.

    Three epochs of two minibatches over ``B * T = 48`` samples, some of
    them padding.
    """
    rng = _rng(seed)
    obs = rng.integers(0, N_OBS, (B, T))
    actions = rng.integers(0, N_ACT, (B, T))
    params = init_params(seed)
    logp, _ = np_log_prob_entropy(params, obs, actions)
    batch = dict(
        observations=one_hot(obs), actions=jnp.asarray(actions),
        rewards=jnp.asarray(rng.standard_normal((B, T)), jnp.float32),
        values=jnp.asarray(rng.standard_normal((B, T + 1)), jnp.float32),
        log_probs=jnp.asarray(logp + rng.normal(0, 0.4, (B, T)), jnp.float32),
        dones=jnp.asarray(rng.random((B, T)) < 0.2),
        mask=lengths_mask([6, 4, 6, 5, 6, 6, 2, 6]))
    cfg = afn.ppo.PPOConfig(policy=actor_critic, optimizer=ADAM,
                            num_epochs=3, num_minibatches=2)
    return cfg, params, batch


def token_obs(batch_size, length=L):
    """One-hot position observations ``[batch_size, length, N_OBS]``."""
    pos = np.broadcast_to(np.arange(length) % N_OBS, (batch_size, length))
    return pos, one_hot(np.array(pos))


def grpo_problem(seed=0):
    """``(config, params, batch)``: token-level log-probs, mask, reference."""
    rng = _rng(seed)
    n = B
    pos, obs = token_obs(n)
    actions = rng.integers(0, N_ACT, (n, L))
    params = init_params(seed)
    logp, _ = np_log_prob_entropy(params, pos, actions)
    mask = lengths_mask(rng.integers(1, L + 1, n))
    batch = dict(
        observations=obs, actions=jnp.asarray(actions),
        rewards=jnp.asarray(rng.standard_normal(n), jnp.float32),
        log_probs=jnp.asarray(logp + rng.normal(0, 0.4, (n, L)), jnp.float32),
        ref_log_probs=jnp.asarray(logp + rng.normal(0, 0.3, (n, L)),
                                  jnp.float32),
        mask=mask)
    cfg = afn.grpo.GRPOConfig(policy=linear_policy, optimizer=ADAM,
                              num_generations=G, beta=0.1)
    return cfg, params, batch


def dpo_problem(seed=0):
    """``(config, params, batch)``: nested responses, reference log-probs."""
    rng = _rng(seed)
    pos, obs = token_obs(B)

    def side():
        return dict(observations=obs,
                    actions=jnp.asarray(rng.integers(0, N_ACT, (B, L))),
                    mask=lengths_mask(rng.integers(1, L + 1, B)))

    batch = dict(chosen=side(), rejected=side(),
                 ref_chosen_log_probs=jnp.asarray(
                     rng.normal(-5.0, 1.0, B), jnp.float32),
                 ref_rejected_log_probs=jnp.asarray(
                     rng.normal(-5.0, 1.0, B), jnp.float32))
    cfg = afn.dpo.DPOConfig(policy=linear_policy, optimizer=ADAM, beta=0.5)
    return cfg, init_params(seed), batch


PROBLEMS = {
    "reinforce": (afn.reinforce, reinforce_problem),
    "ppo": (afn.ppo, ppo_problem),
    "grpo": (afn.grpo, grpo_problem),
    "dpo": (afn.dpo, dpo_problem),
}


def with_fields(config, **fields):
    return dataclasses.replace(config, **fields)


def _sampling_logits(model, prompts, completion, prompt_mask, *, temperature,
                     top_k, top_p):
    """The sampling distribution's logits of every completion step."""
    logits = afn.sampling.completion_logits(model, prompts, completion,
                                            prompt_mask)
    return afn.sampling.transform_logits(logits, temperature=temperature,
                                         top_k=top_k, top_p=top_p)


# One compiled program, for a process where the operations of the eager
# path are not compiled yet (``distributed_worker.py``: 3.7 s less); in
# the test session they are, and each sampler's program would compile anew.
_compiled_sampling_logits = nnx.jit(
    _sampling_logits, static_argnames=("temperature", "top_k", "top_p"))


def draw_margin(model, prompts, prompt_mask, out, key, *, temperature=1.0,
                top_k=None, top_p=None, compiled=False):
    """How far each draw of :func:`artifex_fn.sampling.generate` was from
    drawing another token: the smallest distance, relative to the total
    probability, between ``u * total`` and a CDF boundary of the step's
    sampling distribution, over the steps that were drawn (``out.mask``).
    Logits are recomputed without the cache; a margin far above float32
    rounding means two samplers with logits equal to 1e-5 draw the same
    tokens from the same key. ``compiled``: the logits in one jitted
    program instead of op by op."""
    logits = _compiled_sampling_logits if compiled else _sampling_logits
    x = np.asarray(logits(model, prompts, out.tokens, prompt_mask,
                          temperature=temperature, top_k=top_k, top_p=top_p),
                   np.float64)
    cdf = np.cumsum(np.exp(x - x.max(-1, keepdims=True)), -1)
    cdf /= cdf[..., -1:]
    margin = np.inf
    for i in range(x.shape[1]):
        u = 1.0 - np.asarray(jax.random.uniform(
            jax.random.fold_in(key, i), (x.shape[0], 1)), np.float64)
        dist = np.abs(cdf[:, i] - u).min(-1)
        active = np.asarray(out.mask)[:, i] > 0
        if active.any():
            margin = min(margin, dist[active].min())
    return margin
