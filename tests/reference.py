"""Brute-force float64 references, written independently of curvlib's formulas.

Per-sample loops with ``torch.autograd.grad`` for Jacobians and gradients, dense
``torch.autograd.functional.hessian`` for Hessians (of the parameters and, for the GGN's
output-space matrix, of the per-sample loss w.r.t. the output).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def loss_terms(likelihood: str, f: Tensor, y: Tensor) -> Tensor:
    """The reported loss ``factor * lossfunc`` of one sample (f: (C,), y: () or (C,))."""
    if likelihood == "regression":
        return 0.5 * nn.MSELoss(reduction="sum")(f, y)
    return nn.CrossEntropyLoss(reduction="sum")(f.unsqueeze(0), y.unsqueeze(0))


def selected(model: nn.Module, last_layer: bool = False) -> list[tuple[str, Tensor]]:
    module = model.last_layer if last_layer else model
    ids = {id(p) for p in module.parameters() if p.requires_grad}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def output_fn(model: nn.Module, x, last_layer: bool = False):
    """theta (flat) -> model(x) with the selected parameters replaced."""
    sel = selected(model, last_layer)
    names = [n for n, _ in sel]
    shapes = [p.shape for _, p in sel]
    sizes = [p.numel() for _, p in sel]
    theta0 = torch.cat([p.detach().flatten() for _, p in sel])

    def fn(theta: Tensor) -> Tensor:
        chunks = theta.split(sizes)
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return torch.func.functional_call(model, params, (x,), strict=False)

    return fn, theta0


def jacobians(model, x, last_layer=False) -> tuple[Tensor, Tensor]:
    """(B, C, P) by a loop over samples and outputs."""
    fn, theta = output_fn(model, x, last_layer)
    theta = theta.clone().requires_grad_(True)
    f = fn(theta)
    B, C = f.shape
    J = torch.zeros(B, C, theta.numel(), dtype=f.dtype)
    for n in range(B):
        for c in range(C):
            (g,) = torch.autograd.grad(f[n, c], theta, retain_graph=True)
            J[n, c] = g
    return J, f.detach()


def per_sample_grads(model, x, y, likelihood, last_layer=False) -> Tensor:
    """(B, P): gradient of each sample's term of the reported loss."""
    fn, theta = output_fn(model, x, last_layer)
    theta = theta.clone().requires_grad_(True)
    f = fn(theta)
    rows = []
    for n in range(f.shape[0]):
        (g,) = torch.autograd.grad(loss_terms(likelihood, f[n], y[n]), theta, retain_graph=True)
        rows.append(g)
    return torch.stack(rows)


