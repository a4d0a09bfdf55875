r"""Hook-based K-FAC factor capture, shared by every backend that lacks a Kron structure.

For a layer with weight ``W`` of shape ``(out, *rest)``, inputs ``a`` (unfolded patches for
convolutions, ``r = prod(rest)`` entries) and backpropagated output cotangents ``g``, the
block of ``W`` is approximated by ``G ⊗ A`` (DESIGN §4):

* ``"expand"`` (default; every weight-sharing location ``l`` is a data point):
  :math:`G = \sum_{n,k,l} g g^\top`, :math:`A = \frac{1}{N L} \sum_{n,l} a a^\top`;
* ``"reduce"``: :math:`G = \sum_{n,k} \hat g \hat g^\top` with :math:`\hat g = \sum_l g`,
  :math:`A = \frac1N \sum_n \bar a \bar a^\top` with :math:`\bar a = \frac1L \sum_l a`,

(Eschenhagen et al., NeurIPS 2023), where ``k`` runs over the cotangent columns that the
curvature defines (columns of :math:`\Lambda^{1/2}`, MC samples, or the loss gradient). A
bias gets the single factor ``[G]``. Without weight sharing (``L = 1``) both coincide, and
for one Linear layer and one data point ``G ⊗ A`` is the exact GGN block.

Inputs and outputs are recorded by forward hooks that are always removed, also when the
forward pass raises; the cotangents w.r.t. the layer outputs come from one batched
``torch.autograd.grad`` call, so nothing touches ``.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from curvlib.errors import SharedParameterError, UnsupportedModuleError

__all__ = [
    "KFAC_MODULES",
    "KronEntry",
    "LayerBackprop",
    "kfac_entries",
    "capture_io",
    "unfold_input",
    "backprop_to_layers",
    "kfac",
    "layer_factors",
    "per_sample_products",
    "squared_products",
]

#: Module types with a K-FAC rule here.
KFAC_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class KronEntry:
    """One selected parameter tensor and the module owning it."""

    path: str
    module: nn.Module
    kind: str  # "weight" or "bias"
    param: Tensor


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for name, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((path, mod, name))
    return owners


def kfac_entries(
    model: nn.Module,
    params: Sequence[Tensor],
    supported: tuple[type[nn.Module], ...] = KFAC_MODULES,
) -> list[KronEntry]:
    """Map each selected parameter to its module, checking K-FAC support before any work.

    Raises
    ------
    UnsupportedModuleError
        A selected parameter belongs to a module without a K-FAC rule (the message names the
        module path, type and parameter, and the supported types).
    SharedParameterError
        A selected parameter is owned by several modules (tied weights).
    """
    owners = _owners(model)
    entries = []
    for p in params:
        own = owners.get(id(p), [])
        if len({id(m) for _, m, _ in own}) > 1:
            paths = [f"{path or '<root>'}.{name}" for path, _, name in own]
            raise SharedParameterError(
                f"parameter shared by several modules {paths}: K-FAC needs one owner per "
                "parameter; use the diag or full structure, or untie the weights"
            )
        path, mod, name = own[0]
        ok = isinstance(mod, supported) and name in ("weight", "bias")
        if ok and isinstance(mod, nn.modules.conv._ConvNd):
            ok = mod.groups == 1
        if not ok:
            what = f"{type(mod).__name__}"
            if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups != 1:
                what += f" with groups={mod.groups}"
            raise UnsupportedModuleError(
                f"module {path or '<root>'!r} ({what}) owns selected parameter {name!r} but has "
                f"no K-FAC rule; supported: {[t.__name__ for t in supported]} (groups=1). "
                "Freeze its parameters (requires_grad=False), use last_layer=True, or use the "
                "diag or full structure"
            )
        entries.append(KronEntry(path, mod, name, p))
    return entries


@dataclass
class _IO:
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    versions: list[tuple[int, int]] = field(default_factory=list)

    def modified(self) -> bool:
        """Whether a later in-place operation changed a recorded input or output."""
        return any(
            (a._version, o._version) != v
            for a, o, v in zip(self.inputs, self.outputs, self.versions, strict=True)
        )


@contextmanager
def capture_io(modules: Sequence[nn.Module], protect: bool = False) -> Iterator[dict[int, _IO]]:
    """Record each module's input and output during a forward pass; hooks always removed.

    With ``protect=True`` the module passes a copy of its output on (and a copy of its input
    is recorded), so that in-place operations later in the forward pass (``ReLU(inplace=True)``,
    ``x += ...``) cannot change what was recorded; :meth:`_IO.modified` tells whether that
    happened without it.
    """
    store: dict[int, _IO] = {id(m): _IO() for m in modules}
    handles = []

    def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
        rec = store[id(mod)]
        a = args[0].detach()
        rec.inputs.append(a.clone() if protect else a)
        rec.outputs.append(out)
        rec.versions.append((rec.inputs[-1]._version, out._version))
        return out.clone() if protect and isinstance(out, Tensor) else None

    try:
        for m in modules:
            handles.append(m.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


def _conv_padding(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    k, d = module.kernel_size, module.dilation
    if module.padding == "valid":
        return [(0, 0)] * len(k)
    if module.padding == "same":
        out = []
        for ki, di in zip(k, d, strict=True):
            total = di * (ki - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in module.padding]


def unfold_input(x: Tensor, module: nn.modules.conv._ConvNd) -> Tensor:
    """Input patches of a ``ConvNd`` (groups 1): ``(B, L, C_in * prod(kernel))``.

    The patch entries are ordered like the row-major flattening of ``weight[o]``
    (channel, then kernel positions), and ``L`` counts the output locations.
    """
    nd = len(module.kernel_size)
    pads = _conv_padding(module)
    flat = [v for pair in reversed(pads) for v in pair]
    if any(flat):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, flat, mode=mode)
    for i in range(nd):
        span = module.dilation[i] * (module.kernel_size[i] - 1) + 1
        x = x.unfold(2 + i, span, module.stride[i])[..., :: module.dilation[i]]
    B, C = x.shape[:2]
    out_dims = list(range(2, 2 + nd))
    k_dims = list(range(2 + nd, 2 + 2 * nd))
    x = x.permute(0, *out_dims, 1, *k_dims)
    L = math.prod(x.shape[1 : 1 + nd])
    return x.reshape(B, L, C * math.prod(module.kernel_size))


def _layer_tensors(module: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs ``(B, L, r)`` and output cotangents ``(K, B, L, out)`` of one layer."""
    if isinstance(module, nn.Linear):
        B = a.shape[0]
        return a.reshape(B, -1, a.shape[-1]), g.reshape(g.shape[0], B, -1, g.shape[-1])
    a = unfold_input(a, module)
    K, B, out = g.shape[:3]
    return a, g.reshape(K, B, out, -1).transpose(2, 3)


