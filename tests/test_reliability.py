"""The bad-input matrix (issue 10): every row over every backend x curvature x structure.

Each row either works and matches the brute-force float64 reference (``tests/reference.py``)
or raises the documented exception class before any work: the model is left exactly as it
was (``reference.model_state``), the global RNG is unchanged, and a probe on the first layer
counts the forward passes and the backward passes through it, so "before any work" is
measured: errors that need no forward pass come before any forward pass, errors that need
the model output (class range, regression shape, non-finite outputs) before any backward
pass. The jobs are built from ``curvlib.backends.registry()``, so a new backend is covered
the moment it is registered. ``docs/reliability.md`` tabulates the outcomes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import reference as ref
import torch
from cases import TiedModel
from reference import LEGACY
from torch import Tensor, nn

from curvlib import functional as CF
from curvlib.backends import backend_class, registry
from curvlib.errors import (
    InputError,
    NonFiniteError,
    SharedParameterError,
    TargetError,
    UnsupportedModuleError,
)

DT = torch.float64
B, D, C = 5, 4, 3


def _jobs() -> list[tuple[str, str, str]]:
    """``(backend, curvature, what)``: every structure a class declares, plus ``gradients``."""
    jobs = []
    for backend, curvatures in registry().items():
        for curvature in curvatures:
            try:
                cls = backend_class(backend, curvature)
            except ImportError:  # an optional library that is absent: skipped below
                jobs.append((backend, curvature, "full"))
                continue
            for what in (*LEGACY(cls.structures), "gradients"):
                jobs.append((backend, curvature, what))
    return jobs


JOBS = _jobs()
JOB_IDS = ["-".join(j) for j in JOBS]


def get_class(backend: str, curvature: str) -> type:
    try:
        return backend_class(backend, curvature)
    except ImportError as err:
        pytest.skip(f"backend {backend!r} unavailable: {err}")


def compute(backend, curvature, what, model, likelihood, x, y, N=None) -> Tensor:
    """Run one job; the MC Fisher gets a seeded generator. Returns a dense tensor."""
    curv = get_class(backend, curvature)(model, likelihood)
    kw = {"generator": torch.Generator().manual_seed(3)} if curvature == "fisher" else {}
    if what == "jacobians":
        return curv.jacobians(x)[0]
    if what == "gradients":
        return curv.gradients(x, y)[0]
    if what == "kron":
        return curv.kron(x, y, N=N, **kw)[1].to_matrix()
    return getattr(curv, what)(x, y, **kw)[1]


# -- the probe: forward and backward passes through the first layer ----------------------
class Probe:
    """Counts forward passes through ``module`` and backward passes through its output.

    Registered before the model's state is recorded: it is user state that must survive.
    """

    def __init__(self, module: nn.Module) -> None:
        self.forward = self.backward = 0
        module.register_forward_hook(self._hook)

    def _hook(self, mod: nn.Module, args: tuple, out: Tensor) -> None:
        self.forward += 1
        if out.requires_grad:
            out.register_hook(self._count_backward)

    def _count_backward(self, grad: Tensor) -> None:
        self.backward += 1

    def reset(self) -> None:
        self.forward = self.backward = 0


def mlp(likelihood: str = "classification", c: int = C) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, c)).to(DT)


def data(likelihood: str, b: int = B, c: int = C, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, D, generator=g, dtype=DT)
    if likelihood == "classification":
        return x, torch.randint(0, c, (b,), generator=g)
    return x, torch.randn(b, c, generator=g, dtype=DT)


def state(model: nn.Module) -> dict:
    """``reference.model_state`` with NaN entries of parameters marked (NaN != NaN)."""
    st = ref.model_state(model)
    st["params"] = [
        (n, torch.where(p.isnan(), torch.full_like(p, 1234.5), p), r, g, d)
        for n, p, r, g, d in st["params"]
    ]
    return st


def expect_refusal(job, model, likelihood, x, y, exc, match, *, stage: str = "forward") -> None:
    """``job`` raises ``exc`` (message ``match``) before any work; nothing changes.

    ``stage="forward"``: before any forward pass; ``"backward"``: after the forward pass
    (the check needs the output) but before any backward pass.
    """
    probe = Probe(model[0])
    before = state(model)
    rng = torch.get_rng_state()
    with pytest.raises(exc, match=match):
        compute(*job, model, likelihood, x, y)
    ref.assert_same_state(before, state(model))
    assert torch.equal(rng, torch.get_rng_state()), "global RNG state changed"
    assert probe.backward == 0, f"{probe.backward} backward passes before the error"
    if stage == "forward":
        assert probe.forward == 0, f"{probe.forward} forward passes before the error"


# -- row: targets -------------------------------------------------------------------------
BAD_TARGETS = {
    "cls-(N,1)": ("classification", lambda y: y.unsqueeze(1), r"shape \(5,\).*\(5, 1\).*squeeze"),
    "cls-float": ("classification", lambda y: y.to(DT), "integer class indices"),
    "cls-one-hot": ("classification", lambda y: nn.functional.one_hot(y, C).to(DT), "one-hot"),
    "cls-index-too-large": ("classification", lambda y: y + C, r"\[0, 2\] for 3 outputs"),
    "cls-index-negative": ("classification", lambda y: y - 10, r"\[0, 2\]"),
    "cls-batch-size": ("classification", lambda y: y[:3], "batch size 5"),
    "reg-(N,)-for-(N,1)": ("regression", lambda y: y[:, 0], r"shape \(5, 1\).*unsqueeze"),
    "reg-float32": ("regression", lambda y: y.float(), "dtype torch.float64"),
    "reg-long": ("regression", lambda y: y.long(), "floating point"),
}
# checks that need the number of outputs C run after the forward pass, before backward
_AFTER_FORWARD = {"cls-index-too-large", "cls-index-negative", "reg-(N,)-for-(N,1)"}
_AFTER_FORWARD |= {"cls-(N,1)", "cls-float", "cls-one-hot", "reg-float32", "reg-long"}


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
@pytest.mark.parametrize("row", list(BAD_TARGETS))
def test_bad_targets(row, job):
    likelihood, corrupt, match = BAD_TARGETS[row]
    c = 1 if row.startswith("reg-(N,)") else C
    model = mlp(likelihood, c)
    x, y = data(likelihood, c=c)
    stage = "backward" if row in _AFTER_FORWARD else "forward"
    expect_refusal(job, model, likelihood, x, corrupt(y), TargetError, match, stage=stage)


def test_targets_on_another_device():
    for job in JOBS:
        model = mlp()
        x, y = data("classification")
        expect_refusal(job, model, "classification", x, y.to("meta"), TargetError, "on meta")


# -- row: inputs --------------------------------------------------------------------------
def _nan_at_2(x: Tensor) -> Tensor:
    x = x.clone()
    x[2, 1] = float("nan")
    return x


def _inf_at_0_and_4(x: Tensor) -> Tensor:
    x = x.clone()
    x[0, 0], x[4, 3] = float("inf"), -float("inf")
    return x


BAD_INPUTS = {
    "meta-device": (lambda x: x.to("meta"), InputError, "on meta but the model is on cpu"),
    "float32-input": (lambda x: x.float(), InputError, "dtype torch.float32.*torch.float64"),
    "list-input": (lambda x: x.tolist(), InputError, "tensor or a dict"),
    "empty-batch": (lambda x: x[:0], InputError, "empty"),
    "nan-input": (_nan_at_2, NonFiniteError, r"batch indices \[2\]"),
    "inf-input": (_inf_at_0_and_4, NonFiniteError, r"batch indices \[0, 4\]"),
}


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
@pytest.mark.parametrize("row", list(BAD_INPUTS))
def test_bad_inputs(row, job):
    corrupt, exc, match = BAD_INPUTS[row]
    model = mlp()
    x, y = data("classification")
    if row == "empty-batch":
        y = y[:0]
    expect_refusal(job, model, "classification", corrupt(x), y, exc, match)


@pytest.mark.parametrize("backend", list(registry()))
@pytest.mark.parametrize("row", ["meta-device", "float32-input", "nan-input", "empty-batch"])
def test_bad_inputs_jacobians(row, backend):
    corrupt, exc, match = BAD_INPUTS[row]
    model = mlp()
    x, _ = data("classification")
    expect_refusal(
        (backend, "ggn", "jacobians"), model, "classification", corrupt(x), None, exc, match
    )


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_outputs(value, job):
    model = mlp()
    with torch.no_grad():
        model[2].bias[1] = value  # every output row is non-finite
    x, y = data("classification")
    expect_refusal(
        job,
        model,
        "classification",
        x,
        y,
        NonFiniteError,
        r"model output is NaN or infinite for batch indices \[0, 1, 2, 3, 4\]",
        stage="backward",
    )


# -- row: the model -----------------------------------------------------------------------
@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_models_refused(dtype, job):
    model = mlp().to(dtype)
    x, y = data("classification")
    expect_refusal(
        job,
        model,
        "classification",
        x.to(dtype),
        y,
        InputError,
        f"{dtype}.*float32 or float64 copy",
    )


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
def test_no_trainable_parameters(job):
    model = mlp().requires_grad_(False)
    x, y = data("classification")
    expect_refusal(
        job, model, "classification", x, y, InputError, "no parameters with requires_grad=True"
    )


TRAIN_MODE = {
    "dropout": lambda: nn.Dropout(0.3),
    "batchnorm": lambda: nn.BatchNorm1d(6),
}


def _with_layer(layer: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 6), layer, nn.Tanh(), nn.Linear(6, C)).to(DT)
    if isinstance(layer, nn.BatchNorm1d):
        with torch.no_grad():
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.normal_()
            layer.bias.normal_()
    return model


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
@pytest.mark.parametrize("layer", list(TRAIN_MODE))
def test_train_mode_refused(layer, job):
    model = _with_layer(TRAIN_MODE[layer]()).train()
    x, y = data("classification")
    expect_refusal(
        job, model, "classification", x, y, InputError, r"module '1'.*training mode.*model.eval\(\)"
    )


# -- rows that must work: compare with brute force ------------------------------------------
def blocks_of(model: nn.Module, H: Tensor) -> Tensor:
    """The block diagonal of ``H`` by selected parameter tensor (what a Kron represents)."""
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    out, o = [], 0
    for s in sizes:
        out.append(H[o : o + s, o : o + s])
        o += s
    return torch.block_diag(*out)


def mc_reference(model, x, y, likelihood, num_samples=1, seed=3) -> Tensor:
    """The MC Fisher with brute-force Jacobians and the generator's pseudo-target gradients."""
    from curvlib.likelihood import get_likelihood

    J, f = ref.jacobians(model, x)
    gen = torch.Generator().manual_seed(seed)
    c = get_likelihood(likelihood).mc_cotangents(f, num_samples, gen)  # (B, S, C)
    V = torch.einsum("bsc,bcp->bsp", c, J).flatten(0, 1)
    return V.T @ V


