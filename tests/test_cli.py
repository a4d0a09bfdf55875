"""The ``curvlib`` command: info, demo, option checking, one-line errors, light start-up."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from curvlib import _demo
from curvlib.cli import _demo_options, _parser, main

ROOT = Path(__file__).resolve().parents[1]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


BACKEND_LIBS = {"backpack": "backpack", "asdl": "asdl"}  # backend -> the module it imports
INSTALLED = ["autograd", "auto", *(b for b, m in BACKEND_LIBS.items() if installed(m))]
needs_demo_extra = pytest.mark.skipif(
    not all(installed(m) for m in ("sklearn", "matplotlib", "laplace")),
    reason="the [demo] extra (scikit-learn, matplotlib, laplace-torch) is not installed",
)


def python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the repository root (this checkout's curvlib)."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "autograd" in out and "backpack" in out and "asdl" in out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)  # only JSON on stdout
    assert set(info) == {"versions", "backends"}
    assert info["backends"]["autograd"]["ggn"]["structures"] == [
        "full",
        "diag",
        "kron",
        "ekfac",
        "blocks",
        "lowrank",
    ]
    assert torch.__version__.startswith(info["versions"]["torch"])


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["demo", "--help"]])
def test_help_does_not_import_torch(argv):
    code = (
        "import sys\nfrom curvlib.cli import main\ntry:\n"
        f"    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    r = python(code)
    assert r.returncode == 0, r.stderr
    assert "usage: curvlib" in r.stdout and r.stdout.strip().endswith("NO-TORCH"), r.stdout


@needs_demo_extra
def test_demo_small(tmp_path, capsys):
    cfg = tmp_path / "demo.toml"
    cfg.write_text(
        'curvatures = ["ggn", "fisher"]\nstructures = ["diag", "kron"]\n'
        '[laplace]\nstructure = "diag"\n'
    )
    filters, threads = list(warnings.filters), torch.get_num_threads()
    rng = torch.random.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(
            ["demo", "--quiet", "--steps", "30", "--config", str(cfg), "--out", str(tmp_path)]
        )
    assert rc == 0
    assert caught == []  # --quiet: no library warnings ...
    assert warnings.filters == filters and torch.get_num_threads() == threads  # ... and no leak
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is untouched
    out = capsys.readouterr().out
    assert "Laplace: all weights, diag ggn" in out
    assert "prior precision tuned by marginal likelihood" in out
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["backends"]
    assert {r["backend"] for r in rows} == set(INSTALLED)
    for r in rows:  # every backend agrees with autograd, MC Fisher too (same generator seed)
        assert r["rel_diff"] is not None and r["rel_diff"] < 1e-5, r
    lap = results["laplace"]
    assert lap["prior_precision"] > 0
    assert list(lap["splits"]) == list(_demo.SPLITS)
    for split, res in lap["splits"].items():
        assert res["better"] == _demo.better(res["MAP"], res["Laplace"])
        assert sum(b["count"] for b in res["MAP"]["reliability"]) == res["n"] == 597
        assert f"  {split}: " in out  # one verdict line per split
    assert 0.5 < lap["splits"]["held-out"]["MAP"]["accuracy"] <= 1
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_metrics_against_hand_computation():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    y = torch.tensor([0, 1, 1, 1])
    m = _demo.metrics(probs, y)
    assert m["accuracy"] == pytest.approx(0.75)
    nll = -(torch.tensor([0.9, 0.4, 0.7, 0.8]).double().log().mean()).item()
    assert m["nll"] == pytest.approx(nll, rel=1e-12)
    # bins of width 1/15: 0.9 and 0.8 fall in different bins, 0.6 and 0.7 too
    ece = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.7) + abs(1 - 0.8)) / 4
    assert m["ece"] == pytest.approx(ece, rel=1e-6)
    assert [b["count"] for b in m["reliability"]] == [1, 1, 1, 1]


def test_better_per_metric():
    a = {"accuracy": 0.9, "nll": 0.30004, "ece": 0.1}
    b = {"accuracy": 0.8, "nll": 0.30001, "ece": 0.05}
    assert _demo.better(a, b) == {"accuracy": "MAP", "nll": "tie", "ece": "Laplace"}


def options(tmp_path, toml: str, *argv: str):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    return _demo_options(_parser().parse_args(["demo", "--config", str(cfg), *argv]))


def test_config_accepts_one_name_as_a_string(tmp_path):
    opts = options(tmp_path, 'backends = "autograd"\ncurvatures = "ef"\nseed = 3\n')
    assert opts["backends"] == ["autograd"] and opts["curvatures"] == ["ef"]
    assert opts["seed"] == 3 and opts["laplace_backend"] == "autograd"
    assert options(tmp_path, "seed = 3\n", "--seed", "5")["seed"] == 5  # command line wins


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--backend", "jax"], "unknown backend 'jax'"),
        (["demo", "--curvature", "kfac"], "unknown curvature 'kfac'"),
        (["demo", "--structure", "blockdiag"], "unknown structure 'blockdiag'"),
        (["demo", "--steps", "0"], "steps must be an integer >= 1, got 0"),
        (["demo", "--config", "/nonexistent.toml"], "config file not found"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "toml, messages",
    [
        ("out = [1, 2]\n", ["out must be a folder name (a string), got [1, 2]"]),
        ('seed = "abc"\n', ["seed must be an integer >= 0, got 'abc'"]),
        ("seed = true\n", ["seed must be an integer >= 0, got True"]),
        (  # every bad value is named, in one line
            'out = [1, 2]\nseed = "abc"\nbackends = ["autograd", "nope"]\ncolour = 1\n'
            '[laplace]\nsubset = "some"\n',
            [
                "out must be",
                "seed must be",
                "unknown backend 'nope'",
                "unknown key 'colour'",
                "laplace.subset must be one of all, last_layer, got 'some'",
            ],
        ),
        ("backends = []\n", ["backends must be a name or a non-empty list of names, got []"]),
        ("laplace = 3\n", ["laplace must be a table ([laplace]), got 3"]),
        ('[laplace]\nstructure = "full"\nbackend = "x"\n', ["laplace.backend must be one of"]),
        ("seed = = 1\n", ["is not valid TOML"]),
    ],
)
def test_config_errors_are_one_line(tmp_path, capsys, toml, messages):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    assert main(["demo", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curvlib: error: ") and err.count("\n") == 1, err
    for message in messages:
        assert message in err, err
    assert not (tmp_path / "o").exists()  # nothing done


@needs_demo_extra
def test_missing_optional_package_is_named(tmp_path):
    """matplotlib absent: the error names matplotlib (not laplace-torch), before any work."""
    out = tmp_path / "o"
    r = python(
        "import sys\nsys.modules['matplotlib'] = None\nfrom curvlib.cli import main\n"
        f"sys.exit(main(['demo', '--quiet', '--out', {str(out)!r}]))"
    )
    assert r.returncode == 2, r.stderr
    assert "needs matplotlib (not installed)" in r.stderr and "laplace" not in r.stderr
    assert "pip install matplotlib" in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()


def test_missing_backend_library(tmp_path):
    """BackPACK absent: info says so, asking for it fails in one line, the default skips it."""
    r = python(
        "import json, sys\nsys.modules['backpack'] = None\n"
        "from curvlib.cli import main, _demo_options, _installed_backends, _parser\n"
        "assert main(['info']) == 0\n"
        "opts = _demo_options(_parser().parse_args(['demo']))\n"
        "print('USABLE', json.dumps(_installed_backends(opts)))\n"
        "sys.exit(main(['demo', '--backend', 'backpack', '--out', 'x']))"
    )
    assert r.returncode == 2, r.stderr
    assert "backpack  ggn       unavailable: ModuleNotFoundError" in r.stdout
    usable, notes = json.loads(r.stdout.split("USABLE ", 1)[1])
    assert "backpack" not in usable and usable[:2] == ["autograd", "auto"]
    assert len(notes) == 1 and notes[0].startswith("skipped backend 'backpack' is not installed")
    assert "backend 'backpack' is not installed" in r.stderr
    assert "pip install 'curvlib[backpack]'" in r.stderr and r.stderr.count("\n") == 1
