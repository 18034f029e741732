"""The ``artifex-fn`` command line, the seeds x sweep runner and the CartPole task.

Budgets here are tiny (a few iterations); the full runs and their numbers
are in ``benchmarks/bench_cartpole.py`` and the README.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artifex_fn import experiments
from artifex_fn.experiments import cartpole
from artifex_fn.experiments import cli
from artifex_fn.experiments import arith
from artifex_fn.experiments import lm
from artifex_fn.experiments import runner


@pytest.fixture(autouse=True)
def _no_persistent_cache(monkeypatch):
    # The CLI turns on JAX's persistent compilation cache in ~/.cache;
    # keep the test process's global config untouched.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    # JAX's backends exist before any in-process CLI call, so ``--devices``
    # leaves this process's XLA_FLAGS alone (the subprocess test covers it).
    jax.devices()


def _cli(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


# --- argument handling ------------------------------------------------------

def test_help_lists_every_option_and_task(capsys):
    code, text = _cli(["train", "--help"], capsys)
    assert code == 0
    for option in ("--task", "--algo", "--seeds", "--seed", "--steps", "--set",
                   "--sweep", "--out", "--config", "--chunks",
                   "--devices", "--no-progress", "--no-plot"):
        assert option in text
    for task in experiments.TASKS:
        assert task in text
    code, text = _cli(["--help"], capsys)
    assert code == 0 and "train" in text and "demo" in text and "tasks" in text
    code, text = _cli(["demo", "--help"], capsys)
    assert code == 0 and "--quick" in text and "--out" in text


def test_unknown_task_and_algo_name_the_valid_ones(capsys, tmp_path):
    code, text = _cli(["train", "--task", "pong", "--algo", "ppo",
                       "--out", str(tmp_path)], capsys)
    assert code == 2
    assert "unknown task 'pong'" in text
    assert "cartpole" in text and "lm" in text and "diffusion" in text
    code, text = _cli(["train", "--task", "cartpole", "--algo", "dpo",
                       "--out", str(tmp_path)], capsys)
    assert code == 2 and "valid: ppo, reinforce" in text
    code, text = _cli(["train", "--task", "cartpole", "--algo", "ppo",
                       "--set", "learning_rate=1", "--out", str(tmp_path)],
                      capsys)
    assert code == 2 and "'learning_rate' is not a setting" in text
    assert "lr" in text
    code, text = _cli(["train", "--task", "cartpole", "--algo", "ppo",
                       "--sweep", "lr", "--out", str(tmp_path)], capsys)
    assert code == 2 and "NAME=VALUE" in text
    code, text = _cli(["train", "--task", "cartpole"], capsys)
    assert code == 2 and "--algo" in text
    code, text = _cli(["train", "--task", "cartpole", "--algo", "ppo",
                       "--devices", "two", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--devices must be 'auto' or an int >= 1" in text


def test_tasks_command_lists_defaults(capsys):
    code, text = _cli(["tasks"], capsys)
    assert code == 0
    assert "total_timesteps=500000" in text and "lr=0.00025" in text


def test_resolve_types_and_errors():
    from artifex_fn.experiments.train import resolve
    _, settings, hparams = resolve(
        "cartpole", "ppo", steps=4096,
        overrides=dict(num_envs=8.0, lr=1e-3, anneal_lr="false"))
    assert settings["total_timesteps"] == 4096
    assert settings["num_envs"] == 8 and isinstance(settings["num_envs"], int)
    assert settings["anneal_lr"] is False and hparams["lr"] == 1e-3
    with pytest.raises(ValueError, match="must be an integer"):
        resolve("cartpole", "ppo", overrides=dict(num_envs=2.5))
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        resolve("cartpole", "ppo", steps=0)


def test_sweep_grid_is_a_cartesian_product():
    grid, points = runner.sweep_grid(dict(a=1.0, b=2.0, c=3.0),
                                     dict(a=[1, 2], b=[5, 6, 7]))
    assert len(points) == 6
    assert grid["a"].tolist() == [1, 1, 1, 2, 2, 2]
    assert grid["b"].tolist() == [5, 6, 7, 5, 6, 7]
    assert grid["c"].tolist() == [3] * 6
    with pytest.raises(ValueError, match="cannot sweep"):
        runner.sweep_grid(dict(a=1.0), dict(z=[1.0]))
    with pytest.raises(ValueError, match="no values"):
        runner.sweep_grid(dict(a=1.0), dict(a=[]))


def test_chunk_length_divides():
    assert runner._chunk_length(976, 20) == 16
    assert runner._chunk_length(7, 20) == 1
    assert runner._chunk_length(40, 1) == 40
    for n in range(1, 60):
        for c in (1, 3, 20):
            assert n % runner._chunk_length(n, c) == 0


# --- a reduced CartPole run through the CLI ---------------------------------

def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# The CLI's CartPole run and the single run below compile the same plain
# step (the same settings: 4 environments, 4 iterations of 512 steps); on
# one worker the second takes it from the compilation cache.
CARTPOLE_STEP = pytest.mark.xdist_group("cartpole-ppo-step")


@CARTPOLE_STEP
def test_cli_cartpole_writes_every_file(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "run.toml"
    cfg.write_text('task = "cartpole"\nalgo = "ppo"\nseeds = 2\n'
                   '[settings]\nnum_envs = 4\n[hparams]\nentropy_coeff = 0.02\n')
    code, text = _cli(["train", "--config", str(cfg), "--steps", "2048",
                       "--sweep", "lr=1e-3,3e-3", "--chunks", "2",
                       "--no-progress", "--out", str(out)], capsys)
    assert code == 0, text
    assert "eval_return" in text and "lr=0.001" in text
    files = sorted(os.listdir(out))
    assert files == ["checkpoint", "config.json", "curve.png",
                     "metrics.jsonl", "summary.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["seeds"] == 2 and config["settings"]["total_timesteps"] == 2048
    assert config["hparams"]["entropy_coeff"] == 0.02
    assert config["sweep"] == {"lr": [1e-3, 3e-3]}
    assert config["versions"]["jax"] == jax.__version__
    rows = _rows(out / "metrics.jsonl")
    iterations = 2048 // 512
    assert len(rows) == iterations * 2 * 2
    assert {(r["iteration"], r["seed"], r["lr"]) for r in rows} == {
        (i, s, lr) for i in range(1, iterations + 1) for s in (0, 1)
        for lr in (1e-3, 3e-3)}
    for r in rows:
        for k in ("loss", "policy_loss", "value_loss", "entropy",
                  "approx_kl", "clip_fraction", "episode_return"):
            assert r[k] is not None and math.isfinite(r[k]), (k, r)
        assert r["samples"] == r["iteration"] * 512
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["points"]) == 2
    assert all(math.isfinite(x) for p in summary["points"]
               for x in p["after_per_seed"])
    with open(out / "curve.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    params = experiments.load_checkpoint(str(out))
    leaves = jax.tree_util.tree_leaves(params)
    assert leaves and all(np.shape(x)[:2] == (2, 2) for x in leaves)
    assert all(np.all(np.isfinite(x)) for x in leaves)
    _grid_point_equals_a_separate_run(config, rows)


def _grid_point_equals_a_separate_run(config, rows):
    """vmap over seeds and hyper-parameters does what separate runs do.

    Point (seed 1, lr 3e-3) of the CLI's grid equals the plain run with key
    ``split(PRNGKey(0), 2)[1]`` and that value, stepped one jitted
    iteration at a time; other seeds and values give other runs.
    """
    program = cartpole.ppo_program(config["settings"])
    hp = {k: jnp.float32(v) for k, v in
          dict(config["hparams"], lr=3e-3).items()}
    carry = program.init(jax.random.split(jax.random.PRNGKey(0), 2)[1], hp)
    step = jax.jit(program.step)
    want = {k: [] for k in ("loss", "value_loss", "episode_return")}
    for _ in range(program.num_iterations):
        carry, m = step(carry, hp)
        for k in want:
            want[k].append(float(m[k]))

    def curve(seed, lr, key):
        return [r[key] for r in sorted(rows, key=lambda r: r["iteration"])
                if r["seed"] == seed and r["lr"] == lr]

    for k, v in want.items():
        np.testing.assert_allclose(curve(1, 3e-3, k), v, rtol=2e-4,
                                   atol=2e-5, err_msg=k)
    assert not np.allclose(curve(1, 1e-3, "value_loss"),
                           curve(1, 3e-3, "value_loss"))
    assert not np.allclose(curve(0, 3e-3, "value_loss"),
                           curve(1, 3e-3, "value_loss"))


def test_cli_spreads_seeds_over_host_devices(tmp_path):
    """In a fresh process (``python -m artifex_fn.experiments.cli``, the
    console script's entry point) ``--devices 2`` splits the CPU into two
    XLA devices and the runner puts one seed on each."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR="", JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split()
        if "force_host_platform_device_count" not in f)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "artifex_fn.experiments.cli", "train",
         "--task", "cartpole", "--algo", "ppo", "--seeds", "2",
         "--steps", "1024", "--chunks", "1", "--set", "eval_envs=4",
         "--no-progress", "--no-plot", "--devices", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 2 devices" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["devices"] == 2
    assert all(math.isfinite(x) for x in summary["points"][0]["after_per_seed"])


