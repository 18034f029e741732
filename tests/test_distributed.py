"""Data-parallel, FSDP, micro-batched and multi-host updates are exact.

Device counts are fixed when a JAX process starts, so the multi-device
checks run ``tests/distributed_worker.py`` in subprocesses: one with 8
forced host devices (every algorithm, RLHF-PPO on sequences and the reward
model included, and every GRPO aggregation mode on 8 devices, plain GRPO
(and the aggregation modes alone) also on 2, a 4 x 2 FSDP mesh, and
micro-batched), and a pair of processes joined by ``jax.distributed`` on
localhost. The in-process tests
cover micro-batching against the one-batch step, the (sum, count) form of
the math layer, trainers and the error messages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import artifex_fn as afn
from artifex_fn.training import GRPOTrainer
from artifex_fn.training import PPOTrainer

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"
TOL = 1e-5
CASES = ("grpo-grpo", "grpo-dapo", "grpo-dr_grpo", "grpo-epochs", "ppo",
         "reinforce", "dpo", "simpo", "ppo-seq", "reward-model",
         "online-dpo", "kto", "orpo")
VARIANTS = ("2dev", "8dev")
MICRO_CASES = ("reinforce", "simpo")
# The smallest distance from a tie that the discrete metrics
# (clip_fraction, reward_accuracy) must keep for an exact comparison to
# mean the same on every machine (float32 rounding is ~1e-7).
TIE_MARGIN = 1e-4
EXTRA_CASES = ("grpo-grpo", "ppo", "dpo")
EXTRA = ("fsdp4x2", "8dev-micro3")
# RLHF-PPO on sequences (per-token KL to a reference, adaptive beta), the
# Bradley-Terry reward model, online DPO, KTO (its reference point a
# whole-batch statistic) and ORPO: 8 devices with 3 micro-batches each.
SEQ_CASES = ("ppo-seq", "reward-model", "online-dpo", "kto", "orpo")


def _env(devices=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    # No shared compilation cache: the two processes of the multi-host
    # test would write the same entries at once.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if "force_host_platform_device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


# Every test reading the 8-device results runs on one pytest-xdist worker
# (``--dist loadgroup``), so the subprocess runs once.
DEVICES_GROUP = pytest.mark.xdist_group("distributed-8-devices")


# Session scope: under xdist the group's tests can be interleaved with other
# modules' tests on their worker, and a module-scoped fixture would then run
# the 5-minute subprocess again.
@pytest.fixture(scope="session")
def device_results():
    proc = subprocess.run(
        [sys.executable, str(WORKER), "devices"], env=_env(8),
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()
            if line.startswith("{")]
    return {(r["case"], r["variant"]): r for r in rows}


@DEVICES_GROUP
@pytest.mark.parametrize("case", CASES)
def test_update_equals_single_device(device_results, case):
    """8 devices, plain GRPO also 2 (FSDP and micro-batches on 8 devices for one case
    per algorithm family; micro-batches alone where no in-process test has
    them): all within 1e-5, the discrete metrics too, whose inputs are kept
    away from their ties."""
    variants = ((VARIANTS if case == "grpo-grpo" else VARIANTS[1:])
                + (EXTRA if case in EXTRA_CASES else ())
                + (EXTRA[1:] if case == "grpo-epochs" else ())
                + (("micro3",) if case in MICRO_CASES else ()))
    if case in SEQ_CASES:
        variants = EXTRA[1:]
    for variant in variants:
        row = device_results[(case, variant)]
        if case not in ("reinforce", "kto"):  # no discrete metric
            assert row["margin"] > TIE_MARGIN, (variant, row)
        assert row["params"] <= TOL, (variant, row)
        assert row["metrics"] <= TOL, (variant, row)


@DEVICES_GROUP
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean",
                                  "seq_mean_token_sum",
                                  "seq_mean_token_sum_norm"])
def test_aggregation_modes_equal_single_device(device_results, mode):
    """Value and gradient of every mode with rows split over 1-8 devices."""
    for n in (2, 8):
        row = device_results[(f"aggregate-{mode}", f"{n}dev")]
        assert row["params"] <= TOL and row["metrics"] <= TOL, row


TRAINERS = ("PPOTrainer", "REINFORCETrainer", "GRPOTrainer", "DPOTrainer",
            "KTOTrainer", "ORPOTrainer", "VAETrainer", "DiffusionTrainer",
            "FlowTrainer", "GANTrainer", "RewardModelTrainer")


@DEVICES_GROUP
@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_shard_equals_plain(device_results, trainer):
    """``trainer.shard(mesh)`` on 8 devices (PPO and VAE also FSDP 4 x 2):
    two steps give the unsharded trainer's parameters and metrics."""
    variants = ["8dev"] + (["fsdp4x2"] if trainer in ("PPOTrainer",
                                                      "VAETrainer") else [])
    for variant in variants:
        row = device_results[(trainer, variant)]
        assert row["params"] <= TOL and row["metrics"] <= TOL, row


