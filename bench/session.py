r"""One workload in one process: curvlib's rows, the anchors, curvlib's rows again.

The rows of a workload run in three phases in the same process (with several workloads in
one process, as ``--quick`` does, each phase runs for every workload before the next):

1. ``fresh``: every curvlib row (:func:`bench.cases.curvlib_cases`), before any other
   library has run in the process;
2. ``anchors``: every other library's row (:func:`bench.anchors.anchor_cases`);
3. ``after``: every curvlib row again, on new objects, after the anchors.

The report sets curvlib's ratio in both orders side by side (the ordering effect).
``--quick`` measures every row kind on the MLP only; on the other workloads it runs the
autograd backend's rows, laplace-torch's GGN/EF classes and no ``after`` phase. Each row
is written to the results file as soon as it is measured. With ``resume``, rows already in
the file are skipped; if the ``after`` phase has rows to measure, the anchors that an
earlier run measured are replayed (one untimed call each) first, so that the ``after`` rows
see the same process state.
"""

from __future__ import annotations

import copy
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import curvlib
from curvlib.errors import CurvlibError

from .agreement import agreement, canon
from .anchors import anchor_cases
from .cases import MAX_FULL_P, Case, curvlib_cases, loss_sum, operator_vector
from .store import Results
from .timing import Clock, PeakMemory, RowTimeout, measure
from .workloads import QUICK_FULL_SCOPE, Workload, activation_bytes, build

__all__ = ["Options", "first_line", "preload", "run_group"]


@dataclass
class Options:
    """What a workload's process was asked to do."""

    quick: bool = False
    repeats: int = 5
    device: str = "cpu"
    threads: int = 1
    allocator: str = "pinned"
    resume: bool = False
    quiet: bool = False

    @property
    def limit(self) -> float:
        """Seconds after which a row's first call is stopped."""
        return 0.5 if self.quick else 30.0


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def result_bytes(result: Any) -> int:
    """Bytes of a result: a tensor, a ``Kron`` or a list of (lists of) tensors."""
    if isinstance(result, torch.Tensor):
        return result.numel() * result.element_size()
    if hasattr(result, "kfacs"):
        result = result.kfacs
    if isinstance(result, (list, tuple)):
        return sum(result_bytes(r) for r in result)
    return 0


def grad_step_of(w: Workload) -> Callable[[], None]:
    """One plain forward + backward of the summed loss on the batch (the unit of time)."""
    model = copy.deepcopy(w.model)
    lossf = loss_sum(w.likelihood)

    def grad_step() -> None:
        model.zero_grad(set_to_none=True)
        lossf(model(w.x), w.y).backward()

    return grad_step


def linear_dims(model: torch.nn.Module) -> list[tuple[int, int]] | None:
    """``(in, out)`` of each layer of an MLP made of Linear layers (for the cost model)."""
    layers = [m for m in model.modules() if not list(m.children())]
    linears = [m for m in layers if isinstance(m, torch.nn.Linear)]
    if any(p.requires_grad for m in layers if m not in linears for p in m.parameters()):
        return None
    if any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in layers):
        return None
    return [(m.in_features, m.out_features) for m in linears]


class _References:
    """curvlib's autograd results, the reference of every row's agreement.

    Taken from the ``curvlib:autograd`` rows as they are measured; computed (untimed) only
    where ``--resume`` skipped that row after it had been measured (``resumed``), never for a
    row that was skipped or failed (a full Hessian beyond the size limits).
    """

    def __init__(self, w: Workload) -> None:
        self.w = w
        self.known: dict[tuple[str, str], Any] = {}
        self.failed: set[tuple[str, str]] = set()
        self.resumed: set[tuple[str, str]] = set()

    def get(self, curv: str, structure: str) -> Any:
        k = (curv, structure)
        if k in self.known or k in self.failed or k not in self.resumed:
            return self.known.get(k)
        w = self.w
        try:
            obj = curvlib.backend_class("autograd", curv)(copy.deepcopy(w.model), w.likelihood)
            kw: dict[str, Any] = {"N": len(w.y)} if structure == "kron" else {}
            if curv == "fisher":
                kw["generator"] = torch.Generator(w.x.device).manual_seed(0)
            self.known[k] = canon(getattr(obj, structure)(w.x, w.y, **kw)[1], structure)
        except Exception:  # noqa: BLE001 - no reference: the row is not compared
            self.failed.add(k)
        return self.known.get(k)


