"""Imports point down the layers: nothing below the trainers imports them."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "artifex_fn"
BELOW_TRAINERS = sorted(
    [p for d in ("_src", "families", "experiments")
     for p in (PACKAGE / d).rglob("*.py")]
    + [PACKAGE / f"{name}.py" for name in (
        "ppo", "grpo", "reinforce", "dpo", "distributed", "toy_data")])


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            for alias in node.names:
                yield f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


@pytest.mark.parametrize("path", BELOW_TRAINERS,
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_import_of_the_trainer_layer(path):
    upward = [m for m in _imports(path)
              if m == "artifex_fn.training" or m.startswith(
                  ("artifex_fn.training.", "artifex_fn.generative_models"))]
    assert not upward, f"{path.name} imports {upward}"