def brute(curvature, what, model, x, y, likelihood, kron_exact: bool) -> Tensor | None:
    """The reference of a job, or ``None`` where no brute-force value applies."""
    if what == "jacobians":
        return ref.jacobians(model, x)[0]
    if what == "gradients":
        factor = 0.5 if likelihood == "regression" else 1.0
        return ref.per_sample_grads(model, x, y, likelihood) / factor
    if curvature == "fisher":
        H = mc_reference(model, x, y, likelihood)
    else:
        H = {"ggn": ref.ggn, "ef": ref.ef, "hessian": ref.hessian}[curvature](
            model, x, y, likelihood
        )
    if what == "diag":
        return H.diagonal()
    if what == "kron":
        return blocks_of(model, H) if kron_exact else None
    return H


def check_job(job, model, likelihood, x, y, *, kron_exact, works: bool, refusal=()):
    """Run ``job``: compare with brute force (``works``) or expect one of ``refusal``."""
    backend, curvature, what = job
    before = ref.model_state(model)
    rng = torch.get_rng_state()
    if not works:
        with pytest.raises(refusal):
            compute(*job, model, likelihood, x, y, N=x.shape[0])
        ref.assert_same_state(before, ref.model_state(model))
        return None
    out = compute(*job, model, likelihood, x, y, N=x.shape[0])
    ref.assert_same_state(before, ref.model_state(model))
    assert torch.equal(rng, torch.get_rng_state()), "a deterministic call moved the global RNG"
    expected = brute(curvature, what, model, x, y, likelihood, kron_exact)
    if expected is None:
        return None
    err = ref.rel_err(out, expected)
    assert err < 1e-10, (job, err)
    return err


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_batch_of_one(likelihood, job):
    """B = 1: every structure is exact, K-FAC included (one datum, no weight sharing)."""
    model = mlp()
    x, y = data(likelihood, b=1)
    check_job(job, model, likelihood, x, y, kron_exact=True, works=True)


