"""Validation of state dicts and constructor arguments (private).

Bad input gets an :class:`~curvlib.errors.InputError` naming the key (or argument), the
entry and what was expected; a non-finite tensor in a state dict a
:class:`~curvlib.errors.NonFiniteError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from curvlib.errors import InputError, NonFiniteError


def check_keys(
    state_dict: Any, owner: str, required: Iterable[str], optional: Iterable[str] = ()
) -> Mapping[str, Any]:
    """``state_dict`` as a mapping with all ``required`` keys and no others than ``optional``."""
    if not isinstance(state_dict, Mapping):
        raise InputError(
            f"a {owner} state dict must be a dict (as returned by {owner}.state_dict()); "
            f"got {type(state_dict).__name__}"
        )
    required, optional = set(required), set(optional)
    missing = required - set(state_dict)
    if missing:
        raise InputError(
            f"not a {owner} state dict: missing keys {sorted(missing)} (got {sorted(state_dict)})"
        )
    unexpected = set(state_dict) - required - optional
    if unexpected:
        raise InputError(
            f"not a {owner} state dict: unexpected keys {sorted(unexpected)}; expected "
            f"{sorted(required | optional)}"
        )
    return state_dict


def check_finite(t: Tensor, what: str) -> Tensor:
    """``t`` itself; :class:`NonFiniteError` naming ``what`` if it has NaN or inf values."""
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{what} has non-finite values (NaN or inf); refusing to load it")
    return t


def as_list(value: Any, what: str, expected: str) -> list[Any]:
    """``value`` (a list or tuple, not a string or tensor) as a list; else :class:`InputError`."""
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{what} must be {expected}; got {type(value).__name__}")
    return list(value)


def as_tensor(value: Any, what: str, allow_none: bool = False) -> Tensor | None:
    """``value`` if it is a tensor (or ``None`` where allowed); else :class:`InputError`."""
    if value is None and allow_none:
        return None
    if not isinstance(value, Tensor):
        more = " or None" if allow_none else ""
        raise InputError(f"{what} must be a torch.Tensor{more}; got {type(value).__name__}")
    return value


def tensor_entries(
    value: Any, owner: str, key: str, *, allow_none: bool = False, finite: bool = True
) -> list[list[Tensor | None]]:
    """A list of lists of tensors (``None`` where allowed), each tensor checked finite."""
    kind = "tensors or None" if allow_none else "tensors"
    expected = f"a list (one per entry) of lists of {kind}"
    entries = as_list(value, f"{owner} state dict key {key!r}", expected)
    out: list[list[Tensor | None]] = []
    for i, entry in enumerate(entries):
        items = as_list(entry, f"{owner} state dict key {key!r}, entry {i},", f"a list of {kind}")
        row: list[Tensor | None] = []
        for j, t in enumerate(items):
            what = f"{owner} state dict key {key!r}, entry {i}, factor {j}"
            t = as_tensor(t, what, allow_none)
            if t is not None and finite:
                check_finite(t, what)
            row.append(t)
        out.append(row)
    return out


def tensor_field(value: Any, owner: str, key: str) -> Tensor:
    """A finite tensor stored under ``key``."""
    what = f"{owner} state dict key {key!r}"
    t = as_tensor(value, what)
    assert t is not None
    return check_finite(t, what)


def groups_field(value: Any, owner: str, n: int) -> list[int | None] | None:
    """Per-entry group counts: ``None`` (infer) or a list of ``n`` items, each ``None`` or an
    int >= 1."""
    if value is None:
        return None
    items = as_list(value, f"{owner} state dict key 'groups'", "a list of int or None")
    if len(items) != n:
        raise InputError(f"{owner} state dict key 'groups' has {len(items)} items for {n} entries")
    return [
        check_groups(g, f"{owner} state dict key 'groups', item {i}") for i, g in enumerate(items)
    ]


def check_groups(g: Any, what: str) -> int | None:
    """``None`` or an int >= 1; else :class:`InputError`."""
    if g is None:
        return None
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise InputError(f"{what} must be None (ungrouped) or an int >= 1; got {g!r}")
    return g
