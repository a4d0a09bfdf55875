"""Backends against each other where sampling is involved: the same generator seed gives
every backend the same Monte-Carlo draws (drawn by curvlib's likelihood), so MC Fisher
results agree to round-off across backends."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from cases import CASES

from curvlib import backend_class
from curvlib.backends import registry

MC_CASES = [
    c for c in CASES if c.name in ("mlp_cls", "mlp_reg", "cnn_cls", "lastlayer_cls", "seq_cls")
]


COMBOS = [
    (case, backend, structure)
    for case in MC_CASES
    for backend in sorted(registry())
    for structure in ("full", "diag", "kron")
    # BackPACK cannot run a layer on sequences followed by a functional sum (test_backpack)
    if not (backend == "backpack" and case.name == "seq_cls" and structure != "full")
]


@pytest.mark.parametrize("case, backend, structure", COMBOS, ids=lambda v: getattr(v, "name", v))
def test_mc_fisher_same_draws_same_numbers(case, backend, structure):
    model, x, y, _ = case.make()
    kw = {"last_layer": case.last_layer, "num_samples": 3}
    curv = backend_class(backend, "fisher")(model, case.likelihood, **kw)
    want = backend_class("autograd", "fisher")(model, case.likelihood, **kw)
    rng = torch.get_rng_state()
    _, a = getattr(curv, structure)(x, y, generator=torch.Generator().manual_seed(5))
    _, b = getattr(want, structure)(x, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(rng, torch.get_rng_state())
    if structure == "kron":
        a, b = a.to_matrix(), b.to_matrix()
    assert ref.rel_err(a, b) < 1e-10
