r"""The benchmark harness behind ``curvlib bench``: curvlib's backends against laplace-torch's.

Every row times one curvature computation — a backend (curvlib's, laplace-torch 0.3's,
curvlinops', BackPACK's own) × a curvature (exact GGN, MC Fisher, empirical Fisher, Hessian)
× a structure (``diag``, ``kron``, ``full`` where ``P ≤ 20,000``, matrix-free ``operator``
product with one vector) — on one fixed workload, and reports

* **× grad**: the median over the repeats of ``t_row / t_grad``, where ``t_grad`` is one plain
  forward + backward pass of the summed loss on the same batch, timed right before each
  repeat of the row (interleaved, same process, same threads), so that a machine that gets
  busier or quieter during the run moves both;
* **peak MiB**: the growth of the process's peak resident set size during the first
  (warm-up) call of the row (CPU: free heap memory is returned to the OS with
  ``malloc_trim`` and the kernel's peak counter ``VmHWM`` is reset through
  ``/proc/self/clear_refs`` right before the call; CUDA: ``torch.cuda.max_memory_allocated``
  above the memory allocated before the call). It counts every allocation the call touches,
  including its result (a ``P×P`` matrix for ``full``);
* **rel. err**: ``‖R − R_ref‖_F / ‖R_ref‖_F`` against curvlib's autograd result of the same
  curvature and structure (dense matrices, diagonals, and for K-FAC the exact Frobenius norm of
  the block-diagonal Kronecker matrix, computed from the factors). Libraries whose convention
  differs by a constant (laplace-torch's regression EF is twice curvlib's, curvlinops'
  operators use the unscaled ``MSELoss``) are compared after the least-squares scalar, which is
  printed (``×2``). MC Fisher results of other libraries use their own random samples, so
  they are not compared; curvlib's backends all draw from the same ``torch.Generator``.

Each workload runs in its own subprocess (a crash or a library's global state stays there),
with ``torch.set_num_threads`` fixed. On a busy machine (load average above the free cores,
or a calibration matmul that is not faster with more threads) one thread is used and a warning
is printed: with more threads than free cores, OpenMP threads spin-wait on each other and small
timings grow by orders of magnitude.

Run ``curvlib bench [--quick] [--workloads ...] [--out results.json] [--threads N]`` (or
``python bench/run.py``); the markdown table is printed and written next to the JSON file.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["WORKLOADS", "choose_threads", "main", "run"]

MAX_FULL_P = 20_000  # dense full matrices only up to this many parameters
MAX_DENSE_BYTES = 2 * 2**30  # laplace's torch.func Jacobians (B, C, P): skip above this
STRUCTURES = ("diag", "kron", "full", "operator")
TOL = 1e-5  # agreement target of curvlib rows (float32)
QUICK_SKIP = "skipped in --quick: full is timed for curvlib:autograd only"
FULL_ROW_SECONDS = 30.0  # without --quick
QUICK_ROW_SECONDS = 2.0  # --quick stops a row whose first call takes longer (same clock)


# -- workloads ------------------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    description: str
    likelihood: str
    model: Any
    x: Any
    y: Any

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def num_outputs(self) -> int:
        import torch

        with torch.no_grad():
            return int(self.model(self.x[:1]).shape[-1])


def _transformer(d_in: int = 16, d: int = 32, heads: int = 2, hidden: int = 64, C: int = 10):
    import torch
    from torch import nn

    class Block(nn.Module):
        """Embedding, one self-attention and one MLP sub-block (pre-pooling), a linear head.

        Every Linear module is called once per forward pass (curvlib's per-layer rules need
        that); the LayerNorms have no parameters (``elementwise_affine=False``).
        """

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(d_in, d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
            self.fc1 = nn.Linear(d, hidden)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(hidden, d)
            self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
            self.head = nn.Linear(d, C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, L, _ = x.shape
            h = self.embed(x)

            def split(t: torch.Tensor) -> torch.Tensor:
                return t.view(B, L, heads, d // heads).transpose(1, 2)

            q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
            h = self.norm1(h + self.o((att @ v).transpose(1, 2).reshape(B, L, d)))
            h = self.norm2(h + self.fc2(self.act(self.fc1(h))))
            return self.head(h.mean(1))

    return Block()


def _build(name: str) -> Workload:
    """The workload ``name`` with fixed seeds, float32, random data (no download).

    The weights are initialized from seed 0 inside ``fork_rng``: the caller's global RNG is
    left as it was.
    """
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _build_seeded(name)


def _build_seeded(name: str) -> Workload:
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
        x, y = torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
        return Workload(
            name, "MLP 784-128-128-10, classification, batch 128", "classification", model, x, y
        )
    if name == "regression":
        model = nn.Sequential(
            nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5)
        )
        x, y = torch.randn(256, 20, generator=g), torch.randn(256, 5, generator=g)
        return Workload(
            name, "MLP 20-64-64-5 (tanh), regression, batch 256", "regression", model, x, y
        )
    if name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(256, 10),
        )
        x = torch.randn(64, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (64,), generator=g)
        return Workload(
            name,
            "LeNet-style CNN (2 Conv2d + max-pool + Linear) on 1x28x28, 10 classes, batch 64",
            "classification",
            model,
            x,
            y,
        )
    if name == "mlp100":
        model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 100))
        x, y = torch.randn(64, 784, generator=g), torch.randint(0, 100, (64,), generator=g)
        return Workload(
            name, "MLP 784-256-100, 100 classes, batch 64", "classification", model, x, y
        )
    if name == "transformer":
        model = _transformer()
        x = torch.randn(64, 16, 16, generator=g)
        y = torch.randint(0, 10, (64,), generator=g)
        return Workload(
            name,
            "Transformer-style block (Linear embed, 2-head self-attention, "
            "MLP, parameter-free LayerNorm, mean-pool, Linear head) on sequences "
            "of length 16, 10 classes, batch 64",
            "classification",
            model,
            x,
            y,
        )
    raise ValueError(f"unknown workload {name!r}; known: {list(WORKLOADS)}")


WORKLOADS = ("mlp", "regression", "cnn", "mlp100", "transformer")


# -- memory and timing ----------------------------------------------------------------------------
class PeakMemory:
    """Peak memory growth of one call (see the module docstring), in MiB, or ``None``."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._libc = None
        self.available = True
        if device == "cpu":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                self.available = False

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])  # KiB
        raise KeyError(key)

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, float | None]:
        import torch

        gc.collect()
        if self.device != "cpu":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            torch.cuda.synchronize()
            return out, (torch.cuda.max_memory_allocated() - base) / 2**20
        if not self.available:
            return fn(), None
        self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = self._status("VmRSS")
        out = fn()
        return out, (self._status("VmHWM") - base) / 1024


