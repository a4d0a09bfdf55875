r"""The structures beyond K-FAC, for every backend: EKFAC, per-layer blocks, low rank.

These are the shared implementations behind :meth:`~curvlib.CurvatureInterface.ekfac`,
:meth:`~curvlib.CurvatureInterface.blocks` and :meth:`~curvlib.CurvatureInterface.lowrank`.
With :math:`V_{n,k} = J_n^\top c_{n,k}` the per-sample products of the curvature (the
columns ``k`` of :math:`\Lambda^{1/2}`, the MC draws, or the loss gradient):

* **EKFAC** (George et al., NeurIPS 2018): the eigenbases :math:`U_1, U_2` of the
  backend's own K-FAC factors of each entry (so ``kfac_approx`` applies) and the corrected
  eigenvalues :math:`s = \sum_{n,k} (U_1^\top D_{n,k} U_2)^{\circ 2}`, with :math:`D_{n,k}`
  the per-sample product of the parameter reshaped like its entry's factors — the
  diagonal of the exact curvature block in the Kronecker eigenbasis. For one datum and one
  column it is the exact block. Per-sample products come from the K-FAC rule table
  (:mod:`curvlib.kfac`), generic torch.func products for parameters no rule covers.
* **Blocks**: the exact curvature block of every layer (the parameters a module owns),
  :math:`\sum_{n,k} V_{n,k}^{(l)} V_{n,k}^{(l)\top}` — only each layer's own products, never
  the ``P × P`` matrix; for the Hessian, Hessian-vector products restricted to the layer.
* **Low rank**: the top-``k`` eigenpairs of the curvature by Lanczos on the operator
  (:func:`curvlib.lanczos`), plus a remainder: ``"diag"`` (the exact diagonal minus the low
  rank's, so the diagonal is exact), ``"scalar"`` (the remaining trace spread evenly over the
  ``P - k`` other directions) or ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlib._call import Call
from curvlib._inputs import slice_batch
from curvlib.errors import InputError

__all__ = [
    "ekfac",
    "layer_products",
    "product_chunks",
    "ekfac_eigenvalues",
    "blocks_from_products",
    "lowrank",
    "layer_groups",
    "rotate_square",
]


def rotate_square(D: Tensor, bases: Sequence[Tensor | None], grouped: bool) -> Tensor:
    r""":math:`\sum_m (U_1^\top \otimes \dots \otimes U_n^\top\, \mathrm{vec} D_m)^{\circ 2}`.

    Parameters
    ----------
    D : Tensor
        ``(M, d_1, ..., d_n)`` (grouped ``(M, g, d_1, ..., d_n)``).
    bases : sequence of Tensor or None
        ``U_k`` of shape ``(d_k, d_k)`` (grouped ``(g, d_k, d_k)``); ``None`` is the identity.
    grouped : bool

    Returns
    -------
    Tensor
        ``(d_1, ..., d_n)`` (grouped ``(g, d_1, ..., d_n)``).
    """
    lead = 2 if grouped else 1
    for k, U in enumerate(bases):
        if U is None:
            continue
        ax = lead + k
        X = torch.movedim(D, ax, -1)
        if grouped:  # X (M, g, ..., d): contract d with U (g, d, d) per group
            shape = X.shape
            Xg = X.reshape(shape[0], shape[1], -1, shape[-1])
            X = torch.einsum("mgid,gde->mgie", Xg, U).reshape(shape)
        else:
            X = X @ U
        D = torch.movedim(X, -1, ax)
    return D.square().sum(0)


def _passes(
    curv: Any,
    call: Call,
    cotangents=None,
    light: bool = False,
    chunk_entries=2**25,
    cov=None,
    stream: bool = False,
):
    """``(loss, LayerPass)`` per batch chunk (one recorded forward and backward pass each).

    Chunks keep ``(b, K, P)`` within ``chunk_entries`` unless ``light`` (the caller needs no
    per-sample products: one chunk). ``cotangents(call, f, y, generator)`` defaults to the
    curvature's own. With ``stream`` each batch chunk is yielded once per chunk of cotangent
    columns (:meth:`~curvlib.kfac.LayerPass.stream`; the loss with the first, 0 after), for
    a caller that sums over the columns.
    """
    from curvlib.kfac import LayerPass, coverage

    cot_fn = cotangents or (lambda c, f, y, g: c.cotangents(f, y, g))
    root, params = curv.differentiated_module, curv.params
    cov = coverage(root, params) if cov is None else cov
    P, B = curv.num_params, call.B
    size = B if light else min(B, max(1, chunk_entries // (8 * P)))
    start = 0
    while start < B:
        s = slice(start, min(B, start + size))
        inp, y, gen = slice_batch(call.inp, s), call.y[s], call.generator_slice(s)
        lp = LayerPass(root, params, cov)
        chunks = lp.stream(
            lambda inp=inp, y=y: call.forward(inp, y),
            lambda f, y=y, gen=gen: cot_fn(call, f, y, gen),
            curv._generic_products_for(inp),
            stream,
        )
        for f, cols in chunks:
            yield (call.loss(f, y) if cols.start == 0 else 0.0), lp
        K = lp.num_columns
        start = s.stop
        size = B if light else max(1, chunk_entries // max(1, K * P))


def product_chunks(curv: Any, call: Call, cotangents=None):
    """``(loss, V)`` per batch chunk: per-sample products ``V (b*K, P)`` from the rule table."""
    for loss, lp in _passes(curv, call, cotangents):
        yield loss, lp.products().flatten(0, 1)


def layer_products(curv: Any, call: Call, structure: str, cotangents=None) -> tuple[Tensor, Tensor]:
    """``(loss, result)``: the diagonal ``(P,)`` or the dense ``(P_s, P_s)`` from per-layer
    products (the autograd backend's ``full`` and ``diag``).

    The diagonal of parameters every rule covers needs no per-sample products (one pass).
    """
    from curvlib.kfac import coverage

    cov = coverage(curv.differentiated_module, curv.params)
    light = structure == "diag" and not cov.generic
    loss, out = 0.0, None
    # the diagonal sums over the cotangent columns: they are streamed
    stream = structure == "diag"
    for part_loss, lp in _passes(curv, call, cotangents, light, cov=cov, stream=stream):
        if structure == "diag":
            part = lp.squares()
        else:
            V = call.select(lp.products()).flatten(0, 1)
            part = V.T @ V
        loss = loss + part_loss
        out = part if out is None else out + part
    return loss, out


def ekfac_eigenvalues(
    curv: Any,
    call: Call,
    bases: Sequence[Sequence[Tensor | None]],
    specs: Sequence[tuple[list[tuple[int, ...]], Any]] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """``(loss, s per entry)``: the corrected eigenvalues of ``call``'s batch in ``bases``.

    ``specs``: per entry its factor shapes (default: what the rules say without data,
    :func:`curvlib.kfac.compute.entry_specs`; the K-FAC just computed where there is one).
    """
    from curvlib.kfac.compute import entry_specs

    params = curv.params
    if specs is None:
        specs = entry_specs(curv.differentiated_module, params)
    sums: list[Tensor | None] = [None] * len(params)
    loss = 0.0
    for part_loss, V in product_chunks(curv, call):
        pos = 0
        for i, (p, (shapes, _)) in enumerate(zip(params, specs, strict=True)):
            D = V[:, pos : pos + p.numel()]
            pos += p.numel()
            grouped = any(len(sh) == 3 for sh in shapes)
            lead = [shapes[0][0]] if grouped else []
            dims = [sh[-1] for sh in shapes]
            part = rotate_square(D.reshape(D.shape[0], *lead, *dims), bases[i], grouped)
            sums[i] = part if sums[i] is None else sums[i] + part
        loss = loss + part_loss
    return loss, sums


def ekfac(curv: Any, call: Call):
    """The backend's K-FAC for the eigenbases, curvlib's per-layer products for ``s``."""
    from curvlib.structures import EKFAC, KronDecomposed

    basis = call.options.get("basis")
    specs = None
    if basis is None:
        state = call.generator_state()
        _, K = curv._kron(call)
        call.restore_generator(state)  # the same MC draws for s
        bases = K.decompose().eigenvectors
        specs = [([tuple(f.shape) for f in F], None) for F in K.kfacs]
    elif isinstance(basis, EKFAC):
        bases = basis.eigenbases
    elif isinstance(basis, KronDecomposed):
        bases = basis.eigenvectors
    else:
        raise InputError(f"basis must be an EKFAC or a KronDecomposed, got {type(basis).__name__}")
    loss, s = ekfac_eigenvalues(curv, call, bases, specs)
    return loss, EKFAC([list(b) for b in bases], s)


def blocks_from_products(chunks, groups: list[tuple[str, list[int]]], sizes: list[int]):
    """``(loss, BlockDiag)`` from chunks ``(loss, V (M, P))`` of per-sample products."""
    from curvlib.structures import BlockDiag

    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    spans = [
        torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in idx]) for _, idx in groups
    ]
    blocks: list[Tensor | None] = [None] * len(groups)
    loss = 0.0
    for part_loss, V in chunks:
        for j, span in enumerate(spans):
            Vj = V[:, span.to(V.device)]
            b = Vj.T @ Vj
            blocks[j] = b if blocks[j] is None else blocks[j] + b
        loss = loss + part_loss
    return loss, BlockDiag(blocks, [name for name, _ in groups])


def lowrank(curv: Any, call: Call):
    r"""``(loss, LowRank)``: Lanczos on the batch operator and the requested remainder."""
    from curvlib.estimators import lanczos
    from curvlib.structures import LowRank

    opts = call.options
    P = curv.num_params
    k = opts.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= P:
        raise InputError(f"k (the rank) must be an integer in [1, {P}], got {k!r}")
    remainder = opts.get("remainder", "diag")
    if remainder not in ("diag", "scalar", None):
        raise InputError(f"remainder must be 'diag', 'scalar' or None, got {remainder!r}")
    num_iters = opts.get("num_iters")
    num_iters = min(P, 2 * k + 20) if num_iters is None else num_iters
    gen = torch.Generator().manual_seed(int(opts.get("seed", 0)))
    state = call.generator_state()  # the remainder's diagonal sees the operator's MC draws
    op = _BatchOperator(curv, call)
    vals, U = lanczos(op, k, num_iters=num_iters, generator=gen)
    loss = op.loss
    if remainder is None:
        return loss, LowRank(U, vals)
    call.restore_generator(state)
    d = curv._shared_diag(call)[1]
    return loss, with_remainder(U, vals, d, remainder, curv.curvature_name() != "hessian")


def with_remainder(U: Tensor, vals: Tensor, d: Tensor, remainder: str, psd: bool):
    r"""The :class:`~curvlib.LowRank` of ``U, vals`` with the remainder from the exact diagonal.

    ``"diag"``: :math:`U\Lambda U^	op + D`, :math:`D = \mathrm{diag}(C) -
    \mathrm{diag}(U\Lambda U^	op)` (the diagonal is exact); ``"scalar"``:
    :math:`U(\Lambda - \sigma)U^	op + \sigma I` with :math:`\sigma = (\mathrm{tr}\,C -
    \sum\lambda)/(P - k)` (exact on the top directions, the trace exact). For a PSD curvature
    round-off below zero is clipped.
    """
    from curvlib.structures import LowRank

    P, k = U.shape
    resid = d - (U.square() * vals).sum(1)
    if remainder == "diag":
        return LowRank(U, vals, resid.clamp_min(0) if psd else resid)
    sigma = resid.sum() / max(1, P - k)
    sigma = sigma.clamp_min(0) if psd else sigma
    return LowRank(U, vals - sigma, sigma)


class _BatchOperator:
    """``V -> C V`` on one validated call: the backend's ``_matmat`` hook (MC draws fixed)."""

    def __init__(self, curv: Any, call: Call) -> None:
        self.curv, self.call = curv, call
        ref = curv.params[0]
        self.shape = (curv.num_params, curv.num_params)
        self.dtype, self.device = ref.dtype, ref.device
        f = call.forward(grad=False)
        self.loss = call.loss(f)
        self.cot = None
        if call.stochastic:
            self.cot = call.cotangents(f)
        elif curv.curvature_name() == "ef":
            self.cot = curv.lik.ef_cotangents(f.detach(), call.y)

    def __matmul__(self, V: Tensor) -> Tensor:
        return self.curv._matmat(self.call, V, self.cot, False)


def layer_groups(root: nn.Module, params: Sequence[Tensor]) -> list[tuple[str, list[int]]]:
    """The layers of :meth:`~curvlib.CurvatureInterface.blocks`: per module owning selected
    parameters (in parameter order of its first one), its path and the parameter indices.

    A parameter held by several modules belongs to the first that holds it.
    """
    index = {id(p): i for i, p in enumerate(params)}
    owner: dict[int, str] = {}
    for path, mod in root.named_modules():
        for _, p in mod.named_parameters(recurse=False):
            if id(p) in index and id(p) not in owner:
                owner[id(p)] = path
    groups: dict[str, list[int]] = {}
    for p in params:
        groups.setdefault(owner.get(id(p), ""), []).append(index[id(p)])
    return [(path or "<root>", idx) for path, idx in groups.items()]
