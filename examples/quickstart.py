"""Quickstart: GGN, EF and Hessian of a small MLP, as diagonals, full matrices and K-FAC.

Run: ``python examples/quickstart.py``
"""

import torch
from torch import nn

import curvlib

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))

for curvature in ("ggn", "fisher", "ef", "hessian"):
    cls = curvlib.backend_class("autograd", curvature)
    curv = cls(model, "classification")
    loss, diag = curv.diag(x, y)
    _, full = curv.full(x, y)
    err = (full.diagonal() - diag).abs().max().item()
    print(
        f"{curvature:8s} loss={loss.item():.4f}  P={diag.numel()}  trace={diag.sum().item():.4f}"
        f"  |diag(full) - diag|={err:.1e}"
    )

loss, kron = curvlib.AutogradGGN(model, "classification").kron(x, y, N=len(x))
print(f"K-FAC GGN: {len(kron)} blocks, logdet(K + I) = {(kron.decompose() + 1.0).logdet():.4f}")
