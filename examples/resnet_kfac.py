"""K-FAC of a small ResNet with BatchNorm, a Laplace log-determinant and a Laplace predictive.

A residual network from torchvision's ``BasicBlock`` (BatchNorm in eval mode, in-place ReLU,
``out += identity``) learns which quadrant of a noisy 8x8 image holds a bright blob.

1. ``curvlib.fit(curvlib.AutogradGGN(model, "classification"), loader, "kron")``: the
   K-FAC of the GGN over the training set. Convolutions and the final Linear layer get
   Kronecker factors (the ``expand`` variant over their output locations), each BatchNorm
   parameter its exact curvature block: every trainable parameter is covered.
2. The eigendecomposed posterior precision ``K + δI`` and its log-determinant, for a few
   prior precisions ``δ`` (the Occam term of the Laplace marginal likelihood).
3. laplace-torch's ``Laplace(..., hessian_structure="kron")`` with curvlib's autograd
   backend: the prior precision tuned by the marginal likelihood, and the MAP against the
   linearized Laplace predictive on clean held-out images and on noisier ones.

Run: ``python examples/resnet_kfac.py`` (about 10 s of CPU time; ``--small``: fewer data
points and training steps).
"""

import argparse
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvlib
from curvlib.kfac import coverage

torch.set_num_threads(1)
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--small", action="store_true", help="a smaller run (seconds)")
small = parser.parse_args().small
N_TRAIN, N_TEST, EPOCHS = (128, 128, 3) if small else (512, 256, 6)


class TinyResNet(nn.Module):
    """A stem, two BasicBlocks (the second downsampling), pooling, a Linear head."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.stem = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        )
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=down))
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def images(n: int, noise: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 4, (n,), generator=gen)
    x = noise * torch.randn(n, 1, 8, 8, generator=gen)
    for i, q in enumerate(y.tolist()):
        r, c = 4 * (q // 2), 4 * (q % 2)
        x[i, 0, r + 1 : r + 3, c + 1 : c + 3] += 1.0
    return x, y


def report(name: str, probs: torch.Tensor, y: torch.Tensor) -> None:
    nll = -probs[torch.arange(len(y)), y].log().mean()
    acc = (probs.argmax(-1) == y).float().mean()
    print(f"  {name:8s} accuracy {acc:.3f}  mean confidence {probs.max(-1).values.mean():.3f}"
          f"  NLL {nll:.4f}")  # fmt: skip


def main() -> None:
    with warnings.catch_warnings():  # laplace-torch imports asdfghjkl (torch.jit.script)
        warnings.simplefilter("ignore", FutureWarning)
        from laplace import Laplace

        from curvlib.integrations.laplace import laplace_backend

    t0 = time.process_time()
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the model's initialization
        model = TinyResNet()
    x, y = images(N_TRAIN, 0.5, gen)
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(EPOCHS):
        for xb, yb in train:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()  # BatchNorm from its running statistics: curvature per data point
    loader = DataLoader(TensorDataset(x, y), batch_size=64)

    # 1. K-FAC over the training set
    curv = curvlib.AutogradGGN(model, "classification")
    total_loss, N, K = curvlib.fit(curv, loader, "kron", progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    cov = coverage(model, params)
    kinds: dict[str, int] = {}
    for i in range(len(params)):
        kind = cov.describe(i).split(" of ")[0]
        kinds[kind] = kinds.get(kind, 0) + params[i].numel()
    print(f"K-FAC of {sum(p.numel() for p in params)} parameters in {len(K)} entries "
          f"(N={N}, loss {total_loss.item():.2f}):")  # fmt: skip
    for kind, n in kinds.items():
        print(f"  {n:6d} parameters by {kind}")

    # 2. log-determinants of the posterior precision
    decomposed = K.decompose()
    for delta in (0.1, 1.0, 10.0):
        print(f"  logdet(K + {delta:4.1f} I) = {(decomposed + delta).logdet().item():9.2f}")

    # 3. laplace-torch with curvlib's backend
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="kron",
        backend=laplace_backend("autograd", "ggn"),
    )
    la.fit(loader, progress_bar=False)
    with warnings.catch_warnings():  # laplace-torch's reminder that probit is the default
        warnings.filterwarnings("ignore", message="By default `link_approx`")
        la.optimize_prior_precision(method="marglik", n_steps=100)
    print(f"Laplace: prior precision {la.prior_precision.item():.3f}, "
          f"log marginal likelihood {la.log_marginal_likelihood().item():.2f}")  # fmt: skip
    for noise in (0.5, 1.5):
        xt, yt = images(N_TEST, noise, gen)
        with torch.no_grad():
            map_probs = torch.softmax(model(xt), -1)
        la_probs = la(xt, pred_type="glm", link_approx="probit")
        print(f"held-out images, noise {noise}:")
        report("MAP", map_probs, yt)
        report("Laplace", la_probs, yt)
    print(f"CPU time {time.process_time() - t0:.1f} s")


if __name__ == "__main__":
    main()
