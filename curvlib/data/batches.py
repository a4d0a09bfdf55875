"""What a batch of a data loader is: ``(x, y)`` or a dict holding the targets.

The one rule for every loop over data in curvlib (:func:`curvlib.data.fit`, the matrix-free
operator over a data set): a batch is

* a 2-tuple or 2-list ``(x, y)`` — inputs and targets, or
* a ``Mapping`` (HuggingFace style) — the inputs, with the targets inside under the
  curvature's ``dict_key_y``; then ``y`` is ``None``.

Anything else (a single tensor, a triple ``(x, y, w)``, ...) is an
:class:`~curvlib.errors.InputError` that names what was given: nothing is silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from curvlib.errors import InputError

__all__ = ["split_batch", "batch_dim"]


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


def batch_dim(x: Any, key: str) -> int:
    """The batch size of the inputs ``x``: the first dimension (of ``x[key]`` for a dict).

    Parameters
    ----------
    x : Tensor or Mapping
        The inputs.
    key : str
        The curvature's ``dict_key_x``.

    Returns
    -------
    int
        ``B``.

    Raises
    ------
    InputError
        For a dict without ``key``, a 0-dim tensor or anything that is not a tensor.
    """
    if isinstance(x, Mapping):
        if key not in x:
            raise InputError(
                f"dict batch has no key {key!r} (the curvature's dict_key_x); keys: "
                f"{list(x)}; pass batch_size_fn to fit"
            )
        return int(x[key].shape[0])
    if not isinstance(x, Tensor) or x.ndim == 0:
        raise InputError(f"x must be a batched tensor or a dict of tensors, got {type(x).__name__}")
    return int(x.shape[0])
