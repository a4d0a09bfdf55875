r"""The K-FAC rule of ``nn.MultiheadAttention``: its projections as Linear maps on sequences.

``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer`` and torchvision's
``VisionTransformer``) applies its weights functionally, inside
``torch.nn.functional.multi_head_attention_forward``: module hooks see no linear call, not
even of its ``out_proj`` submodule. Its parameters are two maps linear in their weights,
each applied at every position ``l`` of a sequence:

* the packed input projection ``[q; k; v]_l = W_{in} x_l + b_{in}`` (``in_proj_weight``
  ``(3E, E)``, ``in_proj_bias`` ``(3E,)``), with ``x`` the query (= key = value in
  self-attention);
* the output projection ``o_l = W_o h_l + b_o`` (``out_proj.weight``, ``out_proj.bias``),
  with ``h`` the attention output before it.

:class:`MultiheadAttentionRule` records both as :class:`~curvlib.kfac.rules.Site` s and
treats them as :class:`~curvlib.kfac.rules.LinearRule` layers with weight sharing over the
positions (``expand``/``reduce`` as for any Linear layer on sequences). During the module's
forward pass a :class:`torch.overrides.TorchFunctionMode` intercepts the call of
``multi_head_attention_forward``, computes the input projection itself, calls the original
function on the projected ``q, k, v`` with identity projection weights and no projection
biases (multiplying by an identity matrix is exact in floating point), and applies the
output projection to its result itself. The attention weights returned with
``need_weights=True`` are unchanged.

When the query is not the key and value (cross-attention), the packed weight acts on
different inputs: its three row blocks ``W_q, W_k, W_v`` are then three Linear maps and the
entry is grouped (``[G (3, E, E), A (3, E, E)]``, block-diagonal over ``q, k, v``). A module
with separate projection weights (``kdim``/``vdim`` different from ``embed_dim``) has no
rule: its parameters get exact blocks (:mod:`curvlib.kfac.compute`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from curvlib.kfac.rules import KFACRule, LinearRule, Record, Site, register_kfac_rule

__all__ = ["MultiheadAttentionRule", "OutProjRule"]

_IN = ("in_proj_weight", "in_proj_bias")
_OUT = ("out_proj.weight", "out_proj.bias")
_ROLES = ("in_proj.q", "in_proj.k", "in_proj.v")


class _Intercept(TorchFunctionMode):
    """Inside one module's forward: ``multi_head_attention_forward`` with recorded maps."""

    def __init__(self, module: nn.MultiheadAttention, record: Record) -> None:
        super().__init__()
        self.module = module
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            return _recorded_mha(self.module, self.record, args, kwargs)
        return func(*args, **kwargs)


def _site(module: nn.Module, record: Record, role: str, a: Tensor, out: Tensor) -> Tensor:
    new = record(module, Site(role, a, out))
    return out if new is None else new


def _recorded_mha(module: nn.Module, record: Record, args: tuple, kwargs: dict) -> Any:
    """``multi_head_attention_forward`` with both projections computed (and recorded) here."""
    ba = inspect.signature(F.multi_head_attention_forward).bind(*args, **kwargs)
    ba.apply_defaults()
    arg = dict(ba.arguments)
    W, b = arg["in_proj_weight"], arg["in_proj_bias"]
    q, k, v = arg["query"], arg["key"], arg["value"]
    batched = q.dim() == 3

    def bf(t: Tensor) -> Tensor:  # (L, B, E) <-> (B, L, E)
        return t.transpose(0, 1) if batched else t

    if not arg["use_separate_proj_weight"] and q is k and k is v:
        a = bf(q)
        proj = _site(module, record, "in_proj", a, F.linear(a, W, b))
        qp, kp, vp = (bf(t) for t in proj.chunk(3, dim=-1))
    else:
        if arg["use_separate_proj_weight"]:
            ws = (arg["q_proj_weight"], arg["k_proj_weight"], arg["v_proj_weight"])
        else:
            ws = W.chunk(3)
        bs = (None, None, None) if b is None else b.chunk(3)
        qp, kp, vp = (
            bf(_site(module, record, role, bf(x), F.linear(bf(x), w, bb)))
            for role, x, w, bb in zip(_ROLES, (q, k, v), ws, bs, strict=True)
        )
    Wo, bo = arg["out_proj_weight"], arg["out_proj_bias"]
    E = qp.shape[-1]
    eye = torch.eye(E, dtype=qp.dtype, device=qp.device)
    arg.update(
        query=qp,
        key=kp,
        value=vp,
        in_proj_weight=None,
        in_proj_bias=None,
        out_proj_weight=eye,
        out_proj_bias=None,
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
    )
    # the mode is popped while its handler runs: this is the original function
    attn, weights = F.multi_head_attention_forward(**arg)
    h = bf(attn)
    out = _site(module, record, "out_proj", h, F.linear(h, Wo, bo))
    return bf(out), weights


def _group_index(role: str) -> int:
    return _ROLES.index(role)


