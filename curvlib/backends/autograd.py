r"""The pure-autograd backend: module hooks and the K-FAC rule table, torch.func elsewhere.

Works for any differentiable model in eval mode. GGN, MC Fisher and EF share one
computation: with cotangents ``c`` of shape ``(B, K, *out)`` whose outer products sum to
the output-space matrix :math:`M_n` (:mod:`curvlib.likelihood`), the per-sample products
:math:`V_{n,k} = J_n^\top c_{n,k}` come from one recorded forward and one backward pass of
the ``K`` columns to the layer outputs, contracted by each layer's rule
(:mod:`curvlib.kfac.rules`); parameters no rule covers get theirs from ``torch.func`` (or
batched reverse mode, :mod:`curvlib._autodiff`). Then

* ``full`` :math:`= \sum_{n,k} V_{n,k} V_{n,k}^\top`, in batch chunks bounded in memory;
* ``diag`` :math:`= \sum_{n,k} V_{n,k}^2`, without per-sample gradients where the rule allows;
* ``kron``: the rules' Kronecker factors (every parameter covered).

The Hessian is built from Hessian-vector products; its diagonal by the GGN's per-layer rule
where that is exact (:meth:`AutogradHessian.diag_is_ggn_diag`).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from curvlib._call import Call
from curvlib.interface import EFInterface, GGNInterface, HessianInterface
from curvlib.structured import blocks_from_products, layer_groups, layer_products, product_chunks

__all__ = ["AutogradGGN", "AutogradEF", "AutogradHessian"]


class _AutogradProducts:
    """``full`` and ``diag`` of GGN / MC Fisher / EF from per-layer products."""

    backend_name: ClassVar[str] = "autograd"

    def _full(self, call: Call) -> tuple[Tensor, Tensor]:
        return layer_products(self, call, "full")

    def _diag(self, call: Call) -> tuple[Tensor, Tensor]:
        return layer_products(self, call, "diag")

    def _blocks(self, call: Call):
        groups = layer_groups(self._model, self.params)
        sizes = [p.numel() for p in self.params]
        return blocks_from_products(product_chunks(self, call), groups, sizes)


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


class AutogradHessian(_AutogradProducts, HessianInterface):
    r"""Hessian :math:`\nabla^2_\theta` of the reported loss with the autograd backend.

    ``full`` and ``diag`` from Hessian-vector products (:class:`~curvlib.HessianInterface`);
    the diagonal of a piecewise-linear chain by the GGN's per-layer rule, where it is exact.
    """

    def _full(self, call: Call) -> tuple[Tensor, Tensor]:
        return HessianInterface._full(self, call)

    def _blocks(self, call: Call):
        return HessianInterface._blocks(self, call)

    def _diag(self, call: Call) -> tuple[Tensor, Tensor]:
        r"""For a piecewise-linear chain (:meth:`diag_is_ggn_diag`) the diagonal of the Hessian
        *is* the diagonal of the GGN: :math:`\partial^2 \ell/\partial\theta_i^2 =
        J_i^\top \Lambda J_i + \sum_c \partial_{f_c}\ell\,\partial^2 f_c/\partial\theta_i^2`
        and every parameter enters its layer linearly, followed by piecewise-linear maps
        only, so :math:`\partial^2 f_c/\partial\theta_i^2 = 0` (almost everywhere). Otherwise
        from Hessian-vector products.
        """
        if self.diag_is_ggn_diag():
            return layer_products(
                self, call, "diag", lambda c, f, y, g: self.lik.sqrt_cotangents(f, y)
            )
        return HessianInterface._diag(self, call)

    def diag_is_ggn_diag(self) -> bool:
        """Whether the differentiated module is an ``nn.Sequential`` chain of layers linear in
        their parameters and piecewise-linear maps (Linear, Conv, ReLU, LeakyReLU, Hardtanh,
        ReLU6, pooling, Flatten, Identity, Dropout), each registered once and owning its own
        parameters, where the Hessian diagonal equals the GGN diagonal. Only
        ``nn.Sequential`` qualifies: its forward is exactly its children."""

        def chain(m: nn.Module) -> bool:
            if type(m) is nn.Sequential:
                return all(chain(c) for c in m)
            return type(m) in _PIECEWISE_LINEAR

        root = self._model
        mods = [m for _, m in root.named_modules(remove_duplicate=False)]
        if not chain(root) or len({id(m) for m in mods}) != len(mods):
            return False
        owners = [id(p) for m in mods for p in m.parameters(recurse=False)]
        return len(set(owners)) == len(owners)
