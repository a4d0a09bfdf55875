r"""Eigenvalue-corrected K-FAC :class:`EKFAC` (George et al., NeurIPS 2018).

K-FAC approximates a weight's curvature block by :math:`G \otimes A`; with
:math:`G = U_G \Lambda_G U_G^\top`, :math:`A = U_A \Lambda_A U_A^\top` that is
:math:`(U_G \otimes U_A)(\Lambda_G \otimes \Lambda_A)(U_G \otimes U_A)^\top`. EKFAC keeps the
Kronecker eigenbasis :math:`U = U_G \otimes U_A` and replaces the Kronecker eigenvalues by
the diagonal of the exact block in that basis,

.. math:: s = \operatorname{diag}(U^\top B U) = \sum_m (U^\top \operatorname{vec} D_m)^{2},
   \qquad B = \sum_m \operatorname{vec} D_m \operatorname{vec} D_m^\top,

the best diagonal (Frobenius) correction in the fixed basis. For gradient rows
:math:`D_m = g_m a_m^\top` this is :math:`s = \sum_m (U_G^\top g_m)^2 (U_A^\top a_m)^{2\top}`
(:meth:`EKFAC.project`); for full per-sample gradient matrices :meth:`EKFAC.project_grads`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlib.errors import InputError
from curvlib.structures._eigenbasis import EigenbasisStructure
from curvlib.structures._kernels import Layout, as_scalar, is_delta_like, parse_delta
from curvlib.structures._state import as_list, as_tensor, check_finite, check_keys, tensor_entries
from curvlib.structures.base import CurvatureStructure
from curvlib.structures.decomposed import KronDecomposed

__all__ = ["EKFAC"]


def _entry_layout(i: int, bases: list[Any], s: Any) -> Layout:
    """Validate entry ``i`` (bases and eigenvalues) and return its layout."""
    s = as_tensor(s, f"EKFAC entry {i} eigenvalues")
    n = len(bases)
    if s.ndim not in (n, n + 1):
        raise InputError(
            f"EKFAC entry {i}: {n} eigenbases need eigenvalues with {n} dims (one per factor) "
            f"or {n + 1} (grouped: (g, d_1, ..., d_n)); got shape {tuple(s.shape)}"
        )
    groups = s.shape[0] if s.ndim == n + 1 else None
    dims = tuple(s.shape[-n:]) if n else ()
    lead = () if groups is None else (groups,)
    for k, (U, d) in enumerate(zip(bases, dims, strict=True)):
        U = as_tensor(U, f"EKFAC entry {i} eigenbasis {k}", allow_none=True)
        if U is not None and tuple(U.shape) != (*lead, d, d):
            raise InputError(
                f"EKFAC entry {i} eigenbasis {k} must have shape {(*lead, d, d)} to fit "
                f"eigenvalues of shape {tuple(s.shape)}; got {tuple(U.shape)}"
            )
    return Layout(groups, dims)


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _check_rows(X: Any, what: str, ndims: tuple[int, int], expected: str) -> None:
    if not isinstance(X, Tensor) or X.ndim not in ndims:
        raise InputError(f"{what} must be a tensor of shape {expected}; got {_shape(X)}")


def _check_basis(U: Any, name: str, lead: tuple[int, ...], d: int) -> None:
    """``U`` must be ``None`` or of shape ``(*lead, d, d)``."""
    if U is not None and (not isinstance(U, Tensor) or tuple(U.shape) != (*lead, d, d)):
        raise InputError(f"{name} must have shape {(*lead, d, d)} or be None; got {_shape(U)}")


def _rotate(U: Tensor | None, X: Tensor, name: str, what: str) -> Tensor:
    """Rows ``X (M, d)`` or grouped ``(M, g, d)`` in the basis ``U``: ``U^T x`` per row."""
    _check_rows(X, what, (2, 3), "(M, d) or grouped (M, g, d)")
    _check_basis(U, name, tuple(X.shape[1:-1]), X.shape[-1])
    if U is None:
        return X
    return X @ U if X.ndim == 2 else torch.einsum("mgi,gij->mgj", X, U)


class EKFAC(EigenbasisStructure):
    r"""Kronecker eigenbases with corrected eigenvalues, block-diagonal over entries.

    Entry ``i`` with eigenbases :math:`[U_1, \dots, U_n]` (``[U_G, U_A]`` for a weight,
    ``[U_G]`` for a bias; ``None`` is the identity, e.g. for a diagonal factor) and
    eigenvalues ``s`` of shape ``(d_1, ..., d_n)`` represents

    .. math:: B_i = U \operatorname{diag}(\operatorname{vec} s)\, U^\top, \qquad
       U = U_1 \otimes \dots \otimes U_n ,

    for the row-major flattening of the parameter (``s`` of shape ``(out, r)`` for a weight,
    ``(out,)`` for a bias). A grouped entry has ``s`` of shape ``(g, d_1, ..., d_n)`` and
    bases ``(g, d_k, d_k)``, and represents :math:`\operatorname{blockdiag}_j(U_j
    \operatorname{diag}(\operatorname{vec} s_j) U_j^\top)` (group outermost, as
    :class:`~curvlib.structures.Kron`). Powers act on ``s``: :math:`B_i^p = U
    \operatorname{diag}(s^p) U^\top`.

    Parameters
    ----------
    eigenbases : list of list of (Tensor or None)
        Per entry, per factor: orthonormal ``(d, d)`` (grouped ``(g, d, d)``) or ``None``.
    eigenvalues : list of Tensor
        Per entry: ``s`` as above. An entry is grouped iff ``s`` has one more dimension than
        it has bases.

    Attributes
    ----------
    eigenbases, eigenvalues
        As given (lists).

    Notes
    -----
    ``+ delta`` adds :math:`\delta_i` to every ``s`` of entry ``i`` (exact :math:`B_i +
    \delta_i I`, since ``U`` is orthonormal); ``* t`` multiplies every ``s`` by ``t``.
    """

    def __init__(
        self, eigenbases: Sequence[Sequence[Tensor | None]], eigenvalues: Sequence[Tensor]
    ) -> None:
        bases = as_list(eigenbases, "EKFAC eigenbases", "a list (one per entry) of lists")
        vals = as_list(eigenvalues, "EKFAC eigenvalues", "a list of tensors (one per entry)")
        if len(bases) != len(vals):
            raise InputError(f"EKFAC: {len(bases)} eigenbasis entries but {len(vals)} eigenvalues")
        entries = [
            as_list(B, f"EKFAC eigenbases entry {i}", "a list of tensors or None")
            for i, B in enumerate(bases)
        ]
        for i, B in enumerate(entries):
            if not B:
                raise InputError(f"EKFAC entry {i} has no eigenbases (need one per factor)")
        self._lay = [
            _entry_layout(i, B, s) for i, (B, s) in enumerate(zip(entries, vals, strict=True))
        ]
        self.eigenbases: list[list[Tensor | None]] = entries
        self.eigenvalues: list[Tensor] = vals

    @classmethod
    def from_kron_decomposed(
        cls, kd: KronDecomposed, eigenvalues: Sequence[Tensor] | None = None
    ) -> EKFAC:
        r"""The eigenbases of ``kd`` with eigenvalues ``eigenvalues``.

        Parameters
        ----------
        kd : KronDecomposed
            Usually ``kron.decompose()``.
        eigenvalues : list of Tensor, optional
            Per entry the corrected ``s``. Default: the combined eigenvalues of ``kd``
            (:math:`\lambda_G \otimes \lambda_A + \delta`, or the damped ones), so that the
            result represents exactly the matrix of ``kd``.

        Raises
        ------
        InputError
            ``kd`` is not a ``KronDecomposed``, or ``eigenvalues`` are given while ``kd`` has
            non-zero deltas (they would be dropped: add the delta to the ``EKFAC`` instead).
        """
        if not isinstance(kd, KronDecomposed):
            raise InputError(f"expected a KronDecomposed, got {type(kd).__name__}")
        if eigenvalues is None:
            eigenvalues = [kd.eigenvalues_of_entry(i) for i in range(len(kd))]
        elif len(kd) and bool((kd.deltas.detach() != 0).any()):
            raise InputError(
                "the KronDecomposed has non-zero deltas, which the given EKFAC eigenvalues "
                "would drop; build the EKFAC from the decomposition without deltas and add "
                "the delta to the EKFAC (ekfac + delta)"
            )
        return cls([list(Qs) for Qs in kd.eigenvectors], eigenvalues)

    # ---------------------------------------------------------------- eigenvalue accumulation
    @staticmethod
    def project(U_G: Tensor | None, U_A: Tensor | None, g: Tensor, a: Tensor | None) -> Tensor:
        r"""Corrected eigenvalues from gradient rows: :math:`\sum_m (U_G^\top g_m)^2
        \,(U_A^\top a_m)^{2\top}`.

        Row ``m`` (a sample, an output column, a location: the expand-style rows) has the
        gradient :math:`g_m a_m^\top` of a weight; ``s`` is the diagonal of the sum of the
        outer products of these gradients in the basis :math:`U_G \otimes U_A`.

        Parameters
        ----------
        U_G, U_A : Tensor or None
            Eigenbases ``(out, out)``, ``(r, r)`` (grouped ``(g, o, o)``, ``(g, r, r)``);
            ``None`` is the identity.
        g : Tensor
            ``(M, out)`` (grouped ``(M, g, o)``): output-side gradient rows.
        a : Tensor or None
            ``(M, r)`` (grouped ``(M, g, r)``): input rows; ``None`` for a bias (then ``U_A``
            must be ``None`` and the result is :math:`\sum_m (U_G^\top g_m)^2`).

        Returns
        -------
        Tensor
            ``(out, r)`` (grouped ``(g, o, r)``); ``(out,)`` (grouped ``(g, o)``) for a bias.
        """
        gt = _rotate(U_G, g, "U_G", "g") ** 2
        if a is None:
            if U_A is not None:
                raise InputError("U_A given without input rows a (a bias has only U_G)")
            return gt.sum(0)
        at = _rotate(U_A, a, "U_A", "a") ** 2
        if at.shape[:-1] != gt.shape[:-1]:
            raise InputError(
                f"g of shape {tuple(g.shape)} and a of shape {tuple(a.shape)} need the same "
                "number of rows M (and groups)"
            )
        return torch.einsum("m...o,m...r->...or", gt, at)

    @staticmethod
    def project_grads(U_G: Tensor | None, U_A: Tensor | None, D: Tensor) -> Tensor:
        r"""Corrected eigenvalues from per-sample gradients: :math:`\sum_m (U_G^\top D_m
        U_A)^{\circ 2}`.

        Parameters
        ----------
        U_G, U_A : Tensor or None
            Eigenbases ``(out, out)``, ``(r, r)`` (grouped ``(g, o, o)``, ``(g, r, r)``);
            ``None`` is the identity.
        D : Tensor
            ``(M, out, r)`` gradient matrices (grouped ``(M, g, o, r)``).

        Returns
        -------
        Tensor
            ``(out, r)`` (grouped ``(g, o, r)``).
        """
        _check_rows(D, "D", (3, 4), "(M, out, r) or grouped (M, g, o, r)")
        lead = tuple(D.shape[1:-2])
        _check_basis(U_G, "U_G", lead, D.shape[-2])
        _check_basis(U_A, "U_A", lead, D.shape[-1])
        X = D if U_G is None else U_G.mT @ D
        X = X if U_A is None else X @ U_A
        return (X**2).sum(0)

    # ---------------------------------------------------------------- structure
    def _reference(self) -> Tensor | None:
        return self.eigenvalues[0] if self.eigenvalues else None

    def __len__(self) -> int:
        return len(self.eigenvalues)

    def _layout(self, i: int) -> Layout:
        return self._lay[i]

    def _stored_bases(self, i: int) -> list[Tensor | None]:
        return self.eigenbases[i]

    def _eigvals(self, i: int, exponent: float = 1) -> Tensor:
        s = self.eigenvalues[i]
        s = s if self._lay[i].groups is not None else s.unsqueeze(0)
        return s if exponent == 1 else s.pow(exponent)

    def __repr__(self) -> str:
        return (
            f"EKFAC(entries={len(self)}, num_params={self.num_params}, dtype={self.dtype}, "
            f"device={self.device}, dims={self.dims})"
        )

    # ---------------------------------------------------------------- algebra
    def __add__(self, delta: float | Tensor) -> EKFAC:
        r"""Exact :math:`M + \operatorname{blockdiag}(\delta_i I)`: ``s_i + δ_i``.

        ``delta`` is a real scalar or a 1-D tensor with one value per entry.
        """
        if isinstance(delta, CurvatureStructure) or not is_delta_like(delta):
            return NotImplemented
        d = parse_delta(delta, {len(self): "one per entry"}, self.dtype, self.device)
        vals = [s + (d if d.ndim == 0 else d[i]) for i, s in enumerate(self.eigenvalues)]
        return EKFAC(self.eigenbases, vals)

    def __mul__(self, scalar: float | Tensor) -> EKFAC:
        r""":math:`t M`: every ``s`` times ``t`` (any real, differentiable in a tensor)."""
        t = as_scalar(scalar)
        if t is None:
            return NotImplemented
        return EKFAC(self.eigenbases, [s * t for s in self.eigenvalues])

    # ---------------------------------------------------------------- conversion
    def _map(self, fn: Callable[[Tensor], Tensor]) -> EKFAC:
        return EKFAC(
            [[None if U is None else fn(U) for U in B] for B in self.eigenbases],
            [fn(s) for s in self.eigenvalues],
        )

    def state_dict(self) -> dict[str, Any]:
        """``{"eigenbases": [[Tensor or None, ...], ...], "eigenvalues": [Tensor, ...]}``
        (detached)."""
        sd = self.detach()
        return {"eigenbases": sd.eigenbases, "eigenvalues": sd.eigenvalues}

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any]) -> EKFAC:
        """Rebuild an ``EKFAC`` from :meth:`state_dict` (validated: keys, types, shapes,
        finite values)."""
        sd = check_keys(state_dict, "EKFAC", {"eigenbases", "eigenvalues"})
        bases = tensor_entries(sd["eigenbases"], "EKFAC", "eigenbases", allow_none=True)
        vals = as_list(sd["eigenvalues"], "EKFAC state dict key 'eigenvalues'", "a list of tensors")
        for i, s in enumerate(vals):
            what = f"EKFAC state dict key 'eigenvalues', entry {i}"
            check_finite(as_tensor(s, what), what)
        return cls(bases, vals)
