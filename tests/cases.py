"""The shared test cases: models x likelihoods x shapes, float64, fixed seeds.

Every backend, curvature and entry point is run on these by ``tests/test_oracle.py`` and
compared with the brute force of ``tests/reference.py``. ``Case.make`` seeds inside
:func:`torch.random.fork_rng`: building a case never changes the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


class LastLayerModel(nn.Module):
    """A model exposing ``last_layer`` and ``forward_with_features`` (as laplace's)."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.last_layer = nn.Linear(hidden, d_out)

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        phi = self.body(x)
        return self.last_layer(phi), phi

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_features(x)[0]


class SeqModel(nn.Module):
    """A Linear layer applied to sequences (weight sharing over L), then a readout."""

    def __init__(self, d: int = 4, h: int = 5, c: int = 3) -> None:
        super().__init__()
        self.proj = nn.Linear(d, h)
        self.act = nn.Tanh()
        self.head = nn.Linear(h, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.proj(x)).sum(1))


class TiedModel(nn.Module):
    """One Linear layer called twice per forward (tied weights)."""

    def __init__(self, d: int = 4, c: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


@dataclass
class Case:
    name: str
    likelihood: str
    build: callable
    x_shape: tuple
    C: int
    last_layer: bool = False
    subnetwork: bool = False
    kron: bool = True  # every selected parameter sits in a K-FAC-supported layer
    batch: int = 5
    extra: dict = field(default_factory=dict)

    @property
    def kron_exact(self) -> bool:
        """K-FAC is exact: one data point and no weight sharing (an MLP with batch 1)."""
        return self.batch == 1 and self.name.startswith("mlp")

    def make(self, seed: int = 0):
        """``(model, x, y, subnetwork_indices)``; the global RNG is left untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build().double()
            x = torch.randn(self.batch, *self.x_shape, dtype=torch.float64)
            if self.likelihood == "classification":
                y = torch.randint(0, self.C, (self.batch,))
            else:
                y = torch.randn(self.batch, self.C, dtype=torch.float64)
            subnet = None
            if self.subnetwork:
                P = sum(p.numel() for p in model.parameters() if p.requires_grad)
                subnet = torch.randperm(P)[: P // 3].sort().values
        return model, x, y, subnet


class PostOp(nn.Module):
    """A functional operation after the last module: ``f = 2 net(x) - 1``."""

    def __init__(self, d: int = 4, h: int = 5, c: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c))

    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * self.net(x) - 1.0


def _eval_layers():
    m = nn.Sequential(
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Linear(6, 3),
    )
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.normal_()
    return m.eval()


def _frozen():
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    m[0].weight.requires_grad_(False)
    m[0].bias.requires_grad_(False)
    m[2].weight.requires_grad_(False)  # weight frozen, bias trainable
    return m


CASES = [
    Case(
        "mlp_cls",
        "classification",
        lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)),
        (5,),
        4,
    ),
    Case(
        "mlp_reg",
        "regression",
        lambda: nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3)),
        (4,),
        3,
    ),
    Case(
        "cnn_cls",
        "classification",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2, stride=2),
            nn.Flatten(),
            nn.Linear(8, 3),
        ),
        (2, 6, 6),
        3,
        batch=4,
    ),
    Case(
        "conv1d_reg",
        "regression",
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2)
        ),
        (2, 6),
        2,
        batch=4,
    ),
    Case("frozen_reg", "regression", _frozen, (4,), 2),
    Case(
        "lastlayer_cls", "classification", lambda: LastLayerModel(4, 6, 3), (4,), 3, last_layer=True
    ),
    Case(
        "subnet_cls",
        "classification",
        lambda: nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)),
        (5,),
        3,
        subnetwork=True,
        kron=False,
    ),
    Case("seq_cls", "classification", SeqModel, (3, 4), 3, batch=4),
    # modules without per-layer rules: the generic torch.func path
    Case(
        "layernorm_reg",
        "regression",
        lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)),
        (4,),
        2,
        kron=False,
    ),
    Case("tied_cls", "classification", TiedModel, (4,), 3, kron=False),
    # one data point, no weight sharing: K-FAC is exact (the brute-force block diagonal)
    Case(
        "mlp_b1_cls",
        "classification",
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
        (4,),
        3,
        batch=1,
    ),
    Case(
        "mlp_b1_reg",
        "regression",
        lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
        (3,),
        2,
        batch=1,
    ),
    # eval-mode BatchNorm (an affine map with running statistics), in-place ReLU, Dropout
    Case("eval_layers_cls", "classification", _eval_layers, (4,), 3, kron=False),
    # an operation between the last module and the loss, written in forward
    Case("postop_reg", "regression", lambda: PostOp(4, 5, 2), (4,), 2),
]

CASE_IDS = [c.name for c in CASES]
