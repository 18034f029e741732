"""Griffe extension: docstrings written for reading in a terminal, shown as Markdown.

The library's docstrings use reStructuredText roles (``:func:`name```) and
bare doctest sessions. This extension rewrites, on the docs' copy only:

* a role ``:func:`~a.b.c``` to the code span ``c`` (``a.b.c`` without ``~``);
* ``:math:`x``` to inline maths ``\\(x\\)``, and a ``.. math::`` directive
  (its expression on the same line or indented below) to display maths
  ``\\[ ... \\]``, which MathJax typesets;
* a run of ``>>>`` / ``...`` lines and the output lines after it to a
  fenced ``pycon`` block, so that Markdown neither quotes nor reflows it.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|class|mod|data|attr|meth|obj|exc):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


_MATH_ROLE = re.compile(r":math:`([^`]+)`")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _math_block(lines, i, indent):
    """The ``.. math::`` directive at ``lines[i]``: its expression (same
    line, or the lines indented below it, blank lines inside included)."""
    body = [lines[i].strip()[len(".. math::"):].strip()]
    i += 1
    while i < len(lines) and (lines[i].strip() and _indent(lines[i]) > indent
                              or not lines[i].strip() and i + 1 < len(lines)
                              and _indent(lines[i + 1]) > indent
                              and lines[i + 1].strip()):
        body.append(lines[i].strip())
        i += 1
    body = [b for b in body if b]
    return ["", "\\["] + body + ["\\]", ""], i


def _doctest_block(lines, i, indent):
    """The doctest session at ``lines[i]`` up to the next blank line."""
    block = []
    while i < len(lines) and lines[i].strip():
        block.append(lines[i][indent:] if _indent(lines[i]) >= indent
                     else lines[i].strip())
        i += 1
    return ["```pycon"] + block + ["```"], i


def _rewrite(text: str, marker: str, block) -> str:
    """Replaces each run of lines starting (after indentation) with
    ``marker`` by what ``block(lines, i, indent)`` makes of it."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if not lines[i].lstrip().startswith(marker):
            out.append(lines[i])
            i += 1
            continue
        indent = _indent(lines[i])
        new, i = block(lines, i, indent)
        out += [" " * indent + b if b else b for b in new]
    return "\n".join(out)


class MarkdownDocstrings(griffe.Extension):
    """Rewrites roles and doctest sessions of every loaded docstring."""

    def on_instance(self, *, obj, **kwargs) -> None:  # noqa: D102
        doc = getattr(obj, "docstring", None)
        if doc is None or not doc.value:
            return
        value = _ROLE.sub(_role, doc.value)
        value = _MATH_ROLE.sub(lambda m: "\\(" + m.group(1) + "\\)", value)
        if ".. math::" in value:
            value = _rewrite(value, ".. math::", _math_block)
        if ">>>" in value:
            value = _rewrite(value, ">>>", _doctest_block)
        doc.value = value
