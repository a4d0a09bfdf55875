"""``curvlib.likelihood``: every method against autograd, with and without positions.

References are autograd derivatives of the per-sample loss written out in
``tests/zoo_reference.py`` (``-100`` positions left out), never curvlib's formulas.
"""

from __future__ import annotations

import pytest
import torch
import zoo_reference as Z
from torch import Tensor, nn

from curvlib.likelihood import Classification, Regression, get_likelihood

DT = torch.float64
TOL = 1e-10
IGNORE = -100


def rel(a: Tensor, b: Tensor) -> float:
    return Z.rel_err(a, b)


def outputs(likelihood: str, positions: bool, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(f, y)``: ``(B, C)`` or ``(B, L, C)``; classification targets with ignored positions."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, 4, 5) if positions else (3, 5)
    f = torch.randn(*shape, generator=g, dtype=DT)
    if likelihood == "regression":
        return f, torch.randn(*shape, generator=g, dtype=DT)
    y = torch.randint(0, 5, shape[:-1], generator=g)
    if positions:
        y[0, 1] = y[2, 3] = IGNORE
    return f, y


CASES = [
    ("classification", False),
    ("classification", True),
    ("regression", False),
    ("regression", True),
]
IDS = [f"{lik}-{'positions' if p else 'flat'}" for lik, p in CASES]


@pytest.mark.parametrize("likelihood, positions", CASES, ids=IDS)
def test_loss_is_factor_times_the_torch_loss(likelihood, positions):
    lik = get_likelihood(likelihood)
    f, y = outputs(likelihood, positions)
    if likelihood == "classification":
        torch_loss = nn.CrossEntropyLoss(reduction="sum", ignore_index=IGNORE)(
            f.reshape(-1, 5), y.reshape(-1)
        )
        assert lik.factor == 1.0
    else:
        torch_loss = nn.MSELoss(reduction="sum")(f, y)
        assert lik.factor == 0.5
    assert rel(lik.loss(f, y), lik.factor * torch_loss) < TOL
    assert rel(lik.loss(f, y), Z.sample_losses(likelihood, f, y).sum()) < TOL


@pytest.mark.parametrize("likelihood, positions", CASES, ids=IDS)
def test_grad_output_is_the_gradient_of_each_data_points_loss(likelihood, positions):
    lik = get_likelihood(likelihood)
    f, y = outputs(likelihood, positions)
    g = lik.grad_output(f, y)
    assert g.shape == f.shape
    assert rel(g.reshape(f.shape[0], -1), Z.output_grads(f, y, likelihood)) < TOL
    # ef_cotangents: one column, the same gradient
    c = lik.ef_cotangents(f, y)
    assert c.shape == (f.shape[0], 1, *f.shape[1:])
    assert torch.equal(c[:, 0], g)
    if positions and likelihood == "classification":
        assert torch.all(g[y == IGNORE] == 0)


@pytest.mark.parametrize("likelihood, positions", CASES, ids=IDS)
def test_hessian_and_its_square_root_per_position(likelihood, positions):
    lik = get_likelihood(likelihood)
    f, y = outputs(likelihood, positions)
    H = lik.hessian(f)
    S = lik.sqrt_hessian(f)
    assert H.shape == S.shape == (*f.shape, f.shape[-1])
    assert rel(S @ S.transpose(-1, -2), H) < TOL
    # against autograd at every position (the Hessian does not depend on the target)
    flat_f, flat_H = f.reshape(-1, f.shape[-1]), H.reshape(-1, f.shape[-1], f.shape[-1])
    target = torch.zeros(flat_f.shape[0], dtype=torch.long)
    if likelihood == "regression":
        target = torch.zeros_like(flat_f)
    L = Z.output_hessians(flat_f.unsqueeze(1), target.unsqueeze(1), likelihood)
    assert rel(flat_H, L) < TOL


@pytest.mark.parametrize("likelihood, positions", CASES, ids=IDS)
def test_exact_cotangents_give_the_output_hessian_of_each_data_point(likelihood, positions):
    """``sum_k c_k c_kᵀ = Λ_n`` over the flattened output of data point ``n``: block-diagonal
    over positions, zero at ignored positions."""
    lik = get_likelihood(likelihood)
    f, y = outputs(likelihood, positions)
    c = lik.sqrt_cotangents(f, y)
    K = f[0].numel()
    assert c.shape == (f.shape[0], K, *f.shape[1:])
    c = c.reshape(f.shape[0], K, K)
    M = torch.einsum("bkc,bkd->bcd", c, c)
    assert rel(M, Z.output_hessians(f, y, likelihood)) < TOL


@pytest.mark.parametrize("likelihood, positions", CASES, ids=IDS)
def test_ef_cotangents_give_the_gradient_outer_product(likelihood, positions):
    lik = get_likelihood(likelihood)
    f, y = outputs(likelihood, positions)
    c = lik.ef_cotangents(f, y).reshape(f.shape[0], 1, -1)
    r = Z.output_grads(f, y, likelihood)
    assert rel(c[:, 0, :, None] * c[:, 0, None, :], r[:, :, None] * r[:, None, :]) < TOL


@pytest.mark.parametrize("likelihood, positions", CASES, ids=IDS)
def test_mc_cotangents_unbiased_for_the_output_hessian(likelihood, positions):
    """With many samples ``sum_s c_s c_sᵀ`` approaches Λ_n entry by entry (unbiased: every
    entry within 6 standard errors, ``sqrt(2/S)`` bounds the variance of an entry of
    mean-zero unit-variance products), per position, zero at ignored positions."""
    lik = get_likelihood(likelihood)
    f, y = outputs(likelihood, positions)
    S = 20000
    c = lik.mc_cotangents(f, S, torch.Generator().manual_seed(0), y)
    assert c.shape == (f.shape[0], S, *f.shape[1:])
    flat = c.reshape(f.shape[0], S, -1)
    M = torch.einsum("bsk,bsl->bkl", flat, flat)
    assert (M - Z.output_hessians(f, y, likelihood)).abs().max() < 6 * (2 / S) ** 0.5
    if positions and likelihood == "classification":
        assert torch.all(c.transpose(0, 1)[:, y == IGNORE] == 0)
    # the draws are pseudo-target gradients: classification p - e_ỹ, regression f - ỹ
    g = lik.sample_grad_outputs(f, 4, torch.Generator().manual_seed(1))
    if likelihood == "classification":
        p = torch.softmax(f, -1).unsqueeze(1)
        onehot = p - g
        assert torch.all((onehot == 0) | (onehot - 1).abs().lt(1e-12))
        assert torch.allclose(onehot.sum(-1), torch.ones(()).double())
    else:
        assert g.shape == (f.shape[0], 4, *f.shape[1:])


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_mc_draws_reproducible_from_the_generator_and_global_rng_untouched(likelihood):
    lik = get_likelihood(likelihood)
    f, y = outputs(likelihood, False)
    state = torch.get_rng_state()
    a = lik.mc_cotangents(f, 3, torch.Generator().manual_seed(7), y)
    b = lik.mc_cotangents(f, 3, torch.Generator().manual_seed(7), y)
    c = lik.mc_cotangents(f, 3, torch.Generator().manual_seed(8), y)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b) and not torch.equal(a, c)
    # one generator per data point: row n is what its own generator draws alone
    gens = [torch.Generator().manual_seed(10 + n) for n in range(f.shape[0])]
    rows = lik.mc_cotangents(f, 3, gens, y)
    for n in range(f.shape[0]):
        alone = lik.mc_cotangents(f[n : n + 1], 3, torch.Generator().manual_seed(10 + n))
        assert torch.equal(rows[n : n + 1], alone)
    with pytest.raises(ValueError, match="generators for a batch"):
        lik.mc_cotangents(f, 3, gens[:2], y)