class MultiheadAttentionRule(LinearRule):
    r"""``nn.MultiheadAttention``: input and output projections as Linear layers on sequences.

    Self-attention (query, key and value the same tensor): ``in_proj_weight`` ``(3E, E)``
    gets ``[G (3E×3E), A (E×E)]`` from the query at every position, ``in_proj_bias``
    ``[G]``; ``out_proj.weight``/``out_proj.bias`` likewise from the attention output.
    Cross-attention, and separate ``q/k/v_proj_weight`` (``kdim``/``vdim`` different from
    ``embed_dim``): ``q, k, v`` are three Linear maps on their own inputs; a packed
    ``in_proj_weight`` and the ``in_proj_bias`` get grouped entries (block-diagonal over
    ``q, k, v``), separate weights one ``[G, A]`` each. ``bias_k``/``bias_v`` have no rule
    (exact blocks). See the module docstring for how the maps are recorded.
    """

    names = (*_IN, "q_proj_weight", "k_proj_weight", "v_proj_weight", *_OUT)

    def params(self, module: nn.Module) -> dict[str, Tensor]:
        out = {n: p for n, p in module._parameters.items() if n in self.names and p is not None}
        proj = getattr(module, "out_proj", None)
        if isinstance(proj, nn.Linear):
            for n in ("weight", "bias"):
                p = proj._parameters.get(n)
                if p is not None:
                    out["out_proj." + n] = p
        return out

    def problem(self, module: nn.Module) -> str:
        proj = getattr(module, "out_proj", None)
        if not isinstance(proj, nn.Linear) or type(proj).forward is not nn.Linear.forward:
            return "its out_proj is not a Linear layer"
        return ""

    def install(self, module: nn.Module, record: Record) -> list[Any]:
        modes: list[_Intercept] = []

        def pre(mod: nn.Module, args: tuple) -> None:
            mode = _Intercept(mod, record)
            mode.__enter__()
            modes.append(mode)

        def post(mod: nn.Module, args: tuple, out: Any) -> None:
            if modes:  # also when the forward pass raised (always_call)
                modes.pop().__exit__(None, None, None)

        return [
            module.register_forward_pre_hook(pre),
            module.register_forward_hook(post, always_call=True),
        ]

    # -- the two maps ----------------------------------------------------------------------
    @staticmethod
    def _maps(sites: list[Site]) -> tuple[list[Site], list[Site]]:
        ins = [s for s in sites if s.role != "out_proj"]
        return ins, [s for s in sites if s.role == "out_proj"]

    @staticmethod
    def _padded(site: Site) -> Site:
        """A q/k/v site as a site of the packed map (zero cotangents in the other blocks)."""
        if site.role == "in_proj":
            return site
        g = site.g
        i, E = _group_index(site.role), g.shape[-1]
        full = g.new_zeros((*g.shape[:-1], 3 * E))
        full[..., i * E : (i + 1) * E] = g
        return Site("in_proj", site.a, site.out, g=full)

    @staticmethod
    def _per_group(sites: list[Site]) -> list[list[Site]]:
        per: list[list[Site]] = [[], [], []]
        for s in sites:
            if s.role == "in_proj":
                for i, gi in enumerate(s.g.chunk(3, dim=-1)):
                    per[i].append(Site(_ROLES[i], s.a, s.out, g=gi))
            else:
                per[_group_index(s.role)].append(s)
        return per

    def _delegate(
        self, method: str, module: nn.Module, sites: list[Site], names: list[str], *extra: Any
    ) -> dict[str, Any]:
        """Run ``LinearRule.<method>`` per map, with the map's names as weight/bias."""
        base = getattr(LinearRule, method)
        ins, outs = self._maps(sites)
        out: dict[str, Any] = {}
        local = [n.split(".")[1] for n in names if n in _OUT]
        if local and outs:
            res = base(self, module, outs, *extra, local)
            out.update({"out_proj." + k: v for k, v in res.items()})
        separate = [n for n in names if n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
        per = self._per_group(ins) if separate else None
        for n in separate:
            res = base(self, module, per["qkv".index(n[0])], *extra, ["weight"])
            out[n] = res["weight"]
        packed = [n.replace("in_proj_", "") for n in names if n in _IN]
        if packed and ins:
            if method == "factors" and any(s.role != "in_proj" for s in ins):
                per = self._per_group(ins) if per is None else per
                parts = [base(self, module, per[i], *extra, packed) for i in range(3)]
                res = {
                    k: [torch.stack([p[k][j] for p in parts]) for j in range(len(parts[0][k]))]
                    for k in packed
                }
            else:
                res = base(self, module, [self._padded(s) for s in ins], *extra, packed)
            out.update({"in_proj_" + k: v for k, v in res.items()})
        return out

    def entry(self, module: nn.Module, name: str) -> tuple[list[tuple[int, ...]], int | None]:
        """Without data: self-attention's entries (a packed ``in_proj_weight`` ``[G, A]``);
        cross-attention's packed entries are grouped (as its factors are)."""
        p = self.params(module)[name]
        if name.endswith("bias"):
            return [(p.numel(), p.numel())], None
        o, r = p.shape
        return [(o, o), (r, r)], 1

    def factors(
        self, module: nn.Module, sites: list[Site], N: int, approx: str, names: list[str]
    ) -> dict[str, list[Tensor]]:
        return self._delegate("factors", module, sites, names, N, approx)

    def products(self, module: nn.Module, sites: list[Site], names: list[str]) -> dict[str, Tensor]:
        return self._delegate("products", module, sites, names)

    # weight sharing over positions: the squares from the products (LinearRule's shortcut
    # without sharing does not apply)
    squares = KFACRule.squares


class OutProjRule(KFACRule):
    """``nn.MultiheadAttention``'s ``out_proj`` (``NonDynamicallyQuantizableLinear``): it is
    never called as a module; its parameters belong to the :class:`MultiheadAttentionRule`
    of the attention module around it (or, without one, get exact blocks)."""

    names = ()


register_kfac_rule(nn.MultiheadAttention, MultiheadAttentionRule())
register_kfac_rule(nn.modules.linear.NonDynamicallyQuantizableLinear, OutProjRule())
