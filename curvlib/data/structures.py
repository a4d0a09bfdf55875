r"""How the :class:`~curvlib.data.Accumulator` handles each structure: one table entry each.

Every structure is accumulated the same way — call the curvature object on a batch, turn
the result into a flat list of **summands** (tensors that add up over batches, shards and
ranks), add them, and turn the sums back into a result once, at the end, with the global
count :math:`N`. What differs between structures is data, one :class:`StructureRule` per
name in :data:`STRUCTURES`:

``check_options(curv, options) -> options``
    The structure's own options, checked (before any data).
``call(curv, x, y, B, kw) -> (loss, result)``
    How to call the curvature object on a batch of ``B`` data points (``kw`` holds the MC
    ``generator`` and the structure's options).
``pack(curv, result, B) -> (summands, layout)``
    The summands of one result and its *layout* (a tuple of ints that describes how the
    summands group into the result; ``()`` for a single tensor). Two results add only if
    their layouts and shapes agree.
``template(curv, options) -> (shapes, layout)``
    The shapes and layout of the summands from the parameters alone, without data: what a
    rank without data sends, and what the ranks compare before accumulating.
``finalize(curv, sums, layout, N, options) -> result``
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
         per bias :math:`G`; exact blocks   :class:`~curvlib.Kron` with :math:`\tilde A / N`
======== ================================ ============================================

For ``kron`` the backend is called as ``kron(x, y, N=B)``, which returns
:math:`A = \frac1B \sum_{n \in \text{batch}} a a^\top` (the curvature objects require an
integer :math:`N \ge B`), so ``pack`` multiplies the factor that carries :math:`1/N` (the
layer rule says which: the second of a Linear weight ``[G, A]``, the first of an
Embedding's ``[A, G]``, none of an exact block) by :math:`B` to get the plain sum
:math:`\tilde A`; ``finalize`` divides it by the global :math:`N` once. With weight sharing
(``kfac_approx="expand"``) the backend's :math:`1/L` over the :math:`L` locations stays in
:math:`\tilde A`. The layout holds ``(number of factors, index of the 1/N factor or -1)``
per entry.

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


def _no_options(curv: Any, options: dict[str, Any]) -> dict[str, Any]:
    if options:
        raise TypeError(f"this structure takes no options, got {sorted(options)}")
    return options


@dataclass(frozen=True)
class StructureRule:
    """How to call, pack, template, finalize and label one structure (module docstring)."""

    call: Callable[[Any, Any, Tensor | None, int, dict[str, Any]], tuple[Tensor, Any]]
    pack: Callable[[Any, Any, int], tuple[list[Tensor], Layout]]
    template: Callable[[Any, dict[str, Any]], tuple[list[Shape], Layout]]
    finalize: Callable[[Any, list[Tensor], Layout, int, dict[str, Any]], Any]
    labels: Callable[[Layout, list[str]], list[str]]
    check_options: Callable[[Any, dict[str, Any]], dict[str, Any]] = _no_options


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

    def template(curv: Any, options: dict[str, Any]) -> tuple[list[Shape], Layout]:
        P = num_selected(curv)
        return [(P,) * ndim], ()

    return StructureRule(
        call=call,
        pack=lambda curv, H, B: ([H], ()),
        template=template,
        finalize=lambda curv, sums, layout, N, options: sums[0].clone(),
        labels=lambda layout, names: [f"{name!r} result"],
    )


def _kron_call(curv: Any, x: Any, y: Tensor | None, B: int, kw: dict[str, Any]):
    return curv.kron(x, y, N=B, **kw)


def _kron_specs(curv: Any) -> list[tuple[list[Shape], int | None]]:
    from curvlib.kfac.compute import entry_specs

    return entry_specs(curv.differentiated_module, curv.params)


def _kron_pack(curv: Any, K: Kron, B: int) -> tuple[list[Tensor], Layout]:
    out: list[Tensor] = []
    layout: list[int] = []
    for F, (_, a) in zip(K.kfacs, _kron_specs(curv), strict=True):
        out.extend(f * B if j == a else f for j, f in enumerate(F))  # A carries 1/B
        layout += [len(F), -1 if a is None else a]
    return out, tuple(layout)


def _kron_template(curv: Any, options: dict[str, Any]) -> tuple[list[Shape], Layout]:
    specs = _kron_specs(curv)
    shapes = [tuple(s) for fs, _ in specs for s in fs]
    layout = tuple(v for fs, a in specs for v in (len(fs), -1 if a is None else a))
    return shapes, layout


def _entries(layout: Layout) -> list[tuple[int, int]]:
    return list(zip(layout[::2], layout[1::2], strict=True))


def _kron_finalize(curv: Any, sums: list[Tensor], layout: Layout, N: int, options: Any) -> Kron:
    kfacs, pos = [], 0
    for k, a in _entries(layout):
        F = [t.clone() for t in sums[pos : pos + k]]
        if a >= 0:
            F[a] = F[a] / N
        kfacs.append(F)
        pos += k
    return Kron(kfacs)


def _kron_labels(layout: Layout, names: list[str]) -> list[str]:
    out = []
    for i, (k, a) in enumerate(_entries(layout)):
        owner = f"entry {i}" + (f" ({names[i]!r})" if i < len(names) else "")
        factors = [("A" if j == a else "G" if k == 2 else str(j)) for j in range(k)]
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


def _register_beyond() -> None:
    from curvlib.data.beyond import BLOCKS, EKFAC_RULE, LOWRANK

    STRUCTURES.update({"ekfac": EKFAC_RULE, "blocks": BLOCKS, "lowrank": LOWRANK})


_register_beyond()
