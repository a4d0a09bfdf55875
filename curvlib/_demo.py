r"""The job behind ``curvlib demo`` (options are checked in :mod:`curvlib.cli` first).

1. Data: scikit-learn's bundled 8×8 digits (1797 images, no download), a seeded split into
   1200 training and 597 held-out images, and two shifted copies of the held-out images:
   rotated by 30° (bilinear) and with Gaussian pixel noise (σ = 0.5, pixels in [0, 1]).
2. A 64-32-10 tanh MLP trained to a MAP estimate (full-batch Adam, weight decay 1e-4).
3. Every backend's curvature (per curvature × structure) against the autograd backend's:
   :math:`\|R - R_{\text{autograd}}\|_F / \|R_{\text{autograd}}\|_F` (K-FAC as its dense
   block-diagonal matrix), and the time of the call.
4. A Laplace approximation through the laplace-torch adapter, the prior precision tuned by
   maximizing the marginal likelihood (``optimize_prior_precision(method="marglik")``, what
   laplace-torch recommends); MAP against the Laplace GLM predictive (probit) per split:
   accuracy, NLL (mean negative log-likelihood of the true label) and ECE (15 equal-width
   confidence bins), and which of the two is better per metric.
5. A figure (backend agreement, curvature spectra, reliability diagrams) and
   ``results.json`` in the output folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import curvlib
from curvlib.errors import CurvlibError

N_TRAIN = 1200
ROTATION = 30.0  # degrees
NOISE = 0.5  # standard deviation of the pixel noise (pixels in [0, 1])
BINS = 15  # confidence bins of ECE and of the reliability diagrams
SPLITS = ("held-out", f"rotated {ROTATION:g}°", f"noised σ={NOISE:g}")
METRICS = (("accuracy", "higher"), ("nll", "lower"), ("ece", "lower"))


def digits(seed: int) -> tuple[tuple[Tensor, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """The training split and the evaluation splits (held-out, rotated, noised)."""
    from scipy import ndimage
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    X, y = X[perm] / 16.0, y[perm]
    test = X[N_TRAIN:]
    rotated = np.stack(
        [ndimage.rotate(im, ROTATION, reshape=False, order=1) for im in test.reshape(-1, 8, 8)]
    ).reshape(len(test), 64)
    noised = test + NOISE * rng.standard_normal(test.shape)

    def pair(a: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
        return torch.tensor(a, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)

    evals = dict(zip(SPLITS, (test, rotated, noised), strict=True))
    return pair(X[:N_TRAIN], y[:N_TRAIN]), {k: pair(v, y[N_TRAIN:]) for k, v in evals.items()}


def train_map(seed: int, X: Tensor, y: Tensor, steps: int, progress: bool) -> nn.Module:
    r"""A 64-32-10 tanh MLP, initialized from a seeded generator, trained by Adam.

    The initialization is PyTorch's default for ``nn.Linear`` (weights and biases uniform
    in :math:`\pm 1/\sqrt{\text{fan-in}}`), drawn from ``torch.Generator().manual_seed(seed)``.
    """
    from tqdm.auto import tqdm

    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            bound = 1 / layer.in_features**0.5
            for p in (layer.weight, layer.bias):
                nn.init.uniform_(p, -bound, bound, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in tqdm(range(steps), desc="training MAP", disable=not progress, leave=False):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model


def metrics(probs: Tensor, y: Tensor) -> dict[str, Any]:
    r"""Accuracy, NLL and ECE of predictive probabilities, and the reliability curve.

    ``nll`` is :math:`-\frac1n\sum_i \log p_i(y_i)`; ``ece`` is
    :math:`\sum_b \frac{n_b}{n} |\text{acc}_b - \text{conf}_b|` over :data:`BINS`
    equal-width bins of the confidence :math:`\max_k p_{ik}`; ``reliability`` lists, per
    non-empty bin, its mean confidence, accuracy and count.
    """
    probs = probs.double()
    conf, pred = probs.max(-1)
    correct = (pred == y).double()
    nll = -probs.gather(1, y[:, None]).clamp_min(1e-300).log().mean().item()
    edges = torch.linspace(0, 1, BINS + 1, dtype=torch.float64)
    ece, curve = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            c, a = conf[m].mean().item(), correct[m].mean().item()
            ece += m.double().mean().item() * abs(a - c)
            curve.append({"confidence": c, "accuracy": a, "count": int(m.sum())})
    return {"accuracy": correct.mean().item(), "nll": nll, "ece": ece, "reliability": curve}


def better(map_m: dict[str, Any], la_m: dict[str, Any]) -> dict[str, str]:
    """Per metric ``"MAP"``, ``"Laplace"`` or ``"tie"`` (equal to the 4 printed decimals)."""
    out = {}
    for key, direction in METRICS:
        a, b = round(map_m[key], 4), round(la_m[key], 4)
        if a == b:
            out[key] = "tie"
        else:
            out[key] = "MAP" if (a > b) == (direction == "higher") else "Laplace"
    return out


def _dense(result: Any) -> Tensor:
    return (result.to_matrix() if hasattr(result, "to_matrix") else result).double()


def compare_backends(model, X, y, opts, progress: bool, seed: int):
    """Rows ``(curvature, structure, backend, rel_diff, seconds, note)``.

    The autograd backend is the reference and always runs first. MC Fisher calls of every
    backend draw from a generator seeded alike, so they see the same samples.
    """
    from tqdm.auto import tqdm

    backends = ["autograd", *[b for b in opts["backends"] if b != "autograd"]]
    jobs = [(c, s, b) for c in opts["curvatures"] for s in opts["structures"] for b in backends]
    rows, reference = [], {}
    for curv_name, structure, backend in tqdm(
        jobs, desc="backends", disable=not progress, leave=False
    ):
        cls = curvlib.backend_class(backend, curv_name)
        if structure not in cls.structures:
            rows.append((curv_name, structure, backend, None, None, "not offered"))
            continue
        kwargs: dict[str, Any] = {"N": len(X)} if structure == "kron" else {}
        if curv_name == "fisher":
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        try:
            curv = cls(model, "classification")
            start = time.perf_counter()
            _, result = getattr(curv, structure)(X, y, **kwargs)
            seconds = time.perf_counter() - start
        except (CurvlibError, NotImplementedError, ValueError) as err:
            rows.append((curv_name, structure, backend, None, None, str(err).split(";")[0]))
            continue
        key = (curv_name, structure)
        if backend == "autograd":
            reference[key] = result
        ref = reference.get(key)
        err = None
        if ref is not None:
            r = _dense(ref)
            err = float((_dense(result) - r).norm() / r.norm())
        rows.append((curv_name, structure, backend, err, seconds, ""))
    if "autograd" not in opts["backends"]:
        rows = [r for r in rows if r[2] != "autograd"]
    return rows


def fit_laplace(model, train, opts, progress: bool):
    """laplace-torch's ``Laplace`` with a curvlib backend, prior precision by marglik."""
    from laplace import Laplace

    from curvlib.integrations.laplace import laplace_backend

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=200)
    la = Laplace(
        model,
        "classification",
        subset_of_weights=opts["laplace_subset"],
        hessian_structure=opts["laplace_structure"],
        backend=laplace_backend(opts["laplace_backend"], opts["laplace_curvature"]),
    )
    la.fit(loader, progress_bar=progress)
    la.optimize_prior_precision(
        pred_type="glm",
        method="marglik",
        prior_structure="scalar",
        link_approx="probit",
        n_steps=100,
        progress_bar=progress,
    )
    return la