def output_hessians(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """(B, C, C): Hessian of each sample's loss w.r.t. its output, by autograd."""
    return torch.stack(
        [
            torch.autograd.functional.hessian(
                lambda fn, yn=y[n]: loss_terms(likelihood, fn, yn), f[n]
            )
            for n in range(f.shape[0])
        ]
    )


def ggn(model, x, y, likelihood, last_layer=False) -> Tensor:
    J, f = jacobians(model, x, last_layer)
    L = output_hessians(f, y, likelihood)
    return torch.einsum("bcp,bcd,bdq->pq", J, L, J)


def ef(model, x, y, likelihood, last_layer=False) -> Tensor:
    G = per_sample_grads(model, x, y, likelihood, last_layer)
    return G.T @ G


def loss(model, x, y, likelihood) -> Tensor:
    f = model(x)
    return sum(loss_terms(likelihood, f[n], y[n]) for n in range(f.shape[0])).detach()


def hessian(model, x, y, likelihood, last_layer=False) -> Tensor:
    fn, theta = output_fn(model, x, last_layer)

    def total(t):
        f = fn(t)
        return sum(loss_terms(likelihood, f[n], y[n]) for n in range(f.shape[0]))

    return torch.autograd.functional.hessian(total, theta)


def LEGACY(structures) -> list[str]:  # noqa: N802
    """The structures whose results these suites compare as dense tensors (full, diag,
    kron); EKFAC, blocks and low rank have their own suite (tests/test_structured.py)."""
    return [s for s in structures if s in ("full", "diag", "kron")]


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def model_state(model: nn.Module) -> dict:
    """Everything a curvature call must leave unchanged on the model."""
    state = {"training": [], "hooks": [], "dict": [], "params": [], "buffers": []}
    for name, m in model.named_modules(remove_duplicate=False):
        state["training"].append((name, m.training))
        hooks = tuple(
            tuple(getattr(m, h).keys())
            for h in (
                "_forward_hooks",
                "_forward_pre_hooks",
                "_backward_hooks",
                "_backward_pre_hooks",
                "_state_dict_hooks",
                "_load_state_dict_pre_hooks",
            )
        )
        state["hooks"].append((name, hooks, m._is_full_backward_hook))
        state["dict"].append((name, tuple(sorted(m.__dict__))))
    for name, p in model.named_parameters():
        grad = None if p.grad is None else p.grad.clone()
        state["params"].append(
            (name, p.detach().clone(), p.requires_grad, grad, tuple(sorted(p.__dict__)))
        )
    for name, b in model.named_buffers():
        state["buffers"].append((name, b.clone()))
    state["global_hooks"] = (
        len(torch.nn.modules.module._global_forward_hooks),
        len(torch.nn.modules.module._global_backward_hooks),
        len(torch.nn.modules.module._global_forward_pre_hooks),
    )
    return state


def assert_same_state(a: dict, b: dict) -> None:
    for key in ("training", "hooks", "dict", "global_hooks"):
        assert a[key] == b[key], key
    for (n1, p1, r1, g1, d1), (n2, p2, r2, g2, d2) in zip(a["params"], b["params"], strict=True):
        assert n1 == n2 and r1 == r2 and d1 == d2, n1
        assert torch.equal(p1, p2), n1
        assert (g1 is None) == (g2 is None), f"{n1}.grad changed"
        if g1 is not None:
            assert torch.equal(g1, g2), f"{n1}.grad changed"
    for (n1, b1), (n2, b2) in zip(a["buffers"], b["buffers"], strict=True):
        assert n1 == n2 and torch.equal(b1, b2), n1


def setup(case, cls, **kw):
    """``(curv, model, x, y, subnetwork_indices)`` for a shared case and a curvature class."""
    model, x, y, subnet = case.make()
    curv = cls(model, case.likelihood, last_layer=case.last_layer, subnetwork_indices=subnet, **kw)
    return curv, model, x, y, subnet


def sub_full(H: Tensor, idx) -> Tensor:
    """Restrict a dense reference to the subnetwork."""
    return H if idx is None else H[idx][:, idx]


def sub_vec(h: Tensor, idx) -> Tensor:
    """Restrict the last (parameter) dimension of a reference to the subnetwork."""
    return h if idx is None else h[..., idx]


def run_job(backend: str, curvature: str, what: str, model, x, y, seed: int = 5) -> Tensor:
    """One call of a backend on a classification model, as a tensor to compare.

    ``what`` is a structure (``kron`` gives ``to_matrix()``), ``"jacobians"`` or
    ``"gradients"``; MC calls get a generator seeded with ``seed``.
    """
    from curvlib import backend_class

    curv = backend_class(backend, curvature)(model, "classification")
    kw = {"generator": torch.Generator().manual_seed(seed)} if curvature == "fisher" else {}
    if what == "jacobians":
        return curv.jacobians(x)[0]
    if what == "gradients":
        return curv.gradients(x, y)[0]
    if what == "kron":
        return curv.kron(x, y, N=10, **kw)[1].to_matrix()
    return getattr(curv, what)(x, y, **kw)[1]


def assert_jacobians_and_gradients(curv, model, x, y, case, idx, tol: float):
    """``curv.jacobians`` and ``curv.gradients`` against the per-sample loops.

    Returns ``curv.gradients(x, y)`` for further comparisons."""
    Js, f = curv.jacobians(x)
    J_ref, f_ref = jacobians(model, x, case.last_layer)
    assert rel_err(Js, sub_vec(J_ref, idx)) < tol
    assert rel_err(f, f_ref) < tol
    Gs, lossval = curv.gradients(x, y)
    G_ref = per_sample_grads(model, x, y, case.likelihood, case.last_layer)
    # gradients() follows laplace-torch: terms of lossfunc, without factor
    assert rel_err(Gs * curv.factor, sub_vec(G_ref, idx)) < tol
    assert rel_err(lossval * curv.factor, loss(model, x, y, case.likelihood)) < tol
    return Gs, lossval
