"""Curvature structures: one protocol, many containers.

Every container subclasses :class:`CurvatureStructure` and answers the same questions
(``mv``, ``bmm(W, exponent)``, ``logdet``, ``trace``, ``diag``, ``to_matrix``, ``+ delta``,
``* s``, ``to``, ``state_dict``, ...), so code that consumes curvature does not depend on the
structure it got.

========================  ==============================================================
:class:`Dense`            a dense ``P × P`` matrix (wraps the result of ``full``)
:class:`Diagonal`         a diagonal matrix (wraps the result of ``diag``)
:class:`Kron`             K-FAC: block-diagonal Kronecker products, one entry per parameter
:class:`KronDecomposed`   the eigendecomposed ``Kron`` plus a prior precision per entry
:class:`EKFAC`            Kronecker eigenbases with corrected eigenvalues (George et al. 2018)
:class:`BlockDiag`        dense blocks, one per group of parameters (e.g. per layer)
:class:`LowRank`          ``U diag(λ) Uᵀ`` plus a scalar or diagonal remainder
========================  ==============================================================
"""

from __future__ import annotations

from curvlib.structures._eigh import IndefiniteFactorError
from curvlib.structures.base import CurvatureStructure, UnsupportedExponentError
from curvlib.structures.blockdiag import BlockDiag
from curvlib.structures.decomposed import KronDecomposed
from curvlib.structures.dense import Dense, Diagonal
from curvlib.structures.ekfac import EKFAC
from curvlib.structures.kronecker import Kron
from curvlib.structures.lowrank import LowRank

__all__ = [
    "CurvatureStructure",
    "UnsupportedExponentError",
    "IndefiniteFactorError",
    "Dense",
    "Diagonal",
    "Kron",
    "KronDecomposed",
    "EKFAC",
    "BlockDiag",
    "LowRank",
]