class _Session:
    def __init__(self, w: Workload, opts: Options, store: Results) -> None:
        self.w, self.opts, self.store = w, opts, store
        self.grad_step = grad_step_of(w)
        self.clock = Clock(opts.device, opts.threads)
        self.memory = PeakMemory(opts.device)
        self.refs = _References(w)
        self.v = operator_vector(w).double()
        self.reduced = False  # --quick's reduced scope (see run_group)
        self.ran: list[bool] = []

    def describe(self) -> None:
        w = self.w
        meta = {"kind": "workload", "workload": w.name}
        if self.store.has(meta):
            return
        for _ in range(3):
            self.grad_step()
        _, grad_peak = self.memory.measure(self.grad_step)
        dims = linear_dims(w.model)
        meta.update(
            description=w.description,
            P=w.num_params,
            C=w.num_outputs,
            N=len(w.y),
            likelihood=w.likelihood,
            threads=torch.get_num_threads(),
            clock=self.clock.name,
            allocator=self.opts.allocator,
            activation_mib=activation_bytes(w.model, w.x) / 2**20,
            grad_peak_mib=grad_peak,
            linear_dims=dims,
            pending=w.pending,
        )
        self.store.append(meta)

    def _record(self, case: Case, order: str) -> dict[str, Any]:
        return {
            "kind": "row",
            "workload": self.w.name,
            "library": case.library,
            "curvature": case.curvature,
            "structure": case.structure,
            "order": order,
            "note": case.note,
        }

    def run_case(self, case: Case, order: str) -> bool:
        """Measure ``case`` unless the file has it; whether it was run."""
        row = self._record(case, order)
        if self.opts.resume and self.store.has(row):
            old = self.store.get(row)
            if case.library == "curvlib:autograd" and order == "fresh" and old["status"] == "ok":
                self.refs.resumed.add((case.curvature, case.structure))
            return False
        self._start = time.perf_counter()
        if case.setup is None:
            row["status"] = case.status
            self._emit(row)
            return True
        try:
            call = case.setup()
            result, stats = measure(
                call,
                self.grad_step,
                self.clock,
                self.memory,
                self.opts.repeats,
                self.opts.quick,
                self.opts.limit,
            )
        except RowTimeout:
            g = min(self.clock.time(self.grad_step) for _ in range(3))
            lim = self.opts.limit
            row["status"] = f"slow: stopped after {lim:g} s (> {lim / g:,.0f}× grad)"
            self._fail(case)
            self._emit(row)
            return True
        except (CurvlibError, NotImplementedError) as err:
            row["status"] = f"refused: {first_line(err)}"
            self._fail(case)
            self._emit(row)
            return True
        except Exception as err:  # noqa: BLE001 - any library failure is a row, not a crash
            row["status"] = f"error: {type(err).__name__}: {first_line(err)}"
            self._fail(case)
            self._emit(row)
            return True
        row.update(status="ok", **stats, result_mib=result_bytes(result) / 2**20)
        if not case.bound:
            self._compare(case, order, result, row)
        del result
        self._emit(row)
        return True

    def _fail(self, case: Case) -> None:
        if case.library == "curvlib:autograd":
            self.refs.failed.add((case.curvature, case.structure))

    def _compare(self, case: Case, order: str, result: Any, row: dict[str, Any]) -> None:
        s = case.structure
        raw = case.canon(result) if case.canon else result
        got = canon(raw, "full" if s == "operator" else s)
        k = (case.curvature, s)
        if case.library == "curvlib:autograd" and order == "fresh":
            self.refs.known[k] = got
        if not case.compare:
            row["note"] = "; ".join(filter(None, [row["note"], "MC: own samples, not compared"]))
            return
        if s == "operator":
            full = None
            if self.w.num_params <= MAX_FULL_P:
                full = self.refs.get(case.curvature, "full")
            ref = None if full is None else full @ self.v
        else:
            ref = self.refs.get(*k)
        if ref is None:
            return
        try:
            err, scale = agreement(got, ref)
            row.update(rel_err=err, scale=scale)
        except ValueError as e:
            row["note"] = "; ".join(filter(None, [row["note"], f"not compared: {e}"]))

    def _emit(self, row: dict[str, Any]) -> None:
        row["wall_s"] = round(time.perf_counter() - self._start, 3)
        self.store.append(row)
        if not self.opts.quiet:
            t = f"{row['ratio']:8.2f}x" if row.get("status") == "ok" else " " * 9
            status = "" if row.get("status") == "ok" else row.get("status", "")
            print(
                f"  {row['order']:7s} {row['library']:34s} {row['curvature']:8s} "
                f"{row['structure']:9s}{t} {status[:60]}",
                file=sys.stderr,
                flush=True,
            )

    def replay(self, cases: list[Case]) -> None:
        """One untimed call of each anchor (``--resume``: the state the after phase needs)."""
        for case in cases:
            if case.setup is None:
                continue
            try:
                with self.clock.limit(self.opts.limit):
                    case.setup()()
            except (RowTimeout, Exception):  # noqa: BLE001 - only the state matters here
                pass