def _frozen_weights(all_weights: bool) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, C))
    model = model.to(DT)
    model[0].weight.requires_grad_(False)  # weight frozen, bias trainable
    if all_weights:
        model[2].weight.requires_grad_(False)
        model[4].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("variant", ["biases-only-B5", "first-weight-frozen-B1"])
def test_partially_frozen_modules(variant, likelihood, job):
    """Weight frozen, bias trainable: every structure vs brute force.

    A bias's K-FAC block ``[G]`` is exact at any batch size (no weight sharing), so with
    only biases trainable the Kron equals the block diagonal of the brute-force matrix at
    B = 5; with the first weight frozen and the others trainable it does at B = 1.
    """
    biases_only = variant.startswith("biases")
    model = _frozen_weights(all_weights=biases_only)
    x, y = data(likelihood, b=5 if biases_only else 1)
    check_job(job, model, likelihood, x, y, kron_exact=True, works=True)
    # the frozen weights got no entries / zero columns: the result covers exactly P entries
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = compute(*job, model, likelihood, x, y, N=x.shape[0])
    assert out.shape[-1] == P


def _tied_works(backend: str, curvature: str, what: str) -> bool:
    if backend in ("autograd", "auto"):  # auto passes to autograd; kron: weight sharing
        return True
    return backend == "asdl" and curvature == "hessian" and what in ("full", "diag")


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
def test_tied_weights(job):
    """A module called twice per forward: every structure works where the backend can
    (autograd, with the calls as weight-sharing locations for K-FAC; ASDL's Hessian), else
    ``SharedParameterError`` (an ``UnsupportedModuleError``) before any backward pass."""
    torch.manual_seed(0)
    model = TiedModel(D, C).to(DT)
    x, y = data("classification")
    works = _tied_works(*job)
    if not works and job[0] != "backpack":
        refusal = SharedParameterError
    else:
        refusal = UnsupportedModuleError
    probe = Probe(model.head)
    check_job(job, model, "classification", x, y, kron_exact=False, works=works, refusal=refusal)
    if not works:
        assert probe.backward == 0


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
@pytest.mark.parametrize("b", [1, 5])
def test_in_place_activations(b, job):
    """``ReLU(inplace=True)`` / ``Hardtanh(inplace=True)`` work in every backend, also in
    the autograd backend's per-layer hooks (a later in-place op would change the recorded
    layer output: it reruns the forward pass with copies)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(D, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, C)
    ).to(DT)
    x, y = data("classification", b=b)
    check_job(job, model, "classification", x, y, kron_exact=b == 1, works=True)
    assert model[1].inplace is True


class _PostOp(nn.Module):
    """Operations between the last layer and the loss, written in the model's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C))

    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * self.net(x) - 1.0