def _eigenvalues(structure: str, result: Any) -> Tensor:
    """Eigenvalues of a curvature result: ``full`` by eigvalsh, ``kron`` from its factors."""
    if structure == "full":
        return torch.linalg.eigvalsh(result.double())
    if structure == "diag":
        return result.double()
    vals = []
    for ev in result.decompose().eigenvalues:
        v = ev[0].double()
        for other in ev[1:]:
            v = torch.outer(v, other.double()).flatten()
        vals.append(v)
    return torch.cat(vals)


def spectra(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Eigenvalues of the exact GGN and of its K-FAC and diagonal approximations.

    Computed by the autograd backend on a float64 copy of the model, so that the small
    eigenvalues are not float32 round-off.
    """
    import copy

    model64 = copy.deepcopy(model).double()
    X = X.double()
    ggn = curvlib.AutogradGGN(model64, "classification")
    out = {}
    for structure, label in (("full", "exact GGN"), ("kron", "K-FAC GGN"), ("diag", "diag GGN")):
        kwargs = {"N": len(X)} if structure == "kron" else {}
        _, result = getattr(ggn, structure)(X, y, **kwargs)
        out[label] = _eigenvalues(structure, result).sort(descending=True).values
    return out


def figure(rows, eigs, results, la_name: str, path: Path) -> Path:
    """Backend agreement, spectra and two reliability diagrams in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    ax = axes[0, 0]  # backend agreement
    backends = list(dict.fromkeys(r[2] for r in rows if r[2] != "autograd"))
    cols = list(dict.fromkeys((r[0], r[1]) for r in rows))
    grid = np.full((len(backends), len(cols)), np.nan)
    text = [["n/a"] * len(cols) for _ in backends]
    for curv, structure, backend, err, _, _ in rows:
        if backend in backends and err is not None:
            i, j = backends.index(backend), cols.index((curv, structure))
            grid[i, j] = err
            text[i][j] = "0 (equal)" if err == 0 else f"{err:.1e}"
    positive = grid[np.isfinite(grid) & (grid > 0)]
    if positive.size:
        norm = LogNorm(vmin=positive.min() / 2, vmax=max(positive.max() * 2, 1e-6))
        shown = np.ma.masked_where(~(np.isfinite(grid) & (grid > 0)), grid)
        im = ax.imshow(shown, cmap="viridis", norm=norm, aspect="auto")
        fig.colorbar(im, ax=ax, label="relative difference (log scale)")
    ax.set_facecolor("0.85")
    for i in range(len(backends)):
        for j in range(len(cols)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8, color="k")
    ax.set_xticks(range(len(cols)), [f"{c}\n{s}" for c, s in cols])
    ax.set_yticks(range(len(backends)), backends)
    ax.set_xlim(-0.5, len(cols) - 0.5)
    ax.set_ylim(len(backends) - 0.5, -0.5)
    ax.set_xlabel("curvature / structure")
    ax.set_ylabel("backend")
    ax.set_title(
        "Agreement with autograd: ‖R − R_autograd‖_F / ‖R_autograd‖_F\n"
        "(grey: exactly equal or not computed)"
    )

    ax = axes[0, 1]  # spectra
    for label, ev in eigs.items():
        pos = ev[ev > 0]
        ax.semilogy(
            np.arange(1, len(pos) + 1),
            pos.numpy(),
            label=f"{label}: {len(pos)} of {len(ev)} shown, {len(ev) - len(pos)} ≤ 0 dropped",
        )
    ax.set_xlabel("rank of the eigenvalue (sorted, largest first)")
    ax.set_ylabel("eigenvalue (log scale; eigenvalues ≤ 0 dropped)")
    ax.set_title("GGN spectrum on the training set: exact, K-FAC, diagonal")
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)

    for ax, split in zip(axes[1], SPLITS[:2], strict=True):  # reliability diagrams
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        for name, style in (("MAP", "o-"), (la_name, "s-")):
            m = results[split]["MAP" if name == "MAP" else "Laplace"]
            c = [b["confidence"] for b in m["reliability"]]
            a = [b["accuracy"] for b in m["reliability"]]
            n = np.array([b["count"] for b in m["reliability"]])
            label = f"{name} (ECE {m['ece']:.3f}, NLL {m['nll']:.3f})"
            line = ax.plot(c, a, style, ms=4, lw=1, alpha=0.7, label=label)[0]
            ax.scatter(c, a, s=8 + 400 * n / n.sum(), marker=style[0], color=line.get_color())
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"confidence (max predicted probability; {BINS} bins)")
        ax.set_ylabel("accuracy in the bin (marker area ∝ images in the bin)")
        ax.set_title(f"Reliability on {split} digits ({results[split]['n']} images)")
        ax.legend(fontsize=8, loc="best")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _verdict(split: str, wins: dict[str, str]) -> str:
    names = {"accuracy": "accuracy", "nll": "NLL", "ece": "ECE"}
    by = {w: [names[k] for k, v in wins.items() if v == w] for w in ("Laplace", "MAP", "tie")}
    parts = [f"{w} better in {', '.join(ks)}" for w, ks in by.items() if ks and w != "tie"]
    if by["tie"]:
        parts.append(f"tie in {', '.join(by['tie'])}")
    line = f"  {split}: " + "; ".join(parts)
    if wins["nll"] != "Laplace" and wins["ece"] != "Laplace":
        line += f" -> Laplace does not help on {split} digits (neither NLL nor ECE)"
    return line


