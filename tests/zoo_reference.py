r"""Float64 brute-force references for the zoo (models with positions, dict inputs, sharing).

Written as loops over samples and outputs with ``torch.autograd.grad``, independent of
curvlib's formulas. A model maps ``x`` (a tensor or a dict) to ``f`` of shape ``(B, ..., C)``;
its outputs are flattened per sample to ``K = prod(f.shape[1:])`` entries, row-major (for
per-token outputs: position-major, class-minor). The loss of sample ``n`` is the sum over its
positions:

* classification: :math:`\ell_n = -\sum_{l:\,y_{nl} \ne -100} \log\mathrm{softmax}(f_{nl})_{y_{nl}}`
  (positions whose target is ``-100`` are excluded);
* regression: :math:`\ell_n = \frac12 \lVert f_n - y_n \rVert^2` (summed over positions).

The loss is :math:`\sum_n \ell_n` (N counts data points, i.e. sequences). With
:math:`J_n = \partial f_n / \partial\theta` ``(K, P)`` and :math:`\Lambda_n =
\nabla^2_{f_n} \ell_n` ``(K, K)`` (by autograd):

* GGN :math:`\sum_n J_n^\top \Lambda_n J_n`, EF :math:`\sum_n g_n g_n^\top` with
  :math:`g_n = \nabla_\theta \ell_n`, Hessian :math:`\nabla^2_\theta \sum_n \ell_n`;
* MC Fisher: :math:`\Lambda_n` replaced by :math:`\frac1S\sum_s \tilde g_s \tilde g_s^\top`,
  :math:`\tilde g_s = \nabla_{f_n} \ell(f_n, \tilde y_s)`, :math:`\tilde y_s` drawn from the
  model's predictive by :func:`pseudo_targets` (its own sampler: compare statistically).

θ is the vector of trainable parameters (``requires_grad=True``), each Parameter object once
(tied weights counted once, at its first name), in ``model.parameters()`` order, flattened
row-major. Jacobians and gradients differentiate w.r.t. the model's own Parameter objects, so
a module called twice or a weight shared by two modules needs no special handling; the
Hessian swaps a flat θ in for every holder of each Parameter and puts the Parameters back
(``torch.func.functional_call`` leaves plain tensors behind on a module registered twice),
and is cross-checked against :func:`hessian_double_backward` (no swap).

K-FAC definitions (DESIGN §4, §10): :func:`kfac` computes, for every trainable parameter of a
layer with a K-FAC definition (``nn.Linear`` and subclasses, HF ``Conv1D``, ``nn.Embedding``,
``nn.ConvNd`` with any ``groups``, ``nn.ConvTransposeNd``), the factors from explicit
per-location inputs ``a_{nl}`` and output Jacobians :math:`J_{nl} = \partial f_n/\partial
s_{nl}` (``s`` the layer output at location ``l``):

* expand: :math:`G = \sum_{n,l} J_{nl}^\top M_n J_{nl}`, :math:`A = \frac{1}{NL}\sum_{n,l}
  a_{nl} a_{nl}^\top`;
* reduce: :math:`G = \sum_n \hat J_n^\top M_n \hat J_n`, :math:`\hat J_n = \sum_l J_{nl}`,
  :math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top`, :math:`\bar a_n = \frac1L \sum_l a_{nl}`,

with :math:`M_n` = Λ_n (``"ggn"``), :math:`r_n r_n^\top` (``"ef"``, :math:`r_n =
\nabla_{f_n}\ell_n`) or given. Each layer is written as ``s_l = W̃_g a_l + b`` per group
``g`` with a "linear weight" ``W̃_g (out_g, r_g)`` that is a re-indexing of the stored
weight; the block of the stored weight (row-major) is ``G_g ⊗ A_g`` placed at the stored
indices of ``W̃_g`` (block-diagonal over groups; for Embedding and HF Conv1D the stored block
is ``A ⊗ G``). A transposed convolution is a map per *input* location, ``c_l = W_g^T x_l``
(``out_g·k`` entries scattered over the output), so its stored weight ``(in, out/g, *k)``
is ``W̃_g^T`` and its block ``A ⊗ G``; its bias is added at the output locations. A bias has
the one factor ``G`` over all output channels, also for a grouped convolution (a bias's
block is then exact for one data point at one location).
The reference checks ``s_l = W̃ a_l + b`` (for a transposed
convolution ``s = col2im(c) + b``, by loops) on every call, so its patches are tested on
every use. Attention (:func:`attention_forward`) is written out, with its projections
as explicit Linear maps.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

IGNORE = -100


def _math_attention():
    """Second derivatives need the math kernel of scaled_dot_product_attention (the CPU
    flash kernel has no double backward); the result differs only by round-off."""
    return sdpa_kernel([SDPBackend.MATH])


__all__ = [
    "trainable",
    "num_params",
    "sample_losses",
    "total_loss",
    "output_grads",
    "output_hessians",
    "jacobians",
    "per_sample_grads",
    "ggn",
    "ggn_diag",
    "ggn_vp",
    "ef",
    "ef_diag",
    "ef_vp",
    "hessian",
    "hessian_double_backward",
    "hvp",
    "pseudo_targets",
    "mc_output_matrices",
    "mc_fisher",
    "KFACBlock",
    "LayerTerms",
    "layer_terms",
    "kfac",
    "kfac_dense",
    "exact_block_from_terms",
    "rel_err",
    "kron_rel_err",
    "param_index",
]


# ------------------------------------------------------------------- parameters, loss
def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, Parameter)`` with ``requires_grad``, each object once, in parameters() order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def num_params(model: nn.Module) -> int:
    """P, the length of θ."""
    return sum(p.numel() for _, p in trainable(model))


def param_index(model: nn.Module) -> dict[str, slice]:
    """The slice of θ that each trainable parameter (by its first name) occupies."""
    out, start = {}, 0
    for n, p in trainable(model):
        out[n] = slice(start, start + p.numel())
        start += p.numel()
    return out


def _loss_one(likelihood: str, f: Tensor, y: Tensor) -> Tensor:
    """ℓ of one sample: ``f`` of shape ``(..., C)``, ``y`` ``(...)`` or ``(..., C)``."""
    if likelihood == "regression":
        return 0.5 * ((f - y) ** 2).sum()
    if likelihood != "classification":
        raise ValueError(f"unknown likelihood {likelihood!r}")
    logits = f.reshape(-1, f.shape[-1])
    t = y.reshape(-1)
    keep = t != IGNORE
    logp = torch.log_softmax(logits[keep], dim=-1)
    return -logp[torch.arange(int(keep.sum())), t[keep]].sum()


def sample_losses(likelihood: str, f: Tensor, y: Tensor) -> Tensor:
    """``(B,)``: ℓ_n for every sample (sum over positions, -100 targets excluded)."""
    return torch.stack([_loss_one(likelihood, f[n], y[n]) for n in range(f.shape[0])])


def total_loss(model: nn.Module, x: Any, y: Tensor, likelihood: str) -> Tensor:
    """:math:`\\sum_n \\ell_n`, detached."""
    with torch.no_grad():
        return sample_losses(likelihood, model(x), y).sum()


def _loss_rows(likelihood: str, f: Tensor, y: Tensor) -> Tensor:
    """``(R,)``: ℓ of every row of ``f (R, ..., C)`` at once (tested against the loop)."""
    if likelihood == "regression":
        return 0.5 * ((f - y) ** 2).flatten(1).sum(1)
    R, C = f.shape[0], f.shape[-1]
    logp = torch.log_softmax(f.reshape(R, -1, C), dim=-1)
    t = y.reshape(R, -1)
    keep = t != IGNORE
    picked = logp.gather(-1, t.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum(1)


def output_grads(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """``(B, K)``: :math:`r_n = \\nabla_{f_n} \\ell_n` (flattened outputs), by autograd."""
    fr = f.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_loss_rows(likelihood, fr, y).sum(), fr)
    return g.reshape(f.shape[0], -1)


def output_hessians(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """``(B, K, K)``: :math:`\\Lambda_n = \\nabla^2_{f_n} \\ell_n` by autograd (block-diagonal
    over positions, zero at ignored positions)."""
    out = []
    for n in range(f.shape[0]):
        shape = f[n].shape

        def loss_flat(v: Tensor, yn: Tensor = y[n], shape: torch.Size = shape) -> Tensor:
            return _loss_one(likelihood, v.reshape(shape), yn)

        out.append(torch.autograd.functional.hessian(loss_flat, f[n].detach().reshape(-1)))
    return torch.stack(out)


# -------------------------------------------------------------- Jacobians and gradients
def _flat_grads(out: Tensor, params: list[Tensor], retain: bool = True) -> Tensor:
    grads = torch.autograd.grad(out, params, retain_graph=retain, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def jacobians(model: nn.Module, x: Any) -> tuple[Tensor, Tensor]:
    """``(J (B, K, P), f (B, *out))`` by a loop over samples and flattened outputs."""
    params = [p for _, p in trainable(model)]
    with torch.enable_grad():
        f = model(x)
        B = f.shape[0]
        ff = f.reshape(B, -1)
        J = torch.stack(
            [
                torch.stack([_flat_grads(ff[n, k], params) for k in range(ff.shape[1])])
                for n in range(B)
            ]
        )
    return J, f.detach()


def per_sample_grads(model: nn.Module, x: Any, y: Tensor, likelihood: str) -> Tensor:
    """``(B, P)``: :math:`g_n = \\nabla_\\theta \\ell_n`, one backward pass per sample."""
    params = [p for _, p in trainable(model)]
    with torch.enable_grad():
        f = model(x)
        return torch.stack(
            [_flat_grads(_loss_one(likelihood, f[n], y[n]), params) for n in range(f.shape[0])]
        )


def ggn(model: nn.Module, x: Any, y: Tensor, likelihood: str, J: Tensor | None = None) -> Tensor:
    """``(P, P)``: :math:`\\sum_n J_n^\\top \\Lambda_n J_n`."""
    if J is None:
        J, f = jacobians(model, x)
    else:
        f = _forward(model, x)
    L = output_hessians(f, y, likelihood)
    return torch.einsum("nkp,nkj,njq->pq", J, L, J)


def ggn_diag(
    model: nn.Module, x: Any, y: Tensor, likelihood: str, J: Tensor | None = None
) -> Tensor:
    """``(P,)``: the diagonal of the GGN without forming ``P × P``."""
    if J is None:
        J, f = jacobians(model, x)
    else:
        f = _forward(model, x)
    L = output_hessians(f, y, likelihood)
    return torch.einsum("nkp,nkj,njp->p", J, L, J)


def ggn_vp(
    model: nn.Module, x: Any, y: Tensor, likelihood: str, v: Tensor, J: Tensor | None = None
) -> Tensor:
    """GGN times ``v`` (``(P,)`` or ``(P, m)``) without forming ``P × P``."""
    if J is None:
        J, f = jacobians(model, x)
    else:
        f = _forward(model, x)
    L = output_hessians(f, y, likelihood)
    Jv = torch.einsum("nkp,p...->nk...", J, v)
    return torch.einsum("nkp,nkj,nj...->p...", J, L, Jv)


def ef(model: nn.Module, x: Any, y: Tensor, likelihood: str) -> Tensor:
    """``(P, P)``: :math:`\\sum_n g_n g_n^\\top`."""
    G = per_sample_grads(model, x, y, likelihood)
    return G.T @ G


def ef_diag(model: nn.Module, x: Any, y: Tensor, likelihood: str) -> Tensor:
    """``(P,)``: :math:`\\sum_n g_n^2`."""
    return per_sample_grads(model, x, y, likelihood).pow(2).sum(0)


def ef_vp(model: nn.Module, x: Any, y: Tensor, likelihood: str, v: Tensor) -> Tensor:
    """EF times ``v`` (``(P,)`` or ``(P, m)``)."""
    G = per_sample_grads(model, x, y, likelihood)
    return G.T @ (G @ v)


def _forward(model: nn.Module, x: Any) -> Tensor:
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------------------ Hessian
def _holders(model: nn.Module, params: list[Tensor]) -> list[list[tuple[nn.Module, str]]]:
    """Per parameter every ``(module, attribute)`` holding it (a module registered twice
    and tied weights included)."""
    out: list[list[tuple[nn.Module, str]]] = [[] for _ in params]
    index = {id(p): i for i, p in enumerate(params)}
    for m in {id(m): m for _, m in model.named_modules(remove_duplicate=False)}.values():
        for attr, p in m._parameters.items():
            if p is not None and id(p) in index:
                out[index[id(p)]].append((m, attr))
    return out


def hessian(
    model: nn.Module, x: Any, y: Tensor, likelihood: str, vectorize: bool = False
) -> Tensor:
    """``(P, P)`` by ``torch.autograd.functional.hessian`` of θ ↦ Σ_n ℓ_n (math attention).

    θ is swapped in for every holder of each trainable Parameter (tied weights and modules
    registered twice included), and the Parameters are put back afterwards.
    """
    sel = [p for _, p in trainable(model)]
    shapes = [p.shape for p in sel]
    sizes = [p.numel() for p in sel]
    theta = torch.cat([p.detach().reshape(-1) for p in sel])
    holders = _holders(model, sel)

    def total(t: Tensor) -> Tensor:
        values = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        try:
            for hs, v in zip(holders, values, strict=True):
                for m, attr in hs:
                    m._parameters[attr] = v
            f = model(x)
        finally:
            for hs, p in zip(holders, sel, strict=True):
                for m, attr in hs:
                    m._parameters[attr] = p
        return sample_losses(likelihood, f, y).sum()

    with _math_attention():
        return torch.autograd.functional.hessian(total, theta, vectorize=vectorize)


def hessian_double_backward(model: nn.Module, x: Any, y: Tensor, likelihood: str) -> Tensor:
    """``(P, P)`` row by row: the gradient of each entry of ∇θ (no parameter swap)."""
    params = [p for _, p in trainable(model)]
    with torch.enable_grad(), _math_attention():
        loss = sample_losses(likelihood, model(x), y).sum()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        g = torch.cat(
            [
                (torch.zeros_like(p) if gi is None else gi).reshape(-1)
                for gi, p in zip(grads, params, strict=True)
            ]
        )
        rows = []
        for i in range(g.numel()):
            if g[i].requires_grad:
                rows.append(_flat_grads(g[i], params))
            else:  # an entry that does not depend on θ (an unused parameter)
                rows.append(torch.zeros_like(g))
    return torch.stack(rows)


def hvp(model: nn.Module, x: Any, y: Tensor, likelihood: str, v: Tensor) -> Tensor:
    """Hessian times ``v`` (``(P,)`` or ``(P, m)``) by double backward, for large models."""
    params = [p for _, p in trainable(model)]
    cols = v.unsqueeze(-1) if v.ndim == 1 else v
    with torch.enable_grad(), _math_attention():
        loss = sample_losses(likelihood, model(x), y).sum()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(gi, p) for gi, p in zip(grads, params, strict=True)]
        g = torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in pairs])
        out = [_flat_grads(g @ cols[:, j], params) for j in range(cols.shape[1])]
    res = torch.stack(out, dim=1)
    return res[:, 0] if v.ndim == 1 else res


# ----------------------------------------------------------------------------- MC Fisher
def pseudo_targets(
    f: Tensor,
    y: Tensor,
    likelihood: str,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``(B, S, *y.shape[1:])`` targets drawn from the model's predictive.

    Classification: inverse-CDF draws from softmax(f) per position (ignored positions stay
    -100); regression: ``f + ε``, ε ~ N(0, I).

    Measured, not by construction: for ``(B, C)`` outputs and the same CPU generator state,
    these are the targets that curvlib's likelihoods draw (``torch.multinomial`` with
    replacement is an inverse-CDF draw from ``torch.rand``; regression draws ``randn`` of
    shape ``(B, S, C)``), so an MC Fisher can be compared exactly; otherwise compare
    statistically (:func:`mc_fisher` is unbiased for :func:`ggn`).
    """
    B = f.shape[0]
    if likelihood == "regression":
        eps = torch.randn((B, num_samples, *f.shape[1:]), generator=generator, dtype=f.dtype)
        return f.detach().unsqueeze(1) + eps
    p = torch.softmax(f.detach(), dim=-1)  # (B, ..., C)
    cdf = p.cumsum(-1)
    u = torch.rand((B, num_samples, *p.shape[1:-1], 1), generator=generator, dtype=f.dtype)
    draws = (u > cdf.unsqueeze(1)).sum(-1).clamp_max(p.shape[-1] - 1)
    keep = (y != IGNORE).unsqueeze(1).expand_as(draws)
    return torch.where(keep, draws, torch.full_like(draws, IGNORE))