def layer_factors(
    module: nn.Module, a: Tensor, g: Tensor, N: int, approx: str, need_A: bool
) -> tuple[Tensor, Tensor | None]:
    """K-FAC factors ``(G, A)`` of one layer from its input and output cotangents.

    ``a`` is the layer input, ``g`` the cotangents at its output ``(K, B, *out)``; ``A`` is
    ``None`` unless ``need_A`` (see the module docstring for the two variants).
    """
    if approx == "expand":
        G = _expand_G(module, g)
        if not need_A:
            return G, None
    a, g = _layer_tensors(module, a, g)
    L = a.shape[1]
    if approx == "reduce":
        g = g.sum(2)
        G = torch.einsum("kbo,kbp->op", g, g)
        if not need_A:
            return G, None
        a_bar = a.mean(1)
        return G, (a_bar.T @ a_bar) / N
    a = a.flatten(0, 1)
    return G, (a.T @ a) / (N * L)


def _expand_G(module: nn.Module, g: Tensor) -> Tensor:
    """``G = Σ_{k,n,l} g gᵀ`` from the output cotangents in their native layout (no copy)."""
    if isinstance(module, nn.Linear):  # (K, B, *, out): rows are (k, n, l)
        X = g.reshape(-1, g.shape[-1])
        return X.T @ X
    K, B, out = g.shape[:3]  # (K, B, out, *spatial): a small (out, out) product per (k, n)
    gg = g.reshape(K * B, out, -1)
    return torch.bmm(gg, gg.transpose(1, 2)).sum(0)


