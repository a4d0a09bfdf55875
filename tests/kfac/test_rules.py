"""``curvlib.kfac.rules``: each rule against the K-FAC definitions of ``tests/zoo_reference.py``,
the patches (``unfold``) against the convolutions, and ``register_kfac_rule`` with two
researcher layers (an elementwise scale with exact blocks, a dense layer storing its weight
``(in, out)`` as a ``LinearLikeRule`` with layout ``"AG"``)."""

from __future__ import annotations

import known_bugs
import pytest
import reference as ref
import torch
import zoo_reference as Z
from torch import Tensor, nn
from torch.nn import functional as F

from curvlib import AutogradEF, AutogradGGN
from curvlib.kfac import (
    ExactBlockRule,
    LinearLikeRule,
    coverage,
    register_kfac_rule,
    rule_for,
    unfold,
)
from curvlib.kfac import rules as rules_module

TOL = 1e-10
DT = torch.float64


# -- unfold ---------------------------------------------------------------------------------
def unfold_input(x, conv):
    return unfold(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.padding_mode)


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1), (2, 2, 9)),
        (nn.Conv1d(2, 3, 3, padding="same", dilation=2), (2, 2, 8)),
        (nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (2, 2, 7, 6)),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 5, 5)),
        (nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0)), (2, 2, 4, 5, 4)),
        (nn.Conv3d(1, 2, 2, padding="same", dilation=2), (2, 1, 4, 4, 4)),
        (nn.Conv2d(2, 3, 3, padding=2, padding_mode="circular", dilation=2), (2, 2, 6, 6)),
        (nn.Conv2d(2, 3, 4, padding="same", padding_mode="replicate"), (2, 2, 5, 5)),
    ],
)
def test_unfold_reproduces_convolution(conv, shape):
    """Both patch layouts (the rules' ``(B, L, r)`` and the native ``(B, r, S)`` of the fast
    path) reproduce the convolution."""
    from curvlib.kfac.conv import _patches

    conv = conv.double()
    x = torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(0))
    a = unfold_input(x, conv)  # (B, L, r)
    z = a @ conv.weight.flatten(1).T + conv.bias  # (B, L, out)
    assert torch.allclose(z, conv(x).flatten(2).transpose(1, 2), atol=1e-12)
    assert torch.equal(_patches(x, conv), a.transpose(1, 2))


@pytest.mark.parametrize("cls", [AutogradGGN, AutogradEF])
@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 5, 5)),
        (nn.Conv2d(2, 3, 3, padding=2, padding_mode="circular", dilation=2), (2, 6, 6)),
        (nn.Conv2d(2, 3, 4, padding="same", padding_mode="replicate"), (2, 5, 5)),
        (nn.Conv1d(2, 3, 4, padding="same"), (2, 9)),
        (nn.Conv3d(2, 2, 2, stride=(1, 2, 1)), (2, 4, 4, 3)),
        (nn.Conv2d(4, 4, 3, groups=2, stride=2), (4, 7, 7)),
    ],
)
def test_convolution_diagonal_is_the_dense_diagonal(conv, shape, cls):
    """The fast path of a convolution's diagonal (patches in torch's layout, every padding
    mode) against the diagonal of the dense brute-force matrix."""
    torch.manual_seed(0)
    conv = conv.double()
    flat = conv(torch.zeros(1, *shape, dtype=DT)).numel()
    model = _head(conv, flat).double()
    x = torch.randn(5, *shape, dtype=DT)
    y = torch.randint(0, 3, (5,))
    _, h = cls(model, "classification").diag(x, y)
    dense = ref.ggn if cls is AutogradGGN else ref.ef
    assert ref.rel_err(h, dense(model, x, y, "classification").diagonal()) < TOL


def test_unfold_matches_torch_unfold_2d():
    conv = nn.Conv2d(3, 2, 3, stride=2, padding=1).double()
    x = torch.randn(2, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unfold_input(x, conv), F.unfold(x, 3, padding=1, stride=2).transpose(1, 2))


# -- the built-in rules against the definitions ----------------------------------------------
def _head(layer: nn.Module, flat: int) -> nn.Sequential:
    return nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(flat, 3))


class Pooled(nn.Module):
    def __init__(self, layer: nn.Module, d: int) -> None:
        super().__init__()
        self.layer, self.head = layer, nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.layer(x)).mean(1))


def _hf_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    return Pooled(Conv1D(5, 4), 5), (3, 4)


