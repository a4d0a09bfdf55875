"""Every bad input is refused by name, before any work; valid edge cases give the right numbers.

The kinds of input (:data:`KINDS`: inputs, targets, ``N``, generators, subnetworks, models,
options) run over every job of the registry: backend × curvature × entry point (``full``,
``diag``, ``kron``, ``operator``, ``jacobians``, ``gradients``), read from
``curvlib.backends.registry()`` and each class's capability rows, so a new backend is
covered the moment it is registered. Each (kind, job) pair gets one outcome
(:func:`outcome`):

* a bad input must raise a curvlib error (a subclass of ``curvlib.CurvlibError``; a
  ``TypeError`` naming the keyword for a misspelled option) whose message names the
  problem, with no backward pass before it (and no forward pass where the check needs no
  model output: a probe on the first layer counts them), the model's state
  (``reference.model_state``), ``x.grad`` and the global RNG unchanged, and the same
  curvature object then gives the clean numbers;
* a valid edge case (a batch of one, strided / expanded / grad-requiring inputs, int32 /
  uint8 / int8 labels, ``N`` as a 0-dim tensor or a huge integer) must give the result of
  the clean call (a batch of one: the brute-force float64 reference of ``reference.py``).

``python bench/bad_inputs.py`` tabulates the outcomes (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import reference as ref
import torch
from torch import Tensor, nn

import curvlib
from curvlib.backends import backend_class, registry
from curvlib.errors import CurvlibError

DT = torch.float64
B, D, H, C, C_REG = 4, 3, 4, 3, 2
ENTRIES = ("full", "diag", "kron", "operator", "jacobians", "gradients")
STRUCTS = ("full", "diag", "kron")
Y_ENTRIES = ("full", "diag", "kron", "operator", "gradients")


# -- jobs -----------------------------------------------------------------------------------
def _jobs() -> list[tuple[str, str, str]]:
    jobs = []
    for backend, curvatures in registry().items():
        for curvature in curvatures:
            try:
                cls = backend_class(backend, curvature)
            except ImportError:  # an optional library that is absent
                continue
            key = "fisher" if curvature == "fisher" else cls.curvature_name()
            rows = cls.capability_row(key)
            jobs += [(backend, curvature, e) for e in ENTRIES if e in rows]
    return jobs


JOBS = _jobs()


# -- models and data ------------------------------------------------------------------------
def mlp(c: int = C, middle: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(D, H), nn.Tanh()] + ([middle] if middle is not None else [])
    return nn.Sequential(*layers, nn.Linear(H, c)).to(DT)


_TEMPLATES = {"classification": mlp(C), "regression": mlp(C_REG)}


def model_for(likelihood: str) -> nn.Module:
    return copy.deepcopy(_TEMPLATES[likelihood])


def data(likelihood: str, b: int = B) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, D, generator=g, dtype=DT)
    if likelihood == "classification":
        return x, torch.randint(0, C, (b,), generator=g)
    return x, torch.randn(b, C_REG, generator=g, dtype=DT)


class DictModel(nn.Module):
    """A HuggingFace-style model: a dict in, the features under ``input_ids``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, batch: dict) -> Tensor:
        return self.net(batch["input_ids"])


def first_layer(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, nn.Linear))


# -- one run --------------------------------------------------------------------------------
@dataclass
class Setup:
    """What one kind hands to a job (defaults: the clean classification call)."""

    likelihood: str = "classification"
    model: nn.Module | None = None
    x: Any = None
    y: Any = "clean"
    N: Any = None
    ctor: dict = field(default_factory=dict)
    call: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    factory: bool = False  # build through curvlib.make_curvature
    lik: str | None = None  # the likelihood given to the constructor (default: likelihood)
    repair: Callable[[Any, nn.Module], bool] | None = None  # fix the object for the reuse call

    def __post_init__(self) -> None:
        x0, y0 = data(self.likelihood)
        if self.model is None:
            self.model = model_for(self.likelihood)
        if self.x is None:
            self.x = x0
        if isinstance(self.y, str) and self.y == "clean":
            self.y = y0