def mc_output_matrices(f: Tensor, targets: Tensor, likelihood: str) -> Tensor:
    """``(B, K, K)``: :math:`\\frac1S\\sum_s \\tilde g_s \\tilde g_s^\\top` for pseudo-targets
    ``(B, S, ...)``, with :math:`\\tilde g_s = \\nabla_{f_n} \\ell(f_n, \\tilde y_s)`."""
    B, S = targets.shape[:2]
    out = []
    for n in range(B):
        g = output_grads(f[n].unsqueeze(0).expand(S, *f.shape[1:]), targets[n], likelihood)
        out.append(g.T @ g / S)
    return torch.stack(out)


def mc_fisher(
    model: nn.Module,
    x: Any,
    y: Tensor,
    likelihood: str,
    num_samples: int,
    generator: torch.Generator | None = None,
    J: Tensor | None = None,
) -> Tensor:
    """``(P, P)``: an MC Fisher with this module's own draws (unbiased for :func:`ggn`)."""
    if J is None:
        J, f = jacobians(model, x)
    else:
        f = _forward(model, x)
    M = mc_output_matrices(f, pseudo_targets(f, y, likelihood, num_samples, generator), likelihood)
    return torch.einsum("nkp,nkj,njq->pq", J, M, J)


# ---------------------------------------------------------------------------------- K-FAC
def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def _linear_weights(module: nn.Module, W: Tensor) -> list[Tensor]:
    """The stored weight ``W`` re-indexed as linear weights ``W̃_g (out_g, r_g)`` per group.

    Applied to ``arange(W.numel()).view(W.shape)`` it gives the stored flat index of every
    entry of ``W̃_g``.
    """
    hf_conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        return [W]
    if hf_conv1d is not None and isinstance(module, hf_conv1d):
        return [W.T]  # stored (in, out): y = x @ W + b
    if isinstance(module, nn.Embedding):
        return [W.T]  # stored (V, D): s = W^T onehot
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        g = module.groups
        in_g = W.shape[0] // g  # stored (in, out/g, *k): per input location l the column
        # c_l = W_g^T x_l (out/g * k entries) is scattered over the output (col2im)
        return [W[i * in_g : (i + 1) * in_g].reshape(in_g, -1).T for i in range(g)]
    if isinstance(module, nn.modules.conv._ConvNd):
        g = module.groups
        out_g = W.shape[0] // g  # stored (out, in/g, *k)
        return [W[i * out_g : (i + 1) * out_g].reshape(out_g, -1) for i in range(g)]
    raise ValueError(f"no K-FAC definition for {type(module).__name__}")


