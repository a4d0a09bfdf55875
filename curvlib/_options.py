"""The keywords of every public call: what is accepted, and how the options resolve.

Keywords are explicit. Per call, the options laplace-torch passes to its backends —
``generator``, ``num_samples`` (alias ``mc_samples``) and ``kfac_approx`` — mean what they mean
at construction; any other keyword is a ``TypeError`` naming it and listing the accepted
ones, raised before any work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from curvlib import _inputs
from curvlib.capabilities import STRUCTURES, Capability
from curvlib.errors import InputError

__all__ = [
    "KFAC_APPROX",
    "CALL_OPTIONS",
    "OPERATOR_OPTIONS",
    "SHARED_JACOBIANS",
    "check_call_options",
]

KFAC_APPROX = ("expand", "reduce")

#: per entry point, the keywords a call accepts besides ``x``, ``y`` and ``N``
CALL_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "full": ("generator", "num_samples", "mc_samples", "kfac_approx"),
    "diag": ("generator", "num_samples", "mc_samples", "kfac_approx"),
    "kron": ("generator", "num_samples", "mc_samples", "kfac_approx"),
    "ekfac": ("generator", "num_samples", "mc_samples", "kfac_approx", "basis"),
    "blocks": ("generator", "num_samples", "mc_samples"),
    "lowrank": ("generator", "num_samples", "mc_samples", "k", "remainder", "num_iters", "seed"),
    "jacobians": ("enable_backprop",),
    "gradients": (),
    "operator": (),
}
#: the options of :meth:`CurvatureInterface.operator`
OPERATOR_OPTIONS = (
    "data",
    "num_curv_samples",
    "num_total_samples",
    "generator",
    "progress",
    "create_graph",
    "chunk_size",
)
#: the row of curvlib's shared torch.func Jacobians (``functorch_jacobians``)
SHARED_JACOBIANS = Capability(
    impl="shared", memory="BCP", differentiable=True, note="torch.func vjp"
)


def check_call_options(owner: str, what: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Step 1 of the template: the per-call keywords of ``owner.what()``, checked.

    Raises
    ------
    TypeError
        An unknown keyword (named, with the accepted ones), or both ``num_samples`` and
        ``mc_samples``.
    InputError
        A bad value of a known option.
    """
    accepted = CALL_OPTIONS[what]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"{owner}.{what}() got unexpected keyword(s) {unknown}; accepted: "
            f"{sorted((('x', 'y', 'N') if what in STRUCTURES else ('x',)) + accepted)}"
        )
    opts = dict(kwargs)
    if "mc_samples" in opts:
        if "num_samples" in opts:
            raise TypeError("pass num_samples or mc_samples (the same option), not both")
        opts["num_samples"] = opts.pop("mc_samples")
    if "num_samples" in opts:
        opts["num_samples"] = _inputs.check_positive_int("num_samples", opts["num_samples"])
    if opts.get("kfac_approx", "expand") not in KFAC_APPROX:
        raise InputError(f"kfac_approx must be one of {KFAC_APPROX}, got {opts['kfac_approx']!r}")
    gen = opts.get("generator")
    if gen is not None and not isinstance(gen, torch.Generator):
        if not (isinstance(gen, Sequence) and all(isinstance(g, torch.Generator) for g in gen)):
            raise InputError(
                "generator must be a torch.Generator (or one per data point), got "
                f"{type(gen).__name__}"
            )
    return opts
