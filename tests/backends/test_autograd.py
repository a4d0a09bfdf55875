"""What is specific to the autograd backend (its numbers are the oracle's,
``tests/test_oracle.py``): the fast GGN-diagonal rule of the Hessian, ``functorch_jacobians``,
the MC Fisher's convergence to the GGN."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from cases import CASES
from torch import nn

from curvlib import AutogradGGN, AutogradHessian

TOL = 1e-10


@pytest.mark.parametrize("case", CASES[:6], ids=[c.name for c in CASES[:6]])
def test_functorch_jacobians_are_the_jacobians(case):
    model, x, _, subnet = case.make()
    curv = AutogradGGN(
        model, case.likelihood, last_layer=case.last_layer, subnetwork_indices=subnet
    )
    assert torch.equal(curv.jacobians(x)[0], curv.functorch_jacobians(x)[0])


@pytest.mark.parametrize("case", CASES[:2], ids=[c.name for c in CASES[:2]])
def test_mc_fisher_converges_to_the_ggn(case):
    model, x, y, _ = case.make()
    curv = AutogradGGN(model, case.likelihood, stochastic=True, num_samples=20000)
    _, H = curv.full(x, y, generator=torch.Generator().manual_seed(0))
    H_ref = ref.ggn(model, x, y, case.likelihood)
    assert 1e-6 < ref.rel_err(H, H_ref) < 0.03  # sampled, and unbiased


def test_hessian_diagonal_of_piecewise_linear_chain_is_the_ggn_diagonal():
    """ReLU/LeakyReLU/pooling chains: the fast GGN-diagonal rule, exact against brute force;
    a smooth activation (Tanh) takes the Hessian-vector-product path, also exact."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        relu_cnn = nn.Sequential(
            nn.Conv2d(1, 3, 3),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(2),
            nn.Sequential(nn.Flatten(), nn.Linear(12, 5)),
            nn.ReLU(),
            nn.Linear(5, 3),
        ).double()
        tanh_mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        data = [torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randn(4, 4).double()]
        y = torch.randint(0, 3, (4,))
    for model, x, fast in ((relu_cnn, data[0], True), (tanh_mlp, data[1], False)):
        curv = AutogradHessian(model, "classification")
        assert curv.diag_is_ggn_diag() is fast
        _, h = curv.diag(x, y)
        H = ref.hessian(model, x, y, "classification")
        assert ref.rel_err(h, H.diagonal()) < TOL
        if not fast:  # the GGN diagonal would be wrong here
            G = ref.ggn(model, x, y, "classification")
            assert ref.rel_err(G.diagonal(), H.diagonal()) > 1e-3