_SECOND_ORDER = {("ggn", "diag"), ("fisher", "diag"), ("hessian", "diag")}


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
def test_operations_between_output_and_loss(job):
    """curvlib's ``f`` is the model output: operations before the loss belong in the
    model's forward (they are then part of ``f`` and differentiated). BackPACK's
    second-order extensions need a chain of modules and refuse a functional operation
    with ``UnsupportedModuleError`` naming the model, after the forward pass."""
    torch.manual_seed(0)
    model = _PostOp().to(DT)
    x, y = data("classification", b=1)
    backend, curvature, what = job
    works = not (backend == "backpack" and (what == "kron" or (curvature, what) in _SECOND_ORDER))
    check_job(
        job,
        model,
        "classification",
        x,
        y,
        kron_exact=True,
        works=works,
        refusal=UnsupportedModuleError,
    )


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
@pytest.mark.parametrize("layer", list(TRAIN_MODE))
def test_eval_mode_dropout_batchnorm(layer, job):
    """In eval mode Dropout is the identity and BatchNorm an affine map: vs brute force.

    BackPACK handles BatchNorm (eval) in BatchGrad and DiagGGN but has no K-FAC or Hessian
    diagonal extension for it (``UnsupportedModuleError`` naming it, before any work); its
    K-FAC entries are exact blocks (curvlib's rule); Dropout works everywhere.
    """
    model = _with_layer(TRAIN_MODE[layer]()).eval()
    x, y = data("classification")
    backend, curvature, what = job
    second_order = what == "kron" or (curvature, what) == ("hessian", "diag")
    works = layer == "dropout" or backend != "backpack" or not second_order
    check_job(
        job,
        model,
        "classification",
        x,
        y,
        kron_exact=False,
        works=works,
        refusal=UnsupportedModuleError,
    )
    assert not model.training


