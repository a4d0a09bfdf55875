"""What is specific to ASDL (its numbers are the oracle's, ``tests/test_oracle.py``): the
contract with ASDL's operations and config fields, what ASDL's hooks cannot handle (refused
before any work, naming the backends that can), the Hessian eigenpairs, attributes and
hooks left as they were.

Skipped when ASDL (PyPI ``asdfghjkl``, import name ``asdl``) is not installed.
"""

from __future__ import annotations

import dataclasses

import pytest
import reference as ref
import torch
from cases import CASES
from torch import nn

asdl = pytest.importorskip("asdl", reason="ASDL (pip install asdfghjkl==0.1a4) is not installed")

from curvlib import AutogradGGN, CapabilityError, UnsupportedModuleError  # noqa: E402
from curvlib.backends.asdl import AsdlEF, AsdlGGN  # noqa: E402
from curvlib.backends.asdl_hessian import AsdlHessian  # noqa: E402
from curvlib.capabilities import ASDL_MODULES  # noqa: E402

TOL = 1e-10
CASE = {c.name: c for c in CASES}


def test_asdl_contract():
    """What this backend relies on in ASDL 0.1a4 (and 0.1a5)."""
    from asdl.fisher import FisherConfig
    from asdl.hessian import HessianConfig
    from asdl.operations import get_op_class

    for t in ASDL_MODULES:
        assert get_op_class(t.__new__(t)) is not None, t
    with pytest.warns(UserWarning, match="Failed to lookup"):
        assert get_op_class(nn.Conv1d(1, 1, 1)) is None  # silently skipped by ASDL
    fields = {f.name for f in dataclasses.fields(FisherConfig)}
    assert {"fisher_attr", "fvp_attr", "data_size", "n_mc_samples", "seed"} <= fields
    fields = {f.name for f in dataclasses.fields(HessianConfig)}
    assert {"hessian_attr", "tmp_hessian_attr", "hvp_attr", "tmp_hvp_attr"} <= fields


