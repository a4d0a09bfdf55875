"""Validation of inputs, targets and call options, before any work; batch slicing.

Every check raises a named curvlib error (:mod:`curvlib.errors`) whose message names what
was given, what was expected and the fix. Nothing here runs the model.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from curvlib.errors import InputError, NonFiniteError, TargetError

__all__ = [
    "batch_size",
    "check_inputs",
    "check_targets",
    "check_num_data",
    "check_positive_int",
    "check_generator",
    "MAX_NUM_DATA",
    "slice_batch",
    "split_batch",
    "describe",
]


def describe(x: Any) -> str:
    """``shape (..) and dtype ..`` of a tensor, or the shapes of a dict's tensors."""
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, Mapping):
        parts = [f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in x.items() if isinstance(v, Tensor)]
        return "a dict {" + ", ".join(parts) + "}"
    return f"a {type(x).__name__}"


def batch_size(x: Any, dict_key_x: str) -> int:
    """The batch size ``B`` of an input tensor or dict (``x[dict_key_x].shape[0]``)."""
    if isinstance(x, Mapping):
        if dict_key_x not in x:
            raise InputError(f"dict input has no key {dict_key_x!r} (dict_key_x); keys: {list(x)}")
        t = x[dict_key_x]
        if not isinstance(t, Tensor) or t.ndim == 0:
            raise InputError(
                f"dict input {dict_key_x!r} must be a batched tensor, got {describe(t)}"
            )
        return int(t.shape[0])
    if not isinstance(x, Tensor):
        raise InputError(f"x must be a tensor or a dict of tensors, got {type(x).__name__}")
    if x.ndim == 0:
        raise InputError("x must have a batch dimension, got a 0-dim tensor")
    return int(x.shape[0])


def _bad_rows(t: Tensor) -> list[int]:
    B = t.shape[0]
    bad = ~torch.isfinite(t.reshape(B, -1)).all(dim=1)
    return bad.nonzero().flatten().tolist()


def _indices(idx: list[int]) -> str:
    return f"{idx[:10]}" + (" ..." if len(idx) > 10 else "")


def _check_magnitude(t: Tensor, what: str = "inputs", quadratic: str = "curvature") -> None:
    """NaN / inf entries of ``t``, or entries whose square overflows ``t.dtype``, by row.

    Curvature is quadratic in the inputs (the first layer's blocks hold :math:`x x^\\top`) and
    the squared loss in the regression targets: beyond :math:`\\sqrt{\\max}` of the dtype
    they overflow to infinity.
    """
    # one cheap reduction first: a finite sum of squares bounds every square (NaN and inf
    # propagate through it); only an overflowing sum needs the entry-wise look
    flat = t.detach().reshape(-1)
    if not flat.numel() or bool(torch.dot(flat, flat).isfinite()):
        return
    top = t.detach().abs().max()
    limit = math.sqrt(torch.finfo(t.dtype).max)
    if bool(top.isfinite()) and float(top) <= limit:
        return
    B = t.shape[0]
    flat = t.detach().reshape(B, -1)
    bad = _bad_rows(t)
    if bad:
        raise NonFiniteError(
            f"the {what} contain NaN or infinite values at batch indices {_indices(bad)}"
        )
    rows = (flat.abs() > limit).any(dim=1).nonzero().flatten().tolist()
    raise NonFiniteError(
        f"the {what} reach magnitude {float(top):.3g} at batch indices {_indices(rows)}, "
        f"beyond the square root of the largest {t.dtype} ({limit:.3g}): the {quadratic} "
        f"is quadratic in the {what} and would overflow to infinity; rescale the {what}"
        + (" (or compute in float64)" if t.dtype != torch.float64 else "")
    )


def check_inputs(x: Any, dict_key_x: str, device: torch.device, dtype: torch.dtype) -> int:
    """Check device, dtype, batch size and finiteness of every input tensor; return ``B``.

    Floating-point inputs must have the model's dtype; integer inputs (token ids) are
    passed on as they are.
    """
    B = batch_size(x, dict_key_x)
    leaves = tree_flatten(dict(x) if isinstance(x, Mapping) else x)[0]
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            continue
        if leaf.device != device:
            raise InputError(
                f"input is on {leaf.device} but the model is on {device}; "
                f"move it with x.to({str(device)!r})"
            )
        if torch.is_floating_point(leaf) and leaf.dtype != dtype:
            raise InputError(
                f"input has dtype {leaf.dtype} but the model's parameters have dtype "
                f"{dtype}; convert with x.to({dtype})"
            )
        if torch.is_complex(leaf):
            raise InputError(f"complex inputs are not supported, got {describe(leaf)}")
        if leaf.shape[:1] != (B,):
            raise InputError(
                f"every input tensor must have batch size {B} first, got {tuple(leaf.shape)}"
            )
        if torch.is_floating_point(leaf) and leaf.numel() and not leaf.is_meta:
            _check_magnitude(leaf)
    if B == 0:
        raise InputError("the batch is empty (batch size 0)")
    return B


