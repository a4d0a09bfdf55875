r"""Likelihoods: the loss, its scale, its output-space Hessian and MC pseudo-targets.

This is the one place where these formulas live. Every backend expresses its curvature
through the *cotangents* a likelihood hands out: a tensor ``c`` of shape ``(B, K, C)`` with

.. math:: \sum_k c_{n,k} c_{n,k}^\top = M_n,

where :math:`M_n` is the output-space matrix of sample ``n`` that the curvature puts between
the Jacobians :math:`J_n^\top M_n J_n`:

* exact GGN: :math:`M_n = \Lambda(f_n)`, ``c`` the columns of a square root of
  :math:`\Lambda` (``sqrt_hessian``);
* Monte-Carlo Fisher: :math:`M_n = \frac1S \sum_s \tilde g_s \tilde g_s^\top` with
  :math:`\tilde g_s = \nabla_f(-\log p(\tilde y_s|f_n))`, :math:`\tilde y_s` drawn from the
  model's predictive (``sample_cotangents``);
* empirical Fisher: :math:`M_n = g_n g_n^\top`, :math:`g_n = \nabla_f` of sample ``n``'s term
  of the reported loss (``grad_output``).

Conventions (DESIGN §3):

================  ===========================  ========  ==============================
likelihood        ``lossfunc``                 factor    :math:`\Lambda(f)` of
                                                         ``factor * lossfunc``
================  ===========================  ========  ==============================
regression        ``MSELoss(reduction="sum")``  1/2      :math:`I`
classification    ``CrossEntropyLoss("sum")``   1        :math:`\mathrm{diag}(p) - pp^\top`
================  ===========================  ========  ==============================
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from curvlib.errors import LikelihoodError, NonFiniteError, TargetError

__all__ = ["Likelihood", "Regression", "Classification", "get_likelihood", "LIKELIHOODS"]


class Likelihood(ABC):
    """A likelihood :math:`p(y|f)` with its loss ``factor * lossfunc`` (sum reduction).

    Attributes
    ----------
    name : str
        ``"regression"`` or ``"classification"``.
    lossfunc : torch.nn.Module
        The torch loss with ``reduction="sum"``.
    factor : float
        Conversion factor between ``lossfunc`` and the negative log-likelihood.
    """

    name: str
    factor: float
    lossfunc: nn.Module

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return other == self.name
        return isinstance(other, Likelihood) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- validation ---------------------------------------------------------------------
    @staticmethod
    def check_output(f: Tensor) -> None:
        """Raise unless the model output ``f`` has shape ``(B, C)``."""
        if not isinstance(f, Tensor):
            raise TargetError(
                f"the model must return a tensor of shape (batch, outputs), got {type(f).__name__}"
            )
        if f.ndim != 2:
            raise TargetError(
                f"the model output must have shape (batch, outputs), got {tuple(f.shape)}; "
                "flatten or select the outputs in the model's forward"
            )
        if f.detach().sum().isfinite():  # NaN and inf propagate through a sum
            return
        bad = ~torch.isfinite(f.detach()).all(dim=1)
        if bad.any():
            idx = bad.nonzero().flatten().tolist()
            raise NonFiniteError(
                f"the model output is NaN or infinite for batch indices {idx[:10]}"
                + (" ..." if len(idx) > 10 else "")
                + "; check the inputs and the parameters of the model"
            )

    @abstractmethod
    def check_target(self, f: Tensor, y: Tensor) -> None:
        """Raise :class:`~curvlib.errors.TargetError` unless ``y`` fits the output ``f``."""

    # -- loss and derivatives ------------------------------------------------------------
    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """The reported batch loss ``factor * lossfunc(f, y)`` (sum over the batch)."""
        return self.factor * self.lossfunc(f, y)

    @abstractmethod
    def per_sample_loss(self, f: Tensor, y: Tensor) -> Tensor:
        """The terms ``factor * lossfunc(f_n, y_n)`` of the reported loss, shape ``(B,)``."""

    @abstractmethod
    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        r"""Per-sample gradient :math:`\nabla_{f_n}` of the reported loss, shape ``(B, C)``."""

    @abstractmethod
    def hessian(self, f: Tensor) -> Tensor:
        r"""Output-space Hessian :math:`\Lambda(f_n)` of the reported loss, ``(B, C, C)``."""

    @abstractmethod
    def sqrt_hessian(self, f: Tensor) -> Tensor:
        r"""A square root ``S`` with :math:`S S^\top = \Lambda(f_n)`, shape ``(B, C, C)``."""

    def sample_grad_outputs(
        self,
        f: Tensor,
        num_samples: int,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        r"""Pseudo-target gradients :math:`\tilde g = \nabla_f(-\log p(\tilde y|f))`.

        :math:`\tilde y` is drawn from the model's predictive; the result has shape
        ``(B, num_samples, C)`` and :math:`E[\tilde g \tilde g^\top] = \Lambda(f)`.
        ``generator`` may be one generator for the batch or a sequence of ``B`` generators,
        one per data point (draws keyed by the data point, independent of the batching).
        """
        if isinstance(generator, Sequence):
            if len(generator) != f.shape[0]:
                raise ValueError(
                    f"got {len(generator)} generators for a batch of {f.shape[0]}: pass one "
                    "generator, or one per data point"
                )
            return torch.cat(
                [
                    self._sample_grad_outputs(f[n : n + 1], num_samples, g)
                    for n, g in enumerate(generator)
                ]
            )
        return self._sample_grad_outputs(f, num_samples, generator)

    @abstractmethod
    def _sample_grad_outputs(
        self, f: Tensor, num_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Draw ``(B, num_samples, C)`` pseudo-target gradients with one generator."""

    # -- cotangents (see module docstring) -------------------------------------------------
    def sqrt_cotangents(self, f: Tensor) -> Tensor:
        """Cotangents ``(B, C, C)`` of the exact GGN: the columns of ``sqrt_hessian``."""
        return self.sqrt_hessian(f).transpose(1, 2)

    def mc_cotangents(
        self, f: Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Cotangents ``(B, S, C)`` of the MC Fisher: sampled gradients over ``sqrt(S)``."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        return self.sample_grad_outputs(f, num_samples, generator) / math.sqrt(num_samples)

    def ef_cotangents(self, f: Tensor, y: Tensor) -> Tensor:
        """Cotangents ``(B, 1, C)`` of the empirical Fisher: the per-sample loss gradients."""
        return self.grad_output(f, y).unsqueeze(1)


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} and dtype {t.dtype}"


