"""The tiny-LM example in quick mode: pre-training fits the digit strings,
GRPO raises the exact-match rate of the verifiable reward, DPO ranks
held-out preference pairs."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / (
    "lm_grpo_dpo.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("lm_grpo_dpo", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_improves_every_stage(example, tmp_path):
    plot = tmp_path / "lm.png"
    out = example.run(quick=True, seed=0, plot=str(plot))
    before, after = out["before"], out["after"]
    k = example.K
    # Pre-training reaches the entropy of uniform digits plus a sure EOS.
    assert after["pretrain_nll"] < k * math.log(10) / (k + 1) + 0.05
    assert before["pretrain_nll"] > after["pretrain_nll"] + 0.5
    # The base rate of the target sum is low but not zero (2.8%).
    assert 0.005 < before["grpo_success"] < 0.08
    assert after["grpo_success"] > before["grpo_success"] + 0.5
    assert out["grpo_distinct_solutions"] >= 1
    # Policy == reference before DPO: all margins are zero.
    assert before["dpo_margin"] == pytest.approx(0.0, abs=1e-5)
    assert after["dpo_accuracy"] > 0.8
    assert after["dpo_margin"] > 0.5
    assert plot.stat().st_size > 0
