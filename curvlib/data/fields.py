"""What the ranks of a distributed accumulation must agree on: the handshake's fields.

Every rank describes what it is about to accumulate as a few ``(field, description,
shown)`` triples; :func:`curvlib.data.distributed.handshake` compares a hash of each
``description`` across ranks and reports ``shown`` (at most 80 bytes) for a field that
differs. The parameters' *values* are not compared (different ranks may hold different
weights by mistake; that is not detected).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

__all__ = ["FIELDS", "FIT", "MANUAL", "describe", "protocol_field"]

#: the handshake's fields, in order
FIELDS = ("structure", "curvature", "dtype", "parameter layout", "entry sizes", "protocol")
#: the protocols: fit (handshake, status rounds, packed sum) or a hand-written loop
#: (handshake, packed sum); ranks that mix them would exchange buffers of different sizes
FIT = "curvlib.data.fit (status rounds, packed sum)"
MANUAL = "Accumulator.all_reduce_ (packed sum)"


def protocol_field(protocol: str) -> tuple[str, str, str]:
    """The ``protocol`` field: which sequence of collectives follows the handshake."""
    return ("protocol", protocol, protocol)


def _digest(data: bytes, size: int = 4) -> str:
    return hashlib.blake2b(data, digest_size=size).hexdigest()


def describe(
    curv: Any,
    structure: str,
    mc_keying: str,
    shapes: list[tuple[int, ...]],
    layout: tuple[int, ...],
) -> list[tuple[str, str, str]]:
    """The handshake fields of one rank.

    Parameters
    ----------
    curv : CurvatureInterface
        The curvature object (a DDP wrapper already unwrapped).
    structure : str
    mc_keying : str
    shapes, layout
        The summands' shapes and layout (:attr:`StructureRule.template`).

    Returns
    -------
    list of (field, description, shown)
        ``structure``; ``curvature`` (class, curvature name, stochastic, MC samples and
        keying, K-FAC variant); ``dtype`` (of the selected parameters); ``parameter
        layout`` (names and shapes of the selected parameters, ``last_layer``, the
        subnetwork indices; shown as counts and a digest); ``entry sizes`` (the shapes of
        the summands, i.e. of every buffer that is summed across the ranks).
    """
    named = list(curv.params_dict.items())
    cls = type(curv)
    stochastic = bool(getattr(curv, "stochastic", False))
    kind = f"{cls.__name__} {cls.curvature_name()} stochastic={stochastic}"
    if stochastic:
        kind += f" num_samples={getattr(curv, 'num_samples', 1)} mc_keying={mc_keying}"
    if structure == "kron":
        kind += f" kfac_approx={getattr(curv, 'kfac_approx', None)}"
    dtypes = ",".join(sorted({str(p.dtype) for _, p in named}))
    params = ";".join(f"{n}:{tuple(p.shape)}" for n, p in named)
    params += f"|last_layer={getattr(curv, 'last_layer', False)}"
    sub = getattr(curv, "subnetwork_indices", None)
    if sub is not None:
        sub = torch.as_tensor(sub).detach().cpu().contiguous()
        params += f"|subnetwork:{sub.dtype}:{tuple(sub.shape)}:{_digest(sub.numpy().tobytes(), 8)}"
    numel = sum(p.numel() for _, p in named)
    sizes = f"layout={list(layout)} shapes={shapes}"
    total = sum(math.prod(s) for s in shapes)
    return [
        ("structure", structure, structure),
        ("curvature", kind, kind),
        ("dtype", dtypes, dtypes),
        (
            "parameter layout",
            params,
            f"{len(named)} tensors, {numel} entries, #{_digest(params.encode())}",
        ),
        ("entry sizes", sizes, f"{len(shapes)} tensors, {total} entries: {shapes}"),
    ]
