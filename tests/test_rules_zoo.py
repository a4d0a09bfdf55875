"""curvlib's K-FAC rules on the model zoo, against the definitions of ``tests/zoo_reference.py``.

* One datum, one location: every rule's entry is the exact curvature block (Linear, Conv
  with groups (within each group), ConvTranspose, HF Conv1D, Embedding, MultiheadAttention
  on a sequence of length 1, the normalization layers' exact blocks), for every backend
  that claims ``kron``.
* Everywhere else: each entry is the K-FAC definition computed independently (explicit
  per-location inputs and output Jacobians, attention written out), or the exact block for
  parameters without a definition (normalization layers, bare parameters, tied weights,
  recurrent layers), for ``expand`` and ``reduce``, the GGN and the EF, for every backend
  that claims ``kron`` (ASDL's own Linear/Conv2d factors included).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import zoo  # noqa: E402
import zoo_reference as R  # noqa: E402
from torch import nn  # noqa: E402

import curvlib  # noqa: E402
from curvlib.errors import CapabilityError, UnsupportedModuleError  # noqa: E402

TOL = 1e-10

CASES = [
    "gru_cls",
    "mha_cls",
    "encoder_bf_cls",
    "encoder_sf_cls",
    "called_twice_cls",
    "tied_cls",
    "token_cls",
    "token_reg",
    "grouped_conv_cls",
    "depthwise_conv_cls",
    "dilated_conv_cls",
    "convtranspose2d_cls",
    "conv1d_reg",
    "conv3d_cls",
    "groupnorm_cls",
    "layernorm_reg",
    "batchnorm1d_cls",
    "batchnorm2d_cls",
    "embedding_cls",
    "mylinear_cls",
    "unused_cls",
    "bare_param_reg",
    "gpt2_lm",
]


def _blocks(K, model) -> list[torch.Tensor]:
    D = K.to_matrix()
    return [D[sl, sl] for sl in R.param_index(model).values()]


def _assert_blocks(got: list[torch.Tensor], want: list[tuple[str, torch.Tensor, str]]) -> None:
    assert len(got) == len(want)
    scale = max(float(b.norm()) for _, b, _ in want)
    for g, (name, block, kind) in zip(got, want, strict=True):
        err = float((g - block).norm())
        assert err <= TOL * max(float(block.norm()), 1e-6 * scale), (name, kind)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", CASES)
def test_kron_is_the_definition(name, approx):
    case = zoo.get(name)
    if not case.available():
        pytest.skip(f"{name} needs {case.requires}")
    model, x, y = case.make()
    ref = case.ref_model(model)
    for curvature in ("ggn", "ef"):
        want = R.kron_blocks(ref, x, y, case.likelihood, curvature, approx, N=9)
        for backend in ("autograd", "asdl", "backpack"):
            curv = curvlib.backend_class(backend, curvature)(model, case.likelihood)
            try:
                loss, K = curv.kron(x, y, N=9, kfac_approx=approx)
            except (CapabilityError, UnsupportedModuleError):
                assert backend != "autograd"
                continue
            _assert_blocks(_blocks(K, ref), want)
        if name in ("mha_cls", "encoder_bf_cls", "gpt2_lm"):
            assert "kfac" in {k for n, _, k in want if "proj" in n or "attn" in n}


class _Attention(nn.Module):
    def __init__(self, cross: bool, kdim: int | None = None) -> None:
        super().__init__()
        self.cross = cross
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.mem = nn.Linear(3, kdim or 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cross:  # queries from x, keys and values from another sequence
            m = self.mem(x[:, :, :3])
            h, _ = self.attn(x, m, m)
        else:
            h, _ = self.attn(x, x, x)
        return self.head(torch.tanh(h).mean(1))


def _one_location_models():
    from transformers.pytorch_utils import Conv1D

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        models = {
            "linear": (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), (1, 3)),
            "grouped_conv": (
                nn.Sequential(
                    nn.Conv2d(4, 6, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)
                ),  # noqa: E501
                (1, 4, 3, 3),
            ),
            "convtranspose": (
                nn.Sequential(
                    nn.ConvTranspose2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3, 3)
                ),  # noqa: E501
                (1, 2, 1, 1),
            ),
            "hf_conv1d": (nn.Sequential(Conv1D(4, 3), nn.Tanh(), Conv1D(3, 4)), (1, 3)),
            "attention": (_Attention(cross=False), (1, 1, 4)),
            "layernorm": (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)), (1, 3)),
        }
        out = {}
        for key, (m, shape) in models.items():
            m = m.double().eval()
            out[key] = (m, torch.randn(*shape, dtype=torch.float64))
        emb = nn.Sequential(nn.Embedding(6, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)).double()
        out["embedding"] = (emb, torch.tensor([[4]]))
    return out


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("backend", ["autograd", "backpack", "asdl"])
@pytest.mark.parametrize("key", list(_one_location_models()))
def test_kron_exact_for_one_datum_one_location(key, backend, approx):
    model, x = _one_location_models()[key]
    y = torch.tensor([1])
    G = R.ggn(model, x, y, "classification")
    curv = curvlib.backend_class(backend, "ggn")(model, "classification")
    try:
        loss, K = curv.kron(x, y, N=1, kfac_approx=approx)
    except (CapabilityError, UnsupportedModuleError):  # a refusal: supports() says so too
        assert backend != "autograd"
        assert not curvlib.supports(model, backend, "ggn", "kron").supported
        return
    for (pname, sl), got in zip(R.param_index(model).items(), _blocks(K, model), strict=True):
        want = G[sl, sl]
        if key == "grouped_conv" and pname == "0.weight":  # exact within each group (the
            # bias: one G over all channels, exact)
            h = want.shape[0] // 2
            mask = torch.zeros_like(want, dtype=torch.bool)
            mask[:h, :h] = mask[h:, h:] = True
            assert got[~mask].abs().max() == 0 and want[~mask].abs().max() > 0
            want = torch.where(mask, want, 0.0)
        assert R.rel_err(got, want) < TOL, pname


@pytest.mark.parametrize("kdim", [None, 5])
def test_cross_attention_is_three_maps(kdim):
    """Cross-attention (and separate q/k/v weights, kdim != embed_dim): q, k, v are three
    Linear maps on their own inputs; the packed weight and the bias get grouped entries."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = _Attention(cross=True, kdim=kdim).double().eval()
        x = torch.randn(3, 5, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    for approx in ("expand", "reduce"):
        want = R.kron_blocks(model, x, y, "classification", approx=approx, N=4)
        loss, K = curvlib.AutogradGGN(model, "classification").kron(x, y, N=4, kfac_approx=approx)
        _assert_blocks(_blocks(K, model), want)
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: [tuple(f.shape) for f in F] for n, F in zip(names, K.kfacs, strict=True)}
    if kdim is None:
        assert shapes["attn.in_proj_weight"] == [(3, 4, 4), (3, 4, 4)]
    else:
        assert shapes["attn.k_proj_weight"] == [(4, 4), (5, 5)]
    assert shapes["attn.in_proj_bias"] == [(3, 4, 4)]


