r"""Per-layer curvature: the diagonal or the full block of each module, and statistics.

A module's block is :math:`C_{\ell\ell} = C[I_\ell, I_\ell]`, with :math:`I_\ell` the
positions of the module's own trainable parameters (``recurse=False``, in parameter
order) in the flat vector of selected parameters; its diagonal is
:math:`\mathrm{diag}(C)[I_\ell]`. The Hessian diagonal and blocks cost one
Hessian-vector product per entry of the layers asked for; GGN / EF diagonals come from the
backend's ``diag``. Results are ``dict``\ s keyed by the module's path in the model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlib import _autodiff
from curvlib.errors import InputError
from curvlib.linops import curvature_operator

__all__ = [
    "layer_indices",
    "differentiable_diagonal",
    "per_layer_diagonal",
    "per_layer_blocks",
    "layer_statistics",
]


def layer_indices(
    curv: Any, layer_types: Sequence[type[nn.Module]] | None = None
) -> dict[str, Tensor]:
    """Positions of each module's own trainable parameters in the selected parameter vector.

    Parameters
    ----------
    curv : CurvatureInterface
        Its selected parameters (last layer or all) define the vector; it must have no
        ``subnetwork_indices``.
    layer_types : sequence of module classes, optional
        Keep only modules that are instances of these (``isinstance``). Default: every
        module that owns trainable parameters directly.

    Returns
    -------
    dict[str, Tensor]
        Module path (as in ``named_modules``; prefixed by ``last_layer`` with
        ``last_layer=True``) to a 1-D ``long`` tensor of positions. A parameter shared by
        several modules belongs to the first.
    """
    if curv.subnetwork_indices is not None:
        raise InputError("per-layer curvature needs subnetwork_indices=None")
    types = tuple(layer_types) if layer_types is not None else (nn.Module,)
    offsets, start = {}, 0
    for p in curv.params:
        offsets[id(p)] = (start, p.numel())
        start += p.numel()
    device = curv.params[0].device if curv.params else None
    out, seen = {}, set()
    prefix = "last_layer" if curv.last_layer else ""
    for name, module in curv.differentiated_module.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in offsets]
        own = [p for p in own if id(p) not in seen]
        seen.update(id(p) for p in own)
        if not own or not isinstance(module, types):
            continue
        idx = [torch.arange(offsets[id(p)][0], sum(offsets[id(p)])) for p in own]
        key = ".".join(s for s in (prefix, name) if s)
        out[key] = torch.cat(idx).to(device)
    return out


def _split(flat: Tensor, idx: dict[str, Tensor]) -> dict[str, Tensor]:
    parts = flat.split([int(i.numel()) for i in idx.values()])
    return dict(zip(idx, parts, strict=True))


def _unit_columns(op: Any, sel: Tensor, chunk: int) -> Iterable[tuple[Tensor, Tensor]]:
    """``(positions, op @ E)`` for chunks of unit vectors at ``sel``."""
    P = op.shape[0]
    for s in range(0, sel.numel(), chunk):
        part = sel[s : s + chunk]
        E = torch.zeros(P, part.numel(), dtype=op.dtype, device=op.device)
        E[part, torch.arange(part.numel(), device=E.device)] = 1
        yield part, op @ E


def differentiable_diagonal(
    curv: Any,
    x: Any,
    y: Tensor | None = None,
    sel: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The curvature diagonal (at positions ``sel``), differentiable w.r.t. the parameters.

    GGN and EF: :math:`\sum_{n,k} (J_n^\top c_{n,k})^2` with the cotangents computed from
    the output *with* its graph (:math:`\Lambda(f)^{1/2}` or :math:`r_n`), by per-sample
    vector-Jacobian products that keep the graph. Hessian (and MC Fisher, whose samples
    are constants): :math:`e_i^\top C e_i` by one operator product per entry.
    """
    name = curv.curvature_name()
    if name in ("ggn", "ef") and not getattr(curv, "stochastic", False):
        call = curv._begin("diag", x, y)
        with curv._hygiene(call):
            call.inp = curv._features(call)
            f = call.forward(grad=True)
            lik = curv.lik
            cot = lik.sqrt_cotangents(f, call.y) if name == "ggn" else lik.ef_cotangents(f, call.y)
            V = _autodiff.per_sample_vjps(
                curv.differentiated_module,
                curv.params,
                call.inp,
                cot,
                detach=False,
                model_key=curv.model,
            )
        diag = call.select(V).pow(2).sum((0, 1))
        return diag if sel is None else diag[sel]
    op = curvature_operator(curv, x, y, generator=generator, create_graph=True)
    sel = torch.arange(op.shape[0], device=op.device) if sel is None else sel
    cols = [
        C[part, torch.arange(part.numel(), device=C.device)]
        for part, C in _unit_columns(op, sel, op.chunk_size)
    ]
    return torch.cat(cols)


