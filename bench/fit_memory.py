"""Memory of ``curvlib.data.fit`` over long loaders, per backend: growth after a warm-up.

Each configuration (backend x structure x batch size) runs in a fresh subprocess: an MLP
784-32-10 (float32, CPU, one thread) on a 60 000-sample data set, ``curvlib.fit`` with the
GGN of the backend. The loader is wrapped so that the resident memory is sampled as batches
are drawn (its anonymous part, ``RssAnon``: see :func:`rss_mib`). Reported: the RSS before
``fit`` (torch, the model and the 188 MB data set), after the warm-up batches (the
accumulator's sums and the per-batch work space exist), at the end, the **growth** between
the two (target: < 10 MiB however many batches there are, since only sums are held), and
the growth of the number of live ``torch.Tensor`` / ``nn.Module`` objects over the same
stretch (``gc.get_objects()``).

Run::

    python bench/fit_memory.py                                  # every backend, diag + kron
    python bench/fit_memory.py --backend backpack --structure kron
    python bench/fit_memory.py --batch-size 20 --batches 3000   # the batch-count sweep
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
import warnings

N_SAMPLES = 60_000
D_IN, HIDDEN, C = 784, 32, 10
BACKENDS = ("autograd", "backpack", "asdl")
WARMUP = 50


def rss_mib() -> float:
    """Anonymous resident memory in MiB (``RssAnon`` of ``/proc/self/status``).

    Anonymous pages are what a leak grows; the total RSS also counts the pages of the
    mapped libraries (libtorch), which the kernel drops and reloads under memory pressure
    from other processes. Elsewhere than on Linux: the peak RSS.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def live_objects() -> int:
    """Live tensors and modules tracked by the garbage collector (after a collection)."""
    import torch

    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(isinstance(o, (torch.Tensor, torch.nn.Module)) for o in gc.get_objects())


def child(backend: str, structure: str, batch_size: int, batches: int, progress: bool) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import curvlib

    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, C))
    g = torch.Generator().manual_seed(1)
    n = min(N_SAMPLES, batch_size * batches)
    X = torch.randn(N_SAMPLES, D_IN, generator=g)[:n]
    Y = torch.randint(0, C, (N_SAMPLES,), generator=g)[:n]
    loader = DataLoader(TensorDataset(X, Y), batch_size=batch_size)
    curv = curvlib.backend_class(backend, "ggn")(model, "classification")
    rss: dict[int, float] = {}
    objects: dict[str, int] = {}
    warm = min(WARMUP, len(loader) - 1)

    class Measured:
        def __len__(self) -> int:
            return len(loader)

        def __iter__(self):
            for i, batch in enumerate(loader):
                if i == warm:
                    objects["warm"] = live_objects()
                rss[i] = rss_mib()
                yield batch
            objects["end"] = live_objects()
            rss[len(loader)] = rss_mib()

    before = rss_mib()
    t0 = time.perf_counter()
    _, N, _ = curvlib.fit(curv, Measured(), structure, num_data=n, progress=progress)
    seconds = time.perf_counter() - t0
    return {
        "backend": backend,
        "structure": structure,
        "batch_size": batch_size,
        "batches": len(loader),
        "N": N,
        "rss_before_mib": round(before, 1),
        "rss_warm_mib": round(rss[warm], 1),
        "rss_end_mib": round(rss[len(loader)], 1),
        "growth_mib": round(rss[len(loader)] - rss[warm], 1),
        "live_objects_growth": objects["end"] - objects["warm"],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default=None, choices=BACKENDS)
    p.add_argument("--structure", default=None, choices=["diag", "kron", "full"])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--batches", type=int, default=600, help="at most 60000 / batch size")
    p.add_argument("--child", action="store_true", help="run one configuration in-process")
    p.add_argument("--progress", action="store_true", help="show the progress bar")
    args = p.parse_args()
    if args.child:
        row = child(args.backend, args.structure, args.batch_size, args.batches, args.progress)
        print(json.dumps(row))
        return
    configs = [
        (b, s)
        for b in ([args.backend] if args.backend else BACKENDS)
        for s in ([args.structure] if args.structure else ["diag", "kron"])
    ]
    cols = [
        "backend",
        "structure",
        "batch_size",
        "batches",
        "rss_before_mib",
        "rss_warm_mib",
        "rss_end_mib",
        "growth_mib",
        "live_objects_growth",
        "seconds",
    ]
    print(f"warm-up: {WARMUP} batches; growth = RSS at the end - RSS after the warm-up")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for b, s in configs:
        cmd = [sys.executable, __file__, "--child", "--backend", b, "--structure", s]
        cmd += ["--batch-size", str(args.batch_size), "--batches", str(args.batches)]
        if args.progress:
            cmd.append("--progress")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"| {b} | {s} | failed: {proc.stderr.strip().splitlines()[-1]} |", flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print("| " + " | ".join(str(row[c]) for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
