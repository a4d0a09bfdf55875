r"""Shared algebra of the eigenbasis structures (private): KronDecomposed and EKFAC.

Both represent, per entry ``i`` (and group ``j``), a block
:math:`Q \operatorname{diag}(\operatorname{vec} L) Q^\top` with a Kronecker-structured
orthonormal basis :math:`Q = Q_1 \otimes \dots \otimes Q_n` (``Q_k = None``: identity) and an
eigenvalue tensor ``L`` of shape ``(d_1, ..., d_n)``. They differ only in how ``L`` is
stored; a subclass provides :meth:`_eigvals` and :meth:`_bases`.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from curvlib.structures._kernels import (
    Layout,
    LogdetAccumulator,
    apply_along,
    batched,
    block_diag,
    check_exponent,
    check_W,
    kron_all,
    matvec_entries,
)
from curvlib.structures.base import CurvatureStructure


class EigenbasisStructure(CurvatureStructure):
    """Private base: block-diagonal :math:`Q \\operatorname{diag}(L) Q^\\top` per entry."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of entries."""

    @abstractmethod
    def _layout(self, i: int) -> Layout:
        """``(groups, dims)`` of entry ``i``."""

    @property
    def layouts(self) -> list[Layout]:
        """``(groups, dims)`` per entry."""
        return [self._layout(i) for i in range(len(self))]

    @abstractmethod
    def _eigvals(self, i: int, exponent: float = 1) -> Tensor:
        """``L_i ** exponent`` of entry ``i`` in batched form ``(b, d_1, ..., d_n)``."""

    @abstractmethod
    def _stored_bases(self, i: int) -> list[Tensor | None]:
        """The stored eigenvectors of entry ``i`` (``(d, d)``, ``(g, d, d)`` or ``None``)."""

    def _bases(self, i: int) -> list[Tensor | None]:
        grouped = self._layout(i).groups is not None
        return [batched(Q, grouped) for Q in self._stored_bases(i)]

    # ---------------------------------------------------------------- properties
    @property
    def dims(self) -> list[tuple[int, ...]]:
        """Factor sizes per entry (per group for a grouped entry)."""
        return [lay.dims for lay in self.layouts]

    @property
    def groups(self) -> list[int | None]:
        """Number of groups per entry (``None``: ungrouped)."""
        return [lay.groups for lay in self.layouts]

    @property
    def num_params(self) -> int:
        """``P``, the side length of the full matrix."""
        return sum(lay.numel for lay in self.layouts)

    # ---------------------------------------------------------------- products
    def bmm(self, W: Tensor, exponent: float = 1) -> Tensor:
        r"""Compute :math:`M^{\mathrm{exponent}} w` for every vector ``w`` in ``W``.

        Per entry (and group) :math:`Q (L^{p} \odot (Q^\top w))`, the Kronecker structure of
        ``Q`` applied factor by factor; no dense matrix is formed. ``W`` and the result as
        :meth:`CurvatureStructure.bmm`."""
        W2 = check_W(W, self.num_params, self.dtype)
        p = check_exponent(exponent)

        def entry(i: int, X: Tensor) -> Tensor:
            Qs = self._bases(i)
            X = apply_along(X, Qs, transpose=True)
            X = X * self._eigvals(i, p)
            return apply_along(X, Qs)

        return matvec_entries(W2, self.layouts, entry).reshape(W.shape)

    # ---------------------------------------------------------------- reductions
    def logdet(self) -> Tensor:
        r"""Log-determinant :math:`\sum_i \sum \log L_i` of the represented matrix.

        Signs follow ``torch.logdet`` of the dense matrix (``-inf`` singular, ``nan``
        negative determinant).
        """
        acc = LogdetAccumulator(self.dtype, self.device)
        for i in range(len(self)):
            acc.add_values(self._eigvals(i))
        return acc.total()

    def trace(self) -> Tensor:
        r""":math:`\operatorname{tr} M = \sum_i \sum L_i`."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for i in range(len(self)):
            total = total + self._eigvals(i).sum()
        return total

    def diag(self, exponent: float = 1) -> Tensor:
        r"""Diagonal of :math:`M^{\mathrm{exponent}}`, shape ``(P,)``.

        Per entry :math:`\operatorname{diag} = (Q_1^{\circ 2} \otimes \dots) L^p` with
        :math:`Q^{\circ 2}` the elementwise square.
        """
        p = check_exponent(exponent)
        diags = []
        for i in range(len(self)):
            L = self._eigvals(i, p).unsqueeze(0)
            sq = [None if Q is None else Q * Q for Q in self._bases(i)]
            diags.append(apply_along(L, sq).flatten())
        if not diags:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        return torch.cat(diags)

    def to_matrix(self, exponent: float = 1) -> Tensor:
        """Dense ``P × P`` :math:`M^{\\mathrm{exponent}}` (for testing and small models only)."""
        p = check_exponent(exponent)
        blocks = []
        for i, lay in enumerate(self.layouts):
            L = self._eigvals(i, p)
            Qs = self._bases(i)
            for j in range(lay.batch):
                eye = [torch.eye(d, dtype=self.dtype, device=self.device) for d in lay.dims]
                Q = kron_all([e if Qk is None else Qk[j] for Qk, e in zip(Qs, eye, strict=True)])
                blocks.append((Q * L[j].flatten()) @ Q.mT)
        return block_diag(blocks, self.dtype, self.device)
