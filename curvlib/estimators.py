r"""Randomized estimators on any symmetric linear operator ``A`` (``A @ V`` and ``A.shape``).

``A`` may be a :class:`~curvlib.linops.CurvatureOperator`, a dense tensor, or anything with
``@`` on tensors of shape ``(P, K)`` and ``shape == (P, P)``; ``dtype`` and ``device`` are
read from it when present. Random probes come from the ``generator`` passed (a
``torch.Generator``); without one a fresh, randomly seeded generator is used. The global RNG
is never drawn from, so results are reproducible by passing a seeded generator.

* Hutchinson trace: :math:`\hat t = \frac1m \sum_{s=1}^m v_s^\top A v_s`, :math:`v_s`
  Rademacher; unbiased, :math:`\mathrm{Var} = \frac2m \sum_{i \ne j} A_{ij}^2`.
* Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): with ``m`` products, a sketch
  :math:`Q = \mathrm{orth}(A S)`, :math:`S \in \{\pm1\}^{P \times m/3}`, then
  :math:`\hat t = \mathrm{tr}(Q^\top A Q) + \frac3m \mathrm{tr}(G^\top (I - QQ^\top) A
  (I - QQ^\top) G)`; unbiased, and exact once the sketch has ``P`` columns.
* Hutchinson diagonal (Bekas, Kokiopoulou & Saad 2007): :math:`\hat d = \frac1m \sum_s
  v_s \odot A v_s`; unbiased, :math:`\mathrm{Var}(\hat d_i) = \frac1m \sum_{j \ne i}
  A_{ij}^2`.
* Lanczos with full reorthogonalization: top-``k`` eigenpairs from the Ritz pairs of the
  Krylov space of dimension ``num_iters``; exact when ``num_iters = P``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["hutchinson_trace", "hutchpp_trace", "hutchinson_diagonal", "lanczos"]


def _meta(A: Any) -> tuple[int, torch.dtype, torch.device]:
    shape = tuple(A.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"the operator must be square (P, P), got shape {shape}")
    dtype = getattr(A, "dtype", None) or torch.get_default_dtype()
    device = torch.device(getattr(A, "device", None) or "cpu")
    return int(shape[0]), dtype, device


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    g = torch.Generator()
    g.seed()  # nondeterministic seed; the global RNG is not touched
    return g


def _rademacher(P: int, m: int, dtype, device, g: torch.Generator) -> Tensor:
    v = torch.randint(0, 2, (P, m), generator=g, device=g.device)
    return (2 * v - 1).to(device=device, dtype=dtype)


def _check_count(name: str, m: int) -> None:
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"{name} must be a positive integer, got {m!r}")


def _matmat(A: Any, V: Tensor, batch_size: int | None) -> Tensor:
    if batch_size is None or V.shape[1] <= batch_size:
        return A @ V
    return torch.cat([A @ V[:, s : s + batch_size] for s in range(0, V.shape[1], batch_size)], 1)


def hutchinson_trace(
    A: Any,
    num_samples: int = 10,
    *,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Tensor:
    r"""Hutchinson's estimate :math:`\frac1m \sum_s v_s^\top A v_s` of :math:`\mathrm{tr}(A)`.

    Parameters
    ----------
    A : operator
        Square, with ``A @ V`` for ``V`` of shape ``(P, K)``.
    num_samples : int
        ``m``, the number of Rademacher probes (= products with ``A``).
    generator : torch.Generator, optional
        Source of the probes (reproducibility).
    batch_size : int, optional
        Probes multiplied at once (default: all).

    Returns
    -------
    Tensor
        Scalar estimate; unbiased, with variance :math:`\frac2m \sum_{i\ne j} A_{ij}^2`.
    """
    _check_count("num_samples", num_samples)
    P, dtype, device = _meta(A)
    V = _rademacher(P, num_samples, dtype, device, _generator(generator))
    return (V * _matmat(A, V, batch_size)).sum() / num_samples


def hutchinson_diagonal(
    A: Any,
    num_samples: int = 10,
    *,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Tensor:
    r"""Hutchinson's estimate :math:`\frac1m \sum_s v_s \odot A v_s` of :math:`\mathrm{diag}(A)`.

    Unbiased, with :math:`\mathrm{Var}(\hat d_i) = \frac1m \sum_{j \ne i} A_{ij}^2` (exact
    for a diagonal ``A``). Parameters as :func:`hutchinson_trace`; returns shape ``(P,)``.
    """
    _check_count("num_samples", num_samples)
    P, dtype, device = _meta(A)
    V = _rademacher(P, num_samples, dtype, device, _generator(generator))
    return (V * _matmat(A, V, batch_size)).sum(1) / num_samples


def hutchpp_trace(
    A: Any,
    num_matvecs: int = 30,
    *,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Tensor:
    r"""Hutch++ estimate of :math:`\mathrm{tr}(A)` with (at most) ``num_matvecs`` products.

    With ``m = num_matvecs``: a sketch of ``k = min(m // 3, P)`` Rademacher columns ``S``,
    :math:`Q = \mathrm{orth}(AS)`, and ``g = m - 2k`` Rademacher probes ``G`` for the rest,

    .. math:: \hat t = \mathrm{tr}(Q^\top A Q)
              + \frac1g \mathrm{tr}\big(G^\top (I - QQ^\top) A (I - QQ^\top) G\big).

    Unbiased (Meyer et al., 2021); the error falls as :math:`O(1/m)` instead of
    Hutchinson's :math:`O(1/\sqrt m)` for matrices with decaying spectrum. Exact (the second
    term is skipped) once ``k = P``, i.e. ``num_matvecs >= 3P``.

    Returns
    -------
    Tensor
        Scalar estimate.
    """
    if not isinstance(num_matvecs, int) or num_matvecs < 3:
        raise ValueError(f"num_matvecs must be an integer >= 3, got {num_matvecs!r}")
    P, dtype, device = _meta(A)
    g = _generator(generator)
    k = min(num_matvecs // 3, P)
    S = _rademacher(P, k, dtype, device, g)
    Q, _ = torch.linalg.qr(_matmat(A, S, batch_size))
    trace = (Q * _matmat(A, Q, batch_size)).sum()
    n_rest = num_matvecs - 2 * k
    if k == P or n_rest < 1:
        return trace
    G = _rademacher(P, n_rest, dtype, device, g)
    G = G - Q @ (Q.T @ G)
    return trace + (G * _matmat(A, G, batch_size)).sum() / n_rest


def lanczos(
    A: Any,
    k: int = 1,
    *,
    num_iters: int | None = None,
    which: str = "LA",
    generator: torch.Generator | None = None,
    tol: float | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Top-``k`` eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    Builds an orthonormal basis :math:`Q_m` of the Krylov space
    :math:`\mathcal K_m(A, q_1)`, :math:`q_1` a random unit vector, with the three-term
    recurrence :math:`A q_j = \beta_{j-1} q_{j-1} + \alpha_j q_j + \beta_j q_{j+1}`, each new
    vector orthogonalized twice against all previous ones (so that round-off does not
    produce spurious copies of converged eigenvalues). The Ritz pairs of the tridiagonal
    :math:`T_m = Q_m^\top A Q_m` approximate the extreme eigenpairs of ``A``; if the Krylov
    space becomes invariant, Lanczos continues from a fresh random vector orthogonal to
    it, so ``num_iters = P`` gives the exact eigenpairs.

    Parameters
    ----------
    A : operator
        Symmetric, square, with ``A @ v`` for ``v`` of shape ``(P,)``.
    k : int
        Number of eigenpairs.
    num_iters : int, optional
        ``m``, the Krylov dimension (= products with ``A``); default
        ``min(P, max(2k + 20, 30))``.
    which : {"LA", "LM"}
        Largest algebraic (default) or largest magnitude eigenvalues.
    generator : torch.Generator, optional
        Source of the start (and restart) vectors.
    tol : float, optional
        Relative threshold on :math:`\beta_j` under which the space counts as invariant;
        default ``P * eps`` of the dtype.

    Returns
    -------
    eigenvalues : Tensor
        ``(k,)``, in descending order (of magnitude for ``"LM"``).
    eigenvectors : Tensor
        ``(P, k)``, orthonormal columns.
    """
    P, dtype, device = _meta(A)
    _check_count("k", k)
    if k > P:
        raise ValueError(f"k={k} exceeds the dimension P={P}")
    if which not in ("LA", "LM"):
        raise ValueError(f"which must be 'LA' or 'LM', got {which!r}")
    m = min(P, max(2 * k + 20, 30)) if num_iters is None else int(num_iters)
    if not k <= m <= P:
        raise ValueError(f"num_iters must lie in [k, P] = [{k}, {P}], got {m}")
    g = _generator(generator)
    tol = P * torch.finfo(dtype).eps if tol is None else tol

    def random_unit(Qb: Tensor) -> Tensor:
        r = _rademacher(P, 1, dtype, device, g)[:, 0]
        r = r + 0.1 * torch.randn(P, generator=g, device=g.device).to(device, dtype)
        for _ in range(2):
            r = r - Qb @ (Qb.T @ r)
        return r / r.norm()

    Q = torch.zeros(P, m, dtype=dtype, device=device)
    alpha = torch.zeros(m, dtype=dtype, device=device)
    beta = torch.zeros(max(m - 1, 0), dtype=dtype, device=device)
    q = random_unit(Q[:, :0])
    scale = 0.0
    for j in range(m):
        Q[:, j] = q
        w = (A @ q.unsqueeze(1))[:, 0].detach()
        alpha[j] = q @ w
        Qj = Q[:, : j + 1]
        for _ in range(2):
            w = w - Qj @ (Qj.T @ w)
        scale = max(scale, float(alpha[j].abs()), float(w.norm()))
        if j == m - 1:
            break
        b = w.norm()
        if b <= tol * max(scale, 1e-300):
            beta[j] = 0.0
            q = random_unit(Qj)
        else:
            beta[j] = b
            q = w / b
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    evals, evecs = torch.linalg.eigh(T)
    order = (
        evals.abs().argsort(descending=True) if which == "LM" else evals.argsort(descending=True)
    )
    top = order[:k]
    return evals[top], Q @ evecs[:, top]
