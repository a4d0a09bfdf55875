r"""The curvatures: GGN / MC Fisher, empirical Fisher and Hessian interfaces.

Each adds to :class:`~curvlib.interface.CurvatureInterface` its output-space cotangents
(:mod:`curvlib.likelihood`) and the shared hooks built from them: ``full`` and ``diag`` from
the backend's Jacobians (GGN, MC Fisher) or per-sample gradients (EF), and from
Hessian-vector products (Hessian).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlib import _autodiff, _inputs
from curvlib._call import Call
from curvlib.interface import CurvatureInterface
from curvlib.likelihood import Likelihood
from curvlib.structured import blocks_from_products, layer_groups, layer_products

__all__ = ["GGNInterface", "EFInterface", "HessianInterface"]


class GGNInterface(CurvatureInterface):
    r"""Generalized Gauss-Newton :math:`\sum_n J_n^\top \Lambda(f_n) J_n`, or with
    ``stochastic=True`` the Monte-Carlo Fisher, which replaces :math:`\Lambda` by the mean of
    :math:`\tilde g \tilde g^\top` over ``num_samples`` pseudo-targets drawn from the model's
    predictive (unbiased for the GGN).

    Parameters
    ----------
    stochastic : bool, default False
        MC Fisher instead of the exact GGN.
    num_samples : int, default 1
        Number of MC samples per data point.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        last_layer: bool = False,
        subnetwork_indices: Tensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, **options
        )
        self.stochastic = bool(stochastic)
        self.num_samples = _inputs.check_positive_int("num_samples", num_samples)

    @classmethod
    def curvature_name(cls) -> str:
        return "ggn"

    def _cotangents(self, call: Call, f: Tensor, y: Tensor | None, generator: Any) -> Tensor:
        if call.stochastic:
            return self.lik.mc_cotangents(f, call.num_samples, generator, y)
        return self.lik.sqrt_cotangents(f, y)

    def _full(self, call: Call) -> tuple[Tensor, Tensor]:
        r""":math:`\sum_n J_n^\top M_n J_n` from the backend's Jacobians."""
        loss, V = self._products_from_jacobians(call)
        V = call.select(V)
        return loss, V.T @ V

    def _diag(self, call: Call) -> tuple[Tensor, Tensor]:
        loss, V = self._products_from_jacobians(call)
        return loss, V.pow(2).sum(0)

    def _products_from_jacobians(self, call: Call) -> tuple[Tensor, Tensor]:
        """``(loss, V (B*K, P))`` from this backend's Jacobians and the cotangents."""
        Js, f = self._jacobians(call)
        cot = call.cotangents(f)
        V = torch.einsum("bkc,bcp->bkp", cot.flatten(2), Js.reshape(Js.shape[0], -1, Js.shape[-1]))
        return call.loss(f), V.flatten(0, 1)

    def _blocks(self, call: Call):
        """Every layer's block from this backend's Jacobians."""
        groups = layer_groups(self._model, self.params)
        sizes = [p.numel() for p in self.params]
        return blocks_from_products([self._products_from_jacobians(call)], groups, sizes)

    def _shared_diag(self, call: Call) -> tuple[Tensor, Tensor]:
        return layer_products(self, call, "diag")