# --- runner semantics ---------------------------------------------------------

@pytest.fixture(scope="module")
def small_ppo():
    return cartpole.ppo_program(dict(num_envs=4, total_timesteps=4 * 512))


def test_bad_seed_count(small_ppo):
    with pytest.raises(ValueError, match="num_seeds"):
        runner.run(small_ppo, hparams=cartpole.HPARAMS["ppo"], num_seeds=0)


# --- the CartPole programs ----------------------------------------------------

def test_ppo_rollout_bootstraps_at_truncation_only():
    """The batch handed to PPO keeps termination and truncation apart."""
    import gymnax
    env, params = gymnax.make("CartPole-v1")
    key = jax.random.PRNGKey(0)
    obs, state = env.reset(key, params)
    # One step before the time limit: the next step truncates, and the
    # auto-reset observation differs from the final one.
    state = state.replace(time=params.max_steps_in_episode - 1)
    nobs, _, reward, terminated, truncated, info = env.step(
        key, state, 1, params)
    assert bool(truncated) and not bool(terminated)
    assert not np.allclose(nobs, info["final_observation"])
    # The library's GAE bootstraps V(final_obs) there and not after a
    # termination (the recursion is cut in both cases).
    import artifex_fn as afn
    r = jnp.ones((1, 3))
    v = jnp.zeros((1, 3))
    nv = jnp.array([[0.0, 10.0, 0.0]])
    trunc = jnp.array([[False, True, True]])
    adv_t = afn.gae_advantages(r, v, gamma=0.5, lambda_=1.0, next_values=nv,
                               truncated=trunc,
                               terminated=jnp.zeros((1, 3), bool))
    adv_d = afn.gae_advantages(r, v, gamma=0.5, lambda_=1.0, next_values=nv,
                               truncated=trunc,
                               terminated=jnp.array([[False, True, False]]))
    np.testing.assert_allclose(adv_t, [[1 + 0.5 * 6.0, 1 + 5.0, 1.0]])
    np.testing.assert_allclose(adv_d, [[1 + 0.5 * 1.0, 1.0, 1.0]])


