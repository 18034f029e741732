"""The documentation site: it builds in strict mode, its API reference is the
public API, and every code block of every page runs.

* The API pages (``docs/api``) document each public name (listed in a
  public module's ``__all__``) with one ``::: module.name`` directive, and
  nothing else; each public module has its page.
* ``mkdocs build --strict`` fails on a missing page, a broken link or
  anchor, or a docstring that the API pages cannot parse.
* Python blocks run in order, one namespace a page, in a fresh working
  directory; a page's printed output is checked where ``EXPECT`` says.
  Shell blocks are checked without running their (minutes-long) jobs:
  ``artifex-fn`` lines must parse with the CLI's own parser (``artifex-fn
  tasks`` runs), ``make`` lines must name a Makefile target, ``python
  path ...`` lines a file of the repository.
"""

from __future__ import annotations

import importlib
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")
               if not p.relative_to(DOCS).as_posix().startswith("api/"))
# Public modules whose names the API pages document. The guide's
# compatibility package (``artifex_fn.generative_models``) re-exports these
# objects under the guide's paths; it has one page of its own, a table.
COMPAT = "artifex_fn.generative_models"


def _fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def _page(name: str) -> str:
    return (DOCS / name).read_text()


def public_names() -> tuple[set[str], set[str]]:
    """``(modules, names)``: the public modules (from ``artifex_fn``'s
    package tree, those with an ``__all__``) and their non-module public
    names as ``module.name``."""
    import pkgutil

    import artifex_fn
    modules, names, todo = set(), set(), ["artifex_fn"]
    todo += [m.name for m in pkgutil.walk_packages(artifex_fn.__path__,
                                                   "artifex_fn.")]
    for name in todo:
        if ("._" in name or name.startswith(COMPAT)
                or name in modules):
            continue
        module = importlib.import_module(name)
        if not hasattr(module, "__all__"):
            continue
        modules.add(name)
        for item in module.__all__:
            obj = getattr(module, item)
            if isinstance(obj, types.ModuleType):
                assert obj.__name__ == f"{name}.{item}", (name, item)
                todo.append(obj.__name__)
            else:
                names.add(f"{name}.{item}")
    return modules, names


def documented() -> tuple[dict[str, str], set[str]]:
    """``(module -> page, names)`` from the ``:::`` directives of the API
    pages: a directive with ``members: false`` introduces a module."""
    pages, names = {}, set()
    for page in sorted((DOCS / "api").rglob("*.md")):
        text = page.read_text()
        for found in re.finditer(r"^::: (\S+)\n((?:    .*\n)*)", text,
                                 flags=re.M):
            ident, options = found.groups()
            if "members: false" in options:
                if "._src." not in ident:
                    assert ident not in pages, (ident, page)
                    pages[ident] = page.relative_to(DOCS).as_posix()
            else:
                assert ident not in names, f"{ident} documented twice"
                names.add(ident)
    return pages, names


def test_api_reference_is_the_public_api():
    modules, names = public_names()
    pages, doc_names = documented()
    # The guide's own utility functions (wrappers with the guide's
    # signatures) live only in its package and are documented on its page.
    from artifex_fn.generative_models.training.rl import utils
    names |= {f"{utils.__name__}.{n}" for n in utils.__all__
              if n.startswith("compute_")}
    assert sorted(doc_names - names) == [], "documented but not public"
    assert sorted(names - doc_names) == [], "public but not documented"
    assert sorted(modules - set(pages)) == [], "public module without a page"
    assert sorted(set(pages) - modules) == []
    # Every API page is in the site's navigation, and so is every guide.
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in set(pages.values()) | set(PAGES):
        assert page in nav, page


def test_compat_page_maps_every_guide_import():
    """The guide's package: every name it exports appears on its page with
    the library's own path of the same object."""
    text = _page("api/guide-compat.md")
    for sub in ("", ".callbacks", ".trainers", ".rl.utils"):
        module = importlib.import_module(COMPAT + ".training" + sub)
        for item in module.__all__:
            obj = getattr(module, item)
            if isinstance(obj, types.ModuleType):
                continue
            row = re.search(rf"^\| `{re.escape(item)}` \| `([\w.]+)` \|",
                            text, flags=re.M)
            assert row, f"{COMPAT}.training{sub}.{item} missing"
            home, _, attr = row.group(1).rpartition(".")
            assert getattr(importlib.import_module(home), attr) is obj, item


def test_site_builds_in_strict_mode(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        # (Material prints a banner about MkDocs 2 on stderr without it.)
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-4000:]
    home = (tmp_path / "site" / "index.html").read_text()
    assert "GRPOTrainer" in home
    api = (tmp_path / "site" / "api" / "math" / "index.html").read_text()
    assert 'id="artifex_fn.gae_advantages"' in api
    assert '<div class="arithmatex">' in api      # maths for MathJax
    assert ":func:`" not in api and ".. math::" not in api
    assert (tmp_path / "site" / "assets" / "mathjax" / "tex-svg.js").exists()


