"""The capability table (``curvlib.capabilities``) and ``curvlib.supports`` against the call.

* The table itself: ``available()`` is derived from it, ``impl`` says where the hook lives,
  every memory model exists, the structures of a class are its rows, a missing entry point
  names the backends that have it.
* ``supports(...).supported`` is True iff the call succeeds, over a zoo of models (grouped,
  dilated, transposed and 3-d convolutions, subclasses of supported layers, normalization
  layers in eval mode, Embedding, GRU/LSTM, MultiheadAttention, tied weights, an unused
  layer, a bare Parameter, outputs with positions, dict inputs, the constraints of each row)
  x every backend x curvature x entry point (K-FAC's reduce variant: on the shared cases):
  where supported the call succeeds and its numbers equal the brute force of
  ``tests/zoo_reference.py``; where not, it raises a curvlib error before any backward pass
  and leaves the model as it was. The same agreement over
  the shared cases of ``tests/cases.py`` is asserted by every test of ``tests/test_oracle.py``.
"""

from __future__ import annotations

import dataclasses
import functools

import oracle
import pytest
import reference as ref
import torch
import zoo
import zoo_reference as Z
from torch import Tensor, nn

import curvlib
from curvlib import CapabilityError, EFInterface, GGNInterface
from curvlib._memory import MODELS
from curvlib.backends import backend_class, backends_supporting, registry
from curvlib.capabilities import ENTRY_POINTS, STRUCTURES, TABLE, row

TOL = oracle.TOL


# -- the table ------------------------------------------------------------------------------
def _classes():
    for name, curvatures in registry().items():
        for curvature in curvatures:
            try:
                yield name, curvature, backend_class(name, curvature)
            except ImportError:  # an optional library that is absent
                continue


def test_available_is_derived_from_the_table(monkeypatch):
    table = curvlib.available()
    for name, curvature, cls in _classes():
        rows = row(name, curvature)
        entry = table[name][curvature]
        assert entry["class"] == cls.__name__
        assert entry["structures"] == [s for s in STRUCTURES if s in rows]
        assert entry["entry_points"] == {k: rows[k].describe() for k in rows}
    # a changed row shows in available() at once: it reads the table, it has no copy
    rows = dict(TABLE["autograd", "ggn"])
    rows["diag"] = dataclasses.replace(rows["diag"], note="changed", exact=False)
    del rows["kron"], rows["ekfac"]
    monkeypatch.setitem(TABLE, ("autograd", "ggn"), rows)
    entry = curvlib.available()["autograd"]["ggn"]
    assert entry["entry_points"]["diag"]["note"] == "changed"
    assert not entry["entry_points"]["diag"]["exact"]
    assert entry["structures"] == ["full", "diag", "blocks", "lowrank"]
    assert "kron" not in entry["entry_points"]


def test_every_row_is_complete():
    """Every registered (backend, curvature) has rows, only of known entry points, with a
    memory model of ``curvlib._memory.MODELS``; the class's structures are its rows."""
    for name, curvature, cls in _classes():
        rows = row(name, curvature)
        assert rows, (name, curvature)
        assert set(rows) <= set(ENTRY_POINTS), (name, curvature, set(rows))
        assert {"jacobians", "gradients", "operator"} <= set(rows), (name, curvature)
        for what, cap in rows.items():
            assert cap.memory in MODELS, (name, curvature, what, cap.memory)
            assert cap.impl in ("native", "shared"), (name, curvature, what)
        assert cls.structures_of(curvature) == tuple(s for s in STRUCTURES if s in rows)
        for s in STRUCTURES:
            assert (name in backends_supporting(curvature, s)) == (s in rows)


HOOKS = {
    "full": "_full",
    "diag": "_diag",
    "kron": "_kron",
    "operator": "_matmat",
    "jacobians": "_jacobians",
    "gradients": "_gradients",
}
# the GGN / EF templates build full and diag from the backend's own Jacobians / gradients
_COMPOSED = {GGNInterface: "_jacobians", EFInterface: "_gradients"}


def _owner(cls: type, hook: str) -> type:
    return next(k for k in cls.__mro__ if hook in vars(k))


