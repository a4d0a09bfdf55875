"""Property tests (issue 10, item 5): random small MLPs and CNNs against brute force.

Hypothesis draws the architecture (depth, widths, activation, kernel, stride, padding), the
batch size, the number of outputs, the likelihood and the seeds; every registered backend
then computes every curvature and structure it declares, and each result is compared with
the brute-force float64 reference of ``tests/reference.py`` to a relative error of 1e-10:

* ``full`` / ``diag`` of the GGN, EF and Hessian: brute force; of the MC Fisher: brute-force
  Jacobians with the pseudo-target gradients drawn from the same seeded generator (every
  backend draws them from curvlib's likelihood);
* ``kron``: where K-FAC is exact (an MLP on one data point: every weight block is
  ``G ⊗ A``, every bias block ``G``) the block diagonal of the brute-force matrix;
  elsewhere the autograd backend's ``kron`` (expand variant, DESIGN §4);
* ``jacobians`` and ``gradients``: brute force.

A backend may refuse only what it declares it cannot do (BackPACK's K-FAC has no rule for
ELU / LeakyReLU), with ``UnsupportedModuleError``. ``derandomize=True`` fixes the examples,
so every CI run checks the same >= 200 cases; the largest errors measured are collected in
``AGREEMENT`` (``docs/reliability.md`` quotes them).
"""

from __future__ import annotations

from collections import defaultdict

import reference as ref
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import LEGACY
from torch import Tensor, nn

from curvlib.backends import backend_class, registry
from curvlib.errors import UnsupportedModuleError
from curvlib.likelihood import get_likelihood

DT = torch.float64
TOL = 1e-10
ACTIVATIONS = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}
_KFLR_ACTIVATIONS = {"tanh", "sigmoid", "relu"}  # BackPACK's K-FAC table

#: largest relative error per (backend, curvature, structure, reference kind)
AGREEMENT: dict[tuple[str, ...], float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _classes() -> dict[str, dict[str, type]]:
    out = {}
    for backend, curvatures in registry().items():
        try:
            out[backend] = {c: backend_class(backend, c) for c in curvatures}
        except ImportError:  # an optional library that is absent
            continue
    return out


CLASSES = _classes()


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
    return spec, likelihood, C, batch, seed


def build(spec: dict, likelihood: str, C: int, batch: int, seed: int):
    torch.manual_seed(seed)
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

    def __init__(self, model, x, y, likelihood):
        self.model, self.x, self.y, self.lik = model, x, y, likelihood
        self._cache: dict[str, Tensor] = {}

    def get(self, key: str) -> Tensor:
        if key not in self._cache:
            m, x, y, lik = self.model, self.x, self.y, self.lik
            if key == "ggn":
                v = ref.ggn(m, x, y, lik)
            elif key == "ef":
                v = ref.ef(m, x, y, lik)
            elif key == "hessian":
                v = ref.hessian(m, x, y, lik)
            elif key == "fisher":
                J, f = ref.jacobians(m, x)
                c = get_likelihood(lik).mc_cotangents(f, 1, torch.Generator().manual_seed(11))
                V = torch.einsum("bsc,bcp->bsp", c, J).flatten(0, 1)
                v = V.T @ V
            elif key == "jacobians":
                v = ref.jacobians(m, x)[0]
            elif key == "gradients":
                factor = 0.5 if lik == "regression" else 1.0
                v = ref.per_sample_grads(m, x, y, lik) / factor
            self._cache[key] = v
        return self._cache[key]


def blocks_of(model: nn.Module, H: Tensor) -> Tensor:
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    out, o = [], 0
    for s in sizes:
        out.append(H[o : o + s, o : o + s])
        o += s
    return torch.block_diag(*out)


def agree(key: tuple[str, ...], got: Tensor, expected: Tensor) -> None:
    diff = float((got - expected).norm())
    scale = float(expected.norm())
    assert diff <= TOL * scale + 1e-14, (key, diff, scale)
    AGREEMENT[key] = max(AGREEMENT[key], diff / scale if scale > 0 else 0.0)
    COUNTS["comparisons"] += 1


def compute(cls, curvature, what, model, x, y, likelihood):
    curv = cls(model, likelihood)
    kw = {"generator": torch.Generator().manual_seed(11)} if curvature == "fisher" else {}
    if what == "jacobians":
        return curv.jacobians(x)[0]
    if what == "gradients":
        return curv.gradients(x, y)[0]
    if what == "kron":
        return curv.kron(x, y, N=x.shape[0], **kw)[1].to_matrix()
    return getattr(curv, what)(x, y, **kw)[1]


def may_refuse(backend: str, what: str, spec: dict) -> bool:
    return backend == "backpack" and what == "kron" and spec["act"] not in _KFLR_ACTIVATIONS


def check_problem(spec, likelihood, C, batch, seed) -> None:
    model, x, y = build(spec, likelihood, C, batch, seed)
    refs = References(model, x, y, likelihood)
    kron_exact = spec["kind"] == "mlp" and batch == 1
    autograd_kron: dict[str, Tensor] = {}
    order = ["autograd"] + [b for b in CLASSES if b != "autograd"]
    for backend in order:
        for curvature, cls in CLASSES[backend].items():
            whats = list(LEGACY(cls.structures)) + (
                ["jacobians", "gradients"] if curvature == "ggn" else []
            )
            for what in whats:
                key = (backend, curvature, what)
                try:
                    got = compute(cls, curvature, what, model, x, y, likelihood)
                except UnsupportedModuleError:
                    assert may_refuse(backend, what, spec), key
                    COUNTS["declared refusals"] += 1
                    continue
                if what in ("jacobians", "gradients"):
                    agree((*key, "brute force"), got, refs.get(what))
                    continue
                if what == "kron":
                    if backend == "autograd":
                        autograd_kron[curvature] = got
                    if kron_exact:
                        agree(
                            (*key, "brute force (exact case)"),
                            got,
                            blocks_of(model, refs.get(curvature)),
                        )
                    elif backend != "autograd":
                        agree((*key, "autograd kron"), got, autograd_kron[curvature])
                    continue
                H = refs.get(curvature)
                agree((*key, "brute force"), got, H.diagonal() if what == "diag" else H)
    COUNTS["problems"] += 1


# -- the properties ----------------------------------------------------------------------------
@settings(max_examples=200, **SETTINGS)
@given(problems(mlps()))
def test_random_mlps(problem):
    check_problem(*problem)


@settings(max_examples=120, **SETTINGS)
@given(problems(cnns()))
def test_random_cnns(problem):
    check_problem(*problem)
