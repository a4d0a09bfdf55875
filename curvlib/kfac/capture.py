r"""Recording layer inputs and pulling cotangents back to layer outputs (hooks, no ``.grad``).

:func:`backprop_columns` runs one forward pass with the rules' hooks (always removed, also
when the forward pass raises) and one backward pass of the cotangent columns
:math:`c_{n,k}` (or one per chunk of columns, streamed) to the output of every recorded
:class:`~curvlib.kfac.rules.Site`, with ``torch.autograd.grad``: the user's ``.grad`` is
never touched. If an in-place operation later in the forward pass (``ReLU(inplace=True)``,
``x += ...``) changed a recorded input or output, the forward pass is run once more with
protected copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from curvlib import _autodiff
from curvlib.kfac.rules import KFACRule, Site

__all__ = ["capture", "backprop_columns", "STREAM_BYTES"]


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


def _pull(f: Tensor, outs: list[Tensor], E: Tensor, per_column: bool, retain: bool) -> list[Tensor]:
    """``(M, *out.shape)``: the cotangents of every tensor in ``outs`` for the ``M`` output
    cotangents ``E (M, *f.shape)`` (zeros where an output does not depend on it)."""
    M = E.shape[0]
    live = [i for i, o in enumerate(outs) if o.requires_grad]
    result: list[Tensor | None] = [None] * len(outs)
    if live and M:
        targets = [outs[i] for i in live]
        if M == 1:
            grads = torch.autograd.grad(f, targets, E[0], retain_graph=retain, allow_unused=True)
            grads = [None if g is None else g.unsqueeze(0) for g in grads]
        elif per_column:
            # one backward pass per column: vmap has no batching rule for
            # convolution_backward and falls back to a slow loop
            # each column written into one preallocated buffer per target (torch.stack of
            # the columns is many times slower than these copies)
            grads = [None] * len(targets)
            for k in range(M):
                col = torch.autograd.grad(
                    f, targets, E[k], retain_graph=retain or k < M - 1, allow_unused=True
                )
                for j, gk in enumerate(col):
                    if gk is None:
                        continue
                    if grads[j] is None:
                        grads[j] = gk.new_empty((M, *gk.shape))
                    grads[j][k].copy_(gk)
        else:
            grads = torch.autograd.grad(
                f,
                targets,
                grad_outputs=E,
                retain_graph=retain,
                is_grads_batched=True,
                allow_unused=True,
            )
        for i, g in zip(live, grads, strict=True):
            result[i] = g
    return [
        g if g is not None else o.new_zeros((M, *o.shape))
        for g, o in zip(result, outs, strict=True)
    ]


# -- where the data points are in a site ---------------------------------------------------
#: layout of a site whose tensors hold no batch dimension of their own (a position
#: embedding computed once and broadcast over the batch, a module applied to a tensor
#: shared by all data points): its cotangents are pulled back one data point at a time
SHARED = -1


def _shapes(site: Site) -> list[torch.Size]:
    out = [site.out.shape]
    if isinstance(site.a, Tensor):
        out.append(site.a.shape)
    return out


def _plain(
    site: Site, B: int, module: nn.Module | None = None, rule: KFACRule | None = None
) -> bool:
    """Batch dimension 0, beyond doubt: every tensor of the site has ``B`` rows and no other
    dimension of size ``B`` that could hold the batch (those the rule's
    :meth:`~curvlib.kfac.rules.KFACRule.batch_free_dims` names cannot; a 1-D integer input
    is ambiguous: tokens or positions)."""
    if isinstance(site.a, Tensor) and site.a.ndim < 2 and B > 1:
        return False

    def plain(s: torch.Size) -> bool:
        if len(s) < 1 or s[0] != B:
            return False
        feat = rule.batch_free_dims(module, len(s)) if rule is not None else set()
        if 0 in feat:  # dimension 0 is a feature dimension (an unbatched input)
            return False
        return B == 1 or all(n != B for i, n in enumerate(s) if i and i not in feat)

    return all(plain(s) for s in _shapes(site))


def _probe_dim(site: Site, g: Tensor, B: int) -> int:
    """The batch dimension of a site from the cotangents ``g (2, *out.shape)`` of one data
    point's output (the first, then the last): the dimension of size ``B`` along which
    each is zero except at that data point's index; :data:`SHARED` if there is none."""
    shapes = _shapes(site)
    cands = [d for d in range(site.out.ndim) if all(len(s) > d and s[d] == B for s in shapes)]
    if not bool(g.any()):  # no information: the site does not reach those outputs
        return cands[0] if len(cands) == 1 else SHARED
    for d in cands:
        first, last = g[0].movedim(d, 0), g[1].movedim(d, 0)
        if not bool(first[1:].any()) and not bool(last[:-1].any()):
            return d
    return SHARED


