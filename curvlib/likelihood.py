r"""Likelihoods: the loss, its scale, its output-space Hessian and MC pseudo-targets.

This is the one place where these formulas live. Every backend expresses its curvature
through the *cotangents* a likelihood hands out: a tensor ``c`` of shape ``(B, K, *f[0].shape)``
with

.. math:: \sum_k c_{n,k} c_{n,k}^\top = M_n,

where :math:`M_n` is the output-space matrix of data point ``n`` that the curvature puts
between the Jacobians, :math:`J_n^\top M_n J_n`:

* exact GGN: :math:`M_n = \Lambda(f_n)`, ``c`` the columns of a square root of
  :math:`\Lambda` (:meth:`Likelihood.sqrt_cotangents`);
* Monte-Carlo Fisher: :math:`M_n = \frac1S \sum_s \tilde g_s \tilde g_s^\top` with
  :math:`\tilde g_s = \nabla_f(-\log p(\tilde y_s|f_n))`, :math:`\tilde y_s` drawn from the
  model's predictive (:meth:`Likelihood.mc_cotangents`);
* empirical Fisher: :math:`M_n = g_n g_n^\top`, :math:`g_n = \nabla_f` of data point ``n``'s
  term of the reported loss (:meth:`Likelihood.ef_cotangents`).

Outputs with positions
----------------------
An output may carry positions (tokens, pixels): logits ``(B, ..., C)`` with integer targets
``(B, ...)`` for classification, outputs and targets ``(B, ..., C)`` for regression. The loss
of a data point is the sum over its positions; positions whose class target is
``ignore_index`` (default ``-100``, as ``nn.CrossEntropyLoss``) contribute nothing. Then
:math:`\Lambda_n` is block-diagonal over positions: the exact GGN has ``K = L·C`` cotangent
columns, each on one position (``L`` positions); an MC column holds one draw at every
position (unbiased: draws at different positions are independent with mean-zero
gradients); the EF has one column, the gradient of the data point's whole loss.

Conventions:

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

from curvlib.errors import InputError, LikelihoodError, NonFiniteError, TargetError

__all__ = ["Likelihood", "Regression", "Classification", "get_likelihood", "LIKELIHOODS"]

Generators = torch.Generator | Sequence[torch.Generator] | None


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
    def check_output(f: Tensor, B: int | None = None) -> None:
        """Raise unless the output ``f`` has shape ``(B, ..., C)`` and is finite.

        Raises
        ------
        TargetError
            Not a tensor, fewer than two dimensions, or another batch size.
        NonFiniteError
            NaN or infinite entries (naming the batch indices).
        """
        if not isinstance(f, Tensor):
            raise TargetError(
                f"the model must return a tensor of shape (batch, ..., outputs), got "
                f"{type(f).__name__}; return the logits (e.g. `.logits` of a HuggingFace output)"
            )
        if f.ndim < 2:
            raise TargetError(
                f"the model output must have shape (batch, ..., outputs), got {tuple(f.shape)}; "
                "keep a trailing output dimension (e.g. f.unsqueeze(-1))"
            )
        if B is not None and f.shape[0] != B:
            raise TargetError(
                f"the model output has batch size {f.shape[0]} for an input batch of {B}; the "
                "first dimension of the output must be the batch"
            )
        if f.is_meta or bool(f.detach().sum().isfinite()):  # NaN and inf propagate
            return
        bad = ~torch.isfinite(f.detach().reshape(f.shape[0], -1)).all(dim=1)
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

    def mask(self, f: Tensor, y: Tensor | None) -> Tensor | None:
        """``(B, ...)`` boolean mask of the positions that enter the loss (``None``: all)."""
        return None

    # -- loss and derivatives ------------------------------------------------------------
    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """The reported loss ``factor * lossfunc(f, y)`` (sum over data points and positions)."""
        return self.factor * self.lossfunc(f, y)

    @abstractmethod
    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        r"""Per-sample gradient :math:`\nabla_{f_n}` of the reported loss, ``f``'s shape."""

    @abstractmethod
    def hessian(self, f: Tensor) -> Tensor:
        r"""Output-space Hessian :math:`\Lambda(f)` per position, ``(*f.shape, C)``."""

    @abstractmethod
    def sqrt_hessian(self, f: Tensor) -> Tensor:
        r"""A square root ``S``, :math:`S S^\top = \Lambda(f)`, per position: ``(*f.shape, C)``."""

    def sample_grad_outputs(
        self, f: Tensor, num_samples: int, generator: Generators = None
    ) -> Tensor:
        r"""Pseudo-target gradients :math:`\tilde g = \nabla_f(-\log p(\tilde y|f))`.

        :math:`\tilde y` is drawn from the model's predictive, independently at every
        position; the result has shape ``(B, num_samples, *f.shape[1:])`` and
        :math:`E[\tilde g \tilde g^\top] = \Lambda(f)` per position. ``generator`` may be one
        generator for the batch or a sequence of ``B`` generators, one per data point.
        """
        if isinstance(generator, Sequence):
            if len(generator) != f.shape[0]:
                raise InputError(
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
        """Draw ``(B, num_samples, *f.shape[1:])`` pseudo-target gradients with one generator."""

    # -- cotangents (see module docstring) -------------------------------------------------
    def _masked(self, c: Tensor, f: Tensor, y: Tensor | None) -> Tensor:
        """Zero the cotangents ``(B, K, *pos, C)`` at positions left out of the loss."""
        m = self.mask(f, y)
        if m is None:
            return c
        return c * m.unsqueeze(1).unsqueeze(-1).to(c.dtype)

    def sqrt_cotangents(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """Cotangents of the exact GGN: ``(B, C, C)``, or ``(B, L·C, *pos, C)`` with positions."""
        S = self.sqrt_hessian(f)  # (B, *pos, C, C)
        if f.ndim == 2:
            return self._masked(S.transpose(1, 2), f, y)
        B, C = f.shape[0], f.shape[-1]
        pos = f.shape[1:-1]
        L = math.prod(pos)
        S = S.reshape(B, L, C, C).transpose(2, 3)  # column k of position l: S[:, l, k]
        eye = torch.eye(L, dtype=f.dtype, device=f.device)
        c = torch.einsum("blkc,lm->blkmc", S, eye).reshape(B, L * C, *pos, C)
        return self._masked(c, f, y)

    def mc_cotangents(
        self, f: Tensor, num_samples: int, generator: Generators = None, y: Tensor | None = None
    ) -> Tensor:
        """MC Fisher cotangents ``(B, S, *f.shape[1:])``: sampled gradients over ``sqrt(S)``."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise InputError(f"num_samples must be a positive integer, got {num_samples!r}")
        g = self.sample_grad_outputs(f, num_samples, generator) / math.sqrt(num_samples)
        return self._masked(g, f, y)

    def ef_cotangents(self, f: Tensor, y: Tensor) -> Tensor:
        """Cotangents ``(B, 1, *f.shape[1:])`` of the empirical Fisher: the loss gradients."""
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
                f"(batch, ..., outputs), got {_describe(y)}"
                + ("; use y.unsqueeze(-1)" if y.shape == f.shape[:-1] and f.shape[-1] == 1 else "")
            )
        if y.dtype != f.dtype or y.device != f.device:
            raise TargetError(
                f"regression targets must have dtype {f.dtype} on {f.device} like the model "
                f"output, got dtype {y.dtype} on {y.device}"
            )

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        return f - y  # 2 * factor * (f - y)

    def hessian(self, f: Tensor) -> Tensor:
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        return eye.expand(*f.shape, f.shape[-1])

    def sqrt_hessian(self, f: Tensor) -> Tensor:
        return self.hessian(f)

    def _sample_grad_outputs(
        self, f: Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        # y~ = f + eps, eps ~ N(0, I): grad_f(-log p) = f - y~ = -eps.
        shape = (f.shape[0], num_samples, *f.shape[1:])
        eps = torch.randn(
            shape, generator=generator, dtype=f.dtype, device=_gen_device(f, generator)
        )
        return -eps.to(f.device)


class Classification(Likelihood):
    r"""Categorical likelihood with logits ``f``: loss ``CrossEntropyLoss(sum)``.

    Targets are class indices; with positions, ``ignore_index`` (``-100``) leaves a position
    out of the loss and of every curvature.
    """

    name = "classification"
    factor = 1.0
    ignore_index = -100

    def __init__(self) -> None:
        self.lossfunc = nn.CrossEntropyLoss(reduction="sum")

    def check_target(self, f: Tensor, y: Tensor) -> None:
        if not isinstance(y, Tensor):
            raise TargetError(f"targets must be a tensor, got {type(y).__name__}")
        want = tuple(f.shape[:-1])
        C = f.shape[-1]
        if torch.is_floating_point(y) or y.dtype == torch.bool or torch.is_complex(y):
            hint = ""
            if y.shape == f.shape:
                hint = "; one-hot targets are not accepted, pass y.argmax(-1)"
            raise TargetError(
                "classification targets must be integer class indices of shape "
                f"{want} and dtype torch.long, got {_describe(y)}{hint}"
            )
        if tuple(y.shape) != want:
            hint = "; use y.squeeze(-1)" if tuple(y.shape) == (*want, 1) else ""
            raise TargetError(
                f"classification targets must have shape {want} (one class index per sample"
                f"{' and position' if len(want) > 1 else ''}), got {_describe(y)}{hint}"
            )
        if y.device != f.device:
            raise TargetError(f"targets are on {y.device} but the model output is on {f.device}")
        if y.numel() and not y.is_meta:
            valid = y[y != self.ignore_index] if f.ndim > 2 else y
            if valid.numel():
                lo, hi = (int(v) for v in torch.aminmax(valid))
                if lo < 0 or hi >= C:
                    extra = f" or ignore_index {self.ignore_index}" if f.ndim > 2 else ""
                    raise TargetError(
                        f"class indices must lie in [0, {C - 1}] for {C} outputs{extra}, "
                        f"got values in [{lo}, {hi}]"
                    )

    def mask(self, f: Tensor, y: Tensor | None) -> Tensor | None:
        if y is None or f.ndim == 2:
            return None
        m = y != self.ignore_index
        return None if bool(m.all()) else m

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        if f.ndim > 2:
            return self.factor * self.lossfunc(f.reshape(-1, f.shape[-1]), y.reshape(-1))
        return self.factor * self.lossfunc(f, y)

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        p = torch.softmax(f, dim=-1)
        m = self.mask(f, y)
        safe = y if m is None else torch.where(m, y, torch.zeros_like(y))
        g = p - nn.functional.one_hot(safe, f.shape[-1]).to(p.dtype)
        return g if m is None else g * m.unsqueeze(-1).to(g.dtype)

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
        C = f.shape[-1]
        dev = _gen_device(f, generator)
        flat = p.detach().reshape(-1, C).to(dev)
        idx = torch.multinomial(flat, num_samples, replacement=True, generator=generator)
        idx = idx.to(f.device).reshape(f.shape[0], -1, num_samples).movedim(-1, 1)
        onehot = nn.functional.one_hot(idx, C).to(p.dtype)  # (B, S, L, C)
        out = p.reshape(f.shape[0], 1, -1, C) - onehot
        return out.reshape(f.shape[0], num_samples, *f.shape[1:])


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
