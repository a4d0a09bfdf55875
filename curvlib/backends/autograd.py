r"""The pure-autograd backend: ``torch.func`` for products, forward hooks for K-FAC.

Works for any differentiable model (no per-module rules) for ``full`` and ``diag``; ``kron``
needs the layers of :data:`curvlib.kfac.KFAC_MODULES`.

GGN, MC Fisher and EF share one computation: with cotangents ``c`` of shape ``(B, K, C)``
whose outer products sum to the output-space matrix :math:`M_n` (see
:mod:`curvlib.likelihood`), the per-sample products :math:`V_{n,k} = J_n^\top c_{n,k}` are
formed from module hooks where every selected parameter sits in a Linear / Conv layer
(one forward, one backward batched over the ``K`` columns, then per-layer contractions of
inputs and output cotangents; :mod:`curvlib.kfac`), and otherwise by one vmapped
``torch.func`` backward pass per sample and column. Then

* ``full`` :math:`= \sum_{n,k} V_{n,k} V_{n,k}^\top` (the dense ``N·K·P²`` contraction),
* ``diag`` :math:`= \sum_{n,k} V_{n,k}^2` (never a ``P×P`` matrix; the exact GGN diagonal
  backpropagates the ``C`` columns of :math:`\Lambda^{1/2}`),
* ``kron``: the cotangents are backpropagated to the layer outputs (:mod:`curvlib.kfac`).

The batch is processed in chunks so that ``V`` stays within a fixed memory budget; the
per-layer diagonal never forms ``V`` for layers without weight sharing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvlib.errors import SharedParameterError, UnsupportedModuleError
from curvlib.interface import _CHUNK_ENTRIES, CurvatureInterface, EFInterface, GGNInterface
from curvlib.kfac import (
    KFAC_MODULES,
    KronEntry,
    backprop_to_layers,
    kfac,
    kfac_entries,
    per_sample_products,
    squared_products,
)
from curvlib.kron import Kron

__all__ = ["AutogradGGN", "AutogradEF", "AutogradHessian"]


class _AutogradProducts:
    """``full``, ``diag`` and ``kron`` from the cotangents of GGN / MC Fisher / EF."""

    backend_name: ClassVar[str] = "autograd"
    structures: ClassVar[tuple[str, ...]] = ("full", "diag", "kron")
    supported_modules: ClassVar[dict[str, tuple[type, ...] | None]] = {
        "full": None,
        "diag": None,
        "kron": KFAC_MODULES,
    }

    def _chunk_products(
        self,
        inp: Any,
        y: Tensor,
        generator: torch.Generator | None,
        structure: str,
        entries: list[KronEntry] | None,
    ) -> tuple[Tensor, Tensor, int, bool]:
        """``(f, part, K, light)`` for one chunk; ``light``: memory independent of P·B·K."""

        def cotangents(f: Tensor) -> Tensor:
            self.lik.check_target(f, y)
            return self._cotangents(f, y, generator)

        bp = None  # without per-layer rules for every parameter: torch.func below
        if entries is not None:  # per-layer rules from module hooks: Linear / Conv layers
            try:
                bp = backprop_to_layers(self._model, inp, self.params, cotangents, entries)
            except SharedParameterError:  # a layer called twice: torch.func below
                bp = None
        if bp is not None:
            f, K = bp.f, bp.grads[0].shape[0]
            if structure == "diag":
                return f, self._select(squared_products(bp)), K, True
            V = self._select(per_sample_products(bp))
        else:
            f = self._forward(inp)
            cot = cotangents(f)
            K = cot.shape[1]
            V = self._select(self._per_sample_vjps(inp, cot))
        if structure == "diag":
            return f, V.pow(2).sum((0, 1)), K, False
        V = V.flatten(0, 1)
        return f, V.T @ V, K, False

    def _layerwise(self) -> list[KronEntry] | None:
        """The per-layer entries if every selected parameter has a per-layer rule, else None."""
        try:
            return kfac_entries(self._model, self.params)
        except (UnsupportedModuleError, SharedParameterError):
            return None

    def _products(
        self, x: Any, y: Tensor | None, generator: torch.Generator | None, structure: str
    ) -> tuple[Tensor, Tensor]:
        inp, y = self._prepare(x, y)
        B = self._batch_size(x)
        entries = self._layerwise()
        if structure == "diag" and entries is not None:
            size = B  # memory independent of P: one pass
        else:
            size = min(B, max(1, _CHUNK_ENTRIES // (8 * self.num_params)))
        start, loss, out = 0, 0.0, None
        while start < B:
            s = slice(start, min(B, start + size))
            gen = generator[s] if isinstance(generator, Sequence) else generator
            f, part, K, light = self._chunk_products(
                self._slice(inp, s), y[s], gen, structure, entries
            )
            loss = loss + self._loss(f, y[s])
            out = part if out is None else out + part
            start = s.stop
            size = B if light else max(1, _CHUNK_ENTRIES // (K * self.num_params))
        return loss, out

    def full(
        self,
        x: Any,
        y: Tensor | None = None,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Dense curvature ``(loss, H (P, P))``; ``generator`` seeds MC sampling."""
        return self._products(x, y, generator, "full")

    def diag(
        self,
        x: Any,
        y: Tensor | None = None,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Diagonal ``(loss, h (P,))`` without forming any ``P×P`` matrix."""
        return self._products(x, y, generator, "diag")

    def kron(
        self,
        x: Any,
        y: Tensor | None = None,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Kron]:
        """K-FAC ``(loss, Kron)`` on a batch of ``M`` out of ``N`` data points (DESIGN §4).

        Summing the results over batches that partition the data gives ``G = Σ g gᵀ`` and
        ``A = (1/N) Σ a aᵀ``; ``kfac_approx`` picks the weight-sharing variant.
        """
        inp, y = self._prepare(x, y)
        N = self._kron_num_data(x, N)
        self._check_modules("kron")

        def cotangents(f: Tensor) -> Tensor:
            self.lik.check_target(f, y)
            return self._cotangents(f, y, generator)

        f, kfacs = kfac(self._model, inp, self.params, cotangents, N, self.kfac_approx)
        return self._loss(f, y), Kron(kfacs)


class AutogradGGN(_AutogradProducts, GGNInterface):
    """GGN (exact) and MC Fisher (``stochastic=True``) with the autograd backend."""


class AutogradEF(_AutogradProducts, EFInterface):
    """Empirical Fisher with the autograd backend (see :class:`~curvlib.EFInterface`)."""


#: Leaf modules that are linear in their parameters or piecewise linear in their input.
_PIECEWISE_LINEAR = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Identity,
    nn.Flatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.Dropout,  # eval mode only (training mode is refused before any work)
)


class AutogradHessian(CurvatureInterface):
    r"""Hessian :math:`\nabla^2_\theta` of the reported loss ``factor * lossfunc``.

    Rows are Hessian-vector products by forward-over-reverse differentiation
    (``jvp`` of ``grad``), vmapped over chunks of unit vectors: ``full`` stacks them, ``diag``
    keeps one entry of each, so no more than a chunk of rows is held at once.
    """

    backend_name: ClassVar[str] = "autograd"
    structures: ClassVar[tuple[str, ...]] = ("full", "diag")

    @classmethod
    def curvature_name(cls) -> str:
        return "hessian"

    def _hessian_rows(self, x: Any, y: Tensor | None, keep) -> tuple[Tensor, Tensor]:
        inp, y = self._prepare(x, y)
        f = self._forward(inp)
        self.lik.check_target(f, y)
        fn, params = self._functional()
        names = list(params)
        shapes = [params[n].shape for n in names]
        sizes = [params[n].numel() for n in names]
        theta = torch.cat([params[n].flatten() for n in names])

        def loss_flat(t: Tensor) -> Tensor:
            p = {n: c.view(s) for n, c, s in zip(names, t.split(sizes), shapes, strict=True)}
            return self.lik.loss(fn(p, inp), y)

        def hvp(v: Tensor) -> Tensor:
            return torch.func.jvp(torch.func.grad(loss_flat), (theta,), (v,))[1]

        idx = self._subnet()
        rows_idx = torch.arange(theta.numel(), device=theta.device) if idx is None else idx
        chunk = max(1, 2**24 // max(1, theta.numel()))
        parts = []
        for start in range(0, rows_idx.numel(), chunk):
            sel = rows_idx[start : start + chunk]
            E = torch.zeros(sel.numel(), theta.numel(), dtype=theta.dtype, device=theta.device)
            E[torch.arange(sel.numel()), sel] = 1
            parts.append(keep(torch.func.vmap(hvp)(E), sel))
        return self._loss(f, y), torch.cat(parts)

    def full(
        self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Dense Hessian ``(loss, H (P, P))``."""
        loss, H = self._hessian_rows(x, y, lambda rows, sel: self._select(rows))
        return loss, (H + H.T) / 2

    def diag(
        self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        r"""Hessian diagonal ``(loss, h (P,))``.

        For a piecewise-linear chain (:meth:`diag_is_ggn_diag`) the diagonal of the
        Hessian *is* the diagonal of the GGN: :math:`\partial^2 \ell/\partial\theta_i^2 =
        J_i^\top \Lambda J_i + \sum_c \partial_{f_c}\ell\,\partial^2 f_c/\partial\theta_i^2`
        and every parameter enters its layer linearly, followed by piecewise-linear maps
        only, so :math:`\partial^2 f_c/\partial\theta_i^2 = 0` (almost everywhere); it is then
        computed by the GGN's per-layer rules. Otherwise, from Hessian-vector products.
        """
        if self.diag_is_ggn_diag():
            ggn = AutogradGGN(
                self.model,
                self.lik,
                last_layer=self.last_layer,
                subnetwork_indices=self.subnetwork_indices,
                dict_key_x=self.dict_key_x,
                dict_key_y=self.dict_key_y,
            )
            return ggn.diag(x, y)
        return self._hessian_rows(x, y, lambda rows, sel: rows[torch.arange(sel.numel()), sel])

    def diag_is_ggn_diag(self) -> bool:
        """Whether the differentiated module is a chain of layers that are linear in their
        parameters and of piecewise-linear maps (``nn.Sequential`` of Linear, Conv, ReLU,
        LeakyReLU, Hardtanh, ReLU6, pooling, Flatten, Identity, each called once), where the
        Hessian diagonal equals the GGN diagonal. Only ``nn.Sequential`` qualifies: its
        forward is exactly its children, so no hidden functional nonlinearity can exist."""

        def chain(m: nn.Module) -> bool:
            if type(m) is nn.Sequential:
                return all(chain(c) for c in m)
            return type(m) in _PIECEWISE_LINEAR

        mods = list(self._model.modules())
        return chain(self._model) and len({id(m) for m in mods}) == len(mods)