class EFInterface(CurvatureInterface):
    r"""Empirical Fisher :math:`\sum_n g_n g_n^\top`, :math:`g_n` the gradient of data point
    ``n``'s term of the reported loss ``factor * lossfunc`` (summed over its positions).

    For classification this equals laplace-torch's EF. For regression it is **half** of what
    laplace-torch's backends return (they square the gradient of the unscaled MSE and
    multiply by 1/2 once); curvlib returns the consistent value, and the laplace-torch
    adapter reproduces laplace-torch's numbers.
    """

    @classmethod
    def curvature_name(cls) -> str:
        return "ef"

    def _cotangents(self, call: Call, f: Tensor, y: Tensor | None, generator: Any) -> Tensor:
        return self.lik.ef_cotangents(f, y)

    def _full(self, call: Call) -> tuple[Tensor, Tensor]:
        G, loss = self._gradients(call)
        G = call.select(G) * self.factor
        return loss * self.factor, G.T @ G

    def _diag(self, call: Call) -> tuple[Tensor, Tensor]:
        G, loss = self._gradients(call)
        return loss * self.factor, (G * self.factor).pow(2).sum(0)

    def _blocks(self, call: Call):
        """Every layer's block from this backend's per-sample gradients."""
        G, loss = self._gradients(call)
        groups = layer_groups(self._model, self.params)
        sizes = [p.numel() for p in self.params]
        return blocks_from_products([(loss * self.factor, G * self.factor)], groups, sizes)

    def _shared_diag(self, call: Call) -> tuple[Tensor, Tensor]:
        return layer_products(self, call, "diag")


class HessianInterface(CurvatureInterface):
    r"""Hessian :math:`\nabla^2_\theta` of the reported loss ``factor * lossfunc``.

    The shared hooks build rows of the Hessian from Hessian-vector products (forward over
    reverse, or double backward where an op lacks a forward derivative), a chunk of unit
    vectors at a time: ``full`` stacks them, ``diag`` keeps one entry of each.
    """

    @classmethod
    def curvature_name(cls) -> str:
        return "hessian"

    def _hessian_rows(self, call: Call, keep) -> tuple[Tensor, Tensor]:
        f = call.forward(grad=False)
        params = self.params
        fn = _autodiff.functional(self._model, params)
        values = [p.detach() for p in params]
        P = sum(p.numel() for p in params)
        ref = params[0]

        def loss_fn(vals: Sequence[Tensor]) -> Tensor:
            return self.lik.loss(fn(vals, call.inp), call.y)

        rows_idx = torch.arange(P, device=ref.device) if call.idx is None else call.idx
        chunk = max(1, 2**24 // max(1, P))
        parts = []
        for start in range(0, rows_idx.numel(), chunk):
            sel = rows_idx[start : start + chunk]
            E = torch.zeros(sel.numel(), P, dtype=ref.dtype, device=ref.device)
            E[torch.arange(sel.numel()), sel] = 1
            parts.append(keep(_autodiff.hvp(loss_fn, values, E, self.model), sel))
        return call.loss(f), torch.cat(parts)

    def _full(self, call: Call) -> tuple[Tensor, Tensor]:
        loss, H = self._hessian_rows(call, lambda rows, sel: call.select(rows))
        return loss, (H + H.T) / 2

    def _blocks(self, call: Call):
        """Every layer's block from Hessian-vector products in its own directions."""
        from curvlib.structures import BlockDiag

        groups = layer_groups(self._model, self.params)
        offsets = [0]
        for p in self.params:
            offsets.append(offsets[-1] + p.numel())
        dev = self.params[0].device
        spans = [
            torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in idx]).to(dev)
            for _, idx in groups
        ]
        saved, call.idx = call.idx, torch.cat(spans)
        try:
            loss, rows = self._hessian_rows(call, lambda rows, sel: rows)
        finally:
            call.idx = saved
        blocks, start = [], 0
        for span in spans:
            H = rows[start : start + span.numel()][:, span]
            blocks.append((H + H.T) / 2)
            start += span.numel()
        return loss, BlockDiag(blocks, [name for name, _ in groups])

    def _shared_diag(self, call: Call) -> tuple[Tensor, Tensor]:
        return HessianInterface._diag(self, call)

    def _diag(self, call: Call) -> tuple[Tensor, Tensor]:
        loss, d = self._hessian_rows(call, lambda rows, sel: rows[torch.arange(sel.numel()), sel])
        if call.idx is None:
            return loss, d
        # the template selects the subnetwork from the full-length diagonal
        return loss, d.new_zeros(self.num_params).index_copy_(0, call.idx, d)
