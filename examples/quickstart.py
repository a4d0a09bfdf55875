"""Quickstart: GGN, MC Fisher, EF and Hessian of a small MLP as diagonals, full matrices, K-FAC.

For each curvature the diagonal computed directly is checked against the diagonal of the
full matrix. The MC Fisher draws random pseudo-targets: both calls get a generator seeded
alike, so they see the same samples and agree to float32 round-off (without a generator
each call would draw other samples from the global RNG, and the two would differ by the
Monte-Carlo error).

Run: ``python examples/quickstart.py`` (about 5 s of CPU time, most of it importing torch).
"""

import torch
from torch import nn

import curvlib

g = torch.Generator().manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
with torch.no_grad():  # a seeded initialization without touching the global RNG
    for p in model.parameters():
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)

for curvature in ("ggn", "fisher", "ef", "hessian"):
    cls = curvlib.backend_class("autograd", curvature)
    curv = cls(model, "classification")
    loss, diag = curv.diag(x, y, generator=torch.Generator().manual_seed(1))
    _, full = curv.full(x, y, generator=torch.Generator().manual_seed(1))
    err = (full.diagonal() - diag).abs().max().item()
    print(
        f"{curvature:8s} loss={loss.item():.4f}  P={diag.numel()}  trace={diag.sum().item():.4f}"
        f"  max |diag(full) - diag| = {err:.1e}"
    )

loss, kron = curvlib.AutogradGGN(model, "classification").kron(x, y, N=len(x))
print(f"K-FAC GGN: {len(kron)} blocks, logdet(K + I) = {(kron.decompose() + 1.0).logdet():.4f}")
