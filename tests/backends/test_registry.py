"""``curvlib.backends``: the registry maps names to classes; ``fisher`` is derived from ``ggn``."""

from __future__ import annotations

import copy

import oracle
import pytest
from torch import nn

import curvlib
from curvlib import (
    AutogradEF,
    AutogradGGN,
    AutogradHessian,
    backend_class,
    capabilities,
    make_curvature,
)
from curvlib import backends as backends_module
from curvlib.backends import registry


def test_builtin_classes():
    assert backend_class("autograd", "ggn") is AutogradGGN
    assert backend_class("autograd", "ef") is AutogradEF
    assert backend_class("autograd", "hessian") is AutogradHessian
    assert "autograd" in registry() and registry()["autograd"] == (
        "ggn",
        "fisher",
        "ef",
        "hessian",
    )


@pytest.mark.parametrize("backend", sorted(registry()))
def test_fisher_is_the_ggn_class_with_stochastic_true(backend):
    ggn = oracle.get_class(backend, "ggn")
    fisher = backend_class(backend, "fisher")
    assert issubclass(fisher, ggn) and fisher is backend_class(backend, "fisher")
    model = nn.Linear(2, 2).double()
    assert fisher(model, "classification").stochastic
    assert not ggn(model, "classification").stochastic
    assert fisher.structures == ggn.structures_of("fisher")


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known backends.*autograd"):
        backend_class("jax", "ggn")
    with pytest.raises(ValueError, match="known curvatures.*ggn"):
        backend_class("autograd", "kfac")
    with pytest.raises(ValueError, match="known curvatures"):
        curvlib.register_backend("mine", "laplace", AutogradGGN)


def test_register_backend_inherits_the_rows_of_its_base():
    """A subclass of a registered class computes what it inherits: its rows are its base's."""

    class MyGGN(AutogradGGN):
        backend_name = "mine"

    saved = (copy.deepcopy(backends_module._REGISTRY), dict(capabilities.TABLE))
    try:
        curvlib.register_backend("mine", "ggn", MyGGN)
        assert registry()["mine"] == ("ggn", "fisher")
        assert capabilities.row("mine", "ggn") == capabilities.row("autograd", "ggn")
        model = nn.Linear(2, 2).double()
        assert type(make_curvature(model, "classification", "mine")) is MyGGN
        fisher = make_curvature(model, "classification", "mine:fisher")
        assert isinstance(fisher, MyGGN) and fisher.stochastic
        assert "mine" in curvlib.available()
    finally:
        backends_module._REGISTRY.clear()
        backends_module._REGISTRY.update(saved[0])
        capabilities.TABLE.clear()
        capabilities.TABLE.update(saved[1])
    with pytest.raises(ValueError, match="backend_name"):
        curvlib.register_backend("mine", "ggn", type("Bare", (curvlib.GGNInterface,), {}))
    assert "mine" not in registry()