def test_auto_reset_step_equals_gymnax_step():
    """The rollout's step (reset drawn in advance) is gymnax's ``env.step``
    given the reset that ``env.step`` would draw: mid-episode, at a
    termination and at the time limit."""
    import gymnax
    env, params = gymnax.make("CartPole-v1")
    step = jax.jit(cartpole._auto_reset_step(env, params))
    key = jax.random.PRNGKey(0)
    _, state = env.reset(key, params)
    states = [state,
              state.replace(theta=jnp.float32(0.25)),          # terminates
              state.replace(time=params.max_steps_in_episode - 1)]  # truncates
    outcomes = set()
    for i, s in enumerate(states):
        k = jax.random.fold_in(key, i)
        want = env.step(k, s, 1, params)
        k_step, k_reset = jax.random.split(k)
        reset_obs, reset_state = env.reset_env(k_reset, params)
        batch = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None],
                                       (k_step, s, jnp.int32(1), reset_obs,
                                        reset_state))
        got = jax.tree_util.tree_map(lambda x: x[0], step(*batch))
        obs, new_state, reward, terminated, truncated, final_obs = got
        # Two compiled programs (the vmapped step and gymnax's own): equal
        # up to float32 rounding.
        close = functools.partial(np.testing.assert_allclose, rtol=1e-6,
                                  atol=1e-7)
        close(obs, want[0])
        for a, b in zip(jax.tree_util.tree_leaves(new_state),
                        jax.tree_util.tree_leaves(want[1])):
            close(a, b)
        close(reward, want[2])
        assert bool(terminated) == bool(want[3])
        assert bool(truncated) == bool(want[4])
        close(final_obs, want[5]["final_observation"])
        outcomes.add((bool(terminated), bool(truncated)))
    assert outcomes == {(False, False), (True, False), (False, True)}


