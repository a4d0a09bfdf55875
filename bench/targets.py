r"""The performance targets and whether a workload's rows meet them.

curvlib's figure on a row is its fastest backend there (what ``backend="auto"`` should
pick); the anchors' is the fastest anchor of the named libraries that computes the same
quantity (an anchor whose result disagrees with curvlib's autograd backend by more than
1e-3 — BackPACK's convolution K-FAC is another variant — is named and left out; with no
anchor left the target is ``n/a``; MC rows are judged by their exact-GGN sibling, their
samples being their own). A target whose curvlib row was skipped is ``n/a``; one that
curvlib refused or failed is ``not met``.

| target | limit |
| --- | --- |
| exact diag GGN, exact K-FAC | ≤ 0.67× the fastest of BackPACK, ASDL, curvlinops |
| MC and EF K-FAC | ≤ 0.8× the faster of ASDL and curvlinops |
| MC and EF diag | ≤ 1.8× a gradient |
| exact K-FAC (and diag) at C ≥ 100 | ≤ 8× a gradient, or a cost model that shows why not |
| curvlib's BackPACK / ASDL backends | ≤ 1.1× calling BackPACK / ASDL directly |
| peak memory of diag and kron | ≤ 2× max(activation memory, result) |
| agreement of every curvlib row with autograd | rel. err ≤ 1e-5, no scale |

Two earlier checks are kept: ``full`` ≤ 1.1× the dense contraction, and the Hessian diagonal
no slower than BackPACK's ``DiagHessian``. Every target is evaluated twice: with curvlib's
rows measured first in the process (``fresh``) and again after the anchors (``after``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ANCHORS", "DIRECT", "TOL", "evaluate", "kfac_cost_model"]

TOL = 1e-5  # agreement target of curvlib rows (float32)

L_BP, L_ASDL, L_CL = "laplace:BackPackGGN", "laplace:AsdlGGN", "laplace:CurvlinopsGGN"
#: (curvature, structure) -> anchor libraries per target family
ANCHORS: dict[tuple[str, str], list[str]] = {
    ("ggn", "diag"): [L_BP, L_ASDL, L_CL, "backpack:DiagGGNExact", "asdl:fisher_exact"],
    ("ggn", "kron"): [L_BP, L_ASDL, L_CL, "backpack:KFLR", "asdl:fisher_exact"],
    ("fisher", "kron"): [L_ASDL, L_CL, "asdl:fisher_mc"],
    ("ef", "kron"): ["laplace:AsdlEF", "laplace:CurvlinopsEF", "asdl:fisher_emp"],
}
#: curvlib backend -> (curvature, structure) -> the direct call of its library
DIRECT: dict[str, dict[tuple[str, str], str]] = {
    "curvlib:backpack": {
        ("ggn", "diag"): "backpack:DiagGGNExact",
        ("fisher", "diag"): "backpack:DiagGGNMC",
        ("ef", "diag"): "backpack:SumGradSquared",
        ("ggn", "kron"): "backpack:KFLR",
        ("fisher", "kron"): "backpack:KFAC",
        ("hessian", "diag"): "backpack:DiagHessian",
    },
    "curvlib:asdl": {
        ("ggn", "diag"): "asdl:fisher_exact",
        ("fisher", "diag"): "asdl:fisher_mc",
        ("ef", "diag"): "asdl:fisher_emp",
        ("ggn", "kron"): "asdl:fisher_exact",
        ("fisher", "kron"): "asdl:fisher_mc",
        ("ef", "kron"): "asdl:fisher_emp",
        ("hessian", "diag"): "asdl:hessian",
    },
}
_EXACT_SIBLING = {
    "asdl:fisher_mc": "asdl:fisher_exact",
    "backpack:DiagGGNMC": "backpack:DiagGGNExact",
    "backpack:KFAC": "backpack:KFLR",
}


def kfac_cost_model(dims: list[tuple[int, int]], B: int, C: int) -> tuple[float, float]:
    r"""Multiply-adds of one gradient and of the exact K-FAC of an MLP of Linear layers.

    ``dims`` are the layers' ``(in, out)``. A gradient: the forward pass
    :math:`B\sum_l i_l o_l`, the weight gradients as much again, the input gradients of
    every layer but the first. Exact K-FAC: the forward pass, the ``C`` columns of
    :math:`\Lambda^{1/2}` backpropagated to every layer output below the head
    (:math:`BC\sum_{l\ge 2} i_l o_l`), and the factors :math:`A_l = \sum a a^\top`
    (:math:`B i_l^2`) and :math:`G_l = \sum g g^\top` (:math:`BC o_l^2`).

    Returns
    -------
    (grad, kfac)
        Both in multiply-adds.
    """
    fwd = B * sum(i * o for i, o in dims)
    grad = 2 * fwd + B * sum(i * o for i, o in dims[1:])
    kfac = fwd + B * C * sum(i * o for i, o in dims[1:])
    kfac += sum(B * i * i + B * C * o * o for i, o in dims)
    return float(grad), float(kfac)


def _ok(rows: list[dict], **match: Any) -> list[dict]:
    return [
        r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())
    ]


def _why(rows: list[dict], library: str, curvature: str, structure: str) -> str:
    for r in rows:
        if (r["library"], r["curvature"], r["structure"]) == (library, curvature, structure):
            return r.get("status", "")
    return "not measured"


def evaluate(rows: list[dict], meta: dict, order: str) -> list[dict]:
    """One entry per target on one workload: ``{target, status, detail}``, status ``met``,
    ``not met`` or ``n/a``; curvlib's rows of ``order`` (``fresh`` or ``after``)."""
    mine = [r for r in rows if r["library"].startswith("curvlib:") and r.get("order") == order]
    others = [r for r in rows if r.get("order") == "anchors"]
    out: list[dict] = []
    if not mine:
        return out

    def add(target: str, status: str, detail: str, value: str = "") -> None:
        out.append({"target": target, "status": status, "detail": detail, "value": value})

    def best(curv: str, structure: str) -> dict | None:
        cands = _ok(mine, curvature=curv, structure=structure)
        return min(cands, key=lambda r: r["ratio"]) if cands else None

    def anchor(library: str, curv: str, structure: str) -> dict | None:
        found = _ok(others, library=library, curvature=curv, structure=structure)
        return found[0] if found else None

    def checked(r: dict) -> dict:
        if r["curvature"] != "fisher":
            return r
        lib = _EXACT_SIBLING.get(r["library"], r["library"])
        return anchor(lib, "ggn", r["structure"]) or {}

    def versus(t: str, curv: str, structure: str, limit: float) -> None:
        b = best(curv, structure)
        libs = ANCHORS[(curv, structure)]
        found = [r for r in (anchor(lib, curv, structure) for lib in libs) if r is not None]
        same = [r for r in found if (checked(r).get("rel_err") or 0.0) <= 1e-3]
        differ = "".join(
            f"; {r['library']} computes another quantity (rel. err "
            f"{checked(r)['rel_err']:.1g}"
            f"{' of its exact GGN' if r['curvature'] == 'fisher' else ''})"
            for r in found
            if r not in same
        )
        if b is None:
            missing(t, curv, structure)
        elif found and not same:
            add(t, "n/a", f"no anchor computes the same quantity{differ}")
        elif not found:
            why = "; ".join(f"{lib}: {_why(others, lib, curv, structure)}" for lib in libs)
            add(t, "n/a", f"no anchor ({why}); {b['library']} {b['ratio']:.2f}× grad")
        else:
            o = min(same, key=lambda r: r["ratio"])
            q = b["ratio"] / o["ratio"]
            add(
                t,
                "met" if q <= limit else "not met",
                f"{b['library']} {b['ratio']:.2f}× vs {o['library']} {o['ratio']:.2f}× grad "
                f"(= {q:.2f}× its time){differ}",
                f"{q:.2f}×",
            )

    def missing(t: str, curv: str, structure: str) -> None:
        """No curvlib row: ``n/a`` where curvlib's rows were skipped (a pending structure,
        --quick), ``not met`` where curvlib refused or failed."""
        why = _why(mine, "curvlib:autograd", curv, structure)
        add(t, "n/a" if why.startswith("skipped") else "not met", f"curvlib: {why}")

    def at_most(t: str, curv: str, structure: str, limit: float, extra: str = "") -> None:
        b = best(curv, structure)
        if b is None:
            missing(t, curv, structure)
        else:
            ok = b["ratio"] <= limit
            add(
                t,
                "met" if ok else "not met",
                f"{b['library']} {b['ratio']:.2f}× grad{extra}",
                f"{b['ratio']:.2f}× grad",
            )

    versus("exact diag GGN ≤ 0.67× BackPACK/ASDL/curvlinops", "ggn", "diag", 0.67)
    versus("exact K-FAC ≤ 0.67× BackPACK/ASDL/curvlinops", "ggn", "kron", 0.67)
    versus("MC K-FAC ≤ 0.8× ASDL/curvlinops", "fisher", "kron", 0.8)
    versus("EF K-FAC ≤ 0.8× ASDL/curvlinops", "ef", "kron", 0.8)
    at_most("MC diag ≤ 1.8× grad", "fisher", "diag", 1.8)
    at_most("EF diag ≤ 1.8× grad", "ef", "diag", 1.8)
    if meta["C"] >= 100:
        extra = ""
        if meta.get("linear_dims"):
            g, k = kfac_cost_model(meta["linear_dims"], meta["N"], meta["C"])
            extra = f"; cost model: ≥ {k / g:.1f}× a gradient in multiply-adds"
        at_most("exact K-FAC ≤ 8× grad at C = 100", "ggn", "kron", 8.0, extra)
        at_most("exact diag GGN ≤ 8× grad at C = 100", "ggn", "diag", 8.0)
    # curvlib's BackPACK / ASDL backends against the direct calls of their libraries
    for backend, pairs in DIRECT.items():
        qs, gaps = [], []
        for (curv, structure), lib in pairs.items():
            c = _ok(mine, library=backend, curvature=curv, structure=structure)
            d = anchor(lib, curv, structure)
            if c and d:
                qs.append((f"{curv} {structure}", c[0]["ratio"] / d["ratio"], lib))
            elif d and not c:
                gaps.append(f"{curv} {structure}: {_why(mine, backend, curv, structure)}")
        name = backend.split(":")[1]
        t = f"curvlib:{name} ≤ 1.1× {'BackPACK' if name == 'backpack' else 'ASDL'} direct"
        if not qs:
            add(t, "n/a", "no pair measured" + (f" ({'; '.join(gaps)})" if gaps else ""))
        else:
            over = [q for q in qs if q[1] > 1.1]
            add(
                t,
                "not met" if over else "met",
                ", ".join(f"{k} {q:.2f}×" for k, q, _ in qs)
                + (f"; refused: {'; '.join(gaps)}" if gaps else ""),
                f"{len(over)}/{len(qs)} over, max {max(q for _, q, _ in qs):.2f}×",
            )
    # peak memory of diag and kron against the activations and the result
    act = meta.get("activation_mib")
    mem = [
        r for r in _ok(mine) if r["structure"] in ("diag", "kron") and r.get("peak_mib") is not None
    ]
    if act is not None and mem:
        over = [r for r in mem if r["peak_mib"] > 2 * max(act, r.get("result_mib", 0.0))]
        worst = max(mem, key=lambda r: r["peak_mib"] / max(act, r.get("result_mib", 0.0)))
        limit_w = max(act, worst.get("result_mib", 0.0))
        add(
            "diag/kron peak ≤ 2× max(activations, result)",
            "not met" if over else "met",
            f"activations {act:.2f} MiB"
            + (
                f" (a gradient's own peak, same measure: {meta['grad_peak_mib']:.1f} MiB)"
                if meta.get("grad_peak_mib") is not None
                else ""
            )
            + f"; {len(over)} of {len(mem)} rows over; worst "
            f"{worst['library']} {worst['curvature']} {worst['structure']} "
            f"{worst['peak_mib']:.1f} MiB (= {worst['peak_mib'] / limit_w:.1f}× "
            f"max(activations, result {worst.get('result_mib', 0.0):.2f} MiB))",
            f"{len(over)}/{len(mem)} over",
        )
    # agreement
    compared = [r for r in _ok(mine) if r.get("rel_err") is not None]
    bad = [r for r in compared if r["rel_err"] > TOL or r.get("scale", 1.0) != 1.0]
    add(
        f"curvlib rows within {TOL:g} of autograd",
        "not met" if bad else ("met" if compared else "n/a"),
        ", ".join(
            f"{r['library']} {r['curvature']} {r['structure']} {r['rel_err']:.1e}" for r in bad
        )
        or f"all {len(compared)} compared rows agree",
    )
    # earlier checks
    for curv in ("ggn", "ef"):
        t = f"full {curv.upper()} ≤ 1.1× dense contraction"
        bound, b = anchor("bound:dense", curv, "full"), best(curv, "full")
        if bound is None or b is None:
            why = _why(others, "bound:dense", curv, "full") if bound is None else "no curvlib row"
            add(t, "n/a", why)
        else:
            q = b["ms"] / bound["ms"]
            add(
                t,
                "met" if q <= 1.1 else "not met",
                f"{b['library']} {b['ms']:.1f} ms vs contraction {bound['ms']:.1f} ms (= {q:.2f}×)",
                f"{q:.2f}×",
            )
    b, o = best("hessian", "diag"), anchor("backpack:DiagHessian", "hessian", "diag")
    t = "diag Hessian ≤ BackPACK DiagHessian"
    if b is None or o is None:
        who = "curvlib" if b is None else "backpack:DiagHessian"
        lib = "curvlib:autograd" if b is None else "backpack:DiagHessian"
        add(t, "n/a", f"{who}: {_why(mine if b is None else others, lib, 'hessian', 'diag')}")
    else:
        q = b["ratio"] / o["ratio"]
        add(
            t,
            "met" if q <= 1.0 else "not met",
            f"{b['library']} {b['ratio']:.2f}× vs {o['ratio']:.2f}× grad (= {q:.2f}×)",
            f"{q:.2f}×",
        )
    return out
