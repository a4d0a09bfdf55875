"""The model zoo: tiny random-init versions of the models researchers bring, in float64.

Each :class:`ZooCase` builds ``(model, x, y)`` from a config (nothing is downloaded) with fixed
seeds inside :func:`torch.random.fork_rng`, so building a case never changes the global RNG.
Models are in eval mode (BatchNorm with non-trivial running statistics, Dropout off).
``tests/zoo_reference.py`` holds the float64 brute-force references for them.

Output conventions (DESIGN §10): a model returns ``(B, C)``, or ``(B, L, C)`` for a per-token
case (``per_token=True``); classification targets are integers ``(B,)`` / ``(B, L)`` where
``-100`` marks ignored positions, regression targets have the output's shape. ``N`` counts
sequences.

``ZooCase.ref_model(model)`` is what the reference calls: the model itself, or for a raw
HuggingFace model (whose forward takes keywords and returns an output object) the
:class:`HFLogits` wrapper of laplace-torch's LLM example around it (same Parameters).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

# tiny HF models are built from configs: nothing may be downloaded
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DT = torch.float64
IGNORE = -100

__all__ = ["ZooCase", "ZOO", "ZOO_IDS", "get", "select", "HFLogits", "IGNORE"]


@dataclass(frozen=True)
class ZooCase:
    """One model of the zoo.

    Attributes
    ----------
    name : str
    builder : callable
        ``() -> (model, x, y)``, run by :meth:`make` under a fixed seed.
    likelihood : {"classification", "regression"}
    per_token : bool
        The output has positions: ``(B, L, C)`` (targets ``(B, L)`` / ``(B, L, C)``).
    dense : bool
        Dense ``P × P`` references (full GGN, Hessian) are affordable (``P ≲ 2000``).
    slow : bool
        The references take more than a few seconds.
    trainable : str
        Which parameters have ``requires_grad=True``.
    requires : tuple of str
        Optional packages the builder imports (the case is skipped without them).
    wrap : callable, optional
        ``model -> module`` that the reference calls instead of ``model``.
    dict_input : bool
        ``x`` is a dict (HuggingFace style, ``input_ids`` first).
    notes : str
    """

    name: str
    builder: Callable[[], tuple[nn.Module, Any, Tensor]]
    likelihood: str
    per_token: bool = False
    dense: bool = True
    slow: bool = False
    trainable: str = "all"
    requires: tuple[str, ...] = ()
    wrap: Callable[[nn.Module], nn.Module] | None = None
    dict_input: bool = False
    notes: str = ""
    tags: tuple[str, ...] = field(default=())

    def make(self, seed: int = 0) -> tuple[nn.Module, Any, Tensor]:
        """``(model, x, y)`` in float64, eval mode; the global RNG is left untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, x, y = self.builder()
        return model, x, y

    def ref_model(self, model: nn.Module) -> nn.Module:
        """The module the reference calls (``model`` or its wrapper, same Parameters)."""
        return model if self.wrap is None else self.wrap(model)

    def available(self) -> bool:
        """Whether the optional packages of this case are importable."""
        import importlib.util

        return all(importlib.util.find_spec(r) is not None for r in self.requires)


# ---------------------------------------------------------------------------- helpers
def _finish(model: nn.Module) -> nn.Module:
    """float64, eval mode, non-trivial norm affine parameters and running statistics."""
    model = model.to(DT).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0.0, 0.3)
    return model


def _randn(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=DT)


def _cls_y(B: int, C: int) -> Tensor:
    return torch.randint(0, C, (B,))


def _token_y(B: int, L: int, C: int, mask: Tensor | None = None) -> Tensor:
    """Integer targets ``(B, L)`` with some positions set to :data:`IGNORE`."""
    y = torch.randint(0, C, (B, L))
    y[0, -1] = IGNORE
    y[-1, 0] = IGNORE
    if mask is not None:
        y[mask == 0] = IGNORE
    return y


def _hf_tokens(B: int, L: int, vocab: int) -> dict[str, Tensor]:
    """``input_ids`` (tokens 1..vocab-1, 0 is padding) and ``attention_mask``, right-padded."""
    ids = torch.randint(1, vocab, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L - 2 :] = 0
    if B > 2:
        mask[2, L - 1 :] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------- modules
