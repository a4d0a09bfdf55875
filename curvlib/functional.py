r"""One-call helpers with the signatures of torch-secorder and laplax, on curvlib's classes.

The helpers take the loss as the user trains with it (``nn.MSELoss`` / ``nn.CrossEntropyLoss``
modules with ``reduction="sum"`` or ``"mean"``, or ``F.mse_loss`` / ``F.cross_entropy``,
which reduce by the mean) and return the curvature **of that loss**. Write it as
:math:`L = w \sum_n \ell_n` with :math:`\ell_n` sample ``n``'s term summed over its outputs
(``MSE``: :math:`\|f_n - y_n\|^2`; cross-entropy: :math:`-\log \mathrm{softmax}(f_n)_{y_n}`),
:math:`w = 1` for ``"sum"``, :math:`1/B` for the cross-entropy's ``"mean"`` and
:math:`1/(B C)` for the MSE's ``"mean"`` (it averages over all :math:`B C` elements). With
:math:`\ell_n = a\,\ell^{\rm curvlib}_n` (:math:`a = 2` for MSE, whose curvlib likelihood
has factor 1/2; :math:`a = 1` for cross-entropy):

* Hessian, GGN, MC Fisher of :math:`L`: :math:`w a` times curvlib's;
* empirical Fisher of :math:`L`: :math:`w \sum_n g_n g_n^\top`, :math:`g_n = \nabla_\theta
  \ell_n`, i.e. :math:`w a^2` times curvlib's EF. Each per-sample Hessian
  :math:`\nabla^2 \ell_n` is replaced by :math:`g_n g_n^\top` and the reduction weight is
  applied once: :math:`\sum_n g_n g_n^\top` for ``"sum"``, :math:`\frac1B \sum_n g_n
  g_n^\top` for the cross-entropy's ``"mean"``.

Where those libraries differ from these definitions, curvlib follows the definitions
(see ``docs/matrix-free.md``):
torch-secorder's "empirical Fisher diagonal" squares the gradient of the *batch* loss,
:math:`(\sum_n g_n)^2`, not :math:`\sum_n g_n^2`; its "generalized Fisher diagonal" is not
the Fisher's diagonal; its Gauss-Newton diagonal is :math:`\mathrm{diag}(J^\top J)` whatever
the loss's scale, with one backward pass per output scalar.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlib.errors import LikelihoodError
from curvlib.estimators import hutchinson_trace
from curvlib.layers import differentiable_diagonal, layer_statistics, per_layer_diagonal
from curvlib.likelihood import Classification, Likelihood, Regression, get_likelihood
from curvlib.linops import CurvatureOperator, curvature_operator

__all__ = [
    "empirical_fisher_diagonal",
    "empirical_fisher_trace",
    "gauss_newton_matrix_approximation",
    "generalized_fisher_diagonal",
    "generalized_fisher_trace",
    "per_layer_hessian_diagonal",
    "per_layer_fisher_diagonal",
    "get_layer_curvature_stats",
    "create_ggn_mv",
    "create_empirical_fisher_mv",
    "create_MC_fisher_mv",
]


def _curv(curvature: str, model: nn.Module, likelihood: str, backend: str | None, **options: Any):
    """The curvature object of ``backend`` (default: ``CURVLIB_BACKEND``'s, then autograd)."""
    import os

    from curvlib.backends import backend_class

    if backend is None:
        env = os.environ.get("CURVLIB_BACKEND", "").strip()
        backend = env.partition(":")[0] or "autograd"
    return backend_class(backend, curvature)(model, likelihood, **options)


@dataclass(frozen=True)
class _LossSpec:
    """A torch loss read as a curvlib likelihood: ``ℓ_n = a ℓ_n^curvlib``, its reduction."""

    likelihood: str
    reduction: str  # "sum", "mean", or "curvlib" (a likelihood given by name: w = a = 1)
    a: float

    def weight(self, n: int, elements_per_sample: int) -> float:
        """``w`` for ``n`` data points with ``elements_per_sample`` targets each."""
        if self.reduction != "mean":
            return 1.0
        if self.likelihood == "regression":
            return 1.0 / (n * elements_per_sample)
        return 1.0 / n

    def scales(self, n: int, elements_per_sample: int) -> tuple[float, float]:
        """``(w a, w a²)``: the factors of the Hessian/GGN and of the EF."""
        w = self.weight(n, elements_per_sample)
        return w * self.a, w * self.a**2


def _loss_spec(loss_fn: Any) -> _LossSpec:
    """Interpret ``loss_fn`` by its type (never by its name)."""
    if isinstance(loss_fn, (str, Likelihood)):
        return _LossSpec(get_likelihood(loss_fn).name, "curvlib", 1.0)
    if loss_fn is nn.functional.mse_loss:
        return _LossSpec("regression", "mean", 2.0)
    if loss_fn is nn.functional.cross_entropy:
        return _LossSpec("classification", "mean", 1.0)
    if isinstance(loss_fn, nn.MSELoss):
        spec = _LossSpec("regression", loss_fn.reduction, 2.0)
    elif isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0:
            raise LikelihoodError(
                "CrossEntropyLoss with class weights or label smoothing is not a likelihood "
                "curvlib knows; use CrossEntropyLoss() with reduction 'sum' or 'mean'"
            )
        spec = _LossSpec("classification", loss_fn.reduction, 1.0)
    else:
        raise LikelihoodError(
            f"cannot interpret loss_fn of type {type(loss_fn).__name__}; use nn.MSELoss, "
            "nn.CrossEntropyLoss, F.mse_loss, F.cross_entropy or a curvlib likelihood name"
        )
    if spec.reduction not in ("sum", "mean"):
        raise LikelihoodError(
            f"{type(loss_fn).__name__}(reduction={spec.reduction!r}) is not a scalar loss; "
            "use reduction='sum' or 'mean'"
        )
    return spec


def _per_sample_elements(y: Tensor) -> int:
    return int(y[0].numel()) if y.ndim > 1 else 1


def _params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _unflatten(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    parts = flat.split([p.numel() for p in params])
    return [c.view_as(p) for c, p in zip(parts, params, strict=True)]


def _scales(spec: _LossSpec, targets: Tensor) -> tuple[float, float]:
    return spec.scales(int(targets.shape[0]), _per_sample_elements(targets))


# -- torch-secorder: approximations ---------------------------------------------------------
def empirical_fisher_diagonal(
    model: nn.Module, loss_fn: Any, inputs: Tensor, targets: Tensor, *, backend: str | None = None
) -> list[Tensor]:
    r"""Diagonal of the empirical Fisher of the loss as given, :math:`w \sum_n g_n^2`.

    :math:`g_n` is the gradient of sample ``n``'s term :math:`\ell_n`, :math:`w` the
    reduction weight (module docstring): :math:`\sum_n g_n^2` for ``reduction="sum"``,
    :math:`\frac1B \sum_n g_n^2` for cross-entropy with ``"mean"``.

    **Differs from torch-secorder**, which squares the gradient of the batch loss,
    :math:`(w \sum_n g_n)^2`: that is not the empirical Fisher (it drops every per-sample
    term's own square in favour of cross terms, and vanishes at a minimum of the batch loss).

    Returns
    -------
    list[Tensor]
        One tensor per trainable parameter, shaped like it.
    """
    spec = _loss_spec(loss_fn)
    _, ef = _scales(spec, targets)
    _, d = _curv("ef", model, spec.likelihood, backend).diag(inputs, targets)
    return _unflatten(d * ef, _params(model))


def empirical_fisher_trace(
    model: nn.Module,
    loss_fn: Any,
    inputs: Tensor,
    targets: Tensor,
    num_samples: int = 1,
    *,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""Hutchinson estimate of :math:`\mathrm{tr}(w \sum_n g_n g_n^\top) = w \sum_n \|g_n\|^2`.

    ``num_samples`` Rademacher probes :math:`v`, each costing one EF-vector product
    :math:`\sum_n g_n (g_n^\top v)` (a Jacobian-vector and a vector-Jacobian product over the
    batch); unbiased. The exact value is ``sum(d.sum() for d in empirical_fisher_diagonal(...))``
    (per-sample gradients). ``generator`` makes the estimate reproducible.
    """
    spec = _loss_spec(loss_fn)
    _, ef = _scales(spec, targets)
    op = curvature_operator(_curv("ef", model, spec.likelihood, backend), inputs, targets) * ef
    return hutchinson_trace(op, num_samples, generator=generator)


def gauss_newton_matrix_approximation(
    model: nn.Module,
    loss_fn: Any,
    inputs: Tensor,
    targets: Tensor,
    create_graph: bool = False,
    *,
    backend: str | None = None,
) -> list[Tensor]:
    r"""Diagonal of the Gauss-Newton matrix of a least-squares loss as given.

    For ``nn.MSELoss(reduction="sum")``, :math:`L = \sum_n \|f_n - y_n\|^2` and
    :math:`G = 2 J^\top J`; for ``"mean"`` (and ``F.mse_loss``) :math:`G = \frac{2}{BC}
    J^\top J`. The diagonal :math:`\sum_{n,c} (\partial f_{n,c}/\partial\theta)^2` comes
    from one vmapped backward pass per output column.

    **Differs from torch-secorder**, which returns :math:`\mathrm{diag}(J^\top J)` whatever
    the loss's scale (right only for :math:`\frac12 \sum \|f - y\|^2`), with one backward
    pass per output scalar.

    Raises
    ------
    LikelihoodError
        (a ``ValueError``) if ``loss_fn`` is not an MSE loss (checked by type).
    """
    spec = _loss_spec(loss_fn)
    if spec.likelihood != "regression":
        raise LikelihoodError(
            f"the Gauss-Newton diagonal needs a least-squares loss (nn.MSELoss or "
            f"F.mse_loss), got {type(loss_fn).__name__}; for other losses use "
            "generalized_fisher_diagonal or curvlib.AutogradGGN"
        )
    scale, _ = _scales(spec, targets)
    curv = _curv("ggn", model, spec.likelihood, backend)
    if create_graph:
        d = differentiable_diagonal(curv, inputs, targets)
    else:
        _, d = curv.diag(inputs, targets)
    return _unflatten(d * scale, _params(model))


def _output_likelihood(loss_type: str | Likelihood) -> Likelihood:
    if isinstance(loss_type, Likelihood):
        return loss_type
    names = {"nll": Classification, "classification": Classification}
    names |= {"gaussian": Regression, "regression": Regression}
    if loss_type not in names:
        raise LikelihoodError(
            f"unknown loss_type {loss_type!r}; known: {sorted(names)} ('nll' is the "
            "categorical negative log-likelihood of logits)"
        )
    return names[loss_type]()


def _check_outputs(model: nn.Module, outputs: Tensor, targets: Tensor, lik: Likelihood):
    lik.check_output(outputs)
    lik.check_target(outputs, targets)
    if not outputs.requires_grad:
        raise ValueError("outputs must be computed by model with autograd enabled")
    return _params(model)


def generalized_fisher_diagonal(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str = "nll",
    create_graph: bool = False,
) -> list[Tensor]:
    r"""Diagonal of the Fisher information :math:`F = \sum_n J_n^\top \Lambda(f_n) J_n`.

    :math:`F = \sum_n \mathbb E_{\tilde y \sim p(\cdot|f_n)}[\nabla_\theta \log p(\tilde y|f_n)
    \nabla_\theta \log p(\tilde y|f_n)^\top]` is computed exactly (the expectation in
    closed form), for the negative log-likelihood summed over the batch: ``"nll"`` —
    categorical with logits ``outputs``, :math:`\Lambda = \mathrm{diag}(p) - pp^\top` —
    or ``"gaussian"`` — :math:`\mathcal N(f, I)`, :math:`\Lambda = I`. It equals the GGN
    diagonal (``AutogradGGN(model, likelihood).diag(x, y)``, which is cheaper when the
    inputs are at hand). Only ``outputs``' graph is used: :math:`\sum_{n,k} (J_n^\top
    s_{n,k})^2` with :math:`s_{n,k}` the columns of :math:`\Lambda(f_n)^{1/2}`, one
    (vmapped) backward pass per sample and output. ``targets`` are only validated: the
    Fisher does not depend on them.

    **Differs from torch-secorder**, whose value is not this diagonal (147% off it in a
    quick check on a small MLP).

    Returns
    -------
    list[Tensor]
        One tensor per trainable parameter of ``model``, shaped like it.
    """
    lik = _output_likelihood(loss_type)
    params = _check_outputs(model, outputs, targets, lik)
    f = outputs if create_graph else outputs.detach()
    S = lik.sqrt_cotangents(f)  # (B, K, C), sum_k s s^T = Lambda
    B, K, C = S.shape
    E = torch.zeros(B, K, B, C, dtype=S.dtype, device=S.device)
    E[torch.arange(B), :, torch.arange(B)] = S
    E = E.flatten(0, 1)
    P = sum(p.numel() for p in params)
    chunk = max(1, 2**24 // max(1, P))
    diag = [torch.zeros_like(p) for p in params]
    for s in range(0, E.shape[0], chunk):
        grads = torch.autograd.grad(
            outputs,
            params,
            grad_outputs=E[s : s + chunk],
            retain_graph=True,
            create_graph=create_graph,
            is_grads_batched=True,
            allow_unused=True,
        )
        diag = [d if g is None else d + g.pow(2).sum(0) for d, g in zip(diag, grads, strict=True)]
    return diag


def generalized_fisher_trace(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str = "nll",
    num_samples: int = 1,
    create_graph: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Hutchinson estimate of :math:`\mathrm{tr}(F)`, ``F`` as in
    :func:`generalized_fisher_diagonal`.

    For ``num_samples`` Rademacher probes :math:`v`, :math:`v^\top F v = \sum_n
    \|\Lambda(f_n)^{1/2\top} J_n v\|^2` with :math:`Jv` from ``outputs``' graph by the
    double-backward trick (:math:`Jv = \partial_u \langle J^\top u, v\rangle`); unbiased.
    The exact trace is the sum of :func:`generalized_fisher_diagonal`. ``generator`` makes
    the estimate reproducible (the global RNG is not used).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    lik = _output_likelihood(loss_type)
    params = _check_outputs(model, outputs, targets, lik)
    S = lik.sqrt_cotangents(outputs if create_graph else outputs.detach())
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    total = outputs.new_zeros(())
    for _ in range(num_samples):
        v = [
            (2 * torch.randint(0, 2, p.shape, generator=generator, device=generator.device) - 1)
            .to(p)
            .detach()
            for p in params
        ]
        u = torch.zeros_like(outputs, requires_grad=True)
        g = torch.autograd.grad(outputs, params, u, create_graph=True, allow_unused=True)
        inner = sum((gi * vi).sum() for gi, vi in zip(g, v, strict=True) if gi is not None)
        (Jv,) = torch.autograd.grad(inner, u, create_graph=create_graph)
        total = total + torch.einsum("bkc,bc->bk", S, Jv).pow(2).sum()
    return total / num_samples


# -- torch-secorder: per-layer curvature ----------------------------------------------------
def per_layer_hessian_diagonal(
    model: nn.Module,
    loss_fn: Any,
    inputs: Tensor,
    targets: Tensor,
    layer_types: list[type] | None = None,
    create_graph: bool = False,
    *,
    backend: str | None = None,
) -> dict[str, Tensor]:
    r"""Hessian diagonal of the loss as given per module, :math:`\mathrm{diag}(\nabla^2 L)[I_\ell]`.

    One Hessian-vector product (forward-over-reverse) per parameter of the selected layers.
    ``layer_types`` keeps modules that are instances of these types; default: every module
    that owns trainable parameters. ``create_graph=True`` keeps the graph (third
    derivatives of the loss become available).

    Returns
    -------
    dict[str, Tensor]
        Module path to the 1-D diagonal of its own parameters (flattened, concatenated).
    """
    spec = _loss_spec(loss_fn)
    scale, _ = _scales(spec, targets)
    curv = _curv("hessian", model, spec.likelihood, backend)
    out = per_layer_diagonal(curv, inputs, targets, layer_types, create_graph=create_graph)
    return {k: v * scale for k, v in out.items()}


def per_layer_fisher_diagonal(
    model: nn.Module,
    loss_fn: Any,
    inputs: Tensor,
    targets: Tensor,
    layer_types: list[type] | None = None,
    create_graph: bool = False,
    *,
    backend: str | None = None,
) -> dict[str, Tensor]:
    r"""Fisher (= GGN, for these likelihoods) diagonal of the loss as given, per module.

    :math:`w a \,\mathrm{diag}(\sum_n J_n^\top \Lambda(f_n) J_n)[I_\ell]`, exact (no
    sampling); see :func:`per_layer_hessian_diagonal` for the arguments.
    """
    spec = _loss_spec(loss_fn)
    scale, _ = _scales(spec, targets)
    curv = _curv("ggn", model, spec.likelihood, backend)
    out = per_layer_diagonal(curv, inputs, targets, layer_types, create_graph=create_graph)
    return {k: v * scale for k, v in out.items()}


def get_layer_curvature_stats(
    layer_curvatures: dict[str, Tensor],
) -> dict[str, dict[str, float]]:
    """Mean, std, max, min and trace per layer (and the top eigenvalue of blocks).

    See :func:`curvlib.layers.layer_statistics`.
    """
    return layer_statistics(layer_curvatures)


# -- laplax: curvature-vector products --------------------------------------------------------
def _operator(
    curv: Any,
    data: Any,
    spec: _LossSpec,
    ef: bool,
    generator: torch.Generator | None,
    num_curv_samples: int | None,
    num_total_samples: int | None,
) -> CurvatureOperator:
    if isinstance(data, Mapping) and "input" in data and "target" in data:
        data = (data["input"], data["target"])
    kw = dict(
        num_curv_samples=num_curv_samples,
        num_total_samples=num_total_samples,
        generator=generator,
    )
    is_batch = isinstance(data, (tuple, list)) and len(data) == 2
    if is_batch and isinstance(data[0], (Tensor, Mapping)):
        op = curvature_operator(curv, data[0], data[1], **kw)
        y = data[1]
    elif isinstance(data, Iterable):
        op = curvature_operator(curv, data=data, **kw)
        first = next(iter(data))
        y = first[1] if isinstance(first, (tuple, list)) else first[curv.dict_key_y]
    else:
        raise TypeError(f"data must be (x, y), a dict or a DataLoader, got {type(data).__name__}")
    n = op.num_data if spec.reduction == "mean" else 1
    scale = spec.scales(n, _per_sample_elements(y))[1 if ef else 0]
    return op if math.isclose(scale, 1.0) else op * scale


def create_ggn_mv(
    model: nn.Module,
    data: Any,
    loss_fn: Any,
    *,
    num_curv_samples: int | None = None,
    num_total_samples: int | None = None,
    backend: str | None = None,
) -> CurvatureOperator:
    r"""The GGN-vector product :math:`v \mapsto s\,w a \sum_n J_n^\top \Lambda(f_n) J_n v`.

    Parameters
    ----------
    model : nn.Module
        The network (its trainable parameters are the vector space; ``v`` is flat, ``(P,)``
        or ``(P, K)``).
    data : (x, y), {"input": x, "target": y} or an iterable of batches (a DataLoader)
    loss_fn : nn.MSELoss, nn.CrossEntropyLoss, F.mse_loss, F.cross_entropy or a curvlib
        likelihood name (then the curvlib convention, :math:`w = a = 1`). With ``"mean"`` the
        mean is over the whole data.
    num_curv_samples, num_total_samples : int, optional
        ``s = num_total_samples / num_curv_samples`` (laplax); default 1.
    backend : str, optional
        The curvlib backend (default: the backend of ``CURVLIB_BACKEND``, else autograd).

    Returns
    -------
    CurvatureOperator
        Callable ``mv(v)``; also ``@``, ``shape``, ``to_scipy()``.
    """
    spec = _loss_spec(loss_fn)
    curv = _curv("ggn", model, spec.likelihood, backend)
    return _operator(curv, data, spec, False, None, num_curv_samples, num_total_samples)


def create_empirical_fisher_mv(
    model: nn.Module,
    data: Any,
    loss_fn: Any,
    *,
    num_curv_samples: int | None = None,
    num_total_samples: int | None = None,
    backend: str | None = None,
) -> CurvatureOperator:
    r"""The EF-vector product :math:`v \mapsto s\,w \sum_n g_n (g_n^\top v)`.

    Computed as :math:`J^\top (r \odot (r^\top J v))` per sample, :math:`r_n =
    \nabla_{f_n}\ell_n`, never forming a per-sample gradient. Arguments as
    :func:`create_ggn_mv`.
    """
    spec = _loss_spec(loss_fn)
    curv = _curv("ef", model, spec.likelihood, backend)
    return _operator(curv, data, spec, True, None, num_curv_samples, num_total_samples)


def create_MC_fisher_mv(  # noqa: N802 (laplax's name)
    model: nn.Module,
    data: Any,
    loss_fn: Any,
    generator: torch.Generator | None = None,
    *,
    num_curv_samples: int | None = None,
    num_total_samples: int | None = None,
    mc_samples: int = 1,
    backend: str | None = None,
) -> CurvatureOperator:
    r"""The MC Fisher-vector product :math:`v \mapsto s\,w a \sum_n J_n^\top
    \big(\tfrac1S \sum_{m} \tilde g_{n,m} \tilde g_{n,m}^\top\big) J_n v`.

    :math:`\tilde g_{n,m} = \nabla_{f_n}(-\log p(\tilde y_{n,m}|f_n))`, :math:`\tilde
    y_{n,m}` drawn from the model's predictive once, when the product is created, with
    ``generator`` (laplax's ``key``): the returned map is fixed and linear. Unbiased for
    :func:`create_ggn_mv`. Other arguments as :func:`create_ggn_mv`.
    """
    spec = _loss_spec(loss_fn)
    curv = _curv("fisher", model, spec.likelihood, backend, num_samples=mc_samples)
    return _operator(curv, data, spec, False, generator, num_curv_samples, num_total_samples)
