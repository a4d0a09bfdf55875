r"""Scaling rows: curvlib's diag and kron time against batch size and width on the MLP.

The MLP 784-W-W-10 (classification) at batch sizes 16 → 256 (W = 128) and widths 64 → 512
(batch 128); for each point the exact GGN ``diag`` and ``kron`` of ``curvlib:autograd`` are
timed as every other row (:func:`bench.timing.measure`, interleaved with a gradient). The
report fits the log-log slope of the time against the batch size and against the number of
parameters P:

.. math::
    \log t = a + s \log x \quad\text{(least squares)},

so ``s ≈ 1`` means the cost grows linearly, as a gradient's does (the gradient's own slope is
shown beside it). Fixed per-call costs flatten the small end, so the slope over the three
largest points is shown too.
"""

from __future__ import annotations

import sys

import curvlib

from .agreement import canon
from .report import loglog_slope
from .session import Options, first_line, grad_step_of
from .store import Results
from .timing import Clock, PeakMemory, RowTimeout, measure
from .workloads import mlp

__all__ = ["BATCHES", "WIDTHS", "loglog_slope", "run_scaling"]

BATCHES = (16, 32, 64, 128, 256)
WIDTHS = (64, 128, 256, 512)
STRUCTURES = ("diag", "kron")


def run_scaling(opts: Options, store: Results) -> None:
    """Time the scaling points (see the module docstring); one record per point and row."""
    clock, memory = Clock(opts.device, opts.threads), PeakMemory(opts.device)
    batches, widths = BATCHES, WIDTHS  # cheap rows: every point also with --quick
    points = [("batch", b, mlp(batch=b)) for b in batches]
    points += [("width", wd, mlp(width=wd)) for wd in widths]
    meta = {"kind": "workload", "workload": "scaling"}
    if not store.has(meta):
        meta.update(
            description="MLP 784-W-W-10, classification: batch "
            f"{'/'.join(map(str, batches))} at W = 128; W = {'/'.join(map(str, widths))} "
            "at batch 128",
            threads=opts.threads,
            clock=clock.name,
            allocator=opts.allocator,
        )
        store.append(meta)
    for axis, value, w in points:
        w.to(opts.device)
        grad = grad_step_of(w)
        for _ in range(3):
            grad()
        for structure in STRUCTURES:
            rec = {
                "kind": "scaling",
                "workload": "scaling",
                "axis": axis,
                "value": value,
                "library": "curvlib:autograd",
                "curvature": "ggn",
                "structure": structure,
                "P": w.num_params,
                "N": len(w.y),
            }
            if opts.resume and store.has(rec):
                continue
            obj = curvlib.backend_class("autograd", "ggn")(w.model, w.likelihood)
            kw = {"N": len(w.y)} if structure == "kron" else {}

            def call(obj=obj, structure=structure, kw=kw, w=w):
                return getattr(obj, structure)(w.x, w.y, **kw)[1]

            try:
                # fast rows: up to 11 repeats also with --quick (steadier slopes)
                cap = 11 if opts.quick else 25
                result, stats = measure(call, grad, clock, memory, opts.repeats, False, 30.0, cap)
                canon(result, structure)  # a result of the expected kind
                rec.update(status="ok", **stats)
            except RowTimeout:
                rec["status"] = "slow: stopped after 30 s"
            except Exception as err:  # noqa: BLE001 - a failure is a row, not a crash
                rec["status"] = f"error: {type(err).__name__}: {first_line(err)}"
            store.append(rec)
            if not opts.quiet:
                t = f"{rec['ratio']:6.2f}x {rec['ms']:8.2f} ms" if "ratio" in rec else ""
                print(
                    f"  scaling {axis:5s} {value:4d} {structure:5s} {t} "
                    f"{rec.get('status', '')[:60] if rec.get('status') != 'ok' else ''}",
                    file=sys.stderr,
                    flush=True,
                )