@dataclass
class Kind:
    """One kind of input: ``make(job) -> Setup``; ``valid`` ones must compute correctly."""

    name: str
    group: str
    make: Callable[[tuple[str, str, str]], Setup]
    match: str = ""  # the message must match (case-insensitive)
    entries: tuple[str, ...] = ENTRIES
    valid: bool = False
    keyword: bool = False  # a keyword problem: TypeError is the expected class
    after_forward: bool = False  # the check needs the model output (0 backward passes)
    reference: str = "clean"  # valid kinds: "clean" result, or "brute" force
    exact: bool = False  # valid kinds: bit for bit the clean result
    note: str = ""


class Probe:
    """Counts forward passes through ``module`` and backward passes through its output."""

    def __init__(self, module: nn.Module) -> None:
        self.forward = self.backward = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, mod: nn.Module, args: tuple, out: Tensor) -> None:
        self.forward += 1
        if isinstance(out, Tensor) and out.requires_grad:
            out.register_hook(self._count)

    def _count(self, grad: Tensor) -> None:
        self.backward += 1


def _state(model: nn.Module) -> dict:
    st = ref.model_state(model)
    st["params"] = [
        (n, p if p.is_meta else torch.where(p.isnan(), torch.full_like(p, 1234.5), p), r, g, d)
        for n, p, r, g, d in st["params"]
    ]
    if any(p.is_meta for p in model.parameters()):  # meta tensors compare by shape only
        st["params"] = [(n, p.shape, r, g, d) for n, p, r, g, d in st["params"]]
    return st


def _same_state(a: dict, b: dict) -> bool:
    if any(not isinstance(p, Tensor) for _, p, *_ in a["params"]):
        return a == b
    try:
        ref.assert_same_state(a, b)
    except AssertionError:
        return False
    return True


@contextlib.contextmanager
def environ(env: dict) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(3)


def build(job: tuple[str, str, str], s: Setup):
    backend, curvature, _ = job
    lik = s.likelihood if s.lik is None else s.lik
    if s.factory:
        return curvlib.make_curvature(s.model, lik, backend=backend, curvature=curvature, **s.ctor)
    return backend_class(backend, curvature)(s.model, lik, **s.ctor)


def _V(P: int) -> Tensor:
    return torch.randn(P, 2, generator=torch.Generator().manual_seed(7), dtype=DT)


def call(job: tuple[str, str, str], curv, s: Setup) -> Tensor:
    """The entry point of ``job`` on the setup, as one dense tensor."""
    _, curvature, what = job
    kw = dict(s.call)
    if curvature == "fisher" and what in ("full", "diag", "kron", "operator"):
        kw.setdefault("generator", _generator())
    if what == "jacobians":
        return curv.jacobians(s.x, **kw)[0]
    if what == "gradients":
        return curv.gradients(s.x, s.y, **kw)[0]
    if what == "operator":
        op = curv.operator(s.x, s.y, **kw)
        return op @ _V(op.shape[1])
    n = {} if s.N is None else {"N": s.N}
    out = getattr(curv, what)(s.x, s.y, **n, **kw)[1]
    return out.to_matrix() if what == "kron" else out


_CLEAN: dict[tuple, Tensor] = {}


def clean(job: tuple[str, str, str], likelihood: str = "classification") -> Tensor:
    """The job's result on the clean batch (a fresh object; cached)."""
    key = (job, likelihood)
    if key not in _CLEAN:
        s = Setup(likelihood=likelihood)
        _CLEAN[key] = call(job, build(job, s), s)
    return _CLEAN[key]


def brute(job: tuple[str, str, str], s: Setup) -> Tensor:
    """The brute-force float64 reference of a job on a batch of one (K-FAC is exact there)."""
    _, curvature, what = job
    model, x, y, lik = s.model, s.x, s.y, s.likelihood
    if what == "jacobians":
        return ref.jacobians(model, x)[0]
    if what == "gradients":
        return ref.per_sample_grads(model, x, y, lik) / (0.5 if lik == "regression" else 1.0)
    if curvature == "fisher":
        J, f = ref.jacobians(model, x)
        cot = curvlib.get_likelihood(lik).mc_cotangents(f, 1, _generator())
        V = torch.einsum("bsc,bcp->bsp", cot, J).flatten(0, 1)
        M = V.T @ V
    else:
        M = {"ggn": ref.ggn, "ef": ref.ef, "hessian": ref.hessian}[curvature](model, x, y, lik)
    if what == "diag":
        return M.diagonal()
    if what == "operator":
        return M @ _V(M.shape[0])
    if what == "kron":
        sizes = [p.numel() for p in model.parameters()]
        blocks, o = [], 0
        for n in sizes:
            blocks.append(M[o : o + n, o : o + n])
            o += n
        return torch.block_diag(*blocks)
    return M


