r"""Low-rank plus remainder curvature :class:`LowRank` (e.g. top-k eigenpairs from Lanczos).

Represents :math:`M = U \operatorname{diag}(\lambda) U^\top + R` with ``U`` of shape
``(P, k)`` with orthonormal columns and a remainder :math:`R = \sigma I` (a scalar, default
0) or :math:`R = \operatorname{diag}(d)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvlib.errors import CapabilityError, InputError
from curvlib.structures._kernels import (
    LogdetAccumulator,
    as_scalar,
    check_exponent,
    check_W,
    is_delta_like,
    parse_delta,
)
from curvlib.structures._state import as_tensor, check_keys, tensor_field
from curvlib.structures.base import CurvatureStructure, UnsupportedExponentError

__all__ = ["LowRank"]


class LowRank(CurvatureStructure):
    r"""Low rank plus a scalar or diagonal remainder: :math:`M = U \Lambda U^\top + R`.

    Powers, for a scalar remainder :math:`R = \sigma I`, any real ``p`` (``U`` orthonormal):

    .. math:: M^p = U \operatorname{diag}((\lambda + \sigma)^p - \sigma^p)\, U^\top
       + \sigma^p I .

    For a diagonal remainder :math:`D = \operatorname{diag}(d)` only ``p`` in ``{1, 0, -1}``,
    the inverse by Woodbury's identity
    :math:`M^{-1} = D^{-1} - D^{-1} U (I_k + \Lambda U^\top D^{-1} U)^{-1} \Lambda U^\top D^{-1}`
    (needs :math:`d_i \ne 0`). ``logdet`` by the matrix determinant lemma:
    :math:`\sum_j \log(\lambda_j + \sigma) + (P - k) \log\sigma`, or
    :math:`\sum_i \log d_i + \log\det(I_k + \Lambda U^\top D^{-1} U)`. With a zero scalar
    remainder and ``k < P`` the matrix is singular: ``logdet`` is ``-inf`` and negative
    exponents raise :class:`UnsupportedExponentError` (add a ``delta`` first).

    Parameters
    ----------
    U : Tensor
        ``(P, k)`` with orthonormal columns (checked: :math:`\max|U^\top U - I| \le` ``tol``).
    eigenvalues : Tensor
        :math:`\lambda`, shape ``(k,)``.
    remainder : float or Tensor, default 0
        :math:`\sigma` (a number, 0-dim or one-element tensor) or ``d`` of shape ``(P,)``.
    tol : float, optional
        Orthonormality tolerance; default :math:`\sqrt{\varepsilon}` of the dtype.
    """

    def __init__(
        self,
        U: Tensor,
        eigenvalues: Tensor,
        remainder: float | Tensor = 0.0,
        tol: float | None = None,
    ) -> None:
        U = as_tensor(U, "LowRank U")
        lam = as_tensor(eigenvalues, "LowRank eigenvalues")
        if U.ndim != 2 or lam.ndim != 1 or lam.shape[0] != U.shape[1] or U.shape[1] > U.shape[0]:
            raise InputError(
                f"LowRank needs U of shape (P, k) with k <= P and eigenvalues of shape (k,); got "
                f"U {tuple(U.shape)} and eigenvalues {tuple(lam.shape)}"
            )
        rem = parse_delta(remainder, {U.shape[0]: "a diagonal remainder"}, U.dtype, U.device)
        k = U.shape[1]
        eps = torch.finfo(U.dtype).eps if U.dtype.is_floating_point else torch.finfo().eps
        tol = math.sqrt(eps) if tol is None else tol
        err = (U.detach().mT @ U.detach() - torch.eye(k, dtype=U.dtype, device=U.device)).abs()
        if k and err.max().item() > tol:
            raise InputError(
                f"LowRank U must have orthonormal columns: max|UᵀU - I| = {err.max().item():.3e} "
                f"> tol = {tol:.3e} (orthonormalize U, e.g. torch.linalg.qr, or pass tol)"
            )
        self._set(U, lam, rem)

    def _set(self, U: Tensor, lam: Tensor, rem: Tensor) -> LowRank:
        self.U: Tensor = U
        self.eigenvalues: Tensor = lam
        self.remainder: Tensor = rem
        return self

    def _new(self, U: Tensor, lam: Tensor, rem: Tensor) -> LowRank:
        """A new ``LowRank`` without re-checking ``U`` (derived from a checked one)."""
        return LowRank.__new__(LowRank)._set(U, lam, rem)

    # ---------------------------------------------------------------- properties
    @property
    def num_params(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        """``k``, the number of columns of ``U``."""
        return self.U.shape[1]

    def _reference(self) -> Tensor:
        return self.U

    @property
    def scalar_remainder(self) -> bool:
        """Whether the remainder is :math:`\\sigma I` (else :math:`\\operatorname{diag}(d)`)."""
        return self.remainder.ndim == 0

    def __repr__(self) -> str:
        kind = "scalar" if self.scalar_remainder else "diagonal"
        return (
            f"LowRank(num_params={self.num_params}, rank={self.rank}, remainder={kind}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    # ---------------------------------------------------------------- powers
    def _singular(self) -> bool:
        return self.scalar_remainder and self.rank < self.num_params and bool(self.remainder == 0)

    def _check_power(self, p: float) -> None:
        if p < 0 and self._singular():
            raise UnsupportedExponentError(
                f"exponent {p} of a LowRank with zero remainder and rank {self.rank} < P = "
                f"{self.num_params}: the matrix is singular; add a delta first (lowrank + delta)"
            )
        if not self.scalar_remainder:
            if p not in (1, 0, -1):
                raise UnsupportedExponentError(
                    f"exponent {p} of a LowRank with a diagonal remainder: only 1, 0 and -1 "
                    "(Woodbury) are exact; use a scalar remainder for other powers"
                )
            if p == -1 and bool((self.remainder == 0).any()):
                raise UnsupportedExponentError(
                    "exponent -1 of a LowRank whose diagonal remainder has zero entries "
                    "(Woodbury needs D invertible); add a positive delta first"
                )

    def _scalar_coeffs(self, p: float) -> tuple[Tensor, Tensor]:
        r""":math:`c = (\lambda + \sigma)^p - \sigma^p` and :math:`\sigma^p` (``p != 0``); for
        :math:`\sigma = 0` exactly :math:`c = \lambda^p` and 0 (no ``inf - inf`` when
        ``k = P``)."""
        lam, r = self.eigenvalues, self.remainder
        if p == 1:
            return lam, r
        if bool(r.detach() == 0):
            return lam.pow(p), torch.zeros_like(r)
        rp = r.pow(p)
        return (lam + r).pow(p) - rp, rp

    def _woodbury_core(self) -> tuple[Tensor, Tensor]:
        r"""``D^{-1}`` and :math:`C^{-1}\Lambda` with :math:`C = I_k + \Lambda U^\top D^{-1} U`."""
        dinv = 1.0 / self.remainder
        lam = self.eigenvalues
        C = torch.eye(self.rank, dtype=self.dtype, device=self.device) + lam[:, None] * (
            self.U.mT @ (dinv[:, None] * self.U)
        )
        return dinv, torch.linalg.solve(C, torch.diag(lam))

    def bmm(self, W: Tensor, exponent: float = 1) -> Tensor:
        r""":math:`M^p w` per vector (class doc for the formulas and the available ``p``);
        ``W`` and the result as :meth:`CurvatureStructure.bmm`.

        Raises
        ------
        UnsupportedExponentError
            A diagonal remainder and ``p`` not in ``{1, 0, -1}`` (or ``-1`` with zeros in
            ``d``); a zero scalar remainder with ``k < P`` and ``p < 0``.
        """
        W2 = check_W(W, self.num_params, self.dtype)
        p = check_exponent(exponent)
        self._check_power(p)
        U, lam, r = self.U, self.eigenvalues, self.remainder
        if p == 0:
            out = W2.clone()
        elif self.scalar_remainder:
            c, rp = self._scalar_coeffs(p)
            out = ((W2 @ U) * c) @ U.mT + rp * W2
        elif p == 1:
            out = ((W2 @ U) * lam) @ U.mT + r * W2
        else:
            dinv, CL = self._woodbury_core()
            X = W2 * dinv
            out = X - ((X @ U) @ CL.mT @ U.mT) * dinv
        return out.reshape(W.shape)

    # ---------------------------------------------------------------- reductions
    def logdet(self) -> Tensor:
        r""":math:`\log\det M` by the matrix determinant lemma (class doc). ``-inf`` for a zero
        scalar remainder with ``k < P``.

        Raises
        ------
        CapabilityError
            A diagonal remainder with zero entries (the lemma needs ``D`` invertible).
        """
        acc = LogdetAccumulator(self.dtype, self.device)
        r = self.remainder
        if self.scalar_remainder:
            acc.add_values(self.eigenvalues + r)
            if self.num_params > self.rank:
                acc.add_values(r.reshape(1), self.num_params - self.rank)
            return acc.total()
        if bool((r == 0).any()):
            raise CapabilityError(
                "logdet of a LowRank whose diagonal remainder has zero entries has no closed "
                "form here (the determinant lemma needs D invertible); add a positive delta "
                "or use torch.logdet(lowrank.to_matrix())"
            )
        dinv = 1.0 / r
        C = torch.eye(self.rank, dtype=self.dtype, device=self.device) + self.eigenvalues[
            :, None
        ] * (self.U.mT @ (dinv[:, None] * self.U))
        acc.add_values(r)
        acc.add_slogdet(*torch.linalg.slogdet(C))
        return acc.total()

    def trace(self) -> Tensor:
        r""":math:`\sum_j \lambda_j + P\sigma` or :math:`+ \sum_i d_i`."""
        r = self.remainder
        return self.eigenvalues.sum() + (r * self.num_params if self.scalar_remainder else r.sum())

    def diag(self, exponent: float = 1) -> Tensor:
        r"""Diagonal of :math:`M^p`: :math:`(U^{\circ 2}) c + r` with the coefficients of
        :meth:`bmm`; for the Woodbury inverse
        :math:`d^{-1} - d^{-2} \odot \operatorname{rowsum}((U C^{-1} \Lambda) \odot U)`."""
        p = check_exponent(exponent)
        self._check_power(p)
        U, lam, r = self.U, self.eigenvalues, self.remainder
        ones = torch.ones(self.num_params, dtype=self.dtype, device=self.device)
        if p == 0:
            return ones
        if self.scalar_remainder:
            c, rp = self._scalar_coeffs(p)
            return (U * U) @ c + rp * ones
        if p == 1:
            return (U * U) @ lam + r
        dinv, CL = self._woodbury_core()
        return dinv - dinv**2 * ((U @ CL) * U).sum(1)

    def to_matrix(self, exponent: float = 1) -> Tensor:
        """Dense :math:`M^p`, shape ``(P, P)`` (``bmm`` of the identity)."""
        return self.bmm(torch.eye(self.num_params, dtype=self.dtype, device=self.device), exponent)

    # ---------------------------------------------------------------- algebra
    def __add__(self, delta: float | Tensor) -> LowRank:
        r""":math:`M + \delta I` (scalar, added to :math:`\sigma` or ``d``) or
        :math:`M + \operatorname{diag}(\delta)` (``(P,)``: the remainder becomes diagonal)."""
        if isinstance(delta, CurvatureStructure) or not is_delta_like(delta):
            return NotImplemented
        d = parse_delta(delta, {self.num_params: "one per parameter"}, self.dtype, self.device)
        return self._new(self.U, self.eigenvalues, self.remainder + d)

    def __mul__(self, scalar: float | Tensor) -> LowRank:
        r""":math:`s M`: :math:`\lambda` and the remainder times ``s``."""
        s = as_scalar(scalar)
        if s is None:
            return NotImplemented
        return self._new(self.U, self.eigenvalues * s, self.remainder * s)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> LowRank:
        return self._new(fn(self.U), fn(self.eigenvalues), fn(self.remainder))

    def state_dict(self) -> dict[str, Any]:
        """``{"U": Tensor, "eigenvalues": Tensor, "remainder": Tensor}`` (detached; the
        remainder 0-dim for :math:`\\sigma I`, ``(P,)`` for a diagonal)."""
        return {
            "U": self.U.detach(),
            "eigenvalues": self.eigenvalues.detach(),
            "remainder": self.remainder.detach(),
        }

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any]) -> LowRank:
        """Rebuild a ``LowRank`` from :meth:`state_dict` (validated: keys, types, shapes,
        finite values, orthonormal ``U``)."""
        sd = check_keys(state_dict, "LowRank", {"U", "eigenvalues", "remainder"})
        fields = {key: tensor_field(sd[key], "LowRank", key) for key in sd}
        return cls(fields["U"], fields["eigenvalues"], fields["remainder"])
