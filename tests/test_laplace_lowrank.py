"""laplace-torch's ``LowRankLaplace`` on curvlib's ``eig_lowrank`` (every curvature).

laplace-torch 0.3 refuses ``LowRankLaplace`` unless the retired ``asdfghjkl`` module is
importable, whatever the backend (``docs/laplace.md``); the test lifts that one import
check, so that laplace-torch's own low-rank code runs on curvlib's hook.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace")

from curvlib.integrations.laplace import laplace_backend  # noqa: E402

DT = torch.float64


def _problem(likelihood: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X = torch.randn(12, 3, dtype=DT)
    y = (
        torch.randint(0, 2, (12,))
        if likelihood == "classification"
        else torch.randn(12, 2, dtype=DT)
    )
    return model, DataLoader(TensorDataset(X, y), batch_size=5), X, y


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn", "ef"])
def test_eig_lowrank_is_the_top_of_the_dense_spectrum(curvature, likelihood):
    model, loader, X, y = _problem(likelihood)
    P = sum(p.numel() for p in model.parameters())
    backend = laplace_backend("autograd", curvature)(model, likelihood, low_rank=4)
    U, vals, loss = backend.eig_lowrank(loader)
    dense = {"hessian": ref.hessian, "ggn": ref.ggn, "ef": ref.ef}[curvature]
    H = backend._dense_scale(dense(model, X, y, likelihood))  # laplace-torch's scaling
    want = torch.linalg.eigvalsh(H).flip(0)[: vals.numel()]
    assert vals.numel() <= 4 and (vals > 1e-6).all()
    assert ref.rel_err(vals, want) < 1e-8
    assert ref.rel_err(U.T @ U, torch.eye(vals.numel(), dtype=DT)) < 1e-8
    assert ref.rel_err(H @ U, U * vals) < 1e-6
    assert U.shape == (P, vals.numel())
    assert ref.rel_err(loss, ref.loss(model, X, y, likelihood)) < 1e-12


def test_low_rank_laplace_runs_on_curvlib(monkeypatch):
    """laplace-torch's LowRankLaplace with curvlib's Hessian: its posterior precision is
    U diag(λ) Uᵀ + prior precision, with curvlib's top eigenpairs."""
    import laplace.baselaplace as bl

    real = bl.find_spec
    monkeypatch.setattr(
        bl, "find_spec", lambda name, *a: object() if name == "asdfghjkl" else real(name, *a)
    )
    model, loader, X, y = _problem("classification")
    la = laplace.Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="lowrank",
        backend=laplace_backend("autograd", "hessian"),
        backend_kwargs={"low_rank": 3},
    )
    la.fit(loader)
    (U, vals), prior = la.posterior_precision
    H = ref.hessian(model, X, y, "classification")
    assert ref.rel_err(vals, torch.linalg.eigvalsh(H).flip(0)[: vals.numel()]) < 1e-8
    assert torch.isfinite(la.log_marginal_likelihood())
    assert la.n_data == 12
