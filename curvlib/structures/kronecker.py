r"""Kronecker-factored curvature :class:`Kron` (K-FAC), shared by every backend.

API-compatible with laplace-torch 0.3's ``laplace.utils.matrix.Kron`` where that is sensible.

Layout
------
One *entry* per trainable parameter tensor, in parameter order. An entry is a list of
*factors* :math:`F_1, \dots, F_n` (usually ``n = 1`` or ``2``) and stands for the block

.. math:: B = F_1 \otimes F_2 \otimes \dots \otimes F_n ,

(``torch.kron`` order) acting on the row-major flattening of the parameter. A weight ``W`` of
shape ``(out, *rest)`` has ``[G (out×out), A (r×r)]`` with ``r = prod(rest)``; a bias has
``[G]``. A factor may be a 1-D tensor ``d``, meaning the diagonal matrix ``diag(d)``.

A *grouped* entry (a convolution with ``groups = g``: weight ``(out, in/g, *k)``) has
factors with a leading group axis, ``(g, d, d)`` dense or ``(g, d)`` diagonal, and stands
for :math:`\operatorname{blockdiag}_j(F_{1,j} \otimes \dots \otimes F_{n,j})`: the group
index is the outermost index of the row-major flattening (``out = g · o``, weight factors
``[G (g, o, o), A (g, r, r)]`` with ``r = (in/g) · prod(k)``; the bias keeps one
``[G (out, out)]`` over all its channels).
The full matrix (``to_matrix()``) is block-diagonal over the entries, in order.

Differences from laplace-torch (deliberate, each a bug there)
-------------------------------------------------------------
* ``Kron + Kron`` raises :class:`~curvlib.errors.InputError` (a ``ValueError``) when the block
  structures differ (laplace's ``zip`` silently truncates).
* ``* s`` multiplies ``s`` into the *first* factor of each entry, so any real ``s`` works
  (negative and zero too) and the result is differentiable in a tensor ``s`` (laplace uses
  ``pow(s, 1/n)`` on every factor: fails for ``s < 0``, breaks the autograd graph).
* ``bmm`` returns exactly the shape of ``W`` (laplace's ``squeeze`` also drops ``K = 1``).
* 1-D factors decompose to eigenvectors ``None`` (identity) instead of a dense identity.
* ``Kron + delta`` (a number or one per entry) is the exact :math:`K + \delta I`, returned
  as a :class:`~curvlib.structures.KronDecomposed` (laplace raises).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlib.errors import InputError
from curvlib.structures._eigh import eigh_factor
from curvlib.structures._kernels import (
    Layout,
    LogdetAccumulator,
    apply_along,
    as_scalar,
    batched,
    block_diag,
    check_exponent,
    check_W,
    dense_factor,
    is_delta_like,
    kron_all,
    matvec_entries,
    outer,
    parse_delta,
)
from curvlib.structures._state import check_groups, check_keys, groups_field, tensor_entries
from curvlib.structures.base import CurvatureStructure
from curvlib.structures.decomposed import KronDecomposed

__all__ = ["Kron"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_factor(i: int, j: int, f: Any, groups: int | None) -> None:
    if not isinstance(f, Tensor):
        raise InputError(
            f"Kron entry {i} factor {j} must be a torch.Tensor, got {type(f).__name__}"
        )
    shape = tuple(f.shape)
    if groups is None:
        if not (f.ndim == 1 or (f.ndim == 2 and shape[0] == shape[1])):
            raise InputError(
                f"Kron entry {i} factor {j} must be square 2-D or 1-D (diagonal); got shape "
                f"{shape} (a grouped factor is (g, d, d) or (g, d))"
            )
    elif not (
        (f.ndim == 2 and shape[0] == groups)
        or (f.ndim == 3 and shape[0] == groups and shape[1] == shape[2])
    ):
        raise InputError(
            f"Kron entry {i} has {groups} groups: factor {j} must have shape ({groups}, d, d) "
            f"(dense) or ({groups}, d) (diagonal); got {shape}"
        )


class Kron(CurvatureStructure):
    r"""Kronecker-factored curvature: a block-diagonal matrix of Kronecker products.

    Entry ``i`` with factors ``[F_1, ..., F_n]`` stands for the block
    :math:`B_i = F_1 \otimes \dots \otimes F_n` (``torch.kron`` order; a 1-D factor ``d`` is
    ``diag(d)``), and the whole object for :math:`\operatorname{blockdiag}(B_1, \dots, B_E)`.
    A weight of shape ``(out, *rest)`` has ``[G (out×out), A (r×r)]``, ``r = prod(rest)``,
    for its row-major flattening; a bias ``[G]``. A grouped entry (module docstring) stands
    for :math:`\operatorname{blockdiag}_j(F_{1,j} \otimes \dots \otimes F_{n,j})`.

    Parameters
    ----------
    kfacs : list of list of Tensor
        One list of factors per parameter tensor, in parameter order. Each factor is a square
        2-D tensor or a 1-D tensor (a diagonal); in a grouped entry ``(g, d, d)`` or
        ``(g, d)``. A bare tensor or a tuple is accepted as an entry too (laplace-torch
        style) and stored as a list.
    groups : list of (int or None), optional
        Per entry the number of groups ``g`` (``None``: ungrouped). Default: an entry is
        grouped iff it has a 3-D factor (``g`` its leading size). Needed only for a grouped
        entry whose factors are all diagonal (``(g, d)``, otherwise read as dense).

    Attributes
    ----------
    kfacs : list of list of Tensor
        The factors (laplace-torch's attribute name).
    groups : list of (int or None)
        Per entry, as above.

    Notes
    -----
    ``+`` of two ``Kron`` is the *factor-wise* sum
    :math:`(G_1 + G_2) \otimes (A_1 + A_2)` — how K-FAC accumulates over batches — not the
    sum of the represented matrices. ``+`` of a number or of one number per entry
    :math:`\delta` is the exact :math:`K + \delta I`, a :class:`KronDecomposed`
    (``self.decompose() + delta``). ``*`` by a scalar ``s`` gives
    :math:`(s F_1) \otimes F_2 \otimes \dots`, i.e. exactly ``s`` times the matrix.
    Operations return new objects and never modify their inputs in place; unchanged factors
    may be shared between input and result.
    """

    def __init__(
        self,
        kfacs: Sequence[Sequence[Tensor] | Tensor],
        groups: Sequence[int | None] | None = None,
    ) -> None:
        if isinstance(kfacs, (str, bytes, Tensor)) or not isinstance(kfacs, Iterable):
            raise InputError(
                f"kfacs must be a list of lists of tensors (one list per parameter tensor); "
                f"got {type(kfacs).__name__}"
            )
        kfacs = list(kfacs)
        if groups is not None:
            groups = list(groups)
            if len(groups) != len(kfacs):
                raise InputError(f"groups has {len(groups)} items for {len(kfacs)} Kron entries")
        entries: list[list[Tensor]] = []
        entry_groups: list[int | None] = []
        for i, F in enumerate(kfacs):
            if isinstance(F, Tensor):
                Fs = [F]
            elif isinstance(F, (list, tuple)):
                Fs = list(F)
            else:
                raise InputError(
                    f"Kron entry {i} must be a list of tensors (its factors); got "
                    f"{type(F).__name__}"
                )
            if not Fs:
                raise InputError(f"Kron entry {i} has no factors")
            if groups is None:
                g3 = [f.shape[0] for f in Fs if isinstance(f, Tensor) and f.ndim == 3]
                g = g3[0] if g3 else None
            else:
                g = check_groups(groups[i], f"groups[{i}]")
            for j, f in enumerate(Fs):
                _check_factor(i, j, f, g)
            entries.append(Fs)
            entry_groups.append(g)
        self.kfacs: list[list[Tensor]] = entries
        self.groups: list[int | None] = entry_groups

    # ---------------------------------------------------------------- construction
    @classmethod
    def init_from_model(
        cls,
        model: nn.Module | Iterable[Tensor],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Kron:
        """Zero factors shaped after a model's parameters.

        Parameters
        ----------
        model : nn.Module or iterable of Tensor
            A module (its parameters with ``requires_grad=True``, in ``parameters()`` order)
            or an iterable of parameters / tensors (all of them, in order).
        device, dtype : optional
            Of the factors; default: those of each parameter.

        Returns
        -------
        Kron
            A 1-D parameter of size ``n`` gets ``[zeros(n, n)]``; a parameter of shape
            ``(out, *rest)`` with ``len(rest) >= 1`` (Linear, Conv1d/2d/3d, ...) gets
            ``[zeros(out, out), zeros(r, r)]`` with ``r = prod(rest)``; a 0-dim parameter
            gets ``[zeros(1, 1)]``. For a module, the weight of a ``Conv1d/2d/3d`` with
            ``groups = g > 1`` gets grouped factors ``[zeros(g, o, o), zeros(g, r, r)]``
            (``o = out / g``); its bias ``[zeros(out, out)]``, as the K-FAC rules compute.
        """
        grouped: dict[int, int] = {}
        if isinstance(model, nn.Module):
            params: Iterable[Tensor] = [p for p in model.parameters() if p.requires_grad]
            for m in model.modules():
                if isinstance(m, _CONVS) and m.groups > 1:
                    grouped[id(m.weight)] = m.groups
        else:
            params = model
        kfacs: list[list[Tensor]] = []
        groups: list[int | None] = []
        for p in params:
            kw = {
                "device": p.device if device is None else device,
                "dtype": p.dtype if dtype is None else dtype,
            }
            g = grouped.get(id(p))
            lead = () if g is None else (g,)
            out = p.numel() if p.ndim <= 1 else p.shape[0]
            o = out if g is None else out // g
            entry = [torch.zeros(*lead, o, o, **kw)]
            if p.ndim > 1:
                r = math.prod(p.shape[1:])
                entry.append(torch.zeros(*lead, r, r, **kw))
            kfacs.append(entry)
            groups.append(g)
        return cls(kfacs, groups=groups)

    # ---------------------------------------------------------------- properties
    @property
    def dims(self) -> list[tuple[int, ...]]:
        """Factor sizes per entry (per group for a grouped entry), e.g. ``[(out, r), (out,)]``."""
        return [tuple(f.shape[-1] for f in F) for F in self.kfacs]

    @property
    def layouts(self) -> list[Layout]:
        """``(groups, dims)`` per entry."""
        return [Layout(g, d) for g, d in zip(self.groups, self.dims, strict=True)]

    @property
    def block_sizes(self) -> list[int]:
        """Number of parameters of each entry (``out * r`` for a weight)."""
        return [lay.numel for lay in self.layouts]

    @property
    def num_params(self) -> int:
        """``P``, the side length of the full matrix."""
        return sum(self.block_sizes)

    _EMPTY_PLACEMENT_NONE = True  # laplace-torch's: dtype and device None without entries

    def _reference(self) -> Tensor | None:
        return self.kfacs[0][0] if self.kfacs else None

    def _batched(self, i: int) -> list[Tensor]:
        grouped = self.groups[i] is not None
        return [batched(f, grouped) for f in self.kfacs[i]]

    def __len__(self) -> int:
        return len(self.kfacs)

    def __repr__(self) -> str:
        shapes = [[tuple(f.shape) for f in F] for F in self.kfacs]
        grouped = f", groups={self.groups}" if any(g is not None for g in self.groups) else ""
        return (
            f"Kron(entries={len(self)}, num_params={self.num_params}, dtype={self.dtype}, "
            f"device={self.device}, factor_shapes={shapes}{grouped})"
        )

    # ---------------------------------------------------------------- arithmetic
    def _check_same_structure(self, other: Kron) -> None:
        if len(self) != len(other):
            raise InputError(
                f"cannot add Kron objects with different numbers of entries: "
                f"{len(self)} and {len(other)}"
            )
        for i, (F1, F2) in enumerate(zip(self.kfacs, other.kfacs, strict=True)):
            s1 = [tuple(f.shape) for f in F1]
            s2 = [tuple(f.shape) for f in F2]
            if s1 != s2 or self.groups[i] != other.groups[i]:
                raise InputError(
                    f"cannot add Kron objects: entry {i} has factor shapes {s1} and {s2}, "
                    f"groups {self.groups[i]} and {other.groups[i]}"
                )

    def __add__(self, other: Kron | float | Tensor) -> Kron | KronDecomposed:
        r"""Factor-wise sum with a ``Kron``, or :math:`K + \delta I` with a number.

        Parameters
        ----------
        other : Kron, float or Tensor
            A ``Kron`` of the same structure: ``[F + F' for F, F' in zip(entry, entry')]``
            per entry (K-FAC accumulation). A real scalar or a 1-D tensor with one
            :math:`\delta_i` per entry: the exact :math:`K + \operatorname{blockdiag}(\delta_i
            I)`, returned as ``self.decompose() + delta`` (a :class:`KronDecomposed` with
            ``damping=False``).

        Raises
        ------
        InputError (a ValueError)
            The numbers of entries, of factors per entry, the factor shapes or the groups
            differ, or ``delta`` has the wrong length.
        """
        if isinstance(other, Kron):
            self._check_same_structure(other)
            return Kron(
                [
                    [a + b for a, b in zip(F1, F2, strict=True)]
                    for F1, F2 in zip(self.kfacs, other.kfacs, strict=True)
                ],
                groups=self.groups,
            )
        if isinstance(other, CurvatureStructure) or not is_delta_like(other):
            return NotImplemented
        delta = parse_delta(other, {len(self): "one per entry"}, self.dtype, self.device)
        return self.decompose() + delta

    def __radd__(self, other: Any) -> Kron | KronDecomposed:
        # ``0 + kron`` (the start value of the builtin ``sum``) is a copy of the Kron.
        if isinstance(other, numbers.Number) and not isinstance(other, Tensor) and other == 0:
            return Kron([list(F) for F in self.kfacs], groups=self.groups)
        return self.__add__(other)

    def __mul__(self, scalar: float | Tensor) -> Kron:
        r"""``scalar`` times the represented matrix: :math:`(s F_1) \otimes F_2 \otimes \dots`.

        ``scalar`` is any real python number or a one-element tensor (negative and zero
        allowed); the result is differentiable in a tensor ``scalar``.
        """
        s = as_scalar(scalar)
        if s is None:
            return NotImplemented
        return Kron([[F[0] * s, *F[1:]] for F in self.kfacs], groups=self.groups)

    # ---------------------------------------------------------------- decomposition
    def decompose(self, damping: bool = False, *, rtol: float | None = None) -> KronDecomposed:
        r"""Eigendecompose every factor: :math:`F = Q \operatorname{diag}(\lambda) Q^\top`.

        Each dense factor is symmetrized, :math:`(F + F^\top)/2`, and decomposed with
        ``torch.linalg.eigh`` in float64 (per group for a grouped entry); eigenvalues and
        eigenvectors are cast back to the factor's dtype. A 1-D factor's eigenvalues are its
        entries and its eigenvectors ``None`` (identity). Differentiable (through ``eigh``).

        Round-off: with :math:`\tau = \mathrm{rtol} \cdot \max|\lambda|` and default
        ``rtol = 10 n \varepsilon`` (``n`` the factor size, :math:`\varepsilon` the machine
        epsilon of the factor's dtype), a positive semidefinite factor (all
        :math:`\lambda \ge -\tau`) has its negative eigenvalues clamped to 0; a negative
        semidefinite one (all :math:`\lambda \le \tau`, e.g. after ``* s`` with ``s < 0``)
        its positive eigenvalues clamped to 0.

        Parameters
        ----------
        damping : bool, default False
            Stored on the result; see :class:`KronDecomposed`.
        rtol : float, optional
            Relative tolerance of the clamping band (default ``10 * n * eps``).

        Returns
        -------
        KronDecomposed

        Raises
        ------
        IndefiniteFactorError (a ValueError)
            A factor has eigenvalues below :math:`-\tau` and above :math:`\tau` (indefinite
            beyond round-off); the message names the entry and the factor shape.
        DecompositionError (a RuntimeError)
            ``eigh`` failed twice (a failure is retried once, with a ``RuntimeWarning``, in
            float64 on the CPU with the factor scaled to unit max-norm), or a factor is not
            finite; the message names entry and shape.
        """
        eigvecs: list[list[Tensor | None]] = []
        eigvals: list[list[Tensor]] = []
        for i in range(len(self)):
            grouped = self.groups[i] is not None
            Qs: list[Tensor | None] = []
            ls: list[Tensor] = []
            for f in self._batched(i):
                lam, Q = eigh_factor(i, f, grouped, rtol)
                Qs.append(Q if grouped or Q is None else Q[0])
                ls.append(lam if grouped else lam[0])
            eigvecs.append(Qs)
            eigvals.append(ls)
        return KronDecomposed(eigvecs, eigvals, damping=damping)

    # ---------------------------------------------------------------- products
    def bmm(self, W: Tensor, exponent: float = 1) -> Tensor:
        r"""Compute :math:`K^{\mathrm{exponent}} w` for every vector ``w`` in ``W``.

        Parameters
        ----------
        W : Tensor
            Shape ``(P,)``, ``(K, P)`` or ``(B, K, P)`` (any leading dims).
        exponent : float, default 1
            For ``1`` the Kronecker matrix-vector product
            :math:`(G \otimes A)\, \mathrm{vec}(X) = \mathrm{vec}(G X A^\top)` is applied
            per entry (per group) without any dense matrix; otherwise the factors are
            decomposed first (``self.decompose().bmm(W, exponent)``).

        Returns
        -------
        Tensor
            Same shape as ``W``.
        """
        W2 = check_W(W, self.num_params, self.dtype)
        if check_exponent(exponent) != 1:
            return self.decompose().bmm(W, exponent=exponent)
        out = matvec_entries(W2, self.layouts, lambda i, X: apply_along(X, self._batched(i)))
        return out.reshape(W.shape)

    # ---------------------------------------------------------------- reductions
    def logdet(self) -> Tensor:
        r"""Log-determinant of the full matrix, from the factors.

        :math:`\log\det(F_1 \otimes \dots \otimes F_n) = \sum_k (p / d_k) \log\det F_k`
        with ``p`` the block size and ``d_k`` the size of ``F_k`` (summed over the groups of a
        grouped entry). Signs are tracked as in ``torch.logdet`` of the dense matrix:
        ``-inf`` if singular, ``nan`` if negative.
        """
        acc = LogdetAccumulator(self.dtype, self.device)
        for i, lay in enumerate(self.layouts):
            p = math.prod(lay.dims)
            for f, dk in zip(self._batched(i), lay.dims, strict=True):
                if f.ndim == 2:
                    acc.add_values(f, p // dk)
                else:
                    acc.add_slogdet(*torch.linalg.slogdet(f), p // dk)
        return acc.total()

    def trace(self) -> Tensor:
        r""":math:`\operatorname{tr} K = \sum_i \sum_j \prod_k \operatorname{tr} F_{k,j}`
        (entries ``i``, groups ``j``)."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for i in range(len(self)):
            tr = [
                f.sum(-1) if f.ndim == 2 else torch.diagonal(f, 0, -2, -1).sum(-1)
                for f in self._batched(i)
            ]
            total = total + torch.stack(tr).prod(0).sum()
        return total

    def diag(self, exponent: float = 1) -> Tensor:
        """Diagonal of :math:`K^{\\mathrm{exponent}}`, shape ``(P,)``: for exponent 1 per entry
        (and group) the flattened outer product of the factors' diagonals, otherwise
        ``self.decompose().diag(exponent)``."""
        if check_exponent(exponent) != 1:
            return self.decompose().diag(exponent)
        diags = [
            outer(
                [f if f.ndim == 2 else torch.diagonal(f, 0, -2, -1) for f in self._batched(i)]
            ).flatten()
            for i in range(len(self))
        ]
        if not diags:
            return torch.zeros(0)
        return torch.cat(diags)

    def to_matrix(self, exponent: float = 1) -> Tensor:
        """The dense ``P × P`` matrix :math:`K^{\\mathrm{exponent}}` (for testing and small
        models only); for an exponent other than 1 ``self.decompose().to_matrix(exponent)``."""
        if check_exponent(exponent) != 1:
            return self.decompose().to_matrix(exponent)
        blocks = []
        for i, lay in enumerate(self.layouts):
            Fd = [dense_factor(f) for f in self._batched(i)]
            blocks += [kron_all([F[j] for F in Fd]) for j in range(lay.batch)]
        return block_diag(blocks, self.dtype, self.device)

    # ---------------------------------------------------------------- conversion
    def _map(self, fn: Any) -> Kron:
        return Kron([[fn(f) for f in F] for F in self.kfacs], groups=self.groups)

    def state_dict(self) -> dict[str, Any]:
        """``{"kfacs": [[Tensor, ...], ...], "groups": [int or None, ...]}`` (detached):
        loadable with ``torch.load(..., weights_only=True)``."""
        return {"kfacs": [[f.detach() for f in F] for F in self.kfacs], "groups": list(self.groups)}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Replace the factors by those of ``state_dict`` (in place).

        Validated as :meth:`from_state_dict`. With ``strict`` (default) and a non-empty
        ``self``, the block structure must match (else ``InputError``, a ``ValueError``) and
        the loaded factors keep ``self``'s device and dtype.
        """
        new = Kron.from_state_dict(state_dict)
        if strict and len(self) > 0:
            self._check_same_structure(new)
            new = Kron(
                [
                    [g.to(device=f.device, dtype=f.dtype) for f, g in zip(F, G, strict=True)]
                    for F, G in zip(self.kfacs, new.kfacs, strict=True)
                ],
                groups=new.groups,
            )
        self.kfacs, self.groups = new.kfacs, new.groups

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any]) -> Kron:
        """Rebuild a ``Kron`` from :meth:`state_dict` (``"groups"`` optional).

        Raises
        ------
        InputError
            Not a mapping, missing or unexpected keys, ``kfacs`` not a list of lists of
            tensors, bad factor shapes or groups.
        NonFiniteError
            A factor with NaN or infinite values (the message names entry and factor).
        """
        sd = check_keys(state_dict, "Kron", {"kfacs"}, {"groups"})
        kfacs = tensor_entries(sd["kfacs"], "Kron", "kfacs")
        groups = groups_field(sd.get("groups"), "Kron", len(kfacs))
        return cls(kfacs, groups=groups)