def _conv_pads(module: nn.modules.conv._ConvNd) -> list[int]:
    """Left padding per spatial dimension (``padding='same'`` as torch: extra on the right)."""
    if module.padding == "valid":
        return [0] * len(module.kernel_size)
    if module.padding == "same":
        return [d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation, strict=True)]
    return list(module.padding)


def _conv_patches(module: nn.modules.conv._ConvNd, x: Tensor, out_spatial: tuple) -> Tensor:
    """``(L, C_in, *k)`` patches of one sample ``x (C_in, *in)`` by loops over locations.

    ConvNd: entry ``[l, c, κ] = x[c, o·stride − pad + κ·dilation]`` (0 outside).
    ConvTransposeNd: ``x[c, i]`` with ``o = i·stride − pad + κ·dilation`` (0 if no such
    integer ``i`` inside the input).
    """
    if module.padding_mode != "zeros":
        raise ValueError(f"K-FAC reference: padding_mode {module.padding_mode!r} not supported")
    k, st, dil = module.kernel_size, module.stride, module.dilation
    pad = _conv_pads(module)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    in_spatial = x.shape[1:]
    locs = list(itertools.product(*[range(s) for s in out_spatial]))
    offs = list(itertools.product(*[range(kk) for kk in k]))
    P = torch.zeros(len(locs), x.shape[0], *k, dtype=x.dtype)
    for li, o in enumerate(locs):
        for kap in offs:
            idx = []
            for d in range(len(k)):
                if transposed:
                    num = o[d] + pad[d] - kap[d] * dil[d]
                    if num % st[d]:
                        break
                    i = num // st[d]
                else:
                    i = o[d] * st[d] - pad[d] + kap[d] * dil[d]
                if not 0 <= i < in_spatial[d]:
                    break
                idx.append(i)
            else:
                P[(li, slice(None), *kap)] = x[(slice(None), *idx)]
    return P


