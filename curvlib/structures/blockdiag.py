r"""Dense diagonal blocks: :class:`BlockDiag` (one block per layer) and their shared algebra.

:class:`SymmetricBlocks` (private base, also of :class:`~curvlib.structures.Dense`)
represents :math:`M = \operatorname{blockdiag}(B_1, \dots, B_L)` with dense symmetric blocks;
powers use the eigendecomposition :math:`B_l = V_l \operatorname{diag}(w_l) V_l^\top` of each
block, computed once and cached (when nothing requires a gradient).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlib.errors import InputError
from curvlib.structures._eigh import eigh_sym
from curvlib.structures._kernels import (
    LogdetAccumulator,
    as_scalar,
    block_diag,
    check_exponent,
    check_W,
    is_delta_like,
    parse_delta,
)
from curvlib.structures._state import as_list, as_tensor, check_finite, check_keys
from curvlib.structures.base import CurvatureStructure

__all__ = ["BlockDiag"]


class SymmetricBlocks(CurvatureStructure):
    """Private base: block-diagonal matrix of dense symmetric blocks ``self._blocks``."""

    def __init__(self, blocks: list[Tensor], owner: str) -> None:
        for i, B in enumerate(blocks):
            B = as_tensor(B, f"{owner} block {i}")
            if B.ndim != 2 or B.shape[0] != B.shape[1]:
                raise InputError(
                    f"{owner} block {i} must be a square 2-D tensor; got {tuple(B.shape)}"
                )
        self._blocks: list[Tensor] = list(blocks)
        self._eig_cache: list[tuple[Tensor, Tensor]] | None = None

    @property
    def sizes(self) -> list[int]:
        """Side length of each block."""
        return [B.shape[0] for B in self._blocks]

    @property
    def num_params(self) -> int:
        """``P = sum(sizes)``."""
        return sum(self.sizes)

    def _reference(self) -> Tensor | None:
        return self._blocks[0] if self._blocks else None

    @abstractmethod
    def _with_blocks(self, blocks: list[Tensor]) -> SymmetricBlocks:
        """A new structure of the same type and labels with ``blocks``."""

    # ---------------------------------------------------------------- eigendecomposition
    def _eig(self) -> list[tuple[Tensor, Tensor]]:
        r"""Per block ``(w, V)`` with :math:`B = V \operatorname{diag}(w) V^\top` (of the
        symmetric part, computed in float64, cast back); cached unless gradients are tracked."""
        if self._eig_cache is not None:
            return self._eig_cache
        out = []
        for i, B in enumerate(self._blocks):
            w, V = eigh_sym(B, f"{type(self).__name__} block {i} of shape {tuple(B.shape)}")
            out.append((w.to(B.dtype), V.to(B.dtype)))
        tracked = torch.is_grad_enabled() and any(B.requires_grad for B in self._blocks)
        if not tracked:
            self._eig_cache = out
        return out

    # ---------------------------------------------------------------- products
    def bmm(self, W: Tensor, exponent: float = 1) -> Tensor:
        r""":math:`M^{p} w` per vector: per block :math:`B_l w_l` for ``p = 1``, else
        :math:`V_l \operatorname{diag}(w_l^{p}) V_l^\top w_l` (cached eigendecomposition).
        ``W`` and the result as :meth:`CurvatureStructure.bmm`."""
        W2 = check_W(W, self.num_params, self.dtype)
        p = check_exponent(exponent)
        parts = list(torch.split(W2, self.sizes, dim=1))
        if p == 1:
            out = [X @ B.mT for X, B in zip(parts, self._blocks, strict=True)]
        else:
            out = [
                ((X @ V) * w.pow(p)) @ V.mT for X, (w, V) in zip(parts, self._eig(), strict=True)
            ]
        return (torch.cat(out, dim=1) if out else W2.clone()).reshape(W.shape)

    # ---------------------------------------------------------------- reductions
    def logdet(self) -> Tensor:
        r""":math:`\sum_l \log\det B_l` (``torch.linalg.slogdet`` per block; signs as
        ``torch.logdet``)."""
        acc = LogdetAccumulator(self.dtype, self.device)
        for B in self._blocks:
            acc.add_slogdet(*torch.linalg.slogdet(B))
        return acc.total()

    def trace(self) -> Tensor:
        r""":math:`\sum_l \operatorname{tr} B_l`."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for B in self._blocks:
            total = total + torch.trace(B)
        return total

    def diag(self, exponent: float = 1) -> Tensor:
        r"""Diagonal of :math:`M^p`: the blocks' diagonals, or :math:`(V_l^{\circ 2}) w_l^p`."""
        p = check_exponent(exponent)
        if p == 1:
            diags = [torch.diagonal(B) for B in self._blocks]
        else:
            diags = [(V * V) @ w.pow(p) for w, V in self._eig()]
        if not diags:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        return torch.cat(diags)

    def to_matrix(self, exponent: float = 1) -> Tensor:
        """Dense :math:`M^p`, shape ``(P, P)``."""
        p = check_exponent(exponent)
        if p == 1:
            blocks = list(self._blocks)
        else:
            blocks = [(V * w.pow(p)) @ V.mT for w, V in self._eig()]
        return block_diag(blocks, self.dtype, self.device)

    # ---------------------------------------------------------------- algebra
    def _delta_lengths(self) -> dict[int, str]:
        return {len(self._blocks): "one per block", self.num_params: "one per parameter"}

    def __add__(self, delta: float | Tensor) -> SymmetricBlocks:
        r""":math:`M + \delta I` (scalar), :math:`+ \operatorname{blockdiag}(\delta_l I)`
        (one per block) or :math:`+ \operatorname{diag}(\delta)` (one per parameter).

        With as many blocks as parameters (all blocks ``1 × 1``) the two vector forms
        coincide.
        """
        if isinstance(delta, CurvatureStructure) or not is_delta_like(delta):
            return NotImplemented
        d = parse_delta(delta, self._delta_lengths(), self.dtype, self.device)
        if d.ndim == 0:
            per = [d] * len(self._blocks)
        elif d.shape[0] == len(self._blocks):
            per = list(d)
        else:
            per = list(torch.split(d, self.sizes))
        blocks = [
            B
            + (
                torch.diag(x)
                if x.ndim == 1
                else x * torch.eye(len(B), dtype=B.dtype, device=B.device)
            )
            for B, x in zip(self._blocks, per, strict=True)
        ]
        return self._with_blocks(blocks)

    def __mul__(self, scalar: float | Tensor) -> SymmetricBlocks:
        r""":math:`s M`: every block times ``s``."""
        s = as_scalar(scalar)
        if s is None:
            return NotImplemented
        return self._with_blocks([B * s for B in self._blocks])

    def _map(self, fn: Callable[[Tensor], Tensor]) -> SymmetricBlocks:
        return self._with_blocks([fn(B) for B in self._blocks])