class Clock:
    """Times calls: the process's CPU time when one thread runs on the CPU, else wall time.

    With one thread every torch operation runs in the calling thread, so its CPU time is the
    work of the call, free of the time the OS gives other processes on a busy machine (which
    wall time would add, at random). With several threads, or on a GPU, wall time is used.
    ``limit(seconds)`` stops a block after that much of the same clock.
    """

    def __init__(self, device: str, threads: int) -> None:
        self.device = device
        self.cpu_time = device == "cpu" and threads == 1
        self.name = "CPU time of the thread" if self.cpu_time else "wall clock"
        self._now = time.thread_time if self.cpu_time else time.perf_counter

    def _sync(self) -> None:
        if self.device != "cpu":
            import torch

            torch.cuda.synchronize()

    def call(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """``(fn(), seconds)``."""
        self._sync()
        start = self._now()
        out = fn()
        self._sync()
        return out, self._now() - start

    def time(self, fn: Callable[[], Any]) -> float:
        return self.call(fn)[1]

    @contextmanager
    def limit(self, seconds: float | None) -> Iterator[None]:
        """Raise :class:`_RowTimeout` in the block after ``seconds`` (Unix main thread).

        The signal is handled between Python bytecodes, so a long single torch operation
        finishes first; every row works on its own copy of the model, so an interrupted
        library leaves nothing behind that later rows use.
        """
        if not seconds or not hasattr(signal, "setitimer"):
            yield
            return
        which, signum = (
            (signal.ITIMER_PROF, signal.SIGPROF)
            if self.cpu_time
            else (signal.ITIMER_REAL, signal.SIGALRM)
        )

        def handler(signum: int, frame: Any) -> None:
            raise _RowTimeout

        old = signal.signal(signum, handler)
        signal.setitimer(which, seconds)
        try:
            yield
        finally:
            signal.setitimer(which, 0)
            signal.signal(signum, old)


class _RowTimeout(Exception):
    """The first call of a row ran past the --quick time limit."""


# -- canonical results and agreement --------------------------------------------------------------
def _canon(result: Any, structure: str) -> Any:
    """float64 tensor (diag, full, operator) or list of factor lists (kron)."""
    import torch

    if structure == "kron":
        return [[f.detach().double() for f in F] for F in result.kfacs]
    if isinstance(result, torch.Tensor):
        return result.detach().double()
    raise TypeError(f"unexpected result {type(result).__name__} for {structure}")


def _factor_inner(F1: Any, F2: Any) -> float:
    if F1.ndim == 1 and F2.ndim == 1:
        return float((F1 * F2).sum())
    if F1.ndim == 1:
        return float((F1 * F2.diagonal()).sum())
    if F2.ndim == 1:
        return float((F1.diagonal() * F2).sum())
    return float((F1 * F2).sum())


def _inner(a: Any, b: Any) -> float:
    """Frobenius inner product of two results (block-diagonal Kronecker matrices for kron)."""
    if isinstance(a, list):
        if len(a) != len(b) or any(len(F1) != len(F2) for F1, F2 in zip(a, b, strict=True)):
            raise ValueError("different Kron layout")
        total = 0.0
        for F1, F2 in zip(a, b, strict=True):
            term = 1.0
            for f1, f2 in zip(F1, F2, strict=True):
                if f1.shape[0] != f2.shape[0]:
                    raise ValueError("different Kron factor shapes")
                term *= _factor_inner(f1, f2)
            total += term
        return total
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a * b).sum())