@dataclass
class LayerTerms:
    """Per-sample, per-location terms of one layer (one call).

    Attributes
    ----------
    a : list of Tensor
        Per group, ``(B, L, r_g)`` inputs (patches, one-hot tokens).
    J : Tensor
        ``(B, K, L, out)``: :math:`\\partial f_n / \\partial s_{nl}` (all output channels).
    groups : list of slice
        Output channels of each group.
    index : list of Tensor
        Per group, ``(out_g, r_g)`` stored flat indices of the weight.
    J_bias : Tensor or None
        ``(B, K, L_out, C_out)`` for a transposed convolution, whose weight is a map per
        input location (``a`` the input pixel, ``J`` the output cotangents it reaches) and
        whose bias is added at the output locations.
    """

    a: list[Tensor]
    J: Tensor
    groups: list[slice]
    index: list[Tensor]
    J_bias: Tensor | None = None


def _inputs_per_location(module: nn.Module, inp: Tensor, out: Tensor) -> tuple[list, list]:
    """``(a per group (B, L, r_g), output channels per group)`` from input and output."""
    B = inp.shape[0]
    hf_conv1d = _conv1d_type()
    if isinstance(module, nn.Linear) or (hf_conv1d is not None and isinstance(module, hf_conv1d)):
        d_out = out.shape[-1]
        return [inp.reshape(B, -1, inp.shape[-1])], [slice(0, d_out)]
    if isinstance(module, nn.Embedding):
        oh = nn.functional.one_hot(inp.reshape(B, -1), module.num_embeddings).to(out.dtype)
        if module.padding_idx is not None:
            oh[..., module.padding_idx] = 0  # the padding row gets no gradient
        return [oh], [slice(0, module.embedding_dim)]
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        g = module.groups
        a = inp.reshape(B, inp.shape[1], -1).transpose(1, 2)  # (B, L_in, C_in)
        in_g, cols = inp.shape[1] // g, out.shape[1] // g * math.prod(module.kernel_size)
        return [a[..., i * in_g : (i + 1) * in_g] for i in range(g)], [
            slice(i * cols, (i + 1) * cols) for i in range(g)
        ]
    if isinstance(module, nn.modules.conv._ConvNd):
        g = module.groups
        c_in = inp.shape[1]
        c_out = out.shape[1]
        spatial = tuple(out.shape[2:])
        patches = torch.stack([_conv_patches(module, inp[n], spatial) for n in range(B)])
        in_g, out_g = c_in // g, c_out // g
        a = [patches[:, :, i * in_g : (i + 1) * in_g].flatten(2) for i in range(g)]
        return a, [slice(i * out_g, (i + 1) * out_g) for i in range(g)]
    raise ValueError(f"no K-FAC definition for {type(module).__name__}")


def _transpose_offsets(module: nn.modules.conv._ConvTransposeNd, in_spatial, out_spatial):
    """``(input location, κ, output position)`` for every pair that meets inside the output:
    ``o = i·stride − pad + κ·dilation``."""
    k, st, dil, pad = module.kernel_size, module.stride, module.dilation, module.padding
    locs = list(itertools.product(*[range(n) for n in in_spatial]))
    for li, i in enumerate(locs):
        for kap in itertools.product(*[range(kk) for kk in k]):
            o = [i[d] * st[d] - pad[d] + kap[d] * dil[d] for d in range(len(k))]
            if all(0 <= o[d] < out_spatial[d] for d in range(len(k))):
                yield li, kap, o


