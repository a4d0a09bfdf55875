"""Top eigenpairs of the Hessian over a data loader with ASDL's Hessian-vector products.

The implementation of :meth:`curvlib.backends.asdl_hessian.AsdlHessian.eig_lowrank`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from curvlib.errors import InputError

__all__ = ["eig_lowrank"]


def eig_lowrank(
    curv: Any,
    data_loader: Iterable[tuple[Any, Tensor]],
    k: int,
    generator: torch.Generator | None,
    positive_only: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """See :meth:`curvlib.backends.asdl_hessian.AsdlHessian.eig_lowrank`."""
    import numpy as np
    from asdl.matrices import SHAPE_FULL
    from asdl.vector import ParamVector
    from scipy.sparse.linalg import LinearOperator, eigsh

    ref = curv.params[0] if curv.params else None
    if ref is None:
        raise InputError(f"{type(curv.model).__name__} has no parameters with requires_grad=True")
    batches = [
        tree_map(lambda t: t.to(ref.device) if isinstance(t, Tensor) else t, b) for b in data_loader
    ]
    if not batches:
        raise InputError("data_loader yielded no batches")
    calls = [curv._begin("full", xb, yb) for xb, yb in batches]
    params = curv.params
    P = curv.num_params
    idx = calls[0].idx
    n = P if idx is None else idx.numel()
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise InputError(f"k must be an integer in [1, {n}], got {k!r}")
    attr = curv.hvp_attr  # where ASDL's Hessian-vector product lands
    with curv._session():
        hm = curv._maker(SHAPE_FULL)
        loss = torch.zeros((), dtype=ref.dtype, device=ref.device)
        for c in calls:
            c.inp = curv._features(c)
            f = c.forward(grad=False)
            loss = loss + c.loss(f)

        def hvp(v: Tensor) -> Tensor:
            if idx is not None:
                v = torch.zeros(P, dtype=v.dtype, device=v.device).index_copy_(0, idx, v)
            vec = ParamVector(params, v)
            out = torch.zeros(P, dtype=ref.dtype, device=ref.device)
            for c in calls:
                curv._setup(hm, c, c.inp, c.y)
                hm.forward_and_backward(hvp=True, vec=vec)
                out += getattr(curv._model, attr).get_flatten_vector().detach()
            return out if idx is None else out[idx]

        if k >= n:
            eye = torch.eye(n, dtype=ref.dtype, device=ref.device)
            H = torch.stack([hvp(e) for e in eye], dim=1)
            vals, vecs = torch.linalg.eigh((H + H.T) / 2)
            vals, vecs = vals.flip(0)[:k], vecs.flip(1)[:, :k]
        else:
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            v0 = torch.randn(n, generator=gen, dtype=torch.float64, device=gen.device)

            def matvec(v: np.ndarray) -> np.ndarray:
                t = torch.as_tensor(np.asarray(v).ravel(), dtype=ref.dtype, device=ref.device)
                return hvp(t).double().cpu().numpy()

            op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
            w, V = eigsh(op, k=k, which="LA", v0=v0.cpu().numpy())
            order = np.argsort(w)[::-1].copy()
            vals = torch.from_numpy(w[order].copy()).to(ref.device, ref.dtype)
            vecs = torch.from_numpy(V[:, order].copy()).to(ref.device, ref.dtype)
    if positive_only:
        keep = vals > 1e-6
        vals, vecs = vals[keep], vecs[:, keep]
    return vecs, vals, loss.detach()
