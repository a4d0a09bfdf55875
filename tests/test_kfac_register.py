"""The worked example of docs/kfac.md: a custom layer gets K-FAC from one rule."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from torch import nn

import curvlib
from curvlib.kfac import ExactBlockRule, LinearLikeRule, register_kfac_rule
from curvlib.kfac import rules as R

DT = torch.float64


class Dense(nn.Module):
    """A linear layer whose weight is stored (in, out)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out, dtype=DT) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class DenseRule(LinearLikeRule):
    layout = "AG"  # stored (r, o): the entry is [A, G]

    def patches(self, module, site):
        a = site.a
        return a.reshape(a.shape[0], -1, 1, a.shape[-1])

    def grads(self, module, site):
        g = site.g
        return g.reshape(g.shape[0], g.shape[1], -1, 1, g.shape[-1])


class Scale(nn.Module):
    """An elementwise scale: not linear in its input times a weight matrix."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class ScaleRule(ExactBlockRule):
    names = ("weight",)

    def products(self, module, sites, names):
        # per sample: sum over the positions of g * a (the weight's gradient)
        v = sum(
            (s.g * s.a).reshape(s.g.shape[0], s.g.shape[1], -1, s.g.shape[-1]).sum(2) for s in sites
        )
        return {"weight": v.transpose(0, 1)}


@pytest.fixture
def registered():
    register_kfac_rule(Dense, DenseRule())
    register_kfac_rule(Scale, ScaleRule())
    yield
    R._RULES.pop(Dense)
    R._RULES.pop(Scale)


def blocks_of(curv, H):
    out, o = [], 0
    for p in curv.params:
        out.append(H[o : o + p.numel(), o : o + p.numel()])
        o += p.numel()
    return torch.block_diag(*out)


@pytest.mark.parametrize("backend", ["autograd", "auto", "asdl"])
def test_a_registered_rule_is_exact_for_one_datum(registered, backend):
    torch.manual_seed(0)
    model = nn.Sequential(Dense(4, 6), nn.Tanh(), Scale(6), Dense(6, 3))
    x, y = torch.randn(1, 4, dtype=DT), torch.tensor([2])
    assert curvlib.supports(model, backend, "ef", "kron", x=x, y=y)
    curv = curvlib.backend_class(backend, "ef")(model, "classification")
    _, K = curv.kron(x, y)
    H = ref.ef(model, x, y, "classification")
    assert ref.rel_err(K.to_matrix(), blocks_of(curv, H)) < 1e-10
    assert K.kfacs[0][0].shape == (4, 4) and K.kfacs[0][1].shape == (6, 6)  # [A, G]
    # the autograd backend's diagonal comes from the same rules (ASDL's own refuses Dense)
    if backend != "asdl":
        assert ref.rel_err(curv.diag(x, y)[1], H.diagonal()) < 1e-10


def test_without_the_rule_the_parameters_get_exact_blocks():
    model = nn.Sequential(Dense(4, 6), nn.Tanh(), Dense(6, 3))
    report = curvlib.supports(model, "autograd", "ef", "kron")
    assert report.supported and "exact block" in str(report)


def test_register_kfac_rule_checks_its_arguments(registered):
    with pytest.raises(ValueError, match="overwrite=True"):
        register_kfac_rule(Dense, DenseRule())
    with pytest.raises(TypeError, match="subclass of torch.nn.Module"):
        register_kfac_rule(int, DenseRule())
    with pytest.raises(TypeError, match="KFACRule"):
        register_kfac_rule(Dense, object())
