"""The zoo's builders and references are right (tests of the tests).

Every builder runs and is reproducible without touching the global RNG; the references agree
with independent computations: finite differences for Jacobians, the Hessian for models that
are linear in their parameters, a second formula for the EF, an untied copy for shared
weights, the exact block for K-FAC at one datum and one location.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import zoo  # noqa: E402
import zoo_reference as R  # noqa: E402
from torch import nn  # noqa: E402

TOL = 1e-10


# heavier checks, run by default; deselect with -m "not slow"
slow = pytest.mark.slow


def _case(name: str) -> zoo.ZooCase:
    case = zoo.get(name)
    if not case.available():
        pytest.skip(f"{name} needs {case.requires}")
    return case


def _made(name: str):
    case = _case(name)
    model, x, y = case.make()
    return case, case.ref_model(model), x, y


def _params_vector(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in R.trainable(model)])


# ------------------------------------------------------------------------------ builders
@pytest.mark.parametrize("name", zoo.ZOO_IDS)
def test_builder(name):
    """Runs, float64, eval, reproducible, RNG untouched, shapes and sizes as declared."""
    case = _case(name)
    state = torch.random.get_rng_state()
    model, x, y = case.make()
    assert torch.equal(state, torch.random.get_rng_state())
    model2, x2, y2 = case.make()
    ref = case.ref_model(model)
    assert all(not m.training for m in model.modules())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(y, y2)
    if case.dict_input:
        assert isinstance(x, dict) and list(x)[0] == "input_ids"
        assert all(torch.equal(x[k], x2[k]) for k in x)
    else:
        assert torch.equal(x, x2)
    # the reference's module holds the same Parameter objects
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in ref.parameters()} == ids
    with torch.no_grad():
        f = ref(x)
    B = y.shape[0]
    assert f.dtype == torch.float64 and f.shape[0] == B and torch.isfinite(f).all()
    if case.per_token:
        assert f.ndim == 3
        if case.likelihood == "classification":
            assert y.shape == f.shape[:2] and (y == zoo.IGNORE).any()
    else:
        assert f.ndim == 2
    if case.likelihood == "regression":
        assert y.shape == f.shape
    P = R.num_params(ref)
    assert P > 0
    if case.dense:
        assert P <= 2000
    if "lora" in case.tags:
        names = [n for n, _ in R.trainable(ref)]
        assert names and all("lora_" in n for n in names)


def test_raw_hf_model_needs_the_wrapper():
    case, ref, x, y = _made("bert_raw_cls")
    model = ref.hf_model
    out = model(**x)
    assert not isinstance(out, torch.Tensor)  # an output object
    assert torch.equal(out.logits, ref(x))


# ------------------------------------------------------------------------- loss, outputs
def test_sample_losses_match_torch_losses():
    f = torch.randn(3, 4, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (3, 4))
    y[0, 1] = y[2, 3] = zoo.IGNORE
    terms = R.sample_losses("classification", f, y)
    ce = nn.CrossEntropyLoss(reduction="sum", ignore_index=zoo.IGNORE)
    for n in range(3):
        assert torch.allclose(terms[n], ce(f[n], y[n]), rtol=TOL)
    assert torch.allclose(R._loss_rows("classification", f, y), terms, rtol=TOL)
    t = torch.randn(3, 4, 5, dtype=torch.float64)
    reg = R.sample_losses("regression", f, t)
    assert torch.allclose(reg.sum(), 0.5 * nn.MSELoss(reduction="sum")(f, t), rtol=TOL)
    assert torch.allclose(R._loss_rows("regression", f, t), reg, rtol=TOL)


def test_output_hessians_closed_form_and_ignored_positions():
    f = torch.randn(2, 3, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 3))
    y[1, 2] = zoo.IGNORE
    L = R.output_hessians(f, y, "classification")
    assert L.shape == (2, 12, 12)
    for n in range(2):
        for pos in range(3):
            blk = L[n, 4 * pos : 4 * pos + 4, 4 * pos : 4 * pos + 4]
            p = torch.softmax(f[n, pos], -1)
            expected = torch.zeros(4, 4, dtype=f.dtype)
            if y[n, pos] != zoo.IGNORE:
                expected = torch.diag(p) - torch.outer(p, p)
            assert torch.allclose(blk, expected, atol=1e-12)
        off = L[n].clone()
        for pos in range(3):
            off[4 * pos : 4 * pos + 4, 4 * pos : 4 * pos + 4] = 0
        assert off.abs().max() < 1e-14  # no coupling between positions
    Lr = R.output_hessians(f, torch.randn_like(f), "regression")
    assert torch.allclose(Lr, torch.eye(12, dtype=f.dtype).expand(2, 12, 12))


# ----------------------------------------------------------------------------- Jacobians
@pytest.mark.parametrize(
    "name",
    ["called_twice_cls", "tied_cls", "token_cls", "gru_cls", "vit_cls", "bert_cls", "gpt2_lm"],
)
def test_jacobians_vs_finite_differences(name):
    """``J v`` equals central differences of the output along ``v`` (float64)."""
    case, model, x, y = _made(name)
    J, f = R.jacobians(model, x)
    params = [p for _, p in R.trainable(model)]
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(J.shape[-1], generator=gen, dtype=torch.float64)
    v = v / v.norm()
    eps = 1e-5

    def shifted(s: float) -> torch.Tensor:
        with torch.no_grad():
            for p, c in zip(params, v.split([p.numel() for p in params]), strict=True):
                p.add_(s * c.view(p.shape))
            out = model(x).reshape(f.shape[0], -1)
            for p, c in zip(params, v.split([p.numel() for p in params]), strict=True):
                p.sub_(s * c.view(p.shape))
        return out

    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert R.rel_err(J @ v, fd) < 1e-7
    assert J.shape[1] == f[0].numel()


def _untied_copy(model: nn.Module) -> nn.Module:
    """A copy in which every use of a shared weight has its own Parameter (same values)."""
    m = copy.deepcopy(model)
    if isinstance(m, zoo.TiedLinears):
        m.b.weight = nn.Parameter(m.a.weight.detach().clone())
        return m
    lin = m[0]
    m[2] = copy.deepcopy(lin)  # the module called twice becomes two modules
    return m


@pytest.mark.parametrize("name", ["tied_cls", "called_twice_cls"])
def test_shared_weight_jacobian_is_sum_over_uses(name):
    case, model, x, y = _made(name)
    J, _ = R.jacobians(model, x)
    untied = _untied_copy(model)
    Ju, _ = R.jacobians(untied, x)
    idx, idx_u = R.param_index(model), R.param_index(untied)
    if name == "tied_cls":
        shared, first, second = "a.weight", "a.weight", "b.weight"
    else:
        shared, first, second = "0.weight", "0.weight", "2.weight"
    assert torch.allclose(J[..., idx[shared]], Ju[..., idx_u[first]] + Ju[..., idx_u[second]])
    assert R.num_params(model) < R.num_params(untied)


# ------------------------------------------------------------------- GGN, EF, Hessian
def _linear_models():
    """Models linear in their trainable parameters: GGN == Hessian exactly."""
    gen = torch.Generator().manual_seed(0)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        lin = nn.Linear(4, 3).double()
        x = torch.randn(5, 4, dtype=torch.float64, generator=gen)
        out.append(("linear_reg", lin, x, torch.randn(5, 3, dtype=torch.float64), "regression"))
        out.append(
            ("linear_cls", lin, x, torch.randint(0, 3, (5,), generator=gen), "classification")
        )
        seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
        seq[0].requires_grad_(False)  # frozen first layer: linear in the last layer
        xs = torch.randn(3, 5, 3, dtype=torch.float64, generator=gen)
        out.append(("seq_reg", seq, xs, torch.randn(3, 5, 2, dtype=torch.float64), "regression"))
        tok = nn.Sequential(nn.Embedding(7, 4), nn.Tanh(), nn.Linear(4, 5)).double()
        tok[0].requires_grad_(False)
        ids = torch.randint(0, 7, (3, 4), generator=gen)
        yt = torch.randint(0, 5, (3, 4), generator=gen)
        yt[0, 0] = yt[2, 1] = zoo.IGNORE
        out.append(("token_cls", tok, ids, yt, "classification"))
        conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 2))
        conv = conv.double()
        conv[2].requires_grad_(False)
        xc = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=gen)
        out.append(
            ("conv_cls", conv, xc, torch.randint(0, 2, (2,), generator=gen), "classification")
        )
    return out


@pytest.mark.parametrize("item", _linear_models(), ids=lambda t: t[0])
def test_ggn_equals_hessian_for_linear_models(item):
    _, model, x, y, lik = item
    G = R.ggn(model, x, y, lik)
    H = R.hessian(model, x, y, lik)
    assert R.rel_err(G, H) < TOL
    assert torch.allclose(R.ggn_diag(model, x, y, lik), torch.diagonal(G), rtol=TOL)


@pytest.mark.parametrize(
    "name", ["token_cls", "token_reg", "tied_cls", "bert_cls", "gpt2_lora_lm", "embedding_cls"]
)
def test_ef_two_ways_and_matrix_properties(name):
    """EF = Σ g gᵀ from per-sample gradients = Σ Jᵀ r rᵀ J; GGN and EF symmetric PSD."""
    case, model, x, y = _made(name)
    E = R.ef(model, x, y, case.likelihood)
    J, f = R.jacobians(model, x)
    r = R.output_grads(f, y, case.likelihood)
    g = torch.einsum("nkp,nk->np", J, r)
    assert R.rel_err(E, g.T @ g) < TOL
    assert torch.allclose(R.ef_diag(model, x, y, case.likelihood), torch.diagonal(E), rtol=TOL)
    G = R.ggn(model, x, y, case.likelihood, J=J)
    for M in (E, G):
        assert torch.allclose(M, M.T, atol=1e-13 * M.abs().max())
        assert torch.linalg.eigvalsh(M).min() > -1e-10 * M.abs().max()
    v = torch.randn(J.shape[-1], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert R.rel_err(R.ggn_vp(model, x, y, case.likelihood, v, J=J), G @ v) < TOL
    assert R.rel_err(R.ef_vp(model, x, y, case.likelihood, v), E @ v) < TOL
    # the loss at the output (sum of the per-sample terms)
    assert torch.allclose(
        R.total_loss(model, x, y, case.likelihood), R.sample_losses(case.likelihood, f, y).sum()
    )


@pytest.mark.parametrize(
    "name",
    [
        "called_twice_cls",
        "tied_cls",
        "lstm_reg",
        "token_cls",
        "bare_param_reg",
        "unused_cls",
        "encoder_sf_cls",
        "gpt2_lora_lm",
        pytest.param("vit_cls", marks=slow),
        pytest.param("gpt2_lm", marks=slow),
    ],
)
def test_hessian_functional_call_vs_double_backward(name):
    """The swap of a flat θ (functional_call, tie_weights) agrees with plain double backward
    on the model's own Parameters, also for modules called twice and tied weights."""
    case, model, x, y = _made(name)
    H = R.hessian(model, x, y, case.likelihood)
    H2 = R.hessian_double_backward(model, x, y, case.likelihood)
    assert R.rel_err(H, H2) < 1e-9
    assert torch.allclose(H, H.T, atol=1e-10 * H.abs().max())
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert R.rel_err(R.hvp(model, x, y, case.likelihood, v), H @ v) < 1e-9
    if name == "unused_cls":
        sl = R.param_index(model)["unused.weight"]
        assert H[sl].abs().max() == 0


