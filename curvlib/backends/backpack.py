r"""The BackPACK backend: ``BackPackGGN``, ``BackPackEF`` and ``BackPackHessian`` (diagonal).

BackPACK (Dangel et al., ICLR 2020) propagates extra quantities through the backward pass,
module by module. This backend implements the template's hooks with it:

=========================  ==================================================================
hook                       computation
=========================  ==================================================================
``_jacobians``             ``BatchGrad`` of :math:`\sum_n f_{n,c}`, one backward pass per
                           output ``c``: :math:`J_n[c] = \partial f_{n,c} / \partial\theta`
``_gradients``             ``BatchGrad`` of ``lossfunc(f, y)``: the per-sample gradients
``_full`` (GGN, MC, EF)    :math:`\sum_n J_n^\top M_n J_n` and :math:`\sum_n g_n g_n^\top`
                           from those (the interface's shared hooks)
``_diag`` (GGN / MC)       ``DiagGGNExact`` / ``DiagGGNMC``:
                           :math:`\sum_{n,k} (J_n^\top c_{n,k})^2`
``_diag`` (EF)             :math:`\sum_n g_n^2` by ``SumGradSquared``
``_kron`` (GGN / MC / EF)  ``KFLR`` / ``KFAC`` backpropagation of the cotangents
                           :math:`c_{n,k}`; factors by curvlib's layer rules
``_diag`` (Hessian)        ``DiagHessian``
=========================  ==================================================================

The operator is curvlib's shared torch.func implementation (reported by ``available()``).

**Seeding with curvlib's cotangents.** BackPACK's second-order extensions start at the loss
module, whose extension hands out a square root of the output-space Hessian. This backend
replaces that loss extension, through BackPACK's public ``set_module_extension``, by one
that hands out the cotangents ``c (B, K, C)`` of :mod:`curvlib.likelihood`. Hence every
result is in curvlib's units with no per-backend scale constant, and the MC Fisher draws
its pseudo-targets from the call's ``generator``, exactly as every other backend.

**Kronecker factors.** BackPACK's own conv factors are neither ``expand`` nor ``reduce``;
the module extensions of ``Linear`` and ``Conv1d/2d/3d`` are replaced by subclasses of
BackPACK's ``HBPLinear``/``HBPConvNd`` (which keep BackPACK's backpropagation) whose
``weight`` and ``bias`` hand the backpropagated cotangents and the layer input to curvlib's
layer rules (:mod:`curvlib.kfac.rules`), so the factors follow ``kfac_approx``.

**What BackPACK needs from the model** is the capability table's (:mod:`curvlib.capabilities`):
exact module types, every leaf supported for second-order quantities, a chain of modules,
no module called twice, no tied weights. The static part is checked before any work, the
chain and call counts right after the forward pass and before any backward pass.

**Hygiene.** Extending, hooks and BackPACK's attributes on the model and on the loss
module are undone by :func:`curvlib._hygiene.preserved_model` (which breaks the reference
cycle through the autograd graph that would otherwise keep every call's loss module
alive), and BackPACK's global handle list ``CTX.hook_handles`` is restored.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar

import torch
from backpack import backpack, extend
from backpack.context import CTX
from backpack.extensions import (
    KFAC,
    KFLR,
    BatchGrad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SumGradSquared,
)
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.module_extension import ModuleExtension
from backpack.extensions.secondorder.hbp.convnd import HBPConvNd
from backpack.extensions.secondorder.hbp.linear import HBPLinear
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from curvlib._call import Call
from curvlib._checks import Records
from curvlib._hygiene import preserved_model
from curvlib.capabilities import BACKPACK_KRON_LAYERS
from curvlib.errors import InputError, UnsupportedModuleError
from curvlib.interface import CurvatureInterface, EFInterface, GGNInterface, HessianInterface
from curvlib.kfac.rules import Site, rule_for
from curvlib.kron import Kron

__all__ = ["BackPackGGN", "BackPackEF", "BackPackHessian"]


# -- BackPACK module extensions ------------------------------------------------------------
class _Seed(ModuleExtension):
    r"""Loss-module extension that starts the backward pass with curvlib's cotangents.

    ``c`` of shape ``(B, K, C)`` becomes BackPACK's ``[K, B, C]`` layout; ``wrap`` adapts it
    to the extension's container (``DiagHessian`` wants ``{"matrices", "signs"}``).
    """

    def __init__(self, cotangents: Tensor, wrap: Callable[[Tensor], Any] | None = None) -> None:
        super().__init__()
        self.cotangents = cotangents.transpose(0, 1).contiguous()
        self.wrap = wrap

    def backpropagate(self, ext, module, g_inp, g_out, bp_quantity) -> Any:
        return self.cotangents if self.wrap is None else self.wrap(self.cotangents)


class _KronFactors:
    """``weight``/``bias`` of a K-FAC module extension: curvlib's rule on BackPACK's
    backpropagated cotangents ``[K, B, *out]`` and the layer input."""

    n_data: int
    approx: str

    def _factors(self, module: nn.Module, backproped: Tensor, name: str) -> list[Tensor]:
        site = Site("main", module.input0.detach(), module.output, g=backproped.detach())
        rule = rule_for(module)
        return rule.factors(module, [site], self.n_data, self.approx, [name])[name]

    def weight(self, ext, module, g_inp, g_out, backproped) -> list[Tensor]:
        return self._factors(module, backproped, "weight")

    def bias(self, ext, module, g_inp, g_out, backproped) -> list[Tensor]:
        return self._factors(module, backproped, "bias")


class _KronLinear(_KronFactors, HBPLinear):
    def __init__(self, n_data: int, approx: str) -> None:
        self.n_data, self.approx = n_data, approx
        super().__init__()


class _KronConv(_KronFactors, HBPConvNd):
    def __init__(self, dim: int, n_data: int, approx: str) -> None:
        self.n_data, self.approx = n_data, approx
        super().__init__(dim)


def _kron_extension(ext: BackpropExtension, n_data: int, approx: str) -> BackpropExtension:
    for layer in BACKPACK_KRON_LAYERS:
        if layer is nn.Linear:
            ext.set_module_extension(layer, _KronLinear(n_data, approx), overwrite=True)
        else:
            dim = _CONV_DIMS[layer]
            ext.set_module_extension(layer, _KronConv(dim, n_data, approx), overwrite=True)
    return ext


_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def _detached(inp: Any) -> Any:
    """The input (a tensor or a dict of tensors) detached."""
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, inp)


def _diag_hessian_wrap(S: Tensor) -> dict[str, list]:
    return {"matrices": [S], "signs": [1.0]}


# -- the backend ---------------------------------------------------------------------------
class _BackPack:
    """Shared BackPACK machinery (a mixin placed before the interface class)."""

    backend_name: ClassVar[str] = "backpack"

    def _owners(self) -> list[nn.Module]:
        selected = {id(p) for p in self.params}
        return [
            m
            for m in self._model.modules()
            if any(id(p) in selected for p in m.parameters(recurse=False))
        ]

    def _leaves(self) -> list[nn.Module]:
        return [m for m in self._model.modules() if not list(m.children())]

    @contextmanager
    def _extended(self, modules: Sequence[nn.Module], loss: nn.Module | None) -> Iterator[Records]:
        """Extend ``modules`` (and ``loss``), record their forward calls, undo it on exit.

        In-place activations run out of place during the call.
        """
        records = Records()
        with ExitStack() as stack:
            if self.__dict__.get("_params_now") is None:
                # outside the template's hygiene step (which already restores the model)
                stack.enter_context(preserved_model(self.model, rng=False))
            if loss is not None:  # its attributes hold the graph: a cycle torch cannot free
                stack.enter_context(preserved_model(loss, rng=False))
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            old_handles = list(CTX.hook_handles)
            try:
                for mod in self._model.modules():
                    if getattr(mod, "inplace", None) is True:
                        mod.inplace = False
                for mod in [*modules, *([loss] if loss is not None else [])]:
                    mod.register_forward_hook(records.hook)
                    extend(mod)
                yield records
            finally:
                # by identity, in linear time: other code (laplace-torch's BackPACK backends)
                # leaves many handles in BackPACK's global list
                old_ids = {id(h) for h in old_handles}
                new = [h for h in CTX.hook_handles if id(h) not in old_ids]
                for h in new:
                    h.remove()
                new_ids = {id(h) for h in new}
                CTX.hook_handles[:] = [h for h in CTX.hook_handles if id(h) not in new_ids]

    def _collect(self, records: Records, field_name: str) -> list[Any]:
        """Pop ``field_name`` off each selected parameter (``None`` if its module never ran).

        A module that ran but left no result is an error: never a silently incomplete one.
        """
        owner = {id(p): m for m in self._owners() for p in m.parameters(False)}
        values = []
        for name, p in self.params_dict.items():
            v = p.__dict__.pop(field_name, None)
            if v is None and records.calls.get(id(owner[id(p)])):
                raise RuntimeError(
                    f"BackPACK computed no {field_name!r} for parameter {name!r} although its "
                    "module ran; please report this with the model"
                )
            values.append(v)
        return values

    def _gather(self, records: Records, field_name: str, B: int) -> Tensor:
        """The per-sample ``field_name`` of the selected parameters side by side: ``(B, P)``."""
        rows = [
            p.new_zeros(B, p.numel()) if v is None else v.reshape(B, -1)
            for p, v in zip(self.params, self._collect(records, field_name), strict=True)
        ]
        return torch.cat(rows, 1)

    def _second_order(
        self,
        call: Call,
        extension: BackpropExtension,
        cotangents: Callable[[Tensor], Tensor],
        wrap: Callable[[Tensor], Any] | None = None,
    ) -> tuple[Tensor, list[Any]]:
        """One second-order backward pass; ``(loss, [savefield value per selected param])``."""
        lossfunc = type(self.lossfunc)(reduction="sum")
        with self._extended(self._leaves(), lossfunc) as records:
            f = self._forward(call, _detached(call.inp))
            self._dynamic_check(call, records, f)
            extension.set_module_extension(
                type(lossfunc), _Seed(cotangents(f), wrap), overwrite=True
            )
            loss = self.factor * lossfunc(f, call.y)
            with backpack(extension):
                torch.autograd.grad(loss, self.params, allow_unused=True)
            values = self._collect(records, extension.savefield)
        values = [
            self._zero(p, call.what) if v is None else v
            for p, v in zip(self.params, values, strict=True)
        ]
        return loss.detach(), values

    @staticmethod
    def _zero(p: Tensor, structure: str) -> Any:
        """Zero curvature for a parameter whose module never ran."""
        if structure != "kron":
            return torch.zeros_like(p)
        G = p.new_zeros(p.shape[0], p.shape[0])
        if p.ndim == 1:
            return [G]
        r = p[0].numel()
        return [G, p.new_zeros(r, r)]

    def _forward(self, call: Call, inp: Any) -> Tensor:
        """``call.forward(inp)``; an in-place operation on the output of a module BackPACK
        hooks (its full backward hooks forbid that) is refused by name."""
        try:
            return call.forward(inp)
        except InputError as err:
            cause = err.__cause__
            text = str(cause)
            if isinstance(cause, RuntimeError) and "BackwardHookFunction" in text:
                raise UnsupportedModuleError(
                    f"backend 'backpack' cannot compute {call.what!r} for this model: an "
                    "in-place operation changes the output of a module BackPACK hooks (such "
                    "as `out += identity` after a BatchNorm in a residual block), which "
                    "BackPACK's backward hooks forbid; backends that can: 'autograd', "
                    "'auto', 'asdl'"
                ) from cause
            raise

    # -- hooks ----------------------------------------------------------------------------
    def _jacobians(self, call: Call) -> tuple[Tensor, Tensor]:
        r"""Per-sample Jacobians by ``BatchGrad``: one backward pass of :math:`\sum_n f_{n,c}`
        per output ``c``."""
        inp = call.inp if call.enable_backprop else _detached(call.inp)
        # an input that requires grad must be differentiated too, or the first module's
        # full backward hook (which waits for the input's gradient) never fires
        leaves = [t for t in tree_leaves(inp) if isinstance(t, Tensor) and t.requires_grad]
        wrt = [*self.params, *leaves]
        with self._extended(self._owners(), None) as records:
            f = self._forward(call, inp)
            self._dynamic_check(call, records, f)
            B, C = f.shape
            cols = []
            for c in range(C):
                with backpack(BatchGrad(), retain_graph=True):
                    torch.autograd.grad(
                        f[:, c].sum(),
                        wrt,
                        retain_graph=True,
                        create_graph=call.enable_backprop,
                        allow_unused=True,
                    )
                cols.append(self._gather(records, "grad_batch", B))
        return torch.stack(cols, 1), f

    def _gradients(self, call: Call) -> tuple[Tensor, Tensor]:
        """Per-sample gradients of the terms of ``lossfunc`` by ``BatchGrad``."""
        with self._extended(self._owners(), None) as records:
            f = self._forward(call, _detached(call.inp))
            self._dynamic_check(call, records, f)
            loss = self.lossfunc(f, call.y)
            with backpack(BatchGrad()):
                torch.autograd.grad(loss, self.params, allow_unused=True)
            Gs = self._gather(records, "grad_batch", f.shape[0])
        return Gs, loss.detach()

    def _kron(self, call: Call):
        """K-FAC by ``KFLR`` (``KFAC`` for the MC Fisher) with curvlib's factor rules."""
        ext = KFAC(mc_samples=call.num_samples) if call.stochastic else KFLR()
        loss, kfacs = self._second_order(
            call, _kron_extension(ext, call.N, call.kfac_approx), lambda f: call.cotangents(f)
        )
        return loss, Kron(kfacs)


