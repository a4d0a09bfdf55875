r"""K-FAC rules of the convolutions: ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``.

Both are :class:`~curvlib.kfac.rules.LinearLikeRule` s: a convolution is a Linear map of
its unfolded input patches at every output location (``[G, A]``); a transposed
convolution a Linear map ``in -> out·prod(kernel)`` per *input* location (``[A, G]``). See
:mod:`curvlib.kfac.rules` for the factors and ``docs/kfac.md`` for the table.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from curvlib.kfac.rules import LinearLikeRule, Site, column_free, register_kfac_rule

__all__ = ["ConvRule", "ConvTransposeRule", "unfold"]


def _conv_padding(
    kernel: tuple[int, ...], dilation: tuple[int, ...], padding: Any
) -> list[tuple[int, int]]:
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        out = []
        for ki, di in zip(kernel, dilation, strict=True):
            total = di * (ki - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in padding]


def _windows(
    x: Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: Any,
    dilation: tuple[int, ...],
    padding_mode: str,
) -> Tensor:
    """The convolution's windows of ``x (B, C, *spatial)`` as a strided view of the padded
    input: ``(B, C, *out_spatial, *kernel)`` (no copy but the padding)."""
    pads = _conv_padding(kernel, dilation, padding)
    flat = [v for pair in reversed(pads) for v in pair]
    if any(flat):
        x = F.pad(x, flat, mode="constant" if padding_mode == "zeros" else padding_mode)
    for i in range(len(kernel)):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])[..., :: dilation[i]]
    return x


def unfold(
    x: Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: Any,
    dilation: tuple[int, ...],
    padding_mode: str = "zeros",
) -> Tensor:
    """Patches of an N-d convolution: ``(B, L, C * prod(kernel))``.

    The patch entries are ordered like the row-major flattening of a convolution weight's
    ``weight[o]`` (channel, then kernel positions); ``L`` counts the output locations.
    """
    nd = len(kernel)
    x = _windows(x, kernel, stride, padding, dilation, padding_mode)
    B, C = x.shape[:2]
    x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    L = math.prod(x.shape[1 : 1 + nd])
    return x.reshape(B, L, C * math.prod(kernel))


def _patches(x: Tensor, m: nn.Module) -> Tensor:
    """``(B, C·prod(kernel), S)`` for convolution ``m``: the layout of ``F.unfold``, for any
    number of spatial dimensions and padding mode, in one copy of :func:`_windows`
    (``F.unfold`` is 3–5× slower on the CPU)."""
    nd = len(m.kernel_size)
    x = _windows(x, m.kernel_size, m.stride, m.padding, m.dilation, m.padding_mode)
    B, C = x.shape[:2]
    S = math.prod(x.shape[2 : 2 + nd])
    # (B, C, *out_spatial, *kernel) -> (B, C, *kernel, *out_spatial)
    x = x.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return x.reshape(B, C * math.prod(m.kernel_size), S)


def _native(
    module: nn.Module, site: Site, patches: bool = True
) -> tuple[Tensor | None, Tensor] | None:
    """``(U (B·g, r_g, S), g (K, B·g, o_g, S))`` in the layouts torch computes them in (no
    transposed copies of the cotangents) for a convolution on a batched input; ``None``
    otherwise (the general path applies). ``patches=False``: ``U`` is not computed
    (``None``)."""
    m, a, gr = module, site.a, site.g
    if not isinstance(m, nn.modules.conv._ConvNd) or m.transposed or not isinstance(a, Tensor):
        return None
    nd = len(m.kernel_size)
    if a.ndim != nd + 2 or gr is None or gr.ndim != nd + 3:
        return None
    K, B, out = gr.shape[:3]
    S = math.prod(gr.shape[3:])
    if S != math.prod(_out_shape(m, a.shape[2:])):
        return None
    g = m.groups
    U = None
    if patches:
        U = _patches(a, m).reshape(B * g, -1, S)  # (B·g, r_g, S)
    return U, gr.reshape(K, B * g, out // g, S)


def _out_shape(m: nn.Module, spatial: Any) -> list[int]:
    """The output's spatial shape of convolution ``m`` on an input of spatial shape
    ``spatial``."""
    pads = _conv_padding(m.kernel_size, m.dilation, m.padding)
    return [
        (n + lo + hi - d * (k - 1) - 1) // st + 1
        for n, (lo, hi), k, d, st in zip(
            spatial, pads, m.kernel_size, m.dilation, m.stride, strict=True
        )
    ]


def _batch_free(module: nn.Module, ndim: int) -> set[int]:
    """A convolution's batched tensors ``(B, C, *spatial)``: every dimension but the first
    (the convolution keeps the rows of dimension 0 apart); unbatched ``(C, *spatial)``: the
    channels, dimension 0."""
    if ndim == len(module.kernel_size) + 2:
        return set(range(1, ndim))
    return {0}


class ConvRule(LinearLikeRule):
    """``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups): patches by unfolding.

    On a batched input the factors and the diagonal are computed in torch's own layouts
    (patches ``(B, r, S)`` as ``F.unfold`` orders them, from a strided view of the padded
    input; cotangents ``(K, B, out, S)``) with batched matrix products, one cotangent
    column at a time for the diagonal: the same numbers as the general path, without its
    transposed copies of every patch and cotangent.
    """

    def factors(
        self, module: nn.Module, sites: list[Site], N: int, approx: str, names: list[str]
    ) -> dict[str, list[Tensor]]:
        nat = _native(module, sites[0], False) if len(sites) == 1 and approx == "expand" else None
        if nat is None:
            return super().factors(module, sites, N, approx, names)
        _, gk = nat
        K, Bg, o, S = gk.shape
        g = module.groups
        B = Bg // g
        out: dict[str, list[Tensor]] = {}
        if "weight" in names:
            h = gk.reshape(K * Bg, o, S)  # every column and data point in one product
            G = torch.bmm(h, h.transpose(1, 2)).view(K * B, g, o, o).sum(0)

            def A_factor() -> Tensor:
                U = _native(module, sites[0])[0]
                A = torch.bmm(U, U.transpose(1, 2)).view(B, g, U.shape[1], -1).sum(0)
                return A.div_(N * S)

            A = column_free(sites, ("A", N, approx), A_factor)
            out["weight"] = [self._squeeze(G), self._squeeze(A)]
        if "bias" in names:  # one G over all output channels
            if g == 1 and "weight" in out:
                out["bias"] = [out["weight"][0].clone()]  # the weight's G
            else:
                h = gk.reshape(K * B, g * o, S)
                out["bias"] = [torch.bmm(h, h.transpose(1, 2)).sum(0)]
        return out

    def squares(self, module: nn.Module, sites: list[Site], names: list[str]) -> dict[str, Tensor]:
        nat = _native(module, sites[0]) if len(sites) == 1 else None
        if nat is None:
            return super().squares(module, sites, names)
        U, gk = nat
        K, Bg, o, S = gk.shape
        out: dict[str, Tensor] = {}
        if "weight" in names:
            Ut = U.transpose(1, 2)  # (B·g, S, r_g), a view: the product reads it transposed
            r = U.shape[1]
            # per-sample gradients of a chunk of columns in one batched product: the
            # columns' cotangents stacked along the output channels (B·g, k·o_g, S)
            step = max(1, min(K, 2**22 // max(1, Bg * o * max(r, S))))  # 16 MiB in float32
            w = None
            for k0 in range(0, K, step):
                k = min(K, k0 + step) - k0
                gg = gk[k0 : k0 + k].permute(1, 0, 2, 3).reshape(Bg, k * o, S)
                v = torch.bmm(gg, Ut)  # (B·g, k·o_g, r_g)
                v = v.mul_(v).view(-1, module.groups, k, o, r).sum((0, 2))
                w = v if w is None else w.add_(v)
            out["weight"] = w.flatten()
        if "bias" in names:
            b = gk.sum(-1).view(K, -1, module.groups * o)  # (K, B, out)
            out["bias"] = b.square().sum((0, 1))
        return out

    def batch_free_dims(self, module: nn.Module, ndim: int) -> set[int]:
        return _batch_free(module, ndim)

    def problem(self, module: nn.Module) -> str:
        if module.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            return f"padding_mode={module.padding_mode!r}"
        return ""

    def patches(self, module: nn.Module, site: Site) -> Tensor:
        m = module
        p = unfold(site.a, m.kernel_size, m.stride, m.padding, m.dilation, m.padding_mode)
        return p.reshape(p.shape[0], p.shape[1], m.groups, -1)

    def grads(self, module: nn.Module, site: Site) -> Tensor:
        g = site.g  # (K, B, out, *spatial)
        K, B, out = g.shape[:3]
        return (
            g.reshape(K, B, out, -1)
            .transpose(2, 3)
            .reshape(K, B, -1, module.groups, out // module.groups)
        )


class ConvTransposeRule(LinearLikeRule):
    """``nn.ConvTranspose1d/2d/3d``: a Linear map ``in -> out·prod(kernel)`` per input location.

    The transposed convolution scatters :math:`W^\top a_l` over the output (col2im), so
    the cotangent of input location ``l`` is the unfolded output cotangent at ``l``; the
    weight ``(in, out/g, *k)`` gets ``[A (in×in), G (out·k × out·k)]`` (``layout="AG"``),
    its bias the output cotangents at the output locations.
    """

    layout = "AG"

    def batch_free_dims(self, module: nn.Module, ndim: int) -> set[int]:
        return _batch_free(module, ndim)

    def problem(self, module: nn.Module) -> str:
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        return ""

    def patches(self, module: nn.Module, site: Site) -> Tensor:
        a = site.a  # (B, in, *spatial)
        B, C = a.shape[:2]
        return a.reshape(B, C, -1).transpose(1, 2).reshape(B, -1, module.groups, C // module.groups)

    def grads(self, module: nn.Module, site: Site) -> Tensor:
        m, g = module, site.g  # (K, B, out, *spatial_out)
        K, B = g.shape[:2]
        cols = unfold(g.flatten(0, 1), m.kernel_size, m.stride, m.padding, m.dilation)
        L = cols.shape[1]
        if L != math.prod(site.a.shape[2:]):
            raise RuntimeError(
                f"ConvTranspose rule: {L} unfolded locations for input {tuple(site.a.shape)}"
            )
        return cols.reshape(K, B, L, m.groups, -1)

    def bias_grads(self, module: nn.Module, site: Site) -> Tensor:
        g = site.g
        K, B, out = g.shape[:3]
        return (
            g.reshape(K, B, out, -1)
            .transpose(2, 3)
            .reshape(K, B, -1, module.groups, out // module.groups)
        )


for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_kfac_rule(_t, ConvRule())
for _t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_kfac_rule(_t, ConvTransposeRule())
