"""The ``curvlib`` command: info, demo, and one-line errors."""

from __future__ import annotations

import json

import pytest

from curvlib.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "autograd" in out and "backpack" in out and "asdl" in out
    assert main(["info", "--json"]) == 0
    table = json.loads(capsys.readouterr().out.split("\n\n", 1)[1])
    assert table["autograd"]["ggn"]["structures"] == ["full", "diag", "kron"]


def test_demo_small(tmp_path, capsys):
    cfg = tmp_path / "demo.toml"
    cfg.write_text(
        'curvatures = ["ggn"]\nstructures = ["diag", "kron"]\n[laplace]\nstructure = "diag"\n'
    )
    rc = main(["demo", "--quiet", "--steps", "30", "--config", str(cfg), "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Laplace (diag" in out
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["backends"]
    assert {r["backend"] for r in rows} >= {"autograd", "backpack", "asdl"}
    for r in rows:  # every backend agrees with autograd
        assert r["rel_diff"] is not None and r["rel_diff"] < 1e-5, r
    assert 0.5 < results["laplace"]["MAP"]["accuracy"] <= 1
    assert (tmp_path / "curvature.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--backend", "jax"], "unknown backend 'jax'"),
        (["demo", "--curvature", "kfac"], "unknown curvature 'kfac'"),
        (["demo", "--structure", "blockdiag"], "unknown structure 'blockdiag'"),
        (["demo", "--config", "/nonexistent.toml"], "config file not found"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
