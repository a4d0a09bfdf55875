r"""Tensor kernels shared by the structure containers (private).

Entries of the Kronecker-type containers (:class:`~curvlib.structures.Kron`,
:class:`~curvlib.structures.KronDecomposed`, :class:`~curvlib.structures.EKFAC`) are handled
in one *batched* form: an entry with factor sizes ``(d_1, ..., d_n)`` and ``b`` groups
(``b = 1`` for an ungrouped entry) acts on a slice of a vector reshaped to
``(b, d_1, ..., d_n)``; its factors are ``(b, d, d)`` (dense) or ``(b, d)`` (diagonal), and
``None`` stands for the identity.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from curvlib.errors import InputError


class Layout(NamedTuple):
    """Shape of one entry: ``groups`` (``None`` = ungrouped) and per-group factor sizes."""

    groups: int | None
    dims: tuple[int, ...]

    @property
    def batch(self) -> int:
        """Number of groups, 1 for an ungrouped entry."""
        return 1 if self.groups is None else self.groups

    @property
    def numel(self) -> int:
        """Number of parameters of the entry, ``batch * prod(dims)``."""
        return self.batch * math.prod(self.dims)


# ------------------------------------------------------------------------------ arguments
def as_scalar(scalar: Any) -> float | Tensor | None:
    """Return ``scalar`` as a python float or a 0-dim tensor, or ``None`` if not a number.

    Raises :class:`InputError` for a tensor with more than one element or a complex value.
    """
    if isinstance(scalar, Tensor):
        if scalar.numel() != 1 or scalar.ndim > 1:
            raise InputError(
                "can only multiply by a real scalar: a python number, a 0-dim tensor or a "
                f"tensor of one element; got a tensor of shape {tuple(scalar.shape)}"
            )
        if scalar.is_complex():
            raise InputError("can only multiply by a real scalar; got a complex tensor")
        return scalar.reshape(())
    if isinstance(scalar, numbers.Real):
        return float(scalar)
    if isinstance(scalar, numbers.Number):
        raise InputError(f"can only multiply by a real scalar; got {scalar!r}")
    return None


def check_exponent(exponent: Any) -> float:
    """``exponent`` as a python float; :class:`InputError` unless it is a real number."""
    if isinstance(exponent, Tensor) and exponent.numel() == 1 and not exponent.is_complex():
        return float(exponent.item())
    if isinstance(exponent, numbers.Real) and not isinstance(exponent, bool):
        return float(exponent)
    raise InputError(f"exponent must be a real number, got {exponent!r}")


def is_delta_like(delta: Any) -> bool:
    """Whether ``delta`` is a candidate for ``structure + delta`` (a real number or a tensor)."""
    return isinstance(delta, Tensor) or (
        isinstance(delta, numbers.Real) and not isinstance(delta, bool)
    )


def parse_delta(
    delta: Any, lengths: dict[int, str], dtype: torch.dtype | None, device: Any
) -> Tensor:
    """``delta`` as a 0-dim tensor (a scalar) or a 1-D tensor of one of ``lengths``.

    ``lengths`` maps an allowed vector length to what it means (``{E: "one per entry"}``).
    A one-element tensor counts as a scalar. Raises :class:`InputError` otherwise.
    """
    options = ["1", *(f"{n} ({what})" for n, what in lengths.items())]
    allowed = ", ".join(options[:-1]) + " or " + options[-1]
    expected = f"a real scalar, a 0-dim tensor or a 1-D tensor of length {allowed}"
    if not is_delta_like(delta):
        raise InputError(f"delta must be {expected}; got {type(delta).__name__}")
    kw = {"dtype": dtype, "device": device}
    if not isinstance(delta, Tensor):
        return torch.tensor(float(delta), **kw)
    if delta.is_complex():
        raise InputError(f"delta must be real; got a complex tensor. It must be {expected}")
    d = delta.to(**kw)
    if d.numel() == 1 and d.ndim <= 1:
        return d.reshape(())
    if d.ndim == 1 and d.shape[0] in lengths:
        return d
    raise InputError(f"delta must be {expected}; got shape {tuple(delta.shape)}")


def check_W(W: Any, P: int, dtype: torch.dtype | None) -> Tensor:
    """``W`` of shape ``(..., P)`` reshaped to ``(N, P)``; :class:`InputError` otherwise."""
    if not isinstance(W, Tensor):
        raise InputError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim < 1 or W.shape[-1] != P:
        raise InputError(
            f"W must have shape (P,), (K, P) or (B, K, P) with P = {P}; got {tuple(W.shape)}"
        )
    if dtype is not None and W.dtype != dtype:
        raise InputError(f"W has dtype {W.dtype} but the structure has {dtype}; cast one of them")
    return W.reshape(-1, P)


# ------------------------------------------------------------------------------ batched algebra
def batched(f: Tensor | None, grouped: bool) -> Tensor | None:
    """A factor in batched form: an ungrouped factor gets a leading group axis of size 1."""
    return f if f is None or grouped else f.unsqueeze(0)


def outer(vectors: Sequence[Tensor]) -> Tensor:
    """Batched outer product: vectors ``(b, d_k)`` give ``(b, d_1, ..., d_n)``.

    Its row-major flattening per group is ``torch.kron(v_1, ..., v_n)``.
    """
    out = vectors[0]
    for v in vectors[1:]:
        out = out.unsqueeze(-1) * v.reshape(v.shape[0], *([1] * (out.ndim - 1)), v.shape[-1])
    return out


def apply_along(X: Tensor, mats: Sequence[Tensor | None], transpose: bool = False) -> Tensor:
    r"""Apply one matrix per factor axis: ``X`` of shape ``(N, b, d_1, ..., d_n)``.

    Axis ``k + 2`` of group ``j`` is multiplied by ``mats[k][j]`` (by its transpose if
    ``transpose``): a dense ``(b, d_k, d_k)``, a diagonal ``(b, d_k)`` or ``None``
    (identity). Per group the result is :math:`(M_1 \otimes \dots \otimes M_n)\, x` for the
    row-major flattened ``x``.
    """
    for k, M in enumerate(mats):
        if M is None:
            continue
        ax = k + 2
        if M.ndim == 2:
            shape = [1] * X.ndim
            shape[1], shape[ax] = M.shape
            X = X * M.reshape(shape)
        else:
            Xm = torch.movedim(X, ax, -1)
            Xm = torch.einsum("bji,nb...j->nb...i" if transpose else "bij,nb...j->nb...i", M, Xm)
            X = torch.movedim(Xm, -1, ax)
    return X


def dense_factor(f: Tensor) -> Tensor:
    """A batched factor as dense ``(b, d, d)`` matrices."""
    return torch.diag_embed(f) if f.ndim == 2 else f


def kron_all(mats: Sequence[Tensor]) -> Tensor:
    """``torch.kron`` of 2-D matrices, in order."""
    # torch.kron needs contiguous inputs (eigh returns column-major eigenvectors)
    out = mats[0].contiguous()
    for M in mats[1:]:
        out = torch.kron(out, M.contiguous())
    return out


def block_diag(blocks: list[Tensor], dtype: torch.dtype | None, device: Any) -> Tensor:
    """``torch.block_diag`` that also handles no blocks (a ``0 × 0`` matrix)."""
    if not blocks:
        return torch.zeros(0, 0, dtype=dtype, device=device)
    return torch.block_diag(*blocks)


def matvec_entries(
    W2: Tensor, layouts: Sequence[Layout], fn: Callable[[int, Tensor], Tensor]
) -> Tensor:
    """Apply ``fn(i, X_i)`` to the slice of ``W2 (N, P)`` of each entry, ``X_i (N, b, *dims)``."""
    N = W2.shape[0]
    out, cur = [], 0
    for i, lay in enumerate(layouts):
        p = lay.numel
        X = W2[:, cur : cur + p].reshape(N, lay.batch, *lay.dims)
        out.append(fn(i, X).reshape(N, p))
        cur += p
    if not out:
        return W2.clone()
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------------------ log-determinants
class LogdetAccumulator:
    """Sum of ``log|λ|`` with the count of negative values and a zero flag.

    :meth:`total` follows ``torch.logdet``: ``-inf`` if singular, ``nan`` if the determinant
    is negative.
    """

    def __init__(self, dtype: torch.dtype | None, device: Any) -> None:
        self.logabs = torch.zeros((), dtype=dtype, device=device)
        self.n_neg = torch.zeros((), dtype=torch.long, device=device)
        self.has_zero = torch.zeros((), dtype=torch.bool, device=device)

    def add_values(self, lam: Tensor, mult: int = 1) -> None:
        """Add eigenvalues (or a diagonal) ``lam``, each counted ``mult`` times."""
        self.logabs = self.logabs + mult * lam.abs().log().sum()
        self.n_neg = self.n_neg + mult * (lam < 0).sum()
        self.has_zero = self.has_zero | (lam == 0).any()

    def add_slogdet(self, sign: Tensor, logabs: Tensor, mult: int = 1) -> None:
        """Add ``torch.linalg.slogdet`` results (any batch shape), each counted ``mult`` times."""
        self.logabs = self.logabs + mult * logabs.sum()
        self.n_neg = self.n_neg + mult * (sign < 0).sum()
        self.has_zero = self.has_zero | (sign == 0).any()

    def total(self) -> Tensor:
        """The log-determinant."""
        ninf = torch.full_like(self.logabs, -math.inf)
        nan = torch.full_like(self.logabs, math.nan)
        return torch.where(self.has_zero, ninf, torch.where(self.n_neg % 2 == 1, nan, self.logabs))
