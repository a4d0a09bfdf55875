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
    # the same objects: no Parameter, buffer or submodule replaced (``model[0].weight is W``)
    state["ids"] = (
        [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)],
        [(n, id(b)) for n, b in model.named_buffers(remove_duplicate=False)],
        [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)],
    )
    state["global_hooks"] = (
        len(torch.nn.modules.module._global_forward_hooks),
        len(torch.nn.modules.module._global_backward_hooks),
        len(torch.nn.modules.module._global_forward_pre_hooks),
    )
    return state


def assert_same_state(a: dict, b: dict) -> None:
    for key in ("training", "hooks", "dict", "global_hooks", "ids"):
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


# -- the MC Fisher and K-FAC ------------------------------------------------------------------
def mc_cotangents(f: Tensor, y: Tensor, likelihood: str, num_samples: int, seed: int) -> Tensor:
    """``(B, S, C)``: the likelihood's MC cotangents from a generator seeded with ``seed``.

    Every backend draws its pseudo-targets from curvlib's likelihood with the call's
    generator, so the same seed gives the same draws here and in every backend.
    """
    from curvlib.likelihood import get_likelihood

    gen = torch.Generator().manual_seed(seed)
    return get_likelihood(likelihood).mc_cotangents(f.detach(), num_samples, gen, y)


def mc_fisher(model, x, y, likelihood, num_samples, seed, last_layer=False) -> Tensor:
    """The MC Fisher :math:`\\sum_{n,s} J_n^\\top c_{ns} c_{ns}^\\top J_n` with brute-force
    Jacobians and the cotangents of :func:`mc_cotangents`."""
    J, f = jacobians(model, x, last_layer)
    c = mc_cotangents(f, y, likelihood, num_samples, seed)
    V = torch.einsum("bsc,bcp->bsp", c, J).flatten(0, 1)
    return V.T @ V


def output_matrices(curvature, model, x, y, likelihood, last_layer=False, **mc) -> Tensor:
    """``(B, C, C)``: the output-space matrix ``M_n`` the curvature puts between Jacobians:
    Λ_n (``ggn``), ``r_n r_nᵀ`` (``ef``) or the MC estimate (``fisher``, ``mc`` =
    ``num_samples`` and ``seed``)."""
    _, f = jacobians(model, x, last_layer)
    if curvature == "ggn":
        return output_hessians(f, y, likelihood)
    if curvature == "fisher":
        c = mc_cotangents(f, y, likelihood, **mc)
        return torch.einsum("bsc,bsd->bcd", c, c)
    if curvature == "ef":
        fr = f.clone().requires_grad_(True)
        rows = []
        for n in range(f.shape[0]):
            (r,) = torch.autograd.grad(loss_terms(likelihood, fr[n], y[n]), fr)
            rows.append(r[n])
        r = torch.stack(rows)
        return r.unsqueeze(-1) * r.unsqueeze(-2)
    raise ValueError(f"no output-space matrix for {curvature!r}")


def blocks_of(sizes: list[int], H: Tensor) -> Tensor:
    """The block diagonal of ``H`` by parameter tensor (``sizes``): what a Kron represents
    where K-FAC is exact."""
    out, o = [], 0
    for s in sizes:
        out.append(H[o : o + s, o : o + s])
        o += s
    return torch.block_diag(*out)


def _calls(module: nn.Module, fn, inp) -> dict[int, int]:
    """How often each submodule runs in one forward pass of ``fn(inp)``."""
    counts: dict[int, int] = {}

    def hook(m, args, out):
        counts[id(m)] = counts.get(id(m), 0) + 1

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            fn(inp)
    finally:
        for h in handles:
            h.remove()
    return counts