@dataclass
class Outcome:
    """``kind`` on ``job``: ``status`` one of ``STATUSES``, with a one-line detail."""

    status: str
    detail: str = ""


#: refused: named curvlib error before any work, nothing changed, object reusable;
#: ok: a valid input computed the reference numbers
STATUSES = (
    "refused",
    "ok",
    "crash",  # an exception that is not a curvlib error (or TypeError for keywords)
    "unnamed",  # a curvlib error whose message does not name the problem
    "late",  # refused after a backward pass (or after a forward pass it did not need)
    "unclean",  # the model, x.grad or the global RNG changed
    "not-reusable",  # the same object then failed or gave other numbers
    "non-finite",  # returned NaN / inf without a word
    "accepted",  # a bad input silently accepted
    "wrong",  # a valid input gave other numbers than the reference
)


def outcome(kind: Kind, job: tuple[str, str, str], reuse: bool = True) -> Outcome:
    """Run ``kind`` on ``job`` and classify what happened (see the module docstring)."""
    s = kind.make(job)
    model = s.model
    probe = Probe(first_layer(model))
    xs = s.x if isinstance(s.x, Tensor) else None
    xgrad = None if xs is None or xs.grad is None else xs.grad.clone()
    before = _state(model)
    rng = torch.get_rng_state()
    curv = None
    err: BaseException | None = None
    out = None
    with environ(s.env):
        try:
            curv = build(job, s)
            out = call(job, curv, s)
        except Exception as e:  # noqa: BLE001 -- every exception is classified
            err = e
    same = _same_state(before, _state(model))
    probe.handle.remove()
    if not same:
        return Outcome("unclean", "model state changed")
    if not torch.equal(rng, torch.get_rng_state()):
        return Outcome("unclean", "global RNG changed")
    if xs is not None and not (
        (xgrad is None and xs.grad is None)
        or (xgrad is not None and xs.grad is not None and torch.equal(xgrad, xs.grad))
    ):
        return Outcome("unclean", "x.grad changed")
    if kind.valid:
        if err is not None:
            return Outcome("crash", f"{type(err).__name__}: {err}")
        expected = brute(job, s) if kind.reference == "brute" else clean(job, s.likelihood)
        if kind.exact:
            same = torch.equal(out, expected)
            return Outcome("ok" if same else "wrong", "bit for bit" if same else "not bit for bit")
        e = ref.rel_err(out, expected)
        return Outcome("ok" if e < 1e-10 else "wrong", f"relative error {e:.2e}")
    if err is None:
        if out.is_meta:
            return Outcome("accepted", "returned a meta tensor (no numbers)")
        if not bool(torch.isfinite(out).all()):
            return Outcome("non-finite", "returned NaN/inf")
        return Outcome("accepted", "returned a finite result")
    named = isinstance(err, CurvlibError) or (kind.keyword and type(err) is TypeError)
    msg = f"{type(err).__name__}: {err}"
    if not named:
        return Outcome("crash", msg)
    if probe.backward or (probe.forward and not kind.after_forward):
        return Outcome("late", f"{probe.forward} forward, {probe.backward} backward: {msg}")
    if kind.match and not re.search(kind.match, str(err), re.IGNORECASE | re.DOTALL):
        return Outcome("unnamed", msg)
    if reuse and curv is not None and (s.repair is None or s.repair(curv, model)):
        fix = Setup(likelihood=s.likelihood, model=model)
        try:
            again = call(job, curv, fix)
        except Exception as e:  # noqa: BLE001
            return Outcome("not-reusable", f"{type(e).__name__}: {e}")
        e = ref.rel_err(again, clean(job, s.likelihood))
        if e > 1e-10:
            return Outcome("not-reusable", f"relative error {e:.2e} after the refusal")
    return Outcome("refused", msg)


# -- the kinds -------------------------------------------------------------------------------
KINDS: list[Kind] = []


def kind(name: str, group: str, match: str = "", **kw: Any):
    def deco(make: Callable[[tuple[str, str, str]], Setup]):
        KINDS.append(Kind(name, group, make, match, **kw))
        return make

    return deco


def _x(fn: Callable[[Tensor], Any]) -> Callable[[tuple], Setup]:
    return lambda job: Setup(x=fn(data("classification")[0]))


