"""EKFAC, per-layer blocks and low rank from every backend that claims them, against brute
force; accumulated over batches (and shards) equal to a single pass."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from cases import CASES
from torch import nn

import curvlib
from curvlib.backends import backend_class, registry
from curvlib.likelihood import get_likelihood

DT = torch.float64
TOL = 1e-10
BRUTE = {"ggn": ref.ggn, "ef": ref.ef, "hessian": ref.hessian}
NO_SUBNET = [c for c in CASES if not c.subnetwork]


def jobs(structure: str) -> list[tuple[str, str]]:
    out = []
    for backend, curvatures in registry().items():
        for curvature in curvatures:
            if curvature == "fisher":
                continue
            if structure in backend_class(backend, curvature).structures_of(curvature):
                out.append((backend, curvature))
    return out


def supported(model, backend, curvature, structure, likelihood, x, y, **kw) -> bool:
    return bool(
        curvlib.supports(
            model, backend, curvature, structure, x=x, y=y, likelihood=likelihood, **kw
        )
    )


def layer_mask(curv) -> torch.Tensor:
    """Block-diagonal 0/1 mask of the layers (the modules owning parameters)."""
    from curvlib.structured import layer_groups

    sizes = [p.numel() for p in curv.params]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    P = offsets[-1]
    mask = torch.zeros(P, P, dtype=DT)
    for _, idx in layer_groups(curv.differentiated_module, curv.params):
        span = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in idx])
        mask[span[:, None], span[None, :]] = 1
    return mask


@pytest.mark.parametrize("backend,curvature", jobs("blocks"))
@pytest.mark.parametrize("case", NO_SUBNET, ids=lambda c: c.name)
def test_blocks_are_the_layer_blocks_of_the_brute_force_matrix(case, backend, curvature):
    model, x, y, _ = case.make()
    cls = backend_class(backend, curvature)
    if not supported(
        model, backend, curvature, "blocks", case.likelihood, x, y, last_layer=case.last_layer
    ):
        with pytest.raises(curvlib.CurvlibError):
            cls(model, case.likelihood, last_layer=case.last_layer).blocks(x, y)
        return
    curv = cls(model, case.likelihood, last_layer=case.last_layer)
    loss, Bd = curv.blocks(x, y)
    H = BRUTE[curvature](model, x, y, case.likelihood, case.last_layer)
    assert ref.rel_err(Bd.to_matrix(), H * layer_mask(curv)) < TOL
    assert ref.rel_err(loss, ref.loss(model, x, y, case.likelihood)) < TOL


@pytest.mark.parametrize("backend,curvature", jobs("lowrank"))
@pytest.mark.parametrize("case", NO_SUBNET[:4], ids=lambda c: c.name)
def test_lowrank_full_rank_is_the_matrix_and_remainders_are_exact(case, backend, curvature):
    model, x, y, _ = case.make()
    curv = backend_class(backend, curvature)(model, case.likelihood, last_layer=case.last_layer)
    H = BRUTE[curvature](model, x, y, case.likelihood, case.last_layer)
    P = H.shape[0]
    _, L = curv.lowrank(x, y, k=P, remainder=None)
    assert ref.rel_err(L.to_matrix(), H) < 1e-9
    k = 3
    _, Ld = curv.lowrank(x, y, k=k, remainder="diag", num_iters=P)
    assert ref.rel_err(Ld.diag(), H.diagonal()) < TOL  # the diagonal is exact
    evals = torch.linalg.eigvalsh(H).flip(0)[:k]
    assert ref.rel_err(Ld.eigenvalues, evals) < 1e-8  # the top eigenvalues
    _, Ls = curv.lowrank(x, y, k=k, remainder="scalar")
    assert ref.rel_err(Ls.trace(), H.trace()) < TOL  # the trace is exact


def ekfac_reference(curv, model, x, y, likelihood, bases, curvature):
    """Corrected eigenvalues from brute-force per-sample products in the given bases."""
    from curvlib.kfac.compute import entry_specs
    from curvlib.structured import rotate_square

    if curvature == "ef":
        V = ref.per_sample_grads(model, x, y, likelihood)[:, None]
    else:
        J, f = ref.jacobians(model, x)
        c = get_likelihood(likelihood).sqrt_cotangents(f)
        V = torch.einsum("bkc,bcp->bkp", c, J)
    V = V.flatten(0, 1)
    out, pos = [], 0
    for p, (shapes, _), B in zip(curv.params, entry_specs(model, curv.params), bases, strict=True):
        D = V[:, pos : pos + p.numel()]
        pos += p.numel()
        grouped = any(len(s) == 3 for s in shapes)
        lead = [shapes[0][0]] if grouped else []
        out.append(
            rotate_square(D.reshape(D.shape[0], *lead, *[s[-1] for s in shapes]), B, grouped)
        )
    return out


@pytest.mark.parametrize("backend,curvature", jobs("ekfac"))
@pytest.mark.parametrize("case", [c for c in NO_SUBNET if not c.last_layer], ids=lambda c: c.name)
def test_ekfac_eigenvalues_against_brute_force_products(case, backend, curvature):
    model, x, y, _ = case.make()
    cls = backend_class(backend, curvature)
    if not supported(model, backend, curvature, "ekfac", case.likelihood, x, y):
        with pytest.raises(curvlib.CurvlibError):
            cls(model, case.likelihood).ekfac(x, y)
        return
    curv = cls(model, case.likelihood)
    _, E = curv.ekfac(x, y)
    want = ekfac_reference(curv, model, x, y, case.likelihood, E.eigenbases, curvature)
    for s, r in zip(E.eigenvalues, want, strict=True):
        assert ref.rel_err(s, r) < TOL


# one cotangent column: the EF of either likelihood, the GGN of a regression with one output
ONE_COLUMN = [
    (b, c, lik)
    for b, c in jobs("ekfac")
    for lik in ("classification", "regression")
    if not (c == "ggn" and lik == "classification")
]


@pytest.mark.parametrize("backend,curvature,likelihood", ONE_COLUMN)
def test_ekfac_one_datum_one_column_is_the_exact_block(likelihood, backend, curvature):
    torch.manual_seed(0)
    C = 1 if likelihood == "regression" else 3
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT)
    x = torch.randn(1, 4, dtype=DT)
    y = torch.randn(1, C, dtype=DT) if likelihood == "regression" else torch.tensor([1])
    curv = backend_class(backend, curvature)(model, likelihood)
    _, E = curv.ekfac(x, y)
    H = BRUTE[curvature](model, x, y, likelihood)
    sizes = [p.numel() for p in curv.params]
    blocks, o = [], 0
    for n in sizes:
        blocks.append(H[o : o + n, o : o + n])
        o += n
    assert ref.rel_err(E.to_matrix(), torch.block_diag(*blocks)) < TOL


def _loader(x, y, batch):
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


@pytest.mark.parametrize("structure", ["blocks", "ekfac", "lowrank"])
@pytest.mark.parametrize("curvature", ["ggn", "fisher", "ef"])
def test_accumulated_over_batches_equals_a_single_pass(structure, curvature):
    case = CASES[0]
    model, x, y, _ = case.make()
    x, y = torch.cat([x, x * 0.5]), torch.cat([y, y.flip(0)])
    curv = backend_class("autograd", curvature)(model, case.likelihood)
    options = {"k": 4} if structure == "lowrank" else None
    g = torch.Generator().manual_seed(5)
    loss1, N1, R1 = curvlib.fit(
        curv, _loader(x, y, 3), structure, progress=False, options=options, generator=g
    )
    g = torch.Generator().manual_seed(5)
    loss2, N2, R2 = curvlib.fit(
        curv, _loader(x, y, len(x)), structure, progress=False, options=options, generator=g
    )
    assert N1 == N2 == len(x)
    assert ref.rel_err(loss1, loss2) < 1e-12
    assert ref.rel_err(R1.to_matrix(), R2.to_matrix()) < 1e-12
