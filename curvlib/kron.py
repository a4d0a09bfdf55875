"""Kronecker-factored curvature: :class:`Kron` and its eigendecomposed :class:`KronDecomposed`.

The containers live in :mod:`curvlib.structures` (with the other curvature structures and
their shared protocol, :class:`~curvlib.structures.CurvatureStructure`); this module keeps
the import path ``from curvlib.kron import Kron, KronDecomposed, IndefiniteFactorError``.
"""

from __future__ import annotations

from curvlib.structures._eigh import IndefiniteFactorError
from curvlib.structures.decomposed import KronDecomposed
from curvlib.structures.kronecker import Kron

__all__ = ["Kron", "KronDecomposed", "IndefiniteFactorError"]