def test_mc_fisher_is_unbiased_and_respects_ignored_positions():
    case, model, x, y = _made("token_cls")
    J, f = R.jacobians(model, x)
    gen = torch.Generator().manual_seed(0)
    t = R.pseudo_targets(f, y, case.likelihood, 4000, gen)
    assert t.shape == (y.shape[0], 4000, *y.shape[1:])
    ignored = (y == zoo.IGNORE).unsqueeze(1).expand_as(t)
    assert (t[ignored] == zoo.IGNORE).all() and (t[~ignored] >= 0).all()
    freq = torch.nn.functional.one_hot(t[:, :, 1].clamp_min(0), 5).double().mean(1)
    p = torch.softmax(f[:, 1], -1)
    assert (freq - p).abs().max() < 0.05
    F = R.mc_fisher(model, x, y, case.likelihood, 4000, torch.Generator().manual_seed(1), J=J)
    G = R.ggn(model, x, y, case.likelihood, J=J)
    assert R.rel_err(F, G) < 0.05
    reg, model_r, xr, yr = _made("token_reg")
    Jr, _ = R.jacobians(model_r, xr)
    Fr = R.mc_fisher(model_r, xr, yr, "regression", 4000, torch.Generator().manual_seed(1), J=Jr)
    assert R.rel_err(Fr, R.ggn(model_r, xr, yr, "regression", J=Jr)) < 0.05