def check_targets(y: Any, B: int, device: torch.device, likelihood: str) -> Tensor:
    """Checks on the targets that need no forward pass; integer labels become ``long``.

    The rest (shape against the output, class range) is the likelihood's
    ``check_target``, after the first forward pass.
    """
    if not isinstance(y, Tensor):
        raise TargetError(f"targets must be a tensor, got {type(y).__name__}")
    if y.ndim == 0 or y.shape[0] != B:
        raise TargetError(f"targets must have batch size {B} first, got shape {tuple(y.shape)}")
    if y.device != device:
        raise TargetError(f"targets are on {y.device} but the model is on {device}")
    if torch.is_complex(y):
        raise TargetError(f"complex targets are not supported, got {describe(y)}")
    if likelihood == "classification":
        if y.dtype == torch.bool:
            raise TargetError(
                f"classification targets must be integer class indices, got {describe(y)}; "
                "pass y.long()"
            )
        if not torch.is_floating_point(y) and y.dtype != torch.long:
            y = y.long()  # int8/16/32, uint8: the same labels as int64
    elif torch.is_floating_point(y) and y.numel() and not y.is_meta:
        _check_magnitude(y, "regression targets", "loss")
    return y


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as a positive int; else :class:`InputError` naming ``name``.

    Accepted: an integer (Python or NumPy), an integral float (``8.0``), or a one-entry
    integer or integral float tensor. Refused: booleans, strings, fractions, NaN / inf,
    tensors of several entries, zero and negative numbers.
    """
    v = value
    if isinstance(v, Tensor):
        if v.numel() != 1 or v.dtype == torch.bool or v.is_complex() or v.is_meta:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(v, numbers.Integral):
        n = int(v)
    else:
        f = float(v)
        if not math.isfinite(f) or f != math.floor(f):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
        n = int(f)
    if n < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return n


#: the largest ``N``: every integer up to it is exact in float64 (factors divide by ``N``)
MAX_NUM_DATA = 2**53


def check_num_data(N: Any, B: int) -> int:
    """``N`` (the number of data points of the whole data set) as an int, ``B <= N <= 2**53``.

    Raises
    ------
    InputError
        ``N`` not a positive integer (see :func:`check_positive_int`), smaller than the
        batch, or beyond ``2**53`` (no data set is that large; the K-FAC factors divide by
        ``N`` in floating point).
    """
    n = check_positive_int("N (the number of data points)", N)
    if n < B:
        raise InputError(
            f"N (the number of data points) must be at least the batch size {B}, got {N!r}: "
            "N counts the data points of the whole data set the batch belongs to"
        )
    if n > MAX_NUM_DATA:
        raise InputError(
            f"N (the number of data points) must be at most 2**53 = {MAX_NUM_DATA:,} (the "
            f"largest count float64 holds exactly), got {n:.3e}: N counts the data points "
            "of the whole data set the batch belongs to"
        )
    return n


def check_generator(generator: Any, B: int | None) -> None:
    """``None``, one ``torch.Generator``, or a sequence of ``B`` of them (one per data point).

    Raises
    ------
    InputError
        Another type, a sequence holding something else, or a sequence of another length.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return
    if (
        isinstance(generator, (str, bytes, Tensor))
        or not isinstance(generator, Sequence)
        or not all(isinstance(g, torch.Generator) for g in generator)
    ):
        got = type(generator).__name__
        if isinstance(generator, Sequence) and not isinstance(generator, (str, bytes)):
            got += " of " + ", ".join(sorted({type(g).__name__ for g in generator}))
        raise InputError(
            "generator must be a torch.Generator (or a sequence of one per data point), "
            f"got a {got}"
        )
    if B is not None and len(generator) != B:
        raise InputError(
            f"got {len(generator)} generators for a batch of {B}: pass one torch.Generator, "
            "or one per data point"
        )


def slice_batch(inp: Any, s: slice) -> Any:
    """Rows ``s`` of every tensor of an input (tensor, dict or nested structure)."""
    if isinstance(inp, Mapping):
        return {k: (v[s] if isinstance(v, Tensor) else v) for k, v in inp.items()}
    return tree_map(lambda t: t[s] if isinstance(t, Tensor) else t, inp)


def split_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """``(x, y)`` of one loader batch.

    Parameters
    ----------
    batch : tuple, list or Mapping
        A pair ``(x, y)`` (exactly two items), or a dict of inputs that holds the targets
        under the curvature's ``dict_key_y``.

    Returns
    -------
    x : Any
        ``batch[0]``, or the dict itself.
    y : Tensor or None
        ``batch[1]``, or ``None`` for a dict (the curvature reads ``x[dict_key_y]``).

    Raises
    ------
    InputError
        For anything else, naming the type (and the length of a tuple or list).
    """
    if isinstance(batch, Mapping):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    got = type(batch).__name__
    if isinstance(batch, (tuple, list)):
        got += f" of length {len(batch)}"
    raise InputError(
        "loader batches must be (x, y) pairs or dicts (HuggingFace style, the targets under "
        f"the curvature's dict_key_y); got {got}. Wrap the loader, e.g. "
        "((x, y) for x, y, *_ in loader), to drop extra items explicitly"
    )
