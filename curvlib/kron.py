r"""Kronecker-factored curvature: :class:`Kron` and its eigendecomposed :class:`KronDecomposed`.

The container shared by every backend (DESIGN §4), API-compatible with laplace-torch 0.3's
``laplace.utils.matrix.Kron`` / ``KronDecomposed`` where that is sensible.

Layout
------
One *entry* per trainable parameter tensor, in parameter order. An entry is a list of
*factors* :math:`F_1, \dots, F_n` (usually ``n = 1`` or ``2``) and stands for the block

.. math:: B = F_1 \otimes F_2 \otimes \dots \otimes F_n ,

(``torch.kron`` order) acting on the row-major flattening of the parameter. A weight ``W`` of
shape ``(out, *rest)`` has ``[G (out×out), A (r×r)]`` with ``r = prod(rest)``; a bias has
``[G]``. A factor may be a 1-D tensor ``d``, meaning the diagonal matrix ``diag(d)``; this
is supported by every operation. The full matrix (``to_matrix()``) is block-diagonal over the
entries, in order, of size ``P × P`` with ``P = num_params``.

Differences from laplace-torch (deliberate, each a bug there)
-------------------------------------------------------------
* ``Kron + Kron`` raises :class:`ValueError` when the block structures differ (laplace's
  ``zip`` silently truncates).
* ``* s`` multiplies ``s`` into the *first* factor of each entry, so any real ``s`` works
  (negative and zero too) and the result is differentiable in a tensor ``s`` (laplace uses
  ``pow(s, 1/n)`` on every factor: fails for ``s < 0``, breaks the autograd graph).
* ``KronDecomposed`` keeps ``damping`` through ``+`` and ``*`` (laplace drops it), and
  ``KronDecomposed * s`` scales the whole represented matrix, deltas included.
* ``bmm`` returns exactly the shape of ``W`` (laplace's ``squeeze`` also drops ``K = 1``).
* 1-D factors decompose to eigenvectors ``None`` (identity) instead of a dense identity.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlib.errors import DecompositionError, InputError

__all__ = ["Kron", "KronDecomposed", "IndefiniteFactorError"]


class IndefiniteFactorError(DecompositionError, ValueError):
    """A Kronecker factor with eigenvalues of both signs beyond round-off.

    Both a :class:`~curvlib.errors.DecompositionError` (a ``RuntimeError``) and a
    ``ValueError``.
    """


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _as_scalar(scalar: Any) -> float | Tensor | None:
    """Return ``scalar`` as a python float or a 0-dim tensor, or ``None`` if not a number.

    Raises :class:`InputError` for a tensor with more than one element or a complex value.
    """
    if isinstance(scalar, Tensor):
        if scalar.numel() != 1 or scalar.ndim > 1:
            raise InputError(
                "can only multiply by a real scalar: a python number, a 0-dim tensor or a "
                f"tensor of one element; got a tensor of shape {tuple(scalar.shape)}"
            )
        if scalar.is_complex():
            raise InputError("can only multiply by a real scalar; got a complex tensor")
        return scalar.reshape(())
    if isinstance(scalar, numbers.Real):
        return float(scalar)
    if isinstance(scalar, numbers.Number):
        raise InputError(f"can only multiply by a real scalar; got {scalar!r}")
    return None


def _outer(vectors: Sequence[Tensor]) -> Tensor:
    """Outer product of vectors ``v_1, ..., v_n``: a tensor of shape ``(d_1, ..., d_n)``.

    Its row-major flattening is ``torch.kron(v_1, ..., v_n)``.
    """
    out = vectors[0]
    for v in vectors[1:]:
        out = out.unsqueeze(-1) * v
    return out


def _apply_along(X: Tensor, mats: Sequence[Tensor | None], transpose: bool = False) -> Tensor:
    r"""Apply one matrix per axis: ``X`` of shape ``(N, d_1, ..., d_n)``.

    Axis ``k + 1`` is multiplied by ``mats[k]`` (by its transpose if ``transpose``), which
    is a dense ``(d_k, d_k)`` matrix, a 1-D diagonal or ``None`` (identity). The result is
    :math:`(M_1 \otimes \dots \otimes M_n)\, x` for each row-major flattened ``x = X[i]``.
    """
    for k, M in enumerate(mats):
        if M is None:
            continue
        ax = k + 1
        if M.ndim == 1:
            shape = [1] * X.ndim
            shape[ax] = -1
            X = X * M.reshape(shape)
        else:
            Xm = torch.movedim(X, ax, -1)
            Xm = Xm @ (M if transpose else M.mT)
            X = torch.movedim(Xm, -1, ax)
    return X


def _dense(F: Tensor) -> Tensor:
    return torch.diag(F) if F.ndim == 1 else F


def _kron_all(mats: Sequence[Tensor]) -> Tensor:
    # torch.kron needs contiguous inputs (eigh returns column-major eigenvectors)
    out = mats[0].contiguous()
    for M in mats[1:]:
        out = torch.kron(out, M.contiguous())
    return out


def _block_diag(blocks: list[Tensor], like: Tensor | None) -> Tensor:
    if not blocks:
        kw = {} if like is None else {"dtype": like.dtype, "device": like.device}
        return torch.zeros(0, 0, **kw)
    return torch.block_diag(*blocks)


def _signed_logdet_total(logabs: Tensor, n_neg: Tensor, has_zero: Tensor) -> Tensor:
    """``log det`` from ``log|det|``, the number of negative eigenvalues and a zero flag.

    Same convention as ``torch.logdet``: ``-inf`` if singular, ``nan`` if ``det < 0``.
    """
    ninf = torch.full_like(logabs, -math.inf)
    nan = torch.full_like(logabs, math.nan)
    return torch.where(has_zero, ninf, torch.where(n_neg % 2 == 1, nan, logabs))


def _check_W(W: Tensor, P: int, dtype: torch.dtype | None) -> Tensor:
    if not isinstance(W, Tensor):
        raise InputError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim < 1 or W.shape[-1] != P:
        raise InputError(
            f"W must have shape (P,), (K, P) or (B, K, P) with P = {P}; got {tuple(W.shape)}"
        )
    if dtype is not None and W.dtype != dtype:
        raise InputError(f"W has dtype {W.dtype} but the Kronecker factors have {dtype}")
    return W.reshape(-1, P)


def _entry_sizes(dims: Sequence[int]) -> int:
    return math.prod(dims)


def _matvec_entries(
    W2: Tensor, dims: list[tuple[int, ...]], fn: Callable[[int, Tensor], Tensor]
) -> Tensor:
    """Apply ``fn(i, X_i)`` to the slice of ``W2 (N, P)`` of each entry, ``X_i (N, *dims_i)``."""
    N = W2.shape[0]
    out, cur = [], 0
    for i, d in enumerate(dims):
        p = _entry_sizes(d)
        X = W2[:, cur : cur + p].reshape(N, *d)
        out.append(fn(i, X).reshape(N, p))
        cur += p
    if not out:
        return W2.clone()
    return torch.cat(out, dim=1)


# --------------------------------------------------------------------------------------------
# Kron
# --------------------------------------------------------------------------------------------


class Kron:
    r"""Kronecker-factored curvature: a block-diagonal matrix of Kronecker products.

    Entry ``i`` with factors ``[F_1, ..., F_n]`` stands for the block
    :math:`B_i = F_1 \otimes \dots \otimes F_n` (``torch.kron`` order; a 1-D factor ``d`` is
    ``diag(d)``), and the whole object for :math:`\operatorname{blockdiag}(B_1, \dots, B_E)`.
    A weight of shape ``(out, *rest)`` has ``[G (out×out), A (r×r)]``, ``r = prod(rest)``,
    for its row-major flattening; a bias ``[G]``.

    Parameters
    ----------
    kfacs : list of list of Tensor
        One list of factors per parameter tensor, in parameter order. Each factor is a square
        2-D tensor or a 1-D tensor (a diagonal). A bare tensor or a tuple is accepted as an
        entry too (laplace-torch style) and stored as a list.

    Attributes
    ----------
    kfacs : list of list of Tensor
        The factors (laplace-torch's attribute name).

    Notes
    -----
    ``+`` of two ``Kron`` is the *factor-wise* sum
    :math:`(G_1 + G_2) \otimes (A_1 + A_2)` — how K-FAC accumulates over batches — not the
    sum of the represented matrices. ``*`` by a scalar ``s`` gives
    :math:`(s F_1) \otimes F_2 \otimes \dots`, i.e. exactly ``s`` times the matrix.
    Operations return new objects and never modify their inputs in place; unchanged factors
    may be shared between input and result.
    """

    def __init__(self, kfacs: Sequence[Sequence[Tensor] | Tensor]) -> None:
        entries: list[list[Tensor]] = []
        for i, F in enumerate(kfacs):
            Fs = [F] if isinstance(F, Tensor) else list(F)
            if not Fs:
                raise InputError(f"Kron entry {i} has no factors")
            for j, f in enumerate(Fs):
                if not isinstance(f, Tensor):
                    raise InputError(
                        f"Kron entry {i} factor {j} must be a torch.Tensor, got {type(f).__name__}"
                    )
                if not (f.ndim == 1 or (f.ndim == 2 and f.shape[0] == f.shape[1])):
                    raise InputError(
                        f"Kron entry {i} factor {j} must be square 2-D or 1-D (diagonal); "
                        f"got shape {tuple(f.shape)}"
                    )
            entries.append(Fs)
        self.kfacs: list[list[Tensor]] = entries

    # ---------------------------------------------------------------- construction
    @classmethod
    def init_from_model(
        cls,
        model: nn.Module | Iterable[Tensor],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Kron:
        """Zero factors shaped after a model's parameters.

        Parameters
        ----------
        model : nn.Module or iterable of Tensor
            A module (its parameters with ``requires_grad=True``, in ``parameters()`` order)
            or an iterable of parameters / tensors (all of them, in order).
        device, dtype : optional
            Of the factors; default: those of each parameter.

        Returns
        -------
        Kron
            A 1-D parameter of size ``n`` gets ``[zeros(n, n)]``; a parameter of shape
            ``(out, *rest)`` with ``len(rest) >= 1`` (Linear, Conv1d/2d/3d, ...) gets
            ``[zeros(out, out), zeros(r, r)]`` with ``r = prod(rest)``; a 0-dim parameter
            gets ``[zeros(1, 1)]``.
        """
        if isinstance(model, nn.Module):
            params: Iterable[Tensor] = [p for p in model.parameters() if p.requires_grad]
        else:
            params = model
        kfacs: list[list[Tensor]] = []
        for p in params:
            kw = {
                "device": p.device if device is None else device,
                "dtype": p.dtype if dtype is None else dtype,
            }
            if p.ndim <= 1:
                n = p.numel()
                kfacs.append([torch.zeros(n, n, **kw)])
            else:
                out, r = p.shape[0], math.prod(p.shape[1:])
                kfacs.append([torch.zeros(out, out, **kw), torch.zeros(r, r, **kw)])
        return cls(kfacs)

    # ---------------------------------------------------------------- properties
    @property
    def dims(self) -> list[tuple[int, ...]]:
        """Factor sizes per entry, e.g. ``[(out, r), (out,)]``."""
        return [tuple(f.shape[0] for f in F) for F in self.kfacs]

    @property
    def block_sizes(self) -> list[int]:
        """Number of parameters of each entry (``out * r`` for a weight)."""
        return [_entry_sizes(d) for d in self.dims]

    @property
    def num_params(self) -> int:
        """``P``, the side length of the full matrix."""
        return sum(self.block_sizes)

    @property
    def device(self) -> torch.device | None:
        """Device of the first factor (``None`` if there are no entries)."""
        return self.kfacs[0][0].device if self.kfacs else None

    @property
    def dtype(self) -> torch.dtype | None:
        """Dtype of the first factor (``None`` if there are no entries)."""
        return self.kfacs[0][0].dtype if self.kfacs else None

    def __len__(self) -> int:
        return len(self.kfacs)

    def __repr__(self) -> str:
        shapes = [[tuple(f.shape) for f in F] for F in self.kfacs]
        return (
            f"Kron(entries={len(self)}, num_params={self.num_params}, dtype={self.dtype}, "
            f"device={self.device}, factor_shapes={shapes})"
        )

    # ---------------------------------------------------------------- arithmetic
    def _check_same_structure(self, other: Kron) -> None:
        if len(self) != len(other):
            raise InputError(
                f"cannot add Kron objects with different numbers of entries: "
                f"{len(self)} and {len(other)}"
            )
        for i, (F1, F2) in enumerate(zip(self.kfacs, other.kfacs, strict=True)):
            s1 = [tuple(f.shape) for f in F1]
            s2 = [tuple(f.shape) for f in F2]
            if s1 != s2:
                raise InputError(
                    f"cannot add Kron objects: entry {i} has factor shapes {s1} and {s2}"
                )

    def __add__(self, other: Kron) -> Kron:
        """Factor-wise sum ``[F + F' for F, F' in zip(entry, entry')]`` for every entry.

        Raises
        ------
        ValueError
            If the numbers of entries, of factors per entry or the factor shapes differ.
        """
        if not isinstance(other, Kron):
            return NotImplemented
        self._check_same_structure(other)
        return Kron(
            [
                [a + b for a, b in zip(F1, F2, strict=True)]
                for F1, F2 in zip(self.kfacs, other.kfacs, strict=True)
            ]
        )

    def __radd__(self, other: Any) -> Kron:
        # ``0 + kron`` so that the builtin ``sum`` works.
        if isinstance(other, numbers.Number) and not isinstance(other, Tensor) and other == 0:
            return Kron([list(F) for F in self.kfacs])
        if isinstance(other, Kron):
            return other.__add__(self)
        return NotImplemented

    def __mul__(self, scalar: float | Tensor) -> Kron:
        r"""``scalar`` times the represented matrix: :math:`(s F_1) \otimes F_2 \otimes \dots`.

        ``scalar`` is any real python number or a one-element tensor (negative and zero
        allowed); the result is differentiable in a tensor ``scalar``.
        """
        s = _as_scalar(scalar)
        if s is None:
            return NotImplemented
        return Kron([[F[0] * s, *F[1:]] for F in self.kfacs])

    __rmul__ = __mul__

    def __truediv__(self, scalar: float | Tensor) -> Kron:
        """``self * (1 / scalar)``."""
        s = _as_scalar(scalar)
        if s is None:
            return NotImplemented
        return self * (1.0 / s)

    # ---------------------------------------------------------------- decomposition
    def decompose(self, damping: bool = False, *, rtol: float | None = None) -> KronDecomposed:
        r"""Eigendecompose every factor: :math:`F = Q \operatorname{diag}(\lambda) Q^\top`.

        Each dense factor is symmetrized, :math:`(F + F^\top)/2`, and decomposed with
        ``torch.linalg.eigh`` in float64; eigenvalues and eigenvectors are cast back to the
        factor's dtype. A 1-D factor's eigenvalues are its entries and its eigenvectors
        ``None`` (identity). Differentiable (through ``eigh``).

        Round-off: with :math:`\tau = \mathrm{rtol} \cdot \max|\lambda|` and default
        ``rtol = 10 n \varepsilon`` (``n`` the factor size, :math:`\varepsilon` the machine
        epsilon of the factor's dtype), a positive semidefinite factor (all
        :math:`\lambda \ge -\tau`) has its negative eigenvalues clamped to 0; a negative
        semidefinite one (all :math:`\lambda \le \tau`, e.g. after ``* s`` with ``s < 0``)
        its positive eigenvalues clamped to 0.

        Parameters
        ----------
        damping : bool, default False
            Stored on the result; see :class:`KronDecomposed`.
        rtol : float, optional
            Relative tolerance of the clamping band (default ``10 * n * eps``).

        Returns
        -------
        KronDecomposed

        Raises
        ------
        IndefiniteFactorError (a ValueError)
            A factor has eigenvalues below :math:`-\tau` and above :math:`\tau` (indefinite
            beyond round-off); the message names the entry and the factor shape.
        DecompositionError (a RuntimeError)
            ``eigh`` failed twice (a failure is retried once, with a ``RuntimeWarning``, in
            float64 on the CPU with the factor scaled to unit max-norm), or a factor is not
            finite; the message names entry and shape.
        """
        eigvecs: list[list[Tensor | None]] = []
        eigvals: list[list[Tensor]] = []
        for i, F in enumerate(self.kfacs):
            Qs: list[Tensor | None] = []
            ls: list[Tensor] = []
            for f in F:
                lam, Q = _eigh_factor(i, f, rtol)
                Qs.append(Q)
                ls.append(lam)
            eigvecs.append(Qs)
            eigvals.append(ls)
        return KronDecomposed(eigvecs, eigvals, damping=damping)

    # ---------------------------------------------------------------- products
    def bmm(self, W: Tensor, exponent: float = 1) -> Tensor:
        r"""Compute :math:`K^{\mathrm{exponent}} w` for every vector ``w`` in ``W``.

        Parameters
        ----------
        W : Tensor
            Shape ``(P,)``, ``(K, P)`` or ``(B, K, P)`` (any leading dims).
        exponent : float, default 1
            For ``1`` the Kronecker matrix-vector product
            :math:`(G \otimes A)\, \mathrm{vec}(X) = \mathrm{vec}(G X A^\top)` is applied
            per entry without any dense matrix; otherwise the factors are decomposed first
            (``self.decompose().bmm(W, exponent)``).

        Returns
        -------
        Tensor
            Same shape as ``W``.
        """
        if exponent != 1:
            return self.decompose().bmm(W, exponent=exponent)
        W2 = _check_W(W, self.num_params, self.dtype)
        out = _matvec_entries(W2, self.dims, lambda i, X: _apply_along(X, self.kfacs[i]))
        return out.reshape(W.shape)

    # ---------------------------------------------------------------- reductions
    def logdet(self) -> Tensor:
        r"""Log-determinant of the full matrix, from the factors.

        :math:`\log\det(F_1 \otimes \dots \otimes F_n) = \sum_k (p / d_k) \log\det F_k`
        with ``p`` the block size and ``d_k`` the size of ``F_k``. Signs are tracked as in
        ``torch.logdet`` of the dense matrix: ``-inf`` if singular, ``nan`` if negative.
        """
        ref = self.kfacs[0][0] if self.kfacs else torch.zeros(())
        logabs = torch.zeros((), dtype=ref.dtype, device=ref.device)
        n_neg = torch.zeros((), dtype=torch.long, device=ref.device)
        has_zero = torch.zeros((), dtype=torch.bool, device=ref.device)
        for F, d in zip(self.kfacs, self.dims, strict=True):
            p = _entry_sizes(d)
            for f, dk in zip(F, d, strict=True):
                mult = p // dk
                if f.ndim == 1:
                    la = f.abs().log().sum()
                    neg = (f < 0).sum()
                    zero = (f == 0).any()
                else:
                    sign, la = torch.linalg.slogdet(f)
                    neg = (sign < 0).long()
                    zero = sign == 0
                logabs = logabs + mult * la
                n_neg = n_neg + mult * neg
                has_zero = has_zero | zero
        return _signed_logdet_total(logabs, n_neg, has_zero)

    def diag(self) -> Tensor:
        """Diagonal of the full matrix, shape ``(P,)``: per entry the flattened outer
        product of the factors' diagonals."""
        diags = [
            _outer([f if f.ndim == 1 else torch.diagonal(f) for f in F]).flatten()
            for F in self.kfacs
        ]
        if not diags:
            return torch.zeros(0)
        return torch.cat(diags)

    def to_matrix(self) -> Tensor:
        """The dense ``P × P`` block-diagonal matrix (for testing and small models only)."""
        blocks = [_kron_all([_dense(f) for f in F]) for F in self.kfacs]
        return _block_diag(blocks, self.kfacs[0][0] if self.kfacs else None)

    # ---------------------------------------------------------------- conversion
    def to(
        self,
        device: torch.device | str | torch.dtype | None = None,
        dtype: torch.dtype | None = None,
    ) -> Kron:
        """A copy with every factor moved / cast (``to(torch.float32)`` works too)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        return Kron([[f.to(device=device, dtype=dtype) for f in F] for F in self.kfacs])

    def detach(self) -> Kron:
        """A new ``Kron`` with detached factors."""
        return Kron([[f.detach() for f in F] for F in self.kfacs])

    def state_dict(self) -> dict[str, Any]:
        """``{"kfacs": [[Tensor, ...], ...]}`` (detached): loadable with
        ``torch.load(..., weights_only=True)``."""
        return {"kfacs": [[f.detach() for f in F] for F in self.kfacs]}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Replace the factors by those of ``state_dict`` (in place).

        With ``strict`` (default) and a non-empty ``self``, the block structure must match
        (else ``ValueError``) and the loaded factors keep ``self``'s device and dtype.
        """
        if "kfacs" not in state_dict:
            raise InputError(f"not a Kron state dict: keys {sorted(state_dict)}")
        new = Kron(state_dict["kfacs"])
        if strict and len(self) > 0:
            self._check_same_structure(new)
            new = Kron(
                [
                    [g.to(device=f.device, dtype=f.dtype) for f, g in zip(F, G, strict=True)]
                    for F, G in zip(self.kfacs, new.kfacs, strict=True)
                ]
            )
        self.kfacs = new.kfacs

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any]) -> Kron:
        """Rebuild a ``Kron`` from :meth:`state_dict`."""
        if "kfacs" not in state_dict:
            raise InputError(f"not a Kron state dict: keys {sorted(state_dict)}")
        return cls(state_dict["kfacs"])


def _eigh_retry(i: int, shape: tuple, f64: Tensor, err: Exception) -> tuple[Tensor, Tensor]:
    r"""Second attempt after ``eigh`` failed: float64 on the CPU, scaled to unit max-norm.

    ``eigh`` is scale-equivariant (:math:`F = s\,Q \operatorname{diag}(\lambda/s) Q^\top`),
    and LAPACK on the CPU converges where a GPU solver or badly scaled entries may not.
    Warns (``RuntimeWarning``); raises :class:`DecompositionError` naming the entry and the
    factor shape if this fails too.
    """
    warnings.warn(
        f"eigh failed on Kron entry {i}, factor of shape {shape} ({err}); retrying in "
        "float64 on the CPU with the factor scaled to unit max-norm",
        RuntimeWarning,
        stacklevel=4,
    )
    s = f64.detach().abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    try:
        lam, Q = torch.linalg.eigh((f64 / s).cpu())
    except torch.linalg.LinAlgError as err2:
        raise DecompositionError(
            f"eigh failed on Kron entry {i}, factor of shape {shape}, also on the retry in "
            f"float64 on the CPU: {err2}. Entry {i} is the curvature of selected parameter "
            f"tensor {i} (parameters() order); check that factor for extreme values"
        ) from err2
    return (lam * s.cpu()).to(f64.device), Q.to(f64.device)


def _eigh_factor(i: int, f: Tensor, rtol: float | None) -> tuple[Tensor, Tensor | None]:
    """Eigenvalues (clamped, see :meth:`Kron.decompose`) and eigenvectors of one factor."""
    shape = tuple(f.shape)
    if not bool(torch.isfinite(f).all()):
        raise DecompositionError(
            f"cannot decompose Kron entry {i}: factor of shape {shape} has non-finite values"
        )
    dtype = f.dtype
    if f.ndim == 1:
        lam, Q = f, None
    else:
        f64 = f.to(torch.float64)
        f64 = (f64 + f64.mT) / 2
        try:
            lam, Q = torch.linalg.eigh(f64)
        except torch.linalg.LinAlgError as err:
            lam, Q = _eigh_retry(i, shape, f64, err)
    n = lam.shape[0]
    if n > 0:
        eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo().eps
        tol = (10 * n * eps if rtol is None else rtol) * lam.detach().abs().max()
        lmin, lmax = lam.detach().min(), lam.detach().max()
        if lmin < -tol and lmax > tol:
            raise IndefiniteFactorError(
                f"Kron entry {i}, factor of shape {shape} is indefinite: eigenvalues range "
                f"from {lmin.item():.3e} to {lmax.item():.3e}, beyond the round-off band "
                f"±{tol.item():.3e}"
            )
        lam = lam.clamp(max=0) if lmin < -tol else lam.clamp(min=0)
    lam = lam.to(dtype)
    return lam, (None if Q is None else Q.to(dtype))


# --------------------------------------------------------------------------------------------
# KronDecomposed
# --------------------------------------------------------------------------------------------


class KronDecomposed:
    r"""Eigendecomposed :class:`Kron` plus an additive term ``δ`` per entry (a prior precision).

    Entry ``i`` has factors :math:`F_k = Q_k \operatorname{diag}(\lambda_k) Q_k^\top`,
    :math:`k = 1..n` (``Q_k = None`` means identity), and a scalar :math:`\delta_i`. With
    :math:`Q = Q_1 \otimes \dots \otimes Q_n` it represents the block
    :math:`Q \operatorname{diag}(L) Q^\top`, where

    * ``damping=False`` (exact): :math:`L = \lambda_1 \otimes \dots \otimes \lambda_n +
      \delta`, i.e. the block is exactly :math:`F_1 \otimes \dots \otimes F_n + \delta I`
      (for two factors :math:`G \otimes A + \delta I`);
    * ``damping=True`` (factored damping, Martens & Grosse 2015):
      :math:`L = (\lambda_1 + \delta^{1/n}) \otimes \dots \otimes (\lambda_n + \delta^{1/n})`,
      i.e. the block is :math:`(F_1 + \delta^{1/n} I) \otimes \dots`; for two factors
      :math:`(G + \sqrt\delta I) \otimes (A + \sqrt\delta I)`, for one factor
      :math:`F_1 + \delta I` (same as exact). Requires :math:`\delta \ge 0`.

    ``to_matrix(e)``, ``bmm(W, e)`` and ``diag(e)`` use :math:`Q \operatorname{diag}(L^e)
    Q^\top` (the exponent acts on the combined eigenvalues; fractional exponents of negative
    eigenvalues give ``nan``).

    Parameters
    ----------
    eigenvectors : list of list of (Tensor or None)
        Per entry, per factor: ``(d, d)`` orthonormal eigenvectors or ``None`` (identity).
    eigenvalues : list of list of Tensor
        Per entry, per factor: ``(d,)`` eigenvalues.
    deltas : float or Tensor, optional
        Scalar or one value per entry (default zeros).
    damping : bool, default False
        See above. Kept through ``+`` and ``*``.
    """

    def __init__(
        self,
        eigenvectors: Sequence[Sequence[Tensor | None]],
        eigenvalues: Sequence[Sequence[Tensor]],
        deltas: float | Tensor | None = None,
        damping: bool = False,
    ) -> None:
        if len(eigenvectors) != len(eigenvalues):
            raise InputError(
                f"{len(eigenvectors)} eigenvector entries but {len(eigenvalues)} eigenvalue entries"
            )
        vecs: list[list[Tensor | None]] = []
        vals: list[list[Tensor]] = []
        for i, (Qs, ls) in enumerate(zip(eigenvectors, eigenvalues, strict=True)):
            Qs, ls = list(Qs), list(ls)
            if not ls or len(Qs) != len(ls):
                raise InputError(
                    f"KronDecomposed entry {i}: {len(Qs)} eigenvector and {len(ls)} eigenvalue "
                    "factors (need the same, at least one)"
                )
            for j, (Q, lam) in enumerate(zip(Qs, ls, strict=True)):
                if lam.ndim != 1 or (Q is not None and tuple(Q.shape) != (len(lam), len(lam))):
                    raise InputError(
                        f"KronDecomposed entry {i} factor {j}: eigenvalues of shape "
                        f"{tuple(lam.shape)} and eigenvectors of shape "
                        f"{None if Q is None else tuple(Q.shape)} do not fit"
                    )
            vecs.append(Qs)
            vals.append(ls)
        self.eigenvectors: list[list[Tensor | None]] = vecs
        self.eigenvalues: list[list[Tensor]] = vals
        self.damping: bool = bool(damping)
        if deltas is None:
            self.deltas: Tensor = torch.zeros(len(self), dtype=self.dtype, device=self.device)
        else:
            self.deltas = self._expand_deltas(deltas)

    # ---------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.eigenvalues[0][0].device if self.eigenvalues else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return self.eigenvalues[0][0].dtype if self.eigenvalues else torch.get_default_dtype()

    @property
    def dims(self) -> list[tuple[int, ...]]:
        """Factor sizes per entry."""
        return [tuple(lam.shape[0] for lam in ls) for ls in self.eigenvalues]

    @property
    def num_params(self) -> int:
        """``P``, the side length of the full matrix."""
        return sum(_entry_sizes(d) for d in self.dims)

    def __len__(self) -> int:
        return len(self.eigenvalues)

    def __repr__(self) -> str:
        return (
            f"KronDecomposed(entries={len(self)}, num_params={self.num_params}, "
            f"damping={self.damping}, dtype={self.dtype}, device={self.device}, "
            f"dims={self.dims})"
        )

    # ---------------------------------------------------------------- arithmetic
    def _expand_deltas(self, deltas: Any) -> Tensor:
        """``deltas`` as a 1-D tensor of length ``len(self)`` on ``self``'s device/dtype."""
        n = len(self)
        expected = f"a scalar, a 0-dim tensor or a 1-D tensor of length 1 or {n} (one per entry)"
        if isinstance(deltas, numbers.Real) and not isinstance(deltas, Tensor):
            return torch.full((n,), float(deltas), dtype=self.dtype, device=self.device)
        if not isinstance(deltas, Tensor):
            raise InputError(f"delta must be {expected}; got {type(deltas).__name__}")
        d = deltas.to(device=self.device, dtype=self.dtype)
        if d.ndim == 0 or (d.ndim == 1 and d.shape[0] == 1):
            return d.reshape(1).repeat(n)
        if d.ndim == 1 and d.shape[0] == n:
            return d
        raise InputError(f"delta must be {expected}; got shape {tuple(deltas.shape)}")

    def __add__(self, deltas: float | Tensor) -> KronDecomposed:
        r"""Add ``deltas`` (scalar or one per entry) to the stored :math:`\delta` (a prior
        precision). With ``damping=False`` this adds :math:`\delta I` to the matrix; with
        ``damping=True`` the result is the factored damping with the summed :math:`\delta`.
        """
        if isinstance(deltas, (Kron, KronDecomposed)):
            return NotImplemented
        return KronDecomposed(
            self.eigenvectors,
            self.eigenvalues,
            self.deltas + self._expand_deltas(deltas),
            damping=self.damping,
        )

    __radd__ = __add__

    def __mul__(self, scalar: float | Tensor) -> KronDecomposed:
        r"""``scalar`` times the represented matrix (any real, differentiable in a tensor).

        The eigenvalues of the first factor of each entry are multiplied by ``s``; with
        ``damping=False`` the deltas too (:math:`s(F + \delta I) = sF + s\delta I`). With
        ``damping=True`` and non-zero deltas the scaled matrix has no factored-damping form:
        raises ``ValueError`` (multiply before adding the deltas).
        """
        s = _as_scalar(scalar)
        if s is None:
            return NotImplemented
        eigenvalues = [[ls[0] * s, *ls[1:]] for ls in self.eigenvalues]
        if self.damping:
            if len(self) and bool((self.deltas.detach() != 0).any()):
                raise InputError(
                    "cannot multiply a KronDecomposed with damping=True and non-zero deltas by "
                    "a scalar (s·(G+√δ)⊗(A+√δ) has no factored-damping form); multiply "
                    "before adding the deltas"
                )
            deltas = self.deltas
        else:
            deltas = self.deltas * s
        return KronDecomposed(self.eigenvectors, eigenvalues, deltas, damping=self.damping)

    __rmul__ = __mul__

    def __truediv__(self, scalar: float | Tensor) -> KronDecomposed:
        """``self * (1 / scalar)``."""
        s = _as_scalar(scalar)
        if s is None:
            return NotImplemented
        return self * (1.0 / s)

    # ---------------------------------------------------------------- eigenvalues
    def _combined_eigvals(self, i: int, exponent: float = 1) -> Tensor:
        """``L_i ** exponent`` of entry ``i``, shape ``(d_1, ..., d_n)`` (see class doc)."""
        ls = self.eigenvalues[i]
        delta = self.deltas[i]
        n = len(ls)
        if self.damping and n > 1:
            dd = torch.sqrt(delta) if n == 2 else delta ** (1.0 / n)
            L = _outer([lam + dd for lam in ls])
        else:
            L = _outer(ls) + delta
        return L if exponent == 1 else L.pow(exponent)

    # ---------------------------------------------------------------- products
    def bmm(self, W: Tensor, exponent: float = -1) -> Tensor:
        r"""Compute :math:`M^{\mathrm{exponent}} w` for every vector ``w`` in ``W``.

        ``M`` is the represented matrix (class doc). Per entry
        :math:`Q (L^e \odot (Q^\top w))` with the Kronecker structure of ``Q`` applied
        factor by factor; no dense matrix is formed.

        Parameters
        ----------
        W : Tensor
            Shape ``(P,)``, ``(K, P)`` or ``(B, K, P)`` (any leading dims).
        exponent : float, default -1

        Returns
        -------
        Tensor
            Same shape as ``W``.
        """
        W2 = _check_W(W, self.num_params, self.dtype)

        def entry(i: int, X: Tensor) -> Tensor:
            Qs = self.eigenvectors[i]
            X = _apply_along(X, Qs, transpose=True)
            X = X * self._combined_eigvals(i, exponent)
            return _apply_along(X, Qs)

        return _matvec_entries(W2, self.dims, entry).reshape(W.shape)

    def inv_square_form(self, W: Tensor) -> Tensor:
        r""":math:`W M^{-1} W^\top`: ``(B, K, P) -> (B, K, K)``, ``(K, P) -> (K, K)``,
        ``(P,) -> ()``."""
        SW = self.bmm(W, exponent=-1)
        if W.ndim == 1:
            return W @ SW
        return W @ SW.mT

    # ---------------------------------------------------------------- reductions
    def logdet(self) -> Tensor:
        r"""Log-determinant :math:`\sum_i \sum \log L_i` of the represented matrix.

        Signs follow ``torch.logdet`` of the dense matrix (``-inf`` singular, ``nan``
        negative determinant).
        """
        logabs = torch.zeros((), dtype=self.dtype, device=self.device)
        n_neg = torch.zeros((), dtype=torch.long, device=self.device)
        has_zero = torch.zeros((), dtype=torch.bool, device=self.device)
        for i in range(len(self)):
            L = self._combined_eigvals(i)
            logabs = logabs + L.abs().log().sum()
            n_neg = n_neg + (L < 0).sum()
            has_zero = has_zero | (L == 0).any()
        return _signed_logdet_total(logabs, n_neg, has_zero)

    def diag(self, exponent: float = 1) -> Tensor:
        r"""Diagonal of :math:`M^{\mathrm{exponent}}`, shape ``(P,)``.

        Per entry :math:`\operatorname{diag} = (Q_1^{\circ 2} \otimes \dots) L^e` with
        :math:`Q^{\circ 2}` the elementwise square.
        """
        diags = []
        for i, Qs in enumerate(self.eigenvectors):
            L = self._combined_eigvals(i, exponent).unsqueeze(0)
            sq = [None if Q is None else Q * Q for Q in Qs]
            diags.append(_apply_along(L, sq).flatten())
        if not diags:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        return torch.cat(diags)

    def to_matrix(self, exponent: float = 1) -> Tensor:
        """Dense ``P × P`` :math:`M^{\\mathrm{exponent}}` (for testing and small models only)."""
        blocks = []
        for i, Qs in enumerate(self.eigenvectors):
            d = self.dims[i]
            Q = _kron_all(
                [
                    torch.eye(dk, dtype=self.dtype, device=self.device) if Qk is None else Qk
                    for Qk, dk in zip(Qs, d, strict=True)
                ]
            )
            L = self._combined_eigvals(i, exponent).flatten()
            blocks.append((Q * L) @ Q.mT)
        return _block_diag(blocks, self.deltas)

    # ---------------------------------------------------------------- conversion
    def _map(self, fn: Callable[[Tensor], Tensor]) -> KronDecomposed:
        return KronDecomposed(
            [[None if Q is None else fn(Q) for Q in Qs] for Qs in self.eigenvectors],
            [[fn(lam) for lam in ls] for ls in self.eigenvalues],
            fn(self.deltas),
            damping=self.damping,
        )

    def to(
        self,
        device: torch.device | str | torch.dtype | None = None,
        dtype: torch.dtype | None = None,
    ) -> KronDecomposed:
        """A copy with every tensor moved / cast (``to(torch.float32)`` works too)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def detach(self) -> KronDecomposed:
        """A new ``KronDecomposed`` with all tensors (deltas included) detached."""
        return self._map(lambda t: t.detach())

    def state_dict(self) -> dict[str, Any]:
        """Tensors, ``None`` and a bool only: loadable with ``torch.load(weights_only=True)``."""
        sd = self.detach()
        return {
            "eigenvectors": sd.eigenvectors,
            "eigenvalues": sd.eigenvalues,
            "deltas": sd.deltas,
            "damping": self.damping,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace everything by the contents of ``state_dict`` (in place)."""
        new = KronDecomposed.from_state_dict(state_dict)
        self.eigenvectors, self.eigenvalues = new.eigenvectors, new.eigenvalues
        self.deltas, self.damping = new.deltas, new.damping

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any]) -> KronDecomposed:
        """Rebuild a ``KronDecomposed`` from :meth:`state_dict`."""
        missing = {"eigenvectors", "eigenvalues", "deltas", "damping"} - set(state_dict)
        if missing:
            raise InputError(f"not a KronDecomposed state dict: missing {sorted(missing)}")
        return cls(
            state_dict["eigenvectors"],
            state_dict["eigenvalues"],
            state_dict["deltas"],
            damping=state_dict["damping"],
        )