def _y(fn: Callable[[Tensor], Any], likelihood: str = "classification"):
    return lambda job: Setup(likelihood=likelihood, y=fn(data(likelihood)[1]))


def _set(t: Tensor, idx: tuple, value: float) -> Tensor:
    t = t.clone()
    t[idx] = value
    return t


# x
KINDS += [
    Kind("x a string", "x", _x(lambda x: "abc"), "tensor or a dict"),
    Kind("x a list", "x", _x(lambda x: x.tolist()), "tensor or a dict|data set"),
    Kind("x 0-dim", "x", _x(lambda x: x[0, 0]), "batch dimension"),
    Kind("x empty batch", "x", lambda job: Setup(x=data("classification")[0][:0], y=None), "empty"),
    Kind("x on meta", "x", _x(lambda x: x.to("meta")), "on meta.*model is on cpu"),
    Kind("x float32", "x", _x(lambda x: x.float()), "float32.*float64"),
    Kind(
        "x integer (float model)",
        "x",
        _x(lambda x: (x * 10).long()),
        r"forward pass failed.*\(4, 3\).*int64",
        after_forward=True,
    ),
    Kind(
        "x wrong feature count",
        "x",
        _x(lambda x: x[:, :2]),
        r"forward pass failed.*\(4, 2\)",
        after_forward=True,
    ),
    Kind(
        "x wrong rank",
        "x",
        _x(lambda x: x.unsqueeze(-1)),
        r"forward pass failed.*\(4, 3, 1\)",
        after_forward=True,
    ),
    Kind("x complex", "x", _x(lambda x: x.to(torch.complex128)), "complex"),
    Kind("x NaN", "x", _x(lambda x: _set(x, (2, 1), float("nan"))), r"NaN.*\[2\]"),
    Kind("x +inf", "x", _x(lambda x: _set(x, (0, 0), float("inf"))), r"infinite.*\[0\]"),
    Kind(
        "x 1e160 (overflows)",
        "x",
        _x(lambda x: _set(x, (1, 0), 1e160)),
        r"magnitude 1e\+160 at batch indices \[1\].*overflow",
    ),
]


def _no_reuse(curv, model) -> bool:
    """Another model than the clean one: no reuse check."""
    return False


def _dict_setup(inputs: Callable[[Tensor], dict]) -> Callable[[tuple], Setup]:
    def make(job):
        torch.manual_seed(0)
        x, y = data("classification")
        return Setup(model=DictModel(), x=inputs(x), y=y, repair=_no_reuse)

    return make


KINDS += [
    Kind(
        "x dict, wrong batch size",
        "x",
        _dict_setup(
            lambda x: {"input_ids": x, "attention_mask": torch.ones(B - 1, D, dtype=torch.long)}
        ),
        r"batch size 4",
    ),
    Kind(
        "x dict, missing key",
        "x",
        _dict_setup(lambda x: {"features": x}),
        r"no key 'input_ids'",
    ),
]

# valid inputs
_STRIDED = torch.zeros(B, 2 * D, dtype=DT)
_STRIDED[:, ::2] = data("classification")[0]


def _grad_x(with_grad: bool) -> Callable[[tuple], Setup]:
    def make(job):
        x = data("classification")[0].clone().requires_grad_(True)
        if with_grad:
            x.grad = torch.full_like(x, 0.25)
        return Setup(x=x)

    return make


KINDS += [
    Kind("x non-contiguous (strided)", "x", lambda job: Setup(x=_STRIDED[:, ::2]), valid=True),
    Kind(
        "x non-contiguous (transposed)",
        "x",
        lambda job: Setup(x=data("classification")[0].T.contiguous().T),
        valid=True,
    ),
    Kind("x requires grad", "x", _grad_x(False), valid=True),
    Kind("x requires grad, has .grad", "x", _grad_x(True), valid=True),
]


def _batch_of_one(likelihood: str) -> Callable[[tuple], Setup]:
    def make(job):
        x, y = data(likelihood, b=1)
        return Setup(likelihood=likelihood, x=x, y=y)

    return make


KINDS += [
    Kind(
        "batch of one (classification)",
        "x",
        _batch_of_one("classification"),
        valid=True,
        reference="brute",
    ),
    Kind(
        "batch of one (regression)", "x", _batch_of_one("regression"), valid=True, reference="brute"
    ),
]