class RNNClassifier(nn.Module):
    """``nn.GRU`` / ``nn.LSTM`` (batch_first), the last step's output, a Linear head."""

    def __init__(self, cell: type[nn.RNNBase], d: int = 3, h: int = 5, c: int = 3) -> None:
        super().__init__()
        self.rnn = cell(d, h, batch_first=True)
        self.head = nn.Linear(h, c)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` self-attention (q = k = v), mean-pooled, a Linear head."""

    def __init__(self, e: int = 4, heads: int = 2, c: int = 3) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)
        self.head = nn.Linear(e, c)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.attn(x, x, x)
        return self.head(h.mean(1))


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoderLayer`` (eval), mean-pooled, a Linear head; x is ``(B, L, E)``.

    With ``batch_first=False`` the layer sees ``(L, B, E)`` (the model transposes).
    """

    def __init__(self, batch_first: bool, e: int = 4, c: int = 3) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.enc = nn.TransformerEncoderLayer(
            e, nhead=2, dim_feedforward=8, dropout=0.1, batch_first=batch_first
        )
        self.head = nn.Linear(e, c)

    def forward(self, x: Tensor) -> Tensor:
        if self.batch_first:
            return self.head(self.enc(x).mean(1))
        return self.head(self.enc(x.transpose(0, 1)).mean(0))


class TiedLinears(nn.Module):
    """Two Linear modules sharing one weight Parameter (own biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TokenClassifier(nn.Module):
    """Embedding + Linear producing per-token logits ``(B, L, C)``."""

    def __init__(self, vocab: int = 10, d: int = 4, c: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(x)))


class EmbeddingPooled(nn.Module):
    """Embedding (with ``padding_idx=0``), mean over positions, a Linear head."""

    def __init__(self, vocab: int = 12, d: int = 4, c: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.head = nn.Linear(d, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(x)).mean(1))


class MyLinear(nn.Linear):
    """A subclass of ``nn.Linear`` that changes nothing."""


class WithUnused(nn.Module):
    """A model whose ``unused`` Linear is never called (zero gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.unused = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc(x)))


class BareParameter(nn.Module):
    """A bare ``nn.Parameter`` (a per-output scale) used in forward next to Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.rand(3) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc(x))) * self.scale


class TinyResNet(nn.Module):
    """A small residual net from torchvision's ``BasicBlock`` (BatchNorm, in-place ReLU)."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.stem = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        )
        down = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
        self.layer1 = BasicBlock(4, 4)
        self.layer2 = BasicBlock(4, 6, stride=2, downsample=down)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, c)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer2(self.layer1(self.stem(x)))
        return self.fc(self.pool(h).flatten(1))


class HFLogits(nn.Module):
    """laplace-torch's LLM-example wrapper: ``forward(data: dict) -> logits``."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.training = hf_model.training  # the wrapper takes the mode of what it wraps

    def forward(self, data: Mapping[str, Tensor]) -> Tensor:
        device = next(self.parameters()).device
        out = self.hf_model(
            input_ids=data["input_ids"].to(device),
            attention_mask=data["attention_mask"].to(device),
        )
        return out.logits


# ------------------------------------------------------------------------- builders
def _rnn(cell: type[nn.RNNBase], likelihood: str) -> Callable:
    def build():
        model = _finish(RNNClassifier(cell))
        x = _randn(3, 4, 3)
        y = _cls_y(3, 3) if likelihood == "classification" else _randn(3, 3)
        return model, x, y

    return build


def _mha():
    return _finish(SelfAttention()), _randn(3, 4, 4), _cls_y(3, 3)


def _encoder(batch_first: bool) -> Callable:
    def build():
        return _finish(EncoderClassifier(batch_first)), _randn(3, 4, 4), _cls_y(3, 3)

    return build


def _called_twice():
    lin = nn.Linear(4, 4)
    model = _finish(nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU(), nn.Linear(4, 3)))
    return model, _randn(4, 4), _cls_y(4, 3)


def _tied():
    return _finish(TiedLinears()), _randn(4, 4), _cls_y(4, 3)


def _token_cls():
    x = torch.randint(0, 10, (3, 4))
    return _finish(TokenClassifier()), x, _token_y(3, 4, 5)


def _token_reg():
    model = _finish(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)))
    return model, _randn(3, 4, 3), _randn(3, 4, 2)


def _tiny_resnet():
    return _finish(TinyResNet()), _randn(2, 3, 8, 8), _cls_y(2, 3)


def _resnet18():
    from torchvision.models import resnet18

    return _finish(resnet18(num_classes=3)), _randn(2, 3, 16, 16), _cls_y(2, 3)


def _vit():
    from torchvision.models import VisionTransformer

    model = VisionTransformer(
        image_size=8,
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
        num_classes=3,
    )
    with torch.no_grad():  # the head (and class token) are zero-initialised: perturb
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return _finish(model), _randn(2, 3, 8, 8), _cls_y(2, 3)


def _bert_model():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
        pad_token_id=0,
        initializer_range=0.3,
    )
    return _finish(BertForSequenceClassification(config))


def _bert(raw: bool) -> Callable:
    def build():
        hf = _bert_model()
        model = hf if raw else HFLogits(hf)
        return model, _hf_tokens(3, 6, 30), _cls_y(3, 3)

    return build


def _gpt2_config(num_labels: int = 3):
    from transformers import GPT2Config

    return GPT2Config(
        n_embd=8,
        n_layer=1,
        n_head=2,
        vocab_size=30,
        n_positions=16,
        num_labels=num_labels,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        initializer_range=0.3,
    )


def _gpt2_cls():
    from transformers import GPT2ForSequenceClassification

    model = HFLogits(_finish(GPT2ForSequenceClassification(_gpt2_config())))
    return model, _hf_tokens(3, 6, 30), _cls_y(3, 3)


def _gpt2_lm():
    from transformers import GPT2LMHeadModel

    model = HFLogits(_finish(GPT2LMHeadModel(_gpt2_config())))
    x = _hf_tokens(2, 5, 30)
    return model, x, _token_y(2, 5, 30, x["attention_mask"])


def _lora(hf: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["c_attn"],
        lora_dropout=0.0,
        fan_in_fan_out=True,
        init_lora_weights=False,  # random A and B: a zero B would make A's Jacobian zero
    )
    with warnings.catch_warnings():  # peft calls a deprecated transformers property
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        peft_model = get_peft_model(hf, config)
    return _finish(peft_model)


def _gpt2_lora_cls():
    from transformers import GPT2ForSequenceClassification

    model = HFLogits(_lora(GPT2ForSequenceClassification(_gpt2_config())))
    return model, _hf_tokens(3, 6, 30), _cls_y(3, 3)


def _gpt2_lora_lm():
    from transformers import GPT2LMHeadModel

    model = HFLogits(_lora(GPT2LMHeadModel(_gpt2_config())))
    x = _hf_tokens(2, 5, 30)
    return model, x, _token_y(2, 5, 30, x["attention_mask"])


def _conv_net(conv: nn.Module, flat: int, x_shape: tuple[int, ...], lik: str = "classification"):
    def build():
        model = _finish(nn.Sequential(conv(), nn.Tanh(), nn.Flatten(), nn.Linear(flat, 3)))
        B = 3
        x = _randn(B, *x_shape)
        y = _cls_y(B, 3) if lik == "classification" else _randn(B, 3)
        return model, x, y

    return build


def _norm_net(norm: Callable[[], nn.Module], x_shape: tuple[int, ...], flat: int, conv: bool):
    def build():
        first = nn.Conv2d(2, 4, 3) if conv else nn.Linear(x_shape[-1], 4)
        model = _finish(nn.Sequential(first, norm(), nn.Tanh(), nn.Flatten(), nn.Linear(flat, 3)))
        return model, _randn(4, *x_shape), _cls_y(4, 3)

    return build


def _layernorm_reg():
    model = _finish(nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)))
    return model, _randn(4, 4), _randn(4, 2)


def _embedding():
    x = torch.randint(0, 12, (4, 5))
    x[0, -2:] = 0  # padding tokens
    return _finish(EmbeddingPooled()), x, _cls_y(4, 3)


def _mylinear():
    model = _finish(nn.Sequential(MyLinear(4, 5), nn.Tanh(), MyLinear(5, 3)))
    return model, _randn(4, 4), _cls_y(4, 3)


def _unused():
    return _finish(WithUnused()), _randn(4, 4), _cls_y(4, 3)


def _bare():
    return _finish(BareParameter()), _randn(4, 4), _randn(4, 3)


_HF = ("transformers",)
_TV = ("torchvision",)
_PEFT = ("transformers", "peft")

ZOO: list[ZooCase] = [
    ZooCase("gru_cls", _rnn(nn.GRU, "classification"), "classification", tags=("rnn",)),
    ZooCase("lstm_reg", _rnn(nn.LSTM, "regression"), "regression", tags=("rnn",)),
    ZooCase("mha_cls", _mha, "classification", tags=("attention",)),
    ZooCase(
        "encoder_bf_cls",
        _encoder(True),
        "classification",
        tags=("attention",),
        notes="TransformerEncoderLayer batch_first=True, eval (dropout off)",
    ),
    ZooCase(
        "encoder_sf_cls",
        _encoder(False),
        "classification",
        tags=("attention",),
        notes="TransformerEncoderLayer batch_first=False: the model transposes to (L, B, E)",
    ),
    ZooCase(
        "called_twice_cls",
        _called_twice,
        "classification",
        tags=("sharing",),
        notes="one Linear module called twice in an nn.Sequential (it appears twice)",
    ),
    ZooCase(
        "tied_cls",
        _tied,
        "classification",
        tags=("sharing",),
        notes="two Linear modules share one weight Parameter (a.weight is b.weight)",
    ),
    ZooCase(
        "token_cls",
        _token_cls,
        "classification",
        per_token=True,
        tags=("tokens",),
        notes="Embedding + Linear, logits (B, L, C), targets (B, L) with -100 positions",
    ),
    ZooCase(
        "token_reg",
        _token_reg,
        "regression",
        per_token=True,
        tags=("tokens",),
        notes="Linear on sequences, outputs and targets (B, L, C)",
    ),
    ZooCase(
        "tiny_resnet_cls",
        _tiny_resnet,
        "classification",
        requires=_TV,
        tags=("vision",),
        notes="torchvision BasicBlocks (4-6 channels), BatchNorm eval, in-place ReLU, 8x8",
    ),
    ZooCase(
        "resnet18_cls",
        _resnet18,
        "classification",
        dense=False,
        slow=True,
        requires=_TV,
        tags=("vision",),
        notes="the real torchvision resnet18 (11M params), 16x16, batch 2",
    ),
    ZooCase(
        "vit_cls",
        _vit,
        "classification",
        requires=_TV,
        tags=("vision", "attention"),
        notes="torchvision VisionTransformer: bare Parameters class_token, pos_embedding; "
        "MHA whose out_proj is used functionally",
    ),
    ZooCase(
        "bert_cls",
        _bert(raw=False),
        "classification",
        requires=_HF,
        dict_input=True,
        tags=("hf", "attention"),
        notes="BertForSequenceClassification in HFLogits",
    ),
    ZooCase(
        "bert_raw_cls",
        _bert(raw=True),
        "classification",
        requires=_HF,
        dict_input=True,
        wrap=HFLogits,
        tags=("hf", "attention"),
        notes="the raw HF model: forward(input_ids=..., ...) returns an output object; "
        "the reference calls HFLogits(model)",
    ),
    ZooCase(
        "gpt2_cls",
        _gpt2_cls,
        "classification",
        requires=_HF,
        dict_input=True,
        tags=("hf", "attention"),
        notes="GPT2ForSequenceClassification (pad_token_id=0) in HFLogits; HF Conv1D layers",
    ),
    ZooCase(
        "gpt2_lm",
        _gpt2_lm,
        "classification",
        per_token=True,
        requires=_HF,
        dict_input=True,
        tags=("hf", "attention", "tokens", "sharing"),
        notes="GPT2LMHeadModel in HFLogits: logits (B, L, V), lm_head tied to wte",
    ),
    ZooCase(
        "gpt2_lora_cls",
        _gpt2_lora_cls,
        "classification",
        requires=_PEFT,
        dict_input=True,
        trainable="LoRA A/B of c_attn only",
        tags=("hf", "lora"),
        notes="peft LoRA r=2 on c_attn (fan_in_fan_out), random B; base frozen",
    ),
    ZooCase(
        "gpt2_lora_lm",
        _gpt2_lora_lm,
        "classification",
        per_token=True,
        requires=_PEFT,
        dict_input=True,
        trainable="LoRA A/B of c_attn only",
        tags=("hf", "lora", "tokens"),
        notes="peft LoRA on GPT2LMHeadModel, per-token logits",
    ),
    ZooCase(
        "grouped_conv_cls",
        _conv_net(lambda: nn.Conv2d(4, 4, 3, groups=2), 64, (4, 6, 6)),
        "classification",
        tags=("conv",),
    ),
    ZooCase(
        "depthwise_conv_cls",
        _conv_net(lambda: nn.Conv2d(3, 6, 3, groups=3), 96, (3, 6, 6)),
        "classification",
        tags=("conv",),
        notes="depthwise with channel multiplier 2",
    ),
    ZooCase(
        "dilated_conv_cls",
        _conv_net(lambda: nn.Conv2d(2, 3, 3, dilation=2, padding=1, stride=2), 27, (2, 7, 7)),
        "classification",
        tags=("conv",),
    ),
    ZooCase(
        "convtranspose2d_cls",
        _conv_net(lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), 75, (2, 3, 3)),
        "classification",
        tags=("conv",),
    ),
    ZooCase(
        "conv1d_reg",
        _conv_net(lambda: nn.Conv1d(2, 3, 3, padding=1), 18, (2, 6), "regression"),
        "regression",
        tags=("conv",),
    ),
    ZooCase(
        "conv3d_cls",
        _conv_net(lambda: nn.Conv3d(2, 2, 2), 16, (2, 3, 3, 3)),
        "classification",
        tags=("conv",),
    ),
    ZooCase(
        "groupnorm_cls",
        _norm_net(lambda: nn.GroupNorm(2, 4), (2, 5, 5), 36, conv=True),
        "classification",
        tags=("norm",),
    ),
    ZooCase("layernorm_reg", _layernorm_reg, "regression", tags=("norm",)),
    ZooCase(
        "batchnorm1d_cls",
        _norm_net(lambda: nn.BatchNorm1d(4), (4,), 4, conv=False),
        "classification",
        tags=("norm",),
        notes="eval mode, random running statistics",
    ),
    ZooCase(
        "batchnorm2d_cls",
        _norm_net(lambda: nn.BatchNorm2d(4), (2, 5, 5), 36, conv=True),
        "classification",
        tags=("norm",),
        notes="eval mode, random running statistics",
    ),
    ZooCase(
        "embedding_cls",
        _embedding,
        "classification",
        tags=("tokens",),
        notes="Embedding(padding_idx=0) mean-pooled; some padding tokens",
    ),
    ZooCase("mylinear_cls", _mylinear, "classification", notes="class MyLinear(nn.Linear): pass"),
    ZooCase("unused_cls", _unused, "classification", notes="a Linear that is never called"),
    ZooCase("bare_param_reg", _bare, "regression", notes="a bare nn.Parameter in forward"),
]

ZOO_IDS = [c.name for c in ZOO]
_BY_NAME = {c.name: c for c in ZOO}


def get(name: str) -> ZooCase:
    """The case called ``name``."""
    return _BY_NAME[name]


def select(tag: str | None = None, dense: bool | None = None) -> list[ZooCase]:
    """The cases with ``tag`` (e.g. ``"hf"``, ``"tokens"``, ``"conv"``) and/or ``dense``."""
    return [
        c for c in ZOO if (tag is None or tag in c.tags) and (dense is None or c.dense == dense)
    ]
