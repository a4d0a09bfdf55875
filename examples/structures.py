"""Every curvature structure on the digits MLP: log-determinants and the Laplace predictive.

A small MLP is trained on scikit-learn's bundled digits (nothing downloads). Its GGN over
the training set is computed as every structure curvlib has — ``full``, ``diag``, ``kron``,
``ekfac``, ``blocks`` and ``lowrank`` — with :func:`curvlib.fit`, and each is used through
the one protocol of :mod:`curvlib.structures` as the posterior precision ``H + delta I`` of a
Laplace approximation: its log-determinant (relative to the full matrix's), and the
linearized (GLM) predictive on the test split with the probit approximation,
``softmax(f / sqrt(1 + pi/8 diag(J S J^T)))`` with ``S = (H + delta I)^-1``.

Run: ``python examples/structures.py`` (``--small`` for a quicker smoke test).
"""

import argparse
import math

import torch
from torch import nn

import curvlib
from curvlib.structures import Dense, Diagonal

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--small", action="store_true", help="fewer data and training steps")
small = parser.parse_args().small
torch.set_num_threads(1)

try:
    from sklearn.datasets import load_digits
except ImportError as err:  # pragma: no cover
    raise SystemExit("this example needs scikit-learn: pip install scikit-learn") from err

g = torch.Generator().manual_seed(0)
X, Y = load_digits(return_X_y=True)
X = torch.tensor(X, dtype=torch.float64) / 16.0
Y = torch.tensor(Y)
perm = torch.randperm(len(X), generator=g)
n_train = 300 if small else 1200
train, test = perm[:n_train], perm[n_train : n_train + (200 if small else 500)]

model = nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10)).double()
with torch.no_grad():
    for p in model.parameters():
        p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(100 if small else 300):
    opt.zero_grad()
    nn.functional.cross_entropy(model(X[train]), Y[train]).backward()
    opt.step()
model.eval()

loader = [(X[train][i : i + 100], Y[train][i : i + 100]) for i in range(0, n_train, 100)]
curv = curvlib.AutogradGGN(model, "classification")
delta = 1.0  # prior precision
P = curv.num_params

structures = {}
for name in ("full", "diag", "kron", "ekfac", "blocks", "lowrank"):
    options = {"k": 30} if name == "lowrank" else None
    _, _, H = curvlib.fit(curv, loader, name, progress=False, options=options)
    if name == "full":
        H = Dense(H)
    elif name == "diag":
        H = Diagonal(H)
    structures[name] = H + delta  # the posterior precision, through the protocol

Js, f = curv.jacobians(X[test])  # (B, C, P), (B, C)
full_logdet = structures["full"].logdet()
print(f"digits MLP, P = {P} parameters, {n_train} training points, prior precision {delta}")
print(f"{'structure':10s} {'logdet':>11s} {'vs full':>9s} {'test NLL':>9s} {'acc':>6s}")
map_nll = nn.functional.cross_entropy(f, Y[test]).item()
map_acc = (f.argmax(-1) == Y[test]).double().mean().item()
print(f"{'MAP':10s} {'':>11s} {'':>9s} {map_nll:9.4f} {map_acc:6.3f}")
for name, S in structures.items():
    logdet = S.logdet()
    fvar = S.inv_square_form(Js).diagonal(dim1=-2, dim2=-1)  # diag(J S^-1 J^T)
    probs = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * fvar), dim=-1)
    nll = nn.functional.nll_loss(probs.log(), Y[test]).item()
    acc = (probs.argmax(-1) == Y[test]).double().mean().item()
    rel = (logdet - full_logdet).item() / abs(full_logdet.item())
    print(f"{name:10s} {logdet.item():11.2f} {rel:+9.2%} {nll:9.4f} {acc:6.3f}")