@DEVICES_GROUP
@pytest.mark.parametrize("case", ["GRPOTrainer-lm", "PPOTrainer-lm",
                                  "OnlineDPOTrainer-lm"])
def test_token_generation_sharded_equals_plain(device_results, case):
    """GRPOTrainer, RLHF-PPO's PPOTrainer (an actor-critic decoder, a
    reference, the adaptive KL coefficient) and OnlineDPOTrainer (ranked
    pairs, a reference) generating from TinyCausalLM
    (cache, ragged prompts, top-p), sharded over 8 devices: the same
    tokens (the draws keep their distance from a flip), behaviour
    log-probs within 1e-5, then the same update."""
    row = device_results[(case, "8dev")]
    assert row["margin"] > TIE_MARGIN, row
    assert row["tokens_equal"], row
    assert row["log_probs"] <= TOL, row
    assert row["params"] <= TOL and row["metrics"] <= TOL, row


@DEVICES_GROUP
def test_runner_splits_seeds_over_devices(device_results):
    """``runner.run`` puts 4 seeds on 4 devices (one each) and trains them
    as on one device (a small noisy-descent program: the runner's contract
    without CartPole's compile time)."""
    row = device_results[("runner", "4dev")]
    assert row["params"] <= TOL and row["metrics"] <= TOL, row
    assert "loss" in row["metric_names"]


@DEVICES_GROUP
def test_device_results_cover_the_metrics(device_results):
    """The comparison included every metric, e.g. GRPO's group statistics."""
    names = device_results[("grpo-grpo", "8dev")]["metric_names"]
    for name in ("loss", "policy_loss", "kl", "kl_penalty", "clip_fraction",
                 "entropy", "mean_reward", "reward_std",
                 "group_advantage_std", "frac_reward_zero_std", "grad_norm"):
        assert name in names
    names = device_results[("ppo", "8dev")]["metric_names"]
    assert {"value_loss", "explained_variance", "advantage_std"} <= set(names)
    names = device_results[("PPOTrainer-lm", "8dev")]["metric_names"]
    assert {"kl", "beta", "non_score_reward", "score", "value_loss"} <= set(
        names)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    """Two ``jax.distributed`` processes (one CPU device each, gloo
    collectives), each holding half of the rows, take the same two GRPO
    steps as one process with the whole batch."""
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(WORKER), "single", str(single)],
                   env=_env(), check=True, timeout=300, capture_output=True)
    out, port = tmp_path / "multi.json", str(_free_port())
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), "host", str(rank), port, str(out)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for rank in (0, 1)]
    logs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, logs):
        assert p.returncode == 0, stderr[-4000:]
        assert "2 global devices, 1 local" in stdout
    want, got = json.loads(single.read_text()), json.loads(out.read_text())
    # clip_fraction is compared exactly: no ratio near the clip bounds.
    assert want.pop("tie_margin") > TIE_MARGIN
    assert set(want) == set(got)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=TOL, atol=TOL,
                                   err_msg=key)