def agreement(a: Any, ref: Any) -> tuple[float, float]:
    """``(relative error, scale)``: ``scale`` is 1, or the least-squares scalar ``s`` for which
    ``s·a`` matches ``ref`` when that removes most of the error (a convention factor)."""
    aa, bb, ab = _inner(a, a), _inner(ref, ref), _inner(a, ref)
    if bb == 0:
        return (0.0 if aa == 0 else math.inf), 1.0
    err = math.sqrt(max(aa + bb - 2 * ab, 0.0) / bb)
    if err > 1e-3 and aa > 0:
        s = ab / aa
        err_s = math.sqrt(max(s * s * aa + bb - 2 * s * ab, 0.0) / bb)
        if err_s < 1e-3:
            return err_s, s
    return err, 1.0


# -- the rows of one workload ---------------------------------------------------------------------
@dataclass
class Case:
    library: str  # "curvlib:<backend>", "laplace:<Class>", "curvlinops:<Class>", "backpack", ...
    curvature: str  # ggn, fisher, ef, hessian
    structure: str  # diag, kron, full, operator
    setup: Callable[[], Callable[[], Any]] | None  # untimed; returns the timed call
    note: str = ""
    compare: bool = True  # whether an agreement with the autograd result is meaningful
    bound: bool = False  # a reference computation (dense contraction), not a curvature


class Unsupported(Exception):
    """A row that this library cannot compute on this workload."""


def _loss_sum(likelihood: str) -> Any:
    from torch import nn

    return (
        nn.CrossEntropyLoss(reduction="sum")
        if likelihood == "classification"
        else (nn.MSELoss(reduction="sum"))
    )


def _curvlib_cases(w: Workload, quick: bool) -> list[Case]:
    import torch

    import curvlib
    from curvlib.backends import registry

    cases = []
    P, B = w.num_params, len(w.y)
    order = sorted(registry(), key=lambda b: b != "autograd")  # the reference first
    for backend in order:
        for curv in registry()[backend]:
            try:
                cls = curvlib.backend_class(backend, curv)
            except Exception as err:  # noqa: BLE001 - a backend whose import fails
                for s in ("diag", "kron", "full"):
                    cases.append(Case(f"curvlib:{backend}", curv, s, None, f"unavailable: {err}"))
                continue
            for structure in ("diag", "kron", "full"):
                if structure not in cls.structures:
                    cases.append(
                        Case(
                            f"curvlib:{backend}",
                            curv,
                            structure,
                            None,
                            f"unsupported: {cls.__name__} has no {structure}",
                        )
                    )
                    continue
                if structure == "full" and P > MAX_FULL_P:
                    cases.append(
                        Case(
                            f"curvlib:{backend}",
                            curv,
                            structure,
                            None,
                            f"skipped: P = {P:,} > {MAX_FULL_P:,}",
                        )
                    )
                    continue
                if structure == "full" and quick and backend != "autograd":
                    cases.append(Case(f"curvlib:{backend}", curv, structure, None, QUICK_SKIP))
                    continue

                def setup(cls=cls, structure=structure, curv=curv):
                    obj = cls(copy.deepcopy(w.model), w.likelihood)
                    kw: dict[str, Any] = {"N": B} if structure == "kron" else {}
                    if curv == "fisher":
                        return lambda: getattr(obj, structure)(
                            w.x, w.y, generator=torch.Generator().manual_seed(0), **kw
                        )[1]
                    return lambda: getattr(obj, structure)(w.x, w.y, **kw)[1]

                cases.append(Case(f"curvlib:{backend}", curv, structure, setup))
    # operator products: one implementation (curvlib.linops) shared by every backend
    v = torch.randn(P, generator=torch.Generator().manual_seed(2))
    for curv in ("ggn", "fisher", "ef", "hessian"):
        cls = curvlib.backend_class("autograd", curv)
        if not hasattr(cls, "operator"):
            cases.append(
                Case(
                    "curvlib:all", curv, "operator", None, "skipped: curvlib has no operator() yet"
                )
            )
            continue

        def setup(cls=cls, curv=curv):
            obj = cls(copy.deepcopy(w.model), w.likelihood)
            kw = {"generator": torch.Generator().manual_seed(0)} if curv == "fisher" else {}
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