def per_layer_diagonal(
    curv: Any,
    x: Any,
    y: Tensor | None = None,
    layer_types: Sequence[type[nn.Module]] | None = None,
    *,
    create_graph: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""The curvature diagonal of each module's own parameters, :math:`\mathrm{diag}(C)[I_\ell]`.

    Without ``create_graph`` this is ``curv.diag`` restricted to the layers (a Hessian only
    computes the rows asked for). With ``create_graph=True`` the result can be
    differentiated w.r.t. the model's parameters (:func:`differentiable_diagonal`).

    Returns
    -------
    dict[str, Tensor]
        Module path to a 1-D tensor (its parameters flattened and concatenated in order).
    """
    idx = layer_indices(curv, layer_types)
    if not idx:
        return {}
    sel = torch.cat(list(idx.values()))
    if not create_graph:
        sub = copy.copy(curv)
        sub.subnetwork_indices = sel
        _, diag = sub.diag(x, y, generator=generator)
        return _split(diag, idx)
    return _split(differentiable_diagonal(curv, x, y, sel, generator), idx)


def per_layer_blocks(
    curv: Any,
    x: Any = None,
    y: Tensor | None = None,
    layer_types: Sequence[type[nn.Module]] | None = None,
    *,
    data: Iterable | None = None,
    create_graph: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""The full block :math:`C_{\ell\ell} = C[I_\ell, I_\ell]` of each module.

    Computed with one operator product per parameter of the layers (never the whole
    :math:`P \times P` matrix; at most ``P × chunk`` entries at once), on a batch or over
    ``data`` (see :func:`~curvlib.linops.curvature_operator`).

    Returns
    -------
    dict[str, Tensor]
        Module path to a symmetric ``(P_ℓ, P_ℓ)`` tensor.
    """
    idx = layer_indices(curv, layer_types)
    op = curvature_operator(curv, x, y, data=data, generator=generator, create_graph=create_graph)
    out = {}
    for name, sel in idx.items():
        cols = [C[sel] for _, C in _unit_columns(op, sel, op.chunk_size)]
        block = torch.cat(cols, dim=1)
        out[name] = (block + block.T) / 2
    return out


def layer_statistics(layer_curvatures: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    r"""Summary statistics of each layer's curvature.

    For a diagonal (any tensor that is not a square matrix — the diagonals curvlib returns are
    1-D; other shapes are flattened) the statistics
    are those of its entries :math:`d`; for a square block :math:`B` they are those of its
    diagonal :math:`d = \mathrm{diag}(B)`, so a block and its diagonal give the same values:

    * ``mean`` :math:`\bar d`, ``std`` :math:`\sqrt{\frac1n \sum_i (d_i - \bar d)^2}`
      (population, so a single entry has std 0), ``max``, ``min``;
    * ``trace`` :math:`\sum_i d_i`;
    * for blocks also ``top_eigenvalue`` :math:`\lambda_{\max}(B)` (of the symmetric part).

    Returns
    -------
    dict[str, dict[str, float]]
    """
    stats = {}
    for name, t in layer_curvatures.items():
        t = t.detach()
        block = t.ndim == 2 and t.shape[0] == t.shape[1]
        d = t.diagonal() if block else t.flatten()
        s = {
            "mean": d.mean().item(),
            "std": d.std(correction=0).item(),
            "max": d.max().item(),
            "min": d.min().item(),
            "trace": d.sum().item(),
        }
        if block:
            s["top_eigenvalue"] = torch.linalg.eigvalsh((t + t.T) / 2)[-1].item()
        stats[name] = s
    return stats
