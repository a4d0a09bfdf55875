#!/usr/bin/env python3
"""Compare junit results of run.py per test id: base vs one or more swap modes.

Usage: compare.py OUT [--modes all,default] [--ref base]
Prints a per-file table (passed/failed/error/skipped/time per mode, time ratio), the
per-test transitions (pass->fail = regression) and the call counters, and writes
OUT/compare_<mode>.json.
"""

import argparse
import json
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path


def load(d: Path, f: str):
    x = d / f"{f}.xml"
    res = {}
    if not x.exists():
        return None
    root = ET.parse(x).getroot()
    for tc in root.iter("testcase"):
        tid = f"{tc.get('classname')}::{tc.get('name')}"
        kids = {c.tag: c for c in tc}
        if "failure" in kids:
            st, msg = "failed", kids["failure"].get("message", "")
        elif "error" in kids:
            st, msg = "error", kids["error"].get("message", "")
        elif "skipped" in kids:
            typ = kids["skipped"].get("type", "")
            st = "xfailed" if "xfail" in typ else "skipped"
            msg = kids["skipped"].get("message", "")
        else:
            st, msg = "passed", ""
        res[tid] = (st, msg[:300])
    return res


def meta(d: Path, f: str):
    p = d / f"{f}.meta.json"
    return json.loads(p.read_text()) if p.exists() else {}


def counts(d: Path, f: str):
    p = d / f"{f}.counts.json"
    return json.loads(p.read_text())["calls"] if p.exists() else {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--modes", default="all")
    ap.add_argument("--ref", default="base")
    a = ap.parse_args()
    out = Path(a.out)
    ref = out / a.ref
    files = sorted(p.stem for p in ref.glob("*.meta.json"))
    files = [f.removesuffix(".meta") for f in files]
    for mode in a.modes.split(","):
        md = out / mode
        rows, trans, detail = [], Counter(), defaultdict(list)
        tot = Counter()
        allcalls = Counter()
        for f in files:
            b, s = load(ref, f), load(md, f)
            mb, ms = meta(ref, f), meta(md, f)
            if s is None and not ms:
                continue
            cb = Counter(v[0] for v in (b or {}).values())
            cs = Counter(v[0] for v in (s or {}).values())
            c = counts(md, f)
            ad = sum(v for k, v in c.items() if k.startswith("adapter:"))
            la = sum(v for k, v in c.items() if k.startswith("laplace:"))
            allcalls.update(c)
            rows.append(
                (
                    f,
                    cb,
                    cs,
                    mb.get("wall_s"),
                    ms.get("wall_s"),
                    ad,
                    la,
                    mb.get("timed_out"),
                    ms.get("timed_out"),
                )
            )
            for k in ("passed", "failed", "error", "skipped", "xfailed"):
                tot[("b", k)] += cb[k]
                tot[("s", k)] += cs[k]
            tot["tb"] += mb.get("wall_s") or 0
            tot["ts"] += ms.get("wall_s") or 0
            for tid in sorted(set(b or {}) | set(s or {})):
                sb = (b or {}).get(tid, ("absent", ""))[0]
                ss = (s or {}).get(tid, ("absent", ""))
                if sb != ss[0]:
                    trans[(sb, ss[0])] += 1
                    detail[f"{sb}->{ss[0]}"].append((f, tid, ss[1]))
        print(f"\n=== {a.ref} vs {mode} ===")
        hdr = "file | base p/f/e/s | swap p/f/e/s | base s | swap s | ratio | adapter calls | laplace-own calls"
        print(hdr)
        for f, cb, cs, tb, ts, ad, la, tob, tos in rows:
            fmt = lambda c: (
                f"{c['passed']}/{c['failed']}/{c['error']}/{c['skipped'] + c['xfailed']}"
            )
            r = f"{ts / tb:.2f}" if tb and ts else "-"
            print(
                f"{f} | {fmt(cb)}{' TIMEOUT' if tob else ''} | {fmt(cs)}{' TIMEOUT' if tos else ''}"
                f" | {tb} | {ts} | {r} | {ad} | {la}"
            )
        print(
            f"TOTAL | {tot[('b', 'passed')]}/{tot[('b', 'failed')]}/{tot[('b', 'error')]}/"
            f"{tot[('b', 'skipped')] + tot[('b', 'xfailed')]} | {tot[('s', 'passed')]}/"
            f"{tot[('s', 'failed')]}/{tot[('s', 'error')]}/{tot[('s', 'skipped')] + tot[('s', 'xfailed')]}"
            f" | {tot['tb']:.0f} | {tot['ts']:.0f} | {tot['ts'] / max(tot['tb'], 1e-9):.2f}"
        )
        print("transitions:", dict(trans))
        for k, v in detail.items():
            print(f"-- {k} ({len(v)})")
            for f, tid, msg in v:
                print(f"   {tid}  :: {msg[:200]!r}")
        print("call counters (summed over files):")
        for k, v in sorted(allcalls.items()):
            print(f"   {k}: {v}")
        (out / f"compare_{mode}.json").write_text(
            json.dumps(
                {
                    "transitions": {f"{k[0]}->{k[1]}": v for k, v in trans.items()},
                    "detail": detail,
                    "calls": allcalls,
                },
                indent=1,
                default=list,
            )
        )


if __name__ == "__main__":
    main()