# -- in-process: micro-batches, the (sum, count) form, errors -------------

def _policy(params, obs):
    return obs @ params["w"]


def _grpo_setup(aggregation="grpo", k=1):
    rng = np.random.default_rng(0)
    b, length, d, v = 12, 4, 3, 5
    params = {"w": jnp.asarray(rng.standard_normal((d, v)), jnp.float32)}
    mask = (np.arange(length)[None] < rng.integers(0, length + 1, b)[:, None])
    batch = dict(
        observations=jnp.asarray(rng.standard_normal((b, length, d)),
                                 jnp.float32),
        actions=jnp.asarray(rng.integers(0, v, (b, length))),
        rewards=jnp.asarray(rng.integers(0, 2, b), jnp.float32),
        log_probs=jnp.asarray(rng.standard_normal((b, length)) - 1.6,
                              jnp.float32),
        ref_log_probs=jnp.asarray(rng.standard_normal((b, length)) - 1.6,
                                  jnp.float32),
        mask=jnp.asarray(mask, jnp.float32))
    config = afn.grpo.GRPOConfig(num_generations=3, loss_aggregation=aggregation,
                                 num_micro_batches=k, policy=_policy,
                                 optimizer=optax.sgd(1.0))
    return afn.grpo.init(params, config), batch


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_grpo_micro_batches_equal_one_batch(aggregation):
    one = jax.jit(afn.grpo.update)(*_grpo_setup(aggregation, 1))
    for k in (2, 12):
        many = jax.jit(afn.grpo.update)(*_grpo_setup(aggregation, k))
        for a, b in zip(jax.tree_util.tree_leaves(many),
                        jax.tree_util.tree_leaves(one)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_micro_batches_differ_from_naive_mean_of_means():
    """The check above can fail: averaging per-micro-batch token means (the
    common mistake) gives a different gradient when lengths differ."""
    state, batch = _grpo_setup("dapo", 1)
    rows, totals, _ = afn.grpo.prepare(batch, state.config)
    split = [jax.tree_util.tree_map(lambda x, i=i: x[i::2], rows)
             for i in range(2)]
    grad = jax.jit(jax.grad(lambda p, r, t: afn.grpo.rows_loss(
        p, r, state.config, t)[0]))
    exact = sum(grad(state.params, r, totals)["w"] for r in split)
    naive = sum(grad(state.params, r, dict(
        loss=jnp.sum(r["mask"]), tokens=jnp.sum(r["mask"])))["w"]
        for r in split) / 2
    full = grad(state.params, rows, totals)["w"]
    np.testing.assert_allclose(exact, full, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(naive - full)) > 1e-3


def test_aggregate_loss_shares_sum_to_the_whole():
    rng = np.random.default_rng(1)
    loss = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
    mask = jnp.asarray(rng.random((8, 5)) < 0.6, jnp.float32)
    for mode in afn.AGGREGATION_MODES:
        whole = afn.aggregate_loss(loss, mask, mode=mode)
        _, den = afn.aggregate_loss_parts(loss, mask, mode=mode)
        shares = [afn.aggregate_loss(loss[i::4], mask[i::4], mode=mode,
                                     denominator=den) for i in range(4)]
        np.testing.assert_allclose(sum(shares), whole, rtol=1e-6, atol=1e-7)


def test_micro_batch_errors_name_the_field():
    with pytest.raises(ValueError, match="num_micro_batches"):
        afn.grpo.GRPOConfig(num_micro_batches=0)
    state, batch = _grpo_setup("grpo", 5)
    with pytest.raises(ValueError, match="num_micro_batches.*12"):
        afn.grpo.update(state, batch)


def test_shard_batch_errors_and_statics():
    mesh = afn.distributed.make_mesh()
    n = mesh.size
    placed = afn.distributed.shard_batch(
        dict(x=np.zeros((2 * n, 3)), group_size=4, t=np.float32(1.0)), mesh)
    assert placed["group_size"] == 4 and isinstance(placed["group_size"], int)
    assert placed["x"].sharding.spec == jax.sharding.PartitionSpec(
        ("data", "fsdp"))
    if n > 1:
        with pytest.raises(ValueError, match=r"batch\['x'\].*leading size"):
            afn.distributed.shard_batch(dict(x=np.zeros((n + 1, 3))), mesh)
    with pytest.raises(ValueError, match="does not fit"):
        afn.distributed.make_mesh(data=len(jax.devices()) + 1)


class _ActorCritic(nnx.Module):
    def __init__(self, rngs):
        self.pi = nnx.Linear(3, 4, rngs=rngs)
        self.v = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, obs):
        return self.pi(obs), self.v(obs)[..., 0]


