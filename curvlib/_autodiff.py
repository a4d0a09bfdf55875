r"""Generic derivatives of any differentiable model: per-sample products, HVPs, JVPs.

Every function here works for any differentiable ``nn.Module`` in eval mode. The fast path
is ``torch.func`` (``vmap`` over samples, forward-mode ``jvp``); where a model has no vmap
batching rule (``nn.GRU``/``nn.LSTM``, data-dependent control flow as in HuggingFace's
attention masks) or an op has no forward-mode derivative, the same quantity is computed by
batched reverse mode (``torch.autograd.grad(..., is_grads_batched=True)``, and one backward
pass per column where even that fails) and Hessian-vector products by double backward.
Which path works is detected once per model and cached (:func:`mode_of`).

Parameters are swapped by :func:`swapped`, which puts the user's ``Parameter`` objects back
exactly (``torch.func.functional_call`` leaves plain tensors behind on a module registered
under two names).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = [
    "swapped",
    "functional",
    "mode_of",
    "per_sample_vjps",
    "jvp",
    "hvp",
]

# model -> {"vjp": "vmap" | "batched" | "loop", "jvp": "forward" | "reverse", "hvp": ...}
_MODES: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()
_FAILURES = (RuntimeError, NotImplementedError, ValueError, TypeError)
_TRANSFORM_WORDS = (
    "vmap",
    "functorch",
    "batching rule",
    "batched",
    "forward ad",
    "forward-mode",
    "forward mode",
    "jvp",
    "dual",
    "data-dependent",
)


def _transform_limit(err: BaseException) -> bool:
    """Whether ``err`` is a limitation of a torch.func transform (no batching rule, no
    forward derivative), not an error of the user's code: its message names the transform,
    or it was raised inside torch itself."""
    import os

    if not isinstance(err, _FAILURES):
        return False
    text = str(err).lower()
    if any(w in text for w in _TRANSFORM_WORDS):
        return True
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    torch_dir = os.path.dirname(torch.__file__)
    return last is not None and os.path.abspath(last).startswith(torch_dir)


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """torch's first forward-mode call scripts its decompositions with the deprecated
    ``torch.jit.script``, which warns: not the user's concern."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        yield


def mode_of(model: nn.Module) -> dict[str, str]:
    """The derivative paths found to work for ``model`` (cached; see the module docstring)."""
    return _MODES.setdefault(model, {})


def _slots(module: nn.Module, params: Sequence[Tensor]) -> list[list[tuple[nn.Module, str]]]:
    """Per parameter, every ``(owner module, attribute name)`` holding it."""
    where: dict[int, list[tuple[nn.Module, str]]] = {id(p): [] for p in params}
    seen: set[tuple[int, str]] = set()
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and id(p) in where and (id(m), name) not in seen:
                seen.add((id(m), name))
                where[id(p)].append((m, name))
    return [where[id(p)] for p in params]


def _held(m: nn.Module, name: str, v: Tensor) -> Tensor:
    """The value ``m`` holds as ``name``: ``v``, except for an ``nn.Embedding`` weight with a
    ``padding_idx``, whose padding row is held constant. Reverse mode gives that row no
    gradient (torch's convention); forward mode would give it a tangent, so products through
    ``jvp`` would disagree with the Jacobians and the GGN built from ``vjp``."""
    if isinstance(m, nn.Embedding) and name == "weight" and m.padding_idx is not None:
        pad = torch.zeros(v.shape[0], 1, dtype=torch.bool, device=v.device)
        pad[m.padding_idx] = True
        return torch.where(pad, v.detach(), v)
    return v


@contextmanager
def swapped(
    module: nn.Module, params: Sequence[Tensor], values: Sequence[Tensor], slots=None
) -> Iterator[None]:
    """Temporarily replace each of ``params`` by the tensor in ``values`` wherever it is held
    (an ``nn.Embedding``'s padding row held constant, see :func:`_held`).

    The original ``Parameter`` objects are put back on exit, also on error.
    """
    slots = _slots(module, params) if slots is None else slots
    try:
        for holders, v in zip(slots, values, strict=True):
            for m, name in holders:
                m._parameters[name] = _held(m, name, v)
        yield
    finally:
        for holders, p in zip(slots, params, strict=True):
            for m, name in holders:
                m._parameters[name] = p


