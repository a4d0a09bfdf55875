"""The curvlib command: a demo, the capability table and the benchmark.

``curvlib demo``  trains a small MLP on scikit-learn's bundled digits (no download),
computes diag / kron / full GGN and EF with every installed backend and prints their
agreement with the autograd result and their time, fits a Laplace approximation through the
laplace-torch adapter with the prior precision tuned by marginal likelihood, compares MAP
and Laplace (accuracy, NLL, ECE) on held-out, rotated and noised digits, and saves a figure
and ``results.json`` (:mod:`curvlib._demo`).

``curvlib info [--json]``  prints versions and the capability table (``--json``: only JSON).

``curvlib bench [--quick] [--workloads mlp cnn] [--backends ...]``  times curvlib's backends
on a small MLP and CNN as ratios to one gradient (:mod:`curvlib._bench`); the full comparison
with laplace-torch's backends, curvlinops, BackPACK and ASDL is ``python bench/run.py`` in a
checkout.

Errors (a bad option or configuration value, a missing optional package) are one line on
stderr and exit status 2. This module imports only the standard library at import time, and
``curvlib`` itself is lazy, so ``curvlib --help`` answers without importing torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Any

__all__ = ["main"]

STRUCTURES = ("diag", "kron", "full")
SUBSETS = ("all", "last_layer")
# Optional packages the demo needs: import name -> pip package name.
DEMO_PACKAGES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "laplace": "laplace-torch"}


class CLIError(Exception):
    """An error reported as one line, without a traceback."""


def _missing_packages(packages: dict[str, str]) -> list[str]:
    """The pip names of ``packages`` (import name -> pip name) that cannot be imported.

    Looked up without importing them (``importlib.util.find_spec``).
    """
    missing = []
    for module, pip in packages.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or half-removed installation
            found = False
        if not found:
            missing.append(pip)
    return missing


def _load_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise CLIError(f"config file not found: {path}") from None
    except OSError as err:
        raise CLIError(f"config file {path} cannot be read: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise CLIError(f"config file {path} is not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise CLIError(
            f"config file {path} is not valid TOML: not UTF-8 text (byte {err.start})"
        ) from None


# -- info ---------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("curvlib", "torch", "backpack-for-pytorch", "asdfghjkl", "laplace-torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def cmd_info(args: argparse.Namespace) -> int:
    """``curvlib info``: versions, then what each backend computes.

    Parameters
    ----------
    args : argparse.Namespace
        ``json``: print one JSON object ``{"versions": ..., "backends": ...}`` (the second
        is :func:`curvlib.available`) and nothing else.

    Returns
    -------
    int
        0.
    """
    import curvlib

    versions, table = _versions(), curvlib.available()
    if args.json:
        print(json.dumps({"versions": versions, "backends": table}, indent=2))
        return 0
    for dist, ver in versions.items():
        print(f"{dist:22s} {ver}")
    print()
    print(
        f"{'backend':9s} {'curvature':9s} {'entry':9s} {'impl':7s} {'exact':5s} "
        f"{'memory':12s} {'dict':5s} modules / how"
    )
    for backend, curvs in table.items():
        for curv, caps in curvs.items():
            if "error" in caps:
                print(f"{backend:9s} {curv:9s} unavailable: {caps['error']}")
                continue
            for entry, row in caps["entry_points"].items():
                mods = (
                    row["modules"] if isinstance(row["modules"], str) else ",".join(row["modules"])
                )
                how = f"{mods}" + (f"; {row['note']}" if row["note"] else "")
                if row["kfac_approx"]:
                    how += f"; kfac_approx {'/'.join(row['kfac_approx'])}"
                print(
                    f"{backend:9s} {curv:9s} {entry:9s} {row['impl']:7s} {str(row['exact']):5s} "
                    f"{row['memory']:12s} {str(row['dict_inputs']):5s} {how}"
                )
    return 0


# -- demo options -------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _names(value: Any, key: str, known: tuple[str, ...], problems: list[str]) -> list[str]:
    """``value`` as a list of names from ``known`` (one name or a list); else a problem."""
    names = [value] if isinstance(value, str) else value
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        problems.append(f"{key} must be a name or a non-empty list of names, got {value!r}")
        return []
    bad = [n for n in names if n not in known]
    for n in bad:
        problems.append(f"unknown {key.rstrip('s')} {n!r} (known: {', '.join(known)})")
    return list(dict.fromkeys(names))


def _demo_options(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's options: command line over the TOML file over the defaults.

    Every value given, on the command line or in the file (even one the command line
    overrides), is checked before any work.

    Raises
    ------
    CLIError
        Naming every bad value and unknown key in one line.
    """
    from curvlib.backends import CURVATURES, registry

    backends = tuple(registry())
    cfg: dict[str, Any] = _load_toml(args.config) if args.config else {}
    lap = cfg.get("laplace", {})
    problems: list[str] = []
    if not isinstance(lap, dict):
        problems.append(f"laplace must be a table ([laplace]), got {lap!r}")
        lap = {}

    def integer(key: str, low: int, high: int | None = None) -> Any:
        def check(value: Any) -> Any:
            if not (_is_int(value) and value >= low):
                problems.append(f"{key} must be an integer >= {low}, got {value!r}")
            elif high is not None and value > high:
                problems.append(f"{key} must be an integer <= {high}, got {value!r}")
            return value

        return check

    def folder(value: Any) -> Any:
        if not (isinstance(value, str) and value):
            problems.append(f"out must be a folder name (a string), got {value!r}")
        return value

    def names(key: str, known: tuple[str, ...]) -> Any:
        return lambda value: _names(value, key, known, problems)

    def choice(key: str, known: tuple[str, ...]) -> Any:
        def check(value: Any) -> Any:
            if not (isinstance(value, str) and value in known):
                problems.append(f"{key} must be one of {', '.join(known)}, got {value!r}")
            return value

        return check

    # key -> (command-line value, default, check); the [laplace] keys are read from the file
    top = {
        "seed": (args.seed, 0, integer("seed", 0, 2**64 - 1)),  # torch's generator seeds
        "out": (args.out, "curvlib-demo", folder),
        "steps": (args.steps, 300, integer("steps", 1)),
        "backends": (args.backend, list(backends), names("backends", backends)),
        "curvatures": (args.curvature, ["ggn", "ef"], names("curvatures", CURVATURES)),
        "structures": (args.structure, list(STRUCTURES), names("structures", STRUCTURES)),
    }
    laplace = {
        "backend": choice("laplace.backend", backends),
        "curvature": choice("laplace.curvature", CURVATURES),
        "structure": choice("laplace.structure", STRUCTURES),
        "subset": choice("laplace.subset", SUBSETS),
    }
    for key in sorted(set(cfg) - set(top) - {"laplace"}):
        problems.append(f"unknown key {key!r} (known: {', '.join([*top, 'laplace'])})")
    for key in sorted(set(lap) - set(laplace)):
        problems.append(f"unknown key laplace.{key} (known: {', '.join(laplace)})")
    opts: dict[str, Any] = {}
    for key, (cli, default, check) in top.items():
        from_file = check(cfg[key]) if key in cfg else default
        opts[key] = check(cli) if cli is not None else from_file
    opts["backends_given"] = args.backend is not None or "backends" in cfg
    first = (opts["backends"] or ["autograd"])[0]
    defaults = {"backend": first, "curvature": "ggn", "structure": "kron", "subset": "all"}
    for key, check in laplace.items():
        opts[f"laplace_{key}"] = check(lap[key]) if key in lap else defaults[key]
    if problems:
        where = f" (command line and {args.config})" if args.config else ""
        raise CLIError(f"bad demo options{where}: " + "; ".join(problems))
    return opts


