"""The ASDL backend against brute force and the autograd backend on the shared cases.

Skipped when ASDL (PyPI ``asdfghjkl``, import name ``asdl``) is not installed.
"""

from __future__ import annotations

import dataclasses

import pytest
import reference as ref
import torch
from cases import CASE_IDS, CASES, LastLayerModel
from torch import nn

from curvlib import (
    AutogradEF,
    AutogradGGN,
    AutogradHessian,
    CapabilityError,
    SharedParameterError,
    UnsupportedModuleError,
    backend_class,
)

asdl = pytest.importorskip("asdl", reason="ASDL (pip install asdfghjkl==0.1a4) is not installed")

from curvlib.backends.asdl import AsdlEF, AsdlGGN, AsdlHessian  # noqa: E402
from curvlib.capabilities import ASDL_MODULES  # noqa: E402

TOL = 1e-8  # against brute force
XTOL = 1e-7  # against the autograd backend (DESIGN: same numbers to 1e-7 relative)
ASDL = {"ggn": AsdlGGN, "ef": AsdlEF, "hessian": AsdlHessian}
AUTOGRAD = {"ggn": AutogradGGN, "ef": AutogradEF, "hessian": AutogradHessian}
BRUTE = {"ggn": ref.ggn, "ef": ref.ef, "hessian": ref.hessian}
# shared cases ASDL's hooks cannot handle, and the error (the Hessian needs no hooks); kron
# computes the layers ASDL lacks (Conv1d) by curvlib's rule table
REJECTED = {"conv1d_reg": UnsupportedModuleError, "tied_cls": SharedParameterError}


def rejected(case, curvature="ggn", structure="full"):
    if curvature == "hessian" or (structure == "kron" and case.name == "conv1d_reg"):
        return None
    return REJECTED.get(case.name)


def kron_err(K1, K2):
    assert len(K1.kfacs) == len(K2.kfacs)
    errs = []
    for e1, e2 in zip(K1.kfacs, K2.kfacs, strict=True):
        assert len(e1) == len(e2)
        errs += [ref.rel_err(a, b) for a, b in zip(e1, e2, strict=True)]
    return max(errs)


