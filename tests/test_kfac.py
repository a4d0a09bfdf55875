"""K-FAC: factor capture (curvlib.kfac) and ``kron`` of the autograd backend.

References are computed from the definitions (DESIGN §4) with per-sample, per-location
loops over Jacobians of the model output w.r.t. the layer output, and torch's own
``F.unfold`` / convolution for the input patches.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from cases import CASES, SeqModel
from torch import nn
from torch.nn import functional as F

from curvlib import (
    AutogradEF,
    AutogradGGN,
    backend_class,
)
from curvlib.backends import registry
from curvlib.errors import InputError
from curvlib.kfac import unfold
from curvlib.kfac.capture import capture
from curvlib.kfac.rules import LinearRule


def unfold_input(x, conv):
    return unfold(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.padding_mode)


TOL = 1e-10


def factors(K):
    return [[t.clone() for t in entry] for entry in K.kfacs]


# -- unfolding -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1), (2, 2, 9)),
        (nn.Conv1d(2, 3, 3, padding="same", dilation=2), (2, 2, 8)),
        (nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (2, 2, 7, 6)),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 5, 5)),
        (nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0)), (2, 2, 4, 5, 4)),
        (nn.Conv3d(1, 2, 2, padding="same", dilation=2), (2, 1, 4, 4, 4)),
    ],
)
def test_unfold_reproduces_convolution(conv, shape):
    conv = conv.double()
    x = torch.randn(*shape, dtype=torch.float64)
    a = unfold_input(x, conv)  # (B, L, r)
    z = a @ conv.weight.flatten(1).T + conv.bias  # (B, L, out)
    expected = conv(x).flatten(2).transpose(1, 2)
    assert torch.allclose(z, expected, atol=1e-12)


def test_unfold_matches_torch_unfold_2d():
    conv = nn.Conv2d(3, 2, 3, stride=2, padding=1).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    expected = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2)
    assert torch.equal(unfold_input(x, conv), expected)


# -- definitions -------------------------------------------------------------------------------
def split_model(case_name):
    """(model, [(layer, rest-of-network after it)]) for the brute-force factor reference."""
    torch.manual_seed(0)
    if case_name == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3))
        x = torch.randn(3, 2, 6, 6)
        pieces = [(model[0], model[1:]), (model[3], nn.Identity())]
    else:
        model = SeqModel(4, 5, 3)
        x = torch.randn(3, 6, 4)
        rest = lambda z: model.head(model.act(z).sum(1))  # noqa: E731
        pieces = [(model.proj, rest), (model.head, nn.Identity())]
    model = model.double()
    return model, x.double(), pieces


def brute_factors(model, x, y, likelihood, layer, rest, N, approx):
    """G and A of one layer from the definitions, by loops over samples and locations."""
    inputs, outputs = [], []

    def hook(module, args, out):
        inputs.append(args[0])
        outputs.append(out)

    h = layer.register_forward_hook(hook)
    f = model(x).detach()
    h.remove()
    a_in, z = inputs[0].detach(), outputs[0].detach()
    Lam = ref.output_hessians(f, y, likelihood)
    if isinstance(layer, nn.Conv2d):
        a = F.unfold(a_in, layer.kernel_size).transpose(1, 2)  # (B, L, r)
    else:
        a = a_in.reshape(a_in.shape[0], -1, a_in.shape[-1])
    L = a.shape[1]
    G = 0
    for n in range(x.shape[0]):
        Jz = torch.autograd.functional.jacobian(lambda zn: rest(zn.unsqueeze(0))[0], z[n])
        if isinstance(layer, nn.Conv2d):  # (C, out, H, W) -> (C, L, out)
            Jz = Jz.flatten(2).transpose(1, 2)
        else:
            Jz = Jz.reshape(Jz.shape[0], -1, Jz.shape[-1])
        if approx == "expand":
            G = G + sum(Jz[:, l].T @ Lam[n] @ Jz[:, l] for l in range(L))
        else:
            Jh = Jz.sum(1)
            G = G + Jh.T @ Lam[n] @ Jh
    if approx == "expand":
        A = sum(a[n, l, None].T @ a[n, l, None] for n in range(a.shape[0]) for l in range(L))
        A = A / (N * L)
    else:
        abar = a.mean(1)
        A = abar.T @ abar / N
    return G, A


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("which", ["cnn", "seq"])
def test_factors_match_definition(which, approx):
    model, x, pieces = split_model(which)
    y = torch.randint(0, 3, (x.shape[0],))
    curv = AutogradGGN(model, "classification", kfac_approx=approx)
    _, K = curv.kron(x, y, N=7)
    kf = K.kfacs
    # entries: layer0.weight, layer0.bias, layer1.weight, layer1.bias
    for i, (layer, rest) in enumerate(pieces):
        G, A = brute_factors(model, x, y, "classification", layer, rest, 7, approx)
        assert ref.rel_err(kf[2 * i][0], G) < TOL
        assert ref.rel_err(kf[2 * i][1], A) < TOL
        assert ref.rel_err(kf[2 * i + 1][0], G) < TOL
        assert len(kf[2 * i + 1]) == 1


@pytest.mark.parametrize("backend", sorted(registry()))
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_one_linear_one_datum_is_exact(likelihood, backend):
    """K-FAC of one Linear layer on one data point is the exact GGN / EF block, in every
    backend (DESIGN §4)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    y = torch.tensor([2]) if likelihood == "classification" else torch.randn(1, 3).double()
    for curvature, brute in (("ggn", ref.ggn), ("ef", ref.ef)):
        _, K = backend_class(backend, curvature)(model, likelihood).kron(x, y)
        H = brute(model, x, y, likelihood)
        (G, A), (Gb,) = K.kfacs
        assert ref.rel_err(torch.kron(G, A), H[:12, :12]) < TOL
        assert ref.rel_err(Gb, H[12:, 12:]) < TOL