# ------------------------------------------------------------------------------------ K-FAC
def _one_location_models():
    """(name, model, x (one datum), likelihood): every weight is used at one location."""
    from transformers.pytorch_utils import Conv1D

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 3))
        convt = nn.Sequential(
            nn.ConvTranspose2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3, 3)
        )
        emb = nn.Sequential(nn.Embedding(6, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3))
        hf = nn.Sequential(Conv1D(4, 3), nn.Tanh(), Conv1D(3, 4))
        cases = [
            ("mlp", mlp.double(), torch.randn(1, 3, dtype=torch.float64)),
            ("conv", conv.double(), torch.randn(1, 2, 3, 3, dtype=torch.float64)),
            ("convtranspose", convt.double(), torch.randn(1, 2, 1, 1, dtype=torch.float64)),
            ("embedding", emb.double(), torch.tensor([[4]])),
            ("hf_conv1d", hf.double(), torch.randn(1, 3, dtype=torch.float64)),
        ]
    return cases


@pytest.mark.parametrize("item", _one_location_models(), ids=lambda t: t[0])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("lik", ["classification", "regression"])
def test_kfac_exact_for_one_datum_one_location(item, approx, lik):
    _, model, x = item
    with torch.no_grad():
        C = model(x).shape[-1]
    y = torch.tensor([1]) if lik == "classification" else torch.randn(1, C, dtype=torch.float64)
    G = R.ggn(model, x, y, lik)
    idx = R.param_index(model)
    for block in R.kfac(model, x, y, lik, approx=approx):
        sl = idx[block.name]
        assert R.rel_err(block.dense(), G[sl, sl]) < TOL, block.name


