r"""Agreement of a row's result with curvlib's autograd backend.

``rel_err = ‖R − R_ref‖_F / ‖R_ref‖_F`` against the autograd result of the same curvature and
structure, in float64 from float32 results: dense matrices, diagonals, vectors, and for
K-FAC the exact Frobenius norm of the block-diagonal Kronecker matrix computed from the
factors,

.. math::
    ‖G_1⊗A_1 − G_2⊗A_2‖_F^2 = ‖G_1‖^2‖A_1‖^2 + ‖G_2‖^2‖A_2‖^2 − 2⟨G_1,G_2⟩⟨A_1,A_2⟩

per block, so that any split of a scale between the factors is immaterial. A library whose
convention differs by a constant (laplace-torch's regression EF is twice curvlib's;
curvlinops and BackPACK's own calls use the unscaled ``MSELoss``) is compared after the
least-squares scalar ``s``, which is reported (``×s``). Every curvlib row must agree within
:data:`TOL` with ``s = 1``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .targets import TOL

__all__ = ["TOL", "agreement", "canon"]


def canon(result: Any, structure: str) -> Any:
    """float64 tensor (diag, full, operator) or list of factor lists (kron)."""
    if structure == "kron":
        kfacs = result.kfacs if hasattr(result, "kfacs") else result
        return [[f.detach().double() for f in F] for F in kfacs]
    if isinstance(result, torch.Tensor):
        return result.detach().double()
    raise TypeError(f"unexpected result {type(result).__name__} for {structure}")


def _factor_inner(F1: torch.Tensor, F2: torch.Tensor) -> float:
    if F1.ndim == 1 and F2.ndim == 1:
        return float((F1 * F2).sum())
    if F1.ndim == 1:
        return float((F1 * F2.diagonal()).sum())
    if F2.ndim == 1:
        return float((F1.diagonal() * F2).sum())
    return float((F1 * F2).sum())


def _inner(a: Any, b: Any) -> float:
    """Frobenius inner product of two results (block-diagonal Kronecker matrices for kron)."""
    if isinstance(a, list):
        if len(a) != len(b) or any(len(F1) != len(F2) for F1, F2 in zip(a, b, strict=True)):
            raise ValueError("different Kron layout")
        total = 0.0
        for F1, F2 in zip(a, b, strict=True):
            term = 1.0
            for f1, f2 in zip(F1, F2, strict=True):
                if f1.shape[0] != f2.shape[0]:
                    raise ValueError("different Kron factor shapes")
                term *= _factor_inner(f1, f2)
            total += term
        return total
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a * b).sum())


def agreement(a: Any, ref: Any) -> tuple[float, float]:
    """``(relative error, scale)`` of ``a`` against ``ref`` (both from :func:`canon`).

    ``scale`` is 1, or the least-squares scalar ``s`` for which ``s·a`` matches ``ref`` when
    that brings the error below 1e-3 (a convention factor).

    Raises
    ------
    ValueError
        If the two results have different shapes or Kronecker layouts.
    """
    aa, bb, ab = _inner(a, a), _inner(ref, ref), _inner(a, ref)
    if bb == 0:
        return (0.0 if aa == 0 else math.inf), 1.0
    err = math.sqrt(max(aa + bb - 2 * ab, 0.0) / bb)
    if err > 1e-3 and aa > 0:
        s = ab / aa
        err_s = math.sqrt(max(s * s * aa + bb - 2 * s * ab, 0.0) / bb)
        if err_s < 1e-3:
            return err_s, s
    return err, 1.0
