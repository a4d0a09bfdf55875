"""The laplace-torch adapter against the real laplace-torch 0.3 (no mocks), float64.

Every registered curvlib backend (``curvlib.backends.registry()``) is plugged into
``Laplace(...)`` through :func:`laplace_backend` and compared with laplace-torch's own
backend on the same model and data: posterior precision, log marginal likelihood, the
marglik-optimised prior precision and the GLM / NN predictives, for subset_of_weights in
all / last_layer / subnetwork, hessian_structure in diag / kron / full, classification and
regression, GGN and EF (laplace's EF scaling of regression included).
"""

from __future__ import annotations

import functools
import io
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace", reason="laplace-torch (the [laplace] extra) is absent")

import laplace.curvature as lc  # noqa: E402
from laplace import Laplace  # noqa: E402
from laplace.marglik_training import marglik_training  # noqa: E402
from laplace.utils.matrix import Kron as LaplaceKron  # noqa: E402

import curvlib  # noqa: E402
from curvlib.backends import register_backend, registry  # noqa: E402
from curvlib.integrations.laplace import (  # noqa: E402
    NAME_TRIGGERS,
    CurvlibLaplaceBackend,
    laplace_backend,
    to_laplace_kron,
)

BACKENDS = sorted(registry())
LIKELIHOODS = ("classification", "regression")
RTOL = 1e-5
N_DATA, D_IN, HIDDEN, C_OUT, BATCH = 20, 3, 4, 2, 7
PRIOR = 0.7
SIGMA = 1.3  # regression noise for the marginal likelihood

# laplace-torch's own backend per (curvature, structure), each measured to compute it in
# float64: laplace-torch 0.3's CurvlinopsGGN/EF `full` multiply by a float32 identity
# (errors ~1e-8), its CurvlinopsEF diag is all zeros for last-layer Laplace and its AsdlEF
# full fails.
REFERENCE = {
    ("ggn", "full"): "BackPackGGN",
    ("ggn", "diag"): "CurvlinopsGGN",
    ("ggn", "kron"): "CurvlinopsGGN",
    ("ef", "full"): "BackPackEF",
    ("ef", "diag"): "AsdlEF",
    ("ef", "kron"): "CurvlinopsEF",
}
SUBNET = torch.LongTensor([0, 3, 5, 9, 13, 20, 22, 25])


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C_OUT)).double()