def _laplace_cases(w: Workload, quick: bool) -> list[Case]:
    try:
        import laplace.curvature as lc
    except ImportError as err:
        return [Case("laplace", "ggn", "diag", None, f"unavailable: {err}")]
    P, B = w.num_params, len(w.y)
    C = w.num_outputs
    specs = []  # (label, class, curvature, kwargs)
    for ggn, ef in (
        ("BackPackGGN", "BackPackEF"),
        ("AsdlGGN", "AsdlEF"),
        ("CurvlinopsGGN", "CurvlinopsEF"),
        ("GGNInterface", "EFInterface"),  # laplace's torch.func base classes
    ):
        specs.append((ggn, "ggn", {}))
        specs.append((ggn, "fisher", {"stochastic": True}))
        specs.append((ef, "ef", {}))
    specs += [("AsdlHessian", "hessian", {}), ("CurvlinopsHessian", "hessian", {})]
    cases = []
    for clsname, curv, kw in specs:
        cls = getattr(lc, clsname)
        label = f"laplace:{clsname}"
        for structure in ("diag", "kron", "full"):
            if curv == "hessian" and structure != "full":
                continue
            note = ""
            if structure == "full" and P > MAX_FULL_P:
                cases.append(
                    Case(label, curv, structure, None, f"skipped: P = {P:,} > {MAX_FULL_P:,}")
                )
                continue
            if structure == "full" and quick:
                cases.append(Case(label, curv, structure, None, QUICK_SKIP))
                continue
            if clsname.startswith("Curvlinops") and structure == "diag":
                cases.append(
                    Case(
                        label,
                        curv,
                        structure,
                        None,
                        "not timed: inherits the torch.func diag (GGNInterface/EFInterface row)",
                    )
                )
                continue
            torch_func = clsname.endswith("Interface") or (
                clsname.startswith("Curvlinops") and structure == "diag"
            )
            if torch_func:
                K = 1 if curv == "ef" else C
                nbytes = 4 * B * K * P
                if nbytes > MAX_DENSE_BYTES:
                    cases.append(
                        Case(
                            label,
                            curv,
                            structure,
                            None,
                            f"skipped: its Jacobians need {nbytes / 2**30:.1f} GiB",
                        )
                    )
                    continue
            if structure == "kron" and clsname.endswith("Interface"):
                cases.append(
                    Case(
                        label,
                        curv,
                        structure,
                        None,
                        "unsupported: laplace's torch.func base has no kron",
                    )
                )
                continue
            if structure == "full" and clsname.startswith("Curvlinops"):
                note = f"{P:,} products with unit vectors"

            def setup(cls=cls, kw=kw, structure=structure):
                m = copy.deepcopy(w.model)
                m.output_size = C  # laplace's Laplace sets it before calling its backends
                obj = cls(m, w.likelihood, **kw)
                if structure == "kron":
                    return lambda: obj.kron(w.x, w.y, N=B)[1]
                return lambda: getattr(obj, structure)(w.x, w.y)[1]

            cases.append(Case(label, curv, structure, setup, note, compare=curv != "fisher"))
    return cases


def _reference_cases(w: Workload, quick: bool) -> list[Case]:
    """BackPACK's own DiagHessian, curvlinops' operators, and the dense-contraction bound."""
    import torch

    P, B, C = w.num_params, len(w.y), w.num_outputs
    cases = []

    def backpack_diag_hessian():
        from backpack import backpack, extend
        from backpack.extensions import DiagHessian

        m = extend(copy.deepcopy(w.model))
        lossf = extend(_loss_sum(w.likelihood))
        params = list(m.parameters())

        def call():
            loss = lossf(m(w.x), w.y)
            with backpack(DiagHessian()):
                loss.backward()
            out = torch.cat([p.diag_h.flatten() for p in params])
            for p in params:
                del p.diag_h
                p.grad = None
            return out

        return call

    cases.append(
        Case(
            "backpack:DiagHessian",
            "hessian",
            "diag",
            backpack_diag_hessian,
            "BackPACK's own DiagHessian on the summed loss",
        )
    )

    v = torch.randn(P, generator=torch.Generator().manual_seed(2))
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
                _loss_sum(w.likelihood),
                list(m.parameters()),
                [(w.x, w.y)],
                check_deterministic=False,
            )
            return lambda: op @ v

        cases.append(
            Case(f"curvlinops:{clsname}", curv, "operator", setup, compare=curv != "fisher")
        )

    if P <= MAX_FULL_P:
        for curv, K in (("ggn", C), ("ef", 1)):

            def setup(K=K):
                V = torch.randn(B * K, P, generator=torch.Generator().manual_seed(3))
                return lambda: V.T @ V

            cases.append(
                Case(
                    "bound:dense",
                    curv,
                    "full",
                    setup,
                    f"V.T @ V, V of shape (N·{'C' if K > 1 else '1'}, P) = ({B * K}, {P})",
                    compare=False,
                    bound=True,
                )
            )
    return cases


