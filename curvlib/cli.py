"""The ``curvlib`` command.

``curvlib demo``  trains a small MLP on scikit-learn's bundled digits (no download),
computes diag / kron / full GGN and EF with every available backend, prints their agreement
with the autograd result and their time, fits a Laplace approximation through the
laplace-torch adapter, reports accuracy, NLL and ECE of the MAP model and the Laplace
predictive, and saves a figure of per-layer curvature and the K-FAC spectrum.

``curvlib info``  prints versions and the capability table.

``curvlib bench [--quick] [--workloads ...] [--out results.json] [--threads N]``  times every
backend × curvature × structure against laplace-torch's backends (:mod:`curvlib.benchmark`).

Errors (unknown backend, missing optional extra) are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


class CLIError(Exception):
    """An error reported as one line, without a traceback."""


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise CLIError(
            f"this command needs {module!r} ({err}); "
            f"install it with: pip install 'curvlib[{extra}]'"
        ) from None


def _load_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = _require("tomli", "demo")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise CLIError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise CLIError(f"config file {path} is not valid TOML: {err}") from None


# -- info ---------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("curvlib", "torch", "backpack-for-pytorch", "asdfghjkl", "laplace-torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def cmd_info(args: argparse.Namespace) -> int:
    import curvlib

    for dist, ver in _versions().items():
        print(f"{dist:22s} {ver}")
    print()
    table = curvlib.available()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"{'backend':10s} {'curvature':10s} structures          kron variants   dict inputs")
    for backend, curvs in table.items():
        for curv, caps in curvs.items():
            if "error" in caps:
                print(f"{backend:10s} {curv:10s} unavailable: {caps['error']}")
                continue
            print(
                f"{backend:10s} {curv:10s} {','.join(caps['structures']):19s} "
                f"{','.join(caps['kfac_approx']) or '-':15s} {caps['dict_inputs']}"
            )
    return 0


# -- demo ---------------------------------------------------------------------------------------
def _digits(seed: int):
    import numpy as np
    import torch

    datasets = _require("sklearn.datasets", "demo")
    X, y = datasets.load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    X = torch.tensor(X[perm] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[perm], dtype=torch.long)
    n_train = 1200
    return (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])


def _train(model, X, y, steps: int, progress: bool):
    import torch
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in tqdm(range(steps), desc="training MAP", disable=not progress, leave=False):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model


def _metrics(probs, y) -> dict[str, float]:
    import torch

    probs = probs.clamp_min(1e-12)
    conf, pred = probs.max(-1)
    acc = (pred == y).double().mean().item()
    nll = -probs.log().gather(1, y[:, None]).mean().item()
    bins = torch.linspace(0, 1, 16)
    ece = 0.0
    for lo, hi in zip(bins[:-1], bins[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.double().mean().item() * abs(
                (pred[m] == y[m]).double().mean().item() - conf[m].double().mean().item()
            )
    return {"accuracy": acc, "nll": nll, "ece": ece}


def _as_dense(result) -> Any:
    return result.to_matrix() if hasattr(result, "to_matrix") else result


def _compare_backends(model, X, y, backends, curvatures, structures, progress: bool):
    import torch
    from tqdm.auto import tqdm

    import curvlib
    from curvlib.errors import CurvlibError

    rows = []
    jobs = [(c, s, b) for c in curvatures for s in structures for b in backends]
    reference = {}
    for curv_name, structure, backend in tqdm(
        jobs, desc="backends", disable=not progress, leave=False
    ):
        cls = curvlib.backend_class(backend, curv_name)
        curv = cls(model, "classification")
        if structure not in cls.structures:
            rows.append((curv_name, structure, backend, None, None, "not offered"))
            continue
        try:
            start = time.perf_counter()
            _, result = getattr(curv, structure)(X, y, N=len(X))
            seconds = time.perf_counter() - start
        except (CurvlibError, NotImplementedError, ValueError) as err:
            rows.append((curv_name, structure, backend, None, None, str(err).split(";")[0]))
            continue
        dense = _as_dense(result).double()
        key = (curv_name, structure)
        if backend == "autograd":
            reference[key] = dense
        ref = reference.get(key)
        err = None if ref is None else float((dense - ref).norm() / ref.norm())
        rows.append((curv_name, structure, backend, err, seconds, ""))
    torch.set_grad_enabled(True)
    return rows


def _laplace_fit(model, train, test, backend: str, curvature: str, structure: str, progress):
    import torch

    laplace = _require("laplace", "laplace")
    from curvlib.integrations.laplace import laplace_backend

    ds = torch.utils.data.TensorDataset(*train)
    loader = torch.utils.data.DataLoader(ds, batch_size=200)
    la = laplace.Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        backend=laplace_backend(backend, curvature),
    )
    la.fit(loader, progress_bar=progress)
    la.optimize_prior_precision(method="marglik", n_steps=100)
    with torch.no_grad():
        probs = la(test[0], pred_type="glm", link_approx="probit")
    return la, probs


def _figure(model, X, y, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    import curvlib

    curv = curvlib.AutogradGGN(model, "classification")
    _, h = curv.diag(X, y)
    _, K = curv.kron(X, y, N=len(X))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in curv.params]
    per_layer = [c.mean().item() for c in h.split(sizes)]
    eig = torch.cat([e.flatten() for e in _kron_eigenvalues(K)]).sort(descending=True).values
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar(range(len(names)), per_layer)
    ax1.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax1.set_yscale("log")
    ax1.set_title("mean diagonal GGN per parameter tensor")
    ax2.semilogy(eig.clamp_min(1e-12).numpy())
    ax2.set_title("K-FAC GGN eigenvalue spectrum")
    ax2.set_xlabel("index")
    fig.tight_layout()
    path = out / "curvature.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _kron_eigenvalues(K):
    import torch

    dec = K.decompose()
    for ev in dec.eigenvalues:
        vals = ev[0]
        for other in ev[1:]:
            vals = torch.outer(vals, other).flatten()
        yield vals


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import curvlib
    from curvlib.backends import registry

    cfg: dict[str, Any] = _load_toml(args.config) if args.config else {}
    seed = args.seed if args.seed is not None else cfg.get("seed", 0)
    out = Path(args.out or cfg.get("out", "curvlib-demo"))
    backends = args.backend or cfg.get("backends") or list(registry())
    curvatures = args.curvature or cfg.get("curvatures") or ["ggn", "ef"]
    structures = args.structure or cfg.get("structures") or ["diag", "kron", "full"]
    laplace_spec = cfg.get("laplace", {})
    progress = not args.quiet
    for b in backends:
        if b not in registry():
            raise CLIError(f"unknown backend {b!r}; known backends: {sorted(registry())}")
    for c in curvatures:
        if c not in curvlib.CURVATURES:
            raise CLIError(f"unknown curvature {c!r}; known: {list(curvlib.CURVATURES)}")
    for s in structures:
        if s not in ("diag", "kron", "full"):
            raise CLIError(f"unknown structure {s!r}; known: ['diag', 'kron', 'full']")
    out.mkdir(parents=True, exist_ok=True)

    train, test = _digits(seed)
    with torch.random.fork_rng():  # seeded initialization without touching the caller's RNG
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
        )
    _train(model, *train, steps=args.steps, progress=progress)

    print(f"digits: {len(train[0])} train / {len(test[0])} test, MLP 64-32-10, seed {seed}")
    print("\ncurvature   structure  backend     rel. diff to autograd   time [s]")
    rows = _compare_backends(model, *train, backends, curvatures, structures, progress)
    for curv_name, structure, backend, err, seconds, note in rows:
        e = "-" if err is None else f"{err:.2e}"
        t = "-" if seconds is None else f"{seconds:.3f}"
        print(f"{curv_name:11s} {structure:10s} {backend:11s} {e:>21s}   {t:>8s}  {note}")

    lap_backend = laplace_spec.get("backend", backends[0])
    lap_curv = laplace_spec.get("curvature", "ggn")
    lap_struct = laplace_spec.get("structure", "kron")
    la, probs = _laplace_fit(model, train, test, lap_backend, lap_curv, lap_struct, progress)
    with torch.no_grad():
        map_probs = torch.softmax(model(test[0]), -1)
    print(
        f"\nLaplace ({lap_struct}, {lap_backend}:{lap_curv}), prior precision "
        f"{float(la.prior_precision.mean()):.3g}"
    )
    print(f"{'':10s} {'accuracy':>9s} {'NLL':>8s} {'ECE':>8s}")
    results = {}
    for name, p in (("MAP", map_probs), ("Laplace", probs)):
        m = _metrics(p, test[1])
        results[name] = m
        print(f"{name:10s} {m['accuracy']:9.4f} {m['nll']:8.4f} {m['ece']:8.4f}")
    fig = _figure(model, *train, out)
    (out / "results.json").write_text(
        json.dumps(
            {
                "backends": [
                    dict(
                        zip(
                            ("curvature", "structure", "backend", "rel_diff", "seconds", "note"),
                            r,
                            strict=True,
                        )
                    )
                    for r in rows
                ],
                "laplace": results,
            },
            indent=2,
        )
    )
    print(f"\nfigure: {fig}\nresults: {out / 'results.json'}")
    return 0


# -- bench --------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    from curvlib import _bench

    try:
        return _bench.main(args)
    except ValueError as err:
        raise CLIError(str(err)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curvlib", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="curvature on the digits data, every backend, Laplace")
    d.add_argument("--backend", action="append", help="backend(s) to run (default: all)")
    d.add_argument("--curvature", action="append", help="ggn, fisher, ef, hessian")
    d.add_argument("--structure", action="append", help="diag, kron, full")
    d.add_argument("--config", help="TOML file with the same keys (and [laplace])")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--out", default=None, help="output folder (default curvlib-demo)")
    d.add_argument("--steps", type=int, default=300, help="training steps")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("info", help="versions and capability table")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    from curvlib._bench import add_arguments

    b = sub.add_parser("bench", help="time curvlib's backends as multiples of one gradient")
    add_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``curvlib`` console script."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as err:
        print(f"curvlib: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