# -- row: reduction="mean" in the functional API -----------------------------------------
def _loss_hessian(model: nn.Module, loss: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    fn, theta = ref.output_fn(model, x)
    return torch.autograd.functional.hessian(lambda t: loss(fn(t)), theta)


def test_functional_mean_reduction():
    """``reduction="mean"`` losses: the curvature of the loss exactly as given, vs brute
    force on that very loss (``torch.autograd.functional.hessian`` of ``loss_fn``)."""
    model = mlp()
    x, y = data("classification")
    ce = nn.CrossEntropyLoss(reduction="mean")
    H = _loss_hessian(model, lambda f: ce(f, y), x)
    per_layer = CF.per_layer_hessian_diagonal(model, ce, x, y)
    assert ref.rel_err(torch.cat(list(per_layer.values())), H.diagonal()) < 1e-10
    G = ref.per_sample_grads(model, x, y, "classification")
    ef = CF.empirical_fisher_diagonal(model, ce, x, y)
    assert ref.rel_err(torch.cat([e.flatten() for e in ef]), (G**2).sum(0) / B) < 1e-10
    # F.cross_entropy reduces by the mean too
    ef_f = CF.empirical_fisher_diagonal(model, nn.functional.cross_entropy, x, y)
    assert ref.rel_err(torch.cat([e.flatten() for e in ef_f]), (G**2).sum(0) / B) < 1e-10

    xr, yr = data("regression")
    mse = nn.MSELoss(reduction="mean")
    J, _ = ref.jacobians(model, xr)
    gn = 2.0 / (B * C) * torch.einsum("bcp,bcp->p", J, J)  # GGN of the mean MSE
    H_mse = _loss_hessian(model, lambda f: mse(f, yr), xr)
    ggn_mse = ref.ggn(model, xr, yr, "regression") * 2.0 / (B * C)
    assert ref.rel_err(gn, ggn_mse.diagonal()) < 1e-10
    got = CF.gauss_newton_matrix_approximation(model, mse, xr, yr)
    assert ref.rel_err(torch.cat([g.flatten() for g in got]), gn) < 1e-10
    per_layer = CF.per_layer_hessian_diagonal(model, mse, xr, yr)
    assert ref.rel_err(torch.cat(list(per_layer.values())), H_mse.diagonal()) < 1e-10


def test_functional_mean_reduction_bad_targets():
    model = mlp()
    x, y = data("classification")
    before = ref.model_state(model)
    with pytest.raises(TargetError, match="one-hot"):
        CF.empirical_fisher_diagonal(
            model, nn.CrossEntropyLoss(), x, nn.functional.one_hot(y, C).to(DT)
        )
    ref.assert_same_state(before, ref.model_state(model))


# -- the model object itself -----------------------------------------------------------
def test_refusal_leaves_object_usable():
    """After any refusal the same curvature object computes the right numbers."""
    for backend, curvature, what in JOBS:
        if curvature == "fisher":
            continue
        model = mlp()
        x, y = data("classification")
        curv = get_class(backend, curvature)(model, "classification")
        with pytest.raises(TargetError):
            (
                curv.kron(x, y + C)
                if what == "kron"
                else curv.gradients(x, y + C)
                if what == "gradients"
                else getattr(curv, what)(x, y + C)
            )
        out = compute(backend, curvature, what, copy.deepcopy(model), "classification", x, y)
        again = (
            curv.kron(x, y)[1].to_matrix()
            if what == "kron"
            else curv.gradients(x, y)[0]
            if what == "gradients"
            else getattr(curv, what)(x, y)[1]
        )
        assert ref.rel_err(again, out) < 1e-12, (backend, curvature, what)


# -- numerics (item 4): Kron.decompose guards, no nan_to_num / exit / global reseeding ------
def _spd(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=DT)
    return M @ M.T + 0.1 * torch.eye(n, dtype=DT)


def test_decompose_symmetrizes_in_float64(monkeypatch):
    from curvlib.kron import Kron

    seen = []
    eigh = torch.linalg.eigh

    def spy(A, *args, **kwargs):
        seen.append((A.dtype, bool(torch.equal(A, A.mT))))
        return eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    G = _spd(3, 0).float()
    G[0, 1] += 1e-3  # not symmetric
    KD = Kron([[G, _spd(2, 1).float()]]).decompose()
    assert seen == [(torch.float64, True), (torch.float64, True)]
    assert KD.eigenvalues[0][0].dtype == torch.float32  # the result in the factor's dtype


def test_decompose_clamps_within_band_and_raises_beyond():
    from curvlib.errors import DecompositionError
    from curvlib.kron import IndefiniteFactorError, Kron

    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=DT))
    n, eps = 4, torch.finfo(DT).eps
    inside = (Q * torch.tensor([3.0, 1.0, 0.5, -3.0 * n * eps])) @ Q.T  # -n·eps·|λ|max
    lam = Kron([[inside]]).decompose().eigenvalues[0][0]
    assert lam.min().item() == 0.0  # clamped
    beyond = (Q * torch.tensor([3.0, 1.0, 0.5, -1e-6])) @ Q.T
    with pytest.raises(IndefiniteFactorError, match=r"entry 1, factor of shape \(4, 4\)"):
        Kron([[torch.eye(2, dtype=DT)], [beyond]]).decompose()
    assert issubclass(IndefiniteFactorError, DecompositionError)
    assert issubclass(IndefiniteFactorError, ValueError)