def _terms_cases():
    return [
        "token_cls",
        "token_reg",
        "grouped_conv_cls",
        "depthwise_conv_cls",
        "dilated_conv_cls",
        "convtranspose2d_cls",
        "conv1d_reg",
        "conv3d_cls",
        "embedding_cls",
        "gpt2_lora_lm",
        "gpt2_cls",
    ]


def _kfac_modules(model: nn.Module):
    """(param name, module) of the weights the reference has a K-FAC definition for."""
    from transformers.pytorch_utils import Conv1D

    owners, seen = {}, set()
    for path, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd, Conv1D)):
            w = mod.weight
            if w.requires_grad and id(w) not in seen:
                seen.add(id(w))
                owners[(path + "." if path else "") + "weight"] = mod
    return owners


@pytest.mark.parametrize("name", _terms_cases())
def test_layer_terms_rebuild_the_exact_block(name):
    """Σ_n (Σ_l J_l ⊗ a_l)ᵀ Λ (Σ_l J_l ⊗ a_l) is the exact GGN block of each weight: the
    per-location inputs (patches, one-hot tokens) and output Jacobians are right."""
    case, model, x, y = _made(name)
    J, f = R.jacobians(model, x)
    G = R.ggn(model, x, y, case.likelihood, J=J)
    L = R.output_hessians(f, y, case.likelihood)
    idx = R.param_index(model)
    mods = _kfac_modules(model)
    terms = R.layer_terms(model, x, list(mods.values()))
    assert terms
    for (pname, mod), t in zip(mods.items(), terms, strict=True):
        sl = idx[pname]
        blk = R.exact_block_from_terms(t, L, mod.weight.numel())
        assert R.rel_err(blk, G[sl, sl]) < TOL, pname


