"""What is specific to BackPACK (its numbers are the oracle's, ``tests/test_oracle.py``):
the contract with BackPACK's module tables and seams, the chain of modules its second-order
extensions need, the convolution settings it gets wrong, its hooks undone."""

from __future__ import annotations

import pytest
import reference as ref
import torch
import zoo_reference as Z
from cases import CASES
from torch import nn

pytest.importorskip("backpack")

from backpack.context import CTX  # noqa: E402

from curvlib import CapabilityError, UnsupportedModuleError  # noqa: E402
from curvlib.backends.backpack import BackPackEF, BackPackGGN, BackPackHessian  # noqa: E402
from curvlib.capabilities import BACKPACK_MODULES  # noqa: E402

TOL = 1e-10
DT = torch.float64


class _Counter:
    """Counts forward passes of the model."""

    def __init__(self, model):
        self.n = 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


def _data(d: int = 4, b: int = 6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, d, dtype=DT, generator=g), torch.randint(0, 3, (b,), generator=g)


# -- the contract with BackPACK -------------------------------------------------------------
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
    for name, types in BACKPACK_MODULES.items():
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


# -- module tables and conv settings: refused before any work -------------------------------
@pytest.mark.parametrize(
    "module,path_type",
    [(nn.GELU(), "'1' of type GELU"), (nn.LayerNorm(5), "'1' of type LayerNorm")],
)
def test_unsupported_leaf_refused_before_any_forward(module, path_type):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), module, nn.Linear(5, 3)).double()
    x, y = _data()
    counter = _Counter(model)
    for cls, structure in ((BackPackGGN, "diag"), (BackPackGGN, "kron"), (BackPackHessian, "diag")):
        with pytest.raises(UnsupportedModuleError, match=path_type) as err:
            getattr(cls(model, "classification"), structure)(x, y)
        if structure == "diag":  # the autograd backend's diag takes any module
            assert "autograd" in str(err.value)
    assert counter.n == 0  # not even a forward pass


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
    x, y = torch.randn(3, 2, 4, 4, dtype=DT), torch.randint(0, 3, (3,))
    counter = _Counter(model)
    with pytest.raises(UnsupportedModuleError, match=match):
        getattr(BackPackGGN(model, "classification"), structure)(x, y)
    assert counter.n == 0


# -- the chain of modules -----------------------------------------------------------------
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
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class _Net(nn.Module):
    """A non-Sequential container whose forward is a chain: only the leaves are extended."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 7), nn.ReLU())
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize(
    "build, match",
    [(_Branch, "chain of modules"), (_Twice, "ran 2 times")],
    ids=["branching", "called_twice"],
)
def test_non_chain_models_refused_before_backward(build, match):
    model = build().double()
    x, y = _data()
    before = ref.model_state(model)
    with pytest.raises(UnsupportedModuleError, match=match):
        BackPackGGN(model, "classification").diag(x, y)
    ref.assert_same_state(before, ref.model_state(model))


def test_chain_in_a_custom_container():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = _Net().double()
    x, y = _data()
    _, h = BackPackGGN(model, "classification").diag(x, y)
    assert ref.rel_err(h, ref.ggn(model, x, y, "classification").diagonal()) < TOL


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kron_of_a_linear_layer_on_sequences_in_a_chain(approx):
    """KFLR on (B, L, d) inputs: BackPACK's factors converted to weight sharing over L,
    against the K-FAC definition."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)).double()
        x, y = torch.randn(6, 3, 4, dtype=DT), torch.randint(0, 3, (6,))
    for cls, curvature in ((BackPackGGN, "ggn"), (BackPackEF, "ef")):
        _, K = cls(model, "classification", kfac_approx=approx).kron(x, y, N=8)
        blocks = Z.kfac(model, x, y, "classification", curvature, approx, N=8)
        assert ref.rel_err(K.to_matrix(), Z.kfac_dense(blocks)) < TOL


# -- hooks undone ---------------------------------------------------------------------------
def test_backpack_handles_and_stale_flags_are_put_back():
    """BackPACK's global handle list is as before; ASDL leaves ``_is_full_backward_hook =
    False`` on modules, with which a plain ``extend`` would fail: handled and restored."""
    model, x, y, _ = CASES[0].make()
    for m in model:
        m._is_full_backward_hook = False
    handles = list(CTX.hook_handles)
    before = ref.model_state(model)
    _, h = BackPackGGN(model, "classification").diag(x, y)
    BackPackGGN(model, "classification").kron(x, y)
    BackPackHessian(model, "classification").diag(x, y)
    assert ref.rel_err(h, ref.ggn(model, x, y, "classification").diagonal()) < TOL
    ref.assert_same_state(before, ref.model_state(model))
    assert len(CTX.hook_handles) == len(handles)
    assert all(m._is_full_backward_hook is False for m in model)


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