class BlockDiag(SymmetricBlocks):
    r"""Block-diagonal curvature with dense blocks, one per group of parameters.

    Represents :math:`M = \operatorname{blockdiag}(B_1, \dots, B_L)`, ``B_l`` of size
    :math:`P_l \times P_l`, in parameter order (e.g. one block per layer: the exact curvature
    within a layer, none between layers). Powers use each block's eigendecomposition,
    computed once (in float64, of the symmetric part) and cached while no block requires a
    gradient.

    Parameters
    ----------
    blocks : list of Tensor
        Square 2-D tensors, in parameter order.
    names : list of str, optional
        A label per block (e.g. the layer's path in the model); default ``"0"``, ``"1"``, ....

    Attributes
    ----------
    blocks : list of Tensor
    names : list of str
    sizes : list of int
        ``P_l`` per block.
    """

    def __init__(self, blocks: Sequence[Tensor], names: Sequence[str] | None = None) -> None:
        blocks = as_list(blocks, "BlockDiag blocks", "a list of square 2-D tensors")
        super().__init__(blocks, "BlockDiag")
        if names is None:
            names = [str(i) for i in range(len(blocks))]
        names = as_list(names, "BlockDiag names", "a list of str (one per block)")
        if len(names) != len(blocks) or not all(isinstance(n, str) for n in names):
            raise InputError(
                f"BlockDiag names must be {len(blocks)} strings (one per block); got {names!r}"
            )
        self.names: list[str] = names

    @classmethod
    def from_matrix(
        cls, M: Tensor, sizes: Sequence[int], names: Sequence[str] | None = None
    ) -> BlockDiag:
        """The diagonal blocks of a dense ``(P, P)`` matrix ``M``, of sizes ``sizes`` in order
        (what lies outside them is not kept)."""
        M = as_tensor(M, "M")
        sizes = [int(s) for s in sizes]
        if (
            M.ndim != 2
            or M.shape[0] != M.shape[1]
            or sum(sizes) != M.shape[0]
            or min(sizes, default=1) < 1
        ):
            raise InputError(
                f"sizes {sizes} (each >= 1) must sum to the side of M {tuple(M.shape)}"
            )
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return cls([M[a : a + n, a : a + n] for a, n in zip(starts, sizes, strict=True)], names)

    @property
    def blocks(self) -> list[Tensor]:
        """The dense blocks, in order."""
        return self._blocks

    def _with_blocks(self, blocks: list[Tensor]) -> BlockDiag:
        return BlockDiag(blocks, self.names)

    def __len__(self) -> int:
        return len(self._blocks)

    def __repr__(self) -> str:
        return (
            f"BlockDiag(blocks={len(self)}, num_params={self.num_params}, sizes={self.sizes}, "
            f"names={self.names}, dtype={self.dtype})"
        )

    def state_dict(self) -> dict[str, Any]:
        """``{"blocks": [Tensor, ...], "names": [str, ...]}`` (detached)."""
        return {"blocks": [B.detach() for B in self._blocks], "names": list(self.names)}

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any]) -> BlockDiag:
        """Rebuild a ``BlockDiag`` from :meth:`state_dict` (validated: keys, types, shapes,
        finite values)."""
        sd = check_keys(state_dict, "BlockDiag", {"blocks", "names"})
        blocks = as_list(sd["blocks"], "BlockDiag state dict key 'blocks'", "a list of tensors")
        for i, B in enumerate(blocks):
            what = f"BlockDiag state dict key 'blocks', block {i}"
            check_finite(as_tensor(B, what), what)
        names = as_list(sd["names"], "BlockDiag state dict key 'names'", "a list of str")
        if not all(isinstance(n, str) for n in names):
            raise InputError(f"BlockDiag state dict key 'names' must hold strings; got {names!r}")
        return cls(blocks, names)
