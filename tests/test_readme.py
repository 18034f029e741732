"""The README's Python examples run as pasted."""

from __future__ import annotations

import math
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_quick_start_is_short_and_trains(capsys):
    quick = _blocks()[0]
    assert "GRPOTrainer" in quick
    assert len(quick.strip().splitlines()) <= 20
    exec(compile(quick, "README quick start", "exec"), {})
    out = capsys.readouterr().out
    reward = float(re.search(r"mean reward (-?[\d.]+)", out).group(1))
    assert reward > -0.5


# The text example pre-trains arith.SMALL_MODEL, which tests/test_arith.py
# has cached on this worker by then (same group; that module runs first).
@pytest.mark.xdist_group("arith-reduced")
def test_other_examples_run(capsys, tmp_path, monkeypatch):
    # Examples that write files (the CLI's runs/) write them in tmp_path.
    monkeypatch.chdir(tmp_path)
    for block in _blocks()[1:]:
        scope = {}
        exec(compile(block, "README example", "exec"), scope)
    assert (tmp_path / "runs" / "sweep" / "metrics.jsonl").exists()
    # GRPO on text (the arith task's small model, 4 questions, 25 steps):
    # the exact-answer reward read from the decoded answers rises from the
    # pre-trained model's rate of about 0.2.
    out = capsys.readouterr().out
    reward = float(re.search(r"exact-answer reward ([\d.]+)", out).group(1))
    assert reward > 0.5
    # The reward model separates its (separable) training pairs, and PPO
    # against it reports finite score, KL and coefficient.
    found = re.search(r"reward-model accuracy ([\d.]+); PPO score "
                      r"(-?[\d.]+), KL (-?[\d.]+), beta ([\d.]+)", out)
    assert float(found.group(1)) == 1.0
    assert all(map(math.isfinite, map(float, found.groups()[1:])))