def functional(
    module: nn.Module, params: Sequence[Tensor]
) -> Callable[[Sequence[Tensor], Any], Tensor]:
    """``fn(values, inp) == module(inp)`` with ``params`` replaced by ``values``."""
    slots = _slots(module, params)

    def fn(values: Sequence[Tensor], inp: Any) -> Tensor:
        with swapped(module, params, values, slots):
            return module(inp)

    return fn


def _vjps_vmap(fn, params, inp, cot, detach: bool) -> Tensor:
    values = [p.detach() if detach else p for p in params]

    def single(inp_n: Any, cot_n: Tensor) -> Tensor:
        inp_1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, inp_n)
        _, vjp_fn = torch.func.vjp(lambda *ps: fn(ps, inp_1).squeeze(0), *values)
        grads = torch.func.vmap(vjp_fn)(cot_n)
        return torch.cat([g.flatten(1) for g in grads], dim=1)

    # detached: no graph to the model's other parameters (those not in ``params``) either;
    # the transforms inside compute their own derivatives regardless of the outer mode
    with torch.no_grad() if detach else nullcontext():
        return torch.func.vmap(single)(inp, cot)


def _vjps_reverse(fn, params, inp, cot, detach: bool, batched: bool) -> Tensor:
    """``V[n, k] = J_n^T c_{n,k}`` from one full-batch forward and one-hot cotangents."""
    values = [p.detach().requires_grad_(True) if detach else p for p in params]
    with torch.enable_grad():
        f = fn(values, inp)
    B, K = cot.shape[:2]
    rows = []
    pairs = [(n, k) for n in range(B) for k in range(K)]
    step = max(1, min(len(pairs), 64)) if batched else 1
    for s in range(0, len(pairs), step):
        chunk = pairs[s : s + step]
        E = cot.new_zeros((len(chunk), *f.shape))
        for j, (n, k) in enumerate(chunk):
            E[j, n] = cot[n, k]
        last = s + step >= len(pairs)
        if batched:
            grads = torch.autograd.grad(
                f,
                values,
                E,
                retain_graph=not last or not detach,
                create_graph=not detach,
                is_grads_batched=True,
                allow_unused=True,
            )
            rows.append(_flat_batched(grads, values, len(chunk)))
        else:
            grads = torch.autograd.grad(
                f,
                values,
                E[0],
                retain_graph=not last or not detach,
                create_graph=not detach,
                allow_unused=True,
            )
            rows.append(
                _flat_batched([None if g is None else g.unsqueeze(0) for g in grads], values, 1)
            )
    return torch.cat(rows).reshape(B, K, -1)


def _flat_batched(grads: Sequence[Tensor | None], params: Sequence[Tensor], m: int) -> Tensor:
    parts = [
        p.new_zeros(m, p.numel()) if g is None else g.reshape(m, -1)
        for g, p in zip(grads, params, strict=True)
    ]
    return torch.cat(parts, dim=1)


def per_sample_vjps(
    module: nn.Module,
    params: Sequence[Tensor],
    inp: Any,
    cot: Tensor,
    detach: bool = True,
    model_key: nn.Module | None = None,
) -> Tensor:
    r"""Per-sample products :math:`V_{n,k} = J_n^\top c_{n,k}`, shape ``(B, K, P)``.

    ``cot`` has shape ``(B, K, *f.shape[1:])``. With ``detach=False`` the result keeps the
    graph to ``params`` and ``inp`` (for differentiable Jacobians).
    """
    fn = functional(module, params)
    key = model_key if model_key is not None else module
    modes = mode_of(key)
    if modes.get("vjp", "vmap") == "vmap":
        try:
            return _vjps_vmap(fn, params, inp, cot, detach)
        except _FAILURES as err:
            if not _transform_limit(err):
                raise
            modes["vjp"] = "batched"
    if modes["vjp"] == "batched":
        try:
            return _vjps_reverse(fn, params, inp, cot, detach, batched=True)
        except _FAILURES as err:
            if not _transform_limit(err):
                raise
            modes["vjp"] = "loop"
    return _vjps_reverse(fn, params, inp, cot, detach, batched=False)