def native(cls: type, curvature: str, hook: str) -> bool:
    """Whether ``cls`` computes ``hook`` with its own library (see the test below)."""
    owner = _owner(cls, hook)
    if owner.__module__ != "curvlib.interface":
        return True  # defined by the backend (or a base in a backend's module)
    if owner in _COMPOSED and hook in ("_full", "_diag"):
        return native(cls, curvature, _COMPOSED[owner])
    # curvlib's shared torch.func code is the autograd backend's own implementation
    autograd = backend_class("autograd", "ggn" if curvature == "fisher" else curvature)
    return issubclass(cls, autograd)


def test_impl_native_iff_the_backend_defines_the_hook():
    """``impl == "native"``: the hook of the entry point is defined by the backend class in
    its own module (or a base there), or is the GGN/EF template over the backend's own
    Jacobians/gradients; for the autograd backend (and the classes deriving from it)
    curvlib's shared torch.func code is its own. ``impl == "shared"``: the hook is the
    interface's shared default."""
    for name, curvature, cls in _classes():
        for what, cap in row(name, curvature).items():
            if what not in HOOKS:  # ekfac, blocks, lowrank: built on the rows above
                continue
            hook = HOOKS[what]
            want = "native" if native(cls, curvature, hook) else "shared"
            where = _owner(cls, hook)
            assert cap.impl == want, (name, curvature, what, f"{where.__module__}.{where.__name__}")


@pytest.mark.parametrize("curvature", ["ggn", "fisher", "ef", "hessian"])
def test_missing_entry_point_names_the_backends_that_have_it(curvature):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    for name, curvs in registry().items():
        if curvature not in curvs:
            continue
        cls = oracle.get_class(name, curvature)
        for s in STRUCTURES:
            if s in row(name, curvature):
                continue
            rep = curvlib.supports(model, name, curvature, s, x=x, y=y)
            assert not rep.supported and rep.blocking
            before = ref.model_state(model)
            with pytest.raises(CapabilityError) as info:
                getattr(cls(model, "classification"), s)(x, y)
            ref.assert_same_state(before, ref.model_state(model))
            msg = str(info.value)
            assert repr(name) in msg and repr(s) in msg
            others = [b for b in backends_supporting(curvature, s) if b != name]
            assert str(others or "none") in msg
            assert str(list(cls.structures)) in msg


@pytest.mark.parametrize("backend", sorted(registry()))
def test_differentiable_jacobians_as_the_table_says(backend):
    """``jacobians(x, enable_backprop=True)`` keeps the graph to ``x`` where the row says
    ``differentiable`` (the same gradient as the brute force's), else raises
    ``CapabilityError`` naming backend ``autograd``."""
    cls = oracle.get_class(backend, "ggn")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        x = torch.randn(5, 3, dtype=torch.float64).requires_grad_(True)
    curv = cls(model, "regression")
    if not row(backend, "ggn")["jacobians"].differentiable:
        with pytest.raises(CapabilityError, match="autograd"):
            curv.jacobians(x, enable_backprop=True)
        return
    Js, f = curv.jacobians(x, enable_backprop=True)
    (gx,) = torch.autograd.grad(Js.pow(2).sum() + f.sum(), x)
    fn, theta = ref.output_fn(model, x)
    theta = theta.clone().requires_grad_(True)
    out = fn(theta)
    rows = [
        torch.autograd.grad(out[n, c], theta, create_graph=True)[0]
        for n in range(5)
        for c in range(2)
    ]
    (want,) = torch.autograd.grad(torch.stack(rows).pow(2).sum() + out.sum(), x)
    assert ref.rel_err(gx, want) < TOL


def test_supports_reports_per_parameter():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    report = curvlib.supports(model, "backpack", "ggn", "kron")
    assert not report.supported
    assert [r["name"] for r in report.rows if not r["covered"]] == ["1.weight", "1.bias"]
    assert "LayerNorm" in str(report) and "pass x" in str(report)
    report = curvlib.supports(model, "autograd", "ggn", "kron")  # every parameter by a rule
    assert report.supported and "NormRule" in str(report)
    assert curvlib.supports(model, "autograd", "ggn", "diag").supported
    report = curvlib.supports(model, "autograd", "hessian", "kron")
    assert not any(r["covered"] for r in report.rows)
    model[1].requires_grad_(False)  # a frozen leaf BackPACK cannot pass still blocks it
    report = curvlib.supports(model, "backpack", "ggn", "kron")
    assert not report.supported and report.blocking
    with pytest.raises(ValueError, match="known"):
        curvlib.supports(model, "autograd", "ggn", "blockdiag")


