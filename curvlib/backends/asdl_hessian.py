"""The ASDL backend's Hessian: ``full`` and ``diag`` from ASDL's ``HessianMaker``.

Part of the ASDL backend (also importable from :mod:`curvlib.backends.asdl`); the Fisher
makers' classes and the shared ASDL session live in that module, the top-eigenpair search
of :meth:`AsdlHessian.eig_lowrank` in :mod:`curvlib.backends.asdl_lowrank`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from curvlib._call import Call
from curvlib.backends.asdl import _ATTR, _AsdlBase, _read_diag
from curvlib.interface import HessianInterface

__all__ = ["AsdlHessian"]

#: unique attribute names for ASDL's Hessian results (see ``_ATTR`` in the ASDL module)
HESSIAN_ATTRS = {
    "hessian_attr": _ATTR + "hessian",
    "tmp_hessian_attr": _ATTR + "tmp_hessian",
    "hvp_attr": _ATTR + "hvp",
    "tmp_hvp_attr": _ATTR + "tmp_hvp",
}


class AsdlHessian(_AsdlBase, HessianInterface):
    r"""Hessian :math:`\nabla^2_\theta` of the reported loss ``factor * lossfunc``.

    ``full`` and ``diag`` from ASDL's ``HessianMaker`` (``diag`` computes one dense block
    per module, which the size estimate accounts for). :meth:`eig_lowrank` finds top
    eigenpairs of the Hessian over a data loader with ASDL's Hessian-vector products.
    """

    #: the attribute of ASDL's Hessian-vector products (read by ``eig_lowrank``)
    hvp_attr = HESSIAN_ATTRS["hvp_attr"]

    def _maker(self, shape: str):
        from asdl.hessian import HessianConfig, HessianMaker

        return HessianMaker(self._model, HessianConfig(hessian_shapes=[shape], **HESSIAN_ATTRS))

    def _setup(self, hm: Any, call: Call, inp: Any, y: Tensor) -> None:
        def model_fn(inp: Any) -> Tensor:
            return call.forward(inp, y)

        dummy = hm.setup_model_call(model_fn, inp)
        hm.setup_loss_call(self.lik.loss, dummy, y)

    def _used(self, call: Call) -> tuple[list[bool], Tensor]:
        """Per selected parameter, whether the loss depends on it (ASDL's double backward
        fails for one it does not depend on; its Hessian rows are zero); and the loss."""
        with torch.enable_grad():
            loss = self.lik.loss(call.forward(), call.y)
        if not loss.requires_grad:
            return [False] * len(self.params), loss.detach()
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [g is not None for g in grads], loss.detach()

    def _used_only(self, call: Call) -> tuple[list[Tensor], Tensor, Tensor]:
        """Freeze (for the session) the parameters the loss does not depend on; returns the
        others, their positions in the flat parameter vector, and the loss."""
        params = self.params
        used, loss = self._used(call)
        sizes = [p.numel() for p in params]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        idx = [
            torch.arange(st, st + n, device=p.device)
            for p, st, n, u in zip(params, starts, sizes, used, strict=True)
            if u
        ]
        for p, u in zip(params, used, strict=True):
            if not u:
                p.requires_grad_(False)  # put back by the session
        live = [p for p, u in zip(params, used, strict=True) if u]
        return live, torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long), loss

    def _full(self, call: Call):
        from asdl.matrices import SHAPE_FULL

        P, ref = self.num_params, self.params[0]
        with self._session():
            live, idx, loss = self._used_only(call)
            H = ref.new_zeros(P, P)
            if live:
                hm = self._maker(SHAPE_FULL)
                self._setup(hm, call, call.inp, call.y)
                hm.forward_and_backward()
                H_live = getattr(self._model, HESSIAN_ATTRS["hessian_attr"]).data
                H[idx[:, None], idx[None, :]] = H_live
                loss = hm.loss.detach()
        return loss, call.select_full(H)

    def _diag(self, call: Call):
        from asdl.matrices import SHAPE_DIAG

        P, ref = self.num_params, self.params[0]
        with self._session():
            live, idx, loss = self._used_only(call)
            h = ref.new_zeros(P)
            if live:
                hm = self._maker(SHAPE_DIAG)
                self._setup(hm, call, call.inp, call.y)
                hm.forward_and_backward()
                h[idx] = _read_diag(self._model, HESSIAN_ATTRS["hessian_attr"], live)
                loss = hm.loss.detach()
        return loss, h

    def eig_lowrank(
        self,
        data_loader: Iterable[tuple[Any, Tensor]],
        k: int = 10,
        *,
        generator: torch.Generator | None = None,
        positive_only: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        r"""Top-``k`` eigenpairs of the Hessian of the loss summed over a data loader.

        :math:`H = \sum_{(x, y)} \nabla^2_\theta\, \mathrm{factor}\cdot
        \mathrm{lossfunc}(f(x), y)` over the selected parameters. Products :math:`Hv` are
        ASDL's Hessian-vector products summed over the batches; the largest *algebraic*
        eigenvalues are found by implicitly restarted Lanczos
        (``scipy.sparse.linalg.eigsh``, ``which="LA"``), or by a dense eigendecomposition
        from ``P`` products when ``k >= P``.

        Parameters
        ----------
        data_loader : iterable of (x, y)
            Batches; tensors are moved to the model's device.
        k : int, default 10
            Number of eigenpairs (at most ``P``).
        generator : torch.Generator, optional
            Seeds the Lanczos start vector; default a fixed seed (reproducible; the global
            RNG is never touched).
        positive_only : bool, default False
            Drop eigenpairs with eigenvalue ``<= 1e-6`` (laplace-torch's low-rank Laplace
            does this).

        Returns
        -------
        eigvecs : Tensor
            ``(P, k)``, orthonormal columns, in the order of ``eigvals``.
        eigvals : Tensor
            ``(k,)``, descending.
        loss : Tensor
            The reported loss summed over the loader, detached.
        """
        from curvlib.backends.asdl_lowrank import eig_lowrank

        return eig_lowrank(self, data_loader, k, generator, positive_only)
