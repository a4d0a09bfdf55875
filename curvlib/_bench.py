r"""``curvlib bench``: curvlib's own backends on a small MLP and CNN, as multiples of a gradient.

For every registered backend × curvature (exact GGN, MC Fisher, EF) × structure (``diag``,
``kron``; and the Hessian diagonal) on each workload, the row reports

* **× grad**: the median over ``repeats`` of ``t_call / t_grad``, with ``t_grad`` one plain
  forward + backward pass of the summed loss on the same batch, timed right before each
  repeat (interleaved, so a machine that gets busier moves both); a row whose first call
  takes more than :data:`SLOW` seconds is timed once more instead;
* **rel. err**: ``‖R − R_ref‖_F / ‖R_ref‖_F`` against the autograd backend's result (for
  K-FAC, of the block-diagonal Kronecker matrix, computed from the factors);
* a refusal (a ``CurvlibError`` or ``NotImplementedError``, e.g. a layer a backend has no
  rule for) as a row ``refused: <message>``; rows in :data:`SKIP` are not run.

With one thread on the CPU the clock is the thread's CPU time, which leaves out the time the
OS gives other processes; otherwise wall time. The comparison with laplace-torch, BackPACK,
ASDL and curvlinops called directly lives in the repository's ``bench/run.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvlib.backends import backend_class, registry
from curvlib.errors import CurvlibError

__all__ = ["ROWS", "WORKLOADS", "format_table", "main", "run"]

WORKLOADS = ("mlp", "cnn")  # ROWS: (curvature, structure) of every row
SLOW = 1.0  # seconds: a row whose first call takes longer is timed once more, not repeated
SKIP = {  # rows not run, and why
    ("asdl", "hessian"): "skipped: ASDL's Hessian diagonal forms every layer's dense Hessian "
    "block (784·128 weights: 40 GB on the MLP)",
}
ROWS = (*((c, s) for c in ("ggn", "fisher", "ef") for s in ("diag", "kron")), ("hessian", "diag"))


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Weights ~ N(0, 1/fan_in) from a generator; the global RNG is left as it was."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def build(name: str, tiny: bool = False) -> tuple[str, nn.Module, torch.Tensor, torch.Tensor]:
    """``(description, model, x, y)`` of workload ``name``; ``tiny`` for tests."""
    g = torch.Generator().manual_seed(1)
    with torch.random.fork_rng():  # nn's own initialization draws from the global RNG
        if name == "mlp":
            width, B = (16, 8) if tiny else (128, 128)
            d_in = 20 if tiny else 784
            model = nn.Sequential(
                nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
            )
            model.append(nn.Linear(width, 10))
            x = torch.randn(B, d_in, generator=g)
            desc = f"MLP {d_in}-{width}-{width}-10, batch {B}"
        elif name == "cnn":
            c, B, side = (4, 4, 8) if tiny else (16, 32, 32)
            model = nn.Sequential(
                *(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
                *(nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
                *(nn.Flatten(), nn.Linear(2 * c * (side // 4) ** 2, 10)),
            )
            x = torch.randn(B, 3, side, side, generator=g)
            desc = f"CNN Conv2d 3-{c}-{2 * c} (3x3) + Linear, 3x{side}x{side}, batch {B}"
        else:
            raise ValueError(f"unknown workload {name!r}; known: {list(WORKLOADS)}")
    y = torch.randint(0, 10, (len(x),), generator=g)
    return desc, _init(model, 0), x, y


def _inner(a: list, b: list) -> float:
    """Frobenius inner product of two diagonals or two block-diagonal Kronecker matrices."""
    total = 0.0
    for A, B in zip(a, b, strict=True):
        if isinstance(A, torch.Tensor):
            total += float((A * B).sum())
            continue
        term = 1.0
        for f1, f2 in zip(A, B, strict=True):
            f1, f2 = (torch.diag(f) if f.ndim < g.ndim else f for f, g in ((f1, f2), (f2, f1)))
            term *= float((f1 * f2).sum())
        total += term
    return total


def rel_err(a: Any, ref: Any) -> float:
    """``‖a − ref‖_F / ‖ref‖_F`` for diagonals or ``Kron`` results."""

    def flat(r: Any) -> list:
        if isinstance(r, torch.Tensor):
            return [r.detach().double()]
        return [[f.detach().double() for f in F] for F in r.kfacs]

    a, ref = flat(a), flat(ref)
    aa, bb, ab = _inner(a, a), _inner(ref, ref), _inner(a, ref)
    return math.sqrt(max(aa + bb - 2 * ab, 0.0) / bb) if bb > 0 else float(aa > 0)


def _time_row(
    call: Callable[[], Any], grad: Callable[[], None], now: Callable[[], float], repeats: int
) -> tuple[Any, dict[str, float]]:
    t0 = now()
    result = call()  # warm-up; its result is the one compared
    first = now() - t0
    grad()
    ratios, times = [], []
    for _ in range(1 if first > SLOW else repeats):  # a slow row: one timed call
        t0 = now()
        grad()
        t1 = now()
        call()
        times.append(now() - t1)
        ratios.append(times[-1] / (t1 - t0))
    return result, {"ratio": statistics.median(ratios), "ms": 1e3 * statistics.median(times)}


def _write(path: Path, rows: list[dict]) -> None:
    """Write-then-rename: a killed run leaves the last complete file."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)


