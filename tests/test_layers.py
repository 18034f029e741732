"""The rules of the house, checked on the source.

* Arrows point down: the math (``artifex_fn/_src/*.py``) imports no
  algorithm, family, sampler or trainer; the algorithms, families and the
  public modules below the trainers import no trainer; nothing imports the
  experiments but the experiments.
* ``artifex_fn._src`` is imported only inside ``artifex_fn/_src`` and by
  the public facades that re-export it.
* No ``jax._src`` or ``flax`` internals anywhere, and no private attribute
  of a Flax object (``_raw_value``, ``object.__getattribute__``, ...).
* One public path per name: an object is listed in the ``__all__`` of one
  public module only (the guide's compatibility package
  ``artifex_fn.generative_models`` excepted).
* No block of six or more lines repeated inside ``artifex_fn/`` (pylint's
  duplicate-code check, imports aside).
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "artifex_fn"
ALL_FILES = sorted(PACKAGE.rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            for alias in node.names:
                yield f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def _in(path, *dirs):
    rel = path.relative_to(PACKAGE).as_posix()
    return any(rel == d or rel.startswith(d + "/") for d in dirs)


MATH = [p for p in ALL_FILES if p.parent == PACKAGE / "_src"
        and p.name not in ("sampling.py", "distributed.py", "text.py")]
BELOW_TRAINERS = [p for p in ALL_FILES
                  if not _in(p, "training", "generative_models",
                             "experiments")]
FACADES = {PACKAGE / f"{name}.py" for name in (
    "__init__", "ppo", "grpo", "dpo", "reinforce", "distributed", "sampling",
    "checks", "toy_data", "lora", "reward_model")} | set((PACKAGE / "families").glob("*.py"))


def _ids(p):
    return str(p.relative_to(PACKAGE))


@pytest.mark.parametrize("path", MATH, ids=_ids)
def test_math_imports_nothing_above_it(path):
    above = ("artifex_fn._src.algorithms", "artifex_fn._src.families",
             "artifex_fn._src.sampling", "artifex_fn.training",
             "artifex_fn.experiments", "artifex_fn.generative_models",
             "artifex_fn.ppo", "artifex_fn.grpo", "artifex_fn.dpo",
             "artifex_fn.reinforce", "artifex_fn.families",
             "artifex_fn.sampling")
    upward = [m for m in _imports(path) if m.startswith(above)]
    assert not upward, f"{path.name} imports {upward}"


@pytest.mark.parametrize("path", BELOW_TRAINERS, ids=_ids)
def test_no_upward_import_of_the_trainer_layer(path):
    upward = [m for m in _imports(path)
              if m == "artifex_fn.training" or m.startswith(
                  ("artifex_fn.training.", "artifex_fn.generative_models",
                   "artifex_fn.experiments"))]
    assert not upward, f"{path.name} imports {upward}"


def test_the_experiments_are_programs_below_the_trainers():
    """The CLI's tasks are pure programs on layer 2: no trainer layer."""
    bad = {_ids(p): m for p in ALL_FILES if _in(p, "experiments")
           for m in _imports(p) if m == "artifex_fn.training"
           or m.startswith(("artifex_fn.training.",
                            "artifex_fn.generative_models"))}
    assert not bad


def test_only_the_experiments_import_the_experiments():
    bad = {_ids(p): m for p in ALL_FILES if not _in(p, "experiments")
           for m in _imports(p) if m.startswith("artifex_fn.experiments")}
    assert not bad


def test_private_modules_only_behind_the_facades():
    bad = {}
    for path in ALL_FILES:
        if _in(path, "_src") or path in FACADES:
            continue
        own = _module_name(path)
        for m in _imports(path):
            private = [part for part in m.split(".")[1:]
                       if part.startswith("_") and not part.startswith("__")]
            if m.startswith("artifex_fn.") and private and not m.startswith(
                    own.rsplit(".", 1)[0] + "._") and not m.startswith(
                    own + "._"):
                bad.setdefault(_ids(path), []).append(m)
    assert not bad, bad


PRIVATE_FLAX = ("_raw_value", "_var_metadata", "_object__state",
                "_graph_node", "_pytree__state")


@pytest.mark.parametrize("path", ALL_FILES, ids=_ids)
def test_no_dependency_internals(path):
    source = path.read_text()
    tree = ast.parse(source)
    bad = [m for m in _imports(path)
           if m.startswith(("jax._src", "flax.nnx._", "flax._", "optax._src",
                            "distrax._src", "chex._src"))
           or "._src" in m and not m.startswith("artifex_fn")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_FLAX:
            bad.append(node.attr)
        if (isinstance(node, ast.Attribute) and node.attr == "__getattribute__"
                and isinstance(node.value, ast.Name)
                and node.value.id == "object"):
            bad.append("object.__getattribute__")
        if isinstance(node, ast.Constant) and node.value in PRIVATE_FLAX:
            bad.append(node.value)
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in ("nnx", "flax", "jax", "optax",
                                      "distrax", "chex", "lax", "jnp")):
            bad.append(f"{node.value.id}.{node.attr}")
    assert not bad, f"{path.name} uses {bad}"


def _public_modules():
    names = set()
    for path in ALL_FILES:
        name = _module_name(path)
        parts = name.split(".")
        if any(p.startswith("_") for p in parts[1:]):
            continue
        if parts[:2] == ["artifex_fn", "generative_models"]:
            continue
        names.add(name)
    return sorted(names)


def test_one_public_path_per_name():
    homes = {}
    for name in _public_modules():
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr)
            if isinstance(obj, (types.ModuleType, str, int, float, tuple,
                                frozenset, dict)):
                continue
            homes.setdefault(id(obj), (attr, []))[1].append(name)
    twice = {attr: where for attr, where in homes.values() if len(where) > 1}
    assert not twice, twice


def test_guide_package_holds_only_objects_of_their_homes():
    """The compatibility package defines no class or function of its own
    apart from the guide's RL utility functions."""
    guide = PACKAGE / "generative_models"
    for path in guide.rglob("*.py"):
        if path.name == "utils.py":
            continue
        tree = ast.parse(path.read_text())
        defs = [n.name for n in tree.body
                if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defs, (path, defs)


def test_no_repeated_blocks_of_six_lines():
    out = subprocess.run(
        [sys.executable, "-m", "pylint", "--disable=all",
         "--enable=duplicate-code", "--min-similarity-lines=6",
         "--ignore-imports=yes", "--score=no", str(PACKAGE)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "R0801" not in out.stdout, out.stdout
    assert out.returncode == 0, out.stdout + out.stderr
