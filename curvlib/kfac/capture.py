r"""Recording layer inputs and pulling cotangents back to layer outputs (hooks, no ``.grad``).

:func:`backprop_to_sites` runs one forward pass with the rules' hooks (always removed, also
when the forward pass raises) and one backward pass of the cotangent columns
:math:`c_{n,k}` to the output of every recorded :class:`~curvlib.kfac.rules.Site`, with
``torch.autograd.grad``: the user's ``.grad`` is never touched. If an in-place operation
later in the forward pass (``ReLU(inplace=True)``, ``x += ...``) changed a recorded input or
output, the forward pass is run once more with protected copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from curvlib.kfac.rules import KFACRule, Site

__all__ = ["capture", "backprop_to_sites"]


def _version(t: Any) -> int:
    return t._version if isinstance(t, Tensor) else 0


@contextmanager
def capture(
    layers: Sequence[tuple[nn.Module, KFACRule]], protect: bool = False
) -> Iterator[dict[int, list[Site]]]:
    """Record the :class:`Site` s of ``layers`` during a forward pass; hooks always removed.

    With ``protect=True`` the recorded input is a copy and the module passes a copy of its
    output on, so that later in-place operations cannot change what was recorded.
    """
    store: dict[int, list[Site]] = {id(m): [] for m, _ in layers}

    def record(mod: nn.Module, site: Site) -> Tensor | None:
        a = site.a.detach() if isinstance(site.a, Tensor) else site.a
        if protect and isinstance(a, Tensor):
            a = a.clone()
        site.a = a
        site.versions = (_version(a), _version(site.out))
        store[id(mod)].append(site)
        if protect and isinstance(site.out, Tensor):
            return site.out.clone()
        return None

    handles: list[Any] = []
    try:
        for m, rule in layers:
            handles.extend(rule.install(m, record))
        yield store
    finally:
        for h in handles:
            h.remove()


def _modified(store: dict[int, list[Site]]) -> bool:
    return any(
        (_version(s.a), _version(s.out)) != s.versions for sites in store.values() for s in sites
    )


def _pull_back(f: Tensor, outs: list[Tensor], cot: Tensor, per_column: bool) -> list[Tensor]:
    """Cotangents ``(K, *out.shape)`` of every tensor in ``outs`` (zeros where unused)."""
    K = cot.shape[1]
    live = [i for i, o in enumerate(outs) if o.requires_grad]
    result: list[Tensor | None] = [None] * len(outs)
    if live:
        targets = [outs[i] for i in live]
        if K == 1:
            grads = torch.autograd.grad(f, targets, cot[:, 0], allow_unused=True)
            grads = [None if g is None else g.unsqueeze(0) for g in grads]
        elif per_column:
            # one backward pass per column: vmap has no batching rule for
            # convolution_backward and falls back to a slow loop
            cols = [
                torch.autograd.grad(
                    f, targets, cot[:, k], retain_graph=k < K - 1, allow_unused=True
                )
                for k in range(K)
            ]
            grads = []
            for per in zip(*cols, strict=True):
                grads.append(None if per[0] is None else torch.stack(per))
        else:
            grads = torch.autograd.grad(
                f,
                targets,
                grad_outputs=cot.transpose(0, 1).contiguous(),
                is_grads_batched=True,
                allow_unused=True,
            )
        for i, g in zip(live, grads, strict=True):
            result[i] = g
    return [
        g if g is not None else o.new_zeros((K, *o.shape))
        for g, o in zip(result, outs, strict=True)
    ]


def backprop_to_sites(
    layers: Sequence[tuple[nn.Module, KFACRule]],
    forward: Callable[[], Tensor],
    cotangent_fn: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor, dict[int, list[Site]]]:
    """Forward with the layers recorded, then pull the cotangents back to every site.

    Parameters
    ----------
    layers : sequence of (module, rule)
    forward : callable
        Runs the model's forward pass (with grad) and returns the output ``f``.
    cotangent_fn : callable
        ``f (detached) -> c`` of shape ``(B, K, *f.shape[1:])``.

    Returns
    -------
    f : Tensor
        The detached output.
    cot : Tensor
        The cotangents ``cotangent_fn(f)``.
    sites : dict
        Module id to its sites, each with ``g`` set (``(K, *out.shape)``).
    """
    for protect in (False, True):
        with capture(layers, protect) as store, torch.enable_grad():
            f = forward()
        if not _modified(store):
            break
    cot = cotangent_fn(f.detach())
    sites = [s for m, _ in layers for s in store[id(m)]]
    per_column = any(isinstance(m, nn.modules.conv._ConvNd) for m, _ in layers)
    if sites and f.requires_grad:
        grads = _pull_back(f, [s.out for s in sites], cot, per_column)
        for s, g in zip(sites, grads, strict=True):
            s.g = g
    else:
        for s in sites:
            s.g = s.out.new_zeros((cot.shape[1], *s.out.shape))
    return f.detach(), cot, store
