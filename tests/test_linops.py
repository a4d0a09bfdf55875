"""Matrix-free operators against the autograd backend's dense ``full`` (float64, 1e-10)."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from cases import CASE_IDS, CASES
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvlib
from curvlib import AutogradEF, AutogradGGN, AutogradHessian, InputError
from curvlib.linops import CurvatureOperator, curvature_operator

TOL = 1e-10


CURVATURES = {
    "ggn": (AutogradGGN, {}),
    "fisher": (AutogradGGN, {"stochastic": True, "num_samples": 3}),
    "ef": (AutogradEF, {}),
    "hessian": (AutogradHessian, {}),
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def setup(case, curvature):
    cls, kw = CURVATURES[curvature]
    model, x, y, subnet = case.make()
    curv = cls(model, case.likelihood, last_layer=case.last_layer, subnetwork_indices=subnet, **kw)
    return curv, model, x, y


def dense_full(curv, x, y, seed=0):
    return curv.full(x, y, generator=gen(seed))[1]


@pytest.mark.parametrize("curvature", list(CURVATURES))
@pytest.mark.parametrize("case", [CASES[0], CASES[6]], ids=[CASE_IDS[0], CASE_IDS[6]])
def test_operator_matches_full(case, curvature):
    """The operator's interface (``(P,)`` and ``(P, K)`` inputs, ``to_dense``, SciPy) on a
    plain and a subnetwork case; every backend x case is in ``tests/test_oracle.py``."""
    curv, model, x, y = setup(case, curvature)
    H = dense_full(curv, x, y)
    op = curv.operator(x, y, generator=gen())
    P = H.shape[0]
    assert isinstance(op, CurvatureOperator)
    assert op.shape == (P, P) and op.dtype == torch.float64 and op.device == H.device
    V = torch.randn(P, 3, dtype=torch.float64, generator=gen(1))
    assert ref.rel_err(op @ V, H @ V) < TOL  # (P, K)
    assert ref.rel_err(op @ V[:, 0], H @ V[:, 0]) < TOL  # (P,)
    assert (op @ V[:, 0]).shape == (P,)
    assert ref.rel_err(op.to_dense(), H) < TOL
    sp = op.to_scipy()
    Vn = V.numpy()
    assert sp.shape == (P, P) and sp.dtype == np.float64
    assert ref.rel_err(torch.from_numpy(sp.matvec(Vn[:, 0])), H @ V[:, 0]) < TOL
    assert ref.rel_err(torch.from_numpy(sp.matmat(Vn)), H @ V) < TOL
    assert ref.rel_err(torch.from_numpy(sp @ Vn), H @ V) < TOL


def test_operator_float32_input_cast_and_scalar_multiple():
    curv, model, x, y = setup(CASES[0], "ggn")
    op = curv.operator(x, y)
    H = dense_full(curv, x, y)
    v = torch.randn(op.shape[0], generator=gen(2))
    out = op @ v  # float32 in, the operator's float64 out
    assert out.dtype == torch.float64
    assert ref.rel_err(out, H @ v.double()) < 1e-6
    v64 = v.double()
    assert ref.rel_err((2.5 * op) @ v64, 2.5 * (H @ v64)) < TOL
    assert ref.rel_err((op * -1.0) @ v64, -(H @ v64)) < TOL
    assert ref.rel_err(op(v64), H @ v64) < TOL


@pytest.mark.parametrize("curvature", list(CURVATURES))
def test_dataloader_sums_batches(curvature):
    case = CASES[0]
    curv, model, x, y = setup(case, curvature)
    x2 = torch.randn(4, *case.x_shape, dtype=torch.float64, generator=gen(5))
    y2 = torch.randint(0, case.C, (4,), generator=gen(6))
    X, Y = torch.cat([x, x2]), torch.cat([y, y2])
    loader = DataLoader(TensorDataset(X, Y), batch_size=4, shuffle=False)
    # full() over the same batches, drawing MC samples from one generator in turn
    g = gen(3)
    H = sum(curv.full(bx, by, generator=g)[1] for bx, by in loader)
    op = curv.operator(data=loader, generator=gen(3))
    V = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=gen(1))
    assert ref.rel_err(op @ V, H @ V) < TOL
    assert op.num_data == 9
    op_x = curv.operator(loader, generator=gen(3))  # a data set passed as x
    assert ref.rel_err(op_x @ V, H @ V) < TOL
    op_list = curvature_operator(curv, data=list(loader), generator=gen(3), progress=True)
    assert ref.rel_err(op_list @ V, H @ V) < TOL
    if curvature != "fisher":
        assert ref.rel_err(op @ V, dense_full(curv, X, Y) @ V) < TOL


def test_mc_operator_fixed_and_reproducible():
    curv, model, x, y = setup(CASES[0], "fisher")
    state = torch.get_rng_state()
    op = curv.operator(x, y, generator=gen(4))
    assert torch.equal(state, torch.get_rng_state())
    D1, D2 = op.to_dense(), op.to_dense()
    assert torch.equal(D1, D2)  # samples drawn once: a fixed linear map
    assert ref.rel_err(D1, D1.T) < TOL
    assert torch.equal(D1, curv.operator(x, y, generator=gen(4)).to_dense())
    assert not torch.allclose(D1, curv.operator(x, y, generator=gen(5)).to_dense())


def test_mc_operator_refuses_reordered_data():
    curv, model, x, y = setup(CASES[0], "fisher")
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    op = curv.operator(data=batches, generator=gen())
    batches.reverse()
    with pytest.raises(InputError, match="deterministically"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


@pytest.mark.parametrize(
    ("n_curv", "n_total", "factor"), [(None, None, 1.0), (None, 20, 4.0), (10, 20, 2.0)]
)
def test_scaling_num_samples(n_curv, n_total, factor):
    curv, model, x, y = setup(CASES[1], "ggn")  # batch of 5
    op = curv.operator(x, y, num_curv_samples=n_curv, num_total_samples=n_total)
    H = dense_full(curv, x, y)
    assert op.scale == factor
    assert ref.rel_err(op.to_dense(), factor * H) < TOL


def test_operator_validation():
    curv, model, x, y = setup(CASES[0], "ggn")
    op = curv.operator(x, y)
    P = op.shape[0]
    with pytest.raises(InputError, match=rf"\({P},\) or \({P}, K\)"):
        op @ torch.ones(P + 1, dtype=torch.float64)
    with pytest.raises(InputError):
        op @ torch.ones(P, 2, 2, dtype=torch.float64)
    with pytest.raises(InputError, match="not both"):
        curv.operator([(x, y)], y)
    with pytest.raises(InputError):
        curv.operator()
    with pytest.raises(InputError):
        curv.operator(data=[]) @ torch.ones(P, dtype=torch.float64)
    with pytest.raises(ValueError):
        curv.operator(x, y[:-1])  # validated when built


def test_create_graph_operator_is_differentiable():
    """d/dθ (vᵀ H(θ) v) by the operator equals the brute-force third-derivative contraction."""
    case = CASES[1]
    model, x, y, _ = case.make()
    curv = AutogradHessian(model, case.likelihood)
    op = curv.operator(x, y, create_graph=True)
    v = torch.randn(op.shape[0], dtype=torch.float64, generator=gen(1))
    quad = v @ (op @ v)
    grads = torch.autograd.grad(quad, list(model.parameters()))
    got = torch.cat([g.flatten() for g in grads])

    fn, theta = ref.output_fn(model, x)

    def q(t):
        def total(s):
            f = fn(s)
            return sum(ref.loss_terms(case.likelihood, f[n], y[n]) for n in range(len(f)))

        H = torch.autograd.functional.hessian(total, t, create_graph=True)
        return v @ H @ v

    expected = torch.autograd.functional.jacobian(q, theta)
    assert ref.rel_err(got, expected) < 1e-9


@pytest.mark.parametrize("curvature", ["ggn", "ef", "hessian", "fisher"])
def test_operator_over_data_checks_every_batch_before_any_product(curvature):
    """A batch whose targets do not fit the outputs (known only after a forward pass) is
    refused by name before any product, even when it is not the first batch."""
    model = nn.Sequential(nn.Linear(3, 2)).double()
    good = (torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))
    bad = (torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 5, 0]))
    curv = curvlib.make_curvature(model, "classification", f"autograd:{curvature}")
    backwards = []
    model[0].register_full_backward_hook(lambda *a: backwards.append(1))
    with pytest.raises(curvlib.TargetError, match="class indices"):
        op = curv.operator([good, bad], generator=torch.Generator().manual_seed(0))
        op @ torch.randn(op.shape[0], dtype=torch.float64)
    assert not backwards
