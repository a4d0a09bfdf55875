"""Top-10 Hessian eigenvalues and the GGN trace of a ~100k-parameter CNN, matrix-free.

No P×P matrix is ever formed: the Hessian enters only through Hessian-vector products
(forward-over-reverse), the GGN through Jacobian-vector / vector-Jacobian products.

* Lanczos with full reorthogonalization gives the top-10 Hessian eigenpairs; their
  residuals ``‖Hv − λv‖`` are printed as a convergence check.
* Hutch++ estimates ``tr(GGN)``; the exact trace (from the GGN diagonal by per-sample
  products, also without a P×P matrix) is printed for comparison.

Run: ``python examples/hessian_spectrum.py``. It prints its run time: about 20 s of CPU
time (one thread), measured at 17 s of CPU and 44 s of wall-clock time on a shared 2-core
machine under load. ``--small`` (64 data points, 20 Lanczos steps, 30 products; about 7 s
of CPU time) is a smoke test: its smaller eigenpairs have not converged, as their residuals
show.
"""

import argparse
import time

import torch
from torch import nn

import curvlib
from curvlib.estimators import hutchpp_trace, lanczos

# The products are many small operations: one thread avoids the intra-op threading
# overhead (large on a small, shared CPU).
torch.set_num_threads(1)
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--small", action="store_true", help="a smaller run (seconds)")
small = parser.parse_args().small
NUM_DATA = 64 if small else 256
NUM_ITERS = 20 if small else 50  # Lanczos steps (Hessian-vector products)
NUM_MATVECS = 30 if small else 60  # Hutch++ budget (GGN-vector products)

t0 = time.perf_counter()
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 16, 3),  # 28 -> 26
    nn.ReLU(),
    nn.MaxPool2d(2),  # -> 13
    nn.Conv2d(16, 32, 3),  # -> 11
    nn.ReLU(),
    nn.MaxPool2d(2),  # -> 5
    nn.Flatten(),
    nn.Linear(32 * 5 * 5, 120),
    nn.ReLU(),
    nn.Linear(120, 10),
)
P = sum(p.numel() for p in model.parameters())
x = torch.randn(NUM_DATA, 1, 28, 28)  # MNIST-sized inputs
y = torch.randint(0, 10, (NUM_DATA,))
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128)
print(f"CNN with P = {P:,} parameters, {len(x)} data points in {len(loader)} batches")

# Hessian of the summed cross-entropy over the data set, as an operator.
H = curvlib.AutogradHessian(model, "classification").operator(data=loader)
t = time.perf_counter()
evals, evecs = lanczos(H, k=10, num_iters=NUM_ITERS, generator=torch.Generator().manual_seed(0))
residuals = (H @ evecs - evecs * evals).norm(dim=0)
print(f"top-10 Hessian eigenvalues ({time.perf_counter() - t:.1f} s, {NUM_ITERS} Lanczos steps):")
for lam, r in zip(evals.tolist(), residuals.tolist(), strict=True):
    print(f"  {lam:12.4f}   residual ‖Hv - λv‖ = {r:.1e}")

# GGN trace by Hutch++ with NUM_MATVECS GGN-vector products.
ggn = curvlib.AutogradGGN(model, "classification")
G = ggn.operator(data=loader)
t = time.perf_counter()
trace = hutchpp_trace(G, NUM_MATVECS, generator=torch.Generator().manual_seed(1))
t_hpp = time.perf_counter() - t
exact = sum(ggn.diag(bx, by)[1].sum() for bx, by in loader)
print(
    f"GGN trace: Hutch++ ({NUM_MATVECS} products, {t_hpp:.1f} s) = {trace:.4f}; "
    f"exact (diagonal) = {exact:.4f}; relative error {abs(trace - exact) / exact:.1%}"
)
print(f"total time {time.perf_counter() - t0:.1f} s")
