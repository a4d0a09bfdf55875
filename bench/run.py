r"""Run the curvature benchmark: curvlib's backends against laplace-torch, BackPACK, ASDL and
curvlinops, as ratios to one gradient.

::

    python bench/run.py --quick                       # < 3 min on a 2-core machine
    python bench/run.py                               # every workload, more repeats
    python bench/run.py --workloads mlp cnn2 --out results/bench.json --resume
    python bench/run.py --repeats 9 --device cuda

Each workload runs in its own process (a library's crash or global state stays there) with
one torch thread (``--threads``) and the allocator policy of :func:`bench.timing.allocator_env`
(``--allocator default`` for glibc's own). Every row is written to ``--out`` (JSON) as soon as
it is measured; ``--resume`` keeps the rows of an interrupted run and measures the rest. The
markdown report goes next to it (``.md``). See docs/performance.md for how to read it.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import markdown  # noqa: E402
from bench.store import Results  # noqa: E402
from bench.targets import evaluate  # noqa: E402
from bench.timing import allocator_env  # noqa: E402
from bench.workloads import QUICK_WORKLOADS, WORKLOADS  # noqa: E402

__all__ = ["main"]


class UsageError(Exception):
    """A bad option, reported as one line."""


def machine_summary() -> dict[str, Any]:
    """Platform, CPU (``lscpu``), memory and the versions of the libraries compared."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L3 cache")
        for line in out.splitlines():
            k, _, val = line.partition(":")
            if k.strip() in keep:
                info[k.strip()] = val.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/meminfo") as fh:
            info["MemTotal"] = fh.readline().split(":")[1].strip()
    except OSError:
        pass
    libs = ("torch", "backpack-for-pytorch", "asdfghjkl", "laplace-torch", "curvlinops-for-pytorch")
    for dist in libs:
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = "not installed"
    return info


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"workloads {', '.join(QUICK_WORKLOADS)}; 3 repeats; every row on mlp only",
    )
    p.add_argument(
        "--workloads",
        nargs="+",
        choices=WORKLOADS,
        default=None,
        help=f"workloads to run (default: all of {', '.join(WORKLOADS)}; --quick: fewer)",
    )
    p.add_argument("--out", default="bench-results.json", help="JSON results (a .json path)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (5; --quick 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--allocator", choices=("pinned", "default"), default="pinned")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    p.add_argument("--quiet", action="store_true", help="no per-row progress on stderr")
    p.add_argument(
        "--processes",
        choices=("one", "per-workload"),
        default=None,
        help="all workloads in one process (--quick's default: one start-up) or one "
        "process each (the default otherwise: a crash or global state stays in its workload)",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per process")
    p.add_argument(
        "--memory-limit",
        type=float,
        default=0.5,
        help="a workload process may allocate this fraction of the physical memory "
        "(default 0.5; 0: no limit)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def _check(args: argparse.Namespace) -> None:
    if Path(args.out).suffix != ".json":
        raise UsageError(
            f"--out must name a .json file (got {args.out!r}); the markdown report is "
            "written next to it with the suffix .md"
        )
    if args.repeats is not None and args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device is available")


def _repeats(args: argparse.Namespace) -> int:
    return args.repeats or (3 if args.quick else 5)


def _options(args: argparse.Namespace) -> Any:
    from bench.session import Options

    return Options(
        quick=args.quick,
        repeats=_repeats(args),
        device=args.device,
        threads=args.threads,
        allocator=args.allocator,
        resume=args.resume,
        quiet=args.quiet,
    )


def _limit_memory(fraction: float) -> None:
    """Cap the process's data segment (``RLIMIT_DATA``, which counts glibc's mmapped blocks)
    at ``fraction`` of the physical memory: a row that would allocate more fails with an
    error row instead of drawing the kernel's out-of-memory killer onto the machine."""
    import resource

    if fraction <= 0:
        return
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = int(fraction * total)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))


def _child(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from bench.session import preload, run_group

    _limit_memory(args.memory_limit)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    preload()
    store = Results.load(args.out)
    run_group(args.child.split(","), _options(args), store)
    return 0


def _start(args: argparse.Namespace, names: list[str]) -> Results:
    if args.resume:
        store = Results.load(args.out)
        old = store.data["meta"]
        if old.get("mode") != ("quick" if args.quick else "full") or old.get("device") != (
            args.device
        ):
            raise UsageError(
                f"--resume: {args.out} was a {old.get('mode')} run on {old.get('device')}; "
                "resume it with the same --quick and --device"
            )
        old["complete"] = False
        old.setdefault("resumed", []).append(time.strftime("%Y-%m-%d %H:%M"))
        store.write()
        return store
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "mode": "quick" if args.quick else "full",
        "workloads": names,
        "threads": args.threads,
        "device": args.device,
        "repeats": _repeats(args),
        "allocator": args.allocator,
        "allocator_env": allocator_env(args.allocator),
        "loadavg_1min": None if load is None else round(load, 2),
        "machine": machine_summary(),
        "complete": False,
    }
    return Results.new(args.out, meta)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check(args)
        if args.child:
            return _child(args)
        names = list(args.workloads or (QUICK_WORKLOADS if args.quick else WORKLOADS))
        store = _start(args, names)
        if args.resume and not args.workloads:
            names = list(store.data["meta"].get("workloads", names))
    except (UsageError, ValueError) as err:
        print(f"bench/run.py: error: {err}", file=sys.stderr)
        return 2
    timeout = args.timeout or (600.0 if args.quick else 3600.0)
    env = {
        **os.environ,
        **allocator_env(args.allocator),
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
    }
    start = time.perf_counter()
    errors = dict(store.data["meta"].get("errors", {}))
    one = (args.processes or ("one" if args.quick else "per-workload")) == "one"
    for group in [names] if one else [[n] for n in names]:
        label = ",".join(group)
        errors.pop(label, None)
        if not args.quiet:
            print(f"[bench] {label}", file=sys.stderr, flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), *_child_args(args, label)]
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout, stdout=sys.stderr)
            if proc.returncode != 0:
                errors[label] = f"the process exited with status {proc.returncode}"
        except subprocess.TimeoutExpired:
            errors[label] = f"stopped after {timeout:g} s (the rows measured until then are kept)"
        store = Results.load(args.out)
        for name in group:
            meta = store.workload_meta(name)
            if meta is not None and name != "scaling":
                rows = store.rows(name)
                store.data["targets"][name] = {
                    o: evaluate(rows, meta, o) for o in ("fresh", "after")
                }
        store.data["meta"]["errors"] = errors
        store.write()
    store.data["meta"]["seconds"] = round(
        store.data["meta"].get("seconds", 0) + time.perf_counter() - start, 1
    )
    store.data["meta"]["complete"] = not errors
    store.write()
    md = markdown(store.data)
    Path(args.out).with_suffix(".md").write_text(md + "\n")
    print(md)
    print(
        f"\nwrote {args.out} and {Path(args.out).with_suffix('.md')} in "
        f"{time.perf_counter() - start:.0f} s" + (f"; errors: {errors}" if errors else ""),
        file=sys.stderr,
    )
    return 1 if errors else 0


def _child_args(args: argparse.Namespace, name: str) -> list[str]:
    out = ["--child", name, "--out", args.out, "--device", args.device]
    out += ["--threads", str(args.threads), "--allocator", args.allocator]
    out += ["--repeats", str(_repeats(args)), "--memory-limit", str(args.memory_limit)]
    out += ["--quick"] * args.quick + ["--resume"] * args.resume + ["--quiet"] * args.quiet
    return out


if __name__ == "__main__":
    sys.exit(main())
