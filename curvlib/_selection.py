"""Parameter selection: the differentiated module, its trainable parameters, the subnetwork.

``P`` counts the parameters with ``requires_grad=True`` of the differentiated module (the
model, or its ``last_layer``), in ``parameters()`` order (a parameter held by several
modules once), each flattened row-major; ``subnetwork_indices`` selects entries of that
flat vector.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvlib.errors import InputError

__all__ = [
    "differentiated_module",
    "selected_params",
    "check_params",
    "subnetwork",
    "own_params",
    "is_leaf",
]

# Modules whose training-mode forward couples samples or draws random numbers.
_TRAIN_MODE_MODULES = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def own_params(module: nn.Module) -> list[tuple[str, Tensor]]:
    """``module.named_parameters(recurse=False)`` without its generator machinery (the checks
    walk every module on every call)."""
    return [(n, p) for n, p in module._parameters.items() if p is not None]


def is_leaf(module: nn.Module) -> bool:
    """``not list(module.children())``."""
    return all(m is None for m in module._modules.values())


def differentiated_module(model: nn.Module, last_layer: bool) -> nn.Module:
    """The model, or its ``last_layer`` (laplace-torch's ``FeatureExtractor`` convention)."""
    if not last_layer:
        return model
    layer = getattr(model, "last_layer", None)
    if layer is None:
        raise InputError("last_layer=True but model.last_layer is None (not found yet)")
    return layer


def selected_params(module: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters of ``module`` by name, in ``parameters()`` order."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def check_params(
    model: nn.Module, module: nn.Module, params: list[Tensor], last_layer: bool
) -> None:
    """Refuse no parameters, the meta device, half precision, mixed dtypes or devices and
    training-mode layers (:class:`InputError` naming the parameter or module)."""
    if not params:
        raise InputError(
            f"{type(model).__name__} has no parameters with requires_grad=True"
            + (" in its last layer" if last_layer else "")
        )
    ref = params[0]
    if ref.is_meta:
        raise InputError(
            "the model's parameters are on the meta device (shapes without data), so there "
            "is nothing to compute; materialize the model first, e.g. "
            "model.to_empty(device='cpu') and load its weights"
        )
    if ref.dtype in (torch.float16, torch.bfloat16):
        raise InputError(
            f"the model's parameters are {ref.dtype}; curvature is accumulated in the "
            "model's dtype, which is too imprecise in half precision. Compute on a float32 "
            "or float64 copy (e.g. copy.deepcopy(model).float())"
        )
    for name, t in module.named_parameters():
        if t.dtype != ref.dtype:
            raise InputError(
                f"the model mixes dtypes: {name!r} is {t.dtype} but the first trainable "
                f"parameter is {ref.dtype}; convert the whole model with model.to({ref.dtype})"
            )
        if t.device != ref.device:
            raise InputError(
                f"the model spans devices: {name!r} is on {t.device} but the first trainable "
                f"parameter is on {ref.device}; move the whole model with model.to(device)"
            )
    for path, mod in module.named_modules():
        if mod.training and isinstance(mod, _TRAIN_MODE_MODULES):
            raise InputError(
                f"module {path or '<root>'!r} ({type(mod).__name__}) is in training mode, "
                "where its output depends on randomness or on the other samples of the "
                "batch, so per-sample curvature is undefined; call model.eval() first"
            )


def subnetwork(indices: Any, P: int, device: torch.device) -> Tensor | None:
    """``subnetwork_indices`` as sorted-as-given unique ``long`` indices into the ``P`` entries.

    Accepts a 1-D integer tensor (or sequence) of indices, or a boolean mask of length ``P``.

    Raises
    ------
    InputError
        A mask of the wrong length, indices out of range, duplicated indices, or another
        type or shape.
    """
    if indices is None:
        return None
    try:
        idx = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(
            f"subnetwork_indices must be a 1-D tensor of integer indices or a boolean mask, "
            f"got {type(indices).__name__}"
        ) from err
    if idx.dtype == torch.bool:
        if idx.ndim != 1 or idx.numel() != P:
            raise InputError(
                f"a boolean subnetwork_indices mask must have one entry per selected parameter, "
                f"shape ({P},); got shape {tuple(idx.shape)}"
            )
        idx = idx.nonzero().flatten()
    if idx.ndim != 1 or idx.dtype not in (
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
    ):
        raise InputError(
            "subnetwork_indices must be a 1-D tensor of integer indices (or a boolean "
            f"mask) into the {P} selected parameters, got shape {tuple(idx.shape)} "
            f"dtype {idx.dtype}"
        )
    idx = idx.long()
    if idx.numel() == 0:
        raise InputError("subnetwork_indices is empty; select at least one parameter entry")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= P:
        raise InputError(f"subnetwork_indices must lie in [0, {P - 1}], got values in [{lo}, {hi}]")
    if torch.unique(idx).numel() != idx.numel():
        values, counts = torch.unique(idx, return_counts=True)
        dup = values[counts > 1]
        raise InputError(
            f"subnetwork_indices contains duplicates (e.g. {dup[:5].tolist()}); every entry must "
            "be selected at most once (use torch.unique)"
        )
    return idx.to(device)