@CARTPOLE_STEP
def test_single_run_equals_plain_steps(small_ppo):
    """One seed and no sweep runs the program unbatched; the metrics and
    parameters keep the [1, 1] grid axes and equal plain jitted steps."""
    res = runner.run(small_ppo, hparams=cartpole.HPARAMS["ppo"], num_seeds=1,
                     chunks=2, progress=False)
    assert res.metrics["loss"].shape == (1, 1, 4)
    assert res.after["eval_return"].shape == (1, 1)
    assert res.devices == 1
    hp = {k: jnp.float32(v) for k, v in cartpole.HPARAMS["ppo"].items()}
    carry = small_ppo.init(jax.random.split(jax.random.PRNGKey(0), 1)[0], hp)
    step = jax.jit(small_ppo.step)
    losses = []
    for _ in range(small_ppo.num_iterations):
        carry, m = step(carry, hp)
        losses.append(float(m["loss"]))
    np.testing.assert_allclose(res.metrics["loss"][0, 0], losses, rtol=2e-4,
                               atol=2e-5)
    for a, b in zip(jax.tree_util.tree_leaves(res.params),
                    jax.tree_util.tree_leaves(small_ppo.params(carry))):
        assert a.shape == (1, 1) + b.shape
        np.testing.assert_allclose(a[0, 0], b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="shard_seeds"):
        runner.run(small_ppo, hparams=cartpole.HPARAMS["ppo"], num_seeds=1,
                   shard_seeds="yes", progress=False)


def test_ppo_cartpole_learns_quickly():
    """2 seeds, 10k steps: the evaluation return at least triples
    (measured: 16 -> 306 and 16 -> 164)."""
    program = cartpole.ppo_program(dict(total_timesteps=10_240, eval_envs=16))
    res = runner.run(program, hparams=dict(cartpole.HPARAMS["ppo"], lr=1e-3),
                     num_seeds=2, chunks=1, progress=False)
    before, after = res.before["eval_return"], res.after["eval_return"]
    assert np.all(before < 40)
    assert np.all(after > 3 * before), (before, after)
    for k, v in res.metrics.items():
        assert np.all(np.isfinite(v)), k


def test_reinforce_cartpole_runs_and_improves():
    program = cartpole.reinforce_program(dict(total_episodes=16 * 30,
                                              eval_envs=16))
    res = runner.run(program, hparams=cartpole.HPARAMS["reinforce"],
                     num_seeds=2, chunks=1, progress=False)
    assert res.metrics["episode_return"].shape == (2, 1, 30)
    for k, v in res.metrics.items():
        assert np.all(np.isfinite(v)), k
    first = res.metrics["episode_return"][..., :3].mean()
    last = res.metrics["episode_return"][..., -3:].mean()
    assert last > 1.5 * first, (first, last)


def test_program_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_minibatches"):
        cartpole.ppo_program(dict(num_envs=3, num_steps=5, num_minibatches=4))
    with pytest.raises(ValueError, match="valid: ppo, reinforce"):
        experiments.get_task("cartpole").program("grpo", {})
    with pytest.raises(ValueError, match=r"unknown lm/grpo settings \['nope'\]"):
        lm.grpo_program(dict(nope=1))
    with pytest.raises(ValueError, match="num_envs must be an integer"):
        cartpole.reinforce_program(dict(num_envs=0))