def run(opts: dict[str, Any], progress: bool) -> dict[str, Any]:
    """The demo job with checked options (see :func:`curvlib.cli._demo_options`).

    Runs with one torch thread (restored afterwards): its operations are small, and more
    threads only add synchronization overhead (several times slower on a busy machine).
    The global RNG is left as it was (data loaders and module construction draw from it;
    the demo's randomness comes from seeded generators).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            return _run(opts, progress)
    finally:
        torch.set_num_threads(threads)


def _run(opts: dict[str, Any], progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    seed, out = opts["seed"], Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    train, evals = digits(seed)
    model = train_map(seed, *train, steps=opts["steps"], progress=progress)
    print(
        f"digits: {len(train[0])} train / {len(evals['held-out'][0])} held-out images, "
        f"MLP 64-32-10 (tanh), {opts['steps']} Adam steps, seed {seed}"
    )

    print("\ncurvature   structure  backend     rel. diff to autograd   time [s]")
    rows = compare_backends(model, *train, opts, progress, seed)
    for curv_name, structure, backend, err, seconds, note in rows:
        e = "-" if err is None else f"{err:.2e}"
        t = "-" if seconds is None else f"{seconds:.3f}"
        print(f"{curv_name:11s} {structure:10s} {backend:11s} {e:>21s}   {t:>8s}  {note}")

    la = fit_laplace(model, train, opts, progress)
    prior = float(la.prior_precision.mean())
    la_desc = (
        f"{'all weights' if opts['laplace_subset'] == 'all' else 'last layer'}, "
        f"{opts['laplace_structure']} {opts['laplace_curvature']} "
        f"({opts['laplace_backend']} backend), GLM predictive (probit)"
    )
    print(f"\nLaplace: {la_desc}")
    print(
        f"prior precision tuned by marginal likelihood: {prior:.4g} "
        f"(log marginal likelihood {float(la.log_marginal_likelihood()):.1f})"
    )
    results: dict[str, Any] = {}
    print(f"\n{'split':18s} {'':8s} {'accuracy':>9s} {'NLL':>8s} {'ECE':>8s}")
    for split, (X, y) in evals.items():
        with torch.no_grad():
            map_m = metrics(torch.softmax(model(X), -1), y)
            la_m = metrics(la(X, pred_type="glm", link_approx="probit"), y)
        wins = better(map_m, la_m)
        results[split] = {"n": len(y), "MAP": map_m, "Laplace": la_m, "better": wins}
        for i, (name, m) in enumerate((("MAP", map_m), ("Laplace", la_m))):
            head = f"{split} ({len(y)})" if i == 0 else ""
            print(f"{head:18s} {name:8s} {m['accuracy']:9.4f} {m['nll']:8.4f} {m['ece']:8.4f}")
        print(f"{'':18s} {'better':8s} {wins['accuracy']:>9s} {wins['nll']:>8s} {wins['ece']:>8s}")
    print("\nMAP against Laplace (accuracy: higher is better; NLL, ECE: lower is better):")
    for split in SPLITS:
        print(_verdict(split, results[split]["better"]))

    eigs = spectra(model, *train)
    fig = figure(rows, eigs, results, "Laplace", out / "demo.png")
    keys = ("curvature", "structure", "backend", "rel_diff", "seconds", "note")
    summary = {
        "seed": seed,
        "steps": opts["steps"],
        "backends": [dict(zip(keys, r, strict=True)) for r in rows],
        "laplace": {
            "subset": opts["laplace_subset"],
            "structure": opts["laplace_structure"],
            "backend": opts["laplace_backend"],
            "curvature": opts["laplace_curvature"],
            "prior_precision": prior,
            "splits": results,
        },
        "spectra": {
            k: {"size": len(v), "nonpositive": int((v <= 0).sum())} for k, v in eigs.items()
        },
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\nfigure: {fig}\nresults: {out / 'results.json'}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return summary
