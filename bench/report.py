r"""The markdown report of a results file (the JSON file is the record; this only reads it).

Sections: the run (date, mode, threads, clock, allocator, machine); the targets per
workload in both orders; the ordering effect (curvlib's × grad measured fresh against after
the anchors); the scaling slopes; then one table per workload with every row.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["loglog_slope", "markdown", "ordering_pairs", "scaling_slopes"]


def loglog_slope(xs: list[float], ts: list[float]) -> float:
    r"""Least-squares slope ``s`` of :math:`\log t = a + s \log x` (NaN below two points)."""
    if len(xs) < 2:
        return math.nan
    lx, lt = [math.log(x) for x in xs], [math.log(t) for t in ts]
    mx, mt = sum(lx) / len(lx), sum(lt) / len(lt)
    sxx = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - mt) for a, b in zip(lx, lt, strict=True)) / sxx


def _status_cell(t: dict | None) -> str:
    if t is None:
        return "–"
    status = "**not met**" if t["status"] == "not met" else t["status"]
    return f"{status} {t.get('value', '')}".strip()


def _targets_table(data: dict, names: list[str]) -> list[str]:
    targets: dict[str, dict] = data.get("targets", {})
    titles: list[str] = []
    for name in names:
        for t in targets.get(name, {}).get("fresh", []):
            if t["target"] not in titles:
                titles.append(t["target"])
    if not titles:
        return []
    lines = [
        "Each cell: fresh order, then `after` (curvlib's rows measured again after the "
        "anchors) where that phase ran; the number is curvlib's time over the anchor's (×) or "
        "over a gradient (× grad).",
        "",
        "| target | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for title in titles:
        cells = []
        for name in names:
            per = targets.get(name, {})
            f = next((t for t in per.get("fresh", []) if t["target"] == title), None)
            a = next((t for t in per.get("after", []) if t["target"] == title), None)
            cell = _status_cell(f)
            if a is not None:
                cell += f" · after {_status_cell(a)}"
            cells.append(cell)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return lines


def ordering_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """``(fresh, after)`` pairs of curvlib rows measured in both orders."""
    after = {
        (r["library"], r["curvature"], r["structure"]): r
        for r in rows
        if r.get("order") == "after" and r.get("status") == "ok"
    }
    pairs = []
    for r in rows:
        k = (r["library"], r["curvature"], r["structure"])
        if r.get("order") == "fresh" and r.get("status") == "ok" and k in after:
            pairs.append((r, after[k]))
    return pairs


def _ordering(data: dict, names: list[str]) -> list[str]:
    lines = [
        "| workload | curvlib rows | median after/fresh | range | curvlib:backpack median "
        "| BackPACK hook handles left | EF kron fresh → after (autograd) |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for name in names:
        rows = [r for r in data["rows"] if r.get("workload") == name and r["kind"] == "row"]
        pairs = ordering_pairs(rows)
        if not pairs:
            continue
        q = [a["ratio"] / f["ratio"] for f, a in pairs]
        ef = next(
            (
                (f, a)
                for f, a in pairs
                if (f["library"], f["curvature"], f["structure"])
                == ("curvlib:autograd", "ef", "kron")
            ),
            None,
        )
        ef_cell = f"{ef[0]['ratio']:.2f}× → {ef[1]['ratio']:.2f}× grad" if ef else "–"
        state = next(
            (r for r in data["rows"] if r.get("kind") == "state" and r["workload"] == name), {}
        )
        bp = [a["ratio"] / f["ratio"] for f, a in pairs if f["library"] == "curvlib:backpack"]
        bp_cell = f"{statistics.median(bp):.2f}" if bp else "–"
        lines.append(
            f"| {name} | {len(pairs)} | {statistics.median(q):.2f} | "
            f"{min(q):.2f}–{max(q):.2f} | {bp_cell} | {state.get('backpack_hook_handles', '–')} "
            f"| {ef_cell} |"
        )
    return lines if len(lines) > 2 else []


def _ordering_rows(data: dict, names: list[str]) -> list[str]:
    """Every curvlib row measured in both orders (the MLP's by default in --quick)."""
    lines = [
        "| workload | library | curvature | structure | × grad fresh | × grad after "
        "| after/fresh |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for name in names:
        rows = [r for r in data["rows"] if r.get("workload") == name and r["kind"] == "row"]
        for f, a in ordering_pairs(rows):
            lines.append(
                f"| {name} | {f['library']} | {f['curvature']} | {f['structure']} | "
                f"{f['ratio']:.2f} | {a['ratio']:.2f} | {a['ratio'] / f['ratio']:.2f} |"
            )
    return lines if len(lines) > 2 else []


def scaling_slopes(rows: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """``(axis, structure) -> {"time": s, "grad": s, "ratio_first": …, "ratio_last": …}``
    with ``s`` the log-log slope against the batch size (``batch``) or P (``width``)."""
    out = {}
    for axis in ("batch", "width"):
        for structure in ("diag", "kron"):
            pts = sorted(
                (
                    r
                    for r in rows
                    if r.get("kind") == "scaling"
                    and r["axis"] == axis
                    and r["structure"] == structure
                    and r.get("status") == "ok"
                ),
                key=lambda r: r["value"],
            )
            if len(pts) < 2:
                continue
            xs = [r["N"] if axis == "batch" else r["P"] for r in pts]
            out[(axis, structure)] = {
                "time": loglog_slope(xs, [r["ms"] for r in pts]),
                "grad": loglog_slope(xs, [r["grad_ms"] for r in pts]),
                "time_top3": loglog_slope(xs[-3:], [r["ms"] for r in pts[-3:]]),
                "grad_top3": loglog_slope(xs[-3:], [r["grad_ms"] for r in pts[-3:]]),
                "ratio_first": pts[0]["ratio"],
                "ratio_last": pts[-1]["ratio"],
            }
    return out


def _scaling(data: dict) -> list[str]:
    rows = [r for r in data["rows"] if r.get("kind") == "scaling"]
    if not rows:
        return []
    lines = [
        "| axis | value | P | N | structure | ms | grad ms | × grad | peak MiB |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: (r["axis"], r["structure"], r["value"])):
        if r.get("status") != "ok":
            lines.append(
                f"| {r['axis']} | {r['value']} | {r['P']:,} | {r['N']} | {r['structure']} | "
                f"{r.get('status')} | | | |"
            )
            continue
        peak = "–" if r.get("peak_mib") is None else f"{r['peak_mib']:.1f}"
        lines.append(
            f"| {r['axis']} | {r['value']} | {r['P']:,} | {r['N']} | {r['structure']} | "
            f"{r['ms']:.2f} | {r['grad_ms']:.2f} | {r['ratio']:.2f} | {peak} |"
        )
    lines += [
        "",
        "| fitted log-log slope | curvlib time | gradient time | curvlib, 3 largest | "
        "gradient, 3 largest | × grad at the ends |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for (axis, structure), s in scaling_slopes(rows).items():
        against = "batch size" if axis == "batch" else "P (width sweep)"
        lines.append(
            f"| {structure} vs {against} | {s['time']:.2f} | {s['grad']:.2f} | "
            f"{s['time_top3']:.2f} | {s['grad_top3']:.2f} | "
            f"{s['ratio_first']:.2f} → {s['ratio_last']:.2f} |"
        )
    return lines


def _fmt_row(r: dict, after: dict | None) -> str:
    lib, curv, s = r["library"], r["curvature"], r["structure"]
    if r.get("status") != "ok":
        return f"| {lib} | {curv} | {s} | – | – | – | – | – | {r.get('status', '')} |"
    err = "–"
    if r.get("rel_err") is not None:
        err = f"{r['rel_err']:.1e}"
        if r.get("scale", 1.0) != 1.0:
            err += f" (×{r['scale']:.3g})"
    peak = "–" if r.get("peak_mib") is None else f"{r['peak_mib']:.1f}"
    aft = "–"
    if after is not None:
        aft = f"{after['ratio']:.2f}" if after.get("status") == "ok" else after["status"][:20]
    note = r.get("note", "")
    if r.get("repeats", 5) < 3:
        note = "; ".join(filter(None, [note, f"{r['repeats']} repeat(s)"]))
    return (
        f"| {lib} | {curv} | {s} | {r['ms']:.2f} | {r['ratio']:.2f} | {aft} | {peak} | {err} "
        f"| {note} |"
    )


def _workload(data: dict, name: str, compact: bool) -> list[str]:
    rows = [r for r in data["rows"] if r.get("workload") == name]
    meta = next((r for r in rows if r["kind"] == "workload"), None)
    if meta is None or name == "scaling":
        return []
    table = [r for r in rows if r["kind"] == "row" and r.get("order") != "after"]
    after = {
        (r["library"], r["curvature"], r["structure"]): r
        for r in rows
        if r["kind"] == "row" and r.get("order") == "after"
    }
    grads = [r["grad_ms"] for r in table if r.get("status") == "ok"]
    g = statistics.median(grads) if grads else float("nan")
    lines = [
        f"### {name}: {meta['description']}",
        "",
        f"P = {meta['P']:,}, C = {meta['C']}, N = {meta['N']}; one gradient ≈ {g:.2f} ms "
        f"({meta['clock']}); activations {meta['activation_mib']:.2f} MiB",
        "",
        "| library | curvature | structure | ms | × grad | × grad after | peak MiB | rel. err "
        "| status / note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in table:
        if compact and r.get("status", "").startswith(("unsupported", "skipped: P")):
            continue
        k = (r["library"], r["curvature"], r["structure"])
        lines.append(_fmt_row(r, after.get(k) if r["library"].startswith("curvlib:") else None))
    per = data.get("targets", {}).get(name, {})
    if per.get("fresh"):
        lines += ["", "| target (fresh order) | status | numbers |", "| --- | --- | --- |"]
        lines += [f"| {t['target']} | {t['status']} | {t['detail']} |" for t in per["fresh"]]
    return lines + [""]


def markdown(data: dict[str, Any], compact: bool = False) -> str:
    """The report of a results file; ``compact`` leaves out rows of structures a class does
    not offer and full matrices above the size limit."""
    meta = data["meta"]
    names = list(dict.fromkeys(r["workload"] for r in data["rows"] if r.get("kind") == "workload"))
    lines = [
        f"Benchmark run of {meta.get('date', '?')}: {meta.get('mode')}, {meta.get('threads')} "
        f"thread(s), device {meta.get('device')}, allocator {meta.get('allocator')}, "
        f"load {meta.get('loadavg_1min')}, {meta.get('seconds', '?')} s"
        + (" (incomplete)" if not meta.get("complete") else ""),
        "",
        "## Targets",
        "",
    ]
    lines += _targets_table(data, [n for n in names if n != "scaling"]) + ["", "## Ordering", ""]
    lines += _ordering(data, names) + [""] + _ordering_rows(data, names)
    lines += ["", "## Scaling", ""]
    lines += _scaling(data) + ["", "## Rows", ""]
    for name in names:
        lines += _workload(data, name, compact)
    return "\n".join(lines)