def _layouts(
    f: Tensor,
    sites: list[Site],
    B: int,
    per_column: bool,
    owners: list[tuple[nn.Module, KFACRule]],
) -> list[int]:
    """Per site its batch dimension, or :data:`SHARED` (see :func:`backprop_columns`)."""
    layouts = [0] * len(sites)
    probe = [i for i, s in enumerate(sites) if not _plain(s, B, *owners[i])]
    if not probe:
        return layouts
    if B == 1:
        for i in probe:
            layouts[i] = SHARED  # one data point: the whole site is its own
        return layouts
    gen = torch.Generator(device=f.device).manual_seed(0)
    E = f.new_zeros((2, *f.shape))
    for j, n in enumerate((0, B - 1)):
        E[j, n] = torch.randn(f.shape[1:], generator=gen, dtype=f.dtype, device=f.device)
    grads = _pull(f, [sites[i].out for i in probe], E, per_column, retain=True)
    for i, g in zip(probe, grads, strict=True):
        layouts[i] = _probe_dim(sites[i], g, B)
    return layouts


def _arrange(
    site: Site, d: int, B: int, module: nn.Module | None = None, rule: KFACRule | None = None
) -> None:
    """Put the batch dimension of ``site.a`` and ``site.out`` first (``(B, ...)``); a
    :data:`SHARED` site gets one copy per data point (a leading dimension of size 1 is
    taken for the broadcast batch unless the rule says dimension 0 is a feature dimension,
    as for an unbatched convolution). The layout is kept in ``site.info`` for
    :func:`_arrange_g`."""

    def lead_of(t: Tensor) -> bool:
        if t.ndim == 0 or t.shape[0] != 1:
            return False
        return rule is None or 0 not in rule.batch_free_dims(module, t.ndim)

    lead = False
    if d == SHARED:
        lead = lead_of(site.out)
        if isinstance(site.a, Tensor):
            lead = lead and lead_of(site.a)
            a = site.a if lead else site.a.unsqueeze(0)
            site.a = a.expand(B, *a.shape[1:])
        out = site.out if lead else site.out.unsqueeze(0)
        site.out = out.expand(B, *out.shape[1:])
    elif d:
        if isinstance(site.a, Tensor):
            site.a = site.a.movedim(d, 0)
        site.out = site.out.movedim(d, 0)
    site.info["layout"] = (d, lead)


def _arrange_g(site: Site, g: Tensor) -> None:
    """Set ``site.g`` ``(K, B, ...)`` from the cotangents of the site's output as recorded
    (``(K, *out.shape)``; a :data:`SHARED` site: ``(K, B, *out.shape)``, data point ``n``'s
    in ``[:, n]``)."""
    d, lead = site.info["layout"]
    if d == SHARED:
        site.g = g.squeeze(2) if lead else g
    else:
        site.g = g.movedim(d + 1, 1) if d else g


#: bytes of site cotangents held at once when the columns are streamed
#: (:func:`backprop_columns`): at least one column
STREAM_BYTES = 2**25


