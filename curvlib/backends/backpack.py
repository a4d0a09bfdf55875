r"""The BackPACK backend: ``BackPackGGN``, ``BackPackEF`` and ``BackPackHessian`` (diagonal).

BackPACK (Dangel et al., ICLR 2020) propagates extra quantities through the backward pass,
module by module. This backend uses it as follows (DESIGN §5):

=========================  ==================================================================
quantity                   computation
=========================  ==================================================================
``jacobians``              ``BatchGrad`` of :math:`\sum_n f_{n,c}`, one backward pass per
                           output ``c``: :math:`J_n[c] = \partial f_{n,c} / \partial\theta`
``gradients``              ``BatchGrad`` of ``lossfunc(f, y)``: the per-sample gradients
``full`` (GGN, MC, EF)     :math:`\sum_n J_n^\top M_n J_n` and :math:`\sum_n g_n g_n^\top`
                           from those (:class:`~curvlib.GGNInterface`,
                           :class:`~curvlib.EFInterface`)
``diag`` (GGN / MC)        ``DiagGGNExact`` / ``DiagGGNMC``:
                           :math:`\sum_{n,k} (J_n^\top c_{n,k})^2`
``diag`` (EF)              :math:`\sum_n g_n^2` by ``SumGradSquared``
``kron`` (GGN / MC / EF)   ``KFLR`` / ``KFAC`` backpropagation of the cotangents
                           :math:`c_{n,k}`; factors by :mod:`curvlib.kfac` (DESIGN §4)
``diag`` (Hessian)         ``DiagHessian``
=========================  ==================================================================

**Seeding with curvlib's cotangents.** BackPACK's second-order extensions start at the loss
module, whose extension hands out a square root of the output-space Hessian (exact, or
sampled from the global RNG). This backend replaces that loss extension, through BackPACK's
public ``set_module_extension``, by one that hands out the cotangents ``c (B, K, C)`` of
:mod:`curvlib.likelihood` (:math:`\sum_k c_{n,k} c_{n,k}^\top = M_n`: the columns of
:math:`\Lambda^{1/2}` for the GGN, the sampled gradients over :math:`\sqrt S` for the MC
Fisher, the loss gradient for the EF). Hence

* every result is in the units of DESIGN §3 with no per-backend scale constant (BackPACK's
  MSE square root is :math:`\sqrt2 I`, curvlib's loss is ``1/2 * MSELoss``);
* the MC Fisher draws its pseudo-targets from the ``generator`` of the call, exactly as the
  autograd backend does: the same generator gives the same numbers in both backends, and
  the global RNG is never touched;
* the empirical Fisher's K-FAC (which BackPACK lacks) is the same backward pass as the GGN's
  with the loss gradient as the only cotangent.

**Kronecker factors.** BackPACK's own conv factors are neither ``expand`` nor ``reduce``
(:math:`G = \sum_n \hat g \hat g^\top`, :math:`A = \frac1N \sum_{n,l} a a^\top`). The module
extensions of ``Linear`` and ``Conv1d/2d/3d`` are replaced by subclasses of BackPACK's
``HBPLinear``/``HBPConvNd`` (which keep BackPACK's backpropagation) whose ``weight`` and
``bias`` compute the factors of the requested ``kfac_approx`` from the backpropagated
cotangents at the layer output and the layer input, with the formulas of
:mod:`curvlib.kfac`.

**Hygiene.** Each call extends the modules it needs, computes and restores the model
exactly (:func:`curvlib.interface.preserved_model` plus BackPACK's global handle list
``CTX.hook_handles``), so every backend works on the model afterwards, in any order.
In-place activations (``inplace=True``) run out of place during the call.

**What BackPACK needs from the model.** Every leaf module of a second-order computation
(``diag``, ``kron`` of GGN/MC/EF, ``diag`` of the Hessian) must be in the backend's table
for that structure (:attr:`supported_modules`), and the forward pass must be a chain of
modules: the input of each module is the output of the previous one, without functional
operations or branching in between, and no module runs twice. The first-order quantities
(Jacobians, per-sample gradients and what is built from them) only need the modules owning
selected parameters to be supported and to run once. Violations raise
:class:`~curvlib.errors.UnsupportedModuleError` naming the module and suggesting another
backend: the module table is checked before any work, the chain right after the forward
pass and before any backward pass.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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

from curvlib.errors import CapabilityError, UnsupportedModuleError
from curvlib.interface import CurvatureInterface, EFInterface, GGNInterface, preserved_model
from curvlib.kfac import layer_factors
from curvlib.kron import Kron

__all__ = ["BackPackGGN", "BackPackEF", "BackPackHessian", "MODULE_TABLES"]

# -- capability data ---------------------------------------------------------------------
# Exact types (BackPACK dispatches on ``type(module)``, not on subclasses). Every entry is
# in BackPACK 1.7's table of the extension named; tests/test_backpack.py pins that.
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_POOL = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_ACT = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.LeakyReLU, nn.LogSigmoid)
_SHAPE = (nn.Dropout, nn.Flatten, nn.ZeroPad2d)

#: Per BackPACK extension, the module types this backend lets it see.
MODULE_TABLES: dict[str, tuple[type[nn.Module], ...]] = {
    # first order: only the modules owning selected parameters are checked
    "BatchGrad": (nn.Linear, *_CONV, *_CONV_T),
    # second order: every leaf module is checked
    "DiagGGN": (nn.Linear, *_CONV, *_CONV_T, *_POOL, *_ACT, *_SHAPE, nn.Identity),
    "KFLR": (
        nn.Linear,
        *_CONV,
        nn.AvgPool2d,
        nn.MaxPool2d,
        nn.ReLU,
        nn.Sigmoid,
        nn.Tanh,
        *_SHAPE,
        nn.Identity,
    ),
    "DiagHessian": (nn.Linear, *_CONV, *_CONV_T, *_POOL, *_ACT, *_SHAPE),
}


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
    r"""``weight``/``bias`` of a K-FAC module extension in curvlib's convention (DESIGN §4).

    From the backpropagated cotangents ``g`` at the layer output (``[K, B, out, *L]``) and
    the layer input ``a``: ``expand`` gives :math:`G = \sum_{n,k,l} g g^\top`,
    :math:`A = \frac{1}{N L}\sum_{n,l} a a^\top`; ``reduce`` gives
    :math:`G = \sum_{n,k} \hat g \hat g^\top`, :math:`A = \frac1N \sum_n \bar a \bar a^\top`
    (:func:`curvlib.kfac.kfac`). A bias gets ``[G]``.
    """

    n_data: int
    approx: str

    def _gf(self, module: nn.Module, backproped: Tensor, need_A: bool):
        return layer_factors(
            module, module.input0.detach(), backproped.detach(), self.n_data, self.approx, need_A
        )

    def weight(self, ext, module, g_inp, g_out, backproped) -> list[Tensor]:
        G, A = self._gf(module, backproped, True)
        return [G, A]

    def bias(self, ext, module, g_inp, g_out, backproped) -> list[Tensor]:
        return [self._gf(module, backproped, False)[0]]


class _KronLinear(_KronFactors, HBPLinear):
    def __init__(self, n_data: int, approx: str) -> None:
        self.n_data, self.approx = n_data, approx
        super().__init__()


class _KronConv(_KronFactors, HBPConvNd):
    def __init__(self, dim: int, n_data: int, approx: str) -> None:
        self.n_data, self.approx = n_data, approx
        super().__init__(dim)


def _kron_extension(ext: BackpropExtension, n_data: int, approx: str) -> BackpropExtension:
    ext.set_module_extension(nn.Linear, _KronLinear(n_data, approx), overwrite=True)
    for dim, conv in enumerate(_CONV, start=1):
        ext.set_module_extension(conv, _KronConv(dim, n_data, approx), overwrite=True)
    return ext


def _diag_hessian_wrap(S: Tensor) -> dict[str, list]:
    return {"matrices": [S], "signs": [1.0]}


# -- forward records -----------------------------------------------------------------------
@dataclass
class _Call:
    order: int
    inp: Tensor
    out: Tensor


@dataclass
class _Records:
    calls: dict[int, list[_Call]] = field(default_factory=dict)
    counter: int = 0


def _key(t: Tensor) -> tuple:
    """What BackPACK uses to pass a quantity from a module to the next (plus shape/stride)."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


