"""Trace, diagonal and eigenvalue estimators against dense matrices.

Exact where the probes reach P (Hutch++, Lanczos); otherwise unbiased within 5 standard
errors (known variances for Hutchinson, the spread over repetitions for Hutch++).
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import CASES

from curvlib import AutogradGGN, AutogradHessian
from curvlib.estimators import hutchinson_diagonal, hutchinson_trace, hutchpp_trace, lanczos


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sym(P: int, seed: int = 0, psd: bool = False) -> torch.Tensor:
    A = torch.randn(P, P, dtype=torch.float64, generator=gen(seed))
    return A @ A.T / P if psd else (A + A.T) / 2


def curvature_op(curv_cls, case_idx: int = 0):
    case = CASES[case_idx]
    model, x, y, _ = case.make()
    curv = curv_cls(model, case.likelihood)
    return curv.operator(x, y), curv.full(x, y)[1]


OPERATORS = {
    "dense_psd": lambda: (sym(12, psd=True),) * 2,
    "dense_indefinite": lambda: (sym(12, 1),) * 2,
    "ggn_rank_deficient": lambda: curvature_op(AutogradGGN, 0),  # P=74, rank <= 15
    "hessian": lambda: curvature_op(AutogradHessian, 1),  # P=51, indefinite
}


@pytest.mark.parametrize("name", list(OPERATORS))
def test_hutchpp_exact_at_P(name):
    A, H = OPERATORS[name]()
    P = H.shape[0]
    est = hutchpp_trace(A, 3 * P, generator=gen())
    assert abs(float(est - H.trace())) < 1e-10 * max(1.0, float(H.abs().sum()))


@pytest.mark.parametrize("name", list(OPERATORS))
def test_lanczos_exact_at_P(name):
    A, H = OPERATORS[name]()
    P = H.shape[0]
    k = 5
    evals, evecs = lanczos(A, k, num_iters=P, generator=gen())
    ref_evals = torch.linalg.eigvalsh(H).flip(0)[:k]
    scale = float(H.abs().max())
    assert (evals - ref_evals).abs().max() < 1e-10 * scale
    assert evecs.shape == (P, k)
    assert (evecs.T @ evecs - torch.eye(k, dtype=H.dtype)).abs().max() < 1e-10
    assert (H @ evecs - evecs * evals).abs().max() < 1e-8 * scale
    # largest magnitude
    lm, _ = lanczos(A, 3, num_iters=P, which="LM", generator=gen())
    all_ev = torch.linalg.eigvalsh(H)
    ref_lm = all_ev[all_ev.abs().argsort(descending=True)[:3]]
    assert (lm - ref_lm).abs().max() < 1e-10 * scale


def test_lanczos_converges_before_P():
    # a matrix with a clear spectral gap: top eigenvalues converge in far fewer than P steps
    P = 200
    Q, _ = torch.linalg.qr(torch.randn(P, P, dtype=torch.float64, generator=gen(3)))
    ev = torch.cat([torch.tensor([100.0, 90.0, 80.0], dtype=torch.float64), torch.rand(P - 3)])
    A = Q @ torch.diag(ev) @ Q.T
    evals, _ = lanczos(A, 3, num_iters=40, generator=gen())
    assert (evals - ev[:3]).abs().max() < 1e-8


def test_hutchinson_trace_unbiased():
    A = sym(30, 2)
    m = 2000
    est = hutchinson_trace(A, m, generator=gen(1), batch_size=500)
    off = A - torch.diag(A.diagonal())
    se = math.sqrt(2 * float(off.pow(2).sum()) / m)
    assert abs(float(est - A.trace())) < 5 * se


def test_hutchinson_diagonal_unbiased_and_exact_for_diagonal():
    A = sym(30, 3)
    m = 2000
    est = hutchinson_diagonal(A, m, generator=gen(2))
    off = A - torch.diag(A.diagonal())
    se = (off.pow(2).sum(1) / m).sqrt()
    assert ((est - A.diagonal()).abs() < 5 * se).all()
    D = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    assert torch.allclose(hutchinson_diagonal(D, 1, generator=gen()), D.diagonal())


def test_hutchpp_unbiased():
    A = sym(30, 4)
    R = 300
    ests = torch.stack([hutchpp_trace(A, 9, generator=gen(r)) for r in range(R)])
    se = float(ests.std()) / math.sqrt(R)
    assert abs(float(ests.mean() - A.trace())) < 5 * se
    # and it beats Hutchinson at equal cost on a matrix with decaying spectrum
    L = sym(30, 5, psd=True)
    L = L @ L @ L
    hpp = torch.stack([hutchpp_trace(L, 15, generator=gen(r)) for r in range(50)])
    hut = torch.stack([hutchinson_trace(L, 15, generator=gen(r)) for r in range(50)])
    assert (hpp - L.trace()).abs().mean() < (hut - L.trace()).abs().mean()


@pytest.mark.parametrize(
    "fn",
    [
        lambda A, g: hutchinson_trace(A, 5, generator=g),
        lambda A, g: hutchinson_diagonal(A, 5, generator=g),
        lambda A, g: hutchpp_trace(A, 9, generator=g),
        lambda A, g: lanczos(A, 2, num_iters=6, generator=g)[0],
    ],
)
def test_reproducible_and_global_rng_untouched(fn):
    A = sym(20, 6)
    state = torch.get_rng_state()
    a, b = fn(A, gen(7)), fn(A, gen(7))
    fn(A, None)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b)


def test_estimators_on_curvature_operator():
    op, H = curvature_op(AutogradGGN, 0)
    est = hutchinson_trace(op, 400, generator=gen(8))
    off = H - torch.diag(H.diagonal())
    assert abs(float(est - H.trace())) < 5 * math.sqrt(2 * float(off.pow(2).sum()) / 400)
    m = 400
    d = hutchinson_diagonal(op, m, generator=gen(9), batch_size=100)
    assert ((d - H.diagonal()).abs() <= 5 * (off.pow(2).sum(1) / m).sqrt() + 1e-12).all()


def test_estimator_validation():
    A = sym(5)
    with pytest.raises(ValueError):
        hutchinson_trace(A, 0)
    with pytest.raises(ValueError):
        hutchpp_trace(A, 2)
    with pytest.raises(ValueError):
        lanczos(A, 6)
    with pytest.raises(ValueError):
        lanczos(A, 2, which="SM")
    with pytest.raises(ValueError):
        hutchinson_trace(torch.ones(3, 4), 2)