def _shared_linear_kfac(module, inp, lin: nn.Linear, M: Tensor, approx: str, N: int):
    """K-FAC of a Linear layer called several times, every call's inputs a location.

    Loops: ``J[n, :, l] = ∂f_n/∂s_l`` for every location ``l`` of every call,
    expand ``G = Σ_{n,l} J_lᵀ M_n J_l``, ``A = Σ_{n,l} a_l a_lᵀ / (N L)``; reduce
    ``G = Σ_n Ĵᵀ M_n Ĵ`` (``Ĵ = Σ_l J_l``), ``A = Σ_n ā āᵀ / N`` (``ā`` the mean input).
    """
    records = []
    h = lin.register_forward_hook(lambda m, args, out: records.append((args[0].detach(), out)))
    try:
        with torch.enable_grad():
            f = module(inp)
    finally:
        h.remove()
    B = f.shape[0]
    ff = f.reshape(B, -1)
    outs = [o for _, o in records]
    a = torch.cat([i.reshape(B, -1, i.shape[-1]) for i, _ in records], dim=1)  # (B, L, in)
    L = a.shape[1]
    J = torch.zeros(B, ff.shape[1], L, outs[0].shape[-1], dtype=f.dtype)
    for n in range(B):
        for k in range(ff.shape[1]):
            grads = torch.autograd.grad(ff[n, k], outs, retain_graph=True)
            J[n, k] = torch.cat([g[n].reshape(-1, g.shape[-1]) for g in grads])
    d_out, d_in = lin.weight.shape
    G = torch.zeros(d_out, d_out, dtype=f.dtype)
    A = torch.zeros(d_in, d_in, dtype=f.dtype)
    for n in range(B):
        if approx == "expand":
            for l in range(L):  # noqa: E741
                G += J[n, :, l].T @ M[n] @ J[n, :, l]
                A += torch.outer(a[n, l], a[n, l]) / (N * L)
        else:
            Jh = J[n].sum(1)
            G += Jh.T @ M[n] @ Jh
            A += torch.outer(a[n].mean(0), a[n].mean(0)) / N
    return G, A


class NoReference(Exception):
    """The brute force has no definition for this model (the numbers are not compared)."""


def kron_reference(model, x, y, likelihood, M, approx, N, H, last_layer=False) -> Tensor:
    """``(P, P)``: the K-FAC definition, block by parameter tensor, independent of curvlib.

    Layers with a K-FAC definition (Linear, convolutions, Embedding) called once: the loop
    definitions of ``tests/zoo_reference.py`` (:func:`zoo_reference.kfac` with ``M``); a
    Linear layer called several times: :func:`_shared_linear_kfac`; any other parameter
    (normalization layers, a subclass with its own ``forward``, a weight tied across
    modules, a layer whose forward never runs but whose parameters are used functionally):
    its exact block, read from the
    brute-force matrix ``H``. ``M`` is ``(B, K, K)`` over the flattened outputs.
    """
    import zoo_reference as Z

    module = model.last_layer if last_layer else model
    inp = model.forward_with_features(x)[1].detach() if last_layer else x
    sel = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    owner, holders = {}, {}
    for _, m in module.named_modules(remove_duplicate=False):
        for attr, p in m.named_parameters(recurse=False):
            owner.setdefault(id(p), (m, attr))
            holders.setdefault(id(p), set()).add(id(m))
    calls = _calls(module, module, inp)
    # a layer with a K-FAC definition: a subclass that keeps the layer's forward
    forwards = {
        t.forward
        for t in (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        + (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    }

    def defined(m: nn.Module) -> bool:
        return type(m).forward in forwards

    def untied(p: Tensor) -> bool:  # a weight shared by two modules gets its exact block
        return len(holders[id(p)]) == 1

    attention = Z._attention_params(module)  # MultiheadAttention: written out in Z
    single = [
        n
        for n, p in sel
        if id(p) in attention
        or (untied(p) and defined(owner[id(p)][0]) and calls.get(id(owner[id(p)][0]), 0) == 1)
    ]
    by_name = {}
    if single:
        try:
            blocks = Z.kfac(module, inp, y, likelihood, approx=approx, N=N, M=M, names=single)
        except ValueError as err:  # e.g. a padding mode the definitions do not cover
            raise NoReference(str(err)) from err
        by_name = {b.name: b.dense() for b in blocks}
    out, o = [], 0
    for n, p in sel:
        m, attr = owner[id(p)]
        s = p.numel()
        if n in by_name:
            out.append(by_name[n])
        elif untied(p) and defined(m) and isinstance(m, nn.Linear) and calls.get(id(m), 0) > 1:
            G, A = _shared_linear_kfac(module, inp, m, M, approx, N)
            out.append(torch.kron(G, A) if attr == "weight" else G)
        else:
            out.append(H[o : o + s, o : o + s])
        o += s
    return torch.block_diag(*out)