def _transpose_columns(module: nn.modules.conv._ConvTransposeNd, g: Tensor, in_spatial) -> Tensor:
    """``(M, L_in, C_out * k)``: per input location and kernel offset κ the entry of
    ``g (M, C_out, *out)`` at the output position it reaches (0 if none), ordered
    (channel, κ) like the stored weight's ``(out/g, *k)`` (by loops)."""
    M, C = g.shape[:2]
    L = math.prod(in_spatial)
    out = torch.zeros(M, L, C, *module.kernel_size, dtype=g.dtype)
    for li, kap, o in _transpose_offsets(module, in_spatial, g.shape[2:]):
        out[(slice(None), li, slice(None), *kap)] = g[(slice(None), slice(None), *o)]
    return out.reshape(M, L, -1)


def _col2im(module: nn.modules.conv._ConvTransposeNd, cols: Tensor, in_spatial, out_shape):
    """The output ``(C_out, *out)`` without bias from the columns ``(L_in, C_out * k)``."""
    out = torch.zeros(*out_shape, dtype=cols.dtype)
    c = cols.reshape(cols.shape[0], out_shape[0], *module.kernel_size)
    for li, kap, o in _transpose_offsets(module, in_spatial, out_shape[1:]):
        out[(slice(None), *o)] += c[(li, slice(None), *kap)]
    return out


def _out_per_location(module: nn.Module, s: Tensor) -> Tensor:
    """Layer output ``(B, *)`` as ``(B, L, out)``."""
    B = s.shape[0]
    if isinstance(module, nn.modules.conv._ConvNd):
        return s.reshape(B, s.shape[1], -1).transpose(1, 2)
    return s.reshape(B, -1, s.shape[-1])


def _owner_modules(model: nn.Module, names: list[str]) -> dict[str, tuple[str, nn.Module, str]]:
    """``param name -> (module path, module, attribute)``; tied weights are refused."""
    by_id: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod.named_parameters(recurse=False):
            by_id.setdefault(id(p), []).append((path, mod, attr))
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        owners = by_id[id(params[name])]
        if len({id(m) for _, m, _ in owners}) > 1:
            raise ValueError(f"K-FAC reference: {name} is shared by several modules")
        out[name] = owners[0]
    return out


def _sub_batch(x: Any, B: int) -> Any:
    """The first ``B - 1`` data points of ``x`` (a tensor or a dict of tensors)."""
    if isinstance(x, dict):
        return {
            k: v[: B - 1] if isinstance(v, Tensor) and v.shape[:1] == (B,) else v
            for k, v in x.items()
        }
    return x[: B - 1]


def _record_calls(model: nn.Module, x: Any, modules: list[nn.Module]) -> tuple[Tensor, dict]:
    """One forward pass (with grad); per module its calls ``(input, output)``. Each hook
    passes a copy of the output on, so later in-place operations cannot change it."""
    records: dict[int, list] = {id(m): [] for m in modules}

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
        records[id(mod)].append((args[0].detach(), out))
        return out.clone()

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.enable_grad():
            f = model(x)
    finally:
        for h in handles:
            h.remove()
    return f, records


def _batch_dims(model: nn.Module, x: Any, modules: list[nn.Module], records: dict, B: int):
    """Per module and call the dimension holding the data points, or ``None`` (a tensor
    shared by all of them): the dimension of the call's input and output that shrinks
    by one when the model runs on the first ``B - 1`` data points (``B > 1``)."""
    if B == 1:  # one data point: a leading dimension of size 1 is its own, else shared
        return {
            id(m): [0 if i.shape[:1] == o.shape[:1] == (1,) else None for i, o in records[id(m)]]
            for m in modules
        }
    with torch.no_grad():
        _, sub = _record_calls(model, _sub_batch(x, B), modules)
    out = {}
    for m in modules:
        calls, small = records[id(m)], sub[id(m)]
        if len(calls) != len(small):
            raise ValueError(
                f"K-FAC reference: {type(m).__name__} runs a data-dependent number of times"
            )
        dims = []
        for (inp, o), (inp_s, o_s) in zip(calls, small, strict=True):
            found = [
                d
                for d in range(o.ndim)
                if o.shape[d] == B
                and o_s.shape[d] == B - 1
                and inp.ndim > d
                and inp.shape[d] == B
                and inp_s.shape[d] == B - 1
            ]
            if len(found) > 1:
                raise ValueError(f"K-FAC reference: several batch dimensions {found}")
            dims.append(found[0] if found else None)
        out[id(m)] = dims
    return out


def layer_terms(model: nn.Module, x: Any, modules: list[nn.Module]) -> list[LayerTerms | None]:
    """Per-location inputs and output Jacobians of ``modules`` (``None``: never called).

    One forward pass with hooks (removed afterwards) that record each call's input and
    output, and one on ``B - 1`` data points that finds each call's batch dimension
    (:func:`_batch_dims`; a call without one, such as a position embedding computed once,
    is shared by every data point); then one backward pass per sample and flattened output.
    A module called several times contributes the locations of every call (weight
    sharing). Checks ``s_l = W̃_g a_l + b`` for every call.
    """
    f, records = _record_calls(model, x, modules)
    B = f.shape[0]
    ff = f.reshape(B, -1)
    K = ff.shape[1]
    bdims = _batch_dims(model, x, modules, records, B)
    outs = [o for m in modules for _, o in records[id(m)]]
    per_call: list[list[list[Tensor]]] = [[[] for _ in range(B)] for _ in outs]
    for n in range(B if outs else 0):
        for k in range(K):
            grads = torch.autograd.grad(ff[n, k], outs, retain_graph=True, allow_unused=True)
            for i, (g, o) in enumerate(zip(grads, outs, strict=True)):
                per_call[i][n].append(torch.zeros_like(o) if g is None else g)
    result, i = [], 0
    for m in modules:
        calls = records[id(m)]
        if not calls:
            result.append(None)
            continue
        a_parts, J_parts, Jb_parts = [], [], []
        for (inp, s), d in zip(calls, bdims[id(m)], strict=True):
            s = s.detach()
            g = torch.stack([torch.stack(per_call[i][n]) for n in range(B)])  # (B, K, *s)
            i += 1
            if d is None:  # shared by the batch: every sample sees the same input
                lead = s.shape[0] == 1 and inp.shape[0] == 1
                inp = inp if lead else inp.unsqueeze(0)
                s1 = s if lead else s.unsqueeze(0)
                inp, s = inp.expand(B, *inp.shape[1:]), s1.expand(B, *s1.shape[1:])
                g = g.squeeze(2) if lead else g
            else:  # the n-th slice along d is sample n's
                inp, s = inp.movedim(d, 0), s.movedim(d, 0)
                g = g.movedim(d + 2, 2)
                g = torch.stack([g[n, :, n] for n in range(B)])  # (B, K, *s[1:])
            a, groups = _inputs_per_location(m, inp, s)
            s_loc = _out_per_location(m, s)
            J = _out_per_location(m, g.flatten(0, 1)).reshape(B, K, *s_loc.shape[1:])
            W = m.weight
            lin = _linear_weights(m, W.detach())
            recon = torch.cat([a_g @ w.T for a_g, w in zip(a, lin, strict=True)], dim=-1)
            bias = m.bias.detach() if getattr(m, "bias", None) is not None else 0.0
            if isinstance(m, nn.modules.conv._ConvTransposeNd):
                # weight: a map per input location; bias: at the output locations
                Jb_parts.append(J)
                cols = _transpose_columns(m, g.flatten(0, 1), inp.shape[2:])
                J = cols.reshape(B, K, *cols.shape[1:])
                recon = torch.stack(
                    [_col2im(m, recon[n], inp.shape[2:], s.shape[1:]) for n in range(B)]
                )
                recon, s_loc = _out_per_location(m, recon), s_loc - bias
            else:
                recon = recon + bias
            if not torch.allclose(recon, s_loc, rtol=1e-10, atol=1e-10):
                raise AssertionError(f"K-FAC reference: s = W a + b fails for {type(m).__name__}")
            a_parts.append(a)
            J_parts.append(J)
        a = [torch.cat([p[j] for p in a_parts], dim=1) for j in range(len(a_parts[0]))]
        J = torch.cat(J_parts, dim=2)
        W = m.weight
        index = _linear_weights(m, torch.arange(W.numel()).view(W.shape))
        J_bias = torch.cat(Jb_parts, dim=2) if Jb_parts else None
        result.append(LayerTerms(a, J, groups, index, J_bias))
    return result


