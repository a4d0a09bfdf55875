"""Griffe extension: the reStructuredText roles of curvlib's docstrings, as Markdown.

curvlib's docstrings are numpy-style with Sphinx roles. For the mkdocstrings pages,
``:math:`x``` becomes inline math, a ``.. math::`` directive a display equation, and
``:class:`~a.b.C```, ``:func:``, ``:meth:``, ``:attr:``, ``:mod:``, ``:data:``, ``:exc:``
and ``:obj:`` become inline code (the last component with ``~``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_MATH = re.compile(r":math:`([^`]+)`")
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([^`]+)`")


def _role(m: re.Match) -> str:
    tilde, target = m.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _display_math(text: str) -> str:
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)\.\. math::\s*(.*)$", line)
        if not m:
            out.append(line)
            i += 1
            continue
        indent, body = m.group(1), [m.group(2)] if m.group(2).strip() else []
        i += 1
        while (
            i < len(lines)
            and lines[i].strip()
            and (len(lines[i]) - len(lines[i].lstrip()) > len(indent))
        ):
            body.append(lines[i].strip())
            i += 1
        out += ["", f"{indent}\\[", *(f"{indent}{b}" for b in body), f"{indent}\\]", ""]
    return "\n".join(out)


def convert(text: str) -> str:
    """One docstring, reStructuredText roles replaced by Markdown."""
    text = _display_math(text)
    text = _MATH.sub(lambda m: f"\\({m.group(1)}\\)", text)
    return _ROLE.sub(_role, text)


class RstToMarkdown(griffe.Extension):
    """Convert every docstring when griffe loads it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
