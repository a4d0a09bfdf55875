"""summary.py for runs with --modes base,all only (summary.py also needs none,default)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare import load, meta  # noqa: E402

out = Path(sys.argv[1])
files = sorted(p.name.removesuffix(".meta.json") for p in (out / "base").glob("*.meta.json"))
KEYS = ("passed", "failed", "error", "skipped", "xfailed")


def cnt(mode, f):
    c = dict.fromkeys(KEYS, 0)
    for st, _ in (load(out / mode, f) or {}).values():
        c[st] += 1
    return c


def cell(c):
    return f"{c['passed']}/{c['failed']}/{c['skipped'] + c['xfailed']}" + (
        f" +{c['error']}E" if c["error"] else ""
    )


print("| file | base p/f/s | swapped p/f/s | t base (s) | t swapped (s) |")
print("|---|---|---|---|---|")
tot = {m: dict.fromkeys(KEYS, 0) for m in ("base", "all")}
T = {"base": 0.0, "all": 0.0}
for f in files:
    row = [f]
    cs = {m: cnt(m, f) for m in ("base", "all")}
    for m in ("base", "all"):
        for k in KEYS:
            tot[m][k] += cs[m][k]
        T[m] += meta(out / m, f).get("wall_s") or 0
    row += [cell(cs["base"]), cell(cs["all"])]
    row += [f"{meta(out / m, f).get('wall_s') or 0:.0f}" for m in ("base", "all")]
    print("| " + " | ".join(row) + " |")
print(
    f"| **total** | {cell(tot['base'])} | {cell(tot['all'])} | {T['base']:.0f} | {T['all']:.0f} |"
)