# -- what ASDL's hooks cannot handle ------------------------------------------------------
class Counter(nn.Module):
    """Counts forward passes (a module without parameters: ASDL ignores it)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


@pytest.mark.parametrize(
    "layer, x_shape, pattern",
    [
        (nn.Conv1d(2, 3, 3), (2, 6), r"'1' of type Conv1d"),
        (nn.Conv3d(2, 3, 2), (2, 3, 3, 3), r"'1' of type Conv3d"),
        (nn.Conv2d(2, 4, 3, groups=2), (2, 5, 5), r"'1' of type Conv2d \(groups=2"),
        (nn.Conv2d(2, 3, 3, dilation=2), (2, 6, 6), r"'1' of type Conv2d \(dilation"),
        (nn.Conv2d(2, 3, 3, padding="same"), (2, 5, 5), r"'1' of type Conv2d \(padding='same'"),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 5, 5), r"padding_mode"),
        (nn.ConvTranspose2d(2, 3, 2), (2, 4, 4), r"'1' of type ConvTranspose2d"),
    ],
)
def test_unsupported_layer_refused_before_any_forward(layer, x_shape, pattern):
    model = nn.Sequential(Counter(), layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(3, *x_shape, dtype=torch.float64)
    model(x)  # materialize the lazy layer
    model[0].calls = 0
    y = torch.tensor([0, 1, 1])
    for cls in (AsdlGGN, AsdlEF):
        curv = cls(model, "classification")
        for method, args in (("full", (x, y)), ("diag", (x, y)), ("jacobians", (x,))):
            with pytest.raises(UnsupportedModuleError, match=pattern) as info:
                getattr(curv, method)(*args)
            assert "backends that support it: ['autograd'" in str(info.value)
    assert model[0].calls == 0
    # freezing the layer makes it fine
    model[1].requires_grad_(False)
    _, H = AsdlGGN(model, "classification").full(x, y)
    assert ref.rel_err(H, ref.ggn(model, x, y, "classification")) < TOL


def test_user_full_backward_hook_refused_and_stale_flag_kept():
    model, x, y, _ = CASE["mlp_cls"].make()
    handle = model[2].register_full_backward_hook(lambda *a: None)
    with pytest.raises(UnsupportedModuleError, match="full backward hooks"):
        AsdlGGN(model, "classification").diag(x, y)
    handle.remove()
    assert model[2]._is_full_backward_hook is True  # stale, as BackPACK leaves it
    _, h = AsdlGGN(model, "classification").diag(x, y)
    assert ref.rel_err(h, ref.ggn(model, x, y, "classification").diagonal()) < TOL
    assert model[2]._is_full_backward_hook is True


def test_reduce_refusal_names_the_backends_that_compute_it():
    for name, where in (("cnn_cls", "convolutions"), ("seq_cls", "sequences")):
        model, x, y, _ = CASE[name].make()
        before = ref.model_state(model)
        with pytest.raises(CapabilityError, match=rf"{where}.*\['autograd"):
            AsdlGGN(model, "classification", kfac_approx="reduce").kron(x, y)
        ref.assert_same_state(before, ref.model_state(model))


def test_asdl_result_attributes_do_not_clobber_the_users():
    """ASDL's default result name is ``fisher`` on modules: a user attribute of that name
    survives every call."""
    model, x, y, _ = CASE["mlp_cls"].make()
    model[0].fisher = "user attribute"
    model[2].hessian = "user attribute"
    for cls in (AsdlGGN, AsdlEF, AsdlHessian):
        curv = cls(model, "classification")
        curv.diag(x, y)
        curv.full(x, y)
    AsdlGGN(model, "classification").kron(x, y)
    assert model[0].fisher == "user attribute" and model[2].hessian == "user attribute"
    AutogradGGN(model, "classification").diag(x, y)  # torch.func works afterwards


# -- Hessian eigenpairs ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp_cls", "mlp_reg", "lastlayer_cls", "subnet_cls"])
def test_eig_lowrank_matches_eigh(name):
    case = CASE[name]
    model, x, y, idx = case.make()
    curv = AsdlHessian(model, case.likelihood, last_layer=case.last_layer, subnetwork_indices=idx)
    loader = [(x[:2], y[:2]), (x[2:], y[2:])]
    H = ref.sub_full(ref.hessian(model, x, y, case.likelihood, case.last_layer), idx)
    evals, _ = torch.linalg.eigh(H)
    k = 3
    V, lam, loss = curv.eig_lowrank(loader, k=k)
    assert V.shape == (H.shape[0], k) and lam.shape == (k,)
    assert ref.rel_err(lam, evals.flip(0)[:k]) < 1e-8
    assert ref.rel_err(H @ V, V * lam) < 1e-7  # eigenvectors
    assert ref.rel_err(V.T @ V, torch.eye(k, dtype=V.dtype)) < 1e-10
    assert ref.rel_err(loss, ref.loss(model, x, y, case.likelihood)) < TOL
    _, lam2, _ = curv.eig_lowrank(loader, k=k, generator=torch.Generator().manual_seed(1))
    assert ref.rel_err(lam2, lam) < 1e-8
    n = H.shape[0]
    if n <= 30:  # k = P: dense eigendecomposition from P Hessian-vector products
        _, lam, _ = curv.eig_lowrank(loader, k=n)
        assert ref.rel_err(lam, evals.flip(0)) < 1e-8
        _, lam_pos, _ = curv.eig_lowrank(loader, k=n, positive_only=True)
        assert torch.equal(lam_pos, lam[lam > 1e-6])


def test_eig_lowrank_bad_k():
    model, x, y, _ = CASE["mlp_cls"].make()
    with pytest.raises(ValueError, match="k must be"):
        AsdlHessian(model, "classification").eig_lowrank([(x, y)], k=0)
