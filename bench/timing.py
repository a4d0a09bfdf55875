r"""Timing and peak memory of one row: interleaved repeats against one gradient.

A row's figure is **× grad**: the median over the repeats of ``t_row / t_grad``, where
``t_grad`` is one plain forward + backward pass of the summed loss on the same batch
(``model.zero_grad(); lossfunc(model(x), y).backward()``), timed right before each repeat of
the row. A machine that gets busier or quieter during the run moves both.

* **Clock.** With one thread on the CPU every torch operation runs in the calling thread, so
  its CPU time (``time.thread_time``) is the work of the call, free of the time the OS gives
  other processes. With several threads, or on a GPU (after ``torch.cuda.synchronize()``),
  wall-clock time is used.
* **Peak memory.** The growth of the process's peak resident set during one call (CPU: free
  heap is returned to the OS with ``malloc_trim(0)``, the kernel's peak counter ``VmHWM`` is
  reset through ``/proc/self/clear_refs``, then ``VmHWM`` after the call minus ``VmRSS``
  before it; CUDA: ``torch.cuda.max_memory_allocated`` above the memory allocated before).
  It is measured on the second call of a row (the first may allocate once-only state), on
  the first where that took more than :data:`SLOW_SECONDS`.
* **Allocator.** glibc's malloc serves blocks above its *mmap threshold* (128 KiB at start)
  with fresh pages from the kernel, and raises that threshold each time it frees a larger
  mapped block. So the same call is slower in a fresh process (every large temporary is
  page-faulted in, every call) than after some library has freed a large block. By default
  each workload's process gets the threshold a long-running process reaches
  (:func:`allocator_env`: ``MALLOC_MMAP_THRESHOLD_`` = 32 MiB, ``MALLOC_TRIM_THRESHOLD_`` =
  64 MiB), so that a row's time does not depend on which rows ran before it.
"""

from __future__ import annotations

import ctypes
import gc
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "SLOW_SECONDS",
    "Clock",
    "PeakMemory",
    "RowTimeout",
    "allocator_env",
    "measure",
]

SLOW_SECONDS = 0.5  # rows slower than this get their memory from the first call
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit of the dynamic threshold (64-bit)


def allocator_env(policy: str) -> dict[str, str]:
    """Environment for a workload's process: ``"pinned"`` (see the module docstring) or
    ``"default"`` (glibc's dynamic thresholds, as in a fresh process)."""
    if policy == "default":
        return {}
    if policy != "pinned":
        raise ValueError(f"unknown allocator policy {policy!r}; known: pinned, default")
    return {
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
        "MALLOC_TRIM_THRESHOLD_": str(2 * MMAP_THRESHOLD),
    }


class RowTimeout(Exception):
    """The first call of a row ran past its time limit."""


class Clock:
    """Times calls: the thread's CPU time with one thread on the CPU, else wall time."""

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
        """Raise :class:`RowTimeout` in the block after ``seconds`` of this clock.

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
            raise RowTimeout

        old = signal.signal(signum, handler)
        signal.setitimer(which, seconds)
        try:
            yield
        finally:
            signal.setitimer(which, 0)
            signal.signal(signum, old)


class PeakMemory:
    """Peak memory growth of one call (see the module docstring), in MiB, or ``None``."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._libc: Any = None
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
        """``(fn(), peak MiB)``."""
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


def measure(
    call: Callable[[], Any],
    grad: Callable[[], None],
    clock: Clock,
    memory: PeakMemory,
    repeats: int,
    quick: bool,
    limit: float | None,
    cap: int = 25,
) -> tuple[Any, dict[str, Any]]:
    """Time ``call`` against ``grad``: ``(result of the first call, statistics)``.

    One warm-up call (stopped by :class:`RowTimeout` after ``limit`` seconds; it gives the
    result), one call for the peak memory (rows faster than :data:`SLOW_SECONDS`; slower
    rows get the memory of the warm-up call), then ``repeats`` interleaved pairs
    ``(t_grad, t_call)``. Without ``quick``, rows faster than 0.1 s get more repeats (up to
    ``cap``) so that their medians are steady; with ``quick``, rows slower than 0.3 s get one.

    Returns
    -------
    (result, stats)
        ``stats``: ``ratio`` (median of ``t_call / t_grad``), ``ms``, ``grad_ms`` (medians),
        ``first_ms``, ``peak_mib``, ``memory_call`` (``"first"`` or ``"second"``),
        ``repeats``.
    """
    with clock.limit(limit):
        (result, first), peak = memory.measure(lambda: clock.call(call))
    which = "first"
    if first <= SLOW_SECONDS:
        _, peak = memory.measure(call)
        which = "second"
    grad()  # pages given back by malloc_trim are faulted in again outside the timing
    if which == "second":
        call()
    reps = repeats
    if not quick:
        reps = max(repeats, min(cap, int(0.5 / max(first, 1e-6))))
    elif first > 0.3:
        reps = 1
    ratios, times, grads = [], [], []
    for _ in range(reps):
        tg = clock.time(grad)
        t = clock.time(call)
        ratios.append(t / tg)
        times.append(t)
        grads.append(tg)
    return result, {
        "ratio": statistics.median(ratios),
        "ms": 1e3 * statistics.median(times),
        "grad_ms": 1e3 * statistics.median(grads),
        "first_ms": 1e3 * first,
        "peak_mib": peak,
        "memory_call": which,
        "repeats": reps,
    }
