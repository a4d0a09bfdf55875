"""Library bugs the suite has found and not yet seen fixed: one place, each with its reason.

A test of ``(backend, curvature, entry, model)`` that :func:`known_bug` names is marked
``xfail(strict=True)``: it must fail as long as the bug is there, and fixing the bug makes
it fail until its entry here is removed. Models are the shared cases of ``tests/cases.py``
and the models of ``tests/test_capabilities.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Bug:
    """A library bug and where it shows: ``applies(backend, curvature, entry, model)``."""

    name: str
    reason: str
    applies: Callable[[str, str, str, str], bool]


BUGS: tuple[Bug, ...] = ()


def known_bug(backend: str, curvature: str, entry: str, model: str) -> str | None:
    """The reasons of the bugs that show in this test (``None`` if none)."""
    reasons = [
        f"[{g.name}] {g.reason}" for g in BUGS if g.applies(backend, curvature, entry, model)
    ]
    return " ".join(reasons) or None


def marks(backend: str, curvature: str, entry: str, model: str) -> list:
    bug = known_bug(backend, curvature, entry, model)
    return [pytest.mark.xfail(strict=True, reason=bug)] if bug else []


def expect_bug(bug: str, run: Callable[[], object]) -> None:
    """Inside a loop (the dummy backend's tests): ``run()`` must still fail."""
    try:
        run()
    except (AssertionError, Exception):
        return
    raise AssertionError(f"a known bug no longer shows; remove it from known_bugs.py: {bug}")
