r"""Wrappers of the plain results: :class:`Dense` (``full``) and :class:`Diagonal` (``diag``).

``curv.full(x, y)`` returns a ``(P, P)`` tensor and ``curv.diag(x, y)`` a ``(P,)`` tensor;
``Dense(H)`` and ``Diagonal(h)`` give them the protocol of every curvature structure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvlib.errors import InputError
from curvlib.structures._kernels import (
    LogdetAccumulator,
    as_scalar,
    check_exponent,
    check_W,
    is_delta_like,
    parse_delta,
)
from curvlib.structures._state import as_tensor, check_keys, tensor_field
from curvlib.structures.base import CurvatureStructure
from curvlib.structures.blockdiag import SymmetricBlocks

__all__ = ["Dense", "Diagonal"]


class Dense(SymmetricBlocks):
    r"""A dense symmetric ``P × P`` matrix :math:`H` (e.g. the result of ``full``).

    Powers :math:`H^p = V \operatorname{diag}(w^p) V^\top` use the eigendecomposition of the
    symmetric part :math:`(H + H^\top)/2` (float64, cached while ``H`` requires no gradient);
    ``bmm`` with exponent 1 uses ``H`` itself. ``logdet`` uses ``torch.linalg.slogdet``.

    Parameters
    ----------
    H : Tensor
        Square 2-D tensor.

    Notes
    -----
    ``+ delta`` takes a scalar (:math:`H + \delta I`) or one value per parameter
    (:math:`H + \operatorname{diag}(\delta)`).
    """

    def __init__(self, H: Tensor) -> None:
        H = as_tensor(H, "Dense H")
        if H.ndim != 2 or H.shape[0] != H.shape[1]:
            raise InputError(f"Dense H must be a square 2-D tensor; got shape {tuple(H.shape)}")
        super().__init__([H], "Dense")

    @property
    def matrix(self) -> Tensor:
        """The wrapped ``(P, P)`` tensor."""
        return self._blocks[0]

    def _with_blocks(self, blocks: list[Tensor]) -> Dense:
        return Dense(blocks[0])

    def _delta_lengths(self) -> dict[int, str]:
        return {self.num_params: "one per parameter"}

    def __repr__(self) -> str:
        return f"Dense(num_params={self.num_params}, dtype={self.dtype}, device={self.device})"

    def state_dict(self) -> dict[str, Any]:
        """``{"matrix": Tensor}`` (detached)."""
        return {"matrix": self.matrix.detach()}

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any]) -> Dense:
        """Rebuild a ``Dense`` from :meth:`state_dict` (validated: keys, type, shape, finite)."""
        sd = check_keys(state_dict, "Dense", {"matrix"})
        return cls(tensor_field(sd["matrix"], "Dense", "matrix"))


class Diagonal(CurvatureStructure):
    r"""A diagonal matrix :math:`\operatorname{diag}(h)` (e.g. the result of ``diag``).

    Every operation is elementwise: :math:`M^p w = h^p \odot w`,
    :math:`\log\det M = \sum_i \log h_i`, :math:`\operatorname{tr} M = \sum_i h_i`.

    Parameters
    ----------
    h : Tensor
        The diagonal, shape ``(P,)``.

    Notes
    -----
    ``+ delta`` takes a scalar or one value per parameter (:math:`h + \delta`).
    """

    def __init__(self, h: Tensor) -> None:
        h = as_tensor(h, "Diagonal h")
        if h.ndim != 1:
            raise InputError(f"Diagonal h must be a 1-D tensor (P,); got shape {tuple(h.shape)}")
        self.h: Tensor = h

    @property
    def num_params(self) -> int:
        """``P = len(h)``."""
        return self.h.shape[0]

    def _reference(self) -> Tensor:
        return self.h

    def __repr__(self) -> str:
        return f"Diagonal(num_params={self.num_params}, dtype={self.dtype}, device={self.device})"

    def bmm(self, W: Tensor, exponent: float = 1) -> Tensor:
        r""":math:`h^p \odot w` for every vector ``w`` in ``W`` (shape kept)."""
        check_W(W, self.num_params, self.dtype)
        return W * self.diag(exponent)

    def logdet(self) -> Tensor:
        r""":math:`\sum_i \log h_i` (``-inf`` if some :math:`h_i = 0`, ``nan`` if an odd number
        are negative)."""
        acc = LogdetAccumulator(self.dtype, self.device)
        acc.add_values(self.h)
        return acc.total()

    def trace(self) -> Tensor:
        r""":math:`\sum_i h_i`."""
        return self.h.sum()

    def diag(self, exponent: float = 1) -> Tensor:
        """:math:`h^p`, shape ``(P,)``."""
        p = check_exponent(exponent)
        return self.h if p == 1 else self.h.pow(p)

    def to_matrix(self, exponent: float = 1) -> Tensor:
        """:math:`\\operatorname{diag}(h^p)`, shape ``(P, P)``."""
        return torch.diag(self.diag(exponent))

    def __add__(self, delta: float | Tensor) -> Diagonal:
        r""":math:`\operatorname{diag}(h + \delta)`, ``delta`` a scalar or ``(P,)``."""
        if isinstance(delta, CurvatureStructure) or not is_delta_like(delta):
            return NotImplemented
        d = parse_delta(delta, {self.num_params: "one per parameter"}, self.dtype, self.device)
        return Diagonal(self.h + d)

    def __mul__(self, scalar: float | Tensor) -> Diagonal:
        r""":math:`\operatorname{diag}(s h)`."""
        s = as_scalar(scalar)
        if s is None:
            return NotImplemented
        return Diagonal(self.h * s)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Diagonal:
        return Diagonal(fn(self.h))

    def state_dict(self) -> dict[str, Any]:
        """``{"diagonal": Tensor}`` (detached)."""
        return {"diagonal": self.h.detach()}

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any]) -> Diagonal:
        """Rebuild a ``Diagonal`` from :meth:`state_dict` (validated: keys, type, shape,
        finite)."""
        sd = check_keys(state_dict, "Diagonal", {"diagonal"})
        return cls(tensor_field(sd["diagonal"], "Diagonal", "diagonal"))
