"""Models wrapped for data-parallel training: DDP is unwrapped, FSDP is refused.

``DistributedDataParallel`` holds the full model in ``model.module``; computing on it
directly would fire DDP's gradient hooks (and their all-reduces). An FSDP-sharded model has
no rank holding its full parameters, so no rank could compute its curvature.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from curvlib.errors import InputError

__all__ = ["check_not_sharded", "unwrapped"]


def check_not_sharded(model: nn.Module) -> None:
    """Raise for FSDP-wrapped or DTensor-sharded models (their parameters are not local).

    Parameters
    ----------
    model : nn.Module
        The curvature's model.

    Raises
    ------
    InputError
        If any submodule is an FSDP1 ``FullyShardedDataParallel`` or an FSDP2 module, or any
        parameter a ``DTensor``. Only modules that are already imported are looked up: a
        model cannot be FSDP-wrapped without them.
    """
    names = ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")
    kinds = []
    for name in names:
        mod = sys.modules.get(name)
        for attr in ("FullyShardedDataParallel", "FSDPModule"):
            cls = getattr(mod, attr, None) if mod is not None else None
            if isinstance(cls, type):
                kinds.append(cls)
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    sharded = any(isinstance(m, tuple(kinds)) for m in model.modules()) if kinds else False
    if not sharded and isinstance(dtensor, type):
        sharded = any(isinstance(p, dtensor) for p in model.parameters())
    if sharded:
        raise InputError(
            f"{type(model).__name__} is sharded by FSDP (its parameters are DTensors or "
            "flat shards that no rank holds in full); curvlib needs every rank to hold the "
            "full parameters. Compute the curvature on an unsharded copy (e.g. load the "
            "full state dict into the plain model), or inside FSDP.summon_full_params(model)"
        )


@contextmanager
def unwrapped(curv: Any) -> Iterator[Any]:
    """Temporarily point ``curv.model`` at ``model.module`` for a DDP-wrapped model.

    Parameters
    ----------
    curv : CurvatureInterface
        The curvature object; restored on exit, also on error.

    Yields
    ------
    CurvatureInterface
        ``curv``, with the plain module as its model inside the block.
    """
    model = curv.model
    ddp = getattr(nn.parallel, "DistributedDataParallel", None)
    if isinstance(ddp, type) and isinstance(model, ddp):
        curv.model = model.module
        try:
            yield curv
        finally:
            curv.model = model
    else:
        yield curv
