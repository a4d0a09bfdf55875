"""What each backend supports: :func:`available` (the table) and :func:`supports` (a model).

Both read the capability table (:mod:`curvlib.capabilities`) and nothing else, through the
same checks a call runs before any work, so :func:`supports` agrees with the call: given an
input ``x`` (and targets ``y``), it runs every check of the call's template — inputs, the
capability row, the size estimate — plus one forward pass (no backward pass) for the checks
that need it (modules called twice, BackPACK's chain of modules, outputs with positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from curvlib._checks import Records
from curvlib.backends import backend_class, registry
from curvlib.capabilities import ENTRY_POINTS, row
from curvlib.errors import CurvlibError

__all__ = ["available", "supports", "SupportReport"]


def available() -> dict[str, dict[str, dict[str, Any]]]:
    """What each registered backend supports: ``{backend: {curvature: capabilities}}``.

    Per curvature: the class name, its structures and, per entry point, the row of the
    capability table (how it is computed — ``impl`` ``native`` or curvlib's ``shared``
    implementation —, exactness, memory model, module types, likelihoods, dict inputs,
    K-FAC variants, ...). Backend ``auto`` also lists the backends it tries (``picks``). A
    backend whose library cannot be imported is listed with ``{"error": message}``.
    """
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for name, curvatures in registry().items():
        table[name] = {}
        for curv in curvatures:
            try:
                cls = backend_class(name, curv)
            except ImportError as err:  # an optional library is missing
                table[name][curv] = {"error": f"{type(err).__name__}: {err}"}
                continue
            rows = row(name, curv)
            entry: dict[str, Any] = {
                "class": cls.__name__,
                "structures": list(cls.structures_of(curv)),
                "entry_points": {k: rows[k].describe() for k in ENTRY_POINTS if k in rows},
            }
            if hasattr(cls, "preferences"):  # backend "auto": which backend it picks
                entry["picks"] = {s: list(b) for s, b in cls.preferences(curv).items()}
            table[name][curv] = entry
    return table


@dataclass
class SupportReport:
    """Per-parameter coverage of ``(backend, curvature, structure)`` on a model.

    Attributes
    ----------
    rows : list of dict
        One per trainable parameter: ``name``, ``module``, ``type``, ``covered`` (bool),
        ``how`` (the computation that covers it) and ``reason`` (why not).
    blocking : list of str
        What makes the whole call fail (a module the library cannot pass, an input, a
        limit), each with its reason.
    checked_forward : bool
        Whether the checks needing the forward pass ran (an input was given).
    """

    backend: str
    curvature: str
    structure: str
    rows: list[dict[str, Any]]
    blocking: list[str]
    checked_forward: bool = False

    @property
    def supported(self) -> bool:
        """Whether the call would run and cover every selected parameter."""
        return not self.blocking and all(r["covered"] for r in self.rows)

    def __bool__(self) -> bool:
        return self.supported

    def __str__(self) -> str:
        head = f"{self.backend}:{self.curvature} {self.structure}: " + (
            "supported" if self.supported else "NOT supported"
        )
        if not self.checked_forward:
            head += " (static checks; pass x to check the forward pass too)"
        lines = [head] + [f"  blocking: {b}" for b in self.blocking]
        for r in self.rows:
            mark = "ok " if r["covered"] else "NO "
            extra = r["how"] if r["covered"] else r["reason"]
            lines.append(f"  {mark}{r['name']} ({r['type']}): {extra}")
        return "\n".join(lines)


def _param_rows(curv: Any, structure: str, problems: list) -> list[dict[str, Any]]:
    from curvlib.kfac import coverage

    cap = curv.capability(structure)
    bad = {id(p.module): p.reason for p in problems if p.module is not None}
    cov = coverage(curv._model, curv.params) if structure == "kron" else None
    index = {id(p): i for i, p in enumerate(curv.params)}
    rows = []
    for path, mod in curv._model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) not in index:
                continue
            name = f"{path}.{pname}" if path else pname
            reason = bad.get(id(mod), "")
            if cap.handles(mod):
                how = f"{cap.impl} ({cap.note})" if cap.note else cap.impl
            else:
                how = "curvlib's K-FAC rules"
            if cov is not None and (cap.modules is None or not cap.handles(mod)):
                how = cov.describe(index[id(p)])
            rows.append(
                {
                    "name": name,
                    "module": path,
                    "type": type(mod).__name__,
                    "covered": not reason,
                    "how": how,
                    "reason": reason,
                }
            )
            index.pop(id(p))
    return rows


def supports(
    model: nn.Module,
    backend: str,
    curvature: str = "ggn",
    structure: str = "diag",
    last_layer: bool = False,
    x: Any = None,
    y: Any = None,
    **options: Any,
) -> SupportReport:
    """Report, parameter by parameter, whether ``backend`` computes ``structure`` on ``model``.

    Parameters
    ----------
    model : nn.Module
    backend, curvature : str
        Registry names (``curvlib.backends.registry()``).
    structure : str
        ``full``, ``diag``, ``kron``, ``operator``, ``jacobians`` or ``gradients``.
    last_layer : bool
    x, y : optional
        An input batch (and targets): with it every check of the call runs, including one
        forward pass (no backward pass); the model is left as it was.
    **options
        Constructor options of the curvature class (``kfac_approx``, ``memory_limit``, ...).

    Returns
    -------
    SupportReport
        Truthy when supported.
    """
    if structure not in ENTRY_POINTS:
        raise ValueError(f"unknown structure {structure!r}; known: {list(ENTRY_POINTS)}")
    cls = backend_class(backend, curvature)
    likelihood = options.pop("likelihood", "classification")
    curv = cls(model, likelihood, last_layer=last_layer, **options)
    key = curv.curvature_key()
    if structure not in row(backend, key):
        rows = [
            {
                "name": n,
                "module": "",
                "type": "",
                "covered": False,
                "how": "",
                "reason": f"{backend!r} has no {structure!r} for {key}",
            }
            for n in curv.params_dict
        ]
        return SupportReport(
            backend, curvature, structure, rows, [f"{backend!r} has no {structure!r}"]
        )
    problems = curv.problems(structure)
    rows = _param_rows(curv, structure, problems)
    owners = {id(m) for m in _owners(curv)}
    blocking = [
        f"{p.where()}: {p.reason}"
        for p in problems
        if p.module is None or p.kind == "shared" or id(p.module) not in owners
    ]
    checked = False
    if x is not None and not problems:
        checked = True
        reason = _call_checks(curv, structure, x, y)
        if reason:
            blocking.append(reason)
    return SupportReport(backend, curvature, structure, rows, blocking, checked)


def _owners(curv: Any) -> list[nn.Module]:
    sel = {id(p) for p in curv.params}
    return [
        m for m in curv._model.modules() if any(id(p) in sel for p in m.parameters(recurse=False))
    ]


def _call_checks(curv: Any, structure: str, x: Any, y: Any) -> str:
    """The call's template checks and one recorded forward pass; the first refusal or ''."""
    from curvlib._hygiene import differentiable_kernels, preserved_model

    need_y = structure not in ("jacobians",)
    try:
        # the call's own checks: jacobians take no targets (a given y is not looked at)
        call = curv._begin(structure, x, y if need_y else None, None, None, need_y=need_y)
        records = Records()
        with preserved_model(curv.model), differentiable_kernels():
            call.inp = curv._features(call)
            for m in curv._model.modules():
                m.register_forward_hook(records.hook)
            f = call.forward(grad=True)
            curv._dynamic_check(call, records, f)
    except CurvlibError as err:
        return f"{type(err).__name__}: {err}"
    return ""
