"""The one-call functions against brute force on the loss *as given* (float64).

The brute force never uses curvlib's scale factors: the reduction weight ``w`` is read off
the loss itself (``loss_fn(f, y) / sum-reduced loss``), per-sample gradients come from a loop
over samples, the GGN is ``Jᵀ (∇²_f L) J`` with the output Hessian by autograd, and the
Hessian is ``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from cases import CASES
from torch import nn

import curvlib.functional as F
from curvlib import LikelihoodError
from curvlib.layers import layer_indices, layer_statistics, per_layer_blocks, per_layer_diagonal

TOL = 1e-9


CASE = {c.name: c for c in CASES}
FN = nn.functional

REG_LOSSES = [nn.MSELoss(reduction="sum"), nn.MSELoss(reduction="mean"), FN.mse_loss]
CLS_LOSSES = [
    nn.CrossEntropyLoss(reduction="sum"),
    nn.CrossEntropyLoss(reduction="mean"),
    FN.cross_entropy,
]
# (case, loss) pairs: MLP and conv models, both likelihoods, both reductions
PAIRS = [("mlp_reg", L) for L in REG_LOSSES] + [("mlp_cls", L) for L in CLS_LOSSES]
PAIRS += [("conv1d_reg", REG_LOSSES[1]), ("cnn_cls", CLS_LOSSES[0])]
PAIR_IDS = [f"{c}-{getattr(L, 'reduction', 'F')}" for c, L in PAIRS]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def summed(loss_fn):
    return (
        type(loss_fn)(reduction="sum")
        if isinstance(loss_fn, nn.Module)
        else (lambda f, y: loss_fn(f, y, reduction="sum"))
    )


# -- brute force of the loss as given -------------------------------------------------------
def weight(loss_fn, f, y) -> float:
    return float((loss_fn(f, y) / summed(loss_fn)(f, y)).detach())


def ef_brute(model, x, y, loss_fn):
    fn, theta = ref.output_fn(model, x)
    theta = theta.clone().requires_grad_(True)
    f = fn(theta)
    G = torch.stack(
        [
            torch.autograd.grad(
                summed(loss_fn)(f[n : n + 1], y[n : n + 1]), theta, retain_graph=True
            )[0]
            for n in range(len(f))
        ]
    )
    return weight(loss_fn, f, y) * G.T @ G


def ggn_brute(model, x, y, loss_fn):
    J, f = ref.jacobians(model, x)
    Hf = torch.autograd.functional.hessian(lambda out: loss_fn(out, y), f)  # (B,C,B,C)
    J2 = J.flatten(0, 1)
    return J2.T @ Hf.flatten(0, 1).flatten(1) @ J2


def hessian_brute(model, x, y, loss_fn, create_graph=False):
    fn, theta = ref.output_fn(model, x)
    return torch.autograd.functional.hessian(
        lambda t: loss_fn(fn(t), y), theta, create_graph=create_graph
    )


def grad(out, params):
    """Gradient, zero for parameters that ``out`` does not depend on."""
    gs = torch.autograd.grad(out, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params, strict=True)]


def flat(ts):
    return torch.cat([t.flatten() for t in ts])


def by_layer(model, vec, layer_types=None):
    """Split a flat vector by module (own parameters), keyed by path."""
    out, start = {}, 0
    for name, m in model.named_modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        n = sum(p.numel() for p in own)
        if own and (layer_types is None or isinstance(m, tuple(layer_types))):
            out[name] = vec[start : start + n]
        start += n
    return out


# -- approximations ---------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "loss_fn"), PAIRS, ids=PAIR_IDS)
def test_empirical_fisher_diagonal(name, loss_fn):
    model, x, y, _ = CASE[name].make()
    got = F.empirical_fisher_diagonal(model, loss_fn, x, y)
    assert [g.shape for g in got] == [p.shape for p in model.parameters()]
    assert ref.rel_err(flat(got), ef_brute(model, x, y, loss_fn).diagonal()) < TOL


def test_empirical_fisher_is_not_the_squared_batch_gradient():
    """torch-secorder squares the batch gradient; the EF sums squared per-sample gradients."""
    model, x, y, _ = CASE["mlp_cls"].make()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    ef = flat(F.empirical_fisher_diagonal(model, loss_fn, x, y))
    g = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    squared_batch = flat(g).pow(2)
    assert ref.rel_err(ef, ef_brute(model, x, y, loss_fn).diagonal()) < TOL
    assert ref.rel_err(squared_batch, ef) > 0.3
    # they agree for a single sample, where the two definitions coincide
    ef1 = flat(F.empirical_fisher_diagonal(model, loss_fn, x[:1], y[:1]))
    g1 = torch.autograd.grad(loss_fn(model(x[:1]), y[:1]), list(model.parameters()))
    assert ref.rel_err(ef1, flat(g1).pow(2)) < TOL


@pytest.mark.parametrize(
    ("name", "loss_fn"), PAIRS[:2] + PAIRS[3:5], ids=PAIR_IDS[:2] + PAIR_IDS[3:5]
)
def test_empirical_fisher_trace_unbiased(name, loss_fn):
    model, x, y, _ = CASE[name].make()
    E = ef_brute(model, x, y, loss_fn)
    m = 150
    est = F.empirical_fisher_trace(model, loss_fn, x, y, num_samples=m, generator=gen(1))
    off = E - torch.diag(E.diagonal())
    assert abs(float(est - E.trace())) < 5 * math.sqrt(2 * float(off.pow(2).sum()) / m)
    again = F.empirical_fisher_trace(model, loss_fn, x, y, num_samples=m, generator=gen(1))
    assert torch.equal(est, again)


@pytest.mark.parametrize("loss_fn", REG_LOSSES, ids=["sum", "mean", "F"])
@pytest.mark.parametrize("name", ["mlp_reg", "conv1d_reg"])
def test_gauss_newton_diagonal(name, loss_fn):
    model, x, y, _ = CASE[name].make()
    got = F.gauss_newton_matrix_approximation(model, loss_fn, x, y)
    expected = ggn_brute(model, x, y, loss_fn).diagonal()
    assert ref.rel_err(flat(got), expected) < TOL
    # the seed's value diag(JᵀJ) is off by the loss's scale (2 for the sum of squares)
    J, _ = ref.jacobians(model, x)
    w = weight(loss_fn, model(x), y)
    assert ref.rel_err(flat(got), 2 * w * J.pow(2).sum((0, 1))) < TOL


def test_gauss_newton_refuses_other_losses_by_type():
    model, x, y, _ = CASE["mlp_cls"].make()
    for loss_fn in (nn.CrossEntropyLoss(), FN.cross_entropy, nn.L1Loss()):
        with pytest.raises(LikelihoodError):
            F.gauss_newton_matrix_approximation(model, loss_fn, x, y)
    with pytest.raises(ValueError):  # LikelihoodError is a ValueError

        class MSELoss:  # a look-alike by name is not an MSE loss
            def __call__(self, f, y):
                return ((f - y) ** 2).sum()

        F.gauss_newton_matrix_approximation(model, MSELoss(), x, y.double())

    class MyMSE(nn.MSELoss):  # a subclass is
        pass

    model, x, y, _ = CASE["mlp_reg"].make()
    got = F.gauss_newton_matrix_approximation(model, MyMSE(reduction="sum"), x, y)
    assert (
        ref.rel_err(flat(got), ggn_brute(model, x, y, nn.MSELoss(reduction="sum")).diagonal()) < TOL
    )
    with pytest.raises(LikelihoodError, match="reduction"):
        F.gauss_newton_matrix_approximation(model, nn.MSELoss(reduction="none"), x, y)


@pytest.mark.parametrize("name", ["mlp_cls", "cnn_cls", "mlp_reg"])
def test_generalized_fisher_diagonal_and_trace(name):
    case = CASE[name]
    model, x, y, _ = case.make()
    loss_type = "nll" if case.likelihood == "classification" else "gaussian"
    Fmat = ref.ggn(model, x, y, case.likelihood)  # exact Fisher = GGN of the summed NLL
    got = F.generalized_fisher_diagonal(model, model(x), y, loss_type)
    assert ref.rel_err(flat(got), Fmat.diagonal()) < TOL
    m = 100
    est = F.generalized_fisher_trace(model, model(x), y, loss_type, num_samples=m, generator=gen(2))
    off = Fmat - torch.diag(Fmat.diagonal())
    assert abs(float(est - Fmat.trace())) < 5 * math.sqrt(2 * float(off.pow(2).sum()) / m)
    with pytest.raises(LikelihoodError):
        F.generalized_fisher_diagonal(model, model(x), y, "hinge")


# -- per layer --------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_types", [None, [nn.Linear]], ids=["all", "linear"])
@pytest.mark.parametrize(
    ("name", "loss_fn"), [PAIRS[1], PAIRS[3], PAIRS[7]], ids=["reg", "cls", "cnn"]
)
def test_per_layer_diagonals(name, loss_fn, layer_types):
    model, x, y, _ = CASE[name].make()
    H = hessian_brute(model, x, y, loss_fn).diagonal()
    G = ggn_brute(model, x, y, loss_fn).diagonal()
    got_h = F.per_layer_hessian_diagonal(model, loss_fn, x, y, layer_types=layer_types)
    got_g = F.per_layer_fisher_diagonal(model, loss_fn, x, y, layer_types=layer_types)
    exp_h, exp_g = by_layer(model, H, layer_types), by_layer(model, G, layer_types)
    assert list(got_h) == list(exp_h) == list(got_g)
    for k in exp_h:
        assert ref.rel_err(got_h[k], exp_h[k]) < TOL
        assert ref.rel_err(got_g[k], exp_g[k]) < TOL


@pytest.mark.parametrize("curvature", ["ggn", "ef", "hessian"])
def test_per_layer_blocks_and_stats(curvature):
    from test_linops import CURVATURES

    case = CASE["mlp_cls"]
    model, x, y, _ = case.make()
    cls, kw = CURVATURES[curvature]
    curv = cls(model, case.likelihood, **kw)
    H = curv.full(x, y)[1]
    idx = layer_indices(curv)
    assert list(idx) == ["0", "2"]
    blocks = per_layer_blocks(curv, x, y)
    diags = per_layer_diagonal(curv, x, y)
    for k, i in idx.items():
        assert ref.rel_err(blocks[k], H[i][:, i]) < TOL
        assert ref.rel_err(diags[k], H.diagonal()[i]) < TOL
    stats = layer_statistics(blocks)
    stats_d = layer_statistics(diags)
    for k, i in idx.items():
        d = H.diagonal()[i]
        top = torch.linalg.eigvalsh(H[i][:, i])[-1]
        expected = {
            "mean": d.mean(),
            "std": d.std(correction=0),
            "max": d.max(),
            "min": d.min(),
            "trace": d.sum(),
            "top_eigenvalue": top,
        }
        assert stats[k] == pytest.approx({n: float(v) for n, v in expected.items()}, rel=1e-9)
        assert set(stats_d[k]) == set(expected) - {"top_eigenvalue"}
    assert F.get_layer_curvature_stats(diags) == stats_d


def test_create_graph_second_derivative():
    """Differentiating the Hessian / GN / Fisher diagonals again matches brute force."""
    model, x, y, _ = CASE["mlp_reg"].make()
    loss_fn = nn.MSELoss()
    params = list(model.parameters())
    fn, theta = ref.output_fn(model, x)

    hd = F.per_layer_hessian_diagonal(model, loss_fn, x, y, create_graph=True)
    got = grad(sum(v.pow(2).sum() for v in hd.values()), params)
    expected = torch.autograd.functional.jacobian(
        lambda t: (
            torch.autograd.functional.hessian(lambda s: loss_fn(fn(s), y), t, create_graph=True)
            .diagonal()
            .pow(2)
            .sum()
        ),
        theta,
    )
    assert ref.rel_err(flat(got), expected) < TOL

    def gn_diag(t):  # 2/(BC) Σ (∂f/∂θ)² for the mean MSE, by a dense Jacobian
        J = torch.autograd.functional.jacobian(fn, t, create_graph=True)
        return 2 * J.pow(2).sum((0, 1)) / y.numel()

    gn = F.gauss_newton_matrix_approximation(model, loss_fn, x, y, create_graph=True)
    got = grad(flat(gn).pow(2).sum(), params)
    expected = torch.autograd.functional.jacobian(lambda t: gn_diag(t).pow(2).sum(), theta)
    assert ref.rel_err(flat(got), expected) < TOL

    fd = F.per_layer_fisher_diagonal(model, loss_fn, x, y, create_graph=True)
    got = grad(sum(v.pow(2).sum() for v in fd.values()), params)
    assert ref.rel_err(flat(got), expected) < TOL

    gf = F.generalized_fisher_diagonal(model, model(x), y, "gaussian", create_graph=True)
    got = grad(flat(gf).sum(), params)
    expected = torch.autograd.functional.jacobian(lambda t: gn_diag(t).sum() * y.numel() / 2, theta)
    assert ref.rel_err(flat(got), expected) < TOL


def test_create_graph_second_derivative_classification():
    """Λ(f) depends on θ for cross-entropy: the derivative must include that term."""
    case = CASE["mlp_cls"]
    model, x, y, _ = case.make()
    fd = F.per_layer_fisher_diagonal(
        model, nn.CrossEntropyLoss(reduction="sum"), x, y, create_graph=True
    )
    got = grad(sum(v.sum() for v in fd.values()), list(model.parameters()))
    fn, theta = ref.output_fn(model, x)

    def ggn_diag_sum(t):
        J = torch.autograd.functional.jacobian(fn, t, create_graph=True)  # (B, C, P)
        p = torch.softmax(fn(t), -1)
        Lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        return torch.einsum("bcp,bcd,bdp->", J, Lam, J)

    expected = torch.autograd.functional.jacobian(ggn_diag_sum, theta)
    assert ref.rel_err(flat(got), expected) < TOL


# -- laplax-style products ----------------------------------------------------------------------
@pytest.mark.parametrize(("name", "loss_fn"), PAIRS, ids=PAIR_IDS)
def test_create_mv(name, loss_fn):
    model, x, y, _ = CASE[name].make()
    G, E = ggn_brute(model, x, y, loss_fn), ef_brute(model, x, y, loss_fn)
    P = G.shape[0]
    V = torch.randn(P, 2, dtype=torch.float64, generator=gen(1))
    ggn_mv = F.create_ggn_mv(model, (x, y), loss_fn)
    ef_mv = F.create_empirical_fisher_mv(model, {"input": x, "target": y}, loss_fn)
    assert ref.rel_err(ggn_mv(V), G @ V) < TOL
    assert ref.rel_err(ggn_mv(V[:, 0]), G @ V[:, 0]) < TOL
    assert ref.rel_err(ef_mv(V), E @ V) < TOL
    scaled = F.create_ggn_mv(model, (x, y), loss_fn, num_total_samples=4 * len(x))
    assert ref.rel_err(scaled(V), 4 * G @ V) < TOL


def test_create_mv_over_dataloader():
    from torch.utils.data import DataLoader, TensorDataset

    model, x, y, _ = CASE["mlp_cls"].make()
    loss_fn = nn.CrossEntropyLoss()  # mean over the whole data set
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    assert (
        ref.rel_err(F.create_ggn_mv(model, loader, loss_fn)(V), ggn_brute(model, x, y, loss_fn) @ V)
        < TOL
    )
    assert (
        ref.rel_err(
            F.create_empirical_fisher_mv(model, loader, loss_fn)(V),
            ef_brute(model, x, y, loss_fn) @ V,
        )
        < TOL
    )


def test_create_MC_fisher_mv():  # noqa: N802
    from curvlib import AutogradGGN

    model, x, y, _ = CASE["mlp_reg"].make()
    loss_fn = nn.MSELoss(reduction="sum")
    mv = F.create_MC_fisher_mv(model, (x, y), loss_fn, gen(3), mc_samples=4)
    curv = AutogradGGN(model, "regression", stochastic=True, num_samples=4)
    M = 2 * curv.full(x, y, generator=gen(3))[1]  # a = 2 for the sum of squares
    V = torch.randn(M.shape[0], 3, dtype=torch.float64, generator=gen(1))
    assert ref.rel_err(mv(V), M @ V) < TOL
    assert torch.equal(mv(V), mv(V))
    # unbiased for the GGN: many samples approach it
    many = F.create_MC_fisher_mv(model, (x, y), loss_fn, gen(4), mc_samples=20000)
    G = ggn_brute(model, x, y, loss_fn)
    assert ref.rel_err(many(V), G @ V) < 0.03