def test_decompose_retries_then_raises(monkeypatch):
    from curvlib.errors import DecompositionError
    from curvlib.kron import Kron

    eigh = torch.linalg.eigh
    calls = []

    def flaky(A, *args, **kwargs):
        calls.append(A)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("did not converge")
        return eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    G = _spd(3, 3) * 1e3
    with pytest.warns(RuntimeWarning, match=r"entry 0, factor of shape \(3, 3\).*retrying"):
        KD = Kron([[G]]).decompose()
    assert calls[1].dtype == torch.float64 and calls[1].abs().max().item() == 1.0  # rescaled
    assert ref.rel_err(KD.to_matrix(), G) < 1e-12

    def broken(A, *args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(DecompositionError, match=r"entry 1, factor of shape \(3, 3\).*retry"),
    ):
        Kron([[torch.ones(2, dtype=DT)], [G]]).decompose()  # entry 0 diagonal: no eigh


def test_decompose_non_finite_factor_raises():
    from curvlib.errors import DecompositionError
    from curvlib.kron import Kron

    G = _spd(3, 4)
    G[1, 2] = float("inf")
    with pytest.raises(DecompositionError, match=r"entry 0.*\(3, 3\).*non-finite"):
        Kron([[G]]).decompose()


def test_no_nan_to_num_exit_or_global_reseeding_in_the_library():
    """The library never hides non-finite values, exits the process or reseeds the global
    RNG (MC pseudo-targets are drawn by curvlib's likelihood from the call's generator, for
    every backend). (``cli.py`` is the command-line program: its demo seeds by ``--seed``
    and exits with a status, as programs do.)"""
    import pathlib
    import re

    import curvlib

    root = pathlib.Path(curvlib.__file__).parent
    allowed_reseed: set[tuple[str, str]] = set()
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in ("cli.py", "benchmark.py"):
            continue
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"nan_to_num|\bexit\(|os\._exit|sys\.exit", code):
                problems.append(f"{rel}:{i}: {line.strip()}")
            m = re.search(r"(torch(\.random|\.cuda)?\.manual_seed(_all)?\(\w*\)|\.seed\(\))", code)
            if (
                m
                and "Generator" not in code
                and "generator" not in code
                and not code.strip().startswith("g.seed")
            ):
                if (rel, m.group(0)) not in allowed_reseed:
                    problems.append(f"{rel}:{i}: {line.strip()}")
    assert not problems, problems