class Regression(Likelihood):
    r"""Gaussian likelihood :math:`\mathcal N(y|f, I)`: loss ``1/2 * MSELoss(sum)``."""

    name = "regression"
    factor = 0.5

    def __init__(self) -> None:
        self.lossfunc = nn.MSELoss(reduction="sum")

    def check_target(self, f: Tensor, y: Tensor) -> None:
        if not isinstance(y, Tensor):
            raise TargetError(f"targets must be a tensor, got {type(y).__name__}")
        if not torch.is_floating_point(y):
            raise TargetError(
                f"regression targets must be floating point like the output ({f.dtype}), "
                f"got {_describe(y)}"
            )
        if y.shape != f.shape:
            raise TargetError(
                f"regression targets must have the output's shape {tuple(f.shape)} "
                f"(batch, outputs), got {_describe(y)}"
                + ("; use y.unsqueeze(-1)" if y.ndim == 1 and f.shape[-1] == 1 else "")
            )
        if y.dtype != f.dtype or y.device != f.device:
            raise TargetError(
                f"regression targets must have dtype {f.dtype} on {f.device} like the model "
                f"output, got dtype {y.dtype} on {y.device}"
            )

    def per_sample_loss(self, f: Tensor, y: Tensor) -> Tensor:
        return self.factor * (f - y).pow(2).sum(-1)

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        return f - y  # 2 * factor * (f - y)

    def hessian(self, f: Tensor) -> Tensor:
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        return eye.expand(f.shape[0], -1, -1)

    def sqrt_hessian(self, f: Tensor) -> Tensor:
        return self.hessian(f)

    def _sample_grad_outputs(
        self, f: Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        # y~ = f + eps, eps ~ N(0, I): grad_f(-log p) = f - y~ = -eps.
        shape = (f.shape[0], num_samples, f.shape[1])
        eps = torch.randn(
            shape, generator=generator, dtype=f.dtype, device=_gen_device(f, generator)
        )
        return -eps.to(f.device)


class Classification(Likelihood):
    r"""Categorical likelihood with logits ``f``: loss ``CrossEntropyLoss(sum)``."""

    name = "classification"
    factor = 1.0

    def __init__(self) -> None:
        self.lossfunc = nn.CrossEntropyLoss(reduction="sum")

    def check_target(self, f: Tensor, y: Tensor) -> None:
        if not isinstance(y, Tensor):
            raise TargetError(f"targets must be a tensor, got {type(y).__name__}")
        B, C = f.shape
        if torch.is_floating_point(y) or y.dtype == torch.bool or torch.is_complex(y):
            hint = ""
            if y.ndim == 2 and y.shape == f.shape:
                hint = "; one-hot targets are not accepted, pass y.argmax(-1)"
            raise TargetError(
                "classification targets must be integer class indices of shape "
                f"({B},) and dtype torch.long, got {_describe(y)}{hint}"
            )
        if y.shape != (B,):
            hint = "; use y.squeeze(-1)" if y.shape == (B, 1) else ""
            raise TargetError(
                f"classification targets must have shape ({B},) (one class index per sample), "
                f"got {_describe(y)}{hint}"
            )
        if y.device != f.device:
            raise TargetError(f"targets are on {y.device} but the model output is on {f.device}")
        if B > 0:
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= C:
                raise TargetError(
                    f"class indices must lie in [0, {C - 1}] for {C} outputs, "
                    f"got values in [{lo}, {hi}]"
                )

    def per_sample_loss(self, f: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(f, y, reduction="none")

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        p = torch.softmax(f, dim=-1)
        return p - nn.functional.one_hot(y, f.shape[-1]).to(p.dtype)

    def hessian(self, f: Tensor) -> Tensor:
        p = torch.softmax(f, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def sqrt_hessian(self, f: Tensor) -> Tensor:
        # S = diag(sqrt p) - p sqrt(p)^T satisfies S S^T = diag(p) - p p^T (uses sum p = 1).
        p = torch.softmax(f, dim=-1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)

    def _sample_grad_outputs(
        self, f: Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        # y~ ~ Categorical(p): grad_f(-log p(y~|f)) = p - e_{y~}.
        p = torch.softmax(f, dim=-1)
        dev = _gen_device(f, generator)
        idx = torch.multinomial(
            p.detach().to(dev), num_samples, replacement=True, generator=generator
        )
        onehot = nn.functional.one_hot(idx.to(f.device), f.shape[-1]).to(p.dtype)
        return p.unsqueeze(1) - onehot


def _gen_device(f: Tensor, generator: torch.Generator | None) -> torch.device:
    """Device to draw on: the generator's if given (a CPU generator serves CUDA models)."""
    return f.device if generator is None else generator.device


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "regression": Regression,
    "classification": Classification,
}


def get_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """Return the :class:`Likelihood` for a name (``"regression"``, ``"classification"``).

    Raises
    ------
    LikelihoodError
        For an unknown name; the message lists the known ones.
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str) and likelihood in LIKELIHOODS:
        return LIKELIHOODS[likelihood]()
    raise LikelihoodError(
        f"unknown likelihood {likelihood!r}; known likelihoods: {sorted(LIKELIHOODS)}"
    )
