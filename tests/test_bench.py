"""``curvlib bench`` (:mod:`curvlib._bench`) at a tiny size, and the pieces of ``bench/``
that compute numbers (agreement of Kronecker results, slopes, the results file).

No timing is asserted: only that every row is there, agrees with the autograd backend and
is written where it should be.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from curvlib import Kron, _bench
from curvlib.backends import registry
from curvlib.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_small_harness_every_row_agrees_with_autograd(tmp_path):
    out = tmp_path / "rows.json"
    seen = []
    rows = _bench.run(["mlp", "cnn"], repeats=1, tiny=True, out=out, progress=seen.append)
    assert seen == rows
    assert json.loads(out.read_text()) == rows  # streamed, complete at the end
    keys = {(r["workload"], r["backend"], r["curvature"], r["structure"]) for r in rows}
    assert len(keys) == len(rows) == 2 * len(registry()) * len(_bench.ROWS)
    for r in rows:
        if r["backend"] == "autograd":
            assert r["status"] == "ok", r
            assert r["rel_err"] == 0.0
        if (r["backend"], r["curvature"]) in _bench.SKIP:
            assert r["status"].startswith("skipped: ")
            continue
        assert r["status"] == "ok" or r["status"].startswith("refused: "), r
        if r["status"] == "ok":
            assert r["ratio"] > 0 and r["ms"] > 0
            assert r["rel_err"] < 1e-5, r  # float32 against the autograd result


def test_small_harness_rel_err_of_kron_is_the_dense_relative_error():
    g = torch.Generator().manual_seed(0)

    def spd(n: int) -> torch.Tensor:
        a = torch.randn(n, n, generator=g, dtype=torch.float64)
        return a @ a.T

    a = Kron([[spd(3), spd(2)], [spd(3)]])
    b = Kron([[spd(3), spd(2)], [torch.rand(3, generator=g, dtype=torch.float64)]])
    A, B = a.to_matrix(), b.to_matrix()
    expected = float(torch.linalg.norm(A - B) / torch.linalg.norm(B))
    assert _bench.rel_err(a, b) == pytest.approx(expected, rel=1e-9)


def test_small_harness_leaves_threads_and_rng_alone():
    threads, state = torch.get_num_threads(), torch.random.get_rng_state()
    _bench.run(["mlp"], repeats=1, tiny=True, backends=["autograd"], threads=2)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), state)


def test_cli_bench(tmp_path, capsys):
    argv = ["bench", "--workloads", "mlp", "--repeats", "1", "--backends", "autograd"]
    assert main([*argv, "--quiet", "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| autograd | ggn | kron |" in out and "× grad" in out
    rows = json.loads((tmp_path / "r.json").read_text())
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == len(_bench.ROWS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--out", "results.md"], "must name a .json file"),
        (["bench", "--backends", "jax"], "unknown backend 'jax'"),
        (["bench", "--repeats", "0"], "repeats and threads must be at least 1"),
    ],
)
def test_cli_bench_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


# -- bench/ (the full harness in the repository) --------------------------------------------------
@pytest.fixture
def bench_pkg(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import bench.agreement
    import bench.overhead
    import bench.report
    import bench.run
    import bench.store
    import bench.targets

    return bench


@pytest.mark.parametrize("diagonal_factor", [False, True])
def test_agreement_of_kron_results_is_the_dense_relative_error(bench_pkg, diagonal_factor):
    g = torch.Generator().manual_seed(1)

    def factor(n: int, diag: bool = False) -> torch.Tensor:
        if diag:
            return torch.rand(n, generator=g, dtype=torch.float64)
        a = torch.randn(n, n, generator=g, dtype=torch.float64)
        return a @ a.T

    a = [[factor(4), factor(3)], [factor(4)]]
    b = [[factor(4), factor(3, diagonal_factor)], [factor(4, diagonal_factor)]]
    dense = [Kron(a).to_matrix(), Kron(b).to_matrix()]
    expected = float(torch.linalg.norm(dense[0] - dense[1]) / torch.linalg.norm(dense[1]))
    err, scale = bench_pkg.agreement.agreement(a, b)
    assert scale == 1.0 and err == pytest.approx(expected, rel=1e-9)
    # a constant factor (another convention) is found and reported
    err, scale = bench_pkg.agreement.agreement([[2 * a[0][0], a[0][1]], [2 * a[1][0]]], a)
    assert scale == pytest.approx(0.5) and err < 1e-12


def test_loglog_slope_and_cost_model(bench_pkg):
    xs = [16.0, 32.0, 64.0, 128.0]
    assert bench_pkg.report.loglog_slope(xs, [3 * x**1.5 for x in xs]) == pytest.approx(1.5)
    # one Linear layer 2 -> 3, one sample, one column, counted by hand: a gradient is the
    # forward (6) and the weight gradient (6); K-FAC the forward (6), A (2·2) and G (3·3)
    assert bench_pkg.targets.kfac_cost_model([(2, 3)], 1, 1) == (12.0, 19.0)


def test_results_file_is_valid_after_every_append_and_resume_keys(bench_pkg, tmp_path):
    path = tmp_path / "r.json"
    store = bench_pkg.store.Results.new(path, {"mode": "quick"})
    row = {"kind": "row", "workload": "mlp", "library": "curvlib:autograd", "order": "fresh"}
    row.update(curvature="ggn", structure="diag", status="ok", ratio=2.0)
    store.append(row)
    assert json.loads(path.read_text())["rows"] == [row]
    assert not list(tmp_path.glob("*.tmp*"))  # written to a temporary file, renamed
    again = bench_pkg.store.Results.load(path)
    assert again.has(row) and not again.has({**row, "order": "after"})
    again.append({**row, "ratio": 3.0})  # same key: replaced, not duplicated
    assert [r["ratio"] for r in json.loads(path.read_text())["rows"]] == [3.0]
    path.write_text('{"rows": [')  # a file that is not a results file
    with pytest.raises(ValueError, match="not valid JSON"):
        bench_pkg.store.Results.load(path)


def test_run_refuses_a_markdown_out(bench_pkg, capsys, tmp_path):
    out = tmp_path / "results.md"
    assert bench_pkg.run.main(["--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--out must name a .json file" in err and err.count("\n") == 1
    assert not out.exists()
    assert bench_pkg.run.main(["--resume", "--out", str(tmp_path / "none.json")]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_the_package_harness_imports_only_torch_and_curvlib():
    """``curvlib bench`` works from an installed package: no laplace-torch, no curvlinops,
    no ``bench/``."""
    import ast

    tree = ast.parse((Path(_bench.__file__)).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    top = {n.split(".")[0] for n in names}
    assert top <= {
        "__future__",
        "argparse",
        "copy",
        "json",
        "math",
        "os",
        "statistics",
        "sys",
        "time",
        "collections",
        "pathlib",
        "typing",
        "torch",
        "curvlib",
    }, top


def test_overhead_shares_and_the_harness_leaves_the_template_alone(bench_pkg):
    """The shares of a synthetic row are the hand-computed ones; a real measurement leaves
    every template method as it was and its shares lie in [0, 1]."""
    from torch import nn

    from curvlib import AutogradEF
    from curvlib._call import Call
    from curvlib._checks import CapabilityChecks
    from curvlib.interface import CurvatureInterface

    ov = bench_pkg.overhead
    row = {"workload": "w", "backend": "b", "curvature": "ef", "structure": "diag",
           "before": 0.1, "run": 0.8, "hook": 0.6, "output": 0.05, "finish": 0.05,
           "call_ms": 4.0, "grad_ms": 2.0}  # fmt: skip
    line = ov.markdown([row]).splitlines()[-1]
    # checks 10 %, hygiene 80 - 60 = 20 %, output 5 %, finish 5 %; total 1 - 0.6 + 0.05
    assert line == "| w | b | ef diag | 4.00 | 2.00 | 10 % | 20 % | 5 % | 5 % | 45 % | 1.10 |"

    before = [
        CurvatureInterface.__dict__["_begin"],
        CurvatureInterface.__dict__["_run"],
        Call.__dict__["check_output"],
        CapabilityChecks.__dict__["_finish"],
    ]
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    curv = AutogradEF(model, "classification")
    hook_owner = next(k for k in type(curv).__mro__ if "_diag" in k.__dict__)
    hook = hook_owner.__dict__["_diag"]
    r = ov.measure_steps(curv, "diag", x, y, lambda: None, repeats=3)
    after = [
        CurvatureInterface.__dict__["_begin"],
        CurvatureInterface.__dict__["_run"],
        Call.__dict__["check_output"],
        CapabilityChecks.__dict__["_finish"],
    ]
    assert after == before and hook_owner.__dict__["_diag"] is hook
    for k in ("before", "run", "hook", "output", "finish"):
        assert 0.0 < r[k] <= 1.0, (k, r[k])
    assert r["hook"] < r["run"]  # the hook runs inside the hygiene context


def test_small_harness_resumes_an_interrupted_run(tmp_path, capsys):
    """A run cut after three rows, resumed, keeps those rows as they were and measures the
    others, with their agreement against the (recomputed) autograd reference."""
    out = tmp_path / "rows.json"
    full = _bench.run(["mlp"], repeats=1, tiny=True, out=out, backends=["autograd", "backpack"])
    kept = full[:3]
    out.write_text(json.dumps(kept))
    resumed = _bench.run(
        ["mlp"], repeats=1, tiny=True, out=out, backends=["autograd", "backpack"], resume=True
    )
    assert resumed[:3] == kept
    key = ("workload", "backend", "curvature", "structure")
    assert [tuple(r[k] for k in key) for r in resumed] == [tuple(r[k] for k in key) for r in full]
    assert json.loads(out.read_text()) == resumed
    for r in resumed[3:]:
        if r["status"] == "ok":
            assert r["rel_err"] < 1e-5, r  # compared with the reference of a kept row too
    with pytest.raises(ValueError, match="resume needs out"):
        _bench.run(["mlp"], tiny=True, resume=True)
    out.write_text("{not json")
    assert main(["bench", "--quick", "--out", str(out), "--resume", "--quiet"]) == 2
    assert "cannot resume" in capsys.readouterr().err