@dataclass
class LayerBackprop:
    """Inputs of each layer and the cotangents backpropagated to its output.

    ``inputs[i]`` is the (detached) input of ``layers[i]``; ``grads[i]`` has shape
    ``(K, B, *output.shape[1:])``: column ``k`` of the cotangents, pulled back to the
    layer's output for every sample.
    """

    entries: list[KronEntry]
    layers: list[nn.Module]
    inputs: list[Tensor]
    grads: list[Tensor]
    f: Tensor


def backprop_to_layers(
    module: nn.Module,
    inp: Any,
    params: Sequence[Tensor],
    cotangent_fn: Callable[[Tensor], Tensor],
    entries: list[KronEntry] | None = None,
) -> LayerBackprop:
    """Forward ``module(inp)`` recording its layers, then pull the cotangents back to them.

    One forward pass with hooks (removed at once) and one backward pass batched over the
    ``K`` cotangent columns (one per column for convolutions); ``.grad`` is never touched.
    If an in-place operation later in the forward pass modified a layer's output or input,
    the forward pass is run a second time with copies of the layer outputs (see
    :func:`capture_io`).

    Raises
    ------
    UnsupportedModuleError, SharedParameterError
        Before any work, for a selected parameter outside :data:`KFAC_MODULES`; after the
        forward pass, for a layer called more than once.
    """
    if entries is None:
        entries = kfac_entries(module, params)
    layers = list({id(e.module): e.module for e in entries}.values())
    for protect in (False, True):
        with capture_io(layers, protect) as store:
            with torch.enable_grad():
                f = module(inp)
        # an in-place operation after a layer (ReLU(inplace=True), x += ...) changed its
        # recorded output or input: gradients w.r.t. that output would be wrong, so run the
        # forward pass again with the layers' outputs copied
        if not any(store[id(m)].modified() for m in layers):
            break
    for e in entries:
        n_calls = len(store[id(e.module)].outputs)
        if n_calls != 1:
            raise SharedParameterError(
                f"module {e.path or '<root>'!r} ({type(e.module).__name__}) was called "
                f"{n_calls} times in one forward pass; per-layer rules need exactly one call "
                "per layer"
            )
    from curvlib.likelihood import Likelihood

    Likelihood.check_output(f)
    cot = cotangent_fn(f.detach())
    outs = [store[id(m)].outputs[0] for m in layers]
    K = cot.shape[1]
    if K == 1:  # one column: a plain backward pass
        grads = [g.unsqueeze(0) for g in torch.autograd.grad(f, outs, cot[:, 0])]
    elif any(isinstance(m, nn.modules.conv._ConvNd) for m in layers):
        # one backward pass per column: vmap has no batching rule for convolution_backward
        # and falls back to a loop that is 13x slower than this one (measured on LeNet)
        cols = [torch.autograd.grad(f, outs, cot[:, k], retain_graph=k < K - 1) for k in range(K)]
        grads = [torch.stack(per_layer) for per_layer in zip(*cols, strict=True)]
    else:  # one backward pass batched over the columns (batched matmuls)
        grads = torch.autograd.grad(
            f, outs, grad_outputs=cot.transpose(0, 1).contiguous(), is_grads_batched=True
        )
    inputs = [store[id(m)].inputs[0] for m in layers]
    return LayerBackprop(entries, layers, inputs, list(grads), f.detach())


