r"""The pure-autograd backend: ``torch.func`` for products, forward hooks for K-FAC.

Works for any differentiable model (no per-module rules) for ``full`` and ``diag``; ``kron``
needs the layers of :data:`curvlib.kfac.KFAC_MODULES`.

GGN, MC Fisher and EF share one computation: with cotangents ``c`` of shape ``(B, K, C)``
whose outer products sum to the output-space matrix :math:`M_n` (see
:mod:`curvlib.likelihood`), the per-sample products :math:`V_{n,k} = J_n^\top c_{n,k}` are one
vmapped backward pass each, and

* ``full`` :math:`= \sum_{n,k} V_{n,k} V_{n,k}^\top` (the dense ``N·K·P²`` contraction),
* ``diag`` :math:`= \sum_{n,k} V_{n,k}^2` (never a ``P×P`` matrix; the exact GGN diagonal
  backpropagates the ``C`` columns of :math:`\Lambda^{1/2}`),
* ``kron``: the cotangents are backpropagated to the layer outputs (:mod:`curvlib.kfac`).

The batch is processed in chunks so that ``V`` stays within a fixed memory budget.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from curvlib.errors import CapabilityError
from curvlib.interface import CurvatureInterface, EFInterface, GGNInterface
from curvlib.kfac import KFAC_MODULES, kfac
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

    def _products(self, x: Any, y: Tensor | None, generator: torch.Generator | None, op):
        inp, y = self._prepare(x, y)
        f = self._forward(inp)
        self.lik.check_target(f, y)
        cot = self._cotangents(f, y, generator)
        out = None
        for s in self._chunks(f.shape[0], cot.shape[1]):
            part = op(self._select(self._per_sample_vjps(self._slice(inp, s), cot[s])))
            out = part if out is None else out + part
        return self._loss(f, y), out

    def full(
        self,
        x: Any,
        y: Tensor | None = None,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Dense curvature ``(loss, H (P, P))``; ``generator`` seeds MC sampling."""

        def gram(V: Tensor) -> Tensor:
            V = V.flatten(0, 1)
            return V.T @ V

        return self._products(x, y, generator, gram)

    def diag(
        self,
        x: Any,
        y: Tensor | None = None,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Diagonal ``(loss, h (P,))`` without forming any ``P×P`` matrix."""
        return self._products(x, y, generator, lambda V: V.pow(2).sum((0, 1)))

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
        if self.subnetwork_indices is not None:
            raise CapabilityError(
                "the kron structure does not support subnetwork_indices; use diag or full"
            )
        inp, y = self._prepare(x, y)
        self._check_modules("kron")
        B = self._batch_size(x)
        N = B if N is None else int(N)
        if N < 1:
            raise ValueError(f"N (number of data points) must be positive, got {N}")

        def cotangents(f: Tensor) -> Tensor:
            self.lik.check_target(f, y)
            return self._cotangents(f, y, generator)

        f, kfacs = kfac(self._model, inp, self.params, cotangents, N, self.kfac_approx)
        return self._loss(f, y), Kron(kfacs)


class AutogradGGN(_AutogradProducts, GGNInterface):
    """GGN (exact) and MC Fisher (``stochastic=True``) with the autograd backend."""


class AutogradEF(_AutogradProducts, EFInterface):
    """Empirical Fisher with the autograd backend (see :class:`~curvlib.EFInterface`)."""


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
        """Hessian diagonal ``(loss, h (P,))`` from Hessian-vector products."""
        return self._hessian_rows(x, y, lambda rows, sel: rows[torch.arange(sel.numel()), sel])
