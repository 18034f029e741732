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


def _display_maths(text: str) -> str:
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if not stripped.startswith(".. math::"):
            out.append(line)
            i += 1
            continue
        indent = line[:len(line) - len(stripped)]
        body = [stripped[len(".. math::"):].strip()]
        i += 1
        while i < len(lines) and (not lines[i].strip() or
                                  len(lines[i]) - len(lines[i].lstrip())
                                  > len(indent)):
            if not lines[i].strip() and (i + 1 >= len(lines) or not (
                    len(lines[i + 1]) - len(lines[i + 1].lstrip())
                    > len(indent))):
                break
            body.append(lines[i].strip())
            i += 1
        body = [b for b in body if b]
        out += ["", indent + "\\["] + [indent + b for b in body] + [indent + "\\]", ""]
    return "\n".join(out)


def _fence_doctests(text: str) -> str:
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if not stripped.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[:len(line) - len(stripped)]
        block = []
        while i < len(lines) and lines[i].strip():
            block.append(lines[i][len(indent):] if lines[i].startswith(indent)
                         else lines[i].strip())
            i += 1
        out += [indent + "```pycon"] + [indent + b for b in block] + [indent + "```"]
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
            value = _display_maths(value)
        if ">>>" in value:
            value = _fence_doctests(value)
        doc.value = value