def vjp(
    fn: Callable[[Sequence[Tensor]], Tensor],
    values: Sequence[Tensor],
    model_key: nn.Module,
    create_graph: bool = False,
) -> tuple[Tensor, Callable[[Tensor], list[Tensor]]]:
    r"""``(f, u -> uᵀ J)`` of ``fn`` at ``values``: ``torch.func.vjp``, or plain reverse mode
    where the model holds what torch.func cannot transform (a user's full backward hook)."""
    modes = mode_of(model_key)
    if modes.get("vjp_fn", "func") == "func":
        try:
            return torch.func.vjp(lambda *ps: fn(ps), *values)
        except _FAILURES as err:
            if not _transform_limit(err):
                raise
            modes["vjp_fn"] = "autograd"
    vals = [v if v.requires_grad else v.detach().requires_grad_(True) for v in values]
    with torch.enable_grad():
        f = fn(vals)

    def pull(u: Tensor) -> list[Tensor]:
        g = torch.autograd.grad(
            f, vals, u, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        return [torch.zeros_like(v) if gi is None else gi for gi, v in zip(g, vals, strict=True)]

    return (f if create_graph else f.detach()), pull


def jvp(
    fn: Callable[[Sequence[Tensor]], Tensor],
    values: Sequence[Tensor],
    tangents: Sequence[Tensor],
    model_key: nn.Module,
) -> Tensor:
    r"""The Jacobian-vector product :math:`J v` of ``fn`` at ``values``.

    Forward mode where every op has a forward derivative, else reverse over reverse:
    :math:`Jv = \partial_u\,(u^\top J) v` with a dummy cotangent ``u``.
    """
    modes = mode_of(model_key)
    if modes.get("jvp", "forward") == "forward":
        try:
            with _quiet_jit():
                return torch.func.jvp(lambda *ps: fn(ps), tuple(values), tuple(tangents))[1]
        except _FAILURES as err:
            if not _transform_limit(err):
                raise
            modes["jvp"] = "reverse"
    vals = [v.detach().requires_grad_(True) for v in values]
    with torch.enable_grad():
        out = fn(vals)
        u = torch.zeros_like(out, requires_grad=True)
        g = torch.autograd.grad(out, vals, u, create_graph=True, allow_unused=True)
        dot = sum((gi * t).sum() for gi, t in zip(g, tangents, strict=True) if gi is not None)
        if not isinstance(dot, Tensor) or not dot.requires_grad:
            return torch.zeros_like(out)
        (Jv,) = torch.autograd.grad(dot, u, allow_unused=True)
    return torch.zeros_like(out) if Jv is None else Jv


def hvp(
    loss_fn: Callable[[Sequence[Tensor]], Tensor],
    values: Sequence[Tensor],
    V: Tensor,
    model_key: nn.Module,
) -> Tensor:
    r"""Hessian-matrix products :math:`H V` of the scalar ``loss_fn`` at ``values``.

    ``V`` has shape ``(m, P)`` (rows are flat tangents); returns ``(m, P)``. Forward over
    reverse (``jvp`` of ``grad``) vmapped over rows, else double backward batched over rows.
    """
    sizes = [v.numel() for v in values]
    shapes = [v.shape for v in values]

    def unflat(t: Tensor) -> list[Tensor]:
        return [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]

    modes = mode_of(model_key)
    if modes.get("hvp", "forward") == "forward":
        try:
            grad_fn = torch.func.grad(lambda *ps: loss_fn(ps), argnums=tuple(range(len(values))))

            def one(v: Tensor) -> Tensor:
                out = torch.func.jvp(grad_fn, tuple(values), tuple(unflat(v)))[1]
                return torch.cat([o.reshape(-1) for o in out])

            with _quiet_jit():
                return torch.func.vmap(one)(V)
        except _FAILURES as err:
            if not _transform_limit(err):
                raise
            modes["hvp"] = "reverse"
    vals = [v.detach().requires_grad_(True) for v in values]
    with torch.enable_grad():
        loss = loss_fn(vals)
        g = torch.autograd.grad(loss, vals, create_graph=True, allow_unused=True)
        gflat = torch.cat(
            [
                v.new_zeros(v.numel()) if gi is None else gi.reshape(-1)
                for gi, v in zip(g, vals, strict=True)
            ]
        )
    if not gflat.requires_grad:
        return V.new_zeros(V.shape)
    rows = []
    for i in range(V.shape[0]):
        out = torch.autograd.grad(
            gflat, vals, V[i], retain_graph=i < V.shape[0] - 1, allow_unused=True
        )
        rows.append(_flat_batched([None if o is None else o.unsqueeze(0) for o in out], vals, 1))
    return torch.cat(rows)