# y
KINDS += [
    Kind("y missing", "y", _y(lambda y: None), "targets y are required", entries=Y_ENTRIES),
    Kind("y a list", "y", _y(lambda y: y.tolist()), "must be a tensor", entries=Y_ENTRIES),
    Kind("y wrong batch size", "y", _y(lambda y: y[:3]), "batch size 4", entries=Y_ENTRIES),
    Kind("y on meta", "y", _y(lambda y: y.to("meta")), "on meta", entries=Y_ENTRIES),
    Kind(
        "y float (classification)",
        "y",
        _y(lambda y: y.to(DT)),
        "integer class indices",
        entries=Y_ENTRIES,
        after_forward=True,
    ),
    Kind(
        "y bool (classification)",
        "y",
        _y(lambda y: y > 0),
        "integer class indices",
        entries=Y_ENTRIES,
        after_forward=True,
    ),
    Kind(
        "y one-hot",
        "y",
        _y(lambda y: nn.functional.one_hot(y, C).to(DT)),
        "one-hot",
        entries=Y_ENTRIES,
        after_forward=True,
    ),
    Kind(
        "y (B, 1) labels",
        "y",
        _y(lambda y: y.unsqueeze(1)),
        r"shape \(4,\).*squeeze",
        entries=Y_ENTRIES,
        after_forward=True,
    ),
    Kind(
        "y class out of range",
        "y",
        _y(lambda y: y + C),
        r"\[0, 2\] for 3 outputs",
        entries=Y_ENTRIES,
        after_forward=True,
    ),
    Kind(
        "y class negative",
        "y",
        _y(lambda y: y - 10),
        r"\[0, 2\]",
        entries=Y_ENTRIES,
        after_forward=True,
    ),
    Kind("y complex", "y", _y(lambda y: y.to(torch.complex128)), "complex", entries=Y_ENTRIES),
    Kind(
        "y regression wrong shape",
        "y",
        _y(lambda y: y[:, :1], "regression"),
        r"shape \(4, 2\)",
        entries=Y_ENTRIES,
        after_forward=True,
    ),
    Kind(
        "y regression float32",
        "y",
        _y(lambda y: y.float(), "regression"),
        "float64",
        entries=Y_ENTRIES,
        after_forward=True,
    ),
    Kind(
        "y regression integer",
        "y",
        _y(lambda y: y.long(), "regression"),
        "floating point",
        entries=Y_ENTRIES,
        after_forward=True,
    ),
    Kind(
        "y regression NaN",
        "y",
        _y(lambda y: _set(y, (3, 1), float("nan")), "regression"),
        r"NaN.*\[3\]",
        entries=Y_ENTRIES,
    ),
    Kind(
        "y regression -inf",
        "y",
        _y(lambda y: _set(y, (0, 0), -float("inf")), "regression"),
        r"infinite.*\[0\]",
        entries=Y_ENTRIES,
    ),
    Kind(
        "y regression 1e200 (loss overflows)",
        "y",
        _y(lambda y: _set(y, (0, 0), 1e200), "regression"),
        r"regression targets reach magnitude 1e\+200 at batch indices \[0\].*overflow",
        entries=Y_ENTRIES,
    ),
]
for _dt in (torch.int32, torch.uint8, torch.int8):
    KINDS.append(
        Kind(
            f"y {str(_dt).removeprefix('torch.')} labels",
            "y",
            _y(lambda y, dt=_dt: y.to(dt)),
            entries=Y_ENTRIES,
            valid=True,
            exact=True,
        )
    )


# N
def _N(value: Any) -> Callable[[tuple], Setup]:
    return lambda job: Setup(N=value)


KINDS += [
    Kind("N = 0", "N", _N(0), "positive integer", entries=STRUCTS),
    Kind("N = -5", "N", _N(-5), "positive integer", entries=STRUCTS),
    Kind("N = 7.9", "N", _N(7.9), "positive integer", entries=STRUCTS),
    Kind("N = inf", "N", _N(float("inf")), "positive integer", entries=STRUCTS),
    Kind("N = nan", "N", _N(float("nan")), "positive integer", entries=STRUCTS),
    Kind("N = 10**30", "N", _N(10**30), r"at most 2\*\*53", entries=STRUCTS),
    Kind("N < batch size", "N", _N(B - 1), "at least the batch size 4", entries=STRUCTS),
    Kind("N a string", "N", _N("10"), "positive integer", entries=STRUCTS),
    Kind("N a bool", "N", _N(True), "positive integer", entries=STRUCTS),
    Kind("N a 2-entry tensor", "N", _N(torch.tensor([8, 8])), "positive integer", entries=STRUCTS),
    Kind(
        "N a 0-dim integer tensor",
        "N",
        _N(torch.tensor(B)),
        entries=STRUCTS,
        valid=True,
        exact=True,
    ),
    Kind("N = batch size as float 4.0", "N", _N(float(B)), entries=STRUCTS, valid=True, exact=True),
]

