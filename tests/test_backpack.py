"""The BackPACK backend against brute force and the autograd backend on the shared cases."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from cases import CASE_IDS, CASES
from torch import nn

pytest.importorskip("backpack")

from backpack.context import CTX  # noqa: E402

from curvlib import (  # noqa: E402
    AutogradEF,
    AutogradGGN,
    AutogradHessian,
    CapabilityError,
    UnsupportedModuleError,
    backend_class,
)
from curvlib.backends.backpack import (  # noqa: E402
    BackPackEF,
    BackPackGGN,
    BackPackHessian,
)
from curvlib.capabilities import BACKPACK_MODULES as MODULE_TABLES  # noqa: E402

TOL = 1e-8  # against brute force
XTOL = 1e-7  # against the autograd backend (DESIGN: 1e-7 relative in float64)
BP = {"ggn": BackPackGGN, "ef": BackPackEF, "hessian": BackPackHessian}
AG = {"ggn": AutogradGGN, "ef": AutogradEF, "hessian": AutogradHessian}
BRUTE = {"ggn": ref.ggn, "ef": ref.ef, "hessian": ref.hessian}

# What BackPACK cannot do on the shared cases (must raise UnsupportedModuleError, nothing
# else): SeqModel sums over the sequence with a functional op, which breaks the chain of
# modules the second-order extensions need; LayerNorm has no BackPACK extension at all;
# BackPACK stores one input per module, so a module called twice (tied) is refused.
_SECOND_ORDER = {("ggn", "diag"), ("ggn", "kron"), ("ef", "kron"), ("hessian", "diag")}
_ALL = _SECOND_ORDER | {("ggn", "full"), ("ef", "full"), ("ef", "diag"), ("jac", "jac")}
UNSUPPORTED = {"seq_cls": _SECOND_ORDER, "layernorm_reg": _ALL, "tied_cls": _ALL}


def unsupported(case, curvature, structure) -> bool:
    return (curvature, structure) in UNSUPPORTED.get(case.name, set())


def twin(curv, cls, **kw):
    """The same configuration with another class (the autograd backend)."""
    return cls(
        curv.model,
        curv.lik,
        last_layer=curv.last_layer,
        subnetwork_indices=curv.subnetwork_indices,
        **kw,
    )


def expect_unsupported(model, call):
    before = ref.model_state(model)
    with pytest.raises(UnsupportedModuleError, match="autograd"):
        call()
    ref.assert_same_state(before, ref.model_state(model))


# -- shared cases ------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_jacobians_and_gradients(case):
    curv, model, x, y, idx = ref.setup(case, BackPackGGN)
    if unsupported(case, "jac", "jac"):
        expect_unsupported(model, lambda: curv.jacobians(x))
        expect_unsupported(model, lambda: curv.gradients(x, y))
        return
    Gs, loss = ref.assert_jacobians_and_gradients(curv, model, x, y, case, idx, TOL)
    Ga, la = twin(curv, AutogradEF).gradients(x, y)
    assert ref.rel_err(Gs, Ga) < XTOL and ref.rel_err(loss, la) < XTOL


@pytest.mark.parametrize(
    "curvature,structure",
    [("ggn", "full"), ("ggn", "diag"), ("ef", "full"), ("ef", "diag"), ("hessian", "diag")],
)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dense_and_diag(case, curvature, structure):
    curv, model, x, y, idx = ref.setup(case, BP[curvature])
    if unsupported(case, curvature, structure):
        expect_unsupported(model, lambda: getattr(curv, structure)(x, y))
        return
    loss, H = getattr(curv, structure)(x, y)
    H_ref = ref.sub_full(BRUTE[curvature](model, x, y, case.likelihood, case.last_layer), idx)
    expected = H_ref if structure == "full" else H_ref.diagonal()
    assert H.shape == expected.shape
    assert ref.rel_err(H, expected) < TOL
    assert ref.rel_err(loss, ref.loss(model, x, y, case.likelihood)) < TOL
    _, H_ag = getattr(twin(curv, AG[curvature]), structure)(x, y)
    assert ref.rel_err(H, H_ag) < XTOL


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("curvature", ["ggn", "mc", "ef"])
@pytest.mark.parametrize("case", [c for c in CASES if c.kron], ids=lambda c: c.name)
def test_kron_matches_autograd(case, curvature, approx):
    """Every factor equals the autograd backend's (tested against brute force there)."""
    kw = {"stochastic": True, "num_samples": 3} if curvature == "mc" else {}
    cls = BackPackEF if curvature == "ef" else BackPackGGN
    curv, model, x, y, _ = ref.setup(case, cls, kfac_approx=approx, **kw)
    gen = torch.Generator().manual_seed(11)
    if unsupported(case, "ef" if curvature == "ef" else "ggn", "kron"):
        expect_unsupported(model, lambda: curv.kron(x, y, N=10, generator=gen))
        return
    loss, K = curv.kron(x, y, N=10, generator=gen)
    ag = twin(curv, AutogradEF if curvature == "ef" else AutogradGGN, kfac_approx=approx, **kw)
    loss_ag, K_ag = ag.kron(x, y, N=10, generator=torch.Generator().manual_seed(11))
    assert len(K.kfacs) == len(K_ag.kfacs) == len(curv.params)
    for fs, fs_ag in zip(K.kfacs, K_ag.kfacs, strict=True):
        assert [f.shape for f in fs] == [f.shape for f in fs_ag]
        for f, f_ag in zip(fs, fs_ag, strict=True):
            assert ref.rel_err(f, f_ag) < XTOL
    assert ref.rel_err(loss, loss_ag) < XTOL


