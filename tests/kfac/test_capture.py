"""``curvlib.kfac.capture``: the recording hooks are removed, also when the forward raises."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from torch import nn

from curvlib import AutogradGGN
from curvlib.errors import InputError
from curvlib.kfac.capture import capture
from curvlib.kfac.rules import LinearRule


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


class _SharedConv(nn.Module):
    """An unbatched convolution of a tensor shared by every data point (``(C, H, W)``)."""

    def __init__(self, C: int):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, dtype=torch.float64)
        self.register_buffer("pos", torch.randn(C, 5, 5, dtype=torch.float64))
        self.head = nn.Linear(4, 3, dtype=torch.float64)

    def forward(self, x):
        return self.head(x + self.conv(self.pos).flatten()[:4])


@pytest.mark.parametrize("C, B", [(1, 1), (3, 3), (2, 4)])
def test_unbatched_conv_with_as_many_channels_as_data_points(C, B):
    """The channels of an unbatched input never count as its batch: the diagonal is the
    dense reference's, also when the channel count equals the batch size."""
    torch.manual_seed(0)
    model = _SharedConv(C)
    x = torch.randn(B, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    _, h = AutogradGGN(model, "classification").diag(x, y)
    H = ref.ggn(model, x, y, "classification")
    assert ref.rel_err(h, H.diagonal()) < 1e-10
