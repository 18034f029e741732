"""Benchmark: memory and step time of one GRPO update against one PPO update.

A common rule of thumb says GRPO needs about half of PPO's memory because it
has no value network. This script measures it on the same small token
policy for both algorithms.

Model. A per-token network: token embedding ``[V, H]`` plus position
embedding ``[L, H]``, ``DEPTH`` dense layers of width ``H`` (GELU), and a
``[H, V]`` output head giving logits ``[..., V]``. The observation of step
``t`` is ``(previous token, t)``, so the same network maps GRPO's
``[B, L]`` observations and PPO's flattened ``[B * L]`` minibatches; the
policy parameters are identical (same structure, same initialisation) in
every variant.

Variants:

* ``grpo``: the policy only. The reference log-probs are given in the
  batch (``ref_log_probs``), so no reference parameters are held.
* ``grpo+ref``: as ``grpo``, but the state holds frozen reference
  parameters (a copy of the policy) and ``update`` scores the reference
  log-probs itself, which is what a self-contained GRPO step costs.
* ``ppo-shared``: actor-critic sharing the trunk; the value is a ``[H, 1]``
  head on the policy trunk.
* ``ppo-sep``: the usual PPO setup with a critic as large as the actor: a
  separate value network with its own embeddings and ``DEPTH`` dense layers
  of width ``H`` and a ``[H, 1]`` head.

PPO treats each token as a time step: ``rewards``, ``log_probs``, ``dones``
are ``[B, L]``, ``values`` is ``[B, L]`` with ``bootstrap_value [B]``. PPO
runs with ``num_epochs=1, num_minibatches=1``, so one PPO ``update`` is one
gradient step on the same ``B * L`` tokens as one GRPO ``update`` (plus
GAE and the shuffle of the samples). GRPO uses ``rewards [B]`` with groups
of ``GROUP_SIZE`` contiguous samples and ``mask [B, L]``. Both use
``optax.adam``, entropy bonus 0.01 and gradient clipping at global norm 0.5
(PPO's defaults), and float32 throughout.

Measurements per variant:

* ``memory_analysis()`` of ``jax.jit(update).lower(state, batch).compile()``:
  argument, output and temporary bytes, and their sum (no buffer donation,
  so the sum is the footprint of one step: inputs, outputs and scratch).
  XLA may place scratch values in output buffers that are not yet live, so
  the temporary bytes alone can shrink when the outputs grow; compare the
  totals.
* ``params`` / ``state``: bytes of the parameters, and of the parameters plus
  the optimiser state (sum of the leaves' ``nbytes``).
* compile time (``lower`` + ``compile``) and the median latency of the
  compiled step over several calls after one warm-up call, each blocked on
  with ``block_until_ready()``. The variants of one size are timed in
  interleaved rounds (one call each per round, rotating the order) so that
  background load affects them alike.

Ratios are GRPO (``grpo``, reference log-probs in the batch) over the row's
variant. Memory numbers come from XLA's buffer assignment for the current
backend (CPU unless a GPU is visible); they are exact for the compiled
program, not a process RSS measurement.

Usage::

    python benchmarks/bench_algorithms.py [--quick] [--repeats N]
        [--sizes HxTOKENS ...]

``--quick`` runs one size without ``grpo+ref``. The exit status is 0
whatever the ratios are: this is a report.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

import artifex_fn as afn

VOCAB = 512
DEPTH = 2
SEQ_LEN = 64
GROUP_SIZE = 8
LEARNING_RATE = 3e-4
MB = 1024.0 ** 2

# (H, number of tokens B * L).
SIZES = ((256, 4096), (1024, 4096))
QUICK_SIZES = ((512, 2048),)


# --------------------------------------------------------------------------
# Model.
# --------------------------------------------------------------------------

def _init_trunk(key, hidden):
    keys = jax.random.split(key, DEPTH + 2)
    params = dict(
        tok=0.02 * jax.random.normal(keys[0], (VOCAB, hidden), jnp.float32),
        pos=0.02 * jax.random.normal(keys[1], (SEQ_LEN, hidden), jnp.float32),
        layers=[])
    for k in keys[2:]:
        params["layers"].append(dict(
            w=jax.random.normal(k, (hidden, hidden), jnp.float32)
            / np.sqrt(hidden),
            b=jnp.zeros((hidden,), jnp.float32)))
    return params


def _init_head(key, hidden, out):
    return dict(w=jax.random.normal(key, (hidden, out), jnp.float32)
                / np.sqrt(hidden),
                b=jnp.zeros((out,), jnp.float32))


def _trunk(params, obs):
    h = params["tok"][obs["tokens"]] + params["pos"][obs["positions"]]
    for layer in params["layers"]:
        h = jax.nn.gelu(h @ layer["w"] + layer["b"])
    return h


def _head(params, h):
    return h @ params["w"] + params["b"]


def _init_policy(key, hidden):
    k_trunk, k_head = jax.random.split(key)
    return dict(trunk=_init_trunk(k_trunk, hidden),
                head=_init_head(k_head, hidden, VOCAB))


def policy_logits(params, obs):
    """Logits ``[..., V]`` for observations with any leading shape."""
    return _head(params["head"], _trunk(params["trunk"], obs))


def actor_critic_separate(params, obs):
    value = _head(params["critic"]["head"],
                  _trunk(params["critic"]["trunk"], obs))
    return policy_logits(params["actor"], obs), value[..., 0]


def actor_critic_shared(params, obs):
    h = _trunk(params["actor"]["trunk"], obs)
    logits = _head(params["actor"]["head"], h)
    return logits, _head(params["value_head"], h)[..., 0]


# --------------------------------------------------------------------------
# Variants: (config, state, batch) for a given size.
# --------------------------------------------------------------------------

def _tree_bytes(tree):
    return sum(int(np.asarray(leaf).nbytes)
               for leaf in jax.tree_util.tree_leaves(tree))


def _tree_size(tree):
    return sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


def _rollout(hidden, tokens, seed):
    """Shared synthetic rollout: observations, actions and old log-probs."""
    batch = tokens // SEQ_LEN
    rng = np.random.default_rng(seed)
    actions = rng.integers(0, VOCAB, (batch, SEQ_LEN)).astype(np.int32)
    previous = np.concatenate(
        [np.zeros((batch, 1), np.int32), actions[:, :-1]], axis=1)
    positions = np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32),
                                (batch, SEQ_LEN))
    obs = dict(tokens=jnp.asarray(previous),
               positions=jnp.asarray(np.ascontiguousarray(positions)))
    actions = jnp.asarray(actions)
    policy_params = _init_policy(jax.random.PRNGKey(seed), hidden)

    @jax.jit
    def score(params):
        logp = jax.nn.log_softmax(policy_logits(params, obs))
        return jnp.take_along_axis(logp, actions[..., None], -1)[..., 0]

    old = score(policy_params)
    noise = 0.01 * rng.standard_normal(old.shape).astype(np.float32)
    lengths = rng.integers(SEQ_LEN // 2, SEQ_LEN + 1, batch)
    mask = (np.arange(SEQ_LEN)[None, :] < lengths[:, None]).astype(np.float32)
    return dict(obs=obs, actions=actions, log_probs=old,
                ref_log_probs=old + jnp.asarray(noise), mask=jnp.asarray(mask),
                policy_params=policy_params, rng=rng, batch=batch)


def _grpo(roll, with_ref_params):
    cfg = afn.grpo.GRPOConfig(
        policy=policy_logits, optimizer=optax.adam(LEARNING_RATE),
        num_generations=GROUP_SIZE, beta=0.04, max_grad_norm=0.5)
    rewards = roll["rng"].standard_normal(roll["batch"]).astype(np.float32)
    batch = dict(observations=roll["obs"], actions=roll["actions"],
                 log_probs=roll["log_probs"], mask=roll["mask"],
                 rewards=jnp.asarray(rewards))
    params = roll["policy_params"]
    if with_ref_params:
        ref = jax.tree_util.tree_map(jnp.copy, params)
        return afn.grpo.init(params, cfg, ref_params=ref), batch
    batch["ref_log_probs"] = roll["ref_log_probs"]
    return afn.grpo.init(params, cfg), batch


def _ppo(roll, hidden, shared, seed):
    key = jax.random.PRNGKey(seed + 1)
    k_critic, k_value = jax.random.split(key)
    if shared:
        params = dict(actor=roll["policy_params"],
                      value_head=_init_head(k_value, hidden, 1))
        fn = actor_critic_shared
    else:
        params = dict(actor=roll["policy_params"],
                      critic=dict(trunk=_init_trunk(k_critic, hidden),
                                  head=_init_head(k_value, hidden, 1)))
        fn = actor_critic_separate
    cfg = afn.ppo.PPOConfig(policy=fn, optimizer=optax.adam(LEARNING_RATE),
                            num_epochs=1, num_minibatches=1)
    rng, b = roll["rng"], roll["batch"]
    rewards = 0.1 * rng.standard_normal((b, SEQ_LEN)).astype(np.float32)
    values = rng.standard_normal((b, SEQ_LEN)).astype(np.float32)
    # Each sequence ends at its last valid token; padding is masked out.
    mask = np.asarray(roll["mask"])
    last = mask.sum(axis=1).astype(np.int64) - 1
    dones = np.zeros((b, SEQ_LEN), np.float32)
    dones[np.arange(b), last] = 1.0
    batch = dict(observations=roll["obs"], actions=roll["actions"],
                 log_probs=roll["log_probs"], mask=roll["mask"],
                 rewards=jnp.asarray(rewards), values=jnp.asarray(values),
                 bootstrap_value=jnp.zeros((b,), jnp.float32),
                 dones=jnp.asarray(dones))
    return afn.ppo.init(params, cfg), batch


VARIANTS = ("grpo", "grpo+ref", "ppo-shared", "ppo-sep")
QUICK_VARIANTS = ("grpo", "ppo-shared", "ppo-sep")


def _build(variant, hidden, tokens, seed):
    roll = _rollout(hidden, tokens, seed)
    if variant == "grpo":
        return afn.grpo.update, *_grpo(roll, with_ref_params=False)
    if variant == "grpo+ref":
        return afn.grpo.update, *_grpo(roll, with_ref_params=True)
    if variant == "ppo-shared":
        return afn.ppo.update, *_ppo(roll, hidden, True, seed)
    if variant == "ppo-sep":
        return afn.ppo.update, *_ppo(roll, hidden, False, seed)
    raise ValueError(variant)


# --------------------------------------------------------------------------
# Measurement.
# --------------------------------------------------------------------------

@dataclass
class Result:
    variant: str
    hidden: int
    tokens: int
    num_params: int
    param_bytes: int
    state_bytes: int
    arg_bytes: int | None
    out_bytes: int | None
    temp_bytes: int | None
    compile_s: float
    step_ms: float

    @property
    def total_bytes(self) -> int | None:
        parts = (self.arg_bytes, self.out_bytes, self.temp_bytes)
        if any(p is None for p in parts):
            return None
        return sum(parts)


def _mem_field(analysis, name):
    if analysis is None:
        return None
    value = getattr(analysis, name, None)
    return None if value is None else int(value)


def _compile(variant, hidden, tokens, seed):
    """Builds and compiles one variant; returns (Result, step function)."""
    update, state, batch = _build(variant, hidden, tokens, seed)
    start = time.perf_counter()
    compiled = jax.jit(update).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    try:
        analysis = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        analysis = None

    def step():
        jax.block_until_ready(compiled(state, batch))

    step()  # warm-up
    params = state.params
    result = Result(
        variant=variant, hidden=hidden, tokens=tokens,
        num_params=_tree_size(params), param_bytes=_tree_bytes(params),
        state_bytes=_tree_bytes(params) + _tree_bytes(state.opt_state),
        arg_bytes=_mem_field(analysis, "argument_size_in_bytes"),
        out_bytes=_mem_field(analysis, "output_size_in_bytes"),
        temp_bytes=_mem_field(analysis, "temp_size_in_bytes"),
        compile_s=compile_s, step_ms=float("nan"))
    return result, step


def _time_interleaved(steps, repeats, budget_s):
    """Median seconds per step of each function, measured in rounds.

    Every round times one call of each function, rotating the order, so
    that background load affects all of them alike. Stops after
    ``repeats`` rounds, or earlier (after at least 3) once ``budget_s`` is
    spent.
    """
    samples = [[] for _ in steps]
    started = time.perf_counter()
    n = len(steps)
    for r in range(repeats):
        for k in range(n):
            i = (r + k) % n
            start = time.perf_counter()
            steps[i]()
            samples[i].append(time.perf_counter() - start)
        if r + 1 >= 3 and time.perf_counter() - started > budget_s:
            break
    return [float(np.median(s)) for s in samples], len(samples[0])


def _mb(value):
    return "n/a" if value is None else f"{value / MB:.1f}"


def _ratio(num, den):
    if num is None or den is None or den == 0:
        return "n/a"
    return f"{num / den:.2f}"


def _print_table(results):
    header = ("variant", "H", "tokens", "params", "params MB", "state MB",
              "arg MB", "out MB", "temp MB", "total MB", "compile s",
              "step ms", "GRPO/x total", "GRPO/x state", "GRPO/x time")
    base = {(r.hidden, r.tokens): r for r in results if r.variant == "grpo"}
    lines = []
    for r in results:
        g = base[(r.hidden, r.tokens)]
        lines.append((
            r.variant, str(r.hidden), str(r.tokens),
            f"{r.num_params / 1e6:.2f}M", _mb(r.param_bytes),
            _mb(r.state_bytes), _mb(r.arg_bytes), _mb(r.out_bytes),
            _mb(r.temp_bytes), _mb(r.total_bytes), f"{r.compile_s:.2f}",
            f"{r.step_ms:.1f}", _ratio(g.total_bytes, r.total_bytes),
            _ratio(g.state_bytes, r.state_bytes),
            _ratio(g.step_ms, r.step_ms)))
    widths = [max(len(h), *(len(line[i]) for line in lines))
              for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    previous = None
    for r, line in zip(results, lines):
        if previous is not None and (r.hidden, r.tokens) != previous:
            print()
        previous = (r.hidden, r.tokens)
        print(fmt(line))


def _parse_size(text):
    try:
        hidden, tokens = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected HxTOKENS, e.g. 1024x4096, got {text!r}") from None
    if hidden < 1 or tokens < 1 or tokens % (SEQ_LEN * GROUP_SIZE):
        raise argparse.ArgumentTypeError(
            f"H must be >= 1 and TOKENS a multiple of "
            f"{SEQ_LEN * GROUP_SIZE} (L x group size), got {text!r}")
    return hidden, tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes, no grpo+ref, fewer calls")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per size after one warm-up call "
                             "(default 5, 3 with --quick; fewer, but at "
                             "least 3, where the time budget caps it)")
    parser.add_argument("--sizes", type=_parse_size, nargs="+", default=None,
                        metavar="HxTOKENS",
                        help="hidden widths and token counts B*L "
                             "(default: " + " ".join(
                                 f"{h}x{t}" for h, t in SIZES) + ")")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    variants = QUICK_VARIANTS if args.quick else VARIANTS
    budget_s = 2.0 if args.quick else 8.0  # timing per size

    device = jax.devices()[0]
    print(f"jax {jax.__version__}, optax {optax.__version__}, "
          f"artifex_fn {afn.__version__}, numpy {np.__version__}, "
          f"python {platform.python_version()}")
    print(f"backend: {jax.default_backend()}, device: {device} "
          f"({device.device_kind}), host CPUs: {os.cpu_count()}")
    print(f"model: embed(V={VOCAB}) + pos(L={SEQ_LEN}) -> {DEPTH} x "
          f"dense(H) GELU -> head; float32, adam; GRPO group size "
          f"{GROUP_SIZE}; PPO num_epochs=1, num_minibatches=1")
    print("memory: compiled memory_analysis() of jit(update), no donation; "
          "total = arg + out + temp; state = params + optimiser state")
    print()

    started = time.perf_counter()
    results, notes = [], []
    for seed, (hidden, tokens) in enumerate(sizes):
        compiled = [_compile(v, hidden, tokens, seed) for v in variants]
        medians, rounds = _time_interleaved([step for _, step in compiled],
                                            repeats, budget_s)
        for (result, _), median in zip(compiled, medians):
            result.step_ms = median * 1e3
            results.append(result)
        notes.append(f"H={hidden}/{tokens} tok: {rounds}")
        del compiled

    _print_table(results)
    print()
    print("timed rounds (median per variant): " + "; ".join(notes))
    by_size = {}
    for r in results:
        by_size.setdefault((r.hidden, r.tokens), {})[r.variant] = r
    parts = []
    for (hidden, tokens), group in by_size.items():
        g = group["grpo"]
        parts.append(
            f"H={hidden}/{tokens} tok: "
            f"{_ratio(g.total_bytes, group['ppo-sep'].total_bytes)} vs "
            f"ppo-sep, "
            f"{_ratio(g.total_bytes, group['ppo-shared'].total_bytes)} vs "
            f"ppo-shared")
    print("GRPO/PPO total compiled memory: " + "; ".join(parts)
          + " (claim: ~0.5, no value network)")
    print(f"total time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