# generators (per call)
GEN_ENTRIES = ("full", "diag", "kron", "operator")
KINDS += [
    Kind(
        "generator an int",
        "generator",
        lambda job: Setup(call={"generator": 42}),
        "torch.Generator",
        entries=GEN_ENTRIES,
    ),
    Kind(
        "generator list of wrong length",
        "generator",
        lambda job: Setup(call={"generator": [_generator() for _ in range(B - 1)]}),
        r"3 generators.*batch of 4",
        entries=GEN_ENTRIES,
    ),
    Kind(
        "generator list with a non-generator",
        "generator",
        lambda job: Setup(call={"generator": [_generator(), 1, _generator(), _generator()]}),
        "torch.Generator",
        entries=GEN_ENTRIES,
    ),
]


# subnetwork_indices
def _no_subnet(curv, model) -> bool:
    curv.subnetwork_indices = None
    return True


def _sub(value: Any) -> Callable[[tuple], Setup]:
    return lambda job: Setup(ctor={"subnetwork_indices": value}, repair=_no_subnet)


P = sum(p.numel() for p in _TEMPLATES["classification"].parameters())
SUB_ENTRIES = ("full", "diag", "kron", "operator", "jacobians", "gradients")
KINDS += [
    Kind(
        "subnetwork bool mask of wrong length",
        "subnetwork",
        _sub(torch.ones(P - 1, dtype=torch.bool)),
        rf"shape \({P},\)",
    ),
    Kind(
        "subnetwork duplicated indices", "subnetwork", _sub(torch.tensor([0, 2, 2])), "duplicates"
    ),
    Kind(
        "subnetwork index out of range",
        "subnetwork",
        _sub(torch.tensor([0, P])),
        rf"\[0, {P - 1}\]",
    ),
    Kind(
        "subnetwork negative index", "subnetwork", _sub(torch.tensor([-1, 3])), rf"\[0, {P - 1}\]"
    ),
    Kind("subnetwork float tensor", "subnetwork", _sub(torch.tensor([0.0, 1.0])), "integer"),
    Kind("subnetwork 2-D", "subnetwork", _sub(torch.tensor([[0, 1]])), "1-D"),
    Kind("subnetwork empty", "subnetwork", _sub(torch.tensor([], dtype=torch.long)), "empty"),
    Kind("subnetwork a string", "subnetwork", _sub("first"), "subnetwork_indices"),
]


# models
def _model(make_model: Callable[[], nn.Module], x: Callable[[Tensor], Tensor] = lambda x: x):
    def make(job):
        xv, y = data("classification")
        return Setup(model=make_model(), x=x(xv), y=y, repair=_no_reuse)

    return make


def _mixed() -> nn.Module:
    m = mlp()
    m[2].float()
    return m


def _train_mode(layer: nn.Module) -> Callable[[], nn.Module]:
    return lambda: mlp(middle=layer).train()


KINDS += [
    Kind(
        "model float16",
        "model",
        _model(lambda: mlp().half(), lambda x: x.half()),
        "float16.*float32 or float64 copy",
    ),
    Kind(
        "model bfloat16",
        "model",
        _model(lambda: mlp().bfloat16(), lambda x: x.bfloat16()),
        "bfloat16",
    ),
    Kind("model of mixed dtypes", "model", _model(_mixed), "mixes dtypes"),
    Kind(
        "model without trainable parameters",
        "model",
        _model(lambda: mlp().requires_grad_(False)),
        "no parameters with requires_grad",
    ),
    Kind(
        "model dropout in training mode",
        "model",
        _model(_train_mode(nn.Dropout(0.3))),
        r"module '2' \(Dropout\).*training mode.*eval\(\)",
    ),
    Kind(
        "model batchnorm in training mode",
        "model",
        _model(_train_mode(nn.BatchNorm1d(H))),
        r"module '2' \(BatchNorm1d\).*training mode",
    ),
    Kind(
        "model on meta", "model", _model(lambda: mlp().to("meta"), lambda x: x.to("meta")), "meta"
    ),
]