def _data(likelihood: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N_DATA, D_IN, generator=g, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(0, C_OUT, (N_DATA,), generator=g)
    else:
        y = torch.randn(N_DATA, C_OUT, generator=g, dtype=torch.float64)
    return X, y


def _loader(likelihood: str) -> DataLoader:
    return DataLoader(TensorDataset(*_data(likelihood)), batch_size=BATCH)


def _laplace(likelihood, subset, structure, backend, prior=PRIOR, **kwargs):
    extra = {"subnetwork_indices": SUBNET.clone()} if subset == "subnetwork" else {}
    if likelihood == "regression":
        extra["sigma_noise"] = SIGMA
    la = Laplace(
        _model(),
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=backend,
        prior_precision=prior,
        **extra,
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(_loader(likelihood))
    return la


def _precision(la, structure) -> torch.Tensor:
    P = la.posterior_precision
    return P.to_matrix() if structure == "kron" else P


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _summary(la, structure: str, likelihood: str) -> dict[str, list[torch.Tensor]]:
    """Everything compared: precision, marglik, predictives, marglik-optimised prior."""
    X = _data(likelihood, seed=5)[0][:6]
    out = {
        "precision": [_precision(la, structure).detach().clone()],
        "log_marglik": [la.log_marginal_likelihood().detach().clone()],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["glm"] = [t.detach() for t in _flat(la(X, pred_type="glm"))]
        gen = torch.Generator().manual_seed(3)
        nn_pred = la(X, pred_type="nn", link_approx="mc", n_samples=8, generator=gen)
        out["nn"] = [t.detach() for t in _flat(nn_pred)]
        la.optimize_prior_precision(method="marglik", n_steps=15)
    out["marglik_prior"] = [torch.as_tensor(la.prior_precision).detach().clone()]
    out["log_marglik_opt"] = [la.log_marginal_likelihood().detach().clone()]
    return out


@functools.cache
def _reference(likelihood: str, subset: str, structure: str, curvature: str):
    backend = getattr(lc, REFERENCE[(curvature, structure)])
    return _summary(_laplace(likelihood, subset, structure, backend), structure, likelihood)


def _assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert len(got[key]) == len(want[key]), key
        for a, b in zip(got[key], want[key], strict=True):
            assert a.shape == b.shape, key
            scale = b.abs().max().clamp_min(1e-12)
            err = float((a - b).abs().max() / scale)
            assert err < RTOL, f"{key}: relative error {err:.2e}"


def _require_supported(backend: str, curvature: str, structure: str) -> None:
    """Every registered backend offers these structures; a new one that does not fails here."""
    assert _supported(backend, curvature, structure), f"{backend}:{curvature} has no {structure}"


def _supported(backend: str, curvature: str, structure: str) -> bool:
    """Unsupported combinations are not generated (they are checked in test_unsupported)."""
    return structure in curvlib.backend_class(backend, curvature).structures


COMBOS = [
    (subset, structure)
    for subset in ("all", "last_layer", "subnetwork")
    for structure in ("diag", "kron", "full")
    if not (subset == "subnetwork" and structure == "kron")  # laplace-torch has none
]


# --------------------------------------------------------------------------------------
# parity with laplace-torch's own backends
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backend, subset, structure, curvature",
    [
        (b, subset, structure, c)
        for b in BACKENDS
        for subset, structure in COMBOS
        for c in ("ggn", "ef")
        if _supported(b, c, structure)
    ],
)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_parity(backend, likelihood, subset, structure, curvature):
    la = _laplace(likelihood, subset, structure, laplace_backend(backend, curvature))
    assert isinstance(la.backend, CurvlibLaplaceBackend)
    _assert_close(
        _summary(la, structure, likelihood), _reference(likelihood, subset, structure, curvature)
    )


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if _supported(b, "hessian", "full")])
def test_parity_hessian(backend, likelihood, subset):
    # the Hessian is indefinite: a prior large enough for a definite posterior precision
    # (else laplace-torch's log det is nan and its predictive's Cholesky fails)
    got = _laplace(likelihood, subset, "full", laplace_backend(backend, "hessian"), prior=20.0)
    want = _laplace(likelihood, subset, "full", lc.CurvlinopsHessian, prior=20.0)
    assert torch.isfinite(want.log_marginal_likelihood())
    _assert_close(
        {"P": [got.posterior_precision], "lml": [got.log_marginal_likelihood()]},
        {"P": [want.posterior_precision], "lml": [want.log_marginal_likelihood()]},
    )


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if _supported(b, "hessian", "diag")])
def test_parity_hessian_diag(backend, likelihood):
    """laplace-torch has no diagonal-Hessian backend: compare with the diagonal of its full."""
    got = _laplace(likelihood, "all", "diag", laplace_backend(backend, "hessian"), prior=20.0)
    want = _laplace(likelihood, "all", "full", lc.CurvlinopsHessian, prior=20.0)
    _assert_close({"P": [got.posterior_precision]}, {"P": [want.posterior_precision.diagonal()]})


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_damping_factors_match(backend, likelihood):
    """The individual Kronecker factors are laplace's (they matter with damping=True)."""
    for curvature in ("ggn", "ef"):
        _require_supported(backend, curvature, "kron")
        ref_cls = getattr(lc, REFERENCE[(curvature, "kron")])
        got = _laplace(likelihood, "all", "kron", laplace_backend(backend, curvature), damping=True)
        want = _laplace(likelihood, "all", "kron", ref_cls, damping=True)
        for Fg, Fw in zip(got.H_facs.kfacs, want.H_facs.kfacs, strict=True):
            for a, b in zip(Fg, Fw, strict=True):
                torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12)
        _assert_close(
            {"P": [_precision(got, "kron")], "lml": [got.log_marginal_likelihood()]},
            {"P": [_precision(want, "kron")], "lml": [want.log_marginal_likelihood()]},
        )


MARGLIK = [
    ("regression", "kron", "ggn"),
    ("classification", "diag", "ggn"),
    ("classification", "kron", "ef"),
]


