r"""Eigendecomposed Kronecker curvature :class:`KronDecomposed` (from :meth:`Kron.decompose`).

API-compatible with laplace-torch 0.3's ``laplace.utils.matrix.KronDecomposed``, except
(deliberately) that ``damping`` is kept through ``+`` and ``*`` (laplace drops it),
``KronDecomposed * s`` scales the whole represented matrix, deltas included, and ``bmm``
returns exactly the shape of ``W``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlib.errors import InputError, NonFiniteError
from curvlib.structures._eigenbasis import EigenbasisStructure
from curvlib.structures._kernels import (
    Layout,
    as_scalar,
    batched,
    is_delta_like,
    outer,
    parse_delta,
)
from curvlib.structures._state import as_list, as_tensor, check_finite, check_keys, tensor_entries
from curvlib.structures.base import CurvatureStructure

__all__ = ["KronDecomposed"]


def _check_pair(i: int, j: int, Q: Any, lam: Any) -> int | None:
    """Validate one factor's eigenpair; return its group count (``None``: ungrouped)."""
    where = f"KronDecomposed entry {i} factor {j}"
    lam = as_tensor(lam, f"{where} eigenvalues")
    Q = as_tensor(Q, f"{where} eigenvectors", allow_none=True)
    g = lam.shape[0] if lam.ndim == 2 else None
    want = None if Q is None else (*lam.shape, lam.shape[-1])
    if lam.ndim not in (1, 2) or (Q is not None and tuple(Q.shape) != want):
        raise InputError(
            f"{where}: eigenvalues of shape {tuple(lam.shape)} and eigenvectors of shape "
            f"{None if Q is None else tuple(Q.shape)} do not fit (need (d,) and (d, d), or "
            "grouped (g, d) and (g, d, d); eigenvectors None means identity)"
        )
    return g