def test_kron_linear_on_sequences_matches_autograd():
    """A Linear layer on (B, L, d) inputs, in a chain of modules: weight sharing over L."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)).double()
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    for approx in ("expand", "reduce"):
        _, K = BackPackGGN(model, "classification", kfac_approx=approx).kron(x, y, N=8)
        _, K_ag = AutogradGGN(model, "classification", kfac_approx=approx).kron(x, y, N=8)
        for fs, fs_ag in zip(K.kfacs, K_ag.kfacs, strict=True):
            for f, f_ag in zip(fs, fs_ag, strict=True):
                assert ref.rel_err(f, f_ag) < XTOL


# -- Monte Carlo -------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_mc_reproducible_and_same_samples_as_autograd(structure):
    curv, model, x, y, _ = ref.setup(CASES[2], BackPackGGN, stochastic=True, num_samples=2)

    def run(c, seed):
        _, out = getattr(c, structure)(x, y, generator=torch.Generator().manual_seed(seed))
        return out.to_matrix() if structure == "kron" else out

    state = torch.get_rng_state()
    a, b, c = run(curv, 7), run(curv, 7), run(curv, 8)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not used
    assert torch.equal(a, b) and not torch.equal(a, c)
    ag = twin(curv, AutogradGGN, stochastic=True, num_samples=2)
    assert ref.rel_err(a, run(ag, 7)) < XTOL


def test_mc_converges_to_ggn():
    case = CASES[0]
    curv, model, x, y, _ = ref.setup(case, BackPackGGN, stochastic=True, num_samples=20000)
    _, h = curv.diag(x, y, generator=torch.Generator().manual_seed(0))
    h_ref = ref.ggn(model, x, y, case.likelihood).diagonal()
    assert 1e-6 < ref.rel_err(h, h_ref) < 0.03


def test_fisher_from_registry():
    cls = backend_class("backpack", "fisher")
    assert issubclass(cls, BackPackGGN)
    model, *_ = CASES[0].make()
    assert cls(model, "classification").stochastic


# -- capabilities and errors -------------------------------------------------------------
def test_full_hessian_names_a_backend_that_can():
    curv, model, x, y, _ = ref.setup(CASES[0], BackPackHessian)
    with pytest.raises(CapabilityError, match="autograd") as err:
        curv.full(x, y)
    assert isinstance(err.value, NotImplementedError) and "backpack" in str(err.value)


def test_kron_with_subnetwork_raises():
    curv, model, x, y, _ = ref.setup(CASES[6], BackPackGGN)
    with pytest.raises(CapabilityError):
        curv.kron(x, y)


def test_dict_inputs_refused():
    """Second-order extensions run BackPACK's module graph from an input tensor: dicts are
    refused there (first-order entry points take them, tests/test_models.py)."""
    model = nn.Sequential(nn.Linear(3, 2)).double()
    batch = {"input_ids": torch.randn(4, 3, dtype=torch.float64), "labels": torch.zeros(4).long()}
    assert not BackPackGGN.capability_row()["diag"].dict_inputs
    assert BackPackGGN.capability_row()["full"].dict_inputs
    for structure in ("diag", "kron"):
        with pytest.raises(CapabilityError, match="dict"):
            getattr(BackPackGGN(model, "classification"), structure)(batch)


class _Counter:
    def __init__(self, model):
        self.n = 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


@pytest.mark.parametrize(
    "module,path_type",
    [(nn.GELU(), "'1' of type GELU"), (nn.LayerNorm(5), "'1' of type LayerNorm")],
)
def test_unsupported_module_before_any_work(module, path_type):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), module, nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    counter = _Counter(model)
    for cls, structure in ((BackPackGGN, "diag"), (BackPackGGN, "kron"), (BackPackHessian, "diag")):
        with pytest.raises(UnsupportedModuleError, match=path_type) as err:
            getattr(cls(model, "classification"), structure)(x, y)
        if structure == "diag":  # the autograd backend's diag takes any module
            assert "autograd" in str(err.value)
    assert counter.n == 0  # not even a forward pass


def test_param_free_unsupported_module_fine_for_first_order():
    """BatchGrad needs only the modules owning parameters: GELU is fine for full."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    _, H = BackPackGGN(model, "classification").full(x, y)
    assert ref.rel_err(H, ref.ggn(model, x, y, "classification")) < TOL


