r"""The benchmark's workloads: a model, a likelihood and one fixed batch each.

Every workload is built with fixed seeds in float32 from random data (no download; the cost
of a curvature does not depend on the values). The weights are drawn from seed 0 inside
``torch.random.fork_rng`` so that building a workload leaves the caller's global RNG as it
was; the data come from their own ``torch.Generator``.

A workload may name ``pending`` structures: parts of it that curvlib cannot compute yet. A
row of a pending structure is skipped with the recorded reason while
``curvlib.supports(model, backend, curvature, structure)`` says no, and runs by itself once
curvlib supports it (the hook for the transformer with affine LayerNorms).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "QUICK_FULL_SCOPE",
    "QUICK_WORKLOADS",
    "WORKLOADS",
    "Workload",
    "activation_bytes",
    "build",
    "mlp",
]


@dataclass
class Workload:
    """One benchmark problem.

    Attributes
    ----------
    name, description : str
        Short name (``--workloads``) and one line for the report.
    likelihood : str
        ``"classification"`` or ``"regression"``.
    model : nn.Module
        In the mode it is benchmarked in (``eval()`` where it has BatchNorm).
    x, y : Tensor
        The batch.
    pending : dict[str, str]
        Structure -> why curvlib cannot compute it yet (see the module docstring).
    """

    name: str
    description: str
    likelihood: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    pending: dict[str, str] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def num_outputs(self) -> int:
        with torch.no_grad():
            return int(self.model(self.x[:1]).shape[-1])

    def to(self, device: str) -> Workload:
        self.model.to(device)
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the input and of every leaf module's output in one forward pass.

    The memory a backward pass needs to keep (the activations), the yardstick of the
    peak-memory target: ``sum over leaf modules of numel(output) * element size``.
    """
    total = [x.numel() * x.element_size()]

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * out.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


# -- models ---------------------------------------------------------------------------------------
def _mlp_model(widths: list[int], act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class _Block(nn.Module):
    """Embedding, one self-attention and one MLP sub-block, mean-pool, a linear head.

    Every Linear module is called once per forward pass (curvlib's per-layer rules need
    that). ``affine`` gives the LayerNorms a weight and a bias.
    """

    def __init__(self, d_in: int, d: int, heads: int, hidden: int, C: int, affine: bool) -> None:
        super().__init__()
        self.d, self.heads = d, heads
        self.embed = nn.Linear(d_in, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm1 = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=affine)
        self.head = nn.Linear(d, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        d, heads = self.d, self.heads
        h = self.embed(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, L, heads, d // heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        h = self.norm1(h + self.o((att @ v).transpose(1, 2).reshape(B, L, d)))
        h = self.norm2(h + self.fc2(self.act(self.fc1(h))))
        return self.head(h.mean(1))


def _resnet() -> nn.Module:
    """A stem convolution and two torchvision ``BasicBlock`` s (the second with stride 2 and
    a 1×1 downsampling shortcut), BatchNorm everywhere (used in eval mode), a linear head."""
    from torchvision.models.resnet import BasicBlock

    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        BasicBlock(16, 16),
        BasicBlock(16, 32, stride=2, downsample=down),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


# -- workloads ------------------------------------------------------------------------------------
def _classes(g: torch.Generator, n: int, C: int) -> torch.Tensor:
    return torch.randint(0, C, (n,), generator=g)


def mlp(batch: int = 128, width: int = 128) -> Workload:
    """MLP 784-width-width-10 (ReLU), classification: the main workload and the scaling rows."""
    model = _seeded(lambda: _mlp_model([784, width, width, 10]))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 784, generator=g), _classes(g, batch, 10)
    desc = f"MLP 784-{width}-{width}-10, classification, batch {batch}"
    return Workload("mlp", desc, "classification", model, x, y)


def _regression() -> Workload:
    model = _seeded(lambda: _mlp_model([20, 64, 64, 5], nn.Tanh))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 20, generator=g), torch.randn(256, 5, generator=g)
    return Workload(
        "regression",
        "MLP 20-64-64-5 (tanh), regression, batch 256",
        "regression",
        model,
        x,
        y,
    )


def _cnn() -> Workload:
    model = _seeded(
        lambda: nn.Sequential(
            nn.Conv2d(1, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(256, 10),
        )
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 28, 28, generator=g), _classes(g, 64, 10)
    return Workload(
        "cnn",
        "LeNet-style CNN (2 Conv2d + max-pool + Linear) on 1x28x28, 10 classes, batch 64",
        "classification",
        model,
        x,
        y,
    )


def _cnn2() -> Workload:
    model = _seeded(
        lambda: nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 10),
        )
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 32, 32, generator=g), _classes(g, 32, 10)
    return Workload(
        "cnn2",
        "CNN Conv2d 3→16→32 (3x3, padding 1, ReLU, max-pool) + Linear on 3x32x32, "
        "10 classes, batch 32",
        "classification",
        model,
        x,
        y,
    )


def _resnet_workload() -> Workload:
    model = _seeded(_resnet)
    model.eval()  # BatchNorm with its running statistics: a per-channel affine map
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 32, 32, generator=g), _classes(g, 16, 10)
    return Workload(
        "resnet",
        "small ResNet (stem conv + 2 torchvision BasicBlocks, BatchNorm in eval mode, "
        "avg-pool, Linear) on 3x32x32, 10 classes, batch 16",
        "classification",
        model,
        x,
        y,
    )


def _mlp100() -> Workload:
    model = _seeded(lambda: _mlp_model([784, 256, 100]))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 784, generator=g), _classes(g, 64, 100)
    return Workload(
        "mlp100", "MLP 784-256-100, 100 classes, batch 64", "classification", model, x, y
    )


def _transformer(affine: bool) -> Workload:
    model = _seeded(lambda: _Block(16, 32, 2, 64, 10, affine))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, 16, generator=g), _classes(g, 64, 10)
    norm = "affine LayerNorm" if affine else "parameter-free LayerNorm"
    pending = {}
    if affine:
        pending["kron"] = "affine LayerNorm: curvlib has no K-FAC rule for it yet"
    return Workload(
        "transformer_ln" if affine else "transformer",
        "Transformer-style block (Linear embed, 2-head self-attention, "
        f"MLP, {norm}, mean-pool, Linear head) on sequences "
        "of length 16, 10 classes, batch 64",
        "classification",
        model,
        x,
        y,
        pending,
    )


def _seeded(make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` with the weights drawn from seed 0; the global RNG is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return make()


_BUILDERS: dict[str, Callable[[], Workload]] = {
    "mlp": mlp,
    "regression": _regression,
    "cnn": _cnn,
    "cnn2": _cnn2,
    "resnet": _resnet_workload,
    "mlp100": _mlp100,
    "transformer": lambda: _transformer(False),
    "transformer_ln": lambda: _transformer(True),
}

#: every workload, in the order they run; ``scaling`` is the MLP at several batch sizes and
#: widths (:mod:`bench.scaling`)
WORKLOADS = (*_BUILDERS, "scaling")

#: ``--quick``: one workload per kind of row (see docs/performance.md)
QUICK_WORKLOADS = ("mlp", "regression", "cnn2", "resnet", "mlp100", "transformer_ln", "scaling")
#: ``--quick`` measures every row on these; a reduced set on the others (bench.session)
QUICK_FULL_SCOPE = ("mlp",)


def build(name: str) -> Workload:
    """The workload ``name`` (one of :data:`WORKLOADS` except ``scaling``)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown workload {name!r}; known: {list(_BUILDERS)}")
    return _BUILDERS[name]()
