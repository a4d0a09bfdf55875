r"""Per-layer quantities from the rule table: K-FAC factors, per-sample products, diagonals.

:class:`LayerPass` maps every selected parameter to the module whose rule covers it
(:func:`coverage`), runs one recorded forward and one backward pass of the cotangents
(:func:`~curvlib.kfac.capture.backprop_columns`), and turns the recorded sites into

* :meth:`LayerPass.factors`: one Kron entry per parameter (the rule's factors, see
  :mod:`curvlib.kfac.rules`);
* :meth:`LayerPass.products`: :math:`V_{n,k} = J_n^\top c_{n,k}`, ``(B, K, P)``;
* :meth:`LayerPass.squares`: :math:`\sum_{n,k} V_{n,k}^2`, ``(P,)``.

A parameter no rule covers — a bare ``nn.Parameter`` used in ``forward`` (ViT's class token
and position embedding), a weight used functionally, or one tied across modules — gets its
products from the caller's generic per-sample machinery, and its Kron entry is its exact
block: dense ``[H]`` up to :data:`~curvlib.kfac.rules.DENSE_BLOCK_MAX` entries, else the
diagonal ``[h]`` (1-D). A result therefore always covers every selected parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvlib._memo import identity_key, memoized
from curvlib._selection import own_params
from curvlib.kfac.capture import backprop_columns
from curvlib.kfac.rules import DENSE_BLOCK_MAX, KFACRule, Site, exact_block_entry, rule_for

__all__ = [
    "Claim",
    "Coverage",
    "coverage",
    "LayerPass",
    "exact_block",
    "entry_specs",
    "kron_entries",
]


@dataclass(frozen=True)
class Claim:
    """The module (and its rule) that covers one selected parameter."""

    path: str
    module: nn.Module
    rule: KFACRule
    name: str  # the parameter's name relative to ``module``


@dataclass
class Coverage:
    """Per selected parameter its :class:`Claim`, or ``None`` (generic exact block)."""

    params: list[Tensor]
    claims: list[Claim | None]

    @property
    def layers(self) -> list[tuple[nn.Module, KFACRule]]:
        """The modules to record, once each, in the order of their first parameter."""
        seen: dict[int, tuple[nn.Module, KFACRule]] = {}
        for c in self.claims:
            if c is not None and id(c.module) not in seen:
                seen[id(c.module)] = (c.module, c.rule)
        return list(seen.values())

    @property
    def generic(self) -> list[int]:
        """Indices of the parameters no rule covers."""
        return [i for i, c in enumerate(self.claims) if c is None]

    def describe(self, i: int) -> str:
        """How parameter ``i`` is covered, for reports."""
        c = self.claims[i]
        if c is not None:
            return f"K-FAC rule {type(c.rule).__name__} of {c.path or '<root>'!r}"
        n = self.params[i].numel()
        kind = "dense" if n <= DENSE_BLOCK_MAX else "diagonal"
        return f"exact block ({kind}, {n} entries): no layer rule covers it"


def coverage(root: nn.Module, params: Sequence[Tensor]) -> Coverage:
    """Which module's rule covers each of ``params`` (see the module docstring).

    A parameter is covered by the outermost module whose rule claims it, provided every
    module owning or claiming it lies inside that module (so that the rule's hooks see every
    use); otherwise (tied across unrelated modules, or no rule) it is generic. Computed once
    per call (:mod:`curvlib._memo`).
    """
    params = list(params)
    return memoized(identity_key("coverage", root, params), lambda: _coverage(root, params))


def _coverage(root: nn.Module, params: Sequence[Tensor]) -> Coverage:
    sel = {id(p) for p in params}
    claims: dict[int, list[Claim]] = {}
    owners: dict[int, list[nn.Module]] = {}
    for _, mod in root.named_modules(remove_duplicate=False):
        for _, p in own_params(mod):
            if id(p) in sel:
                owners.setdefault(id(p), []).append(mod)
    for path, mod in root.named_modules():
        rule = rule_for(mod)
        if rule is None or rule.problem(mod):
            continue
        for name, p in rule.params(mod).items():
            if id(p) in sel:
                claims.setdefault(id(p), []).append(Claim(path, mod, rule, name))
    out: list[Claim | None] = []
    for p in params:
        cs = claims.get(id(p), [])
        if not cs:
            out.append(None)
            continue
        top = min(cs, key=lambda c: (c.path.count(".") + bool(c.path), len(c.path)))
        inside = {id(m) for m in top.module.modules()}
        ok = all(id(c.module) in inside for c in cs) and all(
            id(m) in inside for m in owners.get(id(p), [])
        )
        out.append(top if ok else None)
    return Coverage(list(params), out)


def exact_block(V: Tensor) -> list[Tensor]:
    """The exact block ``[V^T V]`` of per-sample products ``V (M, n)``, or ``[diag]`` if large."""
    return [V.pow(2).sum(0) if V.shape[1] > DENSE_BLOCK_MAX else V.T @ V]


GenericProducts = Callable[[list[Tensor], Tensor], Tensor]


class LayerPass:
    """One recorded forward and backward pass, and the per-parameter quantities from it.

    Parameters
    ----------
    root : nn.Module
        The differentiated module.
    params : sequence of Tensor
        The selected parameters.
    cov : Coverage, optional
        Precomputed :func:`coverage` of ``params``.
    """

    def __init__(self, root: nn.Module, params: Sequence[Tensor], cov: Coverage | None = None):
        self.root = root
        self.cov = cov if cov is not None else coverage(root, params)
        self.f: Tensor | None = None
        self.cot: Tensor | None = None
        self.num_columns = 0
        self.sites: dict[int, list[Site]] = {}
        self._generic_V: Tensor | None = None

    def run(
        self,
        forward: Callable[[], Tensor],
        cotangent_fn: Callable[[Tensor], Tensor],
        generic: GenericProducts | None = None,
    ) -> Tensor:
        """Forward and backward; returns the detached output ``f``.

        ``generic(params, cot) -> (B, K, P_g)`` gives the products of the parameters no rule
        covers (required if there are any).
        """
        ((f, _),) = self.stream(forward, cotangent_fn, generic, stream=False)
        return f

    def stream(
        self,
        forward: Callable[[], Tensor],
        cotangent_fn: Callable[[Tensor], Tensor],
        generic: GenericProducts | None = None,
        stream: bool = True,
    ) -> Iterator[tuple[Tensor, slice]]:
        """:meth:`run` one chunk of cotangent columns at a time
        (:func:`~curvlib.kfac.capture.backprop_columns`): yields ``(f, columns)`` while the
        pass holds the columns ``columns`` (``cot`` is theirs; ``num_columns`` counts all),
        so that :meth:`squares` summed over the chunks is the diagonal."""
        idx = self.cov.generic
        if idx and generic is None:
            raise RuntimeError("parameters without a layer rule need generic products")
        chunks = backprop_columns(self.cov.layers, forward, cotangent_fn, self.root, stream)
        for f, cot, self.sites, cols in chunks:
            self.f, self.num_columns = f, cot.shape[1]
            self.cot = cot if cols.stop - cols.start == cot.shape[1] else cot[:, cols]
            if idx:
                self._generic_V = generic([self.cov.params[i] for i in idx], self.cot)
            yield f, cols

    def kron(
        self,
        forward: Callable[[], Tensor],
        cotangent_fn: Callable[[Tensor], Tensor],
        generic: GenericProducts | None,
        N: int,
        approx: str,
    ) -> tuple[Tensor, list[list[Tensor]]]:
        """``(f, factors)``: :meth:`run` and :meth:`factors`, with the cotangent columns
        streamed (:meth:`stream`) where every rule's factors add up over chunks of columns
        (:attr:`~curvlib.kfac.rules.KFACRule.columns_additive`): per entry, every factor but
        the one divided by ``N`` is summed over the chunks; that one is the first chunk's."""
        stream = all(rule.columns_additive for _, rule in self.cov.layers)
        specs = entry_specs(self.root, self.cov.params)
        factors: list[list[Tensor]] | None = None
        for _ in self.stream(forward, cotangent_fn, generic, stream):
            part = self.factors(N, approx)
            if factors is None:
                factors = part
                continue
            for entry, new, (_, a) in zip(factors, part, specs, strict=True):
                for j, t in enumerate(new):
                    if j != a:
                        entry[j] += t
        return self.f, factors

    def _by_module(self) -> dict[int, list[str]]:
        names: dict[int, list[str]] = {}
        for c in self.cov.claims:
            if c is not None:
                names.setdefault(id(c.module), []).append(c.name)
        return names

    def _per_param(self, method: str, *extra) -> list:
        """``rule.<method>`` per module, then ``(result, claim)`` in parameter order."""
        results: dict[int, dict | None] = {}
        names = self._by_module()
        for m, rule in self.cov.layers:
            sites = self.sites.get(id(m), [])
            results[id(m)] = (
                getattr(rule, method)(m, sites, *extra, names[id(m)]) if sites else None
            )
        return [None if c is None else (results[id(c.module)], c) for c in self.cov.claims]

    def _generic_split(self) -> dict[int, Tensor]:
        idx = self.cov.generic
        if not idx:
            return {}
        sizes = [self.cov.params[i].numel() for i in idx]
        return dict(zip(idx, self._generic_V.split(sizes, dim=2), strict=True))

    def _B_K(self) -> tuple[int, int]:
        return self.cot.shape[0], self.cot.shape[1]

    def products(self) -> Tensor:
        """``(B, K, P)``: per-sample products of every selected parameter, in order."""
        B, K = self._B_K()
        gen = self._generic_split()
        parts = []
        for i, (res, p) in enumerate(
            zip(self._per_param("products"), self.cov.params, strict=True)
        ):
            if i in gen:
                parts.append(gen[i])
            elif res is None or res[0] is None:  # a module that never ran: zero
                parts.append(p.new_zeros(B, K, p.numel()))
            else:
                parts.append(res[0][res[1].name])
        return torch.cat(parts, dim=2)

    def squares(self) -> Tensor:
        r"""``(P,)``: :math:`\sum_{n,k} V_{n,k}^2` without forming ``V`` where a rule can."""
        gen = self._generic_split()
        parts = []
        for i, (res, p) in enumerate(zip(self._per_param("squares"), self.cov.params, strict=True)):
            if i in gen:
                parts.append(gen[i].pow(2).sum((0, 1)))
            elif res is None or res[0] is None:
                parts.append(p.new_zeros(p.numel()))
            else:
                parts.append(res[0][res[1].name])
        return torch.cat(parts)

    def factors(self, N: int, approx: str) -> list[list[Tensor]]:
        """One Kron entry per selected parameter (see the module docstring)."""
        gen = self._generic_split()
        out = []
        for i, (res, p) in enumerate(
            zip(self._per_param("factors", N, approx), self.cov.params, strict=True)
        ):
            if i in gen:
                out.append(exact_block(gen[i].flatten(0, 1)))
            elif res is None or res[0] is None:
                out.append(_zero_entry(p, self.cov.claims[i]))
            else:
                out.append(res[0][res[1].name])
        return out


def _zero_entry(p: Tensor, claim: Claim) -> list[Tensor]:
    """Zero factors for a parameter whose module never ran, shaped like the rule's factors."""
    shapes, _ = claim.rule.entry(claim.module, claim.name)
    return [p.new_zeros(s) for s in shapes]


def entry_specs(
    root: nn.Module, params: Sequence[Tensor]
) -> list[tuple[list[tuple[int, ...]], int | None]]:
    """Per parameter, the factor shapes of its Kron entry and the index of the factor that
    carries ``1/N`` (``None`` for exact blocks): what the rules return, without data."""

    def specs() -> list[tuple[list[tuple[int, ...]], int | None]]:
        cov = coverage(root, params)
        return [
            c.rule.entry(c.module, c.name) if c is not None else exact_block_entry(p.numel())
            for p, c in zip(cov.params, cov.claims, strict=True)
        ]

    params = list(params)
    return memoized(identity_key("entry_specs", root, params), specs)


def kron_entries(root: nn.Module, params: Sequence[Tensor]) -> int:
    """The number of factor entries of the Kron of ``params`` (for the size estimate)."""
    return sum(math.prod(s) for shapes, _ in entry_specs(root, params) for s in shapes)