def test_attention_outputs_unchanged_while_recorded():
    """While the rule records the projections, the module's outputs and its attention
    weights (need_weights=True) are those of nn.MultiheadAttention."""
    from curvlib.kfac.capture import capture
    from curvlib.kfac.rules import rule_for

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        mha = nn.MultiheadAttention(4, 2).double().eval()
        x = torch.randn(5, 3, 4, dtype=torch.float64)
        mask = torch.zeros(3, 5, dtype=torch.bool)
        mask[1, -2:] = True
    with torch.no_grad():
        want = mha(x, x, x, key_padding_mask=mask, need_weights=True, average_attn_weights=False)
    with capture([(mha, rule_for(mha))]) as store, torch.no_grad():
        got = mha(x, x, x, key_padding_mask=mask, need_weights=True, average_attn_weights=False)
    assert [s.role for s in store[id(mha)]] == ["in_proj", "out_proj"]
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert len(mha._forward_hooks) == 0 and len(mha._forward_pre_hooks) == 0
    assert torch._C._len_torch_function_stack() == 0


def test_large_bare_parameter_gets_its_exact_diagonal():
    """A parameter without a rule above DENSE_BLOCK_MAX entries: the exact block's diagonal
    as a 1-D factor (a dense block of that size would not fit in general)."""
    from curvlib.kfac import DENSE_BLOCK_MAX

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.rand(DENSE_BLOCK_MAX + 52) + 0.5)
            self.head = nn.Linear(DENSE_BLOCK_MAX + 52, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(x * self.scale))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = Scaled().double()
        x = torch.randn(4, DENSE_BLOCK_MAX + 52, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    J, f = R.jacobians(model, x)
    L = R.output_hessians(f, y, "classification")
    n = model.scale.numel()
    want = torch.einsum("nkp,nkj,njp->p", J[..., :n], L, J[..., :n])
    for backend in ("autograd", "auto"):
        loss, K = curvlib.backend_class(backend, "ggn")(model, "classification").kron(x, y, N=4)
        (d,) = K.kfacs[0]
        assert d.ndim == 1 and R.rel_err(d, want) < TOL