def run_workload(name: str, quick: bool, repeats: int, device: str, emit: Callable) -> None:
    """Time every row of workload ``name``; ``emit(row_dict)`` is called once per row."""
    import torch

    from curvlib.errors import CurvlibError

    w = _build(name)
    w.model.to(device)
    w.x, w.y = w.x.to(device), w.y.to(device)
    P, C, B = w.num_params, w.num_outputs, len(w.y)
    emit(
        {
            "kind": "workload",
            "workload": name,
            "description": w.description,
            "P": P,
            "C": C,
            "N": B,
            "likelihood": w.likelihood,
            "threads": torch.get_num_threads(),
            "clock": Clock(device, torch.get_num_threads()).name,
        }
    )
    base_model = copy.deepcopy(w.model)
    lossf = _loss_sum(w.likelihood)

    def grad_step() -> None:
        base_model.zero_grad(set_to_none=True)
        lossf(base_model(w.x), w.y).backward()

    clock = Clock(device, torch.get_num_threads())
    timed = clock.time
    memory = PeakMemory(device)
    for _ in range(3):
        grad_step()
    refs: dict[tuple[str, str], Any] = {}
    cases = _curvlib_cases(w, quick) + _laplace_cases(w, quick) + _reference_cases(w, quick)
    v = torch.randn(P, generator=torch.Generator().manual_seed(2)).double()
    limit = QUICK_ROW_SECONDS if quick else FULL_ROW_SECONDS
    for case in cases:
        row: dict[str, Any] = {
            "kind": "row",
            "workload": name,
            "library": case.library,
            "curvature": case.curvature,
            "structure": case.structure,
            "note": case.note,
        }
        if case.setup is None:
            row["status"] = case.note.split(":")[0]
            emit(row)
            continue
        try:
            call = case.setup()
            with clock.limit(limit):
                (result, first), peak = memory.measure(functools.partial(clock.call, call))
        except _RowTimeout:
            g = statistics.median(timed(grad_step) for _ in range(3))
            row.update(
                status="slow",
                note=f"stopped after {limit:g} s{' in --quick' if quick else ''} "
                f"(> {limit / g:,.0f}× grad)",
            )
            emit(row)
            continue
        except (CurvlibError, NotImplementedError, Unsupported) as err:
            row.update(status="unsupported", note=f"unsupported: {_first_line(err)}")
            emit(row)
            continue
        except Exception as err:  # noqa: BLE001 - any library failure is a row, not a crash
            row.update(status="error", note=f"error: {type(err).__name__}: {_first_line(err)}")
            emit(row)
            continue
        # cheap rows get more repeats (steadier medians); --quick gives slow rows fewer
        reps = max(repeats, min(25, int(0.5 / max(first, 1e-6))))
        if quick and first > 0.3:
            reps = max(1, min(repeats, int(1.5 / first)))
        ratios, times, grads = [], [], []
        try:
            for _ in range(reps):
                tg = timed(grad_step)
                t = timed(call)
                ratios.append(t / tg)
                times.append(t)
                grads.append(tg)
        except Exception as err:  # noqa: BLE001
            row.update(status="error", note=f"error: {type(err).__name__}: {_first_line(err)}")
            emit(row)
            continue
        row.update(
            status="ok",
            repeats=reps,
            ratio=statistics.median(ratios),
            ms=1e3 * statistics.median(times),
            grad_ms=1e3 * statistics.median(grads),
            first_ms=1e3 * first,
            peak_mib=peak,
        )
        if not case.bound:
            canon = _canon(result, "full" if case.structure == "operator" else case.structure)
            key = (case.curvature, case.structure)
            if case.library == "curvlib:autograd":
                refs[key] = canon
            ref = refs.get(key)
            if case.structure == "operator" and (case.curvature, "full") in refs:
                ref = refs[(case.curvature, "full")] @ v
            if ref is not None and case.compare:
                try:
                    err, scale = agreement(canon, ref)
                    row.update(rel_err=err, scale=scale)
                except ValueError as e:
                    row["note"] = (row["note"] + "; " if row["note"] else "") + f"not compared: {e}"
            elif not case.compare:
                row["note"] = (row["note"] + "; " if row["note"] else "") + (
                    "MC: own samples, not compared"
                )
        del result
        emit(row)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:160]


# -- threads --------------------------------------------------------------------------------------
def choose_threads(requested: int | None) -> tuple[int, dict[str, Any]]:
    """The thread count to use and why: one thread on a busy machine, with a warning."""
    import torch

    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ncpu = ncpu or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    info: dict[str, Any] = {"cpus": ncpu, "loadavg_1min": round(load, 2)}
    if requested is not None:
        info["reason"] = "--threads"
        if requested > 1 and load > ncpu - requested + 0.5:
            warnings.warn(
                f"machine is busy (load {load:.1f} on {ncpu} CPUs) and {requested} threads were "
                "requested: timings may be inflated by spin-waiting threads",
                stacklevel=2,
            )
        return requested, info
    # calibration: a small matmul with one thread and with every CPU
    a = torch.randn(256, 256)
    old = torch.get_num_threads()

    def med(n: int) -> float:
        torch.set_num_threads(n)
        ts = []
        for _ in range(15):
            t = time.perf_counter()
            a @ a
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    t1, tn = med(1), med(ncpu)
    torch.set_num_threads(old)
    info.update(matmul256_ms_1thread=round(t1 * 1e3, 3), matmul256_ms_all=round(tn * 1e3, 3))
    free = ncpu - load
    if ncpu > 1 and (free < ncpu - 0.5 or tn > 0.8 * t1):
        warnings.warn(
            f"machine is busy (load average {load:.1f} on {ncpu} CPUs; 256x256 matmul "
            f"{t1 * 1e3:.2f} ms with 1 thread, {tn * 1e3:.2f} ms with {ncpu}): using 1 thread, "
            "since threads spin-waiting for a CPU inflate small timings",
            stacklevel=2,
        )
        info["reason"] = "busy machine"
        return 1, info
    info["reason"] = "idle machine"
    return ncpu, info