def test_supports_runs_the_forward_checks_only_with_an_input():
    """BackPACK's chain of modules is a forward-pass check: without ``x`` the report is
    static (and says so), with ``x`` it finds the functional sum."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    class Summed(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x).cumsum(-1)

    m = Summed()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    static = curvlib.supports(m, "backpack", "ggn", "diag")
    assert static.supported and not static.checked_forward
    before = ref.model_state(m)
    full = curvlib.supports(m, "backpack", "ggn", "diag", x=x, y=y)
    ref.assert_same_state(before, ref.model_state(m))
    assert not full.supported and full.checked_forward
    assert "functional operation" in str(full)


def test_supports_checks_the_operator_batch():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 5, 0])
    with pytest.raises(curvlib.TargetError):
        curvlib.backend_class("autograd", "ggn")(model, "classification").operator(x, y)
    assert not curvlib.supports(model, "autograd", "ggn", "operator", x=x, y=y).supported


def test_supports_jacobians_ignores_targets():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 5, 0])
    curvlib.backend_class("autograd", "ggn")(model, "classification").jacobians(x)
    assert curvlib.supports(model, "autograd", "ggn", "jacobians", x=x, y=y).supported


# -- the zoo: supports agrees with the call -------------------------------------------------
class MyLinearForward(nn.Linear):
    """A subclass of a supported layer with its own ``forward`` (same map)."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class Branch(nn.Module):
    """Two Linear layers on the same input, summed: not a chain of modules."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.b(x)


class DictMLP(nn.Module):
    """A HuggingFace-style model called with a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, batch: dict) -> Tensor:
        return self.net(batch["input_ids"] * batch["attention_mask"])


def _mlp(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


def _image(conv: nn.Module, flat: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(flat, 3))


def _zero_bn_weight() -> nn.Module:
    m = _mlp(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 1.5)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].weight[2] = 0.0
    return m.eval()


def _hooked(kind: str) -> nn.Module:
    m = _mlp(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    if kind == "full":
        m[2].register_full_backward_hook(lambda *a: None)
    else:
        m[2].register_backward_hook(lambda *a: None)
    return m


#: local models: ``name -> (build, x_shape or "dict", likelihood)``
LOCAL = {
    "mylinear_forward": (lambda: _mlp(MyLinearForward(4, 5), nn.Tanh(), nn.Linear(5, 3)), (4,)),
    "gelu": (lambda: _mlp(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3)), (4,)),
    "conv_reflect": (
        lambda: _image(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), 32),
        (2, 4, 4),
    ),
    "conv_same": (lambda: _image(nn.Conv2d(2, 2, 3, padding="same"), 32), (2, 4, 4)),
    "layernorm_no_bias": (
        lambda: _mlp(nn.Linear(4, 5), nn.LayerNorm(5, bias=False), nn.Linear(5, 3)),
        (4,),
    ),
    "batchnorm_zero_weight": (_zero_bn_weight, (4,)),
    "full_backward_hook": (lambda: _hooked("full"), (4,)),
    "regular_backward_hook": (lambda: _hooked("regular"), (4,)),
    "branch": (Branch, (4,)),
    "dict_input": (DictMLP, "dict"),
}
ZOO_NAMES = [
    "gru_cls",
    "lstm_reg",
    "mha_cls",
    "called_twice_cls",
    "tied_cls",
    "token_cls",
    "token_reg",
    "grouped_conv_cls",
    "dilated_conv_cls",
    "convtranspose2d_cls",
    "conv3d_cls",
    "groupnorm_cls",
    "batchnorm1d_cls",
    "batchnorm2d_cls",
    "embedding_cls",
    "mylinear_cls",
    "unused_cls",
    "bare_param_reg",
]
MODELS_UNDER_TEST = ZOO_NAMES + list(LOCAL)


