"""The GAN + REINFORCE example in quick mode: the frozen discriminator's
reward rises while the KL guard keeps the mixture's modes covered."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / (
    "gan_reinforce.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("gan_reinforce", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_raises_the_reward_without_collapse(example, tmp_path):
    plot = tmp_path / "gan_reinforce.png"
    out = example.run(quick=True, seed=0, plot=str(plot))
    assert all(math.isfinite(v) for v in out.values())
    # The pre-trained generator is imperfect: modes reached, few samples on
    # them.
    assert out["modes_before"] >= 6
    assert out["high_quality_before"] < 0.5
    assert out["reward_after"] > out["reward_before"] + 0.2
    assert out["modes_after"] >= out["modes_before"] - 1
    assert out["high_quality_after"] > out["high_quality_before"]
    # The guard keeps the policy near the pre-trained one.
    assert 0.0 < out["kl_last"] < 50.0
    assert plot.stat().st_size > 0