# options
def _ctor(**ctor: Any) -> Callable[[tuple], Setup]:
    return lambda job: Setup(ctor=ctor)


def _factory(**ctor: Any) -> Callable[[tuple], Setup]:
    return lambda job: Setup(ctor=ctor, factory=True)


def _percall(**kw: Any) -> Callable[[tuple], Setup]:
    return lambda job: Setup(call=kw)


def _keyword(name: str) -> str:
    return rf"'{name}'.*accepted"


KINDS += [
    Kind(
        "constructor no_such_option=",
        "options",
        _ctor(no_such_option=1),
        _keyword("no_such_option"),
        keyword=True,
    ),
    Kind(
        "constructor num_sampels=",
        "options",
        _ctor(num_sampels=2),
        _keyword("num_sampels"),
        keyword=True,
    ),
    Kind(
        "make_curvature generater=",
        "options",
        _factory(generater=_generator()),
        _keyword("generater"),
        keyword=True,
    ),
    Kind(
        "make_curvature no_such_option=",
        "options",
        _factory(no_such_option=1),
        _keyword("no_such_option"),
        keyword=True,
    ),
    Kind(
        "call generater=",
        "options",
        _percall(generater=_generator()),
        _keyword("generater"),
        keyword=True,
    ),
    Kind(
        "call num_sampels=",
        "options",
        _percall(num_sampels=2),
        _keyword("num_sampels"),
        keyword=True,
    ),
    Kind(
        "call no_such_option=",
        "options",
        _percall(no_such_option=1),
        _keyword("no_such_option"),
        keyword=True,
    ),
    Kind(
        "constructor kfac_approx unknown",
        "options",
        _ctor(kfac_approx="exact"),
        "kfac_approx.*'expand'",
    ),
    Kind(
        "call kfac_approx unknown",
        "options",
        _percall(kfac_approx="exact"),
        "kfac_approx.*'expand'",
        entries=STRUCTS,
    ),
    Kind(
        "constructor num_samples = 0", "options", _ctor(num_samples=0), "num_samples", keyword=True
    ),
    Kind(
        "call num_samples = 0", "options", _percall(num_samples=0), "num_samples", entries=STRUCTS
    ),
    Kind(
        "call num_samples = 2.5",
        "options",
        _percall(num_samples=2.5),
        "num_samples",
        entries=STRUCTS,
    ),
    Kind(
        "constructor memory_limit garbage",
        "options",
        _ctor(memory_limit="lots"),
        "memory_limit.*'lots'",
    ),
    Kind(
        "constructor memory_limit negative",
        "options",
        _ctor(memory_limit=-1),
        "memory_limit.*non-negative",
    ),
    Kind(
        "CURVLIB_MEMORY_LIMIT garbage",
        "options",
        lambda job: Setup(env={"CURVLIB_MEMORY_LIMIT": "12 apples"}),
        "CURVLIB_MEMORY_LIMIT.*'12 apples'",
    ),
    Kind(
        "likelihood unknown",
        "options",
        lambda job: Setup(lik="gaussian"),
        "unknown likelihood 'gaussian'",
    ),
    Kind("last_layer without a last layer", "options", _ctor(last_layer=True), "last_layer"),
]


# -- the tests ----------------------------------------------------------------------------------
def applicable(k: Kind) -> list[tuple[str, str, str]]:
    return [j for j in JOBS if j[2] in k.entries]


def outcomes(k: Kind, entry: str | None = None) -> dict[tuple[str, str, str], Outcome]:
    """Every applicable job's outcome (only ``entry``'s if given); the object is reused
    after the refusal on a rotating share of the jobs (every job and every kind at least
    once over the table)."""
    i = KINDS.index(k)
    jobs = applicable(k)
    return {
        j: outcome(k, j, reuse=(n + i) % REUSE_EVERY == 0)
        for n, j in enumerate(jobs)
        if entry is None or j[2] == entry
    }


REUSE_EVERY = 4


assert len(KINDS) >= 50
assert len({k.name for k in KINDS}) == len(KINDS)


def _expect(k: Kind, results: dict) -> None:
    want = "ok" if k.valid else "refused"
    bad = {j: o for j, o in results.items() if o.status != want}
    assert not bad, "\n".join(
        f"{'-'.join(j)}: {o.status}: {o.detail[:300]}" for j, o in bad.items()
    )