def run(
    workloads: list[str] | None = None,
    quick: bool = False,
    repeats: int | None = None,
    backends: list[str] | None = None,
    threads: int = 1,
    out: str | Path | None = None,
    tiny: bool = False,
    progress: Callable[[dict], None] | None = None,
    resume: bool = False,
) -> list[dict]:
    """Time every backend × row of :data:`ROWS` on each workload; one dict per row.

    Parameters
    ----------
    workloads : list of str, optional
        Out of :data:`WORKLOADS` (default: all; ``quick``: the MLP).
    quick : bool
        The MLP only and 3 repeats (unless ``repeats`` says otherwise).
    repeats : int, optional
        Timed repeats per row (default 5, 3 with ``quick``).
    backends : list of str, optional
        Registered backend names (default: all, autograd first: the reference).
    threads : int
        ``torch.set_num_threads`` for the run (restored afterwards).
    out : path, optional
        A ``.json`` file rewritten after every row.
    tiny : bool
        Very small workloads (for tests).
    progress : callable, optional
        Called with each row as soon as it is measured.
    resume : bool
        Keep the rows an earlier (interrupted) run wrote to ``out`` and measure only the
        others (the autograd reference of a kept row is computed again, untimed, for the
        agreement of the rows measured now).

    Returns
    -------
    list of dict
        ``workload, description, backend, curvature, structure, status`` (``ok``,
        ``refused: …``, ``error: …``) and, for ``ok`` rows, ``ms``, ``ratio``, ``rel_err``.
    """
    names = list(workloads or (["mlp"] if quick else WORKLOADS))
    repeats = (3 if quick else 5) if repeats is None else repeats
    if min(repeats, threads) < 1:
        raise ValueError(f"repeats and threads must be at least 1, got {repeats}, {threads}")
    if out is not None and Path(out).suffix != ".json":
        raise ValueError(f"out must name a .json file, got {str(out)!r}")
    known = list(registry())
    backends = sorted(backends or known, key=lambda b: b != "autograd")
    for b in backends:
        if b not in known:
            raise ValueError(f"unknown backend {b!r}; known backends: {known}")
    if resume and out is None:
        raise ValueError("resume needs out (the .json file of the earlier run)")
    rows: list[dict] = _earlier(Path(out)) if resume else []
    done = {_key(r) for r in rows}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)

    def emit(row: dict) -> None:
        rows.append(row)
        if out is not None:
            _write(Path(out), rows)
        if progress is not None:
            progress(row)

    now = time.thread_time if threads == 1 else time.perf_counter
    try:
        for name in names:
            _workload_rows(name, backends, tiny, repeats, now, emit, done)
    finally:
        torch.set_num_threads(old_threads)
    return rows


