"""The oracle: one entry point of one backend on one case against the brute force.

:func:`check` is the whole contract of a call, in float64:

* whether the call may run is read from the capability table, through
  :func:`curvlib.supports` (the call's own checks plus one recorded forward pass), never
  hand-written;
* where supported, the call succeeds and its result equals the brute force of
  ``tests/reference.py`` to :data:`TOL` relative: ``full``, ``diag`` and ``operator`` (``op @
  eye`` for small ``P``, else ``op @ V`` for random columns) the dense matrix; ``kron`` the
  block diagonal of the dense matrix where K-FAC is exact (an MLP on one data point),
  elsewhere the loop definitions of K-FAC (:func:`reference.kron_reference`); ``jacobians``
  and ``gradients`` the per-sample loops; the MC Fisher the brute-force Jacobians with the
  likelihood's cotangents drawn from an identically seeded generator; and the model is left
  as it was;
* where not supported, the call raises a :class:`curvlib.CurvlibError` before any backward
  pass and leaves the model as it was.

:func:`jobs` enumerates ``(backend, curvature, entry)`` from the registry when called, so a
backend registered later (``tests/test_dummy_backend.py``) gets the same checks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import known_bugs
import pytest
import reference as ref
import torch
from cases import CASES
from torch import Tensor, nn

import curvlib
from curvlib.backends import backend_class, registry
from curvlib.capabilities import ENTRY_POINTS

TOL = 1e-10
SEED = 5  # the MC Fisher's generator
NUM_SAMPLES = 3  # MC samples per data point
CASE_BY_NAME = {c.name: c for c in CASES}


@dataclass(frozen=True)
class Entry:
    """An entry point of the capability table, with the options it is called with."""

    name: str
    what: str
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __str__(self) -> str:
        return self.name


#: every entry point of the capability table, and K-FAC's ``reduce`` variant
ENTRIES = tuple(Entry(what, what) for what in ENTRY_POINTS) + (
    Entry("kron_reduce", "kron", {"kfac_approx": "reduce"}),
)
ENTRY = {e.name: e for e in ENTRIES}


def params(jobs_: list[tuple[str, str, Entry]], models: list[str]) -> list:
    """``pytest.param(backend, curvature, entry, model)``, known bugs marked (known_bugs.py)."""
    out = []
    for job in jobs_:
        for model in models:
            marks = known_bugs.marks(job[0], job[1], job[2].name, model)
            out.append(pytest.param(*job, model, marks=marks, id=f"{job_id(job)}-{model}"))
    return out


def jobs(backends: list[str] | None = None) -> list[tuple[str, str, Entry]]:
    """Every ``(backend, curvature, entry)`` of the registry (as it is now)."""
    return [
        (backend, curvature, entry)
        for backend, curvatures in registry().items()
        if backends is None or backend in backends
        for curvature in curvatures
        for entry in ENTRIES
    ]


def job_id(job: tuple[str, str, Entry]) -> str:
    return "-".join(map(str, job))


def get_class(backend: str, curvature: str) -> type:
    try:
        return backend_class(backend, curvature)
    except ImportError as err:  # an optional library that is absent
        pytest.skip(f"backend {backend!r} unavailable: {err}")


def options(curvature: str, entry: Entry) -> dict[str, Any]:
    """Constructor options of the job (MC samples for the Fisher, the K-FAC variant)."""
    opts = dict(entry.options)
    if curvature == "fisher":
        opts["num_samples"] = NUM_SAMPLES
    return opts


def num_data(case) -> int:
    """``N`` of a ``kron`` call: the batch where K-FAC is exact, else more than the batch."""
    return case.batch if case.kron_exact else case.batch + 3


#: up to this many selected parameters the operator is compared as a dense matrix
#: (``op @ eye``); above, on :data:`COLUMNS` random columns (each column costs one
#: Jacobian-vector and one vector-Jacobian product)
DENSE_OPERATOR = 24
COLUMNS = 6


def probe_columns(P: int) -> Tensor:
    """What the operator is applied to: ``eye(P)`` for small ``P``, else random columns."""
    if P <= DENSE_OPERATOR:
        return torch.eye(P, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    return torch.randn(P, COLUMNS, dtype=torch.float64, generator=g)


# -- the call ---------------------------------------------------------------------------
@dataclass
class Problem:
    """One model and batch to run an entry point on (a shared case or a zoo model)."""

    model: nn.Module
    x: Any
    y: Tensor
    likelihood: str
    last_layer: bool = False
    subnet: Tensor | None = None
    N: int | None = None

    @classmethod
    def of(cls, case) -> Problem:
        model, x, y, subnet = case.make()
        return cls(model, x, y, case.likelihood, case.last_layer, subnet, num_data(case))


def report(backend: str, curvature: str, entry: Entry, pb: Problem) -> curvlib.SupportReport:
    """What the capability table says about this call (with the forward-pass checks)."""
    return curvlib.supports(
        pb.model,
        backend,
        curvature,
        entry.what,
        last_layer=pb.last_layer,
        x=pb.x,
        y=pb.y,
        likelihood=pb.likelihood,
        subnetwork_indices=pb.subnet,
        **options(curvature, entry),
    )


def call(
    backend: str, curvature: str, entry: Entry, pb: Problem, V: Tensor | None = None
) -> tuple[Tensor | None, Tensor]:
    """Run the entry point: ``(loss or None, the result as a dense tensor)``.

    ``operator`` returns ``op @ V`` (default ``op @ eye``, the dense matrix); ``kron``
    ``Kron.to_matrix()``; ``gradients`` the gradients of the reported loss (with
    ``factor``).
    """
    cls = get_class(backend, curvature)
    curv = cls(
        pb.model,
        pb.likelihood,
        last_layer=pb.last_layer,
        subnetwork_indices=pb.subnet,
        **options(curvature, entry),
    )
    kw = {"generator": torch.Generator().manual_seed(SEED)} if curvature == "fisher" else {}
    x, y, what = pb.x, pb.y, entry.what
    if what == "jacobians":
        Js, f = curv.jacobians(x)
        return None, Js
    if what == "gradients":
        Gs, loss = curv.gradients(x, y)
        return loss * curv.factor, Gs * curv.factor  # gradients() leave out the factor
    if what == "operator":
        op = curv.operator(x, y, **kw)
        return None, op @ (probe_columns(op.shape[0]) if V is None else V)
    if what == "kron":
        loss, K = curv.kron(x, y, N=pb.N, **kw)
        return loss, K.to_matrix()
    if what in STRUCTURED:
        loss, S = getattr(curv, what)(x, y, **kw)
        return loss, structured_summary(what, S)
    return getattr(curv, what)(x, y, **kw)


#: entry points whose result is compared through what determines it exactly
#: (their full numbers: tests/test_structured.py)
STRUCTURED = ("ekfac", "blocks", "lowrank")


def structured_summary(what: str, S) -> Tensor:
    """What the brute force fixes of a structure: ``blocks`` its dense matrix (with its
    block sizes as the last row), ``lowrank`` (remainder ``"diag"``) its diagonal, ``ekfac``
    its trace per entry (eigenvalues ``diag(Uᵀ C U)`` in any orthonormal basis ``U`` keep
    the trace of the entry's exact block)."""
    if what == "blocks":
        M = S.to_matrix()
        row = torch.zeros(1, M.shape[0], dtype=M.dtype)
        row[0, : len(S.sizes)] = torch.tensor(S.sizes, dtype=M.dtype)
        return torch.cat([M, row])
    if what == "lowrank":
        return S.diag()
    return S.diag().sum().reshape(1)


def structured_expected(what: str, H: Tensor, got: Tensor) -> Tensor:
    """The brute-force value of :func:`structured_summary` from the dense matrix ``H``."""
    if what == "blocks":
        sizes = [int(s) for s in got[-1].tolist() if s > 0]
        want = ref.blocks_of(sizes, H)
        row = torch.zeros(1, H.shape[0], dtype=H.dtype)
        row[0, : len(sizes)] = torch.tensor(sizes, dtype=H.dtype)
        return torch.cat([want, row])
    if what == "lowrank":
        return H.diagonal()
    return H.diagonal().sum().reshape(1)


# -- the references -----------------------------------------------------------------------
@functools.cache
def _dense(case_name: str, curvature: str) -> Tensor:
    case = CASE_BY_NAME[case_name]
    model, x, y, _ = case.make()
    lik, ll = case.likelihood, case.last_layer
    if curvature == "fisher":
        return ref.mc_fisher(model, x, y, lik, NUM_SAMPLES, SEED, ll)
    return {"ggn": ref.ggn, "ef": ref.ef, "hessian": ref.hessian}[curvature](model, x, y, lik, ll)


@functools.cache
def _kron(case_name: str, curvature: str, approx: str) -> Tensor:
    case = CASE_BY_NAME[case_name]
    model, x, y, _ = case.make()
    H = _dense(case_name, curvature)
    module = model.last_layer if case.last_layer else model
    sizes = [p.numel() for p in module.parameters() if p.requires_grad]
    if case.kron_exact:
        return ref.blocks_of(sizes, H)
    mc = {"num_samples": NUM_SAMPLES, "seed": SEED} if curvature == "fisher" else {}
    M = ref.output_matrices(curvature, model, x, y, case.likelihood, case.last_layer, **mc)
    N = num_data(case)
    return ref.kron_reference(model, x, y, case.likelihood, M, approx, N, H, case.last_layer)


@functools.cache
def _first_order(case_name: str, what: str) -> Tensor:
    case = CASE_BY_NAME[case_name]
    model, x, y, _ = case.make()
    if what == "jacobians":
        return ref.jacobians(model, x, case.last_layer)[0]
    return ref.per_sample_grads(model, x, y, case.likelihood, case.last_layer)


@functools.cache
def _loss(case_name: str) -> Tensor:
    case = CASE_BY_NAME[case_name]
    model, x, y, _ = case.make()
    return ref.loss(model, x, y, case.likelihood)


def expected(case, curvature: str, entry: Entry, got: Tensor | None = None) -> Tensor:
    """The brute-force value of ``entry`` (restricted to the case's subnetwork)."""
    idx = case.make()[3]
    what = entry.what
    if what in ("jacobians", "gradients"):
        return ref.sub_vec(_first_order(case.name, what), idx)
    if what == "kron":
        return _kron(case.name, curvature, entry.options.get("kfac_approx", "expand"))
    if what not in ("full", "diag", "operator") + STRUCTURED:
        raise NotImplementedError(f"the oracle has no reference for entry point {what!r}")
    H = ref.sub_full(_dense(case.name, curvature), idx)
    if what in STRUCTURED:
        return structured_expected(what, H, got)
    if what == "operator":
        return H @ probe_columns(H.shape[0])
    return H.diagonal() if what == "diag" else H


# -- the check ------------------------------------------------------------------------------
class BackwardProbe:
    """Counts backward passes through the output of any leaf module of ``model``.

    Registered before the model's state is recorded: it is user state that must survive.
    """

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        for m in model.modules():
            if not list(m.children()):
                m.register_forward_hook(self._hook)

    def _hook(self, mod: nn.Module, args: tuple, out: Any) -> None:
        if isinstance(out, Tensor) and out.requires_grad:
            out.register_hook(self._count)

    def _count(self, grad: Tensor) -> None:
        self.count += 1


def expect_refusal(run, model: nn.Module, why: str = "") -> BaseException:
    """``run()`` raises a curvlib error before any backward pass; the model is unchanged."""
    probe = BackwardProbe(model)
    before = ref.model_state(model)
    rng = torch.get_rng_state()
    with pytest.raises(curvlib.CurvlibError) as info:
        run()
    ref.assert_same_state(before, ref.model_state(model))
    assert torch.equal(rng, torch.get_rng_state()), "a refused call moved the global RNG"
    assert probe.count == 0, f"{probe.count} backward passes before the refusal ({why})"
    return info.value


def check(backend: str, curvature: str, entry: Entry, case) -> str:
    """The oracle (module docstring); returns ``"computed"`` or ``"refused"``."""
    get_class(backend, curvature)
    pb = Problem.of(case)
    rep = report(backend, curvature, entry, pb)
    if not rep.supported:
        expect_refusal(lambda: call(backend, curvature, entry, pb), pb.model, str(rep))
        return "refused"
    before = ref.model_state(pb.model)
    loss, got = call(backend, curvature, entry, pb)
    ref.assert_same_state(before, ref.model_state(pb.model))
    want = expected(case, curvature, entry, got)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = ref.rel_err(got, want)
    assert err < TOL, f"relative error {err:.3g} against the brute force"
    if loss is not None:
        assert ref.rel_err(loss, _loss(case.name)) < TOL
    return "computed"