def preload() -> None:
    """Import what the first calls would import lazily (``torch._dynamo``, which
    ``torch.func`` pulls in): a row stopped by its time limit in the middle of an import
    would leave a half-initialized module behind for every later row."""
    import torch._dynamo  # noqa: F401
    import torch.func  # noqa: F401

    freeze()


def freeze() -> None:
    """Move every object alive now out of the garbage collector's reach (``gc.freeze``):
    the peak-memory measurement collects garbage before each call, and a full collection
    over the hundreds of thousands of objects that laplace-torch's imports create took
    0.6 s a row."""
    gc.collect()
    gc.freeze()


def _state(workload: str) -> dict[str, Any]:
    """What the anchors left in the process that is known to change curvlib's timings
    (docs/performance.md, "Ordering"): BackPACK's global list of hook handles."""
    rec: dict[str, Any] = {"kind": "state", "workload": workload, "order": "after"}
    if "backpack.context" in sys.modules:
        from backpack.context import CTX

        rec["backpack_hook_handles"] = len(CTX.hook_handles)
    return rec


def run_group(names: list[str], opts: Options, store: Results) -> None:
    """Run workloads ``names`` in this process, phase by phase (see the module docstring):
    the fresh rows of every workload (and the scaling points), then every workload's
    anchors, then every workload's curvlib rows again."""
    from .scaling import run_scaling

    sessions = {}
    for name in names:
        if name == "scaling":
            run_scaling(opts, store)
            continue
        s = _Session(build(name).to(opts.device), opts, store)
        s.reduced = opts.quick and name not in QUICK_FULL_SCOPE
        s.describe()
        for case in curvlib_cases(s.w, opts.quick, reduced=s.reduced):
            s.run_case(case, "fresh")
        sessions[name] = s
    anchors = {}
    for name, s in sessions.items():
        anchors[name] = anchor_cases(s.w, opts.quick, s.reduced)
        freeze()  # after the imports of the other libraries
        s.ran = [s.run_case(c, "anchors") and c.setup is not None for c in anchors[name]]
    for name, s in sessions.items():
        if s.reduced:
            continue
        after = curvlib_cases(s.w, opts.quick, after=True)
        todo = [c for c in after if not (opts.resume and store.has(s._record(c, "after")))]
        if todo:  # --resume: replay the anchors that an earlier run measured
            s.replay([c for c, ran in zip(anchors[name], s.ran, strict=True) if not ran])
        store.append(_state(s.w.name))
        for case in todo:
            s.run_case(case, "after")