class BackPackGGN(_BackPack, GGNInterface):
    r"""GGN (exact) and MC Fisher (``stochastic=True``) with BackPACK.

    ``full`` is :math:`\sum_n J_n^\top M_n J_n` with ``BatchGrad`` Jacobians; ``diag`` is
    ``DiagGGNExact`` / ``DiagGGNMC`` seeded with the cotangents of :math:`M_n`; ``kron`` is
    ``KFLR`` / ``KFAC``. The MC samples come from the call's ``generator``.
    """

    def _diag(self, call: Call) -> tuple[Tensor, Tensor]:
        ext = DiagGGNMC(mc_samples=call.num_samples) if call.stochastic else DiagGGNExact()
        loss, values = self._second_order(call, ext, lambda f: call.cotangents(f))
        return loss, torch.cat([v.flatten() for v in values])


class BackPackEF(_BackPack, EFInterface):
    r"""Empirical Fisher :math:`\sum_n g_n g_n^\top` with BackPACK.

    ``full`` from the ``BatchGrad`` per-sample gradients, ``diag`` from ``SumGradSquared``;
    ``kron`` backpropagates the loss gradient through ``KFLR`` (the K-FAC of the EF, which
    BackPACK itself does not offer).
    """

    def _diag(self, call: Call) -> tuple[Tensor, Tensor]:
        r"""Diagonal EF :math:`\sum_n g_n^2` by ``SumGradSquared`` of ``lossfunc``, times
        ``factor**2`` (the reported loss's terms are ``factor`` times those)."""
        with self._extended(self._owners(), None) as records:
            f = self._forward(call, _detached(call.inp))
            self._dynamic_check(call, records, f)
            loss = self.lossfunc(f, call.y)
            with backpack(SumGradSquared()):
                torch.autograd.grad(loss, self.params, allow_unused=True)
            h = self._gather(records, "sum_grad_squared", 1)[0]
        return call.loss(f), h * self.factor**2


class BackPackHessian(_BackPack, HessianInterface):
    r"""Diagonal of the Hessian :math:`\nabla^2_\theta` of ``factor * lossfunc`` by ``DiagHessian``.

    BackPACK backpropagates the exact square root of :math:`\Lambda` (from
    :mod:`curvlib.likelihood`) plus the positive and negative parts of every activation's
    second derivative times the backpropagated gradient. The full Hessian is not available.
    """

    def _diag(self, call: Call) -> tuple[Tensor, Tensor]:
        loss, values = self._second_order(
            call,
            DiagHessian(),
            lambda f: self.lik.sqrt_cotangents(f.detach()),
            wrap=_diag_hessian_wrap,
        )
        return loss, torch.cat([v.flatten() for v in values])

    _full = CurvatureInterface._full