def _workload_rows(
    name: str,
    backends: list[str],
    tiny: bool,
    repeats: int,
    now: Callable[[], float],
    emit: Callable[[dict], None],
    done: set[tuple[str, ...]] = frozenset(),
) -> None:
    desc, model, x, y = build(name, tiny)
    base, lossf = copy.deepcopy(model), nn.CrossEntropyLoss(reduction="sum")

    def grad() -> None:
        base.zero_grad(set_to_none=True)
        lossf(base(x), y).backward()

    refs: dict[tuple[str, str], Any] = {}
    for backend in backends:
        for curv, structure in ROWS:
            row: dict[str, Any] = {"workload": name, "description": desc, "backend": backend}
            row.update(curvature=curv, structure=structure)
            if _key(row) in done:  # measured by the run that is resumed
                if backend == "autograd":
                    refs[(curv, structure)] = _reference(model, curv, structure, x, y)
                continue
            if (backend, curv) in SKIP:
                row["status"] = SKIP[(backend, curv)]
                emit(row)
                continue
            try:
                obj = backend_class(backend, curv)(model, "classification")
                kw: dict[str, Any] = {"N": len(y)} if structure == "kron" else {}

                def call(obj=obj, structure=structure, kw=kw, curv=curv):
                    if curv == "fisher":
                        kw["generator"] = torch.Generator().manual_seed(0)
                    return getattr(obj, structure)(x, y, **kw)[1]

                result, stats = _time_row(call, grad, now, repeats)
                row.update(status="ok", **stats)
                if backend == "autograd":  # the reference (run first)
                    refs[(curv, structure)] = result
                if (curv, structure) in refs:
                    row["rel_err"] = rel_err(result, refs[(curv, structure)])
            except (CurvlibError, NotImplementedError) as err:
                row["status"] = f"refused: {str(err).splitlines()[0][:160]}"
            except Exception as err:  # noqa: BLE001 - a failure is a row, not a crash
                row["status"] = f"error: {type(err).__name__}: {str(err)[:160]}"
            emit(row)


def _key(row: dict) -> tuple[str, ...]:
    return (row["workload"], row["backend"], row["curvature"], row["structure"])


def _earlier(path: Path) -> list[dict]:
    """The rows of an earlier run's file (none if there is no file)."""
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"cannot resume from {str(path)!r}: not a results file ({err})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "status" in r for r in rows):
        raise ValueError(f"cannot resume from {str(path)!r}: not a list of benchmark rows")
    return rows


def _reference(
    model: nn.Module, curv: str, structure: str, x: torch.Tensor, y: torch.Tensor
) -> Any:
    """The autograd backend's result of a row (untimed), as the timed row computes it."""
    kw: dict[str, Any] = {"N": len(y)} if structure == "kron" else {}
    if curv == "fisher":
        kw["generator"] = torch.Generator().manual_seed(0)
    return getattr(backend_class("autograd", curv)(model, "classification"), structure)(x, y, **kw)[
        1
    ]


HEADER = "| backend | curvature | structure | ms | × grad | rel. err vs autograd |"


def format_table(rows: list[dict]) -> str:
    """The rows as a markdown table, one section per workload."""
    lines: list[str] = []
    for name in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == name]
        lines += [f"{name}: {mine[0]['description']}", "", HEADER, "|---|---|---|--:|--:|---|"]
        for r in mine:
            head = f"| {r['backend']} | {r['curvature']} | {r['structure']} |"
            if r["status"] == "ok":
                err = f"{r['rel_err']:.1e}" if "rel_err" in r else "–"
                lines.append(f"{head} {r['ms']:.2f} | {r['ratio']:.2f} | {err} |")
            else:
                lines.append(f"{head} – | – | {r['status']} |")
        lines.append("")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run ``curvlib bench`` with parsed ``args``; print the table. Bad options raise
    ``ValueError`` (the command prints it as one line)."""

    def progress(r: dict) -> None:
        t = f"{r['ratio']:7.2f}x" if r["status"] == "ok" else r["status"][:70]
        head = f"  {r['workload']:4s} {r['backend']:9s} {r['curvature']:8s} {r['structure']:5s}"
        print(f"{head} {t}", file=sys.stderr, flush=True)

    opts = {"repeats": args.repeats, "backends": args.backends, "threads": args.threads}
    progress_fn = None if args.quiet else progress
    rows = run(
        args.workloads, args.quick, **opts, out=args.out, progress=progress_fn, resume=args.resume
    )
    print(format_table(rows))
    return 0