def machine_summary() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        keep = (
            "Model name",
            "CPU(s)",
            "Thread(s) per core",
            "Core(s) per socket",
            "Hypervisor vendor",
            "L2 cache",
            "L3 cache",
        )
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in keep:
                info[key.strip()] = val.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/meminfo") as fh:
            info["MemTotal"] = fh.readline().split(":")[1].strip()
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("backpack-for-pytorch", "asdfghjkl", "laplace-torch", "curvlinops-for-pytorch"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# -- targets (issue 8) ----------------------------------------------------------------------------
def _ok_rows(rows: list[dict], **match: str) -> list[dict]:
    return [
        r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())
    ]


def _best_curvlib(rows: list[dict], curvature: str, structure: str) -> dict | None:
    cands = [
        r
        for r in _ok_rows(rows, curvature=curvature, structure=structure)
        if r["library"].startswith("curvlib:")
    ]
    return min(cands, key=lambda r: r["ratio"]) if cands else None


def _row(rows: list[dict], library: str, curvature: str, structure: str) -> dict | None:
    found = _ok_rows(rows, library=library, curvature=curvature, structure=structure)
    return found[0] if found else None


def _why(rows: list[dict], library: str, curvature: str, structure: str) -> str:
    """Why a row has no time: its note, or that it was not reached."""
    for r in rows:
        if (r["library"], r["curvature"], r["structure"]) == (library, curvature, structure):
            return r.get("note") or r.get("status", "")
    return "not measured"


def evaluate_targets(rows: list[dict], meta: dict) -> list[dict]:
    """One entry per (target, workload): met / not met / n/a, with the numbers.

    curvlib's figure is its fastest backend on the row (what ``backend="auto"`` should pick).
    """
    out = []

    def add(target: str, status: str, detail: str) -> None:
        out.append(
            {"target": target, "workload": meta["workload"], "status": status, "detail": detail}
        )

    def lib(r: dict) -> str:
        return r["library"].split(":", 1)[1]

    def checked(r: dict) -> dict:
        """The row whose agreement tells whether ``r`` computes curvlib's quantity: ``r``
        itself, or for an MC row (own samples) its exact-GGN sibling."""
        if r["curvature"] == "fisher":
            return _row(rows, r["library"], "ggn", r["structure"]) or {}
        return r

    def same_quantity(r: dict) -> bool:
        err = checked(r).get("rel_err")
        return err is None or err <= 1e-3

    def versus(t: str, curv: str, structure: str, others: list[tuple[str, str]], limit: float):
        """curvlib's best ratio against the fastest of ``others`` (library, curvature) that
        computes the same quantity (rows that disagree with autograd are named, not used,
        unless no other row is left)."""
        best = _best_curvlib(rows, curv, structure)
        found = [r for r in (_row(rows, o, c, structure) for o, c in others) if r is not None]
        same = [r for r in found if same_quantity(r)]
        differ = "".join(
            f"; {r['library']} computes another quantity (rel. err {checked(r)['rel_err']:.1g}"
            f"{' of its exact GGN' if r['curvature'] == 'fisher' else ''})"
            for r in found
            if r not in same
        )
        found = same or found
        if best is None:
            add(t, "not met", f"autograd: {_why(rows, 'curvlib:autograd', curv, structure)}")
        elif not found:
            why = "; ".join(f"{o}: {_why(rows, o, c, structure)}" for o, c in others)
            add(t, "n/a", f"{why}; curvlib:{lib(best)} {best['ratio']:.2f}× grad")
        else:
            o = min(found, key=lambda r: r["ratio"])
            q = best["ratio"] / o["ratio"]
            add(
                t,
                "met" if q <= limit else "not met",
                f"curvlib:{lib(best)} {best['ratio']:.2f}× vs {o['library']} "
                f"{o['ratio']:.2f}× grad (= {q:.2f}× its time){differ}",
            )
        return best

    def at_most(t: str, curv: str, structure: str, limit: float) -> None:
        best = _best_curvlib(rows, curv, structure)
        if best is None:
            add(t, "not met", f"autograd: {_why(rows, 'curvlib:autograd', curv, structure)}")
        else:
            add(
                t,
                "met" if best["ratio"] <= limit else "not met",
                f"curvlib:{lib(best)} {best['ratio']:.2f}× grad",
            )

    # 1. exact diag GGN and exact K-FAC: <= 0.67x BackPACK, and <= 8x grad at C = 100
    for s in ("diag", "kron"):
        versus(f"exact {s} GGN ≤ 0.67× BackPACK", "ggn", s, [("laplace:BackPackGGN", "ggn")], 0.67)
        if meta["C"] >= 100:
            at_most(f"exact {s} GGN ≤ 8× grad at C = 100", "ggn", s, 8.0)
    # 2. MC and EF diag <= 1.8x grad; MC and EF K-FAC <= 0.8x the fastest of ASDL, curvlinops
    for curv, name, asdl, cl in (
        ("fisher", "MC", "laplace:AsdlGGN", "laplace:CurvlinopsGGN"),
        ("ef", "EF", "laplace:AsdlEF", "laplace:CurvlinopsEF"),
    ):
        at_most(f"{name} diag ≤ 1.8× grad", curv, "diag", 1.8)
        versus(
            f"{name} K-FAC ≤ 0.8× ASDL/curvlinops", curv, "kron", [(asdl, curv), (cl, curv)], 0.8
        )
    # 3. full GGN and EF within 1.1x of the dense contraction N·K·P² on the same data
    for curv in ("ggn", "ef"):
        t = f"full {curv.upper()} ≤ 1.1× dense contraction"
        bound = _row(rows, "bound:dense", curv, "full")
        best = _best_curvlib(rows, curv, "full")
        if meta["P"] > MAX_FULL_P:
            add(t, "n/a", f"P = {meta['P']:,} > {MAX_FULL_P:,}: no full matrix")
        elif bound is None:
            add(t, "n/a", f"bound: {_why(rows, 'bound:dense', curv, 'full')}")
        elif best is None:
            add(t, "not met", f"autograd: {_why(rows, 'curvlib:autograd', curv, 'full')}")
        else:
            q = best["ms"] / bound["ms"]
            add(
                t,
                "met" if q <= 1.1 else "not met",
                f"curvlib:{lib(best)} {best['ms']:.1f} ms vs contraction {bound['ms']:.1f} ms "
                f"(= {q:.2f}×)",
            )
    # 4. diag Hessian no slower than BackPACK's DiagHessian
    versus(
        "diag Hessian ≤ BackPACK DiagHessian",
        "hessian",
        "diag",
        [("backpack:DiagHessian", "hessian")],
        1.0,
    )
    # 5. diag and kron never allocate O(N·C·P): peak below a quarter of N·C·P float32 numbers,
    # plus 4 MiB of slack for the page-granular RSS measurement
    ncp = 4 * meta["N"] * meta["C"] * meta["P"] / 2**20
    for r in rows:
        if (
            r.get("status") == "ok"
            and r["library"].startswith("curvlib:")
            and r["structure"] in ("diag", "kron")
            and r.get("peak_mib") is not None
        ):
            r["ncp_fraction"] = r["peak_mib"] / ncp
    mem = [r for r in rows if "ncp_fraction" in r and r["curvature"] != "hessian"]
    if mem:
        over = [r for r in mem if r["peak_mib"] >= 0.25 * ncp + 4]
        worst = max(mem, key=lambda r: r["peak_mib"])
        add(
            "diag/kron peak memory ≪ N·C·P floats",
            "not met" if over else "met",
            f"N·C·P float32 = {ncp:.0f} MiB; "
            + (
                "over a quarter of it: "
                + ", ".join(
                    f"{r['library']} {r['curvature']} {r['structure']} {r['peak_mib']:.0f} MiB"
                    for r in over
                )
                if over
                else f"largest {worst['library']} {worst['curvature']} {worst['structure']} "
                f"{worst['peak_mib']:.1f} MiB"
            ),
        )
    # 6. agreement of every curvlib row with the autograd result
    bad = [
        r
        for r in rows
        if r.get("status") == "ok"
        and r["library"].startswith("curvlib:")
        and r.get("rel_err") is not None
        and (r["rel_err"] > TOL or r.get("scale", 1.0) != 1.0)
    ]
    add(
        f"curvlib rows within {TOL:g} of autograd",
        "not met" if bad else "met",
        ", ".join(
            f"{r['library']} {r['curvature']} {r['structure']} {r['rel_err']:.1e}" for r in bad
        )
        or "all compared rows agree",
    )
    return out