def _installed_backends(opts: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The requested backends whose library imports, and notes on those skipped.

    A backend asked for by name that is not installed is an error; of the default list
    (every registered backend) those not installed are skipped with a note.
    """
    import curvlib

    table = curvlib.available()
    usable, notes = [], []
    for backend in opts["backends"]:
        errors = [c["error"] for c in table[backend].values() if "error" in c]
        if not errors:
            usable.append(backend)
            continue
        hint = f"{backend!r} is not installed ({errors[0]}); pip install 'curvlib[{backend}]'"
        if opts["backends_given"]:
            raise CLIError(f"backend {hint}")
        notes.append(f"skipped backend {hint}")
    lap = (opts["laplace_backend"], opts["laplace_curvature"], opts["laplace_structure"])
    caps = table[lap[0]][lap[1]]
    if "error" in caps:
        raise CLIError(f"laplace.backend {lap[0]!r} is not installed ({caps['error']})")
    if lap[2] not in caps["structures"]:
        raise CLIError(
            f"laplace: {lap[0]}:{lap[1]} has no {lap[2]!r} structure "
            f"(it has {', '.join(caps['structures'])})"
        )
    return usable, notes


def cmd_demo(args: argparse.Namespace) -> int:
    """``curvlib demo``: options and optional packages are checked first, then the job runs.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed ``demo`` options (see ``curvlib demo --help``).

    Returns
    -------
    int
        0.

    Raises
    ------
    CLIError
        A bad option or configuration value, a missing optional package or backend library
        (reported by :func:`main` as one line, exit status 2).
    """
    opts = _demo_options(args)
    missing = _missing_packages(DEMO_PACKAGES)
    if missing:
        raise CLIError(
            f"curvlib demo needs {', '.join(missing)} (not installed); "
            f"install with: pip install {' '.join(missing)}  (or: pip install 'curvlib[demo]')"
        )
    import warnings

    with warnings.catch_warnings():
        if args.quiet:  # library warnings (torch's, laplace-torch's) silenced for the demo only
            warnings.simplefilter("ignore")
        opts["backends"], notes = _installed_backends(opts)
        from curvlib import _demo

        for note in notes:
            print(note)
        _demo.run(opts, progress=not args.quiet)
    return 0


# -- bench --------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    from curvlib import _bench

    try:
        return _bench.main(args)
    except ValueError as err:
        raise CLIError(str(err)) from None


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``curvlib bench`` (here, so that ``--help`` needs no torch)."""
    p.add_argument("--quick", action="store_true", help="the MLP only, 3 repeats")
    p.add_argument("--workloads", nargs="+", choices=("mlp", "cnn"), default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (5; --quick 3)")
    p.add_argument("--backends", nargs="+", default=None, help="default: every registered one")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=None, help="also write the rows to this .json file")
    p.add_argument("--quiet", action="store_true", help="no per-row progress on stderr")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows an interrupted run wrote to --out and measure the rest",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curvlib", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="curvature on the digits data with every backend; MAP against Laplace",
        description="Train an MLP on scikit-learn's digits, compare every backend's curvature "
        "with autograd's, and compare MAP with a Laplace approximation (prior precision tuned "
        "by marginal likelihood) on held-out, rotated and noised digits. Needs the [demo] extra.",
    )
    d.add_argument(
        "--backend", action="append", help="backend to run, repeatable (default: all installed)"
    )
    d.add_argument(
        "--curvature", action="append", help="ggn, fisher, ef, hessian (default: ggn and ef)"
    )
    d.add_argument("--structure", action="append", help="diag, kron, full (default: all three)")
    d.add_argument(
        "--config",
        help="TOML file with keys seed, out, steps, backends, curvatures, structures and a "
        "[laplace] table (backend, curvature, structure, subset = all | last_layer); "
        "options given on the command line win",
    )
    d.add_argument("--seed", type=int, default=None, help="seed of split and model (default 0)")
    d.add_argument("--out", default=None, help="output folder (default curvlib-demo)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    d.add_argument("--quiet", action="store_true", help="no progress bars, no library warnings")
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser(
        "info",
        help="versions and capability table",
        description="Print versions and what each registered backend computes.",
    )
    i.add_argument("--json", action="store_true", help="print only one JSON object")
    i.set_defaults(func=cmd_info)
    b = sub.add_parser("bench", help="time curvlib's backends as multiples of one gradient")
    _bench_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``curvlib`` console script.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after ``curvlib`` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 on success, 2 for an error reported as one line on stderr.
    """
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as err:
        print(f"curvlib: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
