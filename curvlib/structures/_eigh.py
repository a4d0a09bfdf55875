r"""Symmetric eigendecompositions shared by the containers (private).

:func:`eigh_sym` decomposes the symmetric part of (a batch of) matrices in float64 with one
retry; :func:`eigh_factor` adds the round-off clamping of Kronecker factors
(:meth:`~curvlib.structures.Kron.decompose`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from curvlib.errors import DecompositionError

__all__ = ["IndefiniteFactorError", "eigh_sym", "eigh_factor"]


class IndefiniteFactorError(DecompositionError, ValueError):
    """A Kronecker factor with eigenvalues of both signs beyond round-off.

    Both a :class:`~curvlib.errors.DecompositionError` (a ``RuntimeError``) and a
    ``ValueError``.
    """


def _eigh_retry(where: str, hint: str, f64: Tensor, err: Exception) -> tuple[Tensor, Tensor]:
    r"""Second attempt after ``eigh`` failed: float64 on the CPU, scaled to unit max-norm.

    ``eigh`` is scale-equivariant (:math:`F = s\,Q \operatorname{diag}(\lambda/s) Q^\top`),
    and LAPACK on the CPU converges where a GPU solver or badly scaled entries may not.
    Warns (``RuntimeWarning``); raises :class:`DecompositionError` naming ``where`` if this
    fails too.
    """
    warnings.warn(
        f"eigh failed on {where} ({err}); retrying in float64 on the CPU with the factor "
        "scaled to unit max-norm",
        RuntimeWarning,
        stacklevel=5,
    )
    tiny = torch.finfo(torch.float64).tiny
    s = f64.detach().abs().amax(dim=(-2, -1), keepdim=True).clamp_min(tiny)
    try:
        lam, Q = torch.linalg.eigh((f64 / s).cpu())
    except torch.linalg.LinAlgError as err2:
        raise DecompositionError(
            f"eigh failed on {where}, also on the retry in float64 on the CPU: {err2}. {hint}"
        ) from err2
    return (lam * s.squeeze(-1).cpu()).to(f64.device), Q.to(f64.device)


def eigh_sym(F: Tensor, where: str, hint: str = "") -> tuple[Tensor, Tensor]:
    r"""Eigendecomposition of the symmetric part :math:`(F + F^\top)/2` in float64.

    Parameters
    ----------
    F : Tensor
        ``(..., d, d)`` matrices, finite.
    where : str
        Names ``F`` in warnings and errors (e.g. ``"Kron entry 0, factor of shape (3, 3)"``).
    hint : str
        Appended to the error message if the retry fails too.

    Returns
    -------
    (Tensor, Tensor)
        Eigenvalues ``(..., d)`` (ascending) and orthonormal eigenvectors ``(..., d, d)``,
        both float64. Differentiable. A failure of ``eigh`` is retried once
        (:func:`_eigh_retry`).
    """
    f64 = F.to(torch.float64)
    f64 = (f64 + f64.mT) / 2
    try:
        return torch.linalg.eigh(f64)
    except torch.linalg.LinAlgError as err:
        return _eigh_retry(where, hint, f64, err)


def eigh_factor(
    i: int, f: Tensor, grouped: bool, rtol: float | None
) -> tuple[Tensor, Tensor | None]:
    r"""Clamped eigenvalues and eigenvectors of one (batched) Kronecker factor.

    Parameters
    ----------
    i : int
        Entry index (for messages).
    f : Tensor
        The factor in batched form: ``(b, d, d)`` dense or ``(b, d)`` diagonal.
    grouped : bool
        Whether the entry is grouped (for messages: the shape reported is the stored one).
    rtol : float, optional
        See :meth:`~curvlib.structures.Kron.decompose`; default ``10 d eps``.

    Returns
    -------
    (Tensor, Tensor or None)
        Eigenvalues ``(b, d)`` and eigenvectors ``(b, d, d)`` (``None`` for a diagonal
        factor) in ``f``'s dtype. Per group, a semidefinite factor has its round-off
        eigenvalues of the wrong sign clamped to 0.

    Raises
    ------
    DecompositionError
        ``f`` is not finite, or ``eigh`` failed twice.
    IndefiniteFactorError
        A group's factor is indefinite beyond the round-off band.
    """
    shape = tuple(f.shape[int(not grouped) :])
    where = f"Kron entry {i}, factor of shape {shape}"
    if not bool(torch.isfinite(f).all()):
        raise DecompositionError(f"cannot decompose {where}: it has non-finite values")
    dtype = f.dtype
    if f.ndim == 2:
        lam, Q = f, None
    else:
        hint = (
            f"Entry {i} is the curvature of selected parameter tensor {i} (parameters() "
            "order); check that factor for extreme values"
        )
        lam, Q = eigh_sym(f, where, hint)
    n = lam.shape[-1]
    if n > 0:
        eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo().eps
        ld = lam.detach()
        tol = (10 * n * eps if rtol is None else rtol) * ld.abs().amax(dim=-1)
        lmin, lmax = ld.amin(dim=-1), ld.amax(dim=-1)
        bad = (lmin < -tol) & (lmax > tol)
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            group = f" (group {j})" if grouped else ""
            raise IndefiniteFactorError(
                f"{where}{group} is indefinite: eigenvalues range from {lmin[j].item():.3e} "
                f"to {lmax[j].item():.3e}, beyond the round-off band ±{tol[j].item():.3e}"
            )
        negative = (lmin < -tol).unsqueeze(-1)
        lam = torch.where(negative, lam.clamp(max=0), lam.clamp(min=0))
    lam = lam.to(dtype)
    return lam, (None if Q is None else Q.to(dtype))