# -- report ---------------------------------------------------------------------------------------
def _fmt_row(r: dict) -> str:
    if r.get("status") != "ok":
        return (
            f"| {r['library']} | {r['curvature']} | {r['structure']} | – | – | – | – | "
            f"{r.get('note', '')} |"
        )
    err = "–"
    if r.get("rel_err") is not None:
        err = f"{r['rel_err']:.1e}"
        if r.get("scale", 1.0) != 1.0:
            err += f" (×{r['scale']:.3g})"
    peak = "–" if r.get("peak_mib") is None else f"{r['peak_mib']:.1f}"
    note = r.get("note", "")
    if r.get("repeats", 5) < 5:
        note = (note + "; " if note else "") + f"{r['repeats']} repeat(s)"
    return (
        f"| {r['library']} | {r['curvature']} | {r['structure']} | {r['ms']:.2f} | "
        f"{r['ratio']:.2f} | {peak} | {err} | {note} |"
    )


def _structural(r: dict) -> bool:
    """Rows that only say a structure does not exist or is out of range (``compact`` drops)."""
    note = r.get("note", "")
    return r.get("status") != "ok" and (
        " has no " in note or note.startswith(("skipped: P", "skipped in --quick", "not timed"))
    )


def markdown(result: dict, compact: bool = False) -> str:
    """The tables of a run; ``compact`` leaves out the rows of structures a class does not
    offer, full matrices above the size limit and rows --quick skips."""
    lines = [
        f"curvlib bench — {result['date']}, {result['mode']}, "
        f"{result['threads']} thread(s) ({result['thread_info'].get('reason', '')}, "
        f"load {result['thread_info'].get('loadavg_1min')}), device {result['device']}",
        "",
    ]
    for wl in result["workloads"]:
        meta = wl["meta"]
        if not meta:
            lines += [f"## {wl['name']}", "", f"failed: {wl.get('error', '')}", ""]
            continue
        grads = [r["grad_ms"] for r in wl["rows"] if r.get("status") == "ok"]
        g = statistics.median(grads) if grads else float("nan")
        lines += [
            f"## {wl['name']}: {meta['description']}",
            "",
            f"P = {meta['P']:,}, C = {meta['C']}, N = {meta['N']}; one gradient "
            f"(forward + backward of the summed loss) ≈ {g:.2f} ms ({meta.get('clock', '')})"
            + (f"; {wl['error']}" if wl.get("error") else ""),
            "",
            "| library | curvature | structure | ms | × grad | peak MiB | rel. err vs autograd "
            "| note |",
            "| --- | --- | --- | ---: | ---: | ---: | --- | --- |",
        ]
        lines += [_fmt_row(r) for r in wl["rows"] if not (compact and _structural(r))]
        lines += ["", "| target | status | numbers |", "| --- | --- | --- |"]
        lines += [f"| {t['target']} | {t['status']} | {t['detail']} |" for t in wl["targets"]]
        lines.append("")
    return "\n".join(lines)