def test_kfac_definitions_on_sequences():
    """expand and reduce on a Linear layer on sequences, against hand-written sums."""
    case, model, x, y = _made("token_reg")  # Linear(3, 5) -> Tanh -> Linear(5, 2) on (B, L, 3)
    B, L = x.shape[:2]
    N = 7
    f = model(x).detach()
    M = R.output_hessians(f, y, "regression")
    h = torch.tanh(model[0](x)).detach()
    # last layer: s_l = W h_l + b, f_n = (s_1, ..., s_L): J_l selects the l-th output block
    exp_G = torch.zeros(2, 2, dtype=x.dtype)
    red_G = torch.zeros(2, 2, dtype=x.dtype)
    for n in range(B):
        Jh = torch.zeros(L * 2, 2, dtype=x.dtype)
        for pos in range(L):
            Jl = torch.zeros(L * 2, 2, dtype=x.dtype)
            Jl[2 * pos : 2 * pos + 2] = torch.eye(2, dtype=x.dtype)
            exp_G += Jl.T @ M[n] @ Jl
            Jh += Jl
        red_G += Jh.T @ M[n] @ Jh
    exp_A = torch.einsum("nli,nlj->ij", h, h) / (N * L)
    red_A = torch.einsum("ni,nj->ij", h.mean(1), h.mean(1)) / N
    for approx, Gr, Ar in (("expand", exp_G, exp_A), ("reduce", red_G, red_A)):
        blocks = {b.name: b for b in R.kfac(model, x, y, "regression", approx=approx, N=N)}
        G2, A2 = blocks["2.weight"].factors[0]
        assert torch.allclose(G2, Gr, rtol=TOL) and torch.allclose(A2, Ar, rtol=TOL)
        assert torch.allclose(blocks["2.bias"].factors[0][0], Gr, rtol=TOL)


def test_kfac_embedding_factor_is_token_counts():
    case, model, x, y = _made("embedding_cls")
    block = R.kfac(model, x, y, case.likelihood, names=["emb.weight"])[0]
    G, A = block.factors[0]
    B, L = x.shape
    counts = torch.bincount(x.reshape(-1), minlength=12).double()
    counts[0] = 0  # padding_idx
    assert torch.equal(A, torch.diag(counts) / (B * L))
    # stored (V, D): the block is A ⊗ G
    assert torch.allclose(block.dense(), torch.kron(A, G))


def test_kfac_stored_layouts():
    """HF Conv1D (weight (in, out)) gives A ⊗ G; a grouped conv a block diagonal."""
    case, model, x, y = _made("gpt2_lora_lm")
    names = [n for n, _ in R.trainable(model)]
    blocks = R.kfac(model, x, y, case.likelihood, names=names)
    for b in blocks:  # LoRA A and B are nn.Linear: G ⊗ A
        ((G, A),) = b.factors
        assert torch.allclose(b.dense(), torch.kron(G, A))
    case, model, x, y = _made("gpt2_cls")
    name = "hf_model.transformer.h.0.attn.c_attn.weight"
    (b,) = R.kfac(model, x, y, case.likelihood, names=[name])
    ((G, A),) = b.factors
    assert G.shape == (24, 24) and A.shape == (8, 8)
    assert torch.allclose(b.dense(), torch.kron(A, G))
    case, model, x, y = _made("grouped_conv_cls")
    (b,) = R.kfac(model, x, y, case.likelihood, names=["0.weight"])
    assert len(b.factors) == 2
    D = b.dense()
    half = D.shape[0] // 2
    assert D[:half, half:].abs().max() == 0
    assert torch.allclose(D[:half, :half], torch.kron(*b.factors[0]))


