"""Real clients: torchvision ResNets and ViT, HuggingFace BERT and GPT-2, GPT-2 with peft LoRA.

Tiny random-init models from configs (nothing is downloaded; ``tests/zoo.py``), float64,
against the brute-force references of ``tests/zoo_reference.py``: every backend that claims a
structure (does not refuse it with a curvlib error before any work) returns it to 1e-10;
``kron`` covers every trainable parameter, with the K-FAC definition where the layer has one
and the exact block elsewhere; and laplace-torch runs end to end on dict batches (its LLM
example's wrapper) with curvlib's backends, matching laplace-torch's own backend wherever
that one works.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import zoo  # noqa: E402
import zoo_reference as R  # noqa: E402
from torch import nn  # noqa: E402

import curvlib  # noqa: E402
from curvlib.errors import CapabilityError, UnsupportedModuleError  # noqa: E402
from curvlib.kfac import coverage  # noqa: E402

TOL = 1e-10
BACKENDS = ("autograd", "auto", "backpack", "asdl")
TINY = ("tiny_resnet_cls", "vit_cls", "bert_cls", "gpt2_cls", "gpt2_lora_cls")


def _case(name: str):
    case = zoo.get(name)
    if not case.available():
        pytest.skip(f"{name} needs {case.requires}")
    model, x, y = case.make()
    return case, model, x, y


_REFS: dict[str, dict] = {}


def _refs(name: str) -> dict:
    """Brute-force GGN, EF (dense) and their diagonals of a tiny case (cached)."""
    if name not in _REFS:
        case, model, x, y = _case(name)
        ref = case.ref_model(model)
        J, f = R.jacobians(ref, x)
        L = R.output_hessians(f, y, case.likelihood)
        G = R.per_sample_grads(ref, x, y, case.likelihood)
        _REFS[name] = {
            "ggn": torch.einsum("nkp,nkj,njq->pq", J, L, J),
            "ef": G.T @ G,
            "J": J,
            "G": G,
            "loss": R.total_loss(ref, x, y, case.likelihood),
        }
    return _REFS[name]


def _claimed(fn):
    """``fn()``, or ``None`` where the backend refuses by name before any work."""
    try:
        return fn()
    except (CapabilityError, UnsupportedModuleError):  # incl. SharedParameterError
        return None


# ------------------------------------------------------------------------ dense, diagonal
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TINY)
def test_full_diag_jacobians_match_brute_force(name, backend):
    """GGN and EF ``full``/``diag``, Jacobians and per-sample gradients: every backend that
    claims them matches the float64 references; autograd claims them all."""
    case, model, x, y = _case(name)
    ref = _refs(name)
    claimed = 0
    for curvature in ("ggn", "ef"):
        curv = curvlib.backend_class(backend, curvature)(model, case.likelihood)
        out = _claimed(lambda curv=curv: curv.full(x, y))
        if out is not None:
            claimed += 1
            assert R.rel_err(out[1], ref[curvature]) < TOL
            assert R.rel_err(out[0], ref["loss"]) < TOL
        out = _claimed(lambda curv=curv: curv.diag(x, y))
        if out is not None:
            claimed += 1
            assert R.rel_err(out[1], torch.diagonal(ref[curvature])) < TOL
    curv = curvlib.backend_class(backend, "ggn")(model, case.likelihood)
    out = _claimed(lambda: curv.jacobians(x))
    if out is not None:
        claimed += 1
        assert R.rel_err(out[0].reshape(ref["J"].shape), ref["J"]) < TOL
    out = _claimed(lambda: curv.gradients(x, y))
    if out is not None:
        claimed += 1
        assert R.rel_err(out[0] * curv.factor, ref["G"]) < TOL
    if backend in ("autograd", "auto"):
        assert claimed == 6


# ------------------------------------------------------------------------------- K-FAC
def _entry_blocks(K, model) -> list[torch.Tensor]:
    D = K.to_matrix()
    return [D[sl, sl] for sl in R.param_index(model).values()]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", TINY)
def test_kron_definition_and_exact_blocks(name, approx):
    """``kron`` (autograd; ASDL where it claims it): one entry per trainable parameter, the
    K-FAC definition of its layer (Linear, Conv, HF Conv1D, Embedding incl. position
    embeddings shared by the batch, MultiheadAttention's projections) or, for the others
    (normalization layers, bare parameters), the exact block."""
    case, model, x, y = _case(name)
    ref_model = case.ref_model(model)
    N = 7
    for curvature in ("ggn", "ef"):
        want = R.kron_blocks(ref_model, x, y, case.likelihood, curvature, approx, N)
        for backend in ("autograd", "asdl"):
            curv = curvlib.backend_class(backend, curvature)(model, case.likelihood)
            out = _claimed(lambda curv=curv: curv.kron(x, y, N=N, kfac_approx=approx))
            if out is None:
                assert backend != "autograd"
                continue
            loss, K = out
            assert len(K.kfacs) == len(want)
            # relative to the block, or to the largest block where a block vanishes up to
            # round-off (reduce: the keys' cotangents sum to zero over the positions)
            scale = max(float(b.norm()) for _, b, _ in want)
            for got, (pname, block, kind) in zip(_entry_blocks(K, ref_model), want, strict=True):
                err = float((got - block).norm())
                assert err <= TOL * max(float(block.norm()), 1e-6 * scale), (pname, kind)


@pytest.mark.parametrize("backend", ["autograd", "auto"])
@pytest.mark.parametrize("name", [*TINY, "resnet18_cls"])
def test_kron_covers_every_trainable_parameter(name, backend):
    """Every trainable parameter has an entry of its size; only bare parameters (ViT's class
    token and position embedding) lack a layer rule, and they get exact blocks."""
    case, model, x, y = _case(name)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    cov = coverage(model, [p for _, p in params])
    generic = [n for (n, _), c in zip(params, cov.claims, strict=True) if c is None]
    assert generic == (["class_token", "encoder.pos_embedding"] if name == "vit_cls" else [])
    loss, K = curvlib.backend_class(backend, "ggn")(model, case.likelihood).kron(x, y, N=len(y))
    assert len(K.kfacs) == len(params)
    for (n, p), size in zip(params, K.block_sizes, strict=True):
        assert size == p.numel(), n
    if name == "resnet18_cls":
        kinds = {type(c.rule).__name__ for c in cov.claims}
        assert kinds == {"ConvRule", "NormRule", "LinearRule"}


def test_attention_out_proj_is_never_counted_as_unused():
    """MultiheadAttention's out_proj runs inside the attention function, never as a module:
    its entries are the attention rule's, not the zero entries of a module that never ran."""
    case, model, x, y = _case("vit_cls")
    loss, K = curvlib.AutogradGGN(model, "classification").kron(x, y, N=len(y))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, F in zip(names, K.kfacs, strict=True):
        if "out_proj" in n:
            assert all(bool(f.abs().sum() > 0) for f in F), n


def test_asdl_kron_delegates_bare_parameters():
    case, model, x, y = _case("vit_cls")
    loss, K = curvlib.AsdlGGN(model, "classification").kron(x, y, N=len(y))
    assert len(K.kfacs) == len([p for p in model.parameters() if p.requires_grad])


# -------------------------------------------------------------------- torchvision resnet18
def test_resnet18_diag_against_jacobian_rows():
    """The GGN diagonal of the real resnet18 (11M parameters, 16x16 inputs) against the sum
    of squares of the rows of Λ^{1/2} J, one backward pass per row."""
    case, model, x, y = _case("resnet18_cls")
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        f = model(x)
    p = torch.softmax(f.detach(), -1)
    want = torch.zeros(sum(q.numel() for q in params), dtype=torch.float64)
    for n in range(f.shape[0]):
        lam = torch.diag(p[n]) - torch.outer(p[n], p[n])
        evals, evecs = torch.linalg.eigh(lam)
        S = evecs * evals.clamp_min(0).sqrt()  # Λ = S Sᵀ
        for k in range(S.shape[1]):
            g = torch.autograd.grad(f[n] @ S[:, k], params, retain_graph=True)
            want += torch.cat([gi.reshape(-1) for gi in g]).square()
    loss, h = curvlib.AutogradGGN(model, "classification").diag(x, y)
    assert R.rel_err(h, want) < TOL


# ----------------------------------------------------------------- laplace-torch, end to end
def _loader(x: dict, y: torch.Tensor, batch: int = 2):
    from torch.utils.data import DataLoader

    records = [{**{k: v[i] for k, v in x.items()}, "labels": y[i]} for i in range(len(y))]
    return DataLoader(records, batch_size=batch)


def _fit(model, loader, structure: str, backend):
    from laplace import Laplace

    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        backend=backend,
        prior_precision=0.5,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(loader, progress_bar=False)
    return la


@pytest.mark.parametrize("structure", ["kron", "diag"])
@pytest.mark.parametrize("name", ["gpt2_lora_cls", "bert_cls"])
def test_laplace_end_to_end_on_dict_batches(name, structure):
    """laplace-torch's LLM example: a wrapper taking the dict batch, fitted over a DataLoader
    of dicts with curvlib's backend; the posterior precision is the brute-force one (the GGN
    diagonal, or the K-FAC definition per parameter) plus the prior, laplace-torch's own
    backends give the same numbers where they work, and the GLM predictive is a probability
    vector per input that equals the one from laplace-torch's backend."""
    pytest.importorskip("laplace")
    from laplace.curvature import CurvlinopsGGN

    from curvlib.integrations.laplace import laplace_backend

    case, model, x, y = _case(name)
    loader = _loader(x, y)
    la = _fit(model, loader, structure, laplace_backend("autograd", "ggn"))
    N = len(y)
    if structure == "diag":
        want = torch.diagonal(_refs(name)["ggn"]) + 0.5
        got = la.posterior_precision
    else:
        blocks = R.kron_blocks(model, x, y, "classification", N=N)
        want = torch.block_diag(*[b for _, b, _ in blocks]) + 0.5 * torch.eye(la.n_params)
        got = la.posterior_precision.to_matrix()
    assert R.rel_err(got, want) < TOL
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = la(x, pred_type="glm", link_approx="probit")
    assert pred.shape == (N, 3) and torch.allclose(pred.sum(-1), torch.ones(N, dtype=pred.dtype))
    # laplace-torch's own backends: CurvlinopsGGN where it runs (its K-FAC lacks rules for
    # LayerNorm and Embedding: BERT's kron). Its AsdlGGN runs but treats every position of
    # a sequence as a data point (diag), and leaves K-FAC's A unnormalized by the number of
    # positions (kron), so it is not a reference for these models
    try:
        other = _fit(case.make()[0], loader, structure, CurvlinopsGGN)
    except NotImplementedError:
        assert (name, structure) == ("bert_cls", "kron")
        return
    P_other = other.posterior_precision
    P_other = P_other if structure == "diag" else P_other.to_matrix()
    assert R.rel_err(got, P_other) < TOL
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred_other = other(x, pred_type="glm", link_approx="probit")
    assert R.rel_err(pred, pred_other) < TOL


# ------------------------------------------------- the autograd backend on any model
ANY = (
    "gru_cls",
    "lstm_reg",
    "mha_cls",
    "encoder_bf_cls",
    "encoder_sf_cls",
    "called_twice_cls",
    "tied_cls",
    "embedding_cls",
    "gpt2_lora_cls",
)


@pytest.mark.parametrize("name", ANY)
def test_autograd_handles_any_differentiable_model(name):
    """RNNs (no vmap batching rule), attention (fused kernels without forward-mode or double
    derivatives), a module called twice, tied weights, an Embedding with padding_idx (whose
    padding row forward mode would differentiate), GPT-2 (data-dependent masks under vmap):
    GGN full and diag, Jacobians, the Hessian and the operators, to 1e-10; the user's
    Parameter objects are the same afterwards."""
    case, model, x, y = _case(name)
    ref_model = case.ref_model(model)
    lik = case.likelihood
    before = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
    J, f = R.jacobians(ref_model, x)
    L = R.output_hessians(f, y, lik)
    ggn = torch.einsum("nkp,nkj,njq->pq", J, L, J)
    v = torch.randn(ggn.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ggn_curv = curvlib.AutogradGGN(model, lik)
    assert R.rel_err(ggn_curv.full(x, y)[1], ggn) < TOL
    assert R.rel_err(ggn_curv.diag(x, y)[1], torch.diagonal(ggn)) < TOL
    assert R.rel_err(ggn_curv.jacobians(x)[0].reshape(J.shape), J) < TOL
    assert R.rel_err(ggn_curv.operator(x, y) @ v, ggn @ v) < TOL
    hess = curvlib.AutogradHessian(model, lik)
    H = R.hvp(ref_model, x, y, lik, torch.eye(ggn.shape[0], dtype=torch.float64))
    assert R.rel_err(hess.full(x, y)[1], H) < TOL
    assert R.rel_err(hess.diag(x, y)[1], torch.diagonal(H)) < TOL
    assert R.rel_err(hess.operator(x, y) @ v, H @ v) < TOL
    after = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(p is q for (_, p), (_, q) in zip(before, after, strict=True))
    if name == "called_twice_cls":
        assert model[0].weight is model[2].weight
        assert not hess.diag_is_ggn_diag()  # a module called twice: the shortcut is not exact


# ---------------------------------------------------------------------- ASDL and BackPACK
def test_asdl_unused_module_and_hessian():
    """A module that never runs: zero rows and columns from every ASDL entry point (its
    makers have no result for it, its double backward would fail)."""
    case, model, x, y = _case("unused_cls")
    ref = _refs("unused_cls")
    H = R.hessian(model, x, y, "classification")
    ggn = curvlib.AsdlGGN(model, "classification")
    assert R.rel_err(ggn.full(x, y)[1], ref["ggn"]) < TOL
    assert R.rel_err(ggn.diag(x, y)[1], torch.diagonal(ref["ggn"])) < TOL
    assert R.rel_err(ggn.jacobians(x)[0], ref["J"]) < TOL
    hess = curvlib.AsdlHessian(model, "classification")
    assert R.rel_err(hess.full(x, y)[1], H) < TOL
    assert R.rel_err(hess.diag(x, y)[1], torch.diagonal(H)) < TOL
    loss, K = ggn.kron(x, y, N=len(y))
    names = [n for n, p in model.named_parameters()]
    for n, F in zip(names, K.kfacs, strict=True):
        assert (all(bool(f.abs().sum() == 0) for f in F)) == n.startswith("unused"), n


def test_asdl_refusals_by_name():
    """ASDL's Embedding in float64 (its per-sample gradients are float32) and a Linear layer
    whose input is not batch-first: refused naming the module, before any work."""
    case, model, x, y = _case("embedding_cls")
    with pytest.raises(UnsupportedModuleError, match="'emb' of type Embedding.*float32"):
        curvlib.AsdlGGN(model, "classification").diag(x, y)

    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):  # (B, L, 3) -> the Linear sees (L, B, 3)
            return self.head(torch.tanh(self.lin(x.transpose(0, 1))).mean(0))

    model = SeqFirst().double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    with pytest.raises(UnsupportedModuleError, match="'lin' of type Linear.*batch"):
        curvlib.AsdlGGN(model, "classification").diag(x, y)
    want = R.kron_blocks(model, x, y, "classification", N=3)
    loss, K = curvlib.AsdlGGN(model, "classification").kron(x, y, N=3)
    for got, (n, block, _) in zip(_entry_blocks(K, model), want, strict=True):
        assert R.rel_err(got, block) < TOL, n


def test_backpack_dict_inputs_and_batchnorm():
    """BackPACK's first-order entry points take dict inputs (module hooks only), and
    BatchNorm in eval mode; an in-place operation on a hooked output is refused by name."""
    torch.manual_seed(0)

    class DictNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.b = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, d):
            return self.b(torch.tanh(self.bn(self.a(d["input_ids"]))))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DictNet().double()
        model.bn.running_mean.normal_()
        model.eval()
        x = {"input_ids": torch.randn(5, 3, dtype=torch.float64)}
    y = torch.tensor([0, 1, 1, 0, 1])
    J, f = R.jacobians(model, x)
    G = R.per_sample_grads(model, x, y, "classification")
    L = R.output_hessians(f, y, "classification")
    bp = curvlib.BackPackGGN(model, "classification")
    assert R.rel_err(bp.jacobians(x)[0], J) < TOL
    assert R.rel_err(bp.gradients(x, y)[0], G) < TOL
    assert R.rel_err(bp.full(x, y)[1], torch.einsum("nkp,nkj,njq->pq", J, L, J)) < TOL
    assert (
        R.rel_err(curvlib.BackPackEF(model, "classification").diag(x, y)[1], G.pow(2).sum(0)) < TOL
    )
    with pytest.raises(CapabilityError, match="dict inputs"):
        bp.diag(x, y)  # second order: BackPACK's module graph from an input tensor
    case, model, x, y = _case("tiny_resnet_cls")
    with pytest.raises(UnsupportedModuleError, match="in-place operation"):
        curvlib.BackPackGGN(model, "classification").diag(x, y)