#: ``name -> (build () -> (model, x_shape), rule name, x is integer tokens)``
LAYERS = {
    "linear": (lambda: (_head(nn.Linear(4, 5), 5), (4,)), "LinearRule"),
    "linear_on_sequences": (lambda: (_head(nn.Linear(4, 5), 15), (3, 4)), "LinearRule"),
    "conv1d": (lambda: (_head(nn.Conv1d(2, 3, 3, stride=2, padding=1), 9), (2, 6)), "ConvRule"),
    "conv2d_dilated": (
        lambda: (_head(nn.Conv2d(2, 3, 3, dilation=2, padding=1, stride=2), 27), (2, 7, 7)),
        "ConvRule",
    ),
    "conv2d_grouped": (lambda: (_head(nn.Conv2d(4, 4, 3, groups=2), 64), (4, 6, 6)), "ConvRule"),
    "conv3d": (lambda: (_head(nn.Conv3d(2, 2, 2), 16), (2, 3, 3, 3)), "ConvRule"),
    "convtranspose2d": (
        lambda: (_head(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), 75), (2, 3, 3)),
        "ConvTransposeRule",
    ),
    "embedding": (
        lambda: (Pooled(nn.Embedding(12, 4, padding_idx=0), 4), "tokens"),
        "EmbeddingRule",
    ),
    "hf_conv1d": (_hf_conv1d, "HFConv1DRule"),
}
#: the same bugs as in the oracle (tests/known_bugs.py), by the model they show on
_BUG_MODEL = {"conv2d_grouped": "grouped_conv_cls", "convtranspose2d": "convtranspose2d_cls"}


def layer_problem(name: str):
    build, rule = LAYERS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, shape = build()
        model = model.double()
        if shape == "tokens":
            x = torch.randint(0, 12, (4, 5))
            x[0, -2:] = 0  # padding tokens
        else:
            x = torch.randn(4, *shape, dtype=DT)
        y = torch.randint(0, 3, (4,))
    return model, x, y, rule


def _params():
    out = []
    for name in LAYERS:
        for approx in ("expand", "reduce"):
            for curvature in ("ggn", "ef"):
                bug = known_bugs.known_bug(
                    "autograd",
                    curvature,
                    "kron" if approx == "expand" else "kron_reduce",
                    _BUG_MODEL.get(name, ""),
                )
                marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
                out.append(pytest.param(name, approx, curvature, marks=marks))
    return out


@pytest.mark.parametrize("name, approx, curvature", _params())
def test_rule_matches_the_definition(name, approx, curvature):
    """Every block of the layer's parameters equals the loop definition (expand/reduce, GGN
    and EF output matrices); the layer is covered by its rule, its weight gets two
    Kronecker factors (never a dense exact block)."""
    model, x, y, rule = layer_problem(name)
    layer = model[0] if isinstance(model, nn.Sequential) else model.layer
    assert type(rule_for(layer)).__name__ == rule
    params = list(model.parameters())
    cov = coverage(model, params)
    for i, p in enumerate(params):
        if any(p is q for q in layer.parameters()):
            assert rule in cov.describe(i)
    cls = AutogradGGN if curvature == "ggn" else AutogradEF
    _, K = cls(model, "classification", kfac_approx=approx).kron(x, y, N=7)
    assert len(K.kfacs[0]) == 2
    names = [n for n, _ in model.named_parameters()]
    blocks = Z.kfac(model, x, y, "classification", curvature, approx, N=7, names=names)
    D = K.to_matrix()
    o = 0
    for b in blocks:
        s = b.numel
        assert ref.rel_err(D[o : o + s, o : o + s], b.dense()) < TOL, b.name
        o += s


def test_embedding_A_is_the_diagonal_of_token_counts():
    model, x, y, _ = layer_problem("embedding")
    _, K = AutogradGGN(model, "classification").kron(x, y, N=7)
    A, G = K.kfacs[0]  # weight (V, D), layout AG
    counts = torch.bincount(x.reshape(-1), minlength=12).double()
    counts[0] = 0  # padding_idx gets no gradient and is not counted
    assert A.ndim == 1 and torch.equal(A, counts / (7 * x.shape[1]))
    assert G.shape == (4, 4)


@pytest.mark.parametrize("norm", ["layernorm", "groupnorm", "batchnorm2d"])
def test_norm_rule_gives_the_exact_block(norm):
    layer = {
        "layernorm": lambda: nn.LayerNorm([4, 4]),
        "groupnorm": lambda: nn.GroupNorm(2, 4),
        "batchnorm2d": lambda: nn.BatchNorm2d(4),
    }[norm]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 3), layer, nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
        model = model.double().eval()
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
            if norm == "batchnorm2d":
                layer.running_mean.normal_()
                layer.running_var.uniform_(0.5, 1.5)
        x, y = torch.randn(3, 2, 6, 6, dtype=DT), torch.randint(0, 3, (3,))
    assert type(rule_for(layer)).__name__ == "NormRule"
    _, K = AutogradGGN(model, "classification").kron(x, y, N=3)
    H = Z.ggn(model, x, y, "classification")
    idx = Z.param_index(model)
    for i, (n, _) in enumerate(model.named_parameters()):
        if n.startswith("1."):
            ((block,),) = [K.kfacs[i]]
            assert ref.rel_err(block, H[idx[n], idx[n]]) < TOL, n


