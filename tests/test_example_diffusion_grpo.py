"""The diffusion + GRPO (DDPO) example in quick mode: GRPO moves the
pre-trained diffusion model's samples into the reward region."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / (
    "diffusion_grpo.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("diffusion_grpo", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_moves_samples_into_the_region(example, tmp_path):
    plot = tmp_path / "samples.png"
    out = example.run(quick=True, seed=0, plot=str(plot))
    before, after = out["before"], out["after"]
    # Two of eight modes lie in the wedge: about a quarter of the samples.
    assert 0.15 < before["in_region"] < 0.35
    assert before["modes_covered"] == 8
    assert after["in_region"] >= before["in_region"] + 0.3
    # The fine-tuned chains moved away from the reference, by a finite KL;
    # the pre-trained model is its own reference (KL zero).
    assert before["kl_to_pretrained"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < after["kl_to_pretrained"] < 100.0
    rewards = out["reward_history"]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:2]) + 0.3
    assert plot.stat().st_size > 0


def test_main_prints_the_table(example, monkeypatch, capsys):
    numbers = dict(in_region=0.25, high_quality=0.9, modes_covered=8.0,
                   mode_entropy=2.0, kl_to_pretrained=0.0)
    monkeypatch.setattr(example, "run", lambda **kw: dict(
        before=numbers, after=dict(numbers, in_region=0.95), seconds=1.0))
    monkeypatch.setattr(sys, "argv", ["diffusion_grpo.py", "--quick"])
    example.main()
    out = capsys.readouterr().out
    assert "in_region" in out and "0.950" in out and "kl_to_pretrained" in out


def test_region_reward(example):
    import jax.numpy as jnp
    from artifex_fn.toy_data import mixture_means
    # Modes at 45 and 90 degrees are inside, the others outside.
    np.testing.assert_array_equal(example.in_region(mixture_means()),
                                  [0, 1, 1, 0, 0, 0, 0, 0])
    assert float(example.in_region(jnp.array([0.0, -1.0]))) == 0.0
