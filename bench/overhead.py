r"""The fixed cost of a call: how much of it the template's steps take, on small workloads.

::

    python bench/overhead.py                       # mlp, regression, toy; every backend
    python bench/overhead.py --workloads mlp --repeats 200 --out overhead.md

Every public call of :class:`curvlib.CurvatureInterface` runs the template (DESIGN.md,
docs/reliability.md): the checks before any work (``_begin``: keywords, inputs, targets,
selection, capability table, size estimate), the backend's hook inside the hygiene context
(``_run``: the model snapshot and its restoration, the differentiable attention kernels,
the fixed selection), the output checks of the first forward pass inside the hook
(``Call.check_output``: shape, finiteness, targets against the output, the loss) and the
finishing step (``_finish``: finiteness of the loss and the result, the subnetwork). This
script times each of them inside real calls (thread CPU time, one torch thread, wrappers
around the template's methods) and reports them as shares of the call, next to one gradient
on the same batch, and what the call would cost without them (``× grad bare``). Like the
rest of ``bench/``, it is never part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__all__ = ["STEPS", "COLUMNS", "measure_steps", "rows", "markdown", "main"]

#: (label, owner of the method, method name): the template steps timed
STEPS = (
    ("before", "interface", "_begin"),
    ("run", "interface", "_run"),
    ("output", "call", "check_output"),
    ("finish", "checks", "_finish"),
)
#: the columns of the report: the checks before the hook, the hygiene context (``_run``
#: without the hook), the output checks inside the hook, the finishing step
COLUMNS = ("checks before the hook", "hygiene", "output checks", "finish")


def _owners() -> dict[str, Any]:
    from curvlib._call import Call
    from curvlib._checks import CapabilityChecks
    from curvlib.interface import CurvatureInterface

    return {"interface": CurvatureInterface, "call": Call, "checks": CapabilityChecks}


class _Timers:
    """Wrap the template's methods with thread-CPU-time counters; restore them on exit."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._saved: list[tuple[Any, str, Any]] = []
        owners = _owners()
        for label, owner, name in STEPS:
            cls = owners[owner]
            self._wrap(cls, name, label)

    def _wrap(self, cls: Any, name: str, label: str) -> None:
        fn = cls.__dict__.get(name)
        if fn is None:  # a backend's own hook: wrap it on every class that defines it
            return
        totals = self.totals

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.thread_time() - t

        self._saved.append((cls, name, fn))
        setattr(cls, name, timed)

    def wrap_hook(self, cls: type, hook: str) -> None:
        for klass in cls.__mro__:
            if hook in klass.__dict__:
                self._wrap(klass, hook, "hook")
                return

    def close(self) -> None:
        for cls, name, fn in reversed(self._saved):
            setattr(cls, name, fn)


def measure_steps(
    curv: Any, structure: str, x: Any, y: Any, grad: Callable[[], None], repeats: int
) -> dict[str, float]:
    """Per step its median share of one ``curv.<structure>(x, y)`` call, and the call's and a
    gradient's median times (ms)."""
    fn = getattr(curv, structure)
    fn(x, y)
    fn(x, y)  # once-only state
    timers = _Timers()
    timers.wrap_hook(type(curv), f"_{structure}")
    calls, grads, shares = [], [], {}
    try:
        for _ in range(repeats):
            timers.totals.clear()
            a = time.thread_time()
            grad()
            b = time.thread_time()
            fn(x, y)
            e = time.thread_time()
            grads.append(b - a)
            calls.append(e - b)
            for k, v in timers.totals.items():
                shares.setdefault(k, []).append(v / (e - b))
    finally:
        timers.close()
    out = {k: statistics.median(v) for k, v in shares.items()}
    out["call_ms"] = 1e3 * statistics.median(calls)
    out["grad_ms"] = 1e3 * statistics.median(grads)
    return out


def _toy() -> Any:
    import torch
    from torch import nn

    from bench.workloads import Workload

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    return Workload("toy", "MLP 5-4-3 (P = 39), batch 8", "classification", model, x, y)


def _workload(name: str) -> Any:
    from bench.workloads import build

    return _toy() if name == "toy" else build(name)


def rows(names: list[str], backends: list[str], repeats: int) -> list[dict[str, Any]]:
    """One row per workload × backend × (EF, exact GGN) × (diag, kron)."""
    import copy

    import curvlib
    from bench.session import grad_step_of

    out = []
    for name in names:
        w = _workload(name)
        grad = grad_step_of(w)
        for backend in backends:
            for curvature in ("ef", "ggn"):
                cls = curvlib.backend_class(backend, curvature)
                for structure in ("diag", "kron"):
                    curv = cls(copy.deepcopy(w.model), w.likelihood)
                    r = measure_steps(curv, structure, w.x, w.y, grad, repeats)
                    out.append(
                        {
                            "workload": name,
                            "backend": backend,
                            "curvature": curvature,
                            "structure": structure,
                            **r,
                        }  # fmt: skip
                    )
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (shares in %)."""
    head = "| workload | backend | row | call ms | × grad | " + " | ".join(COLUMNS)
    head += " | template total | × grad bare |"
    lines = [head, "| " + " | ".join(["---"] * (len(COLUMNS) + 7)) + " |"]
    for r in table:
        shares = dict(
            zip(
                COLUMNS,
                (
                    r.get("before", 0.0),
                    r.get("run", 0.0) - r.get("hook", 0.0),
                    r.get("output", 0.0),
                    r.get("finish", 0.0),
                ),
                strict=True,
            )
        )
        # everything outside the backend's own work: the call minus the hook, plus the
        # output checks (which run inside the hook)
        total = 1.0 - r.get("hook", 0.0) + r.get("output", 0.0)
        ratio = r["call_ms"] / r["grad_ms"]
        cells = " | ".join(f"{100 * shares[k]:.0f} %" for k in COLUMNS)
        lines.append(
            f"| {r['workload']} | {r['backend']} | {r['curvature']} {r['structure']} | "
            f"{r['call_ms']:.2f} | {ratio:.2f} | {cells} | {100 * total:.0f} % | "
            f"{ratio * (1 - total):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["toy", "regression", "mlp"])
    parser.add_argument("--backends", nargs="+", default=["autograd", "backpack", "asdl"])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    table = markdown(rows(args.workloads, args.backends, args.repeats))
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
