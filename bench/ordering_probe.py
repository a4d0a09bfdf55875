r"""What other libraries leave behind that changes curvlib's timings (the ordering effect).

On the MLP 784-128-128-10, batch 128, one thread: times a few curvlib calls (autograd EF
K-FAC, BackPACK EF diagonal and GGN K-FAC, ASDL EF K-FAC) as multiples of a gradient, with
the minor page faults per call, then

1. imports laplace-torch (``laplace.curvature``) and times them again;
2. runs laplace-torch's ``BackPackGGN``, ``AsdlGGN`` and ``CurvlinopsGGN`` (``diag`` and
   ``kron``, a few calls each), one library at a time, timing curvlib's calls after each;
3. compares a snapshot of the process state before and after (grad mode, anomaly mode,
   thread counts, torch.backends flags, global module hooks, torch-function / dispatch
   modes, saved-tensor hooks, BackPACK's ``CTX``, profiler / trace functions, patched torch
   functions, Python objects, the malloc heap);
4. grows BackPACK's global ``CTX.hook_handles`` as other code does (``extend`` on other
   models) and times curvlib's calls at each size;
5. undoes each difference it finds, one at a time, and times curvlib's calls again.

Run ``python bench/ordering_probe.py [--allocator default|pinned] [--repeats N]``; the
default allocator is glibc's own, as in any Python process (see :mod:`bench.timing`).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _malloc() -> dict[str, int]:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    return {"heap_MiB": round(m.arena / 2**20, 1), "mmapped_blocks": m.hblks}


def snapshot() -> dict[str, Any]:
    """The process state that a library could leave changed."""
    import torch
    import torch.nn.modules.module as M
    from torch.nn import functional as F

    state: dict[str, Any] = {
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "anomaly_check_nan": torch.is_anomaly_check_nan_enabled(),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "os_threads": len(os.listdir("/proc/self/task")),
        "default_dtype": str(torch.get_default_dtype()),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "mkldnn": torch.backends.mkldnn.enabled,
        "opt_einsum": torch.backends.opt_einsum.enabled,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "function_modes": torch._C._len_torch_function_stack(),
        "dispatch_modes": torch._C._len_torch_dispatch_stack(),
        "saved_tensor_hooks": torch._C._autograd._top_saved_tensors_default_hooks(False)
        is not None,
        "profiler": torch.autograd.profiler._is_profiler_enabled,
        "sys_trace": sys.gettrace() is not None,
        "sys_profile": sys.getprofile() is not None,
        "gc_enabled": gc.isenabled(),
        "gc_threshold": gc.get_threshold(),
        "python_objects": len(gc.get_objects()),
        "gc_frozen": gc.get_freeze_count(),
        "warning_filters": len(warnings.filters),
    }
    for name in dir(M):
        if name.startswith("_global_") and isinstance(getattr(M, name), dict):
            state[f"nn.{name}"] = len(getattr(M, name))
    fns = {
        "Module.__call__": torch.nn.Module.__call__,
        "Module._call_impl": torch.nn.Module._call_impl,
        "Tensor.backward": torch.Tensor.backward,
        "autograd.backward": torch.autograd.backward,
        "autograd.grad": torch.autograd.grad,
        "F.linear": F.linear,
        "F.cross_entropy": F.cross_entropy,
        "F.conv2d": F.conv2d,
        "torch.matmul": torch.matmul,
        "torch.einsum": torch.einsum,
    }
    state["patched_ids"] = {k: id(v) for k, v in fns.items()}
    if "backpack" in sys.modules:
        from backpack.context import CTX

        state["backpack.CTX.active_exts"] = len(CTX.active_exts or ())
        state["backpack.CTX.hook_handles"] = len(CTX.hook_handles)
        state["backpack.CTX.debug"] = CTX.debug
        state["backpack.CTX.retain_graph"] = CTX.retain_graph
        state["backpack.CTX.extension_hook"] = getattr(CTX.extension_hook, "__name__", "")
    state.update(_malloc())
    state["rss_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return state


def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--allocator", choices=("default", "pinned"), default="default")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", default=None, help="also write the measurements here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.child:  # the allocator's policy must be set before the process starts
        import subprocess

        from bench.timing import allocator_env

        env = {**os.environ, **allocator_env(args.allocator), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:]), "--child"]
        return subprocess.run(cmd, env=env).returncode
    return _probe(args)


def _probe(args: argparse.Namespace) -> int:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import curvlib
    from bench.cases import loss_sum
    from bench.workloads import mlp

    w = mlp()
    base, lossf = copy.deepcopy(w.model), loss_sum(w.likelihood)

    def grad() -> None:
        base.zero_grad(set_to_none=True)
        lossf(base(w.x), w.y).backward()

    calls = {}
    for backend, curv, structure in (
        ("autograd", "ef", "kron"),
        ("backpack", "ef", "diag"),
        ("backpack", "ggn", "kron"),
        ("asdl", "ef", "kron"),
    ):
        obj = curvlib.backend_class(backend, curv)(copy.deepcopy(w.model), w.likelihood)
        kw = {"N": len(w.y)} if structure == "kron" else {}
        calls[f"curvlib:{backend} {curv} {structure}"] = (
            lambda obj=obj, structure=structure, kw=kw: getattr(obj, structure)(w.x, w.y, **kw)
        )
    log: list[dict[str, Any]] = []

    def measure(label: str) -> None:
        now = time.thread_time
        out = {"after": label}
        for name, call in calls.items():
            for _ in range(3):
                grad()
                call()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            ratios, times = [], []
            for _ in range(args.repeats):
                t0 = now()
                grad()
                t1 = now()
                call()
                t2 = now()
                ratios.append((t2 - t1) / (t1 - t0))
                times.append(t2 - t1)
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / args.repeats
            out[name] = {
                "ratio": round(statistics.median(ratios), 2),
                "ms": round(1e3 * statistics.median(times), 2),
                "faults_per_call": round(faults),
            }
        log.append(out)
        cells = "  ".join(
            f"{k.split(':')[1]}: {v['ratio']:5.2f}x {v['faults_per_call']:5d}pf"
            for k, v in out.items()
            if k != "after"
        )
        print(f"{label:42s} {cells}", flush=True)

    print(f"allocator {args.allocator}; × grad and minor page faults per call", flush=True)
    measure("fresh process")
    s0 = snapshot()
    import laplace.curvature as lc

    measure("after importing laplace.curvature")
    s1 = snapshot()
    states = {"import laplace": diff(s0, s1)}
    prev = s1
    for name in ("BackPackGGN", "AsdlGGN", "CurvlinopsGGN"):
        m = copy.deepcopy(w.model)
        m.output_size = 10
        obj = getattr(lc, name)(m, w.likelihood)
        for _ in range(3):
            obj.kron(w.x, w.y, N=len(w.y))
            if name != "CurvlinopsGGN":  # its diag is laplace's torch.func base
                obj.diag(w.x, w.y)
        del obj, m
        measure(f"after laplace {name}")
        s = snapshot()
        states[name] = diff(prev, s)
        prev = s
    _handles(w, calls, measure)
    print("\nstate changes (before, after):")
    for step, d in states.items():
        d = {k: v for k, v in d.items() if k not in ("rss_MiB", "python_objects")}
        print(f"  {step}: {json.dumps(d, default=str) if d else 'none'}")
    _undo(s0, prev, measure)
    if args.json:
        Path(args.json).write_text(json.dumps({"measurements": log, "states": states}, indent=1))
    return 0


def _handles(w: Any, calls: dict[str, Any], measure: Any) -> None:
    """BackPACK's global ``CTX.hook_handles``: every ``extend(module)`` appends two handles
    per module and nothing but ``CTX.remove_hooks()`` takes them out (laplace-torch's
    ``BackPackGGN`` extends its model once per object). curvlib's BackPACK backend compares
    the list before and after each call by identity, element by element: quadratic in its
    length."""
    from backpack import extend
    from backpack.context import CTX

    print("\nBackPACK's CTX.hook_handles grown by extend() on other models:")
    for n in (10, 30, 100):
        for _ in range(n):
            extend(copy.deepcopy(w.model))
        measure(f"{len(CTX.hook_handles)} handles in CTX.hook_handles")
    old = list(CTX.hook_handles)
    t0 = time.perf_counter()
    [h for h in CTX.hook_handles if all(h is not o for o in old)]
    t1 = time.perf_counter()
    ids = {id(h) for h in old}
    [h for h in CTX.hook_handles if id(h) not in ids]
    t2 = time.perf_counter()
    print(
        f"  the identity scan over {len(old)} handles: {1e3 * (t1 - t0):.1f} ms; "
        f"with a set of ids: {1e3 * (t2 - t1):.3f} ms"
    )


def _undo(before: dict[str, Any], after: dict[str, Any], measure: Any) -> None:
    """Reset each difference that can be reset from outside, then time again."""
    import torch

    print("\nundoing, one at a time:")
    if "backpack" in sys.modules:
        from backpack.context import CTX

        if CTX.hook_handles:
            CTX.remove_hooks()
            measure("after CTX.remove_hooks()")
        if after.get("backpack.CTX.active_exts"):
            CTX.set_active_exts([])
            measure("after CTX.set_active_exts([])")
        if after.get("backpack.CTX.retain_graph") != before.get("backpack.CTX.retain_graph"):
            CTX.set_retain_graph(False)
            measure("after CTX.set_retain_graph(False)")
    if after["grad_enabled"] != before["grad_enabled"]:
        torch.set_grad_enabled(before["grad_enabled"])
        measure("after restoring grad mode")
    if after["anomaly"] != before["anomaly"]:
        torch.autograd.set_detect_anomaly(before["anomaly"])
        measure("after restoring anomaly mode")
    if after["num_threads"] != before["num_threads"]:
        torch.set_num_threads(before["num_threads"])
        measure("after restoring the thread count")
    gc.collect()
    measure("after gc.collect()")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    measure("after malloc_trim(0)")


if __name__ == "__main__":
    sys.exit(main())
