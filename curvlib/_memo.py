"""A per-call memo: what a call computes several times from the same model and selection.

The template (:mod:`curvlib.interface`) opens one memo for each call, across its steps
(checks, size estimates, the hook, post-processing). Inside it, :func:`memoized` computes
a value once per key: e.g. which K-FAC rule covers each selected parameter, which the
size estimate before and after the forward pass and the layer pass all need. Outside a
call nothing is cached, so a model changed between calls is always seen afresh.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

__all__ = ["call_memo", "memoized"]

T = TypeVar("T")

_MEMO: ContextVar[dict | None] = ContextVar("curvlib_call_memo", default=None)


@contextmanager
def call_memo(memo: dict | None = None) -> Iterator[dict]:
    """Make ``memo`` (default: the enclosing call's, else a new one) the current memo."""
    outer = _MEMO.get()
    current = memo if memo is not None else (outer if outer is not None else {})
    token = _MEMO.set(current)
    try:
        yield current
    finally:
        _MEMO.reset(token)


def memoized(key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, once per ``key`` within the current call (every time outside one)."""
    memo = _MEMO.get()
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def identity_key(kind: str, *objects: Any) -> tuple:
    """A key from object identities (``ids`` of a module and of a sequence of tensors)."""
    return (kind, *(tuple(map(id, o)) if isinstance(o, list | tuple) else id(o) for o in objects))