def kfac(
    module: nn.Module,
    inp: Any,
    params: Sequence[Tensor],
    cotangent_fn: Callable[[Tensor], Tensor],
    N: int,
    approx: str = "expand",
) -> tuple[Tensor, list[list[Tensor]]]:
    """K-FAC factors of ``module`` on one batch.

    Parameters
    ----------
    module : nn.Module
        The differentiated module; called as ``module(inp)``.
    inp : Any
        Its input.
    params : sequence of Tensor
        The selected parameters (one Kron entry each, in this order).
    cotangent_fn : callable
        Maps the output ``f (B, C)`` to cotangents ``(B, K, C)`` whose outer products sum to
        the output-space matrix of the curvature; validates the targets.
    N : int
        Total number of data points (``A`` is divided by it).
    approx : {"expand", "reduce"}
        Weight-sharing variant.

    Returns
    -------
    f : Tensor
        Detached model output.
    kfacs : list of list of Tensor
        ``[G, A]`` per weight, ``[G]`` per bias, in ``params`` order.
    """
    bp = backprop_to_layers(module, inp, params, cotangent_fn)
    need_A = {id(e.module) for e in bp.entries if e.kind == "weight"}
    factors = {}
    for m, a, g in zip(bp.layers, bp.inputs, bp.grads, strict=True):
        factors[id(m)] = layer_factors(m, a, g, N, approx, id(m) in need_A)
    kfacs = []
    for e in bp.entries:
        G, A = factors[id(e.module)]
        kfacs.append([G.clone(), A] if e.kind == "weight" else [G.clone()])
    return bp.f, kfacs


def _param_products(bp: LayerBackprop, per_layer: Callable) -> list[Tensor]:
    """Apply ``per_layer(module, a, g) -> {"weight": t, "bias": t}`` and order by params."""
    results = {}
    for m, a, g in zip(bp.layers, bp.inputs, bp.grads, strict=True):
        kinds = {e.kind for e in bp.entries if e.module is m}
        results[id(m)] = per_layer(m, a, g, kinds)
    return [results[id(e.module)][e.kind] for e in bp.entries]


def per_sample_products(bp: LayerBackprop) -> Tensor:
    r"""Per-sample products :math:`V_{n,k} = J_n^\top c_{n,k}`, shape ``(B, K, P)``.

    For a layer with inputs ``a (B, L, r)`` and output cotangents ``g (K, B, L, out)``:
    weight :math:`\sum_l g_{kbl} a_{bl}^\top`, bias :math:`\sum_l g_{kbl}`.
    """

    def layer(m: nn.Module, a: Tensor, g: Tensor, kinds: set[str]) -> dict[str, Tensor]:
        a, g = _layer_tensors(m, a, g)
        out = {}
        if "weight" in kinds:
            out["weight"] = torch.einsum("kblo,blr->bkor", g, a).flatten(2)
        if "bias" in kinds:
            out["bias"] = g.sum(2).transpose(0, 1)
        return out

    return torch.cat(_param_products(bp, layer), dim=2)


def squared_products(bp: LayerBackprop, chunk_entries: int = 2**25) -> Tensor:
    r"""Diagonal :math:`\sum_{n,k} V_{n,k}^2`, shape ``(P,)``, without forming ``V``.

    Without weight sharing (``L = 1``) the weight part is
    :math:`\sum_{n,k} g_{nk}^{\odot 2} (a_n^{\odot 2})^\top`, never per-sample gradients;
    with weight sharing the per-sample gradients are formed for chunks of cotangent columns.
    """

    def layer(m: nn.Module, a: Tensor, g: Tensor, kinds: set[str]) -> dict[str, Tensor]:
        a, g = _layer_tensors(m, a, g)
        K, B, L, O = g.shape
        out = {}
        if L == 1:
            # square in place where g owns its memory (large temporaries are slow to
            # allocate); the output layer's g is the cotangent itself, which may be an
            # expanded view (regression with one output: stride 0 over the batch)
            g0 = g[:, :, 0]
            g2 = (g0.mul_(g0) if g0.is_contiguous() else g0 * g0).sum(0)  # (B, O)
            if "weight" in kinds:
                out["weight"] = (g2.T @ a[:, 0].square()).flatten()
            if "bias" in kinds:
                out["bias"] = g2.sum(0)
            return out
        if "weight" in kinds:  # weight sharing: per-sample gradients, chunks of columns
            step = max(1, chunk_entries // max(1, B * O * a.shape[-1]))
            w = 0
            for k in range(0, K, step):
                v = torch.einsum("kblo,blr->kbor", g[k : k + step], a)
                w = w + v.mul_(v).sum((0, 1))
            out["weight"] = w.flatten()
        if "bias" in kinds:
            out["bias"] = g.sum(2).square().sum((0, 1))
        return out

    return torch.cat(_param_products(bp, layer))