def test_mc_draws_of_the_reference_sampler_are_curvlibs():
    """The zoo reference's inverse-CDF sampler draws the same targets from the same
    generator state: MC comparisons across backends and references are exact."""
    for likelihood in ("classification", "regression"):
        lik = get_likelihood(likelihood)
        f, y = outputs(likelihood, False)
        c = lik.mc_cotangents(f, 3, torch.Generator().manual_seed(4), y) * 3**0.5
        t = Z.pseudo_targets(f, y, likelihood, 3, torch.Generator().manual_seed(4))
        g = torch.stack(
            [Z.output_grads(f[n].expand(3, -1), t[n], likelihood) for n in range(f.shape[0])]
        )
        assert rel(c, g) < TOL


def test_mask_only_where_positions_are_ignored():
    lik = Classification()
    f, y = outputs("classification", True)
    m = lik.mask(f, y)
    assert m.dtype == torch.bool and torch.equal(m, y != IGNORE)
    assert lik.mask(f, torch.zeros_like(y)) is None  # nothing ignored
    f2, y2 = outputs("classification", False)
    assert lik.mask(f2, y2) is None  # without positions -100 is not a valid class
    assert Regression().mask(f, torch.randn_like(f)) is None


def test_names_instances_and_equality():
    for name, cls in (("classification", Classification), ("regression", Regression)):
        lik = get_likelihood(name)
        assert isinstance(lik, cls) and lik == name and lik.name == name
        assert get_likelihood(lik) is lik
        assert lik == cls() and hash(lik) == hash(cls())
        assert (
            rel(lik.loss(*outputs(name, False)), lik.factor * lik.lossfunc(*outputs(name, False)))
            < TOL
        )
    assert Classification() != Regression()