# -- driver ---------------------------------------------------------------------------------------
def _child(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    warnings.filterwarnings("ignore")
    with open(args.child_out, "a") as fh:

        def emit(row: dict) -> None:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            if row.get("kind") == "row" and not args.quiet:
                t = f"{row['ratio']:8.2f}x" if row.get("status") == "ok" else f"{'':9s}"
                print(
                    f"  {row['library']:32s} {row['curvature']:8s} {row['structure']:9s}{t} "
                    f"{row.get('note', '')[:70]}",
                    file=sys.stderr,
                    flush=True,
                )

        run_workload(args.child, args.quick, args.repeats, args.device, emit)
    return 0


def run(
    workloads: list[str] | None = None,
    quick: bool = False,
    out: str | Path = "bench-results.json",
    threads: int | None = None,
    repeats: int | None = None,
    device: str = "cpu",
    quiet: bool = False,
) -> dict:
    """Run the benchmark (one subprocess per workload); write ``out`` (JSON) and ``.md``."""
    workloads = list(workloads or WORKLOADS)
    for name in workloads:
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; known: {list(WORKLOADS)}")
    repeats = repeats or 5
    if repeats < 1:
        raise ValueError(f"repeats must be positive, got {repeats}")
    n_threads, thread_info = choose_threads(threads)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "mode": "quick" if quick else "full",
        "threads": n_threads,
        "thread_info": thread_info,
        "device": device,
        "repeats": repeats,
        "machine": machine_summary(),
        "workloads": [],
    }
    timeout = 150 if quick else 3600
    start = time.perf_counter()
    for name in workloads:
        if not quiet:
            print(f"[curvlib bench] {name} ({n_threads} thread(s))", file=sys.stderr, flush=True)
        with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as tmp:
            path = tmp.name
        cmd = [
            sys.executable,
            "-m",
            "curvlib.benchmark",
            "--child",
            name,
            "--child-out",
            path,
            "--threads",
            str(n_threads),
            "--repeats",
            str(repeats),
            "--device",
            device,
        ]
        cmd += ["--quick"] if quick else []
        cmd += ["--quiet"] if quiet else []
        error = ""
        try:
            proc = subprocess.run(cmd, timeout=timeout, stdout=subprocess.DEVNULL)
            if proc.returncode != 0:
                error = f"the workload's process exited with status {proc.returncode}"
        except subprocess.TimeoutExpired:
            error = f"stopped after {timeout} s (rows measured until then are shown)"
        with open(path) as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        os.unlink(path)
        meta = next((r for r in records if r["kind"] == "workload"), {})
        rows = [r for r in records if r["kind"] == "row"]
        meta_t = {**meta, "workload": name}
        targets = evaluate_targets(rows, meta_t) if meta else []
        result["workloads"].append(
            {"name": name, "meta": meta, "rows": rows, "targets": targets, "error": error}
        )
    result["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    out.with_suffix(".md").write_text(md + "\n")
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curvlib bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per row (default 5; up to 25 for fast rows; "
        "--quick: fewer for rows slower than 0.3 s)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no per-row progress on stderr")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``curvlib bench`` (shared with ``python -m curvlib.benchmark``)."""
    p.add_argument(
        "--quick",
        action="store_true",
        help="5 repeats, fewer for slow rows, skip the slowest rows (< 5 minutes)",
    )
    p.add_argument(
        "--workloads",
        nargs="+",
        choices=WORKLOADS,
        default=None,
        help=f"workloads to run (default: all of {', '.join(WORKLOADS)})",
    )
    p.add_argument(
        "--out",
        default="bench-results.json",
        help="JSON results; the markdown table goes next to it (.md)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: every CPU, or 1 on a busy machine)",
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        return _child(args)
    result = run(
        args.workloads, args.quick, args.out, args.threads, args.repeats, args.device, args.quiet
    )
    print(markdown(result))
    print(
        f"\nwrote {args.out} and {Path(args.out).with_suffix('.md')} in {result['seconds']:.0f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