def _ppo_batch():
    rng = np.random.default_rng(2)
    n, t = 4, 6
    return dict(
        observations=jnp.asarray(rng.standard_normal((n, t, 3)), jnp.float32),
        actions=jnp.asarray(rng.integers(0, 4, (n, t))),
        rewards=jnp.asarray(rng.standard_normal((n, t)), jnp.float32),
        dones=jnp.zeros((n, t), bool),
        values=jnp.asarray(rng.standard_normal((n, t + 1)), jnp.float32),
        log_probs=jnp.full((n, t), -jnp.log(4.0)))


def _ppo_trainer(k=1):
    model = _ActorCritic(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    return PPOTrainer(model, opt, afn.ppo.PPOConfig(
        num_minibatches=2, num_micro_batches=k), key=1)


def test_trainer_shard_and_micro_batches_match_plain():
    mesh = afn.distributed.make_mesh()
    plain, sharded, micro = (_ppo_trainer(), _ppo_trainer().shard(mesh),
                             _ppo_trainer(k=3))
    for _ in range(2):
        metrics = [t.train_step(_ppo_batch()) for t in (plain, sharded, micro)]
    want = nnx.state(plain.model, nnx.Param)
    for other in (sharded, micro):
        got = nnx.state(other.model, nnx.Param)
        for a, b in zip(jax.tree_util.tree_leaves(got),
                        jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for m in metrics[1:]:
        for key in metrics[0]:
            np.testing.assert_allclose(m[key], metrics[0][key], rtol=1e-5,
                                       atol=1e-6, err_msg=key)
    kernel = sharded.model.pi.kernel[...]
    assert set(kernel.sharding.device_set) == set(mesh.devices.flat)


def test_grpo_trainer_generation_on_a_mesh():
    """Generate-score-update with prompts split over the mesh."""
    class Bandit(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Linear(2, 3, rngs=rngs)

        def __call__(self, obs):
            return self.w(obs)

    def make():
        model = Bandit(nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
        return GRPOTrainer(model, opt, afn.grpo.GRPOConfig(num_generations=2),
                           key=0)

    reward = lambda samples, conditions: (samples == 1).astype(jnp.float32)
    prompts = dict(observations=jnp.ones((len(jax.devices()) * 2, 2)))
    plain, sharded = make(), make().shard(afn.distributed.make_mesh())
    for t in (plain, sharded):
        t.train_step(prompts, reward, key=jax.random.key(5))
    np.testing.assert_allclose(sharded.model.w.kernel[...],
                               plain.model.w.kernel[...], rtol=1e-5, atol=1e-6)


def test_config_replace_keeps_micro_batches_static():
    config = dataclasses.replace(afn.ppo.PPOConfig(), num_micro_batches=2)
    leaves = jax.tree_util.tree_leaves(config)
    assert 2 not in [x for x in leaves if isinstance(x, int)]
