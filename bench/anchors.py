r"""The anchors: other libraries' rows on the same workload.

* ``laplace:<Class>``: laplace-torch 0.3's curvature backends ``BackPackGGN/EF``,
  ``AsdlGGN/EF``, ``CurvlinopsGGN/EF``, its torch.func base classes ``GGNInterface`` /
  ``EFInterface``, ``AsdlHessian``, ``CurvlinopsHessian`` (``diag``, ``kron``, ``full``).
* ``backpack:<Extension>``: BackPACK called directly (``extend`` once, then
  ``with backpack(ext): loss.backward()`` and the per-parameter results gathered):
  ``DiagGGNExact``, ``DiagGGNMC``, ``SumGradSquared`` (the EF diagonal), ``KFLR``, ``KFAC``,
  ``DiagHessian``.
* ``asdl:<fisher type>``: ASDL called directly (``get_fisher_maker`` /
  ``forward_and_backward`` as laplace-torch does, the per-module results gathered):
  ``fisher_exact``, ``fisher_mc``, ``fisher_emp`` for ``diag`` and ``kron``, and the
  Hessian diagonal (``HessianMaker``).
* ``curvlinops:<Operator>``: curvlinops' linear operators, one product ``C·v``.
* ``bound:dense``: the bare dense contraction ``VᵀV`` with ``V`` of shape ``(N·C, P)``
  (GGN) or ``(N, P)`` (EF), random data of the size curvlib's ``full`` contracts.

These live only here, in ``bench/``: the curvlib package never imports laplace-torch or
curvlinops. Every row works on its own deep copy of the model (laplace's BackPACK classes
extend the model they are given).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .cases import MAX_FULL_P, QUICK_FULL_P, Case, loss_sum, operator_vector
from .workloads import Workload

__all__ = ["anchor_cases"]

MAX_DENSE_BYTES = 2 * 2**30  # laplace's torch.func Jacobians (B, C, P): skip above this
QUICK_FULL = "skipped: --quick times full for curvlib:autograd's EF and the dense bound only"


def _kron_canon(kfacs: list[list[torch.Tensor]], a_scale: float) -> list[list[torch.Tensor]]:
    """``[G, A·a_scale]`` per weight, ``[G]`` per bias (curvlib's ``A = (1/N) Σ a aᵀ``)."""
    return [[F[0], F[1] * a_scale] if len(F) == 2 else [F[0]] for F in kfacs]


def _laplace_cases(w: Workload, quick: bool) -> list[Case]:
    try:
        import laplace.curvature as lc
    except ImportError as err:
        return [Case("laplace", "ggn", "diag", None, f"unavailable: {err}")]
    P, B, C = w.num_params, len(w.y), w.num_outputs
    specs = []  # (class name, curvature, kwargs)
    for ggn, ef in (
        ("BackPackGGN", "BackPackEF"),
        ("AsdlGGN", "AsdlEF"),
        ("CurvlinopsGGN", "CurvlinopsEF"),
        ("GGNInterface", "EFInterface"),  # laplace's torch.func base classes
    ):
        specs += [(ggn, "ggn", {}), (ggn, "fisher", {"stochastic": True}), (ef, "ef", {})]
    specs += [("AsdlHessian", "hessian", {}), ("CurvlinopsHessian", "hessian", {})]
    cases = []
    for clsname, curv, kw in specs:
        cls, label = getattr(lc, clsname), f"laplace:{clsname}"
        for structure in ("diag", "kron", "full"):
            if curv == "hessian" and structure != "full":
                continue
            status, note = "", ""
            torch_func = clsname.endswith("Interface")
            if structure == "full" and P > MAX_FULL_P:
                status = f"skipped: P = {P:,} > {MAX_FULL_P:,}"
            elif structure == "full" and quick:
                status = QUICK_FULL
            elif torch_func and quick:
                status = "skipped: --quick leaves out laplace's torch.func base (slow)"
            elif clsname.startswith("Curvlinops") and structure == "diag":
                status = "skipped: inherits the torch.func diag (GGNInterface/EFInterface row)"
            elif structure == "kron" and torch_func:
                status = "unsupported: laplace's torch.func base has no kron"
            elif torch_func and 4 * B * (1 if curv == "ef" else C) * P > MAX_DENSE_BYTES:
                need = 4 * B * (1 if curv == "ef" else C) * P / 2**30
                status = f"skipped: its Jacobians need {need:.1f} GiB"
            if structure == "full" and clsname.startswith("Curvlinops"):
                note = f"{P:,} products with unit vectors"
            if status:
                cases.append(Case(label, curv, structure, None, status))
                continue

            def setup(cls=cls, kw=kw, structure=structure):
                m = copy.deepcopy(w.model)
                m.output_size = C  # laplace's Laplace sets it before calling its backends
                obj = cls(m, w.likelihood, **kw)
                if structure == "kron":
                    return lambda: obj.kron(w.x, w.y, N=B)[1]
                return lambda: getattr(obj, structure)(w.x, w.y)[1]

            cases.append(Case(label, curv, structure, setup, note=note, compare=curv != "fisher"))
    return cases


# BackPACK extension, parameter attribute, curvature, structure
_BACKPACK = (
    ("DiagGGNExact", "diag_ggn_exact", "ggn", "diag"),
    ("DiagGGNMC", "diag_ggn_mc", "fisher", "diag"),
    ("SumGradSquared", "sum_grad_squared", "ef", "diag"),
    ("KFLR", "kflr", "ggn", "kron"),
    ("KFAC", "kfac", "fisher", "kron"),
    ("DiagHessian", "diag_h", "hessian", "diag"),
)


def _backpack_cases(w: Workload) -> list[Case]:
    try:
        import backpack.extensions as bext
        from backpack import backpack, extend
    except ImportError as err:
        return [Case("backpack", "ggn", "diag", None, f"unavailable: {err}")]
    cases = []
    for ext_name, attr, curv, structure in _BACKPACK:

        def setup(ext_name=ext_name, attr=attr):
            m = extend(copy.deepcopy(w.model))
            lossf = extend(loss_sum(w.likelihood))
            params = [p for p in m.parameters() if p.requires_grad]
            ext = getattr(bext, ext_name)

            def call():
                loss = lossf(m(w.x), w.y)
                with backpack(ext()):
                    loss.backward()
                out = [getattr(p, attr) for p in params]
                for p in params:
                    delattr(p, attr)
                    p.grad = None
                return out

            return call

        def canon(out: list[Any], structure=structure) -> Any:
            if structure == "diag":
                return torch.cat([t.flatten() for t in out])
            return _kron_canon(out, 1.0)  # BackPACK's A is the batch mean (N = batch size)

        cases.append(
            Case(
                f"backpack:{ext_name}",
                curv,
                structure,
                setup,
                note="BackPACK's own extension on the summed loss",
                compare=curv != "fisher",
                canon=canon,
            )
        )
    return cases


def _asdl_cases(w: Workload) -> list[Case]:
    try:
        from asdl.fisher import FisherConfig, get_fisher_maker
        from asdl.grad_maker import LOSS_CROSS_ENTROPY, LOSS_MSE
        from asdl.hessian import HessianConfig, HessianMaker
        from asdl.matrices import FISHER_EMP, FISHER_EXACT, FISHER_MC, SHAPE_DIAG, SHAPE_KRON
    except ImportError as err:
        return [Case("asdl", "ggn", "diag", None, f"unavailable: {err}")]
    B = len(w.y)
    loss_type = LOSS_MSE if w.likelihood == "regression" else LOSS_CROSS_ENTROPY
    cases = []

    def read(m: torch.nn.Module, attr: str, structure: str) -> list[Any]:
        """Per-parameter results in parameter order (weight, then bias of each module)."""
        out = []
        for mod in m.modules():
            res = getattr(mod, attr, None)
            if res is None:
                continue
            if structure == "diag":
                out += [getattr(res.diag, n) for n in ("weight", "bias") if hasattr(res.diag, n)]
                out = [t for t in out if t is not None]
            else:
                out.append([res.kron.B, res.kron.A])
                if getattr(mod, "bias", None) is not None:
                    out.append([res.kron.B])
            delattr(mod, attr)
        return out

    for ftype, curv in ((FISHER_EXACT, "ggn"), (FISHER_MC, "fisher"), (FISHER_EMP, "ef")):
        for shape, structure in ((SHAPE_DIAG, "diag"), (SHAPE_KRON, "kron")):

            def setup(ftype=ftype, shape=shape, structure=structure):
                m = copy.deepcopy(w.model)
                lossf = loss_sum(w.likelihood)
                cfg = FisherConfig(
                    fisher_type=ftype, loss_type=loss_type, fisher_shapes=[shape], data_size=1
                )

                def call():
                    fm = get_fisher_maker(m, cfg)
                    if ftype == FISHER_EMP:
                        dummy = fm.setup_model_call(m, w.x)
                        fm.setup_loss_call(lossf, dummy, w.y)
                    else:
                        fm.setup_model_call(m, w.x)
                    fm.forward_and_backward()
                    out = read(m, "fisher", structure)
                    for p in m.parameters():
                        p.grad = None
                    return out

                return call

            def canon(out: list[Any], structure=structure) -> Any:
                if structure == "diag":
                    return torch.cat([t.flatten() for t in out])
                return _kron_canon(out, 1.0 / B)

            cases.append(
                Case(
                    f"asdl:{ftype}",
                    curv,
                    structure,
                    setup,
                    note="ASDL's own Fisher maker",
                    compare=curv != "fisher",
                    canon=canon,
                )
            )

    def setup_hessian():
        m = copy.deepcopy(w.model)
        lossf = loss_sum(w.likelihood)

        def call():
            hm = HessianMaker(m, HessianConfig(hessian_shapes=[SHAPE_DIAG]))
            dummy = hm.setup_model_call(m, w.x)
            hm.setup_loss_call(lossf, dummy, w.y)
            hm.forward_and_backward()
            out = read(m, "hessian", "diag")
            for p in m.parameters():
                p.grad = None
            return out

        return call

    cases.append(
        Case(
            "asdl:hessian",
            "hessian",
            "diag",
            setup_hessian,
            note="ASDL's own HessianMaker",
            canon=lambda out: torch.cat([t.flatten() for t in out]),
        )
    )
    return cases


def _curvlinops_cases(w: Workload) -> list[Case]:
    v = operator_vector(w)
    cases = []
    for curv, clsname in (
        ("ggn", "GGNLinearOperator"),
        ("fisher", "FisherMCLinearOperator"),
        ("ef", "EFLinearOperator"),
        ("hessian", "HessianLinearOperator"),
    ):

        def setup(clsname=clsname):
            import curvlinops

            m = copy.deepcopy(w.model)
            op = getattr(curvlinops, clsname)(
                m,
                loss_sum(w.likelihood),
                [p for p in m.parameters() if p.requires_grad],
                [(w.x, w.y)],
                check_deterministic=False,
            )
            return lambda: op @ v

        cases.append(
            Case(f"curvlinops:{clsname}", curv, "operator", setup, compare=curv != "fisher")
        )
    return cases


def _bound_cases(w: Workload, quick: bool) -> list[Case]:
    P, B, C = w.num_params, len(w.y), w.num_outputs
    if P > (QUICK_FULL_P if quick else MAX_FULL_P):
        return []
    cases = []
    for curv, K in (("ef", 1),) if quick else (("ggn", C), ("ef", 1)):

        def setup(K=K):
            g = torch.Generator().manual_seed(3)
            V = torch.randn(B * K, P, generator=g).to(w.x.device)
            return lambda: V.T @ V

        cases.append(
            Case(
                "bound:dense",
                curv,
                "full",
                setup,
                note=f"V.T @ V, V of shape (N·{'C' if K > 1 else '1'}, P) = ({B * K}, {P})",
                compare=False,
                bound=True,
            )
        )
    return cases


def anchor_cases(w: Workload, quick: bool, reduced: bool = False) -> list[Case]:
    """Every anchor row of workload ``w`` (see the module docstring); ``reduced``: only
    laplace-torch's GGN/EF classes and the EF bound (``--quick`` on every workload but the
    MLP)."""
    if reduced:
        keep = ("laplace:BackPack", "laplace:Asdl", "laplace:Curvlinops")
        lap = [
            c
            for c in _laplace_cases(w, quick)
            if c.library.startswith(keep) and c.curvature != "hessian"
        ]
        return lap + _bound_cases(w, quick)
    return (
        _laplace_cases(w, quick)
        + _backpack_cases(w)
        + _asdl_cases(w)
        + _curvlinops_cases(w)
        + _bound_cases(w, quick)
    )
