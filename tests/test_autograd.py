"""The autograd backend against the brute-force float64 reference on the shared cases."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from cases import CASE_IDS, CASES

from curvlib import AutogradEF, AutogradGGN, AutogradHessian

TOL = 1e-8


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_jacobians(case):
    curv, model, x, y, idx = ref.setup(case, AutogradGGN)
    Js, f = curv.jacobians(x)
    J_ref, f_ref = ref.jacobians(model, x, case.last_layer)
    assert Js.shape == (case.batch, case.C, curv.num_params if idx is None else len(idx))
    assert ref.rel_err(Js, ref.sub_vec(J_ref, idx)) < TOL
    assert ref.rel_err(f, f_ref) < TOL
    Js2, _ = curv.functorch_jacobians(x)
    assert torch.equal(Js, Js2)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients(case):
    curv, model, x, y, idx = ref.setup(case, AutogradEF)
    Gs, loss = curv.gradients(x, y)
    G_ref = ref.per_sample_grads(model, x, y, case.likelihood, case.last_layer)
    # gradients() follows laplace-torch: terms of lossfunc, without factor.
    assert ref.rel_err(Gs * curv.factor, ref.sub_vec(G_ref, idx)) < TOL
    assert ref.rel_err(loss * curv.factor, ref.loss(model, x, y, case.likelihood)) < TOL


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("curvature", ["ggn", "ef", "hessian"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dense_and_diag(case, curvature, structure):
    cls = {"ggn": AutogradGGN, "ef": AutogradEF, "hessian": AutogradHessian}[curvature]
    curv, model, x, y, idx = ref.setup(case, cls)
    loss, H = getattr(curv, structure)(x, y)
    brute = {"ggn": ref.ggn, "ef": ref.ef, "hessian": ref.hessian}[curvature]
    H_ref = ref.sub_full(brute(model, x, y, case.likelihood, case.last_layer), idx)
    expected = H_ref if structure == "full" else H_ref.diagonal()
    assert H.shape == expected.shape
    assert ref.rel_err(H, expected) < TOL
    assert ref.rel_err(loss, ref.loss(model, x, y, case.likelihood)) < TOL


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_mc_fisher_reproducible(structure):
    case = CASES[0]
    curv, model, x, y, _ = ref.setup(case, AutogradGGN, stochastic=True, num_samples=3)
    _, a = getattr(curv, structure)(x, y, generator=torch.Generator().manual_seed(7))
    _, b = getattr(curv, structure)(x, y, generator=torch.Generator().manual_seed(7))
    _, c = getattr(curv, structure)(x, y, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=CASE_IDS[:2])
def test_mc_fisher_converges_to_ggn(case):
    curv, model, x, y, _ = ref.setup(case, AutogradGGN, stochastic=True, num_samples=20000)
    _, H = curv.full(x, y, generator=torch.Generator().manual_seed(0))
    H_ref = ref.ggn(model, x, y, case.likelihood)
    assert ref.rel_err(H, H_ref) < 0.03
    # ... and it is not the exact GGN (it is sampled).
    assert ref.rel_err(H, H_ref) > 1e-6


def test_mc_fisher_does_not_touch_global_rng():
    curv, model, x, y, _ = ref.setup(CASES[0], AutogradGGN, stochastic=True)
    state = torch.get_rng_state()
    curv.diag(x, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_model_untouched(case):
    model, x, y, subnet = case.make()
    # give the model some state a careless call would change
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5) if p.requires_grad else None
    before = ref.model_state(model)
    for cls in (AutogradGGN, AutogradEF, AutogradHessian):
        curv = cls(model, case.likelihood, last_layer=case.last_layer, subnetwork_indices=subnet)
        curv.jacobians(x)
        curv.gradients(x, y)
        curv.full(x, y)
        curv.diag(x, y)
        if case.kron and cls is not AutogradHessian:
            curv.kron(x, y, N=10)
    ref.assert_same_state(before, ref.model_state(model))


def test_hessian_diagonal_of_piecewise_linear_chain_is_the_ggn_diagonal():
    """ReLU/LeakyReLU/pooling chains: the fast GGN-diagonal rule, exact against brute force;
    a smooth activation (Tanh) takes the Hessian-vector-product path, also exact."""
    torch.manual_seed(0)
    relu_cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3),
        torch.nn.LeakyReLU(0.1),
        torch.nn.MaxPool2d(2),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)),
        torch.nn.ReLU(),
        torch.nn.Linear(5, 3),
    ).double()
    tanh_mlp = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    for model, x, fast in (
        (relu_cnn, torch.randn(4, 1, 6, 6, dtype=torch.float64), True),
        (tanh_mlp, torch.randn(4, 4, dtype=torch.float64), False),
    ):
        y = torch.randint(0, 3, (4,))
        curv = AutogradHessian(model, "classification")
        assert curv.diag_is_ggn_diag() is fast
        _, h = curv.diag(x, y)
        H = ref.hessian(model, x, y, "classification")
        assert ref.rel_err(h, H.diagonal()) < TOL
        if not fast:  # the GGN diagonal would be wrong here
            assert (
                ref.rel_err(ref.ggn(model, x, y, "classification").diagonal(), H.diagonal()) > 1e-3
            )
