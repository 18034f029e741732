"""The scripts in ``examples/`` in quick mode: each fine-tunes a pre-trained
tiny model with an RL trainer, and its numbers move the right way.

The LM and diffusion scripts run the ``lm`` and ``diffusion`` tasks of
``artifex-fn`` (whose compiled programs ``tests/test_cli.py`` covers)
through the NNX trainers instead.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lm_grpo_dpo():
    """Pre-training fits the digit strings, GRPO raises the exact-match
    rate of the verifiable reward, DPO ranks held-out preference pairs."""
    from artifex_fn.experiments import lm
    out = _load("lm_grpo_dpo").run(quick=True, seed=0)
    before, after = out["before"], out["after"]
    # Pre-training reaches the entropy of uniform digits plus a sure EOS.
    assert after["pretrain_nll"] < lm.K * math.log(10) / (lm.K + 1) + 0.05
    assert before["pretrain_nll"] > after["pretrain_nll"] + 0.5
    # The base rate of the target sum is low but not zero (2.8%).
    assert 0.005 < before["grpo_success"] < 0.08
    assert after["grpo_success"] > before["grpo_success"] + 0.5
    assert out["grpo_distinct_solutions"] >= 1
    # Policy == reference before DPO: all margins are zero.
    assert before["dpo_margin"] == pytest.approx(0.0, abs=1e-5)
    assert after["dpo_accuracy"] > 0.8
    assert after["dpo_margin"] > 0.5


# docs/guides/diffusion.md runs the same programs on this worker.
@pytest.mark.xdist_group("diffusion-example")
def test_diffusion_grpo(tmp_path):
    """GRPO (DDPO) moves the pre-trained model's samples into the wedge,
    at a finite KL to it."""
    plot = tmp_path / "samples.png"
    out = _load("diffusion_grpo").run(quick=True, seed=0, plot=str(plot))
    before, after = out["before"], out["after"]
    # Two of eight modes lie in the wedge: about a quarter of the samples.
    assert 0.15 < before["in_region"] < 0.35
    assert before["modes_covered"] == 8
    assert after["in_region"] >= before["in_region"] + 0.3
    # The pre-trained model is its own reference (KL zero).
    assert before["kl_to_pretrained"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < after["kl_to_pretrained"] < 100.0
    rewards = out["reward_history"]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:2]) + 0.3
    assert plot.stat().st_size > 0


def test_vae_ppo(tmp_path):
    """PPO fine-tuning of the encoder for reconstruction reward beats the
    ELBO-trained encoder on held-out digits."""
    plot = tmp_path / "vae_ppo.png"
    out = _load("vae_ppo").run(quick=True, seed=0, plot=str(plot))
    before, after = out["before"], out["after"]
    assert math.isfinite(out["pretrain_elbo"])
    # The pre-trained VAE learned something (an untrained decoder is at
    # about 15 squared-error units per image).
    assert before["reconstruction_error"] < 3.0
    assert (after["reconstruction_error"]
            < 0.85 * before["reconstruction_error"])
    assert after["ppo_reward"] > before["ppo_reward"] + 0.3
    assert plot.stat().st_size > 0


def test_gan_reinforce(tmp_path):
    """The frozen discriminator's reward rises while the KL guard keeps the
    mixture's modes covered."""
    plot = tmp_path / "gan_reinforce.png"
    out = _load("gan_reinforce").run(quick=True, seed=0, plot=str(plot))
    before, after = out["before"], out["after"]
    # The pre-trained generator is imperfect: modes reached, few samples on
    # them.
    assert before["modes_covered"] >= 6
    assert before["high_quality"] < 0.5
    assert (after["discriminator_reward"]
            > before["discriminator_reward"] + 0.2)
    assert after["modes_covered"] >= before["modes_covered"] - 1
    assert after["high_quality"] > before["high_quality"]
    # The guard keeps the policy near the pre-trained one.
    assert 0.0 < out["kl_to_pretrained"] < 50.0
    assert plot.stat().st_size > 0


def test_example_command_line(capsys):
    """``--quick``/``--seed`` (and ``--plot`` where ``run`` takes it) reach
    ``run``; its before/after numbers are printed as a table."""
    from artifex_fn.experiments.demo import example_main
    calls = []

    def run(*, quick=False, seed=0, plot=None):
        calls.append((quick, seed, plot))
        return dict(before=dict(in_region=0.25, modes=8),
                    after=dict(in_region=0.95, modes=7), seconds=1.5,
                    curve=[0.1, 0.2])

    example_main(run, "A title.\n\nMore.", ["--quick", "--seed", "3",
                                              "--plot", "x.png"])
    assert calls == [(True, 3, "x.png")]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["in_region", "0.250", "0.950"]
    assert lines[2].split() == ["modes", "8", "7"]
    assert lines[3:] == ["seconds: 1.5"]
    with pytest.raises(SystemExit):
        example_main(lambda *, quick, seed: None, "T.", ["--plot", "x"])


# The arith task's small model, which tests/test_arith.py pre-trains and
# caches on this worker (same group).
@pytest.mark.xdist_group("arith-reduced")
def test_arith_rlhf():
    """A reward model learns the task's preferences from pairs; PPO against
    it (the true answers never shown) raises the true exact-answer success
    at a small KL to the pre-trained model. Measured on three seeds (30
    PPO steps): reward-model accuracy 0.949, success 0.169 -> 0.330,
    0.207 -> 0.350, 0.196 -> 0.346, KL under 0.92 nats."""
    out = _load("arith_rlhf").run(quick=True, seed=0)
    before, after = out["before"], out["after"]
    assert before["rm_accuracy"] < 0.5        # the untrained head
    assert after["rm_accuracy"] >= 0.9
    assert 0.1 < before["success"] < 0.3
    assert after["success"] >= before["success"] + 0.1
    assert after["format"] >= 0.9
    assert 0.0 < out["final_kl"] and out["max_kl"] < 10.0
    assert len(out["curve"]["success"]) == 30