@pytest.mark.parametrize(
    "conv,structure,match",
    [
        (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "diag", "padding_mode"),
        (nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), "full", "padding_mode"),
        (nn.Conv2d(2, 2, 3, padding="same"), "diag", "padding"),
        (nn.Conv2d(2, 2, 3, padding=1, groups=2), "kron", "groups=2"),
    ],
)
def test_conv_settings_backpack_gets_wrong(conv, structure, match):
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(2 * 16, 3)).double()
    x, y = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    counter = _Counter(model)
    with pytest.raises(UnsupportedModuleError, match=match):
        getattr(BackPackGGN(model, "classification"), structure)(x, y)
    assert counter.n == 0


class _Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) + self.b(x)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("build", [_Branch, _Twice], ids=["branching", "called_twice"])
def test_non_chain_models_raise_before_backward(build):
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(5, 4 if build is _Branch else 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    expect_unsupported(model, lambda: BackPackGGN(model, "classification").diag(x, y))
    if build is _Twice:  # the per-sample gradients would be overwritten too
        expect_unsupported(model, lambda: BackPackGGN(model, "classification").full(x, y))
    else:  # first order only needs every parameter's module to run once
        _, H = BackPackGGN(model, "classification").full(x, y)
        assert ref.rel_err(H, ref.ggn(model, x, y, "classification")) < TOL


def test_custom_container_chain():
    """A non-Sequential container whose forward is a chain: only the leaves are extended."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 7), nn.ReLU())
            self.head = nn.Linear(7, 3)

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(1)
    model = Net().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    _, h = BackPackGGN(model, "classification").diag(x, y)
    assert ref.rel_err(h, ref.ggn(model, x, y, "classification").diagonal()) < TOL


def test_inplace_activation():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    before = ref.model_state(model)
    H_ref = ref.ggn(model, x, y, "classification")
    curv = BackPackGGN(model, "classification")
    assert ref.rel_err(curv.full(x, y)[1], H_ref) < TOL
    assert ref.rel_err(curv.diag(x, y)[1], H_ref.diagonal()) < TOL
    curv.kron(x, y)
    assert model[1].inplace is True
    ref.assert_same_state(before, ref.model_state(model))


def test_enable_backprop_jacobians_differentiable_in_x():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    results = []
    for cls in (BackPackGGN, AutogradGGN):
        x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x.requires_grad_(True)
        Js, f = cls(model, "regression").jacobians(x, enable_backprop=True)
        (gx,) = torch.autograd.grad(Js.pow(2).sum() + f.sum(), x)
        results.append((Js.detach(), gx))
    assert ref.rel_err(results[0][0], results[1][0]) < XTOL
    assert ref.rel_err(results[0][1], results[1][1]) < XTOL


# -- hygiene -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_model_untouched(case):
    model, x, y, subnet = case.make()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5) if p.requires_grad else None
    before = ref.model_state(model)
    handles = list(CTX.hook_handles)
    for name, cls in BP.items():
        curv = cls(model, case.likelihood, last_layer=case.last_layer, subnetwork_indices=subnet)
        calls = [lambda c=curv: c.jacobians(x), lambda c=curv: c.gradients(x, y)]
        calls += [lambda c=curv, s=s: getattr(c, s)(x, y) for s in ("full", "diag")]
        if case.kron and name != "hessian":
            calls.append(lambda c=curv: c.kron(x, y, N=10))
        for call in calls:
            try:
                call()
            except (UnsupportedModuleError, CapabilityError):
                pass
    ref.assert_same_state(before, ref.model_state(model))
    assert len(CTX.hook_handles) == len(handles)
    # torch.func (the autograd backend) works on the model afterwards
    if not unsupported(case, "jac", "jac"):
        Js, _ = AutogradGGN(
            model, case.likelihood, last_layer=case.last_layer, subnetwork_indices=subnet
        ).jacobians(x)
        assert torch.isfinite(Js).all()


def test_stale_full_backward_hook_flag_is_handled_and_restored():
    """ASDL leaves ``_is_full_backward_hook = False``; a plain ``extend`` would then fail."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    for m in model:
        m._is_full_backward_hook = False
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    before = ref.model_state(model)
    _, h = BackPackGGN(model, "classification").diag(x, y)
    assert ref.rel_err(h, ref.ggn(model, x, y, "classification").diagonal()) < TOL
    ref.assert_same_state(before, ref.model_state(model))
    assert all(m._is_full_backward_hook is False for m in model)


def test_live_regular_backward_hook_refused():
    model = nn.Sequential(nn.Linear(4, 3)).double()
    model[0].register_backward_hook(lambda *a: None)
    x, y = torch.randn(2, 4, dtype=torch.float64), torch.randint(0, 3, (2,))
    expect_unsupported(model, lambda: BackPackGGN(model, "classification").diag(x, y))


# -- contract with BackPACK (what this backend relies on) ---------------------------------
def test_contract_module_tables_are_backpacks():
    """Every type we let an extension see is in that extension's BackPACK table.

    BackPACK has no public getter for its tables; reading the private one is confined to
    this test, which pins it.
    """
    from backpack.extensions import KFLR, BatchGrad, DiagGGNExact, DiagGGNMC, DiagHessian

    exts = {
        "BatchGrad": [BatchGrad()],
        "DiagGGN": [DiagGGNExact(), DiagGGNMC()],
        "KFLR": [KFLR()],
        "DiagHessian": [DiagHessian()],
    }
    for name, types in MODULE_TABLES.items():
        for ext in exts[name]:
            table = ext._BackpropExtension__module_extensions
            missing = [t.__name__ for t in types if t not in table]
            assert not missing, (name, type(ext).__name__, missing)


def test_contract_backpack_seams():
    """The public seams used: ``set_module_extension``, ModuleExtension's parameter
    methods, HBP's ``backpropagate``, ``input0`` and the global handle list."""
    from backpack.extensions import KFLR
    from backpack.extensions.module_extension import ModuleExtension
    from backpack.extensions.secondorder.hbp.convnd import HBPConvNd
    from backpack.extensions.secondorder.hbp.linear import HBPLinear

    assert callable(KFLR().set_module_extension)
    for cls in (HBPLinear, HBPConvNd):
        assert issubclass(cls, ModuleExtension)
        assert all(callable(getattr(cls, m)) for m in ("weight", "bias", "backpropagate"))
    assert isinstance(CTX.hook_handles, list)
