"""``curvlib.kfac.compute``: K-FAC results add up over batches that partition the data, and
the MC K-FAC is reproducible and unbiased (the numbers themselves are the oracle's,
``tests/test_oracle.py``)."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from cases import CASES
from torch import nn

from curvlib import AutogradEF, AutogradGGN

TOL = 1e-10


@pytest.mark.parametrize("cls", [AutogradGGN, AutogradEF])
@pytest.mark.parametrize("name", ["cnn_cls", "seq_cls", "lastlayer_cls"])
def test_partition_sums_to_whole(name, cls):
    """``A`` carries ``1/N`` of the whole data set: summing batches gives the whole."""
    case = next(c for c in CASES if c.name == name)
    model, x, y, _ = case.make()
    curv = cls(model, case.likelihood, last_layer=case.last_layer)
    N = x.shape[0]
    loss_all, whole = curv.kron(x, y, N=N)
    total, loss = None, 0
    for s in (slice(0, 2), slice(2, 3), slice(3, N)):
        l_s, K = curv.kron(x[s], y[s], N=N)
        loss = loss + l_s
        total = K if total is None else total + K
    for e1, e2 in zip(total.kfacs, whole.kfacs, strict=True):
        for a, b in zip(e1, e2, strict=True):
            assert ref.rel_err(a, b) < TOL
    assert ref.rel_err(loss, loss_all) < TOL
    assert len(whole.kfacs) == len(curv.params)


def test_mc_kron_reproducible_and_unbiased():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Linear(3, 4).double()
        x = torch.randn(1, 3, dtype=torch.float64)
    y = torch.tensor([1])
    curv = AutogradGGN(model, "classification", stochastic=True, num_samples=20000)
    _, K1 = curv.kron(x, y, generator=torch.Generator().manual_seed(3))
    _, K2 = curv.kron(x, y, generator=torch.Generator().manual_seed(3))
    _, K3 = curv.kron(x, y, generator=torch.Generator().manual_seed(4))
    assert torch.equal(K1.kfacs[0][0], K2.kfacs[0][0])
    assert not torch.equal(K1.kfacs[0][0], K3.kfacs[0][0])
    H = ref.ggn(model, x, y, "classification")
    assert 1e-6 < ref.rel_err(torch.kron(*K1.kfacs[0]), H[:12, :12]) < 0.03


def _streaming_cases() -> list[str]:
    import zoo

    # every fast model the library takes as it is (a case with ``wrap`` is a raw model
    # that curvlib refuses by design: its reference calls a wrapper)
    return [c.name for c in zoo.ZOO if not c.slow and c.available() and c.wrap is None]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", _streaming_cases())
def test_kron_and_diag_streamed_one_column_at_a_time_are_the_whole(name, approx, monkeypatch):
    """The exact K-FAC computed one cotangent column at a time (every factor but the one
    divided by N summed over the chunks) is the K-FAC of all columns at once, and so is the
    diagonal."""
    import zoo

    import curvlib.kfac.capture as capture

    case = zoo.get(name)
    model, x, y = case.make()
    curv = AutogradGGN(model, case.likelihood)
    _, whole = curv.kron(x, y, kfac_approx=approx)
    _, d_whole = curv.diag(x, y)
    monkeypatch.setattr(capture, "STREAM_BYTES", 1)
    _, streamed = curv.kron(x, y, kfac_approx=approx)
    _, d_streamed = curv.diag(x, y)
    for f1, f2 in zip(whole.kfacs, streamed.kfacs, strict=True):
        for a, b in zip(f1, f2, strict=True):
            assert ref.rel_err(b, a) < TOL
    assert ref.rel_err(d_streamed, d_whole) < TOL
