r"""curvlib's rows: every registered backend × curvature × structure, and the operator.

A :class:`Case` is one row before it is measured: who computes what, and an untimed
``setup()`` that returns the timed call (which returns the result). A case without a setup
carries the reason it is not timed in ``status`` (``unsupported: …`` for a structure the
class does not offer, ``skipped: …`` for a size limit, ``--quick`` or a pending structure
of the workload). Refusals by curvlib at call time (a ``CurvlibError`` or
``NotImplementedError``) become rows with status ``refused: <error>`` when measured.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import curvlib
from curvlib.backends import registry

from .workloads import Workload

__all__ = ["MAX_FULL_P", "QUICK_FULL_P", "STRUCTURES", "Case", "curvlib_cases", "loss_sum"]

MAX_FULL_P = 20_000  # dense full matrices only up to this many parameters
QUICK_FULL_P = 6_000  # --quick: full only up to this many parameters, autograd only
STRUCTURES = ("diag", "kron", "full")
QUICK_FULL = "skipped: --quick times full for curvlib:autograd's EF only"
QUICK_FULL_SIZE = f"skipped: --quick times full only where P ≤ {QUICK_FULL_P:,}"


@dataclass
class Case:
    """One row before it is measured.

    Attributes
    ----------
    library : str
        ``curvlib:<backend>``, ``curvlib:all`` (the operator), ``laplace:<Class>``,
        ``backpack:<Extension>``, ``asdl:<fisher type>``, ``curvlinops:<Operator>``,
        ``bound:dense``.
    curvature, structure : str
        ``ggn`` / ``fisher`` / ``ef`` / ``hessian``; ``diag`` / ``kron`` / ``full`` /
        ``operator``.
    setup : callable or None
        Untimed; returns the timed call. ``None``: the row is not timed (see ``status``).
    status : str
        Why a row without ``setup`` is not timed.
    note : str
        Shown in the report.
    compare : bool
        Whether agreement with the autograd result is meaningful (not for other libraries'
        MC samples).
    bound : bool
        A reference computation (the dense contraction), not a curvature.
    canon : callable or None
        Turns the call's raw result into a curvlib-shaped one (``Kron`` factors in
        curvlib's normalization, a flat diagonal) before the agreement; outside the timing.
    """

    library: str
    curvature: str
    structure: str
    setup: Callable[[], Callable[[], Any]] | None
    status: str = ""
    note: str = ""
    compare: bool = True
    bound: bool = False
    canon: Callable[[Any], Any] | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.library, self.curvature, self.structure)


def loss_sum(likelihood: str) -> torch.nn.Module:
    """The summed loss of the likelihood (without curvlib's factor 1/2 for regression)."""
    if likelihood == "classification":
        return torch.nn.CrossEntropyLoss(reduction="sum")
    return torch.nn.MSELoss(reduction="sum")


def _pending(w: Workload, backend: str, curv: str, structure: str) -> str:
    """The skip reason of a pending structure that curvlib does not support yet, or ''."""
    reason = w.pending.get(structure)
    if not reason:
        return ""
    report = curvlib.supports(w.model, backend, curv, structure)
    if report.supported:
        return ""
    missing = sorted({r["type"] for r in report.rows if not r["covered"]})
    return f"skipped: {reason} (curvlib.supports: not covered: {', '.join(missing)})"


def curvlib_cases(
    w: Workload, quick: bool, after: bool = False, reduced: bool = False
) -> list[Case]:
    """Every curvlib backend × curvature × structure (autograd first: the reference), then
    the matrix-free operator (``curvlib:all``, one implementation shared by every backend).

    ``after`` with ``quick``: the rows of the after-the-anchors phase, ``diag`` and ``kron``
    only (the others are left out, not listed). ``reduced``: the autograd backend only
    (``--quick`` on every workload but the MLP)."""
    cases = []
    P, B = w.num_params, len(w.y)
    order = ["autograd"] if reduced else sorted(registry(), key=lambda b: b != "autograd")
    for backend in order:
        label = f"curvlib:{backend}"
        for curv in registry()[backend]:
            try:
                cls = curvlib.backend_class(backend, curv)
            except ImportError as err:  # an optional library is missing
                for s in STRUCTURES:
                    cases.append(Case(label, curv, s, None, f"unavailable: {err}"))
                continue
            for structure in ("diag", "kron") if quick and after else STRUCTURES:
                status = ""
                if structure not in cls.structures:
                    status = f"unsupported: {cls.__name__} has no {structure}"
                elif structure == "full" and P > MAX_FULL_P:
                    status = f"skipped: P = {P:,} > {MAX_FULL_P:,}"
                elif structure == "full" and quick and P > QUICK_FULL_P:
                    status = QUICK_FULL_SIZE
                elif structure == "full" and quick and (backend != "autograd" or curv != "ef"):
                    status = QUICK_FULL
                else:
                    status = _pending(w, backend, curv, structure)
                if status:
                    cases.append(Case(label, curv, structure, None, status))
                    continue

                def setup(cls=cls, structure=structure, curv=curv):
                    obj = cls(copy.deepcopy(w.model), w.likelihood)
                    kw: dict[str, Any] = {"N": B} if structure == "kron" else {}

                    def call():
                        if curv == "fisher":
                            kw["generator"] = torch.Generator(w.x.device).manual_seed(0)
                        return getattr(obj, structure)(w.x, w.y, **kw)[1]

                    return call

                cases.append(Case(label, curv, structure, setup))
    v = operator_vector(w)
    for curv in () if quick and after else ("ggn", "fisher", "ef", "hessian"):
        cls = curvlib.backend_class("autograd", curv)

        def setup(cls=cls, curv=curv):
            obj = cls(copy.deepcopy(w.model), w.likelihood)
            kw = {}
            if curv == "fisher":
                kw["generator"] = torch.Generator(w.x.device).manual_seed(0)
            op = obj.operator(w.x, w.y, **kw)
            return lambda: op @ v

        cases.append(
            Case(
                "curvlib:all",
                curv,
                "operator",
                setup,
                note="curvlib.linops, shared by every backend; one product C·v",
            )
        )
    return cases


def operator_vector(w: Workload) -> torch.Tensor:
    """The fixed vector ``v`` of the operator rows."""
    g = torch.Generator().manual_seed(2)
    return torch.randn(w.num_params, generator=g).to(w.x.device)
