r"""The accumulation rules of EKFAC, per-layer blocks and low rank (one entry each).

======== ========================================= ==========================================
name     summands                                  finalized
======== ========================================= ==========================================
blocks   :math:`\sum_n B^{(l)}_n`, one per layer    :class:`~curvlib.BlockDiag`
ekfac    :math:`\sum_n s_n` per entry, in a fixed   :class:`~curvlib.EKFAC` with that basis
         ``basis`` (option)
lowrank  the sketch :math:`\sum_n C_n \Omega` and   :class:`~curvlib.LowRank`: the top ``k``
         the diagonal :math:`\sum_n \mathrm{diag}    eigenpairs of :math:`Y W^{+} Y^\top`
         C_n`                                       (:math:`Y = C\Omega`, :math:`W = \Omega^\top
                                                   Y`) and the remainder
======== ========================================= ==========================================

EKFAC over a data set takes two passes (:func:`curvlib.fit` runs both): the K-FAC of the whole
data set gives the eigenbases (its factors are sums, decomposed once at the end), then the
corrected eigenvalues are summed in that fixed basis — the ``basis`` option.

Low rank over a data set is the single-pass randomized approximation from a Gaussian sketch
:math:`\Omega` (``P × sketch``, drawn from ``seed``, the same on every rank): the sketch of the
sum is the sum of the sketches, so it merges over batches, shards and ranks like every
other structure. It is exact (to round-off) when the curvature has rank at most ``sketch``;
:meth:`~curvlib.CurvatureInterface.lowrank` on one batch uses Lanczos instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlib.errors import InputError

__all__ = ["BLOCKS", "EKFAC_RULE", "LOWRANK"]


def _layer_layout(curv: Any) -> tuple[list[tuple[str, list[int]]], list[int]]:
    from curvlib.structured import layer_groups

    params = curv.params
    groups = layer_groups(curv.differentiated_module, params)
    sizes = [sum(params[i].numel() for i in idx) for _, idx in groups]
    return groups, sizes


def _blocks_rule():
    from curvlib.data.structures import StructureRule

    def call(curv: Any, x: Any, y: Any, B: int, kw: dict[str, Any]):
        return curv.blocks(x, y, **kw)

    def template(curv: Any, options: dict[str, Any]):
        _, sizes = _layer_layout(curv)
        return [(n, n) for n in sizes], tuple(sizes)

    def finalize(curv: Any, sums: list[Tensor], layout: Any, N: int, options: Any):
        from curvlib.structures import BlockDiag

        groups, _ = _layer_layout(curv)
        return BlockDiag([t.clone() for t in sums], [name for name, _ in groups])

    return StructureRule(
        call=call,
        pack=lambda curv, Bd, B: (list(Bd.blocks), tuple(b.shape[0] for b in Bd.blocks)),
        template=template,
        finalize=finalize,
        labels=lambda layout, names: [f"block {i}" for i in range(len(layout))],
    )


def _bases(basis: Any) -> list[list[Tensor | None]]:
    from curvlib.structures import EKFAC, KronDecomposed

    if isinstance(basis, EKFAC):
        return basis.eigenbases
    if isinstance(basis, KronDecomposed):
        return basis.eigenvectors
    raise InputError(
        "the 'ekfac' accumulator needs options={'basis': ...}: an EKFAC or KronDecomposed "
        "with the eigenbases of the data set's K-FAC (curvlib.fit(curv, loader, 'ekfac') "
        f"computes it in a first pass); got {type(basis).__name__}"
    )


def _ekfac_rule():
    from curvlib.data.structures import StructureRule

    def check(curv: Any, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - {"basis"})
        if unknown:
            raise TypeError(f"the 'ekfac' accumulator takes options ['basis'], got {unknown}")
        _bases(options.get("basis"))
        return options

    def call(curv: Any, x: Any, y: Any, B: int, kw: dict[str, Any]):
        return curv.ekfac(x, y, N=B, **kw)

    def template(curv: Any, options: dict[str, Any]):
        from curvlib.kfac.compute import entry_specs

        shapes = []
        for fs, _ in entry_specs(curv.differentiated_module, curv.params):
            grouped = any(len(f) == 3 for f in fs)
            lead = (fs[0][0],) if grouped else ()
            shapes.append((*lead, *(f[-1] for f in fs)))
        return shapes, tuple(len(s) for s in shapes)

    def finalize(curv: Any, sums: list[Tensor], layout: Any, N: int, options: Any):
        from curvlib.structures import EKFAC

        return EKFAC([list(b) for b in _bases(options["basis"])], [t.clone() for t in sums])

    return StructureRule(
        call=call,
        pack=lambda curv, E, B: (list(E.eigenvalues), tuple(t.ndim for t in E.eigenvalues)),
        template=template,
        finalize=finalize,
        labels=lambda layout, names: [
            f"EKFAC eigenvalues of entry {i}" for i in range(len(layout))
        ],
        check_options=check,
    )


_LOWRANK_DEFAULTS = {"k": 10, "sketch": None, "seed": 0, "remainder": "diag"}


def _sketch_matrix(curv: Any, options: dict[str, Any]) -> Tensor:
    ref = curv.params[0]
    gen = torch.Generator().manual_seed(int(options["seed"]))
    Omega = torch.randn(curv.num_params, options["sketch"], generator=gen, dtype=torch.float64)
    return Omega.to(ref.device, ref.dtype)


def _lowrank_rule():
    from curvlib.data.structures import StructureRule, num_selected

    def check(curv: Any, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(_LOWRANK_DEFAULTS))
        if unknown:
            raise TypeError(
                f"the 'lowrank' accumulator takes options {sorted(_LOWRANK_DEFAULTS)}, got "
                f"{unknown}"
            )
        out = {**_LOWRANK_DEFAULTS, **options}
        P = num_selected(curv)
        k = out["k"]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= P:
            raise InputError(f"k must be an integer in [1, {P}], got {k!r}")
        if out["sketch"] is None:
            out["sketch"] = min(P, 2 * k + 10)
        if not isinstance(out["sketch"], int) or not k <= out["sketch"] <= P:
            raise InputError(
                f"sketch must be an integer in [k, P] = [{k}, {P}], got {out['sketch']!r}"
            )
        if out["remainder"] not in ("diag", "scalar", None):
            raise InputError(
                f"remainder must be 'diag', 'scalar' or None, got {out['remainder']!r}"
            )
        return out

    def call(curv: Any, x: Any, y: Any, B: int, kw: dict[str, Any]):
        from curvlib._call import generator_state, set_generator_state

        gen = kw.get("generator")
        state = generator_state(gen)
        loss, d = curv.diag(x, y, generator=gen)
        set_generator_state(gen, state)  # the same MC draws for the sketch
        op = curv.operator(x, y, generator=gen)
        return loss, (op @ _sketch_matrix(curv, kw), d)

    def template(curv: Any, options: dict[str, Any]):
        P = num_selected(curv)
        return [(P, options["sketch"]), (P,)], ()

    def finalize(curv: Any, sums: list[Tensor], layout: Any, N: int, options: Any):
        psd = curv.curvature_name() != "hessian"
        return nystrom(sums[0], _sketch_matrix(curv, options), sums[1], {**options, "psd": psd})

    return StructureRule(
        call=call,
        pack=lambda curv, r, B: ([r[0], r[1]], ()),
        template=template,
        finalize=finalize,
        labels=lambda layout, names: ["low-rank sketch", "diagonal"],
        check_options=check,
    )


def nystrom(Y: Tensor, Omega: Tensor, d: Tensor, options: dict[str, Any]):
    r"""The top-``k`` eigenpairs of :math:`Y W^{+} Y^\top` (:math:`W = \Omega^\top Y`) and the
    remainder from the diagonal ``d``: a :class:`~curvlib.LowRank`.

    With :math:`Y = QR`, :math:`Y W^+ Y^\top = Q (R W^+ R^\top) Q^\top`; the small symmetric
    core is eigendecomposed (pseudo-inverse with a relative cutoff of ``sketch · eps``).
    """
    from curvlib.structures import LowRank

    k = options["k"]
    Y64, O64 = Y.double(), Omega.double()
    W = O64.T @ Y64
    W = (W + W.T) / 2
    wv, wV = torch.linalg.eigh(W)
    cut = wv.abs().max() * W.shape[0] * torch.finfo(torch.float64).eps
    inv = torch.where(wv.abs() > cut, 1.0 / wv, torch.zeros_like(wv))
    Q, R = torch.linalg.qr(Y64)
    core = R @ (wV * inv) @ wV.T @ R.T
    ev, eV = torch.linalg.eigh((core + core.T) / 2)
    order = ev.argsort(descending=True)[:k]
    vals = ev[order].to(Y.dtype)
    U = (Q @ eV[:, order]).to(Y.dtype)
    if options["remainder"] is None:
        return LowRank(U, vals)
    from curvlib.structured import with_remainder

    return with_remainder(U, vals, d, options["remainder"], options.get("psd", True))


BLOCKS = _blocks_rule()
EKFAC_RULE = _ekfac_rule()
LOWRANK = _lowrank_rule()
