"""Tabulate the bad-input matrix of ``tests/test_bad_inputs.py``: kinds × jobs × outcomes.

Usage: ``python bench/bad_inputs.py [--list] [--reuse-all] [-k SUBSTRING]``. Prints the
number of kinds, jobs and (kind, job) pairs, the outcome counts overall and per group of
kinds, and with ``--list`` every pair whose outcome is not the expected one.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's curvlib and tests

import torch  # noqa: E402

torch.set_num_threads(1)

import test_bad_inputs as T  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="list the unexpected outcomes")
    p.add_argument("--reuse-all", action="store_true", help="reuse check on every pair")
    p.add_argument("--times", action="store_true", help="the slowest kinds")
    p.add_argument("-k", default="", help="only kinds whose name contains this")
    args = p.parse_args()
    if args.reuse_all:
        T.REUSE_EVERY = 1
    warnings.simplefilter("ignore")
    print(f"curvlib from {Path(T.curvlib.__file__).parent}")
    t0 = time.perf_counter()
    kinds = [k for k in T.KINDS if args.k in k.name]
    total: Counter = Counter()
    groups: dict[str, Counter] = {}
    unexpected = []
    times = {}
    for k in kinds:
        t1 = time.perf_counter()
        res = T.outcomes(k)
        times[k.name] = time.process_time(), time.perf_counter() - t1
        for job, o in res.items():
            total[o.status] += 1
            groups.setdefault(k.group, Counter())[o.status] += 1
            if o.status != ("ok" if k.valid else "refused"):
                unexpected.append((k.name, "-".join(job), o))
    bad = [k for k in kinds if not k.valid]
    print(
        f"{len(kinds)} kinds ({len(bad)} bad, {len(kinds) - len(bad)} valid) over "
        f"{len(T.JOBS)} jobs (backend x curvature x entry point): {sum(total.values())} pairs "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    print()
    cols = [s for s in T.STATUSES if any(g[s] for g in groups.values())]
    print("| group | " + " | ".join(cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for g, cnt in groups.items():
        print(f"| {g} | " + " | ".join(str(cnt[s]) for s in cols) + " |")
    print("| **all** | " + " | ".join(f"**{total[s]}**" for s in cols) + " |")
    if args.times:
        print()
        for name, (_, wall) in sorted(times.items(), key=lambda t: -t[1][1])[:15]:
            print(f"{wall:6.1f} s  {name}")
    if args.list:
        print()
        for name, job, o in unexpected:
            print(f"{name} / {job}: {o.status}: {o.detail[:240]}")


if __name__ == "__main__":
    main()