def test_kfac_refuses_what_it_cannot_define():
    for name, msg in (
        ("tied_cls", "shared"),
        ("layernorm_reg", "no definition"),
    ):
        case, model, x, y = _made(name)
        with pytest.raises(ValueError, match=msg):
            R.kfac(model, x, y, case.likelihood)


def test_kron_rel_err_matches_dense():
    gen = torch.Generator().manual_seed(0)
    A1, B1 = (
        torch.randn(3, 3, generator=gen, dtype=torch.float64),
        torch.randn(4, 4, generator=gen, dtype=torch.float64),
    )
    A2, B2 = A1 + 0.01 * torch.randn(3, 3, generator=gen, dtype=torch.float64), B1.clone()
    dense = R.rel_err(torch.kron(A2, B2), torch.kron(A1, B1))
    assert abs(R.kron_rel_err([A2, B2], [A1, B1]) - dense) < 1e-8
    d = torch.rand(4, generator=gen, dtype=torch.float64)
    assert R.kron_rel_err([A1, d], [A1, torch.diag(d)]) < 1e-7
    # scaling between the factors is invisible
    assert R.kron_rel_err([2 * A1, B1 / 2], [A1, B1]) < 1e-7


@slow
def test_resnet18_references_are_consistent():
    """The big model: the GGN diagonal from Jacobian rows equals Σ (Jᵀ Λ J v) entries."""
    case, model, x, y = _made("resnet18_cls")
    J, f = R.jacobians(model, x)
    d = R.ggn_diag(model, x, y, case.likelihood, J=J)
    assert d.shape == (R.num_params(model),) and (d >= 0).all()
    gen = torch.Generator().manual_seed(0)
    sel = torch.randint(0, d.numel(), (3,), generator=gen)
    E = torch.zeros(d.numel(), 3, dtype=torch.float64)
    E[sel, torch.arange(3)] = 1
    cols = R.ggn_vp(model, x, y, case.likelihood, E, J=J)
    assert torch.allclose(cols[sel, torch.arange(3)], d[sel], rtol=TOL)


def test_select_by_tag_and_density():
    hf = {c.name for c in zoo.select("hf")}
    assert {"bert_cls", "gpt2_lm", "gpt2_lora_cls"} <= hf and "gru_cls" not in hf
    assert [c.name for c in zoo.select(dense=False)] == ["resnet18_cls"]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_grouped_conv_one_location(approx):
    """Grouped conv, one datum, one location: each group's weight block is exact (only the
    blocks between groups are dropped); the bias has one G over all its channels, exact."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = nn.Conv2d(4, 6, 3, groups=2)
        model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)).double()
        x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    y = torch.tensor([2])
    G = R.ggn(model, x, y, "classification")
    idx = R.param_index(model)
    w, b = R.kfac(model, x, y, "classification", approx=approx, names=["0.weight", "0.bias"])
    sl = idx["0.bias"]
    assert [f[0].shape for f in b.factors] == [(6, 6)]
    assert R.rel_err(b.dense(), G[sl, sl]) < TOL and G[sl, sl][:3, 3:].abs().max() > 0
    exact_w = G[idx["0.weight"], idx["0.weight"]]
    half = exact_w.shape[0] // 2
    for g in range(2):
        blk = slice(g * half, (g + 1) * half)
        assert R.rel_err(w.dense()[blk, blk], exact_w[blk, blk]) < TOL
    assert exact_w[:half, half:].abs().max() > 0  # what K-FAC drops is not zero
