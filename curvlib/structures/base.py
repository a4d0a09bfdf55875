r"""The protocol every curvature structure answers: :class:`CurvatureStructure`.

A structure represents a symmetric ``P × P`` matrix :math:`M` (a curvature, possibly plus a
prior precision) over the flattened parameters, in parameter order. Code written against
this protocol works unchanged for every structure (:class:`~curvlib.structures.Dense`,
:class:`~curvlib.structures.Diagonal`, :class:`~curvlib.structures.Kron`,
:class:`~curvlib.structures.KronDecomposed`, :class:`~curvlib.structures.EKFAC`,
:class:`~curvlib.structures.BlockDiag`, :class:`~curvlib.structures.LowRank`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvlib.errors import CapabilityError, InputError
from curvlib.structures._kernels import as_scalar

__all__ = ["CurvatureStructure", "UnsupportedExponentError"]


class UnsupportedExponentError(CapabilityError):
    """An exponent a structure cannot apply exactly.

    For example :math:`M^{1/2}` of a :class:`~curvlib.structures.LowRank` with a diagonal
    remainder, or :math:`M^{-1}` of a ``LowRank`` without remainder (a singular matrix). The
    message names the structure, the exponent and what is available. A
    :class:`~curvlib.errors.CapabilityError` (a ``NotImplementedError``).
    """


class CurvatureStructure(ABC):
    r"""A symmetric ``P × P`` matrix :math:`M` in some structured form.

    Every operation returns a new object or tensor and never modifies its inputs in place
    (``load_state_dict`` excepted). All tensor results are differentiable in the stored
    tensors and in tensor arguments (``delta``, ``s``).

    Notes
    -----
    ``bmm(W, exponent)`` computes :math:`M^{p} w` per vector; :math:`M^{p}` is the matrix
    power of the symmetric :math:`M` (same eigenvectors, eigenvalues to the power ``p``).
    Fractional powers of negative eigenvalues are ``nan``, negative powers of zero
    eigenvalues ``inf`` (as ``torch.pow``), unless a structure documents that it raises
    :class:`UnsupportedExponentError`. ``logdet`` follows ``torch.logdet`` of the dense
    matrix: ``-inf`` if singular, ``nan`` if the determinant is negative.
    """

    # ------------------------------------------------------------------ size and placement
    @property
    @abstractmethod
    def num_params(self) -> int:
        """``P``, the side length of the represented matrix."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)``."""
        P = self.num_params
        return (P, P)

    #: Whether ``dtype`` and ``device`` of an empty structure are ``None`` (``Kron``, as
    #: laplace-torch) rather than the default dtype and the CPU.
    _EMPTY_PLACEMENT_NONE = False

    @abstractmethod
    def _reference(self) -> Tensor | None:
        """A stored tensor whose dtype and device are the structure's (``None`` if empty)."""

    @property
    def dtype(self) -> torch.dtype | None:
        """Dtype of the stored tensors (the default dtype, or ``None`` for an empty ``Kron``)."""
        t = self._reference()
        if t is None:
            return None if self._EMPTY_PLACEMENT_NONE else torch.get_default_dtype()
        return t.dtype

    @property
    def device(self) -> torch.device | None:
        """Device of the stored tensors (the CPU, or ``None`` for an empty ``Kron``)."""
        t = self._reference()
        if t is None:
            return None if self._EMPTY_PLACEMENT_NONE else torch.device("cpu")
        return t.device

    # ------------------------------------------------------------------ products
    @abstractmethod
    def bmm(self, W: Tensor, exponent: float = 1) -> Tensor:
        r""":math:`M^{p} w` for every vector ``w`` in ``W`` (``p`` = ``exponent``).

        Parameters
        ----------
        W : Tensor
            Shape ``(P,)``, ``(K, P)`` or ``(B, K, P)`` (any leading dims), dtype of the
            structure.
        exponent : float, default 1
            Real power of :math:`M` (``-1``: the inverse).

        Returns
        -------
        Tensor
            Same shape as ``W``: row by row :math:`W M^{p}` (:math:`M` is symmetric).

        Raises
        ------
        InputError
            ``W`` has the wrong last dimension, dtype or type.
        UnsupportedExponentError
            Where the structure cannot apply this exponent exactly.
        """

    def mv(self, v: Tensor) -> Tensor:
        r"""Matrix-vector product :math:`M v` for ``v`` of shape ``(P,)``."""
        if not isinstance(v, Tensor) or v.ndim != 1:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise InputError(f"mv needs a vector of shape ({self.num_params},); got {shape}")
        return self.bmm(v, exponent=1)

    def __matmul__(self, X: Tensor) -> Tensor:
        r"""Operator product :math:`M X` for ``X`` of shape ``(P,)`` or ``(P, m)`` (columns).

        So that a structure is an operator for :func:`curvlib.lanczos` and the Hutchinson
        estimators (``A @ V``, ``A.shape``, ``A.dtype``, ``A.device``).
        """
        if not isinstance(X, Tensor) or X.ndim not in (1, 2) or X.shape[0] != self.num_params:
            shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
            P = self.num_params
            raise InputError(f"M @ X needs X of shape ({P},) or ({P}, m); got {shape}")
        if X.ndim == 1:
            return self.bmm(X, exponent=1)
        return self.bmm(X.mT, exponent=1).mT  # M symmetric: (M X)ᵀ = Xᵀ M

    def inv_square_form(self, W: Tensor) -> Tensor:
        r""":math:`W M^{-1} W^\top`.

        Shapes: ``(B, K, P) -> (B, K, K)``, ``(K, P) -> (K, K)``, ``(P,) -> ()``.
        """
        SW = self.bmm(W, exponent=-1)
        if W.ndim == 1:
            return W @ SW
        return W @ SW.mT

    # ------------------------------------------------------------------ reductions
    @abstractmethod
    def logdet(self) -> Tensor:
        r""":math:`\log\det M` (0-dim tensor), signs as ``torch.logdet``."""

    def trace(self) -> Tensor:
        r""":math:`\operatorname{tr} M = \sum_i M_{ii}` (0-dim tensor)."""
        return self.diag().sum()

    @abstractmethod
    def diag(self, exponent: float = 1) -> Tensor:
        r"""Diagonal of :math:`M^{p}`, shape ``(P,)``."""

    @abstractmethod
    def to_matrix(self, exponent: float = 1) -> Tensor:
        r"""Dense :math:`M^{p}`, shape ``(P, P)`` (for testing and small models only)."""

    # ------------------------------------------------------------------ algebra
    @abstractmethod
    def __add__(self, delta: Any) -> CurvatureStructure:
        r""":math:`M + \delta I` (``delta`` a scalar, or one value per entry / block /
        parameter where the structure documents it: a prior precision)."""

    def __radd__(self, delta: Any) -> CurvatureStructure:
        return self.__add__(delta)

    @abstractmethod
    def __mul__(self, scalar: float | Tensor) -> CurvatureStructure:
        r""":math:`s M` for a real scalar ``s`` (negative and zero allowed; differentiable in
        a tensor ``s``)."""

    def __rmul__(self, scalar: float | Tensor) -> CurvatureStructure:
        return self.__mul__(scalar)

    def __truediv__(self, scalar: float | Tensor) -> CurvatureStructure:
        """``self * (1 / scalar)``."""
        s = as_scalar(scalar)
        if s is None:
            return NotImplemented
        return self * (1.0 / s)

    # ------------------------------------------------------------------ conversion
    @abstractmethod
    def _map(self, fn: Callable[[Tensor], Tensor]) -> CurvatureStructure:
        """A new structure of the same type with ``fn`` applied to every stored tensor."""

    def to(
        self,
        device: torch.device | str | torch.dtype | None = None,
        dtype: torch.dtype | None = None,
    ) -> CurvatureStructure:
        """A copy with every tensor moved / cast (``to(torch.float32)`` works too)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def detach(self) -> CurvatureStructure:
        """A copy with every tensor detached from the autograd graph."""
        return self._map(lambda t: t.detach())

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Detached tensors, ``None``, numbers, strings and lists only: loadable with
        ``torch.load(..., weights_only=True)``."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace the contents by those of ``state_dict`` (in place); validated as
        :meth:`from_state_dict`."""
        new = type(self).from_state_dict(state_dict)
        self.__dict__.clear()
        self.__dict__.update(new.__dict__)

    @classmethod
    @abstractmethod
    def from_state_dict(cls, state_dict: dict[str, Any]) -> CurvatureStructure:
        """Rebuild from :meth:`state_dict`.

        Raises
        ------
        InputError
            Not a mapping, missing or unexpected keys, values of the wrong type or shape.
        NonFiniteError
            A tensor with NaN or infinite values (named by key, entry and position).
        """