# -- shared cases: brute force and autograd ----------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_jacobians_and_gradients(case):
    curv, model, x, y, idx = ref.setup(case, AsdlEF)
    if rejected(case):
        with pytest.raises(rejected(case), match="autograd"):
            curv.jacobians(x)
        with pytest.raises(rejected(case), match="autograd"):
            curv.gradients(x, y)
        return
    Gs, _ = ref.assert_jacobians_and_gradients(curv, model, x, y, case, idx, TOL)
    auto = AutogradEF(model, case.likelihood, last_layer=case.last_layer, subnetwork_indices=idx)
    assert ref.rel_err(Gs, auto.gradients(x, y)[0]) < XTOL


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("curvature", ["ggn", "ef", "hessian"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dense_and_diag(case, curvature, structure):
    curv, model, x, y, idx = ref.setup(case, ASDL[curvature])
    if rejected(case, curvature):
        before = ref.model_state(model)
        with pytest.raises(rejected(case, curvature), match="autograd"):
            getattr(curv, structure)(x, y)
        ref.assert_same_state(before, ref.model_state(model))
        return
    loss, H = getattr(curv, structure)(x, y)
    H_ref = ref.sub_full(BRUTE[curvature](model, x, y, case.likelihood, case.last_layer), idx)
    expected = H_ref if structure == "full" else H_ref.diagonal()
    assert H.shape == expected.shape
    assert ref.rel_err(H, expected) < TOL
    assert ref.rel_err(loss, ref.loss(model, x, y, case.likelihood)) < TOL
    auto = AUTOGRAD[curvature](
        model, case.likelihood, last_layer=case.last_layer, subnetwork_indices=idx
    )
    _, H_auto = getattr(auto, structure)(x, y)
    assert ref.rel_err(H, H_auto) < XTOL


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("case", [c for c in CASES if c.kron], ids=lambda c: c.name)
def test_kron_matches_autograd_expand(case, curvature):
    curv, model, x, y, _ = ref.setup(case, ASDL[curvature])
    if rejected(case, structure="kron"):
        with pytest.raises(rejected(case, structure="kron"), match="autograd"):
            curv.kron(x, y, N=7)
        return
    loss, K = curv.kron(x, y, N=7)
    auto = AUTOGRAD[curvature](model, case.likelihood, last_layer=case.last_layer)
    loss_auto, K_auto = auto.kron(x, y, N=7)
    assert kron_err(K, K_auto) < XTOL
    assert ref.rel_err(loss, loss_auto) < XTOL
    assert len(K.kfacs) == len(curv.params)


def test_kron_partition_sums_to_whole():
    case = next(c for c in CASES if c.name == "cnn_cls")
    curv, model, x, y, _ = ref.setup(case, AsdlGGN)
    N = x.shape[0]
    _, whole = curv.kron(x, y, N=N)
    total = curv.kron(x[:1], y[:1], N=N)[1] + curv.kron(x[1:], y[1:], N=N)[1]
    assert kron_err(total, whole) < TOL


def test_kron_reduce():
    # without weight sharing reduce == expand, so it is computed
    case = CASES[0]
    curv, model, x, y, _ = ref.setup(case, AsdlGGN, kfac_approx="reduce")
    _, K = curv.kron(x, y)
    _, K_auto = AutogradGGN(model, case.likelihood, kfac_approx="reduce").kron(x, y)
    assert kron_err(K, K_auto) < XTOL
    # convolutions (static check) and layers on sequences (found in the forward pass)
    for name, where in (("cnn_cls", "convolutions"), ("seq_cls", "sequences")):
        case = next(c for c in CASES if c.name == name)
        curv, model, x, y, _ = ref.setup(case, AsdlGGN, kfac_approx="reduce")
        before = ref.model_state(model)
        with pytest.raises(CapabilityError, match=rf"{where}.*\['autograd"):
            curv.kron(x, y)
        ref.assert_same_state(before, ref.model_state(model))


# -- Monte-Carlo Fisher ------------------------------------------------------------------------
def test_mc_reproducible_consistent_and_rng_untouched():
    curv, model, x, y, _ = ref.setup(CASES[0], AsdlGGN, stochastic=True, num_samples=3)
    state = torch.get_rng_state()
    _, a = curv.full(x, y, generator=torch.Generator().manual_seed(7))
    _, b = curv.full(x, y, generator=torch.Generator().manual_seed(7))
    _, c = curv.full(x, y, generator=torch.Generator().manual_seed(8))
    _, d = curv.diag(x, y, generator=torch.Generator().manual_seed(7))
    _, K = curv.kron(x, y, generator=torch.Generator().manual_seed(7))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ref.rel_err(d, a.diagonal()) < TOL  # the same samples, read as a diagonal
    # the bias block of the kron is exactly the full MC Fisher's bias block
    assert ref.rel_err(K.kfacs[-1][0], a[-4:, -4:]) < TOL
    # generator=None draws from (and advances) the global RNG: fresh samples each call
    _, e1 = curv.diag(x, y)
    _, e2 = curv.diag(x, y)
    assert not torch.equal(e1, e2)


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=CASE_IDS[:2])
def test_mc_converges_to_ggn(case):
    curv, model, x, y, _ = ref.setup(case, AsdlGGN, stochastic=True, num_samples=400)
    _, h = curv.diag(x, y, generator=torch.Generator().manual_seed(0))
    h_ref = ref.ggn(model, x, y, case.likelihood).diagonal()
    assert 1e-6 < ref.rel_err(h, h_ref) < 0.15  # sampled, and scaled right (ASDL: 1/S^2)


def test_fisher_registry_class_is_mc():
    cls = backend_class("asdl", "fisher")
    assert issubclass(cls, AsdlGGN)
    model = nn.Linear(2, 2).double()
    assert cls(model, "classification").stochastic


# -- Hessian eigenpairs ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    [CASES[0], CASES[1], *[c for c in CASES if c.subnetwork or c.last_layer]],
    ids=lambda c: c.name,
)
def test_eig_lowrank_matches_eigh(case):
    curv, model, x, y, idx = ref.setup(case, AsdlHessian)
    loader = [(x[:2], y[:2]), (x[2:], y[2:])]
    H = ref.sub_full(ref.hessian(model, x, y, case.likelihood, case.last_layer), idx)
    evals, evecs = torch.linalg.eigh(H)
    k = 3
    V, lam, loss = curv.eig_lowrank(loader, k=k)
    assert V.shape == (H.shape[0], k) and lam.shape == (k,)
    assert ref.rel_err(lam, evals.flip(0)[:k]) < TOL
    assert ref.rel_err(H @ V, V * lam) < 1e-7  # eigenvectors
    assert ref.rel_err(V.T @ V, torch.eye(k, dtype=V.dtype)) < 1e-10
    assert ref.rel_err(loss, ref.loss(model, x, y, case.likelihood)) < TOL
    V2, lam2, _ = curv.eig_lowrank(loader, k=k, generator=torch.Generator().manual_seed(1))
    assert ref.rel_err(lam2, lam) < TOL
    # k = P: dense eigendecomposition from P Hessian-vector products
    n = H.shape[0]
    if n > 30:
        return
    V, lam, _ = curv.eig_lowrank(loader, k=n)
    assert ref.rel_err(lam, evals.flip(0)) < TOL
    _, lam_pos, _ = curv.eig_lowrank(loader, k=n, positive_only=True)
    assert torch.equal(lam_pos, lam[lam > 1e-6])


