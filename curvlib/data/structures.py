r"""How the :class:`~curvlib.data.Accumulator` handles each structure: one table entry each.

Every structure is accumulated the same way — call the curvature object on a batch, turn
the result into a flat list of **summands** (tensors that add up over batches, shards and
ranks), add them, and turn the sums back into a result once, at the end, with the global
count :math:`N`. What differs between structures is data, one :class:`StructureRule` per
name in :data:`STRUCTURES`:

``call(curv, x, y, B, kw) -> (loss, result)``
    How to call the curvature object on a batch of ``B`` data points (``kw`` holds the MC
    ``generator``).
``pack(result, B) -> (summands, layout)``
    The summands of one result and its *layout* (a tuple of ints that describes how the
    summands group into the result; ``()`` for a single tensor). Two results add only if
    their layouts and shapes agree.
``template(curv) -> (shapes, layout)``
    The shapes and layout of the summands from the parameters alone, without data: what a
    rank without data sends, and what the ranks compare before accumulating.
``finalize(sums, layout, N) -> result``
    The result of the whole data set from the sums (new tensors; the sums are not modified).
``labels(layout, names) -> list[str]``
    A name per summand for error messages (``names``: the selected parameters' names).

The built-in rules:

======== ================================ ============================================
name     summands                         finalized
======== ================================ ============================================
``full`` :math:`\sum_n H_n` ``(P, P)``     the sum
``diag`` :math:`\sum_n h_n` ``(P,)``       the sum
``kron`` per weight :math:`G = \sum g g^\top`, :math:`\tilde A = \sum a a^\top`;
         per bias :math:`G`                 :class:`~curvlib.Kron` with :math:`[G, \tilde A / N]`
======== ================================ ============================================

For ``kron`` the backend is called as ``kron(x, y, N=B)``, which returns
:math:`A = \frac1B \sum_{n \in \text{batch}} a a^\top` (the curvature objects require an
integer :math:`N \ge B`), so ``pack`` multiplies the second factor of each two-factor entry
by :math:`B` to get the plain sum :math:`\tilde A`; ``finalize`` divides by the global
:math:`N` once. With weight sharing (``kfac_approx="expand"``) the backend's :math:`1/L`
over the :math:`L` locations stays in :math:`\tilde A`.

Adding a structure (say EKFAC eigenvalue corrections or per-layer blocks) is one more
entry in :data:`STRUCTURES` — and the curvature class listing the name in its
``structures``; the accumulation, merging, the packed all-reduce and the checks across
ranks need no change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvlib.kron import Kron

__all__ = ["StructureRule", "STRUCTURES", "num_selected"]

Shape = tuple[int, ...]
Layout = tuple[int, ...]


@dataclass(frozen=True)
class StructureRule:
    """How to call, pack, template, finalize and label one structure (module docstring)."""

    call: Callable[[Any, Any, Tensor | None, int, dict[str, Any]], tuple[Tensor, Any]]
    pack: Callable[[Any, int], tuple[list[Tensor], Layout]]
    template: Callable[[Any], tuple[list[Shape], Layout]]
    finalize: Callable[[list[Tensor], Layout, int], Any]
    labels: Callable[[Layout, list[str]], list[str]]


def num_selected(curv: Any) -> int:
    """P: the number of selected parameter entries (after ``subnetwork_indices``)."""
    idx = getattr(curv, "subnetwork_indices", None)
    if idx is None:
        return sum(p.numel() for p in curv.params)
    idx = torch.as_tensor(idx)
    return int(idx.sum()) if idx.dtype == torch.bool else int(idx.numel())


def _dense(name: str, ndim: int) -> StructureRule:
    """A structure whose result is one tensor that is summed as it is (``full``, ``diag``)."""

    def call(curv: Any, x: Any, y: Tensor | None, B: int, kw: dict[str, Any]):
        return getattr(curv, name)(x, y, **kw)

    def template(curv: Any) -> tuple[list[Shape], Layout]:
        P = num_selected(curv)
        return [(P,) * ndim], ()

    return StructureRule(
        call=call,
        pack=lambda H, B: ([H], ()),
        template=template,
        finalize=lambda sums, layout, N: sums[0].clone(),
        labels=lambda layout, names: [f"{name!r} result"],
    )


def _kron_call(curv: Any, x: Any, y: Tensor | None, B: int, kw: dict[str, Any]):
    return curv.kron(x, y, N=B, **kw)


def _kron_pack(K: Kron, B: int) -> tuple[list[Tensor], Layout]:
    out: list[Tensor] = []
    for F in K.kfacs:
        out.extend(F if len(F) != 2 else (F[0], F[1] * B))  # A of the batch carries 1/B
    return out, tuple(len(F) for F in K.kfacs)


def _kron_template(curv: Any) -> tuple[list[Shape], Layout]:
    kfacs = Kron.init_from_model(list(curv.params), device="meta").kfacs
    return [tuple(f.shape) for F in kfacs for f in F], tuple(len(F) for F in kfacs)


def _kron_finalize(sums: list[Tensor], layout: Layout, N: int) -> Kron:
    kfacs, pos = [], 0
    for k in layout:
        F = [t.clone() for t in sums[pos : pos + k]]
        if k == 2:
            F[1] = F[1] / N
        kfacs.append(F)
        pos += k
    return Kron(kfacs)


def _kron_labels(layout: Layout, names: list[str]) -> list[str]:
    out = []
    for i, k in enumerate(layout):
        owner = f"entry {i}" + (f" ({names[i]!r})" if i < len(names) else "")
        factors = ("G", "A")[:k] if k <= 2 else tuple(str(j) for j in range(k))
        out.extend(f"kron factor {f} of {owner}" for f in factors)
    return out


#: the structures the accumulator handles, by name; one :class:`StructureRule` each
STRUCTURES: dict[str, StructureRule] = {
    "full": _dense("full", 2),
    "diag": _dense("diag", 1),
    "kron": StructureRule(
        call=_kron_call,
        pack=_kron_pack,
        template=_kron_template,
        finalize=_kron_finalize,
        labels=_kron_labels,
    ),
}
