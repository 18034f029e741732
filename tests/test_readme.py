"""The README's quick start runs as pasted (the site's pages, where every
other example lives, run in ``tests/test_docs.py``)."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quick_start_is_short_and_trains(capsys):
    (quick,) = _blocks()
    assert "GRPOTrainer" in quick
    assert len(quick.strip().splitlines()) <= 20
    exec(compile(quick, "README quick start", "exec"), {})
    out = capsys.readouterr().out
    reward = float(re.search(r"mean reward (-?[\d.]+)", out).group(1))
    assert reward > -0.5
    # The site's home page shows the same quick start.
    assert quick in (DOCS / "index.md").read_text()


def test_links_into_the_docs_resolve():
    links = re.findall(r"\]\((docs/[^)#]+)", README.read_text())
    assert len(links) >= 10
    for link in links:
        assert (README.parent / link).is_file(), link
