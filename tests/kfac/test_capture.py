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