@functools.cache
def _marglik_run(backend, likelihood: str, structure: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la, model, margliks, losses = marglik_training(
            _model(),
            _loader(likelihood),
            likelihood=likelihood,
            hessian_structure=structure,
            backend=backend,
            n_epochs=3,
            n_hypersteps=3,
        )
    X = _data(likelihood, seed=5)[0][:6]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = _flat(la(X, pred_type="glm"))
    return {
        "margliks": [torch.tensor(margliks)],
        "losses": [torch.tensor(losses)],
        "prior": [torch.as_tensor(la.prior_precision).detach()],
        "params": [torch.nn.utils.parameters_to_vector(model.parameters()).detach()],
        "glm": [t.detach() for t in pred],
    }


@pytest.mark.parametrize("likelihood, structure, curvature", MARGLIK)
@pytest.mark.parametrize("backend", BACKENDS)
def test_marglik_training(backend, likelihood, structure, curvature):
    """marglik_training passes no backend kwargs: the class alone must do. Margliks, losses,
    the learnt prior, the trained weights and the predictive equal laplace's own backend's."""
    _require_supported(backend, curvature, structure)
    ref = getattr(lc, REFERENCE[(curvature, structure)])
    _assert_close(
        _marglik_run(laplace_backend(backend, curvature), likelihood, structure),
        _marglik_run(ref, likelihood, structure),
    )


# --------------------------------------------------------------------------------------
# what laplace-torch needs of a backend class
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_class_contract(backend):
    for curvature in registry()[backend]:
        B = laplace_backend(backend, curvature)
        assert isinstance(B, type) and issubclass(B, lc.CurvatureInterface)
        assert not any(t in B.__name__.lower() for t in NAME_TRIGGERS), B.__name__
        # not laplace's BackPACK/ASDL interfaces: laplace would then refuse frozen params,
        # skip torch.func JVPs (ELLA) or reroute Jacobians
        for base in ("BackPackInterface", "AsdlInterface", "CurvlinopsInterface"):
            assert not issubclass(B, getattr(lc, base))
        is_subnet_capable = issubclass(B, (lc.GGNInterface, lc.EFInterface))
        assert is_subnet_capable == (curvature != "hessian")
        assert B is laplace_backend(backend, curvature)  # same arguments, same class
        assert backend in B.__qualname__
        assert B.curvlib_class is curvlib.backend_class(backend, curvature)


def test_options_baked_and_overridden():
    B = laplace_backend("autograd", "fisher", num_samples=3)
    assert B is not laplace_backend("autograd", "fisher")
    assert "num_samples=3" in B.__qualname__
    b = B(_model(), "classification")
    assert b.stochastic and b.num_samples == 3 and b.curvlib.num_samples == 3
    b = B(_model(), "classification", num_samples=5)  # Laplace's backend_kwargs win
    assert b.num_samples == 5
    la = Laplace(
        _model(), "classification", subset_of_weights="all", hessian_structure="diag", backend=B
    )
    assert la.backend.num_samples == 3


def test_option_errors():
    with pytest.raises(TypeError, match="does not accept"):
        laplace_backend("autograd", "ggn", not_an_option=1)
    with pytest.raises(TypeError, match="set by laplace-torch"):
        laplace_backend("autograd", "ggn", last_layer=True)
    with pytest.raises(ValueError, match="known backends"):
        laplace_backend("no-such-backend", "ggn")
    with pytest.raises(ValueError, match="known curvatures"):
        laplace_backend("autograd", "no-such-curvature")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_returns_fresh_laplace_kron(backend):
    _require_supported(backend, "ggn", "kron")
    X, y = _data("classification")
    b = laplace_backend(backend, "ggn")(_model(), "classification")
    _, K1 = b.kron(X[:BATCH], y[:BATCH], N=N_DATA)
    assert type(K1) is LaplaceKron
    assert all(isinstance(F, list) for F in K1.kfacs)
    ptrs = [F.data_ptr() for entry in K1.kfacs for F in entry]
    assert len(set(ptrs)) == len(ptrs)  # no factor shared between entries
    before = [[F.clone() for F in entry] for entry in K1.kfacs]
    for entry in K1.kfacs:  # laplace-torch rescales in place
        for F in entry:
            F.mul_(7.0)
    _, K2 = b.kron(X[:BATCH], y[:BATCH], N=N_DATA)
    for e2, eb in zip(K2.kfacs, before, strict=True):
        for a, c in zip(e2, eb, strict=True):
            torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_N_normalisation(backend):
    """Summing batch results with N = data-set size gives the full-batch K-FAC."""
    _require_supported(backend, "ggn", "kron")
    X, y = _data("regression")
    b = laplace_backend(backend, "ggn")(_model(), "regression")
    _, full = b.kron(X, y, N=N_DATA)
    parts = [b.kron(X[i : i + BATCH], y[i : i + BATCH], N=N_DATA)[1] for i in (0, 7, 14)]
    total = parts[0] + parts[1] + parts[2]
    for Ft, Ff in zip(total.kfacs, full.kfacs, strict=True):
        for a, c in zip(Ft, Ff, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_N_below_batch_size(backend, likelihood, N):
    """laplace's backends accept N below the batch size (its tests use N=1 on a batch of
    10): A = (1/N) sum over the batch. The adapter gives laplace's factors, and N times
    the result is the batch's K-FAC with N = B scaled by B on A."""
    _require_supported(backend, "ggn", "kron")
    X, y = _data(likelihood)
    X, y = X[:BATCH], y[:BATCH]
    b = laplace_backend(backend, "ggn")(_model(), likelihood)
    loss, K = b.kron(X, y, N=N)
    loss_l, K_l = lc.CurvlinopsGGN(_model(), likelihood).kron(X, y, N=N)
    torch.testing.assert_close(loss, loss_l)
    for Fg, Fw in zip(K.kfacs, K_l.kfacs, strict=True):
        for a, c in zip(Fg, Fw, strict=True):
            torch.testing.assert_close(a, c, rtol=RTOL, atol=1e-12)
    _, K_B = b.kron(X, y, N=BATCH)
    for Fn, Fb in zip(K.kfacs, K_B.kfacs, strict=True):
        torch.testing.assert_close(Fn[0], Fb[0], rtol=1e-12, atol=0)
        if len(Fn) == 2:
            torch.testing.assert_close(Fn[1], Fb[1] * (BATCH / N), rtol=1e-12, atol=0)


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ef_scaling(backend, likelihood, structure):
    """laplace's EF = curvlib's EF / factor (twice curvlib's for regression); GGN unchanged."""
    X, y = _data(likelihood)
    for curvature, scale in (("ef", 2.0 if likelihood == "regression" else 1.0), ("ggn", 1.0)):
        _require_supported(backend, curvature, structure)
        cls = curvlib.backend_class(backend, curvature)
        loss_c, H_c = getattr(cls(_model(), likelihood), structure)(X, y)
        b = laplace_backend(backend, curvature)(_model(), likelihood)
        loss_l, H_l = getattr(b, structure)(X, y, N=N_DATA)
        torch.testing.assert_close(loss_l, loss_c)
        torch.testing.assert_close(H_l, scale * H_c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fisher_passes_through(backend):
    """MC Fisher: same samples (global RNG) as curvlib's own class; laplace's scaling."""
    _require_supported(backend, "fisher", "full")
    X, y = _data("regression")
    torch.manual_seed(11)
    _, H_c = curvlib.backend_class(backend, "fisher")(_model(), "regression").full(X, y)
    torch.manual_seed(11)
    _, H_l = laplace_backend(backend, "fisher")(_model(), "regression").full(X, y, N=N_DATA)
    torch.testing.assert_close(H_l, H_c, rtol=1e-12, atol=1e-12)
    la = _laplace("classification", "all", "full", laplace_backend(backend, "fisher"))
    assert torch.isfinite(la.log_marginal_likelihood())


@pytest.mark.parametrize("backend", BACKENDS)
def test_subnetwork_indices_read_at_call_time(backend):
    _require_supported(backend, "ggn", "diag")
    X, y = _data("classification")
    b = laplace_backend(backend, "ggn")(_model(), "classification")
    _, h_all = b.diag(X, y)
    b.subnetwork_indices = SUBNET  # what SubnetLaplace does after construction
    assert b.curvlib.subnetwork_indices is SUBNET
    _, h_sub = b.diag(X, y)
    torch.testing.assert_close(h_sub, h_all[SUBNET])
    Js, _ = b.jacobians(X)
    assert Js.shape == (N_DATA, C_OUT, len(SUBNET))


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacobians_unbound_and_selected(backend):
    """ELLA/VaLLA call laplace's CurvatureInterface.jacobians unbound and
    selected_output_jacobians; both must work and agree with the backend's own."""
    X, _ = _data("classification")
    b = laplace_backend(backend, "ggn")(_model(), "classification")
    Js, f = b.jacobians(X)
    Js_l, f_l = lc.CurvatureInterface.jacobians(b, X)
    torch.testing.assert_close(Js, Js_l)
    torch.testing.assert_close(f, f_l)
    outputs = torch.arange(N_DATA) % C_OUT
    S, f_s = b.selected_output_jacobians(X, outputs)
    torch.testing.assert_close(S[:, 0], Js[torch.arange(N_DATA), outputs])
    torch.testing.assert_close(f_s, f)
    with pytest.raises(ValueError, match="outputs must have shape"):
        b.selected_output_jacobians(X, outputs[:3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported(backend):
    """A structure the curvlib class lacks raises NotImplementedError from Laplace.fit."""
    for curvature in registry()[backend]:
        cls = curvlib.backend_class(backend, curvature)
        for structure in ("diag", "kron", "full"):
            if structure in cls.structures:
                continue
            with pytest.raises(NotImplementedError, match=structure):
                _laplace("classification", "all", structure, laplace_backend(backend, curvature))


def test_subnet_laplace_refuses_hessian():
    with pytest.raises(ValueError, match="GGN and EF"):
        Laplace(
            _model(),
            "classification",
            subset_of_weights="subnetwork",
            hessian_structure="full",
            subnetwork_indices=SUBNET.clone(),
            backend=laplace_backend("autograd", "hessian"),
        )


def test_user_registered_backend_is_picked_up():
    """A backend registered later gets an adapter too (names stay trigger-free)."""

    class BackpackAsdlGGN(curvlib.AutogradGGN):  # a name full of triggers
        backend_name = "my-asdl-backpack"

    register_backend("my-asdl-backpack", "ggn", BackpackAsdlGGN)
    try:
        B = laplace_backend("my-asdl-backpack", "ggn")
        assert not any(t in B.__name__.lower() for t in NAME_TRIGGERS)
        la = _laplace("classification", "all", "diag", B)
        _assert_close(
            {"P": [la.posterior_precision]},
            {"P": [_reference("classification", "all", "diag", "ggn")["precision"][0]]},
        )
    finally:
        from curvlib.backends import _REGISTRY

        _REGISTRY.pop("my-asdl-backpack", None)


def test_to_laplace_kron_densifies_diagonal_factors():
    G, a = torch.rand(2, 2, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    K = to_laplace_kron(curvlib.Kron([[G, a], [a]]))
    assert type(K) is LaplaceKron
    torch.testing.assert_close(K.kfacs[0][1], torch.diag(a))
    assert K.kfacs[0][0] is not G and K.kfacs[0][0].data_ptr() != G.data_ptr()
    with pytest.raises(TypeError, match="curvlib.Kron"):
        to_laplace_kron(K)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ella_valla(backend):
    """ELLA and VaLLA (which call laplace's Jacobians unbound) give laplace's predictive."""
    from laplace.baselaplace import ELLA, VaLLA

    X, _ = _data("classification")
    preds = []
    for B in (lc.CurvlinopsGGN, laplace_backend(backend, "ggn")):
        ella = ELLA(_model(), "classification", subsample_size=10, n_eigenvalues=5, backend=B)
        valla = VaLLA(_model(), "classification", inducing_locations=X[:5], backend=B)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ella.fit(_loader("classification"))
            valla.fit(_loader("classification"), iterations=3)
            preds.append([ella(X[:4]), valla(X[:4])])
    for a, b in zip(*preds, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12)


class _DictModel(nn.Module):
    """A HuggingFace-style model taking a dict with the input under ``input_ids``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _model()

    def forward(self, batch: dict) -> torch.Tensor:
        return self.net(batch["input_ids"])


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dict_inputs(backend, structure):
    """Dict inputs reach the curvlib backend (no "backpack" in the class name, so laplace
    does not refuse them up front): laplace's numbers of the plain-tensor model, or the
    backend's own CapabilityError where its capability row has ``dict_inputs=False``."""
    _require_supported(backend, "ggn", structure)
    X, y = _data("classification")
    records = [{"input_ids": X[i], "labels": y[i]} for i in range(N_DATA)]
    loader = DataLoader(records, batch_size=BATCH)
    la = Laplace(
        _DictModel(),
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        backend=laplace_backend(backend, "ggn"),
        prior_precision=PRIOR,
    )
    if not curvlib.backend_class(backend, "ggn").capability_row()[structure].dict_inputs:
        with pytest.raises(curvlib.CapabilityError, match="dict inputs"):
            la.fit(loader)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(loader)
    want = _reference("classification", "all", structure, "ggn")
    _assert_close(
        {"P": [_precision(la, structure)], "lml": [la.log_marginal_likelihood()]},
        {"P": want["precision"], "lml": want["log_marglik"]},
    )


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_parameters(backend, structure):
    """laplace refuses frozen parameters only for its BackPackInterface/AsdfghjklInterface
    subclasses; the adapter is neither, and curvlib's backends handle them.

    laplace-torch's own kron backends fail on a frozen weight (CurvlinopsGGN: KeyError,
    AsdlGGN: shape error); K-FAC is block-diagonal per parameter tensor, so the reference
    there is the trainable block of the unfrozen model's posterior precision.
    """
    _require_supported(backend, "ggn", structure)

    def fit(B, freeze: bool):
        model = _model()
        model[0].weight.requires_grad_(not freeze)
        la = Laplace(
            model,
            "classification",
            subset_of_weights="all",
            hessian_structure=structure,
            backend=B,
            prior_precision=PRIOR,
        )
        la.fit(_loader("classification"))
        return la

    got = fit(laplace_backend(backend, "ggn"), freeze=True)
    if structure == "kron":
        n_frozen = D_IN * HIDDEN
        want = {
            "P": [_precision(fit(lc.CurvlinopsGGN, freeze=False), "kron")[n_frozen:, n_frozen:]]
        }
        _assert_close({"P": [_precision(got, "kron")]}, want)
        return
    la = fit(lc.CurvlinopsGGN, freeze=True)
    _assert_close(
        {"P": [_precision(got, structure)], "lml": [got.log_marginal_likelihood()]},
        {"P": [_precision(la, structure)], "lml": [la.log_marginal_likelihood()]},
    )


# --------------------------------------------------------------------------------------
# differentiable predictives (enable_backprop), serialization
# --------------------------------------------------------------------------------------
def _input_gradients(la, likelihood: str) -> dict[str, list[torch.Tensor]]:
    """GLM predictives at inputs that require grad, and their gradients w.r.t. the inputs."""
    X = _data(likelihood, seed=5)[0][:6].clone().requires_grad_(True)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if likelihood == "regression":
            preds = {"glm": la(X, pred_type="glm"), "joint": la(X, pred_type="glm", joint=True)}
        else:
            preds = {"probit": (la(X, pred_type="glm", link_approx="probit"),)}
    for name, ts in preds.items():
        grads = [torch.autograd.grad(t.square().sum(), X, retain_graph=True)[0] for t in ts]
        assert all(bool(g.abs().sum() > 0) for g in grads), name  # the graph reaches X
        out[name] = [t.detach() for t in ts] + grads
    return out


@functools.cache
def _backprop_reference(likelihood: str, subset: str, structure: str):
    la = _laplace(likelihood, subset, structure, lc.CurvlinopsGGN, enable_backprop=True)
    return _input_gradients(la, likelihood)


@pytest.mark.parametrize(
    "backend, subset, structure",
    [
        (b, s, st)
        for b in BACKENDS
        for s, st in COMBOS
        if s != "subnetwork" and _supported(b, "ggn", st)  # SubnetLaplace has no backprop
    ],
)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_backprop_input_gradient(backend, likelihood, subset, structure):
    """With enable_backprop=True the GLM predictive (last-layer and all weights; diagonal,
    joint and probit) is differentiable w.r.t. the input, and predictive and
    input gradient equal laplace's own backend's. ASDL's Jacobians are not differentiable:
    the adapter answers with curvlib's torch.func Jacobians there (also for the last layer).
    """
    la = _laplace(
        likelihood, subset, structure, laplace_backend(backend, "ggn"), enable_backprop=True
    )
    _assert_close(
        _input_gradients(la, likelihood), _backprop_reference(likelihood, subset, structure)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_layer_jacobians_backprop(backend):
    """last_layer_jacobians(x, enable_backprop) against the dense Jacobian of the last layer
    (torch.autograd.functional.jacobian), and its input gradient against laplace's own."""
    from laplace.utils import FeatureExtractor

    X = _data("classification")[0][:5]
    model = FeatureExtractor(_model(), last_layer_name="2", enable_backprop=True)
    b = laplace_backend(backend, "ggn")(model, "classification", last_layer=True)
    ref = lc.CurvlinopsGGN(model, "classification", last_layer=True)
    Js, f = b.last_layer_jacobians(X)
    W, c = model.last_layer.weight, model.last_layer.bias
    phi = model.forward_with_features(X)[1].detach()

    def last(w, bias):
        return phi @ w.T + bias

    dW, dc = torch.autograd.functional.jacobian(last, (W.detach(), c.detach()))
    want = torch.cat([dW.flatten(2), dc], dim=2)  # (B, C, P): f_n depends on phi_n only
    torch.testing.assert_close(Js, want, rtol=1e-12, atol=1e-12)
    assert not Js.requires_grad
    Xg = X.clone().requires_grad_(True)
    Js_b, f_b = b.last_layer_jacobians(Xg, enable_backprop=True)
    Xr = X.clone().requires_grad_(True)
    Js_r, f_r = ref.last_layer_jacobians(Xr, enable_backprop=True)
    g_b = torch.autograd.grad(Js_b.square().sum() + f_b.sum(), Xg)[0]
    g_r = torch.autograd.grad(Js_r.square().sum() + f_r.sum(), Xr)[0]
    torch.testing.assert_close(Js_b, Js_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_b, g_r, rtol=1e-10, atol=1e-12)


def _restored(state: dict, subset: str, structure: str, backend) -> object:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    extra = {"subnetwork_indices": SUBNET.clone()} if subset == "subnetwork" else {}
    la = Laplace(
        _model(),
        "regression",
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=backend,
        sigma_noise=SIGMA,
        prior_precision=PRIOR,
        **extra,
    )
    # laplace's Kron is a Python object: torch.load needs weights_only=False for it
    la.load_state_dict(torch.load(buf, weights_only=False))
    return la


def _fitted_numbers(la, structure: str) -> dict[str, list[torch.Tensor]]:
    X = _data("regression", seed=5)[0][:6]
    f_mu, f_var = la(X, pred_type="glm")
    return {
        "precision": [_precision(la, structure).detach()],
        "log_marglik": [la.log_marginal_likelihood().detach()],
        "glm": [f_mu.detach(), f_var.detach()],
    }


@pytest.mark.parametrize("subset, structure", COMBOS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip(backend, subset, structure):
    """A Laplace fitted with the adapter, saved and restored (with the adapter or with
    laplace's own backend), gives the same posterior, marginal likelihood and predictive;
    and a state dict of laplace's own backend restores into the adapter's Laplace."""
    _require_supported(backend, "ggn", structure)
    B = laplace_backend(backend, "ggn")
    ref_cls = getattr(lc, REFERENCE[("ggn", structure)])
    la = _laplace("regression", subset, structure, B)
    want = _fitted_numbers(la, structure)
    for target in (B, ref_cls):
        _assert_close(
            _fitted_numbers(_restored(la.state_dict(), subset, structure, target), structure), want
        )
    own = _laplace("regression", subset, structure, ref_cls)
    _assert_close(
        _fitted_numbers(_restored(own.state_dict(), subset, structure, B), structure),
        _fitted_numbers(own, structure),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_ella_checkpoint(backend):
    """ELLA's checkpoint records the backend class (curvlib's qualname names the backend):
    it restores into the same adapter with the same predictive, and laplace refuses it for
    another backend."""
    from laplace.baselaplace import ELLA

    X, _ = _data("classification")
    B = laplace_backend(backend, "ggn")

    def ella(backend_cls):
        return ELLA(
            _model(), "classification", subsample_size=10, n_eigenvalues=5, backend=backend_cls
        )

    la = ella(B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(_loader("classification"))
    state = la.state_dict()
    assert backend in state["backend_class"]
    la2 = ella(B)
    la2.load_state_dict(state)
    torch.testing.assert_close(la2(X[:4]), la(X[:4]), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="backend_class"):
        ella(lc.CurvlinopsGGN).load_state_dict(state)