def test_eig_lowrank_bad_k():
    curv, model, x, y, _ = ref.setup(CASES[0], AsdlHessian)
    with pytest.raises(ValueError, match="k must be"):
        curv.eig_lowrank([(x, y)], k=0)


# -- unsupported modules: clear errors before any work --------------------------------------
class Counter(nn.Module):
    """Counts forward passes (a module without parameters: ASDL ignores it)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def _image_model(layer):
    return nn.Sequential(Counter(), layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))


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
def test_unsupported_module_raises_before_work(layer, x_shape, pattern):
    model = _image_model(layer).double()
    x = torch.randn(3, *x_shape, dtype=torch.float64)
    model(x)  # materialize the lazy layer
    model[0].calls = 0
    y = torch.tensor([0, 1, 1])
    before = ref.model_state(model)
    for cls in (AsdlGGN, AsdlEF):
        curv = cls(model, "classification")
        for method, args in (
            ("full", (x, y)),
            ("diag", (x, y)),
            ("jacobians", (x,)),
            ("gradients", (x, y)),
        ):
            with pytest.raises(UnsupportedModuleError, match=pattern) as info:
                getattr(curv, method)(*args)
            assert "backends that support it: " in str(info.value)
            assert "['autograd'" in str(info.value)
    assert model[0].calls == 0
    ref.assert_same_state(before, ref.model_state(model))
    # K-FAC: the layer ASDL lacks comes from curvlib's rule table
    for cls, auto in ((AsdlGGN, AutogradGGN), (AsdlEF, AutogradEF)):
        _, K = cls(model, "classification").kron(x, y)
        _, K_auto = auto(model, "classification").kron(x, y)
        assert kron_err(K, K_auto) < XTOL
    # freezing the layer makes it fine
    for p in model[1].parameters():
        p.requires_grad_(False)
    _, H = AsdlGGN(model, "classification").full(x, y)
    _, H_auto = AutogradGGN(model, "classification").full(x, y)
    assert ref.rel_err(H, H_auto) < XTOL


def test_norm_layers_kron_by_rules_and_eval_batchnorm_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    model = model.double()
    model[1].running_mean.normal_()
    model[1].weight.data.uniform_(0.5, 1.5)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="training mode"):
        AsdlGGN(model, "regression").diag(x, y)
    model.eval()
    for curvature in ("ggn", "ef"):
        for s in ("full", "diag"):
            H = getattr(ASDL[curvature](model, "regression"), s)(x, y)[1]
            H_auto = getattr(AUTOGRAD[curvature](model, "regression"), s)(x, y)[1]
            assert ref.rel_err(H, H_auto) < XTOL
    # K-FAC: the BatchNorm's exact blocks from curvlib's rule table
    _, K = AsdlGGN(model, "regression").kron(x, y)
    _, K_auto = AutogradGGN(model, "regression").kron(x, y)
    assert kron_err(K, K_auto) < XTOL
    model[1].weight.data[0] = 0.0
    with pytest.raises(UnsupportedModuleError, match="zero entries"):
        AsdlGGN(model, "regression").diag(x, y)


def test_user_full_backward_hook_rejected_and_stale_flag_restored():
    case = CASES[0]
    model, x, y, _ = case.make()
    handle = model[2].register_full_backward_hook(lambda *a: None)
    with pytest.raises(UnsupportedModuleError, match="full backward hooks"):
        AsdlGGN(model, case.likelihood).diag(x, y)
    handle.remove()
    assert model[2]._is_full_backward_hook is True  # stale, as BackPACK leaves it
    _, h = AsdlGGN(model, case.likelihood).diag(x, y)
    assert ref.rel_err(h, AutogradGGN(model, case.likelihood).diag(x, y)[1]) < XTOL
    assert model[2]._is_full_backward_hook is True


def test_enable_backprop_not_supported():
    curv, model, x, y, _ = ref.setup(CASES[0], AsdlGGN)
    with pytest.raises(CapabilityError, match="autograd"):
        curv.jacobians(x, enable_backprop=True)


def test_frozen_parameters_kron_entries():
    case = next(c for c in CASES if c.name == "frozen_reg")
    curv, model, x, y, _ = ref.setup(case, AsdlGGN)
    _, K = curv.kron(x, y)
    assert [len(e) for e in K.kfacs] == [1, 2, 1]  # bias of layer 2, weight+bias of layer 4


def test_dict_inputs():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

        def forward(self, batch):
            return self.net(batch["input_ids"])

    torch.manual_seed(0)
    model = DictModel().double()
    batch = {
        "input_ids": torch.randn(4, 3, dtype=torch.float64),
        "labels": torch.tensor([0, 1, 1, 0]),
    }
    for curvature in ("ggn", "ef", "hessian"):
        for s in ("full", "diag"):
            H = getattr(ASDL[curvature](model, "classification"), s)(batch)[1]
            H_auto = getattr(AUTOGRAD[curvature](model, "classification"), s)(batch)[1]
            assert ref.rel_err(H, H_auto) < XTOL
    K = AsdlGGN(model, "classification").kron(batch)[1]
    assert kron_err(K, AutogradGGN(model, "classification").kron(batch)[1]) < XTOL


# -- hygiene -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [c for c in CASES if not rejected(c)], ids=lambda c: c.name)
def test_model_untouched(case):
    model, x, y, subnet = case.make()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5) if p.requires_grad else None
    first = next(m for m in model.modules() if isinstance(m, ASDL_MODULES))
    first.fisher = "user attribute"  # ASDL's default result name: must survive
    before = ref.model_state(model)
    state = torch.get_rng_state()
    for cls in (AsdlGGN, AsdlEF, AsdlHessian):
        curv = cls(model, case.likelihood, last_layer=case.last_layer, subnetwork_indices=subnet)
        curv.diag(x, y)
        if cls is AsdlHessian:
            if curv.num_params < 60:  # ASDL's dense Hessian is one double backward per entry
                curv.full(x, y)
                curv.eig_lowrank([(x, y)], k=2)
            continue
        curv.full(x, y)
        curv.jacobians(x)
        curv.gradients(x, y)
        if case.kron:
            curv.kron(x, y, N=10)
    assert torch.equal(state, torch.get_rng_state())
    ref.assert_same_state(before, ref.model_state(model))
    assert first.fisher == "user attribute"
    # torch.func still works afterwards
    auto = AutogradGGN(model, case.likelihood, last_layer=case.last_layer)
    auto.diag(x, y)


def test_last_layer_model_untouched_by_features():
    torch.manual_seed(0)
    model = LastLayerModel(3, 4, 2).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    before = ref.model_state(model)
    _, H = AsdlGGN(model, "classification", last_layer=True).full(x, y)
    assert H.shape == (10, 10)
    ref.assert_same_state(before, ref.model_state(model))


# -- contract with the installed ASDL ----------------------------------------------------------
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