@pytest.mark.parametrize("cls", [AutogradGGN, AutogradEF])
@pytest.mark.parametrize("case", [c for c in CASES if c.kron], ids=lambda c: c.name)
def test_partition_sums_to_whole(case, cls):
    model, x, y, _ = case.make()
    curv = cls(model, case.likelihood, last_layer=case.last_layer)
    N = x.shape[0]
    loss_all, whole = curv.kron(x, y, N=N)
    parts = [slice(0, 2), slice(2, 3), slice(3, N)]
    total = [[torch.zeros_like(t) for t in e] for e in whole.kfacs]
    loss = 0
    for s in parts:
        l_s, K = curv.kron(x[s], y[s], N=N)
        loss = loss + l_s
        total = [
            [a + b for a, b in zip(e1, e2, strict=True)]
            for e1, e2 in zip(total, K.kfacs, strict=True)
        ]
    for e1, e2 in zip(total, whole.kfacs, strict=True):
        for a, b in zip(e1, e2, strict=True):
            assert ref.rel_err(a, b) < TOL
    assert ref.rel_err(loss, loss_all) < TOL
    assert len(whole.kfacs) == len(curv.params)


def test_mc_kron_reproducible_and_unbiased():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    y = torch.tensor([1])
    curv = AutogradGGN(model, "classification", stochastic=True, num_samples=20000)
    _, K1 = curv.kron(x, y, generator=torch.Generator().manual_seed(3))
    _, K2 = curv.kron(x, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(K1.kfacs[0][0], K2.kfacs[0][0])
    H = ref.ggn(model, x, y, "classification")
    assert ref.rel_err(torch.kron(*K1.kfacs[0]), H[:12, :12]) < 0.03


def test_module_called_twice_is_weight_sharing():
    """A module called twice: every call's locations enter K-FAC (expand); one datum
    and a module called once stays exact elsewhere."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))

    model = Twice().double()
    x, y = torch.randn(1, 3).double(), torch.tensor([1])
    _, K = AutogradGGN(model, "classification").kron(x, y)
    H = ref.ggn(model, x, y, "classification")
    assert ref.rel_err(torch.kron(*K.kfacs[2]), H[12:18, 12:18]) < TOL  # head: exact
    assert not model.lin._forward_hooks


def test_hooks_removed_when_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("boom")

    model = Boom()
    before = ref.model_state(model)
    with pytest.raises(InputError, match="boom") as info:
        AutogradGGN(model, "classification").kron(torch.randn(2, 3), torch.tensor([0, 1]))
    assert isinstance(info.value.__cause__, RuntimeError)
    ref.assert_same_state(before, ref.model_state(model))
    with pytest.raises(RuntimeError, match="boom"), capture([(model.lin, LinearRule())]):
        model(torch.randn(2, 3))
    assert not model.lin._forward_hooks