class KronDecomposed(EigenbasisStructure):
    r"""Eigendecomposed :class:`Kron` plus an additive term ``δ`` per entry (a prior precision).

    Entry ``i`` has factors :math:`F_k = Q_k \operatorname{diag}(\lambda_k) Q_k^\top`,
    :math:`k = 1..n` (``Q_k = None`` means identity), and a scalar :math:`\delta_i`. With
    :math:`Q = Q_1 \otimes \dots \otimes Q_n` it represents the block
    :math:`Q \operatorname{diag}(L) Q^\top`, where

    * ``damping=False`` (exact): :math:`L = \lambda_1 \otimes \dots \otimes \lambda_n +
      \delta`, i.e. the block is exactly :math:`F_1 \otimes \dots \otimes F_n + \delta I`
      (for two factors :math:`G \otimes A + \delta I`);
    * ``damping=True`` (factored damping, Martens & Grosse 2015):
      :math:`L = (\lambda_1 + \delta^{1/n}) \otimes \dots \otimes (\lambda_n + \delta^{1/n})`,
      i.e. the block is :math:`(F_1 + \delta^{1/n} I) \otimes \dots`; for two factors
      :math:`(G + \sqrt\delta I) \otimes (A + \sqrt\delta I)`, for one factor
      :math:`F_1 + \delta I` (same as exact). Requires :math:`\delta \ge 0`.

    A grouped entry (eigenvalues ``(g, d)``, eigenvectors ``(g, d, d)``) stands for the
    block-diagonal over its groups of the blocks above, with the same :math:`\delta_i`.
    ``to_matrix(e)``, ``bmm(W, e)`` and ``diag(e)`` use :math:`Q \operatorname{diag}(L^e)
    Q^\top` (the exponent acts on the combined eigenvalues; fractional exponents of negative
    eigenvalues give ``nan``).

    Parameters
    ----------
    eigenvectors : list of list of (Tensor or None)
        Per entry, per factor: ``(d, d)`` orthonormal eigenvectors or ``None`` (identity);
        ``(g, d, d)`` in a grouped entry.
    eigenvalues : list of list of Tensor
        Per entry, per factor: ``(d,)`` eigenvalues; ``(g, d)`` in a grouped entry.
    deltas : float or Tensor, optional
        Scalar or one value per entry (default zeros).
    damping : bool, default False
        See above. Kept through ``+`` and ``*``.

    Notes
    -----
    ``bmm``'s default exponent is ``-1`` (laplace-torch's), unlike the protocol's ``1``:
    pass the exponent explicitly in code written for every structure.
    """

    def __init__(
        self,
        eigenvectors: Sequence[Sequence[Tensor | None]],
        eigenvalues: Sequence[Sequence[Tensor]],
        deltas: float | Tensor | None = None,
        damping: bool = False,
    ) -> None:
        expected = "a list (one per entry) of lists (one per factor)"
        eigenvectors = as_list(eigenvectors, "KronDecomposed eigenvectors", expected)
        eigenvalues = as_list(eigenvalues, "KronDecomposed eigenvalues", expected)
        if len(eigenvectors) != len(eigenvalues):
            raise InputError(
                f"{len(eigenvectors)} eigenvector entries but {len(eigenvalues)} eigenvalue entries"
            )
        if not isinstance(damping, (bool, numbers.Integral)) or damping not in (0, 1):
            raise InputError(f"damping must be a bool, got {damping!r}")
        vecs: list[list[Tensor | None]] = []
        vals: list[list[Tensor]] = []
        for i, (Qs, ls) in enumerate(zip(eigenvectors, eigenvalues, strict=True)):
            Qs = as_list(Qs, f"KronDecomposed eigenvectors entry {i}", "a list of tensors or None")
            ls = as_list(ls, f"KronDecomposed eigenvalues entry {i}", "a list of tensors")
            if not ls or len(Qs) != len(ls):
                raise InputError(
                    f"KronDecomposed entry {i}: {len(Qs)} eigenvector and {len(ls)} eigenvalue "
                    "factors (need the same, at least one)"
                )
            groups = {
                _check_pair(i, j, Q, lam) for j, (Q, lam) in enumerate(zip(Qs, ls, strict=True))
            }
            if len(groups) > 1:
                raise InputError(
                    f"KronDecomposed entry {i}: factors with different group counts {groups} "
                    "(all factors of a grouped entry have the same leading size g)"
                )
            vecs.append(Qs)
            vals.append(ls)
        self.eigenvectors: list[list[Tensor | None]] = vecs
        self.eigenvalues: list[list[Tensor]] = vals
        self.damping: bool = bool(damping)
        d = 0.0 if deltas is None else deltas
        if not is_delta_like(d):
            raise InputError(f"deltas must be a number or a tensor, got {type(d).__name__}")
        self.deltas: Tensor = self._expand_deltas(d)

    # ---------------------------------------------------------------- properties
    def _reference(self) -> Tensor | None:
        return self.eigenvalues[0][0] if self.eigenvalues else None

    def __len__(self) -> int:
        return len(self.eigenvalues)

    def _layout(self, i: int) -> Layout:
        ls = self.eigenvalues[i]
        return Layout(
            ls[0].shape[0] if ls[0].ndim == 2 else None, tuple(lam.shape[-1] for lam in ls)
        )

    def _stored_bases(self, i: int) -> list[Tensor | None]:
        return self.eigenvectors[i]

    def __repr__(self) -> str:
        return (
            f"KronDecomposed(entries={len(self)}, num_params={self.num_params}, "
            f"damping={self.damping}, dtype={self.dtype}, device={self.device}, "
            f"dims={self.dims})"
        )

    # ---------------------------------------------------------------- arithmetic
    def _expand_deltas(self, deltas: Any) -> Tensor:
        """``deltas`` as a 1-D tensor of length ``len(self)`` on ``self``'s device/dtype."""
        d = parse_delta(deltas, {len(self): "one per entry"}, self.dtype, self.device)
        return d.reshape(1).repeat(len(self)) if d.ndim == 0 else d

    def __add__(self, deltas: float | Tensor) -> KronDecomposed:
        r"""Add ``deltas`` (scalar or one per entry) to the stored :math:`\delta` (a prior
        precision). With ``damping=False`` this adds :math:`\delta I` to the matrix; with
        ``damping=True`` the result is the factored damping with the summed :math:`\delta`.
        """
        if isinstance(deltas, CurvatureStructure) or not is_delta_like(deltas):
            return NotImplemented
        return KronDecomposed(
            self.eigenvectors,
            self.eigenvalues,
            self.deltas + self._expand_deltas(deltas),
            damping=self.damping,
        )

    def __mul__(self, scalar: float | Tensor) -> KronDecomposed:
        r"""``scalar`` times the represented matrix (any real, differentiable in a tensor).

        The eigenvalues of the first factor of each entry are multiplied by ``s``; with
        ``damping=False`` the deltas too (:math:`s(F + \delta I) = sF + s\delta I`). With
        ``damping=True`` and non-zero deltas the scaled matrix has no factored-damping form:
        raises ``InputError`` (a ``ValueError``; multiply before adding the deltas).
        """
        s = as_scalar(scalar)
        if s is None:
            return NotImplemented
        eigenvalues = [[ls[0] * s, *ls[1:]] for ls in self.eigenvalues]
        if self.damping:
            if len(self) and bool((self.deltas.detach() != 0).any()):
                raise InputError(
                    "cannot multiply a KronDecomposed with damping=True and non-zero deltas by "
                    "a scalar (s·(G+√δ)⊗(A+√δ) has no factored-damping form); multiply "
                    "before adding the deltas"
                )
            deltas = self.deltas
        else:
            deltas = self.deltas * s
        return KronDecomposed(self.eigenvectors, eigenvalues, deltas, damping=self.damping)

    # ---------------------------------------------------------------- eigenvalues
    def _eigvals(self, i: int, exponent: float = 1) -> Tensor:
        """``L_i ** exponent`` of entry ``i``, shape ``(b, d_1, ..., d_n)`` (see class doc)."""
        grouped = self.eigenvalues[i][0].ndim == 2
        ls = [batched(lam, grouped) for lam in self.eigenvalues[i]]
        delta = self.deltas[i]
        n = len(ls)
        if self.damping and n > 1:
            dd = torch.sqrt(delta) if n == 2 else delta ** (1.0 / n)
            L = outer([lam + dd for lam in ls])
        else:
            L = outer(ls) + delta
        return L if exponent == 1 else L.pow(exponent)

    def eigenvalues_of_entry(self, i: int) -> Tensor:
        r"""The combined eigenvalues :math:`L_i` of entry ``i`` (class doc), shape
        ``(d_1, ..., d_n)`` or ``(g, d_1, ..., d_n)`` for a grouped entry."""
        L = self._eigvals(i)
        return L if self.eigenvalues[i][0].ndim == 2 else L[0]

    # ---------------------------------------------------------------- products
    def bmm(self, W: Tensor, exponent: float = -1) -> Tensor:
        r"""Compute :math:`M^{\mathrm{exponent}} w` for every vector ``w`` in ``W``.

        ``M`` is the represented matrix (class doc). Per entry
        :math:`Q (L^e \odot (Q^\top w))` with the Kronecker structure of ``Q`` applied
        factor by factor; no dense matrix is formed.

        Parameters
        ----------
        W : Tensor
            Shape ``(P,)``, ``(K, P)`` or ``(B, K, P)`` (any leading dims).
        exponent : float, default -1
            laplace-torch's default (the protocol's is 1).

        Returns
        -------
        Tensor
            Same shape as ``W``.
        """
        return super().bmm(W, exponent)

    # ---------------------------------------------------------------- conversion
    def _map(self, fn: Callable[[Tensor], Tensor]) -> KronDecomposed:
        return KronDecomposed(
            [[None if Q is None else fn(Q) for Q in Qs] for Qs in self.eigenvectors],
            [[fn(lam) for lam in ls] for ls in self.eigenvalues],
            fn(self.deltas),
            damping=self.damping,
        )

    def state_dict(self) -> dict[str, Any]:
        """Tensors, ``None`` and a bool only: loadable with ``torch.load(weights_only=True)``."""
        sd = self.detach()
        return {
            "eigenvectors": sd.eigenvectors,
            "eigenvalues": sd.eigenvalues,
            "deltas": sd.deltas,
            "damping": self.damping,
        }

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any]) -> KronDecomposed:
        """Rebuild a ``KronDecomposed`` from :meth:`state_dict`; validated (keys, types,
        shapes, finite eigenvectors, eigenvalues and deltas) as
        :meth:`CurvatureStructure.from_state_dict`."""
        sd = check_keys(
            state_dict, "KronDecomposed", {"eigenvectors", "eigenvalues", "deltas", "damping"}
        )
        vecs = tensor_entries(sd["eigenvectors"], "KronDecomposed", "eigenvectors", allow_none=True)
        vals = tensor_entries(sd["eigenvalues"], "KronDecomposed", "eigenvalues")
        deltas = sd["deltas"]
        if isinstance(deltas, Tensor):
            check_finite(deltas, "KronDecomposed state dict key 'deltas'")
        elif not is_delta_like(deltas):
            raise InputError(
                "KronDecomposed state dict key 'deltas' must be a tensor (one per entry) or a "
                f"number; got {type(deltas).__name__}"
            )
        elif not math.isfinite(deltas):
            raise NonFiniteError(f"KronDecomposed state dict key 'deltas' is {deltas}")
        if not isinstance(sd["damping"], bool):
            raise InputError(
                "KronDecomposed state dict key 'damping' must be a bool; got "
                f"{type(sd['damping']).__name__}"
            )
        return cls(vecs, vals, deltas, damping=sd["damping"])