# ------------------------------------------------------------------------------ attention
def _attention_params(model: nn.Module) -> dict[int, tuple[nn.MultiheadAttention, str]]:
    """``id(param) -> (attention module, name)`` for every ``nn.MultiheadAttention``
    parameter with a K-FAC definition (its projections; ``out_proj.*`` included)."""
    out = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            for attr in (
                "in_proj_weight",
                "in_proj_bias",
                "q_proj_weight",
                "k_proj_weight",
                "v_proj_weight",
            ):
                p = m._parameters.get(attr)
                if p is not None:
                    out[id(p)] = (m, attr)
            for attr in ("weight", "bias"):
                p = m.out_proj._parameters.get(attr)
                if p is not None:
                    out[id(p)] = (m, "out_proj." + attr)
    return out


def attention_forward(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    record: Any = None,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` written out (batched inputs, eval, no masks).

    The maps linear in the weights are explicit tensors, each passed through
    ``record(name, a (B, L, in), s (B, L, out)) -> s``: ``"in"`` (the packed projection of
    self-attention, query is key is value), else ``"q"``, ``"k"``, ``"v"``; then ``"out"``.
    """
    if key_padding_mask is not None or attn_mask is not None or is_causal:
        raise NotImplementedError("reference attention: masks are not implemented")
    if mha.bias_k is not None or mha.add_zero_attn or query.dim() != 3:
        raise NotImplementedError("reference attention: bias_k/add_zero_attn/unbatched")
    record = record or (lambda name, a, s: s)
    same = query is key and key is value

    def bf(t: Tensor) -> Tensor:
        return t if mha.batch_first else t.transpose(0, 1)

    xq, xk, xv = bf(query), bf(key), bf(value)
    E, H = mha.embed_dim, mha.num_heads
    d = E // H
    b = mha.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else b.split(E)

    def lin(t: Tensor, w: Tensor, bb: Tensor | None) -> Tensor:
        out = torch.einsum("ble,oe->blo", t, w)
        return out if bb is None else out + bb

    if mha._qkv_same_embed_dim and same:
        s = record("in", xq, lin(xq, mha.in_proj_weight, b))
        sq, sk, sv = s.split(E, dim=-1)
    else:
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.split(E)
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        sq = record("q", xq, lin(xq, wq, bq))
        sk = record("k", xk, lin(xk, wk, bk))
        sv = record("v", xv, lin(xv, wv, bv))
    B, L, S = sq.shape[0], sq.shape[1], sk.shape[1]
    qh = sq.reshape(B, L, H, d).transpose(1, 2)
    kh = sk.reshape(B, S, H, d).transpose(1, 2)
    vh = sv.reshape(B, S, H, d).transpose(1, 2)
    w = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, H, L, S)
    h = (w @ vh).transpose(1, 2).reshape(B, L, E)
    o = record("out", h, lin(h, mha.out_proj.weight, mha.out_proj.bias))
    weights = None
    if need_weights:
        weights = w.mean(1) if average_attn_weights else w
    return bf(o), weights


def attention_terms(model: nn.Module, x: Any, mha: nn.MultiheadAttention) -> dict:
    """Per map of ``mha`` (:func:`attention_forward`): ``(a (B, L, in), J (B, K, L, out))``
    with :math:`J_{nkl} = \\partial f_{nk} / \\partial s_{nl}`, from one forward pass with
    the module's forward written out (checked against the module) and one backward pass per
    sample and output."""
    rec: dict[str, list] = {}

    def record(name: str, a: Tensor, s: Tensor) -> Tensor:
        rec.setdefault(name, []).append((a.detach(), s))
        return s

    def forward(*args, **kwargs):
        return attention_forward(mha, *args, record=record, **kwargs)

    mha.forward = forward
    try:
        with torch.enable_grad():
            f = model(x)
    finally:
        del mha.forward
    with torch.no_grad(), _math_attention():
        f_module = model(x)
    if not torch.allclose(f.detach(), f_module, rtol=1e-10, atol=1e-12):
        raise AssertionError("reference attention differs from nn.MultiheadAttention")
    if any(len(v) > 1 for v in rec.values()):
        raise ValueError("K-FAC reference: MultiheadAttention called more than once")
    names = list(rec)
    outs = [rec[n][0][1] for n in names]
    B = f.shape[0]
    ff = f.reshape(B, -1)
    J = {n: [] for n in names}
    for i in range(B):
        per = {n: [] for n in names}
        for k in range(ff.shape[1]):
            grads = torch.autograd.grad(ff[i, k], outs, retain_graph=True, allow_unused=True)
            for n, g, o in zip(names, grads, outs, strict=True):
                per[n].append(torch.zeros_like(o[i]) if g is None else g[i])
        for n in names:
            J[n].append(torch.stack(per[n]))
    return {n: (rec[n][0][0], torch.stack(J[n])) for n in names}


def _attention_block(terms: dict, mha: nn.MultiheadAttention, attr: str, M, N, approx):
    """``(factors, index)`` of the K-FAC block of one attention parameter (KFACBlock)."""
    E = mha.embed_dim

    def GA(name: str) -> tuple[Tensor, Tensor]:
        a, J = terms[name]
        return _g_factor(J, M, approx), _a_factor(a, N, approx)

    if attr.startswith("out_proj."):
        G, A = GA("out")
        if attr.endswith("bias"):
            return [(G, None)], [torch.arange(E).unsqueeze(1)]
        return [(G, A)], [torch.arange(E * E).view(E, E)]
    if attr in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        w = mha._parameters[attr]
        return [GA(attr[0])], [torch.arange(w.numel()).view(w.shape)]
    packed = "in" in terms
    if attr == "in_proj_bias":
        if packed:
            return [(GA("in")[0], None)], [torch.arange(3 * E).unsqueeze(1)]
        rows = torch.arange(3 * E).unsqueeze(1)
        return [(GA(n)[0], None) for n in "qkv"], [rows[i * E : (i + 1) * E] for i in range(3)]
    index = torch.arange(3 * E * E).view(3 * E, E)
    if packed:
        return [GA("in")], [index]
    return [GA(n) for n in "qkv"], [index[i * E : (i + 1) * E] for i in range(3)]


@dataclass
class KFACBlock:
    """The K-FAC block of one trainable parameter.

    Attributes
    ----------
    name : str
        Parameter name (first name of the object).
    kind : {"weight", "bias"}
    module : str
        Path of the owning module.
    factors : list of (Tensor, Tensor or None)
        Per group ``(G_g, A_g)``; one group for all but grouped convolutions; a bias has
        ``[(G, None)]`` with ``G`` over all output channels.
    index : list of Tensor
        Per group, the stored flat indices ``(out_g, r_g)`` of the linear weight ``W̃_g``.
    numel : int
    """

    name: str
    kind: str
    module: str
    factors: list[tuple[Tensor, Tensor | None]]
    index: list[Tensor]
    numel: int

    def dense(self) -> Tensor:
        """``(numel, numel)``: the block in the stored weight's row-major flattening."""
        G0 = self.factors[0][0]
        D = torch.zeros(self.numel, self.numel, dtype=G0.dtype)
        for (G, A), idx in zip(self.factors, self.index, strict=True):
            blk = G if A is None else torch.kron(G, A)
            flat = idx.reshape(-1)
            D[flat[:, None], flat[None, :]] = blk
        return D


def kfac(
    model: nn.Module,
    x: Any,
    y: Tensor,
    likelihood: str,
    curvature: str = "ggn",
    approx: str = "expand",
    N: int | None = None,
    M: Tensor | None = None,
    names: list[str] | None = None,
) -> list[KFACBlock]:
    """The K-FAC definition (module docstring) for every trainable parameter, in θ order.

    Parameters
    ----------
    curvature : {"ggn", "ef"}
        ``M_n = Λ_n`` or ``r_n r_nᵀ``; ignored when ``M`` ``(B, K, K)`` is given (e.g.
        :func:`mc_output_matrices` for an MC Fisher).
    approx : {"expand", "reduce"}
    N : int, optional
        Number of data points (default: the batch size).
    names : list of str, optional
        Only these trainable parameters (first names), e.g. the Linear layers of a model
        whose other parameters have no K-FAC definition; then the blocks are in this order.

    Raises
    ------
    ValueError
        A trainable parameter outside a layer with a K-FAC definition or shared by two
        modules.
    """
    sel = trainable(model)
    if names is not None:
        by_name = dict(sel)
        sel = [(n, by_name[n]) for n in names]
    names = [n for n, _ in sel]
    attn = _attention_params(model)
    attn_names = [n for n, p in sel if id(p) in attn]
    names = [n for n in names if n not in attn_names]
    owners = _owner_modules(model, names)
    hf_conv1d = _conv1d_type()
    types = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd) + (
        (hf_conv1d,) if hf_conv1d is not None else ()
    )
    for name in names:
        path, mod, attr = owners[name]
        if not isinstance(mod, types) or attr not in ("weight", "bias"):
            raise ValueError(f"K-FAC reference: no definition for {name} ({type(mod).__name__})")
    modules = list({id(owners[n][1]): owners[n][1] for n in names}.values())
    terms = dict(zip([id(m) for m in modules], layer_terms(model, x, modules), strict=True))
    f = _forward(model, x)
    B = f.shape[0]
    N = B if N is None else N
    if M is None:
        if curvature == "ggn":
            M = output_hessians(f, y, likelihood)
        elif curvature == "ef":
            r = output_grads(f, y, likelihood)
            M = r.unsqueeze(-1) * r.unsqueeze(-2)
        else:
            raise ValueError(f"curvature must be 'ggn' or 'ef' (or pass M), got {curvature!r}")
    blocks = []
    attn_terms: dict[int, dict[str, tuple[Tensor, Tensor]]] = {}
    for name, p in sel:
        if name in attn_names:
            mha, attr = attn[id(p)]
            if id(mha) not in attn_terms:
                attn_terms[id(mha)] = attention_terms(model, x, mha)
            factors, index = _attention_block(attn_terms[id(mha)], mha, attr, M, N, approx)
            kind = "bias" if attr.endswith("bias") else "weight"
            blocks.append(KFACBlock(name, kind, "", factors, index, p.numel()))
            continue
        path, mod, attr = owners[name]
        t = terms[id(mod)]
        index = _linear_weights(mod, torch.arange(mod.weight.numel()).view(mod.weight.shape))
        if t is None:  # never called: the exact block is zero
            out = sum(i.shape[0] for i in index)
            if attr == "bias":
                factors = [(torch.zeros(out, out, dtype=p.dtype), None)]
            else:
                factors = [
                    (
                        torch.zeros(i.shape[0], i.shape[0], dtype=p.dtype),
                        torch.zeros(i.shape[1], i.shape[1], dtype=p.dtype),
                    )
                    for i in index
                ]
        elif attr == "bias":
            G = _g_factor(t.J if t.J_bias is None else t.J_bias, M, approx)
            factors = [(G, None)]
        else:
            G = _g_factor(t.J, M, approx)
            factors = [
                (G[gs, gs], _a_factor(a, N, approx)) for a, gs in zip(t.a, t.groups, strict=True)
            ]
        if attr == "bias":
            rows = torch.arange(p.numel()).unsqueeze(1)
            index = [rows]
            if t is None:
                factors = [(torch.zeros(len(i), len(i), dtype=p.dtype), None) for i in index]
        blocks.append(KFACBlock(name, attr, path, factors, index, p.numel()))
    return blocks


def _g_factor(J: Tensor, M: Tensor, approx: str) -> Tensor:
    """``J (B, K, L, out)``, ``M (B, K, K)``: Σ_{n,l} J_lᵀ M J_l or Σ_n Ĵᵀ M Ĵ (loops over n)."""
    out = J.shape[-1]
    G = torch.zeros(out, out, dtype=J.dtype)
    for n in range(J.shape[0]):
        if approx == "expand":
            for l in range(J.shape[2]):  # noqa: E741
                Jl = J[n, :, l]
                G += Jl.T @ M[n] @ Jl
        elif approx == "reduce":
            Jh = J[n].sum(1)
            G += Jh.T @ M[n] @ Jh
        else:
            raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
    return G


def _a_factor(a: Tensor, N: int, approx: str) -> Tensor:
    """``a (B, L, r)``: (1/(N L)) Σ_{n,l} a aᵀ (expand) or (1/N) Σ_n ā āᵀ (reduce), by loops."""
    B, L, r = a.shape
    A = torch.zeros(r, r, dtype=a.dtype)
    for n in range(B):
        if approx == "expand":
            for l in range(L):  # noqa: E741
                A += torch.outer(a[n, l], a[n, l]) / (N * L)
        else:
            ab = a[n].mean(0)
            A += torch.outer(ab, ab) / N
    return A


def kfac_dense(blocks: list[KFACBlock]) -> Tensor:
    """``(P, P)``: the block-diagonal matrix of :func:`kfac`'s blocks, in θ order."""
    return torch.block_diag(*[b.dense() for b in blocks])


def exact_block_from_terms(t: LayerTerms, M: Tensor, numel: int) -> Tensor:
    """The exact curvature block of a layer's weight from its per-location terms.

    :math:`\\sum_n (\\sum_l J_{nl} \\otimes a_{nl})^\\top M_n (\\sum_l J_{nl} \\otimes
    a_{nl})` in the stored flattening: equal to the corresponding block of :func:`ggn`
    (with ``M = Λ``) for every layer, which tests the per-location terms themselves.
    """
    B, K = t.J.shape[:2]
    D = torch.zeros(B, K, numel, dtype=t.J.dtype)
    for a, gs, idx in zip(t.a, t.groups, t.index, strict=True):
        # d f_{nk} / d W̃_g[o, j] = Σ_l J[n, k, l, o] a[n, l, j]
        jac = torch.einsum("nklo,nlj->nkoj", t.J[..., gs], a)
        D[:, :, idx.reshape(-1)] += jac.reshape(B, K, -1)
    return torch.einsum("nkp,nkj,njq->pq", D, M, D)


# ------------------------------------------------------------------------------ compare
def rel_err(a: Tensor, b: Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 (``‖a‖`` if ``b`` is zero)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm()
    if denom == 0:
        return float(a.norm())
    return float((a - b).norm() / denom)


def _as_matrix(f: Tensor) -> Tensor:
    return torch.diag(f) if f.ndim == 1 else f


def kron_rel_err(factors: list[Tensor], ref: list[Tensor]) -> float:
    """Relative error of ``⊗ factors`` against ``⊗ ref`` without forming the products.

    Uses ‖X − Y‖² = ‖X‖² + ‖Y‖² − 2⟨X, Y⟩ with ⟨A⊗B, C⊗D⟩ = ⟨A, C⟩⟨B, D⟩; accurate to
    about 1e-8 (cancellation), so form the blocks where they are small.
    """
    fs = [_as_matrix(f.double()) for f in factors]
    rs = [_as_matrix(r.double()) for r in ref]
    nx = math.prod(float((f * f).sum()) for f in fs)
    ny = math.prod(float((r * r).sum()) for r in rs)
    xy = math.prod(float((f * r).sum()) for f, r in zip(fs, rs, strict=True))
    if ny == 0:
        return math.sqrt(nx)
    return math.sqrt(max(nx + ny - 2 * xy, 0.0) / ny)


def kron_blocks(
    model: nn.Module,
    x: Any,
    y: Tensor,
    likelihood: str,
    curvature: str = "ggn",
    approx: str = "expand",
    N: int | None = None,
) -> list[tuple[str, Tensor, str]]:
    """Per trainable parameter ``(name, dense block, "kfac" | "exact")``: the K-FAC
    definition (:func:`kfac`) where its layer has one, else the exact curvature block
    :math:`\\sum_n J_n^\\top M_n J_n` restricted to it (normalization layers, bare
    parameters, tied weights), which is what curvlib's K-FAC returns there."""
    J, f = jacobians(model, x)
    if curvature == "ggn":
        M = output_hessians(f, y, likelihood)
    elif curvature == "ef":
        r = output_grads(f, y, likelihood)
        M = r.unsqueeze(-1) * r.unsqueeze(-2)
    else:
        raise ValueError(f"curvature must be 'ggn' or 'ef', got {curvature!r}")
    exact = torch.einsum("nkp,nkj,njq->pq", J, M, J)
    out = []
    for name, sl in param_index(model).items():
        try:
            (block,) = kfac(model, x, y, likelihood, M=M, approx=approx, N=N, names=[name])
        except ValueError:
            out.append((name, exact[sl, sl], "exact"))
        else:
            out.append((name, block.dense(), "kfac"))
    return out
