#!/usr/bin/env python3
"""Run laplace-torch's own tests one file per process, in several swap modes side by side.

Usage:
  run.py --tests DIR --python PY --out OUT [--modes base,all] [--files f1,f2] [--timeout 900]

DIR is a folder holding laplace's tests/ (and no laplace/ package, so the installed
laplace-torch is imported). For each file, one process per mode is started at the same
time (each with OMP/MKL threads = 1, so the modes share the machine fairly, and each in its
own copy OUT/<mode>/_work of tests/, because test_serialization writes state_dict.bin into
the cwd), and the next file starts when all are done. Mode "base" runs without the plugin; any other mode runs with
`-p curvlib_swap` and CURVLIB_SWAP=<mode>. Per file and mode, OUT/<mode>/ gets
<file>.xml (junit), <file>.log (stdout+stderr), <file>.counts.json (plugin counters) and
<file>.meta.json (wall time, return code, timeout flag).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALL_FILES = [
    "test_matrix",
    "test_curv_backends_backpack",
    "test_curv_backends_asdl",
    "test_curv_backends_curvlinops",
    "test_curv_backends_asdfghjkl",
    "test_jacobians",
    "test_baselaplace",
    "test_lllaplace",
    "test_subnetlaplace",
    "test_laplace",
    "test_utils",
    "test_feature_extractor",
    "test_metrics",
    "test_serialization",
    "test_functional_laplace_unit",
    "test_curv_backends_interface",
    "test_functional_laplace",
    "test_subset_params",
]


def start(mode, f, args, out):
    d = out / mode
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [
        args.python,
        "-m",
        "pytest",
        f"tests/{f}.py",
        "-q",
        "-rA",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore",
        "--no-header",
        f"--junitxml={d / (f + '.xml')}",
    ]
    if mode != "base":
        cmd[3:3] = ["-p", "curvlib_swap"]
        env["CURVLIB_SWAP"] = mode
        env["CURVLIB_SWAP_COUNTS"] = str(d / f"{f}.counts.json")
        env["PYTHONPATH"] = str(HERE) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = open(d / f"{f}.log", "w")
    p = subprocess.Popen(
        cmd, cwd=d / "_work", env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return p, log, time.time(), d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", required=True)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", default="base,all")
    ap.add_argument("--files", default=",".join(ALL_FILES))
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    modes = args.modes.split(",")
    for m in modes:  # one private copy of tests/ per mode: tests write files into the cwd
        work = out / m / "_work"
        if not work.exists():
            shutil.copytree(Path(args.tests) / "tests", work / "tests")
    for f in args.files.split(","):
        running = {m: start(m, f, args, out) for m in modes}
        pending = dict(running)
        while pending:
            time.sleep(0.5)
            for m in list(pending):
                p, log, t0, d = pending[m]
                rc = p.poll()
                timed_out = False
                if rc is None and time.time() - t0 > args.timeout:
                    os.killpg(p.pid, signal.SIGKILL)
                    rc = p.wait()
                    timed_out = True
                if rc is None:
                    continue
                wall = time.time() - t0
                log.close()
                (d / f"{f}.meta.json").write_text(
                    json.dumps(
                        {
                            "file": f,
                            "mode": m,
                            "rc": rc,
                            "timed_out": timed_out,
                            "wall_s": round(wall, 2),
                        }
                    )
                )
                del pending[m]
        print(
            f"{time.strftime('%H:%M:%S')} done {f}: "
            + ", ".join(
                f"{m} rc={json.loads((out / m / (f + '.meta.json')).read_text())['rc']}"
                for m in modes
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
