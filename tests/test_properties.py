"""Property tests: random small MLPs and CNNs against brute force.

Hypothesis draws the architecture (depth, widths, activation, kernel, stride, padding), the
batch size, the number of outputs, the likelihood, the seed and one registered backend and
curvature (``curvlib.backends.registry()``, read when the tests are collected), which then
computes every structure of the capability table, the Jacobians and the per-sample
gradients, and each result is compared with the brute-force float64 reference of
``tests/reference.py`` to a relative error of 1e-10:

* ``full`` / ``diag`` of the GGN, EF and Hessian: brute force; of the MC Fisher:
  brute-force Jacobians with the likelihood's cotangents drawn from an identically seeded
  generator;
* ``kron``: where K-FAC is exact (an MLP on one data point) the block diagonal of the
  brute-force matrix, elsewhere the loop definitions of K-FAC (``reference.kron_reference``);
* ``jacobians`` and ``gradients``: brute force.

What a backend refuses is read from the capability table (``curvlib.supports``): a refused
call raises a curvlib error before any backward pass (``oracle.expect_refusal``).
``derandomize=True`` fixes the examples, so every run checks the same 200 MLPs and 120 CNNs;
every example is independent of the others.
"""

from __future__ import annotations

import oracle
import reference as ref
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from curvlib.backends import registry

DT = torch.float64
TOL = 1e-10
ACTIVATIONS = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}
#: every (backend, curvature) of the registry: each example checks one
PAIRS = [(b, c) for b, curvatures in sorted(registry().items()) for c in curvatures]
ENTRIES = [oracle.ENTRY[n] for n in ("full", "diag", "kron", "jacobians", "gradients")]

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- strategies ----------------------------------------------------------------------------
@st.composite
def mlps(draw):
    d_in = draw(st.integers(1, 5))
    widths = draw(st.lists(st.integers(1, 6), min_size=0, max_size=2))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    return {"kind": "mlp", "d_in": d_in, "widths": widths, "act": act}


@st.composite
def cnns(draw):
    c_in = draw(st.integers(1, 2))
    size = draw(st.integers(3, 5))
    convs, h = [], size
    for _ in range(draw(st.integers(1, 2))):
        k = draw(st.integers(1, min(3, h)))
        stride = draw(st.integers(1, 2))
        pad = draw(st.integers(0, 1))
        out_h = (h + 2 * pad - k) // stride + 1
        if out_h < 1:
            break
        convs.append((draw(st.integers(1, 3)), k, stride, pad))
        h = out_h
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    return {"kind": "cnn", "c_in": c_in, "size": size, "convs": convs, "act": act}


@st.composite
def problems(draw, arch):
    spec = draw(arch)
    likelihood = draw(st.sampled_from(["classification", "regression"]))
    C = draw(st.integers(2 if likelihood == "classification" else 1, 4))
    batch = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    backend, curvature = draw(st.sampled_from(PAIRS))
    return spec, likelihood, C, batch, seed, backend, curvature


def build(spec: dict, likelihood: str, C: int, batch: int, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(spec, likelihood, C, batch)


def _build(spec: dict, likelihood: str, C: int, batch: int):
    act = ACTIVATIONS[spec["act"]]
    layers: list[nn.Module] = []
    if spec["kind"] == "mlp":
        d = spec["d_in"]
        for w in spec["widths"]:
            layers += [nn.Linear(d, w), act()]
            d = w
        layers.append(nn.Linear(d, C))
        x = torch.randn(batch, spec["d_in"], dtype=DT)
    else:
        c, h = spec["c_in"], spec["size"]
        for out_c, k, stride, pad in spec["convs"]:
            layers += [nn.Conv2d(c, out_c, k, stride=stride, padding=pad), act()]
            c, h = out_c, (h + 2 * pad - k) // stride + 1
        layers += [nn.Flatten(), nn.Linear(c * h * h, C)]
        x = torch.randn(batch, spec["c_in"], spec["size"], spec["size"], dtype=DT)
    model = nn.Sequential(*layers).to(DT)
    if likelihood == "classification":
        y = torch.randint(0, C, (batch,))
    else:
        y = torch.randn(batch, C, dtype=DT)
    return model, x, y


# -- references ----------------------------------------------------------------------------
class References:
    """Brute-force values of one problem, computed on first use."""

    def __init__(self, model, x, y, likelihood, kron_exact: bool) -> None:
        self.model, self.x, self.y, self.lik = model, x, y, likelihood
        self.kron_exact = kron_exact
        self._cache: dict[str, Tensor] = {}

    def get(self, curvature: str, what: str) -> Tensor:
        key = f"{curvature}-{what}"
        if key not in self._cache:
            self._cache[key] = self._compute(curvature, what)
        return self._cache[key]

    def _compute(self, curvature: str, what: str) -> Tensor:
        m, x, y, lik = self.model, self.x, self.y, self.lik
        if what == "jacobians":
            return ref.jacobians(m, x)[0]
        if what == "gradients":
            return ref.per_sample_grads(m, x, y, lik)
        if what == "diag":
            return self.get(curvature, "full").diagonal()
        if what == "kron":
            H = self.get(curvature, "full")
            sizes = [p.numel() for p in m.parameters() if p.requires_grad]
            if self.kron_exact:
                return ref.blocks_of(sizes, H)
            mc = {"num_samples": oracle.NUM_SAMPLES, "seed": oracle.SEED}
            M = ref.output_matrices(
                curvature, m, x, y, lik, **(mc if curvature == "fisher" else {})
            )
            return ref.kron_reference(m, x, y, lik, M, "expand", x.shape[0], H)
        if curvature == "fisher":
            return ref.mc_fisher(m, x, y, lik, oracle.NUM_SAMPLES, oracle.SEED)
        return {"ggn": ref.ggn, "ef": ref.ef, "hessian": ref.hessian}[curvature](m, x, y, lik)


def check_problem(spec, likelihood, C, batch, seed, backend, curvature) -> None:
    model, x, y = build(spec, likelihood, C, batch, seed)
    refs = References(model, x, y, likelihood, kron_exact=spec["kind"] == "mlp" and batch == 1)
    pb = oracle.Problem(model, x, y, likelihood, N=batch)
    oracle.get_class(backend, curvature)
    for entry in ENTRIES:
        key = (backend, curvature, entry.name)
        if not oracle.report(backend, curvature, entry, pb).supported:
            oracle.expect_refusal(
                lambda e=entry, c=curvature: oracle.call(backend, c, e, pb), model
            )
            continue
        _, got = oracle.call(backend, curvature, entry, pb)
        want = refs.get(curvature, entry.what)
        diff, scale = float((got - want).norm()), float(want.norm())
        assert diff <= TOL * scale + 1e-14, (key, diff, scale)


# -- the properties ----------------------------------------------------------------------------
@settings(max_examples=200, **SETTINGS)
@given(problems(mlps()))
def test_random_mlps(problem):
    check_problem(*problem)


@settings(max_examples=120, **SETTINGS)
@given(problems(cnns()))
def test_random_cnns(problem):
    check_problem(*problem)
