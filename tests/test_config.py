"""Swap by configuration: strings, dicts, dataclasses, the environment; capabilities."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cases import CASES
from torch import nn

import curvlib
from curvlib import AutogradEF, AutogradGGN, CurvatureConfig, make_curvature, supports
from curvlib.backends import _REGISTRY, registry


def model_data():
    model, x, y, _ = CASES[0].make()
    return model, x, y


@pytest.mark.parametrize(
    "spec, cls, stochastic",
    [
        (None, AutogradGGN, False),
        ("autograd", AutogradGGN, False),
        ("autograd:ef", AutogradEF, None),
        ("autograd:fisher", AutogradGGN, True),
        ({"backend": "autograd", "curvature": "ef"}, AutogradEF, None),
        (CurvatureConfig("autograd", "fisher"), AutogradGGN, True),
    ],
)
def test_specs(spec, cls, stochastic, monkeypatch):
    monkeypatch.delenv("CURVLIB_BACKEND", raising=False)
    model, _, _ = model_data()
    curv = make_curvature(model, "classification", spec)
    assert isinstance(curv, cls)
    if stochastic is not None:
        assert curv.stochastic is stochastic


def test_dict_options_and_overrides(monkeypatch):
    monkeypatch.delenv("CURVLIB_BACKEND", raising=False)
    model, x, y = model_data()
    curv = make_curvature(
        model, "classification", {"backend": "autograd", "curvature": "fisher", "num_samples": 4}
    )
    assert curv.num_samples == 4 and curv.stochastic
    curv = make_curvature(model, "classification", "autograd:fisher", curvature="ggn")
    assert not curv.stochastic
    curv = make_curvature(
        model, "classification", CurvatureConfig("autograd", "ggn", {"kfac_approx": "reduce"})
    )
    assert curv.kfac_approx == "reduce"


def test_other_dataclass(monkeypatch):
    @dataclasses.dataclass
    class MyConfig:
        backend: str = "autograd"
        curvature: str = "ef"
        options: dict = dataclasses.field(default_factory=dict)

    model, _, _ = model_data()
    assert isinstance(make_curvature(model, "classification", MyConfig()), AutogradEF)


def test_environment_variable(monkeypatch):
    model, _, _ = model_data()
    monkeypatch.setenv("CURVLIB_BACKEND", "autograd:ef")
    assert isinstance(make_curvature(model, "classification"), AutogradEF)
    # an explicit spec wins over the environment
    assert isinstance(make_curvature(model, "classification", "autograd:ggn"), AutogradGGN)
    monkeypatch.setenv("CURVLIB_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="known backends"):
        make_curvature(model, "classification")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("jax:ggn", "unknown backend 'jax'; known backends"),
        ("autograd:kfac", "unknown curvature 'kfac'; known curvatures"),
        (42, "got int"),
    ],
)
def test_unknown_names(spec, match):
    model, _, _ = model_data()
    with pytest.raises(ValueError, match=match):
        make_curvature(model, "classification", spec)


def test_same_numbers_through_config(monkeypatch):
    monkeypatch.delenv("CURVLIB_BACKEND", raising=False)
    model, x, y = model_data()
    _, a = make_curvature(model, "classification", "autograd:ggn").diag(x, y)
    _, b = AutogradGGN(model, "classification").diag(x, y)
    assert torch.equal(a, b)


def test_register_backend():
    class MyGGN(AutogradGGN):
        backend_name = "mine"

    try:
        curvlib.register_backend("mine", "ggn", MyGGN)
        assert "mine" in registry()
        model, _, _ = model_data()
        assert type(make_curvature(model, "classification", "mine")) is MyGGN
        fisher = make_curvature(model, "classification", "mine:fisher")
        assert isinstance(fisher, MyGGN) and fisher.stochastic
        assert "mine" in curvlib.available()
    finally:
        _REGISTRY.pop("mine", None)
    with pytest.raises(ValueError, match="known curvatures"):
        curvlib.register_backend("mine", "laplace", MyGGN)


def test_available_lists_capabilities():
    table = curvlib.available()
    auto = table["autograd"]
    assert set(auto) == {"ggn", "fisher", "ef", "hessian"}
    assert auto["ggn"]["structures"] == ["full", "diag", "kron", "ekfac", "blocks", "lowrank"]
    assert auto["ggn"]["entry_points"]["diag"]["modules"] == "any"
    assert auto["ggn"]["entry_points"]["kron"]["kfac_rules_for_other_layers"]
    assert auto["hessian"]["structures"] == ["full", "diag", "blocks", "lowrank"]
    bp = table["backpack"]["ggn"]["entry_points"]
    assert "Linear" in bp["kron"]["modules"] and bp["kron"]["all_leaf_modules"]
    assert bp["operator"]["impl"] == "shared"


def test_supports_per_parameter():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    report = supports(model, "backpack", "ggn", "kron")
    assert not report.supported
    uncovered = [r["name"] for r in report.rows if not r["covered"]]
    assert uncovered == ["1.weight", "1.bias"]
    assert "LayerNorm" in str(report)
    report = supports(model, "autograd", "ggn", "kron")  # every parameter by a rule
    assert report.supported and "NormRule" in str(report)
    assert supports(model, "autograd", "ggn", "diag").supported
    report = supports(model, "autograd", "hessian", "kron")
    assert not any(r["covered"] for r in report.rows)
    model[1].requires_grad_(False)  # a frozen leaf BackPACK cannot pass still blocks it
    report = supports(model, "backpack", "ggn", "kron")
    assert not report.supported and report.blocking
    with pytest.raises(ValueError, match="known"):
        supports(model, "autograd", "ggn", "blockdiag")


FULL_TABLE = [
    (b, c, s) for b, curvs in registry().items() for c in curvs for s in ("full", "diag", "kron")
]


@pytest.mark.parametrize("backend, curvature, structure", FULL_TABLE)
def test_every_combination_works_or_names_an_alternative(backend, curvature, structure):
    """Over the whole table: same numbers as autograd, or an error before any work."""
    import reference as ref

    from curvlib.backends import backends_supporting

    model, x, y = model_data()
    cls = curvlib.backend_class(backend, curvature)
    curv = cls(model, "classification")
    before = ref.model_state(model)
    if structure in cls.structures:
        g = torch.Generator().manual_seed(0)
        _, got = getattr(curv, structure)(x, y, generator=g)
        if curvature != "fisher":  # MC samples are drawn differently per backend
            want_cls = curvlib.backend_class("autograd", curvature)
            if structure in want_cls.structures:
                _, want = getattr(want_cls(model, "classification"), structure)(x, y)
                if structure == "kron":
                    got, want = got.to_matrix(), want.to_matrix()
                assert ref.rel_err(got, want) < 1e-7
    else:
        with pytest.raises(NotImplementedError) as info:
            getattr(curv, structure)(x, y)
        others = backends_supporting(curvature, structure)
        msg = str(info.value)
        assert backend in msg and repr(structure) in msg
        if others:  # names a backend that can ...
            assert any(repr(o) in msg for o in others)
        else:  # ... or, where none can, the structures that exist
            assert str(list(cls.structures)) in msg
    ref.assert_same_state(before, ref.model_state(model))


def test_auto_backend_picks_backpack_for_the_hessian_diagonal():
    import reference as ref

    model, x, y = model_data()
    auto = make_curvature(model, "classification", "auto:hessian")
    assert auto.preferences()["diag"] == ("backpack", "autograd")
    _, h = auto.diag(x, y)
    _, h_bp = curvlib.backend_class("backpack", "hessian")(model, "classification").diag(x, y)
    assert torch.equal(h, h_bp)
    assert ref.rel_err(h, ref.hessian(model, x, y, "classification").diagonal()) < 1e-10
    assert curvlib.available()["auto"]["hessian"]["picks"]["diag"] == ["backpack", "autograd"]


def test_auto_backend_passes_on_what_backpack_cannot_do():
    import reference as ref

    case = next(c for c in CASES if c.name == "layernorm_reg")
    model, x, y, _ = case.make()
    before = ref.model_state(model)
    _, h = make_curvature(model, "regression", "auto:hessian").diag(x, y)
    assert ref.rel_err(h, ref.hessian(model, x, y, "regression").diagonal()) < 1e-10
    ref.assert_same_state(before, ref.model_state(model))
    _, H = make_curvature(model, "regression", "auto:ggn").full(x, y)
    assert ref.rel_err(H, ref.ggn(model, x, y, "regression")) < 1e-10
