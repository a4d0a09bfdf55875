"""Per-layer diagonals and blocks against the dense ``full`` on every shared case."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from cases import CASE_IDS, CASES

from curvlib import AutogradGGN, AutogradHessian, InputError
from curvlib.layers import layer_indices, per_layer_blocks, per_layer_diagonal

TOL = 1e-10


@pytest.mark.parametrize("cls", [AutogradGGN, AutogradHessian])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_per_layer_matches_full(case, cls):
    model, x, y, subnet = case.make()
    curv = cls(model, case.likelihood, last_layer=case.last_layer, subnetwork_indices=subnet)
    if subnet is not None:
        with pytest.raises(InputError, match="subnetwork_indices"):
            layer_indices(curv)
        return
    H = curv.full(x, y)[1]
    idx = layer_indices(curv)
    # every selected parameter belongs to exactly one layer
    assert torch.equal(torch.cat(list(idx.values())).sort().values, torch.arange(H.shape[0]))
    if case.last_layer:
        assert list(idx) == ["last_layer"]
    blocks = per_layer_blocks(curv, x, y)
    diags = per_layer_diagonal(curv, x, y)
    diags_graph = per_layer_diagonal(curv, x, y, create_graph=True)
    for k, i in idx.items():
        assert ref.rel_err(blocks[k], H[i][:, i]) < TOL
        assert ref.rel_err(diags[k], H.diagonal()[i]) < TOL
        assert ref.rel_err(diags_graph[k], H.diagonal()[i]) < TOL


def test_layer_types_filter():
    model, x, y, _ = CASES[2].make()  # Conv2d, Conv2d, Linear
    curv = AutogradGGN(model, "classification")
    assert list(layer_indices(curv, [torch.nn.Conv2d])) == ["0", "2"]
    assert list(per_layer_diagonal(curv, x, y, [torch.nn.Linear])) == ["4"]
    assert per_layer_diagonal(curv, x, y, [torch.nn.LSTM]) == {}