# -- register_kfac_rule: two researcher layers ---------------------------------------------
class Scale(nn.Module):
    """``y = x ⊙ w`` with ``w`` of shape ``(d,)``, broadcast over leading dimensions."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class ScaleRule(ExactBlockRule):
    """Per sample ``J_nᵀ c = Σ_positions g ⊙ x``: the exact block of ``w``."""

    names = ("weight",)
    calls = 0

    def products(self, module, sites, names):
        ScaleRule.calls += 1
        out = 0
        for s in sites:  # s.g (K, B, ..., d), s.a (B, ..., d)
            v = s.g * s.a
            out = out + v.reshape(v.shape[0], v.shape[1], -1, v.shape[-1]).sum(2)
        return {"weight": out.transpose(0, 1)}


class MyDense(nn.Module):
    """A dense layer storing its weight ``(in, out)``: ``y = x @ W + b``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class MyDenseRule(LinearLikeRule):
    """Inputs and output cotangents as for Linear; the stored ``(in, out)`` weight gets
    ``[A, G]`` (layout ``AG``) so that ``A ⊗ G`` matches its row-major flattening."""

    layout = "AG"

    def patches(self, module, site):
        a = site.a
        return a.reshape(a.shape[0], -1, 1, a.shape[-1])

    def grads(self, module, site):
        g = site.g
        return g.reshape(g.shape[0], g.shape[1], -1, 1, g.shape[-1])


@pytest.fixture
def custom_rules():
    saved = dict(rules_module._RULES)
    register_kfac_rule(Scale, ScaleRule())
    register_kfac_rule(MyDense, MyDenseRule())
    yield
    rules_module._RULES.clear()
    rules_module._RULES.update(saved)


def _scaled_model() -> tuple[nn.Module, Tensor, Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3)).double()
        return model, torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))


def test_register_kfac_rule_exact_block(custom_rules):
    model, x, y = _scaled_model()
    params = list(model.parameters())
    assert "K-FAC rule ScaleRule of '1'" in coverage(model, params).describe(2)
    H = ref.ggn(model, x, y, "classification")
    curv = AutogradGGN(model, "classification")
    ScaleRule.calls = 0
    _, K = curv.kron(x, y)
    assert ScaleRule.calls == 1  # the rule computed it
    assert ref.rel_err(K.kfacs[2][0], H[25:30, 25:30]) < TOL
    # the per-layer products of full and diag use the rule too
    assert ref.rel_err(curv.full(x, y)[1], H) < TOL
    assert ref.rel_err(curv.diag(x, y)[1], H.diagonal()) < TOL
    assert ScaleRule.calls == 3


def _dense_models(B: int):
    """A MyDense MLP and the same network with nn.Linear (weight W.T), same data."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        mine = nn.Sequential(MyDense(4, 5), nn.Tanh(), MyDense(5, 3)).double()
        x, y = torch.randn(B, 4, dtype=DT), torch.randint(0, 3, (B,))
    twin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for m, t in ((mine[0], twin[0]), (mine[2], twin[2])):
            t.weight.copy_(m.weight.T)
            t.bias.copy_(m.bias)
    return mine, twin, x, y


def test_register_kfac_rule_layout_ag(custom_rules):
    # one data point: K-FAC is exact, so A ⊗ G is the GGN block in the stored (in, out) order
    mine, _, x, y = _dense_models(1)
    H = ref.ggn(mine, x, y, "classification")
    _, K = AutogradGGN(mine, "classification").kron(x, y, N=1)
    A, G = K.kfacs[0]
    assert A.shape == (4, 4) and G.shape == (5, 5)
    assert ref.rel_err(K.to_matrix(), ref.blocks_of([20, 5, 15, 3], H)) < TOL
    # a batch: the factors are those of the K-FAC definition of the equivalent nn.Linear net
    mine, twin, x, y = _dense_models(5)
    _, K = AutogradGGN(mine, "classification").kron(x, y, N=7)
    blocks = Z.kfac(twin, x, y, "classification", N=7)
    for entry, b in zip(K.kfacs, blocks, strict=True):
        ((G, A),) = b.factors
        want = [A, G] if b.kind == "weight" else [G]
        for got, w in zip(entry, want, strict=True):
            assert ref.rel_err(got, w) < TOL, b.name
    assert (
        ref.rel_err(
            AutogradGGN(mine, "classification").full(x, y)[1], ref.ggn(mine, x, y, "classification")
        )
        < TOL
    )


def test_register_kfac_rule_refuses_duplicates_and_non_rules(custom_rules):
    with pytest.raises(ValueError, match="has a K-FAC rule already"):
        register_kfac_rule(Scale, ScaleRule())
    register_kfac_rule(Scale, ScaleRule(), overwrite=True)
    with pytest.raises(TypeError):
        register_kfac_rule(Scale, object())
    with pytest.raises(TypeError):
        register_kfac_rule(int, ScaleRule())


def test_subclass_with_its_own_forward_has_no_rule():
    class Plain(nn.Linear):
        pass

    class Own(nn.Linear):
        def forward(self, x):
            return super().forward(x)

    assert type(rule_for(Plain(2, 2))).__name__ == "LinearRule"
    assert rule_for(Own(2, 2)) is None