# Pages run on the xdist worker of the tests whose work they share: the
# arith task's small pre-trained model (cached on disk by
# tests/test_arith.py), and programs that another test compiles with the
# same shapes (a lookup in the worker's compilation cache).
PAGE_GROUPS = {
    "getting-started.md": "arith-reduced",
    "guides/language-models.md": "arith-reduced",
    "guides/preferences.md": "tiny-lm-trainers",   # tests/test_rlhf.py, test_online_dpo.py
    "guides/cli.md": "cartpole-ppo-step",         # tests/test_cli.py
    "guides/diffusion.md": "diffusion-example",   # tests/test_example_scripts.py
}


def _number(pattern: str, out: str) -> float:
    found = re.search(pattern, out)
    assert found, (pattern, out[-2000:])
    return float(found.group(1))


# What a page's examples print that a test can hold them to.
EXPECT = {
    "index.md": lambda out: _number(r"mean reward (-?[\d.]+)", out) > -0.5,
    # GRPO on text (4 questions, 25 steps): the exact-answer reward read
    # from the decoded answers rises from the pre-trained rate of ~0.2.
    "getting-started.md": lambda out: _number(
        r"exact-answer reward ([\d.]+)", out) > 0.5,
    # The reward model separates its (separable) training pairs; PPO
    # against it reports finite score, KL and coefficient.
    "guides/preferences.md": lambda out: (
        _number(r"reward-model accuracy ([\d.]+)", out) == 1.0
        and all(math.isfinite(_number(rf"{k} (-?[\d.]+)", out))
                for k in ("PPO score", "KL", "beta"))),
    # GRPO over denoising chains moves samples into the reward's wedge.
    "guides/diffusion.md": lambda out: (lambda m: float(m[2]) > float(m[1]))(
        re.search(r"in the wedge: ([\d.]+) -> ([\d.]+)", out)),
    "guides/cli.md": lambda out: (pathlib.Path("runs/sweep/metrics.jsonl")
                                  .exists()),
}


def _python_pages():
    return [p for p in PAGES if _fenced(_page(p), "python")]


@pytest.mark.parametrize(
    "page", [pytest.param(p, marks=pytest.mark.xdist_group(PAGE_GROUPS[p]))
             if p in PAGE_GROUPS else p for p in _python_pages()])
def test_page_examples_run(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)        # examples that write runs/ write here
    scope = {"__name__": "__docs__"}
    for i, block in enumerate(_fenced(_page(page), "python")):
        exec(compile(block, f"docs/{page} block {i}", "exec"), scope)
    out = capsys.readouterr().out
    if page in EXPECT:
        assert EXPECT[page](out), out[-2000:]


def _shell_lines():
    for page in PAGES:
        for block in _fenced(_page(page), "bash"):
            for line in block.splitlines():
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    yield page, line


def test_page_shell_commands_are_valid():
    from artifex_fn.experiments import cli

    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(),
                             flags=re.M))
    seen = set()
    for page, line in _shell_lines():
        words = shlex.split(line)
        env = [w for w in words if re.match(r"^[A-Z_]+=", w)]
        words = words[len(env):] if words[:len(env)] == env else words
        if words[0] == "artifex-fn":
            args = cli.build_parser().parse_args(words[1:])
            assert args is not None, line
        elif words[0] == "make":
            assert set(w for w in words[1:] if "=" not in w) <= targets, line
        elif words[0] in ("python", "python3"):
            assert (ROOT / words[1]).exists() or words[1] == "-m", line
        elif words[0] in ("git", "cd", "pip", "open", "xdg-open"):
            pass                       # set-up lines, shown as they are
        else:
            raise AssertionError(f"{page}: unchecked command {line!r}")
        seen.add(words[0])
    assert {"artifex-fn", "make"} <= seen
    assert cli.main(["tasks"]) == 0


def test_config_tables_match_the_configs():
    """Each ``### `XConfig``` table lists every field of the config with its
    default, in order."""
    import dataclasses

    from artifex_fn import dpo, grpo, kto, online_dpo, orpo, ppo
    from artifex_fn import reinforce, reward_model
    configs = {c.__name__: c for c in (
        reinforce.REINFORCEConfig, ppo.PPOConfig, grpo.GRPOConfig,
        dpo.DPOConfig, online_dpo.OnlineDPOConfig, kto.KTOConfig,
        orpo.ORPOConfig, reward_model.RewardModelConfig)}
    seen = set()
    for page in PAGES:
        for name, rows in re.findall(
                r"^### `(\w+Config)`\n\n\| field .*\n\|[-|]+\n((?:\|.*\n)+)",
                _page(page), flags=re.M):
            table = re.findall(r"^\| `(\w+)` \| (.+?) \|", rows, flags=re.M)
            fields = dataclasses.fields(configs[name])
            assert [f for f, _ in table] == [f.name for f in fields], name
            for (_, shown), f in zip(table, fields):
                assert shown == f"`{f.default!r}`", (name, f.name, shown)
            seen.add(name)
    assert seen == set(configs), set(configs) - seen
