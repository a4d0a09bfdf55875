r"""K-FAC layer rules as data: one :class:`KFACRule` per module type, in one table.

A rule says, for one module type, how K-FAC reads the layer:

* which parameters it covers (:meth:`KFACRule.params`) and when it cannot
  (:meth:`KFACRule.problem`);
* how the layer inputs ``a`` and output cotangents ``g`` are recorded
  (:meth:`KFACRule.install`: forward hooks, one :class:`Site` per call and linear map);
* the number of shared locations ``L`` and how ``expand``/``reduce`` apply
  (:meth:`KFACRule.factors`);
* how the factors map onto the stored weight's row-major flattening (``layout``);
* the exact per-sample products :math:`J_n^\top c_{n,k}` of its parameters
  (:meth:`KFACRule.products`), which the diagonal, the dense matrix and EKFAC use.

Every linear map ``y_l = W a_l (+ b)`` applied at ``L`` locations (a Linear layer on
sequences, a convolution's output positions) is a :class:`LinearLikeRule`: with
``a (B, L, g, r)`` and ``g (K, B, L, g, o)`` (``g`` groups, block-diagonal),

* ``expand``: :math:`G = \sum_{k,n,l} g g^\top`, :math:`A = \frac1{NL}\sum_{n,l} a a^\top`;
* ``reduce``: :math:`G = \sum_{k,n} \hat g\hat g^\top` (:math:`\hat g = \sum_l g`),
  :math:`A = \frac1N \sum_n \bar a\bar a^\top` (:math:`\bar a = \frac1L\sum_l a`);

a module called several times contributes every call's locations. A weight stored as
``(g·o, r)`` (``layout="GA"``: Linear, Conv) gets ``[G, A]``; one stored as ``(g·r, o)``
(``layout="AG"``: transformers' ``Conv1D``, Embedding, ConvTranspose) gets ``[A, G]``, so
that the Kronecker product always matches the stored weight's flattening. With groups the
factors carry a leading group dimension (``(g, o, o)``, ``(g, r, r)``). Biases get ``[G]``
over all output channels (with groups too: exact for one data point at one location).

Layers whose parameters are not linear maps of their input (normalization layers) get
:class:`ExactBlockRule`: the exact curvature block of each parameter tensor, dense up to
:data:`DENSE_BLOCK_MAX` entries and diagonal (a 1-D factor) above.

Researchers add a layer with :func:`register_kfac_rule`; see ``docs/kfac.md`` for a worked
example.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "DENSE_BLOCK_MAX",
    "Site",
    "KFACRule",
    "LinearLikeRule",
    "LinearRule",
    "HFConv1DRule",
    "EmbeddingRule",
    "ExactBlockRule",
    "NormRule",
    "register_kfac_rule",
    "rule_for",
    "kfac_rules",
    "exact_block_entry",
    "column_free",
]

#: Parameter tensors with at most this many entries get a dense exact block; larger ones
#: a diagonal (1-D) factor.
DENSE_BLOCK_MAX = 2048


@dataclass
class Site:
    """One application of a layer's map in a forward pass.

    Attributes
    ----------
    role : str
        Which map of the module (``"main"``; multi-map layers name theirs).
    a : Any
        The recorded input (detached).
    out : Tensor
        The output, with its graph (the cotangents are taken with respect to it).
    g : Tensor or None
        After the backward pass: the cotangents ``(K, *out.shape)``.
    """

    role: str
    a: Any
    out: Tensor
    versions: tuple[int, int] = (0, 0)
    g: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


Record = Callable[[nn.Module, Site], Tensor | None]


class KFACRule:
    """How K-FAC and the per-layer products read one module type (subclass it).

    A subclass implements :meth:`factors` and :meth:`products` (and may override
    :meth:`install`, :meth:`params`, :meth:`problem`, :meth:`squares`).
    """

    #: names of the module's own parameters the rule covers
    names: tuple[str, ...] = ("weight", "bias")
    #: every factor of an entry but the one divided by ``N`` (see :meth:`entry`) is a sum
    #: over the cotangent columns, and that one does not depend on them: the K-FAC of
    #: chunks of columns adds up (the autograd backend then streams the columns)
    columns_additive: bool = False

    def params(self, module: nn.Module) -> dict[str, Tensor]:
        """The parameters covered, by name relative to ``module``."""
        return {n: p for n, p in module._parameters.items() if p is not None and n in self.names}

    def problem(self, module: nn.Module) -> str:
        """Why the rule cannot handle ``module`` (empty if it can)."""
        return ""

    def install(self, module: nn.Module, record: Record) -> list[Any]:
        """Register hooks that call ``record(module, site)`` once per call; return handles.

        The default records the first positional input and the output of ``forward``.
        ``record`` may return a tensor that replaces the output (a protected copy).
        """

        def hook(mod: nn.Module, args: tuple, out: Any) -> Any:
            return record(mod, Site("main", args[0], out))

        return [module.register_forward_hook(hook)]

    def batch_free_dims(self, module: nn.Module, ndim: int) -> set[int]:
        """Dimensions of an ``ndim``-dimensional tensor the module records that cannot hold
        the data points: the capture needs no probe for the batch dimension of a site whose
        tensors have the batch size in dimension 0 and in none of the others but these
        (:mod:`curvlib.kfac.capture`). The default excludes none (a probe decides)."""
        return set()

    def factors(
        self, module: nn.Module, sites: list[Site], N: int, approx: str, names: list[str]
    ) -> dict[str, list[Tensor]]:
        """Kronecker factors of the parameters ``names`` (``[..]`` per name)."""
        raise NotImplementedError

    def products(self, module: nn.Module, sites: list[Site], names: list[str]) -> dict[str, Tensor]:
        r"""Per-sample products :math:`V_{n,k} = J_n^\top c_{n,k}`, ``(B, K, numel)`` per name."""
        raise NotImplementedError

    def squares(self, module: nn.Module, sites: list[Site], names: list[str]) -> dict[str, Tensor]:
        r"""The diagonal :math:`\sum_{n,k} V_{n,k}^2` per name (``(numel,)``)."""
        return {n: v.pow(2).sum((0, 1)) for n, v in self.products(module, sites, names).items()}

    def entry(self, module: nn.Module, name: str) -> tuple[list[tuple[int, ...]], int | None]:
        """``(factor shapes, index of the factor divided by N)`` of the parameter's entry.

        The default is the exact block: ``[(n, n)]``, or ``[(n,)]`` above
        :data:`DENSE_BLOCK_MAX` entries, with no factor divided by ``N``.
        """
        return exact_block_entry(dict(self.params(module))[name].numel())


# -- linear maps ----------------------------------------------------------------------------
def _total(terms: Iterable[Tensor]) -> Tensor:
    """The sum of freshly computed tensors, accumulated in place into the first (no
    temporaries of the result's size: a Linear layer's ``A`` can be large)."""
    it = iter(terms)
    acc = next(it)
    for t in it:
        acc = acc.add_(t)
    return acc


def _gram(p: Tensor, scale: float) -> Tensor:
    r""":math:`\frac1s \sum_{b,l} p_{blg} p_{blg}^\top` per group for patches ``p (B, L, g, r)``,
    the scale applied to the smaller of the operand and the result."""
    B, L, g, r = p.shape
    if g == 1:
        p2 = p.reshape(B * L, r)
        if B * L < r:
            return (p2.T @ (p2 / scale)).unsqueeze(0)
        return (p2.T @ p2).div_(scale).unsqueeze(0)
    return torch.einsum("blgr,blgs->grs", p, p).div_(scale)


def _outer(h: Tensor) -> Tensor:
    """``hᵀh`` of rows ``h (M, o)``."""
    return h.T @ h


def exact_block_entry(n: int) -> tuple[list[tuple[int, ...]], int | None]:
    """The entry of an exact block of ``n`` parameters: dense or diagonal, no ``1/N``."""
    return ([(n,)] if n > DENSE_BLOCK_MAX else [(n, n)]), None


class LinearLikeRule(KFACRule):
    """A map linear in its weight applied at ``L`` locations (see the module docstring).

    Subclasses implement :meth:`patches` and :meth:`grads`; ``layout`` is ``"GA"`` for a
    weight stored as ``(g·o, r)`` and ``"AG"`` for one stored as ``(g·r, o)``.
    """

    layout: str = "GA"
    columns_additive = True

    def patches(self, module: nn.Module, site: Site) -> Tensor:
        """Layer inputs ``(B, L, g, r)`` in the order of the stored weight's ``r`` index."""
        raise NotImplementedError

    def grads(self, module: nn.Module, site: Site) -> Tensor:
        """Output cotangents ``(K, B, L, g, o)``."""
        raise NotImplementedError

    def bias_grads(self, module: nn.Module, site: Site) -> Tensor:
        """Cotangents ``(K, B, L, g, o_b)`` of the bias's output (default :meth:`grads`)."""
        return self.grads(module, site)

    def entry(self, module: nn.Module, name: str) -> tuple[list[tuple[int, ...]], int | None]:
        p = self.params(module)[name]
        g = getattr(module, "groups", 1)
        if name != "weight":  # a bias: [G] over all its outputs (also with groups)
            return [(p.numel(), p.numel())], None
        if self.layout == "GA":
            o, r = p.shape[0] // g, math.prod(p.shape[1:])
            shapes, a = [(o, o), (r, r)], 1
        else:
            r, o = p.shape[0] // g, math.prod(p.shape[1:])
            shapes, a = [(r, r), (o, o)], 0
        return (shapes if g == 1 else [(g, *s) for s in shapes]), a

    @staticmethod
    def _squeeze(t: Tensor) -> Tensor:
        return t[0] if t.shape[0] == 1 else t

    def _G(self, gs: list[Tensor], approx: str) -> Tensor:
        r""":math:`\sum g g^\top` per group over columns, data points (and locations:
        ``expand``; their sum first: ``reduce``) of cotangents ``(K, B, L, g, o)``."""
        if approx == "reduce":
            gs = [_total(g.sum(2) for g in gs).unsqueeze(2)]  # (K, B, 1, g, o)
        if gs[0].shape[3] == 1:  # one group: one matrix product (einsum is 2-7x slower)
            return _total(_outer(g.reshape(-1, g.shape[-1])) for g in gs).unsqueeze(0)
        return _total(torch.einsum("kblgo,kblgp->gop", g, g) for g in gs)

    def factors(
        self, module: nn.Module, sites: list[Site], N: int, approx: str, names: list[str]
    ) -> dict[str, list[Tensor]]:
        out: dict[str, list[Tensor]] = {}
        G = None
        if "weight" in names:
            gs = [self.grads(module, s) for s in sites]
            G = self._G(gs, approx)

            def A_factor() -> Tensor:
                ps = [self.patches(module, s) for s in sites]
                L = sum(p.shape[1] for p in ps)
                if approx == "reduce":
                    abar = _total(p.sum(1) for p in ps).div_(L)  # (B, g, r)
                    return torch.einsum("bgr,bgs->grs", abar, abar).div_(N)
                return _total(_gram(p, N * L) for p in ps)

            G, A = self._squeeze(G), self._squeeze(column_free(sites, ("A", N, approx), A_factor))
            out["weight"] = [G, A] if self.layout == "GA" else [A, G]
        if "bias" in names:  # one G over all output channels, also with groups
            if G is not None and G.ndim == 2 and type(self).bias_grads is LinearLikeRule.bias_grads:
                out["bias"] = [G.clone()]  # the weight's G: the same output cotangents
            else:
                gs = [self.bias_grads(module, s) for s in sites]
                out["bias"] = [self._G([g.flatten(3).unsqueeze(3) for g in gs], approx)[0]]
        return out

    def products(self, module: nn.Module, sites: list[Site], names: list[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "weight" in names:
            eq = "kblgo,blgr->bkgor" if self.layout == "GA" else "kblgo,blgr->bkgro"
            v = sum(torch.einsum(eq, self.grads(module, s), self.patches(module, s)) for s in sites)
            out["weight"] = v.flatten(2)
        if "bias" in names:
            b = sum(self.bias_grads(module, s).sum(2) for s in sites)  # (K, B, g, o)
            out["bias"] = b.flatten(2).transpose(0, 1)
        return out

    def squares(self, module: nn.Module, sites: list[Site], names: list[str]) -> dict[str, Tensor]:
        if len(sites) != 1:
            return super().squares(module, sites, names)
        s = sites[0]
        g, a = self.grads(module, s), self.patches(module, s)
        K, B, L, ng, o = g.shape
        if L == 1 and ng == 1:
            return self._plain_squares(module, g[:, :, 0, 0], a[:, 0, 0], names, s)
        out: dict[str, Tensor] = {}
        if "weight" in names:
            if L == 1:  # no weight sharing: sum_{n,k} g^2 (a^2)^T, never per-sample gradients
                g2 = g[:, :, 0].square().sum(0)  # (B, g, o)
                eq = "bgo,bgr->gor" if self.layout == "GA" else "bgo,bgr->gro"
                out["weight"] = torch.einsum(eq, g2, a[:, 0].square()).flatten()
            elif ng == 1:  # per-sample gradients of one column at a time: batched products
                a3 = a[:, :, 0]  # (B, L, r)
                w = None
                for k in range(K):
                    gk = g[k, :, :, 0]  # (B, L, o)
                    v = gk.transpose(1, 2) @ a3 if self.layout == "GA" else a3.transpose(1, 2) @ gk
                    v = v.mul_(v).sum(0)
                    w = v if w is None else w.add_(v)
                out["weight"] = w.flatten()
            else:  # per-sample gradients, a chunk of columns at a time
                eq = "kblgo,blgr->kbgor" if self.layout == "GA" else "kblgo,blgr->kbgro"
                step = max(1, 2**25 // max(1, B * ng * o * a.shape[-1]))
                w = 0
                for k in range(0, K, step):
                    v = torch.einsum(eq, g[k : k + step], a)
                    w = w + v.mul_(v).sum((0, 1))
                out["weight"] = w.flatten()
        if "bias" in names:
            out["bias"] = self._bias_squares(module, s)
        return out

    def _bias_squares(self, module: nn.Module, site: Site) -> Tensor:
        r""":math:`\sum_{n,k} (\sum_l g_{nkl})^{\circ 2}` of the bias's output cotangents."""
        return self.bias_grads(module, site).sum(2).square().sum((0, 1)).flatten()

    def _plain_squares(
        self, module: nn.Module, g: Tensor, a: Tensor, names: list[str], site: Site
    ) -> dict[str, Tensor]:
        r"""One location, one group: :math:`\sum_{n,k} g_{nk}^{\circ 2} (a_n^{\circ 2})^\top`
        as one matrix product of ``g (K, B, o)`` and ``a (B, r)`` (no einsum dispatch)."""
        g2 = g[0].square() if g.shape[0] == 1 else g.square().sum(0)  # (B, o)
        out: dict[str, Tensor] = {}
        if "weight" in names:
            a2 = a.square()
            w = g2.T @ a2 if self.layout == "GA" else a2.T @ g2
            out["weight"] = w.flatten()
        if "bias" in names:
            if type(self).bias_grads is LinearLikeRule.bias_grads:  # the weight's cotangents
                out["bias"] = g2.sum(0)
            else:
                out["bias"] = self._bias_squares(module, site)
        return out


class LinearRule(LinearLikeRule):
    """``nn.Linear`` on inputs ``(B, *, in)``: every leading position is a location."""

    def batch_free_dims(self, module: nn.Module, ndim: int) -> set[int]:
        return {ndim - 1}  # the map mixes the last dimension

    def patches(self, module: nn.Module, site: Site) -> Tensor:
        a = site.a
        return a.reshape(a.shape[0], -1, 1, a.shape[-1])

    def grads(self, module: nn.Module, site: Site) -> Tensor:
        g = site.g
        return g.reshape(g.shape[0], g.shape[1], -1, 1, g.shape[-1])


class HFConv1DRule(LinearRule):
    """transformers' ``Conv1D`` (GPT-2): a Linear layer whose weight is stored ``(in, out)``."""

    layout = "AG"


def column_free(sites: list[Site], key: Any, compute: Callable[[], Tensor]) -> Tensor:
    """``compute()`` once per pass for a factor that does not depend on the cotangent
    columns (kept in the first site's ``info``, keyed by ``key`` and the sites), so that
    streamed chunks of columns (:attr:`KFACRule.columns_additive`) reuse it."""
    memo = sites[0].info.setdefault("column_free", {})
    k = (key, tuple(map(id, sites)))
    if k not in memo:
        memo[k] = compute()
    return memo[k]


class EmbeddingRule(KFACRule):
    r"""``nn.Embedding``: a Linear map of one-hot inputs; ``A`` is diagonal from token counts.

    The weight ``(V, D)`` gets ``[A (V,), G (D×D)]`` (``layout AG``): ``expand``
    :math:`A = \frac{1}{NL}\operatorname{counts}`, :math:`G = \sum_{k,n,l} g g^\top`;
    ``reduce`` :math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top` with :math:`\bar a_n` the
    token frequencies of sample ``n`` (dense ``V×V``). Positions at ``padding_idx`` get no
    gradient and are not counted.
    """

    names = ("weight",)
    columns_additive = True

    def problem(self, module: nn.Module) -> str:
        if module.max_norm is not None:
            return "max_norm renormalizes the weight in place during the forward pass"
        return ""

    @staticmethod
    def _tokens(module: nn.Module, site: Site) -> tuple[Tensor, Tensor]:
        idx = site.a.reshape(site.a.shape[0], -1)  # (B, L)
        keep = torch.ones_like(idx, dtype=torch.bool)
        if module.padding_idx is not None:
            keep = idx != module.padding_idx
        return idx, keep

    @staticmethod
    def _g(site: Site) -> Tensor:
        g = site.g
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])  # (K, B, L, D)

    def factors(
        self, module: nn.Module, sites: list[Site], N: int, approx: str, names: list[str]
    ) -> dict[str, list[Tensor]]:
        V = module.num_embeddings
        ref = module.weight
        L = sum(self._tokens(module, s)[0].shape[1] for s in sites)
        if approx == "reduce":
            ghat = sum(self._g(s).sum(2) for s in sites)
            G = torch.einsum("kbd,kbe->de", ghat, ghat)
            freq = 0
            for s in sites:
                idx, keep = self._tokens(module, s)
                counts = torch.zeros(idx.shape[0], V, dtype=ref.dtype, device=ref.device)
                freq = freq + counts.scatter_add_(1, idx, keep.to(ref.dtype))
            freq = freq / L
            A = freq.T @ freq / N
        else:
            G = sum(torch.einsum("kbld,kble->de", g, g) for g in map(self._g, sites))
            A = torch.zeros(V, dtype=ref.dtype, device=ref.device)
            for s in sites:
                idx, keep = self._tokens(module, s)
                A.scatter_add_(0, idx.flatten(), keep.flatten().to(ref.dtype))
            A = A / (N * L)
        return {"weight": [A, G]}

    def entry(self, module: nn.Module, name: str) -> tuple[list[tuple[int, ...]], int | None]:
        V, D = module.weight.shape
        return [(V,), (D, D)], 0

    def products(self, module: nn.Module, sites: list[Site], names: list[str]) -> dict[str, Tensor]:
        V = module.num_embeddings
        out = 0
        for s in sites:
            g = self._g(s)
            K, B, L, D = g.shape
            idx, keep = self._tokens(module, s)
            g = g * keep[None, :, :, None].to(g.dtype)
            v = g.new_zeros(K, B, V, D)
            v.scatter_add_(2, idx[None, :, :, None].expand(K, B, L, D), g)
            out = out + v
        return {"weight": out.transpose(0, 1).flatten(2)}


# -- exact blocks of elementwise-affine layers ---------------------------------------------
class ExactBlockRule(KFACRule):
    """The exact curvature block of each parameter tensor (dense, or diagonal above
    :data:`DENSE_BLOCK_MAX` entries), from the per-sample products."""

    columns_additive = True

    def factors(
        self, module: nn.Module, sites: list[Site], N: int, approx: str, names: list[str]
    ) -> dict[str, list[Tensor]]:
        out = {}
        for name, v in self.products(module, sites, names).items():
            v = v.flatten(0, 1)
            out[name] = [v.pow(2).sum(0) if v.shape[1] > DENSE_BLOCK_MAX else v.T @ v]
        return out


class NormRule(ExactBlockRule):
    r"""LayerNorm, GroupNorm and BatchNorm/InstanceNorm in eval mode: ``y = w ⊙ x̂ + b``.

    Per sample, the weight's product is :math:`\sum g \odot \hat x` and the bias's
    :math:`\sum g`, summed over the positions the parameter is broadcast over; each
    parameter gets its exact block ``[H]``.
    """

    def batch_free_dims(self, module: nn.Module, ndim: int) -> set[int]:
        """LayerNorm: its normalized (last) dimensions; the others: every dimension but the
        first of a batched input ``(N, C, *)``, which they treat as the batch (GroupNorm
        normalizes the rest per row, BatchNorm and InstanceNorm keep channels apart)."""
        if isinstance(module, nn.LayerNorm):
            return set(range(max(0, ndim - len(module.normalized_shape)), ndim))
        if isinstance(module, nn.modules.instancenorm._InstanceNorm):
            if ndim == module._get_no_batch_dim():  # unbatched (C, *): dimension 0 is C
                return {0}
        return set(range(1, ndim))

    def problem(self, module: nn.Module) -> str:
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_mean is None:
            return "without running statistics the eval-mode output depends on the whole batch"
        return ""

    def _xhat_dims(self, module: nn.Module, a: Tensor) -> tuple[Tensor, list[int]]:
        """The normalized input ``x̂`` and the dims of it that the parameters span."""
        if isinstance(module, nn.LayerNorm):
            k = len(module.normalized_shape)
            xhat = F.layer_norm(a, module.normalized_shape, None, None, module.eps)
            return xhat, list(range(a.ndim - k, a.ndim))
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(a, module.num_groups, None, None, module.eps), [1]
        if isinstance(module, nn.modules.batchnorm._NormBase):
            xhat = F.batch_norm(
                a, module.running_mean, module.running_var, None, None, False, 0.0, module.eps
            )
            return xhat, [1]
        raise TypeError(f"NormRule does not know {type(module).__name__}")

    def products(self, module: nn.Module, sites: list[Site], names: list[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for s in sites:
            xhat, keep = self._xhat_dims(module, s.a)
            g = s.g  # (K, B, *a.shape[1:])
            red = [d + 1 for d in range(1, xhat.ndim) if d not in keep]
            parts = {}
            if "weight" in names:
                parts["weight"] = (g * xhat).sum(red) if red else g * xhat
            if "bias" in names:
                parts["bias"] = g.sum(red) if red else g
            for n, v in parts.items():
                v = v.flatten(2).transpose(0, 1)
                out[n] = v if n not in out else out[n] + v
        return out


# -- the table ------------------------------------------------------------------------------
_RULES: dict[type[nn.Module], KFACRule] = {}
#: rules for classes of optional libraries, registered when the library is imported:
#: ``(module name, class name, rule)``
_LAZY: list[tuple[str, str, KFACRule]] = [("transformers.pytorch_utils", "Conv1D", HFConv1DRule())]


def register_kfac_rule(
    module_type: type[nn.Module], rule: KFACRule, *, overwrite: bool = False
) -> None:
    """Register ``rule`` for ``module_type`` (and its subclasses that keep its ``forward``).

    Parameters
    ----------
    module_type : type
        A subclass of ``torch.nn.Module``.
    rule : KFACRule
        An instance; see :class:`LinearLikeRule` for maps linear in their weight (implement
        ``patches`` and ``grads``) and :class:`ExactBlockRule` for exact blocks.
    overwrite : bool, default False
        Replace an existing rule of ``module_type``.

    Raises
    ------
    TypeError
        For a ``module_type`` that is not a module class or a ``rule`` that is not a
        :class:`KFACRule`.
    ValueError
        If ``module_type`` has a rule and ``overwrite`` is false.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a subclass of torch.nn.Module, got {module_type!r}")
    if not isinstance(rule, KFACRule):
        raise TypeError(f"rule must be a curvlib.kfac.rules.KFACRule, got {type(rule).__name__}")
    if module_type in _RULES and not overwrite:
        raise ValueError(
            f"{module_type.__name__} has a K-FAC rule already "
            f"({type(_RULES[module_type]).__name__}); "
            "pass overwrite=True to replace it"
        )
    _RULES[module_type] = rule


def _resolve_lazy() -> None:
    for modname, clsname, rule in list(_LAZY):
        mod = sys.modules.get(modname)
        cls = getattr(mod, clsname, None) if mod is not None else None
        if isinstance(cls, type):
            _RULES.setdefault(cls, rule)
            _LAZY.remove((modname, clsname, rule))


def rule_for(module: nn.Module) -> KFACRule | None:
    """The rule of ``module``'s type: the nearest registered base class in its MRO whose
    ``forward`` the module keeps (a subclass with its own ``forward`` has no rule)."""
    if _LAZY:
        _resolve_lazy()
    for base in type(module).__mro__:
        rule = _RULES.get(base)
        if rule is not None:
            return rule if type(module).forward is base.forward else None
    return None


def kfac_rules() -> dict[type[nn.Module], KFACRule]:
    """A copy of the table ``{module type: rule}``."""
    if _LAZY:
        _resolve_lazy()
    return dict(_RULES)


for _t in (nn.Linear,):
    register_kfac_rule(_t, LinearRule())
register_kfac_rule(nn.Embedding, EmbeddingRule())
for _t in (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
):
    register_kfac_rule(_t, NormRule())