def problem(name: str) -> oracle.Problem:
    """A fresh ``(model, x, y)`` of the zoo (or of :data:`LOCAL`); the global RNG untouched."""
    if name in LOCAL:
        build, shape = LOCAL[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build().double()
            if shape == "dict":
                x = {
                    "input_ids": torch.randn(4, 4, dtype=torch.float64),
                    "attention_mask": torch.tensor([[1.0] * 4] * 3 + [[1.0, 1.0, 0.0, 0.0]]),
                }
                x["attention_mask"] = x["attention_mask"].double()
            else:
                x = torch.randn(4, *shape, dtype=torch.float64)
            y = torch.randint(0, 3, (4,))
        return oracle.Problem(model, x, y, "classification", N=7)
    case = zoo.get(name)
    if not case.available():
        pytest.skip(f"{name} needs {case.requires}")
    model, x, y = case.make()
    return oracle.Problem(model, x, y, case.likelihood, N=y.shape[0] + 3)


# references (zoo_reference's loops), cached per model and quantity
@functools.cache
def _jacobians(name: str) -> tuple[Tensor, Tensor]:
    pb = problem(name)
    return Z.jacobians(pb.model, pb.x)


@functools.cache
def _mc(name: str) -> Tensor:
    """``(B, S, K)``: the likelihood's MC cotangents for the oracle's seed."""
    pb = problem(name)
    _, f = _jacobians(name)
    c = ref.mc_cotangents(f, pb.y, pb.likelihood, oracle.NUM_SAMPLES, oracle.SEED)
    return c.flatten(2)


@functools.cache
def _dense(name: str, curvature: str) -> Tensor:
    pb = problem(name)
    m, x, y, lik = pb.model, pb.x, pb.y, pb.likelihood
    if curvature == "ggn":
        return Z.ggn(m, x, y, lik, J=_jacobians(name)[0])
    if curvature == "ef":
        return Z.ef(m, x, y, lik)
    if curvature == "hessian":
        return Z.hessian(m, x, y, lik)
    V = torch.einsum("bsk,bkp->bsp", _mc(name), _jacobians(name)[0]).flatten(0, 1)
    return V.T @ V


@functools.cache
def _kron(name: str, curvature: str, approx: str) -> Tensor:
    pb = problem(name)
    _, f = _jacobians(name)
    if curvature == "ggn":
        M = Z.output_hessians(f, pb.y, pb.likelihood)
    elif curvature == "ef":
        r = Z.output_grads(f, pb.y, pb.likelihood)
        M = r.unsqueeze(-1) * r.unsqueeze(-2)
    else:
        c = _mc(name)
        M = torch.einsum("bsk,bsl->bkl", c, c)
    H = _dense(name, curvature)
    return ref.kron_reference(pb.model, pb.x, pb.y, pb.likelihood, M, approx, pb.N, H)


def zoo_expected(name: str, curvature: str, entry: oracle.Entry, got: Tensor) -> Tensor:
    pb = problem(name)
    what = entry.what
    if what == "jacobians":
        return _jacobians(name)[0].reshape(got.shape)
    if what == "gradients":
        return Z.per_sample_grads(pb.model, pb.x, pb.y, pb.likelihood)
    if what == "kron":
        return _kron(name, curvature, entry.options.get("kfac_approx", "expand"))
    H = _dense(name, curvature)
    if what in oracle.STRUCTURED:
        return oracle.structured_expected(what, H, got)
    if what == "operator":
        return H @ oracle.probe_columns(H.shape[0])
    return H.diagonal() if what == "diag" else H


def agree(backend: str, curvature: str, entry: oracle.Entry, name: str) -> str:
    """``supports`` agrees with the call on model ``name``; the numbers where supported."""
    oracle.get_class(backend, curvature)
    pb = problem(name)
    rep = oracle.report(backend, curvature, entry, pb)
    if not rep.supported:
        oracle.expect_refusal(
            lambda: oracle.call(backend, curvature, entry, pb), pb.model, str(rep)
        )
        return "refused"
    before = ref.model_state(pb.model)
    _, got = oracle.call(backend, curvature, entry, pb)
    ref.assert_same_state(before, ref.model_state(pb.model))
    try:
        want = zoo_expected(name, curvature, entry, got)
    except ref.NoReference:  # e.g. K-FAC of a reflect-padded convolution: no definition
        return "computed (no reference)"
    err = ref.rel_err(got, want)
    assert err < TOL, f"relative error {err:.3g} against the brute force"
    return "computed"


def zoo_jobs(backends: list[str] | None = None) -> list[tuple[str, str, oracle.Entry]]:
    """The oracle's jobs without K-FAC's reduce variant (the shared cases run it)."""
    return [j for j in oracle.jobs(backends) if j[2].name != "kron_reduce"]


@pytest.mark.parametrize(
    "backend, curvature, entry, name", oracle.params(zoo_jobs(), MODELS_UNDER_TEST)
)
def test_supports_agrees_with_the_call(backend, curvature, entry, name):
    agree(backend, curvature, entry, name)