# -- the backend ---------------------------------------------------------------------------
class _BackPack:
    """Shared BackPACK machinery (a mixin placed before the interface class)."""

    backend_name: ClassVar[str] = "backpack"
    dict_inputs: ClassVar[bool] = False
    #: the BackPACK extension behind each structure (a key of :data:`MODULE_TABLES`).
    _extension_of: ClassVar[dict[str, str]] = {}

    # -- checks before any work ----------------------------------------------------------
    def _prepare(self, x: Any, y: Tensor | None = None, need_y: bool = True):
        if isinstance(x, Mapping):
            raise CapabilityError(
                "backend 'backpack' does not support dict inputs: BackPACK needs a model that "
                "is a chain of modules called with one tensor; use backend 'autograd'"
            )
        return super()._prepare(x, y, need_y)

    def _check_modules(self, structure: str, extension: str | None = None) -> None:
        """Raise :class:`UnsupportedModuleError` before any work (see the module docstring).

        Checks the exact module types against :data:`MODULE_TABLES` for the BackPACK
        ``extension`` behind ``structure`` (every leaf for the second-order extensions, the
        owners of selected parameters for ``BatchGrad``), and settings BackPACK gets silently
        wrong or refuses: convolutions with a padding mode other than ``"zeros"`` or string
        padding, ``groups != 1`` for K-FAC, parameters shared by several modules, and
        modules with regular (non-full) backward hooks.
        """
        self._check_params()
        extension = extension or self._extension_of[structure]
        types = MODULE_TABLES[extension]
        second = extension != "BatchGrad"
        selected = {id(p) for p in self.params}
        owners: dict[int, list[str]] = {}
        for path, mod in self._model.named_modules(remove_duplicate=False):
            for name, p in mod.named_parameters(recurse=False):
                if id(p) in selected:
                    owners.setdefault(id(p), []).append(f"{path or '<root>'}.{name}")
        for paths in owners.values():
            if len(paths) > 1:
                raise UnsupportedModuleError(
                    f"parameter shared by several modules {paths}: BackPACK stores one result "
                    "per parameter and module call; use backend 'autograd'"
                )
        for path, mod in self._model.named_modules():
            owns = any(id(p) in selected for p in mod.parameters(recurse=False))
            if list(mod.children()) and not owns:  # a container
                continue
            if not (second or owns):
                continue
            if type(mod) not in types:
                raise self._unsupported_module(path, mod, structure)
            detail = self._module_detail(mod, structure, owns)
            if detail:
                raise self._unsupported_module(path, mod, structure, detail)

    @staticmethod
    def _module_detail(mod: nn.Module, structure: str, owns: bool) -> str:
        if isinstance(mod, nn.modules.conv._ConvNd):
            if mod.padding_mode != "zeros":
                return (
                    f"padding_mode={mod.padding_mode!r}: BackPACK assumes zero padding and "
                    "returns wrong numbers for it"
                )
            if isinstance(mod.padding, str):
                return f"padding={mod.padding!r}: BackPACK needs integer padding"
            if structure == "kron" and mod.groups != 1 and owns:
                return f"groups={mod.groups}: K-FAC needs groups=1"
        if mod._backward_hooks and mod.__dict__.get("_is_full_backward_hook") is False:
            return "it has regular backward hooks, which exclude BackPACK's full backward hooks"
        return ""

    # -- extend, compute, restore --------------------------------------------------------
    @contextmanager
    def _extended(self, modules: Sequence[nn.Module], loss: nn.Module | None) -> Iterator[_Records]:
        """Extend ``modules`` (and ``loss``), record their forward calls, restore on exit.

        On exit (also on error) the model is exactly as before: hooks, attributes
        (``input0``, ``output``, ``_backpack_extend``, ``_is_full_backward_hook``,
        ``inplace``), parameter attributes (``grad_batch``, ``kflr``, ...) and ``.grad``
        (:func:`~curvlib.interface.preserved_model`), and BackPACK's global list of hook
        handles.
        """
        records = _Records()

        def record(mod: nn.Module, args: tuple, out: Any) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
                records.calls.setdefault(id(mod), []).append(_Call(records.counter, args[0], out))
                records.counter += 1

        with preserved_model(self.model, rng=False), warnings.catch_warnings():
            # torch's notice that a full backward hook fires on outputs only (first layer)
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            old_handles = list(CTX.hook_handles)
            try:
                for mod in self._model.modules():
                    if getattr(mod, "inplace", None) is True:
                        mod.inplace = False
                for mod in [*modules, *([loss] if loss is not None else [])]:
                    mod.register_forward_hook(record)
                    extend(mod)
                yield records
            finally:
                new = [h for h in CTX.hook_handles if all(h is not o for o in old_handles)]
                for h in new:
                    h.remove()
                CTX.hook_handles[:] = [h for h in CTX.hook_handles if all(h is not n for n in new)]

    def _owner_modules(self) -> list[tuple[str, nn.Module]]:
        selected = {id(p) for p in self.params}
        return [
            (path, m)
            for path, m in self._model.named_modules()
            if any(id(p) in selected for p in m.parameters(recurse=False))
        ]

    def _leaf_modules(self) -> list[tuple[str, nn.Module]]:
        return [(path, m) for path, m in self._model.named_modules() if not list(m.children())]

    def _check_calls(self, records: _Records, mods: list[tuple[str, nn.Module]], structure: str):
        for path, mod in mods:
            n = len(records.calls.get(id(mod), []))
            if n > 1:
                raise self._unsupported_module(
                    path,
                    mod,
                    structure,
                    f"it ran {n} times in one forward pass; BackPACK keeps one call per module",
                )

    def _check_chain(self, records: _Records, f: Tensor, structure: str) -> None:
        """Raise unless the forward pass is a chain of the recorded leaf modules.

        Walks back from the output: each tensor that requires grad must be the output of a
        module (the latest one called before its consumer) whose input is the next link.
        Every module whose output requires grad must lie on that chain.
        """
        leaves = self._leaf_modules()
        self._check_calls(records, leaves, structure)
        names = {id(m): (path, m) for path, m in leaves}
        producers: dict[tuple, list[tuple[int, int]]] = {}
        for mid, calls in records.calls.items():
            if mid in names:
                producers.setdefault(_key(calls[0].out), []).append((calls[0].order, mid))
        visited: set[int] = set()
        cur, before, consumer = f, records.counter, None
        while cur.requires_grad:
            cands = [(o, mid) for o, mid in producers.get(_key(cur), []) if o < before]
            if not cands:
                path, mod = names[consumer] if consumer is not None else ("", self._model)
                where = "its input" if consumer is not None else "the model output"
                raise self._unsupported_module(
                    path,
                    mod,
                    structure,
                    f"{where} comes from a functional operation, not from a module; BackPACK's "
                    "second-order extensions need the forward pass to be a chain of modules",
                )
            before, consumer = max(cands)
            visited.add(consumer)
            cur = records.calls[consumer][0].inp
        for mid, calls in records.calls.items():
            if mid in names and mid not in visited and calls[0].out.requires_grad:
                path, mod = names[mid]
                raise self._unsupported_module(
                    path,
                    mod,
                    structure,
                    "its output does not reach the model output through a chain of modules "
                    "(branching or a functional operation); BackPACK's second-order "
                    "extensions need the forward pass to be a chain of modules",
                )

    def _collect(self, records: _Records, field_name: str) -> list[Any]:
        """Pop ``field_name`` off each selected parameter (``None`` if its module never ran).

        Raises
        ------
        RuntimeError
            If a module ran but BackPACK left no result on its parameter (a hook that did not
            fire): never return a silently incomplete result.
        """
        owner = {id(p): m for _, m in self._owner_modules() for p in m.parameters(False)}
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

    def _gather(self, records: _Records, field_name: str, B: int) -> Tensor:
        """The per-sample ``field_name`` of the selected parameters side by side: ``(B, P)``."""
        rows = [
            p.new_zeros(B, p.numel()) if v is None else v.reshape(B, -1)
            for p, v in zip(self.params, self._collect(records, field_name), strict=True)
        ]
        return torch.cat(rows, 1)

    def _run(
        self,
        x: Any,
        y: Tensor | None,
        structure: str,
        extension: BackpropExtension,
        cotangents: Callable[[Tensor, Tensor], Tensor],
        wrap: Callable[[Tensor], Any] | None = None,
    ) -> tuple[Tensor, list[Any]]:
        """One second-order backward pass; ``(loss, [savefield value per selected param])``.

        ``cotangents(f, y)`` gives the ``(B, K, C)`` seed of the loss module.
        """
        self._check_modules(structure)
        inp, y = self._prepare(x, y)
        lossfunc = copy.deepcopy(self.lossfunc)  # extended, then dropped
        leaves = [m for _, m in self._leaf_modules()]
        with self._extended(leaves, lossfunc) as records:
            f = self._forward(inp.detach(), grad=True)
            self.lik.check_target(f, y)
            self._check_chain(records, f, structure)
            extension.set_module_extension(
                type(lossfunc), _Seed(cotangents(f, y), wrap), overwrite=True
            )
            loss = self.factor * lossfunc(f, y)
            with backpack(extension):
                torch.autograd.grad(loss, self.params, allow_unused=True)
            values = self._collect(records, extension.savefield)
        # a parameter whose module did not run gets nothing: zero curvature
        values = [
            self._zero(p, structure) if v is None else v
            for p, v in zip(self.params, values, strict=True)
        ]
        return loss.detach(), values

    @staticmethod
    def _zero(p: Tensor, structure: str) -> Any:
        if structure != "kron":
            return torch.zeros_like(p)
        G = p.new_zeros(p.shape[0], p.shape[0])
        if p.ndim == 1:
            return [G]
        r = p[0].numel()
        return [G, p.new_zeros(r, r)]

    # -- public API ------------------------------------------------------------------------
    def jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        r"""Per-sample Jacobians :math:`J_n = \partial f_n / \partial\theta` by ``BatchGrad``.

        One forward pass and one backward pass per output ``c`` of :math:`\sum_n f_{n,c}`;
        ``BatchGrad`` splits the gradient into the per-sample rows :math:`J_n[c]`.

        Parameters
        ----------
        x : Tensor
            Input batch.
        enable_backprop : bool, default False
            Keep the graph so that ``Js`` and ``f`` can be differentiated w.r.t. ``x``.

        Returns
        -------
        Js : Tensor
            ``(B, C, P)``, restricted to ``subnetwork_indices`` if given.
        f : Tensor
            ``(B, C)`` model output.
        """
        self._check_modules("full", "BatchGrad")
        inp, _ = self._prepare(x, need_y=False)
        owners = self._owner_modules()
        if not enable_backprop:
            inp = inp.detach()
        # an input that requires grad must be differentiated too, or the first module's
        # full backward hook (which waits for the input's gradient) never fires
        wrt = [*self.params, *([inp] if inp.requires_grad else [])]
        with self._extended([m for _, m in owners], None) as records:
            f = self._forward(inp, grad=True)
            self._check_calls(records, owners, "full")
            B, C = f.shape
            cols = []
            for c in range(C):
                with backpack(BatchGrad(), retain_graph=True):
                    torch.autograd.grad(
                        f[:, c].sum(),
                        wrt,
                        retain_graph=True,
                        create_graph=enable_backprop,
                        allow_unused=True,
                    )
                cols.append(self._gather(records, "grad_batch", B))
        Js = self._select(torch.stack(cols, 1))
        return (Js, f) if enable_backprop else (Js.detach(), f.detach())

    def gradients(self, x: Any, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample gradients of the terms of ``lossfunc`` (without ``factor``), by ``BatchGrad``.

        Returns
        -------
        Gs : Tensor
            ``(B, P)``: row ``n`` is the gradient of ``lossfunc(f_n, y_n)``.
        loss : Tensor
            ``lossfunc(f, y)`` (without ``factor``), detached.
        """
        self._check_modules("full", "BatchGrad")
        inp, y = self._prepare(x, y)
        owners = self._owner_modules()
        with self._extended([m for _, m in owners], None) as records:
            f = self._forward(inp.detach(), grad=True)
            self.lik.check_target(f, y)
            self._check_calls(records, owners, "full")
            loss = self.lossfunc(f, y)
            with backpack(BatchGrad()):
                torch.autograd.grad(loss, self.params, allow_unused=True)
            Gs = self._gather(records, "grad_batch", f.shape[0])
        return self._select(Gs), loss.detach()


class _BackPackKron(_BackPack):
    """``kron`` for the GGN, MC Fisher and EF: K-FAC seeded with :meth:`_cotangents`."""

    def kron(
        self,
        x: Any,
        y: Tensor | None = None,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Kron]:
        """K-FAC ``(loss, Kron)`` on a batch of ``M`` out of ``N`` data points (DESIGN §4).

        ``KFLR`` (``KFAC`` for the MC Fisher) backpropagates the cotangents; the factors of
        ``Linear`` and ``Conv1d/2d/3d`` follow ``kfac_approx``. Summing the results over
        batches that partition the data gives ``G = Σ g gᵀ`` and ``A = (1/N) Σ a aᵀ``.
        """
        self._check_x(x)
        N = self._kron_num_data(x, N)
        self._check_modules("kron")
        stochastic = getattr(self, "stochastic", False)
        ext = KFAC(mc_samples=self.num_samples) if stochastic else KFLR()
        loss, kfacs = self._run(
            x,
            y,
            "kron",
            _kron_extension(ext, N, self.kfac_approx),
            lambda f, y: self._cotangents(f, y, generator),
        )
        return loss, Kron(kfacs)

    def full(self, x: Any, y: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Dense curvature ``(loss, H (P, P))`` from the ``BatchGrad`` quantities."""
        self._check_modules("full")
        return super().full(x, y, **kwargs)


_KRON_TYPES = MODULE_TABLES["KFLR"]


class BackPackGGN(_BackPackKron, GGNInterface):
    r"""GGN (exact) and MC Fisher (``stochastic=True``) with BackPACK.

    ``full`` is :math:`\sum_n J_n^\top M_n J_n` with ``BatchGrad`` Jacobians; ``diag`` is
    ``DiagGGNExact`` / ``DiagGGNMC`` seeded with the cotangents of :math:`M_n`; ``kron`` is
    ``KFLR`` / ``KFAC``. The MC samples come from the call's ``generator`` (same samples as
    the autograd backend; the global RNG is not used when a generator is given).
    """

    check_all_leaves: ClassVar[tuple[str, ...]] = ("diag", "kron")
    structures: ClassVar[tuple[str, ...]] = ("full", "diag", "kron")
    supported_modules: ClassVar[dict[str, tuple[type, ...] | None]] = {
        "full": MODULE_TABLES["BatchGrad"],
        "diag": MODULE_TABLES["DiagGGN"],
        "kron": _KRON_TYPES,
    }
    _extension_of: ClassVar[dict[str, str]] = {
        "full": "BatchGrad",
        "diag": "DiagGGN",
        "kron": "KFLR",
    }

    def diag(
        self,
        x: Any,
        y: Tensor | None = None,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        r"""Diagonal :math:`\sum_{n,k} (J_n^\top c_{n,k})^2` by ``DiagGGNExact``/``DiagGGNMC``."""
        ext = DiagGGNMC(mc_samples=self.num_samples) if self.stochastic else DiagGGNExact()
        loss, values = self._run(x, y, "diag", ext, lambda f, y: self._cotangents(f, y, generator))
        return loss, self._select(torch.cat([v.flatten() for v in values]))


class BackPackEF(_BackPackKron, EFInterface):
    r"""Empirical Fisher :math:`\sum_n g_n g_n^\top` with BackPACK.

    ``full`` comes from the ``BatchGrad`` per-sample gradients
    (:class:`~curvlib.EFInterface`), ``diag`` from ``SumGradSquared``; ``kron``
    backpropagates the loss gradient through ``KFLR`` (the K-FAC of the EF, which BackPACK
    itself does not offer).
    """

    check_all_leaves: ClassVar[tuple[str, ...]] = ("kron",)
    structures: ClassVar[tuple[str, ...]] = ("full", "diag", "kron")
    supported_modules: ClassVar[dict[str, tuple[type, ...] | None]] = {
        "full": MODULE_TABLES["BatchGrad"],
        "diag": MODULE_TABLES["BatchGrad"],
        "kron": _KRON_TYPES,
    }
    _extension_of: ClassVar[dict[str, str]] = {
        "full": "BatchGrad",
        "diag": "BatchGrad",
        "kron": "KFLR",
    }

    def diag(
        self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        r"""Diagonal EF :math:`\sum_n g_n^2` by ``SumGradSquared``.

        BackPACK sums the squared per-sample gradients of ``lossfunc`` layer by layer
        without storing them; the reported loss's terms are ``factor`` times those, so the
        sum is scaled by ``factor**2``.
        """
        self._check_modules("diag")
        inp, y = self._prepare(x, y)
        owners = self._owner_modules()
        with self._extended([m for _, m in owners], None) as records:
            f = self._forward(inp.detach(), grad=True)
            self.lik.check_target(f, y)
            self._check_calls(records, owners, "diag")
            loss = self.lossfunc(f, y)
            with backpack(SumGradSquared()):
                torch.autograd.grad(loss, self.params, allow_unused=True)
            h = self._gather(records, "sum_grad_squared", 1)[0]
        return self._loss(f, y), self._select(h * self.factor**2)


class BackPackHessian(_BackPack, CurvatureInterface):
    r"""Diagonal of the Hessian :math:`\nabla^2_\theta` of ``factor * lossfunc`` by ``DiagHessian``.

    BackPACK backpropagates the exact square root of :math:`\Lambda` (seeded from
    :mod:`curvlib.likelihood`) plus the positive and negative parts of every activation's
    second derivative times the backpropagated gradient. The full Hessian is not available
    (``full`` raises :class:`~curvlib.errors.CapabilityError` naming a backend that has it).
    """

    check_all_leaves: ClassVar[tuple[str, ...]] = ("diag",)
    structures: ClassVar[tuple[str, ...]] = ("diag",)
    supported_modules: ClassVar[dict[str, tuple[type, ...] | None]] = {
        "diag": MODULE_TABLES["DiagHessian"],
    }
    _extension_of: ClassVar[dict[str, str]] = {"diag": "DiagHessian"}

    @classmethod
    def curvature_name(cls) -> str:
        return "hessian"

    def diag(
        self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Hessian diagonal ``(loss, h (P,))`` by ``DiagHessian``."""
        loss, values = self._run(
            x,
            y,
            "diag",
            DiagHessian(),
            lambda f, y: self.lik.sqrt_cotangents(f.detach()),
            wrap=_diag_hessian_wrap,
        )
        return loss, self._select(torch.cat([v.flatten() for v in values]))
