"""Memory of ``curvlib.data.fit`` over a 60k-sample loader: independent of the batch count.

Each configuration runs in a fresh subprocess. The loader is wrapped so that the resident
set size (RSS, from ``/proc/self/statm``) is sampled as batches are drawn; the table shows
the RSS before ``fit`` (model + the 60k x 784 float32 data set already in memory), after the
first batches (warm: the accumulator's sums and the per-batch work space exist), at the end,
and the growth between the 10th batch and the end — which stays ~0 however many batches
there are, because only sums are held.

Run::

    python bench/fit_memory.py                      # the table of docs/distributed.md
    python bench/fit_memory.py --structure kron --batch-size 100 --child   # one run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

N_SAMPLES = 60_000
D_IN, HIDDEN, C = 784, 32, 10


def rss_mib() -> float:
    """Current resident set size in MiB (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(structure: str, batch_size: int, progress: bool) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import curvlib
    from curvlib.data import fit

    torch.manual_seed(0)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, C))
    X = torch.randn(N_SAMPLES, D_IN)
    Y = torch.randint(0, C, (N_SAMPLES,))
    loader = DataLoader(TensorDataset(X, Y), batch_size=batch_size)
    curv = curvlib.AutogradGGN(model, "classification")
    samples: list[tuple[int, float]] = []

    class Measured:
        def __len__(self) -> int:
            return len(loader)

        def __iter__(self):
            for i, batch in enumerate(loader):
                samples.append((i, rss_mib()))
                yield batch
            samples.append((len(loader), rss_mib()))

    before = rss_mib()
    t0 = time.perf_counter()
    loss, N, H = fit(curv, Measured(), structure, num_data=N_SAMPLES, progress=progress)
    seconds = time.perf_counter() - t0
    warm = dict(samples).get(10, samples[-1][1])
    return {
        "structure": structure,
        "batch_size": batch_size,
        "batches": len(loader),
        "N": N,
        "rss_before_mib": round(before, 1),
        "rss_batch10_mib": round(warm, 1),
        "rss_end_mib": round(samples[-1][1], 1),
        "growth_after_batch10_mib": round(samples[-1][1] - warm, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--structure", default=None, choices=["diag", "kron", "full"])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--child", action="store_true", help="run one configuration in-process")
    p.add_argument("--progress", action="store_true", help="show the progress bar")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.structure, args.batch_size, args.progress)))
        return
    configs = [
        (s, b)
        for s in ([args.structure] if args.structure else ["kron", "diag"])
        for b in ([args.batch_size] if args.batch_size else [1000, 100, 20])
    ]
    cols = [
        "structure",
        "batch_size",
        "batches",
        "rss_before_mib",
        "rss_batch10_mib",
        "rss_end_mib",
        "growth_after_batch10_mib",
        "seconds",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for s, b in configs:
        cmd = [sys.executable, __file__, "--child", "--structure", s, "--batch-size", str(b)]
        if args.progress:
            cmd.append("--progress")
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print("| " + " | ".join(str(row[c]) for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
