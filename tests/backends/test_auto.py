"""``backend="auto"``: the backend it picks, and passing on what the preferred one refuses."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from cases import CASES

import curvlib
from curvlib import make_curvature

pytest.importorskip("backpack")


def test_auto_picks_backpack_for_the_hessian_diagonal():
    model, x, y, _ = CASES[0].make()
    auto = make_curvature(model, "classification", "auto:hessian")
    assert auto.preferences()["diag"] == ("backpack", "autograd")
    _, h = auto.diag(x, y)
    _, h_bp = curvlib.backend_class("backpack", "hessian")(model, "classification").diag(x, y)
    assert torch.equal(h, h_bp)
    assert curvlib.available()["auto"]["hessian"]["picks"]["diag"] == ["backpack", "autograd"]


def test_auto_passes_on_what_backpack_refuses():
    case = next(c for c in CASES if c.name == "layernorm_reg")
    model, x, y, _ = case.make()
    assert not curvlib.supports(model, "backpack", "hessian", "diag").supported
    before = ref.model_state(model)
    _, h = make_curvature(model, "regression", "auto:hessian").diag(x, y)
    _, h_ag = curvlib.backend_class("autograd", "hessian")(model, "regression").diag(x, y)
    assert torch.equal(h, h_ag)
    ref.assert_same_state(before, ref.model_state(model))