def _columns_per_chunk(K: int, column_bytes: int, stream: bool) -> int:
    if not stream:
        return K
    return max(1, min(K, STREAM_BYTES // max(1, column_bytes)))


def backprop_columns(
    layers: Sequence[tuple[nn.Module, KFACRule]],
    forward: Callable[[], Tensor],
    cotangent_fn: Callable[[Tensor], Tensor],
    key: nn.Module | None = None,
    stream: bool = False,
) -> Iterator[tuple[Tensor, Tensor, dict[int, list[Site]], slice]]:
    """Forward with the layers recorded, then pull the cotangents back to every site.

    A site's tensors need not have the data points along their first dimension: a layer
    inside ``nn.TransformerEncoderLayer(batch_first=False)`` sees ``(L, B, E)``, a position
    embedding ``(1, L)`` broadcast over the batch. Unless a site is plainly batched along
    dimension 0 (:func:`_plain`), its batch dimension is found from the cotangents of one
    data point's output (zero outside that data point's slice); a site without one
    (shared by all data points) gets its cotangents one data point at a time, so that
    :math:`J_n^\top c_{n,k}` is exact for it too. Every site is then handed to the rules
    with the batch first: ``a (B, ...)``, ``g (K, B, ...)``.

    With ``stream=True`` the cotangent columns are pulled back a chunk at a time (as many
    as :data:`STREAM_BYTES` of site cotangents hold, at least one), and each chunk is
    yielded before the next is computed: a consumer that sums over the columns (the
    diagonal) holds one chunk's cotangents, not ``K`` columns'.

    Parameters
    ----------
    layers : sequence of (module, rule)
    forward : callable
        Runs the model's forward pass (with grad) and returns the output ``f``.
    cotangent_fn : callable
        ``f (detached) -> c`` of shape ``(B, K, *f.shape[1:])``.
    key : nn.Module, optional
        The model, to remember that it needs copies of the recorded tensors (see
        :func:`curvlib._autodiff.mode_of`).
    stream : bool, default False
        Yield the columns in chunks.

    Yields
    ------
    (f, cot, sites, columns)
        The detached output, the cotangents ``cotangent_fn(f)`` (all columns), module id
        to its sites with ``g`` set to the columns ``columns`` (``(k, B, ...)``).
    """
    # a model found to change a recorded tensor in place (a residual ``out += identity``
    # after a layer) is recorded with copies from the start on later calls
    modes = _autodiff.mode_of(key) if key is not None else {}
    for protect in (True,) if modes.get("capture") == "protect" else (False, True):
        with capture(layers, protect) as store, torch.enable_grad():
            f = forward()
        if not _modified(store):
            break
        modes["capture"] = "protect"
    cot = cotangent_fn(f.detach())
    B, K = cot.shape[:2]
    sites = [s for m, _ in layers for s in store[id(m)]]
    owners = [(m, rule) for m, rule in layers for _ in store[id(m)]]
    per_column = any(isinstance(m, nn.modules.conv._ConvNd) for m, _ in layers)
    if not (sites and f.requires_grad):
        for s, owner in zip(sites, owners, strict=True):  # nothing reaches the output: zeros
            d = 0 if _plain(s, B, *owner) else SHARED
            shape = (K, B, *s.out.shape) if d == SHARED else (K, *s.out.shape)
            zeros = s.out.new_zeros(shape)
            _arrange(s, d, B, *owner)
            _arrange_g(s, zeros)
        yield f.detach(), cot, store, slice(0, K)
        return
    layouts = _layouts(f, sites, B, per_column, owners)
    targets = [s.out for s in sites]  # the outputs in the graph (arranged views are not)
    for s, d, owner in zip(sites, layouts, owners, strict=True):
        _arrange(s, d, B, *owner)
    shared = [i for i, d in enumerate(layouts) if d == SHARED]
    batched = [i for i, d in enumerate(layouts) if d != SHARED]
    column_bytes = sum(
        t.numel() * t.element_size() * (B if d == SHARED else 1)
        for t, d in zip(targets, layouts, strict=True)
    )
    step = _columns_per_chunk(K, column_bytes, stream)
    f_out = f.detach()
    for k0 in range(0, K, step):
        cols = slice(k0, min(K, k0 + step))
        last = cols.stop == K
        c = cot[:, cols]
        if batched:
            grads = _pull(
                f,
                [targets[i] for i in batched],
                c.transpose(0, 1),
                per_column,
                not last or bool(shared),
            )
            for i, g in zip(batched, grads, strict=True):
                _arrange_g(sites[i], g)
        if shared:
            # column (n, k): data point n's cotangent k alone
            k = c.shape[1]
            E = c.new_zeros((B, k, *c.shape[:1], *c.shape[2:]))
            idx = torch.arange(B, device=c.device)
            E[idx, :, idx] = c
            grads = _pull(f, [targets[i] for i in shared], E.flatten(0, 1), per_column, not last)
            for i, g in zip(shared, grads, strict=True):
                _arrange_g(sites[i], g.reshape(B, k, *g.shape[1:]).transpose(0, 1))
        yield f_out, cot, store, cols
