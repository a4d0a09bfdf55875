"""``curvlib.config``: swap the backend by configuration (strings, dicts, dataclasses, the
environment). The registry is tested in ``tests/backends/test_registry.py``, the capability
table and ``supports`` in ``tests/test_capabilities.py``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cases import CASES

from curvlib import AutogradEF, AutogradGGN, CurvatureConfig, make_curvature


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