# --- the generative tasks, tiny budgets ---------------------------------------

_TINY = {
    # GRPO's knobs on (two epochs of two minibatches, dynamic sampling, a
    # LoRA policy over the frozen base): tests/test_arith.py checks what
    # they produce.
    ("arith", "grpo"): dict(arith.TEST_SETTINGS["grpo"], num_epochs=2,
                            num_minibatches=2, num_groups=3, keep_groups=2,
                            lora_rank=2),
    ("lm", "grpo"): lm.TEST_SETTINGS["grpo"],
    ("lm", "dpo"): lm.TEST_SETTINGS["dpo"],
    ("diffusion", "grpo"): dict(pretrain_steps=20, pretrain_batch=64,
                                iterations=2, eval_samples=64, num_groups=4,
                                group_size=4),
    ("diffusion", "dpo"): dict(pretrain_steps=20, pretrain_batch=64,
                               iterations=2, eval_samples=64, num_pairs=4,
                               group_size=4),
}


@pytest.mark.parametrize("task,algo", sorted(_TINY))
def test_generative_task_runs_over_seeds_and_sweep(task, algo):
    t = experiments.get_task(task)
    program = t.program(algo, _TINY[(task, algo)])
    hp = t.hparams(algo)
    res = runner.run(program, hparams=hp, sweep=dict(lr=[hp["lr"], 0.0]),
                     num_seeds=2, chunks=1, progress=False)
    n = program.num_iterations
    assert res.metrics[program.curve].shape == (2, 2, n)
    for k, v in res.metrics.items():
        assert np.all(np.isfinite(v)), k
    if (task, algo) == ("arith", "grpo"):   # the knobs' metrics
        assert {"rewards/exact/mean", "rewards/format/std",
                "rewards/exact/frac_zero_std",
                "dynamic_sampling/fill_rate"} <= set(res.metrics)
    for side in (res.before, res.after):
        assert side[program.score].shape == (2, 2)
        for k, v in side.items():
            assert np.all(np.isfinite(v)), k
    # lr = 0 leaves the pre-trained parameters where they were: the same
    # seed's evaluation before and after training coincides.
    np.testing.assert_allclose(res.after[program.score][:, 1],
                               res.before[program.score][:, 1], atol=1e-6)
    # Both grid points start from the same pre-trained model per seed.
    np.testing.assert_allclose(res.before[program.score][:, 0],
                               res.before[program.score][:, 1])


def test_diffusion_reward_region():
    from artifex_fn.experiments import diffusion
    from artifex_fn.toy_data import mixture_means
    # Modes at 45 and 90 degrees are inside, the others outside.
    np.testing.assert_array_equal(diffusion.in_region(mixture_means()),
                                  [0, 1, 1, 0, 0, 0, 0, 0])
    assert float(diffusion.in_region(jnp.array([0.0, -1.0]))) == 0.0


@pytest.mark.parametrize("shape", [(4, 64), (64, 64), (64, 2), (64, 1)])
def test_cartpole_orthogonal_init_matches_jax(shape):
    """The QR-free initializer gives JAX's orthogonal matrix for the same
    key, and stays orthonormal when vmapped over seeds (the case that
    LAPACK's batched QR deadlocked)."""
    keys = jax.random.split(jax.random.key(3), 4)
    got = jax.jit(jax.vmap(lambda k: cartpole.orthogonal(1.5)(k, shape)))(keys)
    for k, w in zip(keys, got):
        want = jax.nn.initializers.orthogonal(1.5)(k, shape)
        np.testing.assert_allclose(w, want, atol=2e-5)
    small = min(shape)
    gram = (np.einsum("bij,bik->bjk", got, got) if shape[0] >= shape[1]
            else np.einsum("bji,bki->bjk", got, got))
    np.testing.assert_allclose(gram, np.broadcast_to(
        2.25 * np.eye(small), gram.shape), atol=1e-4)