@pytest.mark.parametrize("k", KINDS, ids=[k.name for k in KINDS])
def test_kind(k: Kind) -> None:
    results = outcomes(k)
    _expect(k, results)


# -- saved structures ----------------------------------------------------------------------
def _kron() -> curvlib.Kron:
    return curvlib.Kron(
        [[torch.eye(2, dtype=DT), 2 * torch.eye(3, dtype=DT)], [torch.eye(2, dtype=DT)]]
    )


BAD_STATES = {
    "None": (None, "must be a dict"),
    "a string": ("kfacs", "must be a dict"),
    "kfacs None": ({"kfacs": None}, "'kfacs' must be a list"),
    "empty": ({}, "missing keys"),
    "NaN factor": ({"kfacs": [[torch.full((2, 2), float("nan"), dtype=DT)]]}, "non-finite"),
    "inf factor": ({"kfacs": [[torch.full((2, 2), float("inf"), dtype=DT)]]}, "non-finite"),
}


@pytest.mark.parametrize("row", list(BAD_STATES))
@pytest.mark.parametrize("cls", ["Kron", "KronDecomposed"])
def test_bad_state_dicts(cls, row):
    """``from_state_dict`` and ``load_state_dict`` refuse by name; the target is unchanged."""
    value, match = BAD_STATES[row]
    target = _kron() if cls == "Kron" else _kron().decompose()
    Klass = type(target)
    before = target.to_matrix()
    if cls == "KronDecomposed" and isinstance(value, dict) and value:
        match = "missing keys"  # a Kron state dict is not a KronDecomposed one
    with pytest.raises(CurvlibError, match=match):
        Klass.from_state_dict(value)
    with pytest.raises(CurvlibError, match=match):
        target.load_state_dict(value)
    assert torch.equal(target.to_matrix(), before)
    again = Klass.from_state_dict(target.state_dict())
    assert torch.equal(again.to_matrix(), before)


# -- the command line's configuration -------------------------------------------------------
BAD_CONFIGS = {
    "out a list": (b"out = [1, 2]\n", "out must be a folder name (a string), got [1, 2]"),
    "seed a string": (b'seed = "abc"\n', "seed must be an integer >= 0, got 'abc'"),
    "seed beyond 2**64": (b"seed = 99999999999999999999\n", "seed must be an integer <= 1844"),
    "unknown key": (b"colour = 1\n", "unknown key 'colour'"),
    "unknown backend in a string": (b'backends = "jax"\n', "unknown backend 'jax'"),
    "not TOML": (b"seed = = 1\n", "is not valid TOML"),
    "not UTF-8": (b"\xff\xfe\x00seed", "not UTF-8 text"),
    "a directory": (None, "cannot be read"),
}


@pytest.mark.parametrize("row", list(BAD_CONFIGS))
def test_bad_config_is_one_line_and_exit_2(row, tmp_path, capsys):
    from curvlib.cli import main

    text, message = BAD_CONFIGS[row]
    cfg = tmp_path / "c.toml"
    if text is None:
        cfg.mkdir()
    else:
        cfg.write_bytes(text)
    out = tmp_path / "o"
    assert main(["demo", "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curvlib: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()


def test_config_backends_string_is_one_backend(tmp_path):
    from curvlib.cli import _demo_options, _parser

    cfg = tmp_path / "c.toml"
    cfg.write_text('backends = "autograd"\nseed = 18446744073709551615\n')
    opts = _demo_options(_parser().parse_args(["demo", "--config", str(cfg)]))
    assert opts["backends"] == ["autograd"] and opts["seed"] == 2**64 - 1


# -- a failure of the user's forward: an InputError chained from it ------------------------
@pytest.mark.parametrize("backend", sorted({j[0] for j in JOBS}))
def test_forward_failure_is_chained(backend):
    x, y = data("classification")
    for what, bad in (("full", (x * 10).long()), ("jacobians", x[:, :2])):
        curv = backend_class(backend, "ggn")(model_for("classification"), "classification")
        with pytest.raises(curvlib.InputError, match="forward pass failed") as info:
            curv.full(bad, y) if what == "full" else curv.jacobians(bad)
        cause = info.value.__cause__
        assert isinstance(cause, RuntimeError) and not isinstance(cause, CurvlibError)
        assert str(cause) in str(info.value)  # the original message is quoted
