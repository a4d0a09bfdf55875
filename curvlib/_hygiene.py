"""Hygiene: every curvature call leaves the user's model and process as it found them.

:func:`preserved_model` is the one place where this is done. The template of
:class:`~curvlib.interface.CurvatureInterface` runs every backend hook inside it, so a
backend (BackPACK's ``extend``, ASDL's hooks, curvlib's own forward hooks) cannot leave
hooks, attributes, ``.grad`` changes, mode changes, buffer changes or global-RNG changes
behind, also when it raises.

:func:`differentiable_kernels` switches, for the duration of a call, the fused inference
kernels of attention off (``nn.MultiheadAttention``'s and ``nn.TransformerEncoderLayer``'s
fast path, the flash and memory-efficient scaled-dot-product kernels): they have no
forward-mode derivative and no double backward, which the curvature products need. The
math kernel computes the same function.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from curvlib import _selection

__all__ = ["preserved_model", "differentiable_kernels"]


@contextmanager
def differentiable_kernels() -> Iterator[None]:
    """Use attention kernels that every autograd transform can differentiate.

    Inside the block ``torch.backends.mha`` fast paths are off and scaled dot-product
    attention uses its math kernel; both settings are restored on exit.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


@contextmanager
def preserved_model(model: nn.Module, rng: bool = True) -> Iterator[nn.Module]:
    """Run a block that may hook, extend or backpropagate through ``model``; undo it all.

    On exit (also on error) every module gets back exactly its attributes (hooks dicts,
    BackPACK's ``input0``/``output``/``_backpack_extend``, ASDL's operations, ...), its
    training flag and its parameters' attributes, ``requires_grad`` and ``.grad``: the
    ``.grad`` tensors are set aside during the block (so a backward pass inside writes fresh
    ones) and put back unchanged. Buffer values changed in place (running statistics) are
    copied back. With ``rng=True`` the global CPU (and CUDA) RNG state is restored too, so a
    library that reseeds or draws from it leaves no trace.

    Inside the block, a ``_is_full_backward_hook`` flag that torch left on a module whose
    backward hooks are gone (after BackPACK's or ASDL's hooks were removed elsewhere) is
    cleared, so that either library can register its own kind of backward hook; it is put
    back on exit like every attribute.
    """
    modules = list(model.modules())
    saved_mods = [_snapshot(m.__dict__) for m in modules]
    params = list(model.parameters())
    saved_params = [(p, p.__dict__.copy(), p.grad, p.requires_grad) for p in params]
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers() if not b.is_meta]
    for p in params:
        p.grad = None
    for m in modules:
        if m.__dict__.get("_is_full_backward_hook") is not None and not m._backward_hooks:
            m._is_full_backward_hook = None
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices, enabled=rng):
        try:
            yield model
        finally:
            with torch.no_grad():
                for b, value in saved_buffers:
                    if not torch.equal(b, value):
                        b.copy_(value)
            for m, saved in zip(modules, saved_mods, strict=True):
                _restore(m.__dict__, *saved)
            for p, attrs, grad, requires_grad in saved_params:
                if p.__dict__.keys() != attrs.keys() or any(
                    p.__dict__[k] is not v for k, v in attrs.items()
                ):
                    for k in p.__dict__.keys() - attrs.keys():
                        delattr(p, k)
                    for k, v in attrs.items():
                        if p.__dict__.get(k) is not v:
                            p.__dict__[k] = v
                if p.requires_grad != requires_grad:
                    p.requires_grad_(requires_grad)
                p.grad = grad


def _snapshot(attrs: dict) -> tuple[dict, list, list]:
    """A module's attributes, shallow copies of its non-empty dicts (hooks, parameters,
    submodules: restored by identity), and its empty dicts (to be found empty again)."""
    full, empty = [], []
    for k, v in attrs.items():
        if isinstance(v, dict):
            if v:
                full.append((k, v.copy()))
            else:
                empty.append(v)
    return attrs.copy(), full, empty


def _restore(current: dict, attrs: dict, full: list, empty: list) -> None:
    """Put back what :func:`_snapshot` saved: the same attribute objects, the same items."""
    if current.keys() != attrs.keys():
        for k in current.keys() - attrs.keys():
            del current[k]
    for k, v in attrs.items():
        if current.get(k) is not v:
            current[k] = v
    for d in empty:  # the common case: an empty hook dict left empty
        if d:
            d.clear()
    for k, items in full:
        d = current[k]
        same = len(d) == len(items) and all(
            k1 == k2 and v1 is v2
            for (k1, v1), (k2, v2) in zip(d.items(), items.items(), strict=True)
        )
        if not same:
            d.clear()
            d.update(items)


class HygieneSteps:
    """The template's hygiene steps (mixed into :class:`~curvlib.CurvatureInterface`).

    :meth:`_hygiene` is the context of a call's hook: the model, its parameters and the
    global RNG as they were, also on error; :meth:`_fixed_selection` the selected parameters
    and the call's memo fixed for a step.
    """

    @contextmanager
    def _hygiene(self, call: Any):
        """Step 5's context: the model and the global RNG as they were, also on error.

        An MC call without a generator draws one seed from the global RNG (advancing it as
        any torch sampling does) and samples from a generator seeded with it; if the call
        fails, the global RNG is put back as it was before.
        """
        state = None
        from curvlib.capabilities import STRUCTURES

        if call.stochastic and call.generator is None and call.what in STRUCTURES:
            state = torch.get_rng_state()
            seed = int(torch.randint(0, 2**62, (1,)).item())
            call.generator = torch.Generator().manual_seed(seed)
        try:
            # the selection is fixed for the call (hooks read it many times)
            with (
                self._fixed_selection(call.memo, call.selection),
                preserved_model(self.model),
                differentiable_kernels(),
            ):
                yield
        except BaseException:
            if state is not None:
                torch.set_rng_state(state)
            raise

    @contextmanager
    def _fixed_selection(self, memo: dict | None = None, selection: dict | None = None):
        """The selected parameters fixed for the block (read many times inside it) and the
        call's memo (:mod:`curvlib._memo`) current. ``selection``: the one the call's checks
        fixed (every step of a call sees the same parameters); each new call computes it
        afresh, so that a change of ``requires_grad`` between calls is seen."""
        from curvlib._memo import call_memo

        if self.__dict__.get("_params_now") is not None:  # nested: the outer block owns it
            with call_memo(memo):
                yield
            return
        if selection is None:
            selection = _selection.selected_params(self._model)
        self.__dict__["_params_now"] = selection
        try:
            with call_memo(memo):
                yield
        finally:
            self.__dict__["_params_now"] = None
