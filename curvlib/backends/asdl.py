r"""The ASDL backend: curvature from ASDL's Fisher and Hessian makers.

ASDL comes from the PyPI package ``asdfghjkl`` (it imports as ``asdl``); laplace-torch pins
``asdfghjkl==0.1a4`` and this module works with it (and with 0.1a5, whose only change, the
``batch_size`` argument of ``asdl.gradient.batch_gradient``, is not used here).

What each method uses (``P`` selected parameters, ``B`` batch, ``C`` outputs):

==========================  ==============================================================
``jacobians``, ``gradients``  ASDL's per-sample gradients (``asdl.core.extend`` with
                              ``OP_BATCH_GRADS``), one backward pass per cotangent column;
                              rows of weight-sharing layers are summed per sample
``full`` / ``diag``           ``asdl.fisher`` makers: ``FISHER_EXACT`` (GGN),
                              ``FISHER_MC`` (``stochastic=True``), ``FISHER_EMP`` (EF)
                              with ``SHAPE_FULL`` / ``SHAPE_DIAG``
``kron``                      the same makers with ``SHAPE_KRON`` (expand variant)
Hessian ``full`` / ``diag``   ``asdl.hessian.HessianMaker`` (``SHAPE_FULL`` / ``SHAPE_DIAG``)
``eig_lowrank``               ASDL's Hessian-vector products summed over a loader, with
                              Lanczos (``scipy.sparse.linalg.eigsh``)
==========================  ==============================================================

Conversions to curvlib's conventions (DESIGN §3/§4), measured against brute force:

* Every maker is called with ``data_size=1`` (ASDL divides full and diag by it, and both
  Kronecker factors, i.e. ``kron`` by its square); curvlib rescales itself.
* Exact GGN: ASDL backpropagates :math:`\sum_n f_{n,i}` per output (regression,
  :math:`\Lambda = I`) or :math:`\sum_n \sqrt{p_{n,i}}\,(-\log p_{n,i})` per class
  (classification, :math:`\Lambda = \mathrm{diag}(p) - pp^\top`): no conversion.
* MC Fisher: ASDL's own ``FISHER_MC`` samples from the global RNG and is off by
  :math:`1/S` (it divides each sampled loss by ``n_mc_samples`` before squaring). curvlib
  does not use it: the pseudo-targets :math:`\tilde y` are drawn by curvlib's likelihood from
  the call's ``generator`` (the same draws as every backend), and the MC Fisher is ASDL's EF
  (``FISHER_EMP``) of the batch repeated :math:`S` times with targets :math:`\tilde y`,
  divided by :math:`S` (for K-FAC, ``A`` too).
* EF and Hessian: the maker is given curvlib's reported loss ``factor * lossfunc`` itself,
  so no factor appears (ASDL's own MSE EF would be 4 times curvlib's).
* K-FAC: ASDL's ``kron.B`` is :math:`G = \sum_{n,l} g g^\top` (all output columns and
  weight-sharing locations); ``kron.A`` is :math:`\sum_n a a^\top` for a Linear layer (no
  bias augmentation), :math:`\frac1L \sum_{n,l} a a^\top` for a Conv2d, and
  :math:`\sum_{n,l} a a^\top` for a Linear layer applied to sequences (it flattens them).
  curvlib returns ``[G, A / N]`` (``A / (N L)`` for a Linear on sequences), which is the
  *expand* K-FAC of DESIGN §4; a bias gets ``[G]``.

Modules: ASDL computes per-module rules for Linear, Conv2d, LayerNorm, BatchNorm1d/2d and
silently skips every other module (its result is then smaller than ``P`` or missing), and is
silently wrong for grouped convolutions. curvlib therefore checks every module owning a
selected parameter before any work and raises :class:`~curvlib.UnsupportedModuleError`
naming it and the backends that support it. Layers applied to sequences (a Linear on
``(B, L, D)``) make ASDL's dense and diagonal Fisher treat every location as a sample;
curvlib detects them during the forward pass (before any backward pass) and builds
``full``/``diag`` from ASDL's per-sample Jacobians or gradients instead, which are exact.

Hygiene: every call runs inside :func:`curvlib.interface.preserved_model`, which removes
ASDL's hooks, result attributes (``_curvlib_asdl_*``) and the ``_original_requires_grad``
attribute it puts on parameters, and restores ``.grad``, the training flag, the buffers and
the global RNG; it also clears, for the call, a stale ``_is_full_backward_hook`` flag (left
by BackPACK or any removed full backward hook, with which ASDL's old-style backward hooks
refuse to coexist) and puts it back afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from curvlib.errors import CapabilityError, InputError, SharedParameterError
from curvlib.interface import CurvatureInterface, EFInterface, GGNInterface, preserved_model
from curvlib.kfac import capture_io
from curvlib.kron import Kron
from curvlib.likelihood import Likelihood

__all__ = ["AsdlGGN", "AsdlEF", "AsdlHessian"]

#: module types ASDL has per-sample, dense and diagonal rules for (``asdl.operations``).
ASDL_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.LayerNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
)
#: module types ASDL has K-FAC rules for (its BatchNorm/LayerNorm kron is skipped silently).
ASDL_KRON_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
_NORM_MODULES = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)

# Unique attribute names for ASDL's results: its makers delete any attribute of that name
# before a call, so the defaults (``fisher``, ``hessian``, ...) could destroy a user's.
_ATTR = "_curvlib_asdl_"
_FISHER_ATTRS = {"fisher_attr": _ATTR + "fisher", "fvp_attr": _ATTR + "fvp"}
_HESSIAN_ATTRS = {
    "hessian_attr": _ATTR + "hessian",
    "tmp_hessian_attr": _ATTR + "tmp_hessian",
    "hvp_attr": _ATTR + "hvp",
    "tmp_hvp_attr": _ATTR + "tmp_hvp",
}


class _WeightSharing(Exception):
    """Raised inside the forward pass: a layer is applied to a sequence (see module doc)."""


def _rng_state(generator: Any) -> Any:
    """State of the RNG(s) MC draws come from: the global one, a generator, or one per point."""
    if generator is None:
        return torch.get_rng_state()
    if isinstance(generator, Sequence):
        return [g.get_state() for g in generator]
    return generator.get_state()


def _set_rng_state(generator: Any, state: Any) -> None:
    """Put back what :func:`_rng_state` read."""
    if generator is None:
        torch.set_rng_state(state)
    elif isinstance(generator, Sequence):
        for g, st in zip(generator, state, strict=True):
            g.set_state(st)
    else:
        generator.set_state(state)


def _shared_locations(module: nn.Module, inp: Tensor) -> int:
    """Number ``L`` of weight-sharing locations ASDL would treat as separate samples."""
    if isinstance(module, nn.Linear):
        return int(torch.Size(inp.shape[1:-1]).numel())
    if isinstance(module, nn.LayerNorm):
        return int(torch.Size(inp.shape[1 : inp.ndim - len(module.normalized_shape)]).numel())
    return 1  # Conv2d and BatchNorm2d reduce their locations themselves


class _AsdlBase:
    """Shared ASDL machinery: checks, the clean call context, per-sample products."""

    backend_name: ClassVar[str] = "asdl"
    dict_inputs: ClassVar[bool] = True

    # -- checks before any work ------------------------------------------------------------
    def _owning_modules(self) -> list[tuple[str, nn.Module]]:
        """Modules owning a selected parameter (the ones ASDL hooks), in module order."""
        owners = {id(p) for p in self.params}
        return [
            (path, m)
            for path, m in self._model.named_modules()
            if any(id(p) in owners for p in m.parameters(recurse=False))
        ]

    def _check_asdl(self, structure: str, types: tuple[type[nn.Module], ...] | None = None) -> None:
        """Raise for anything ASDL would skip or get wrong, before any work.

        ``types`` overrides ``supported_modules[structure]`` (the per-sample products behind
        ``jacobians``/``gradients`` need :data:`ASDL_MODULES` whatever the curvature, also
        for the Hessian class, whose ``supported_modules`` are ``None``: any module).
        Beyond the type check of ``supported_modules``: tied parameters, parameters other
        than ``weight``/``bias``, subclasses overriding ``forward``, Conv2d with groups,
        dilation, string padding or non-zero padding mode, normalization layers without
        both affine parameters or with zero scale entries (ASDL divides by them), and full
        backward hooks already on a module. (BatchNorm in training mode is rejected by the
        interface's ``_prepare``.)
        """
        self._check_modules(structure)
        seen: dict[int, str] = {}
        for path, m in self._model.named_modules(remove_duplicate=False):
            for name, p in m.named_parameters(recurse=False):
                if p.requires_grad and seen.setdefault(id(p), path) != path:
                    raise SharedParameterError(
                        f"parameter {name!r} is shared by modules {seen[id(p)] or '<root>'!r} "
                        f"and {path or '<root>'!r}; ASDL treats them as separate parameters. "
                        "Use backend 'autograd'"
                    )
        types = self.supported_modules[structure] if types is None else types
        for path, m in self._owning_modules():
            if not isinstance(m, types):
                raise self._unsupported_module(path, m, structure)
            detail = _asdl_problem(m, types)
            if detail:
                raise self._unsupported_module(path, m, structure, detail)

    # -- the call context -------------------------------------------------------------------
    @contextmanager
    def _session(self) -> Iterator[None]:
        """Run ASDL on the model and leave no trace (see the module docstring)."""
        with preserved_model(self.model):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
                warnings.filterwarnings("ignore", message=".*register_backward_hook.*")
                yield

    @contextmanager
    def _checked_forward(
        self, y: Tensor | None, structure: str, shared: str = "raise"
    ) -> Iterator[tuple[Callable[[Any], Tensor], dict[int, int]]]:
        """``(model_fn, L)``: the forward pass given to ASDL, validating before backward.

        ``model_fn(inp)`` runs ``_model``, checks the output and the targets, checks that
        every hooked layer ran once, and records in ``L`` (by module id) the number of
        weight-sharing locations of each layer. With ``shared="raise"`` a layer applied to
        a sequence raises :class:`_WeightSharing` there, before ASDL's backward pass.
        """
        mods = self._owning_modules()
        locations: dict[int, int] = {}
        with capture_io([m for _, m in mods]) as store:

            def model_fn(inp: Any) -> Tensor:
                with torch.enable_grad():
                    f = self._model(inp)
                Likelihood.check_output(f)
                if y is not None:
                    self.lik.check_target(f, y)
                for path, m in mods:
                    rec = store[id(m)]
                    if len(rec.inputs) != 1:
                        raise SharedParameterError(
                            f"module {path or '<root>'!r} ({type(m).__name__}) was called "
                            f"{len(rec.inputs)} times in one forward pass; ASDL needs exactly "
                            "one call per layer. Use backend 'autograd'"
                        )
                    a = rec.inputs[0]
                    if isinstance(m, nn.BatchNorm1d) and a.ndim != 2:
                        raise self._unsupported_module(
                            path, m, structure, f"ASDL handles only 2-D inputs, got {a.ndim}-D"
                        )
                    locations[id(m)] = _shared_locations(m, a)
                    if shared == "raise" and locations[id(m)] > 1:
                        raise _WeightSharing(path)
                return f

            yield model_fn, locations

    # -- per-sample products ----------------------------------------------------------------
    def _asdl_vjps(
        self, inp: Any, y: Tensor | None, cotangent_fn: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        r"""``(f, V)`` with :math:`V_{n,k} = J_n^\top c_{n,k}` ``(B, K, P)`` from ASDL.

        ``cotangent_fn(f)`` gives ``c`` of shape ``(B, K, C)``. For each ``k`` one backward
        pass of :math:`\sum_n c_{n,k}^\top f_n` with ASDL's ``OP_BATCH_GRADS``; the rows of
        a layer applied at ``L`` locations are summed per sample.
        """
        from asdl.core import extend
        from asdl.operations import OP_BATCH_GRADS

        B = self._batch_size(inp)
        mods = [m for _, m in self._owning_modules()]
        params = self.params
        with self._session(), self._checked_forward(y, "full", shared="keep") as (model_fn, _):
            with extend(self._model, OP_BATCH_GRADS) as cxt:
                f = model_fn(inp)
                cot = cotangent_fn(f.detach())
                rows = []
                for k in range(cot.shape[1]):
                    cxt.clear_batch_grads()
                    torch.autograd.grad(
                        f,
                        params,
                        grad_outputs=cot[:, k],
                        retain_graph=k < cot.shape[1] - 1,
                        allow_unused=True,
                    )
                    per_param: dict[int, Tensor] = {}
                    for m in mods:
                        for name, g in (cxt.batch_grads(m) or {}).items():
                            per_param[id(getattr(m, name))] = g.reshape(B, -1, g[0].numel()).sum(1)
                    rows.append(torch.cat([per_param[id(p)] for p in params], dim=1))
        return f.detach(), torch.stack(rows, dim=1)

    def jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians ``(Js (B, C, P), f (B, C))`` from ASDL's per-sample gradients.

        One backward pass of :math:`\\sum_n f_{n,c}` per output ``c``. ASDL's per-sample
        gradients are not differentiable, so ``enable_backprop=True`` raises
        :class:`~curvlib.CapabilityError` (use the autograd backend or
        ``functorch_jacobians``).
        """
        if enable_backprop:
            raise CapabilityError(
                "backend 'asdl' computes Jacobians in backward hooks that are not "
                "differentiable; for enable_backprop=True use backend 'autograd' or "
                "functorch_jacobians"
            )
        inp, _ = self._prepare(x, need_y=False)
        self._check_asdl("full", ASDL_MODULES)

        def eye(f: Tensor) -> Tensor:
            return torch.eye(f.shape[1], dtype=f.dtype, device=f.device).expand(f.shape[0], -1, -1)

        f, Js = self._asdl_vjps(inp, None, eye)
        return self._select(Js), f

    def gradients(self, x: Any, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample gradients ``(Gs (B, P), loss)`` of the terms of ``lossfunc``.

        ASDL's per-sample gradients of :math:`\\sum_n \\mathrm{lossfunc}(f_n, y_n)` (without
        ``factor``, as laplace-torch); ``loss`` is that sum, detached.
        """
        inp, y = self._prepare(x, y)
        self._check_asdl("full", ASDL_MODULES)
        f, G = self._asdl_vjps(inp, y, lambda f: self.lik.ef_cotangents(f, y) / self.factor)
        return self._select(G[:, 0]), self.lossfunc(f, y).detach()


def _asdl_problem(m: nn.Module, types: tuple[type[nn.Module], ...]) -> str:
    """Why ASDL would skip or mishandle module ``m`` (empty if it is fine)."""
    names = {n for n, _ in m.named_parameters(recurse=False)}
    if names - {"weight", "bias"}:
        return f"ASDL handles only parameters named weight and bias, got {sorted(names)}"
    base = next(t for t in types if isinstance(m, t))
    if type(m).forward is not base.forward:
        return f"a subclass of {base.__name__} with its own forward; ASDL assumes the original"
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return f"groups={m.groups}: ASDL's result would be silently wrong"
        if m.dilation != (1, 1):
            return f"dilation={m.dilation}: ASDL supports only dilation 1"
        if isinstance(m.padding, str) and m.padding != "valid":
            return f"padding={m.padding!r}: ASDL supports only integer padding"
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r}: ASDL pads with zeros"
    if isinstance(m, _NORM_MODULES):
        if m.weight is None or m.bias is None:
            return "ASDL needs both the scale (weight) and the shift (bias)"
        if bool((m.weight == 0).any()):
            return "its weight has zero entries, by which ASDL divides"
    if m._backward_pre_hooks or (m._backward_hooks and m._is_full_backward_hook):
        return (
            "it has full backward hooks (e.g. BackPACK's extend), which cannot coexist with "
            "ASDL's; remove them first"
        )
    return ""


class _AsdlFisher(_AsdlBase):
    """``full``, ``diag`` and ``kron`` from ASDL's Fisher makers (GGN, MC Fisher, EF)."""

    structures: ClassVar[tuple[str, ...]] = ("full", "diag", "kron")
    supported_modules: ClassVar[dict[str, tuple[type, ...] | None]] = {
        "full": ASDL_MODULES,
        "diag": ASDL_MODULES,
        "kron": ASDL_KRON_MODULES,
    }
    kfac_approximations: ClassVar[tuple[str, ...]] = ("expand",)

    def _fisher_type(self) -> str:
        from asdl.matrices import FISHER_EMP, FISHER_EXACT, FISHER_MC

        if self.curvature_name() == "ef":
            return FISHER_EMP
        return FISHER_MC if self.stochastic else FISHER_EXACT

    def _scale(self) -> float:
        """Factor from ASDL's ``G`` (or full/diag) to curvlib's convention.

        EF: ASDL squares gradients of ``lossfunc``, curvlib of ``factor * lossfunc``, so
        multiply by ``factor**2``. MC Fisher: the EF at ``num_samples`` pseudo-targets per
        point (see :meth:`_run_fisher`), so also divide by ``num_samples``.
        """
        if self.curvature_name() == "ef":
            return self.factor**2
        return self.factor**2 / self.num_samples if self.stochastic else 1

    def _run_fisher(
        self,
        inp: Any,
        y: Tensor,
        shape: str,
        generator: torch.Generator | None,
        structure: str,
        read: Callable[[nn.Module, str], Any],
    ) -> tuple[Tensor, Any, dict[int, int]]:
        """Run one Fisher maker on the batch; ``read(model, attr)`` extracts the result.

        Returns ``(f, result, L)`` with ``L`` the weight-sharing locations per module id.
        Raises :class:`_WeightSharing` (from the forward pass) for ``full``/``diag``.
        """
        from asdl.fisher import FisherConfig, get_fisher_maker
        from asdl.grad_maker import LOSS_CROSS_ENTROPY, LOSS_MSE

        ftype = self._fisher_type()
        f0 = None
        if self.curvature_name() == "ggn" and self.stochastic:
            # The MC Fisher as the EF at pseudo-targets drawn by curvlib's likelihood (the
            # same draws as every other backend, from `generator`): the gradient of the loss
            # at y~ is the sampled cotangent g~, so sum_s J^T g~ g~^T J / S is ASDL's EF of
            # the batch repeated S times with targets y~, over S.
            from asdl.matrices import FISHER_EMP

            S = self.num_samples
            # the draws are taken back if ASDL cannot run the model (weight sharing, see
            # _dense): the fallback then draws the same samples again
            rng_state = _rng_state(generator)
            f0 = self._forward(inp)
            self.lik.check_target(f0, y)
            g = self.lik.sample_grad_outputs(f0, S, generator)  # (B, S, C)
            if self.likelihood == "classification":
                y = g.argmin(-1).flatten()  # g~ = p - e_y~: its one negative entry is y~
            else:
                y = (f0.unsqueeze(1) - g).flatten(0, 1)  # g~ = f - y~
            inp = tree_map(
                lambda t: t.repeat_interleave(S, dim=0) if isinstance(t, Tensor) else t, inp
            )
            ftype = FISHER_EMP
        cfg = FisherConfig(
            fisher_type=ftype,
            fisher_shapes=[shape],
            loss_type=LOSS_MSE if self.likelihood == "regression" else LOSS_CROSS_ENTROPY,
            n_mc_samples=1,
            data_size=1,
            **_FISHER_ATTRS,
        )
        shared = "keep" if structure == "kron" else "raise"
        try:
            with self._session(), self._checked_forward(y, structure, shared) as (model_fn, L):
                fm = get_fisher_maker(self._model, cfg)
                dummy = fm.setup_model_call(model_fn, inp)
                # used by the EF (and the MC Fisher); ASDL needs a loss with `reduction`
                # (forced to "sum"), so it gets lossfunc and the result is rescaled by factor**2
                fm.setup_loss_call(self.lossfunc, dummy, y)
                with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
                    f, _ = fm.forward_and_backward()  # ASDL draws nothing here
                result = read(self._model, _FISHER_ATTRS["fisher_attr"])
        except _WeightSharing:
            if f0 is not None:
                _set_rng_state(generator, rng_state)
            raise
        return (f if f0 is None else f0).detach(), result, L

    def _dense(self, x: Any, y: Tensor | None, generator, structure: str, **kw: Any):
        from asdl.matrices import SHAPE_DIAG, SHAPE_FULL

        inp, y = self._prepare(x, y)
        self._check_asdl(structure)
        params = self.params
        scale = self._scale()

        def read_full(model: nn.Module, attr: str) -> Tensor:
            # ASDL's layout: modules in order, weight then bias; map it to params order
            H = getattr(model, attr).data
            start, offset = {}, 0
            for m in model.modules():
                for n in ("weight", "bias"):
                    t = getattr(m, n, None)
                    if isinstance(m, ASDL_MODULES) and isinstance(t, Tensor) and t.requires_grad:
                        start[id(t)] = offset
                        offset += t.numel()
            idx = torch.cat([torch.arange(p.numel()) + start[id(p)] for p in params])
            if torch.equal(idx, torch.arange(idx.numel())):
                return H.clone()
            idx = idx.to(H.device)
            return H[idx][:, idx]

        def read_diag(model: nn.Module, attr: str) -> Tensor:
            per_param = {}
            for m in model.modules():
                res = getattr(m, attr, None)
                if res is not None and getattr(res, "diag", None) is not None:
                    for n in ("weight", "bias"):
                        d = getattr(res.diag, n, None)
                        if d is not None:
                            per_param[id(getattr(m, n))] = d.flatten()
            return torch.cat([per_param[id(p)] for p in params]).clone()

        shape, read = (SHAPE_FULL, read_full) if structure == "full" else (SHAPE_DIAG, read_diag)
        try:
            f, H, _ = self._run_fisher(inp, y, shape, generator, structure, read)
        except _WeightSharing:
            # a layer on sequences: ASDL's Fisher makers would treat every location as a
            # sample; build the result from ASDL's (exact) per-sample products instead.
            base = GGNInterface if self.curvature_name() == "ggn" else EFInterface
            return getattr(base, structure)(self, x, y, generator=generator)
        H = H * scale
        H = self._select_full(H) if structure == "full" else self._select(H)
        return self._loss(f, y), H

    def full(
        self,
        x: Any,
        y: Tensor | None = None,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Dense curvature ``(loss, H (P, P))`` from ASDL's ``SHAPE_FULL`` Fisher maker.

        ``generator`` seeds the MC sampling (the global RNG is left unchanged).
        """
        return self._dense(x, y, generator, "full")

    def diag(
        self,
        x: Any,
        y: Tensor | None = None,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Diagonal ``(loss, h (P,))`` from ASDL's ``SHAPE_DIAG`` Fisher maker."""
        return self._dense(x, y, generator, "diag")

    def kron(
        self,
        x: Any,
        y: Tensor | None = None,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Kron]:
        r"""K-FAC ``(loss, Kron)`` on a batch of ``M`` out of ``N`` data points (DESIGN §4).

        ASDL's ``SHAPE_KRON`` factors converted to the *expand* variant:
        :math:`G = \sum_{n,k,l} g g^\top`, :math:`A = \frac{1}{N L}\sum_{n,l} a a^\top`;
        ``[G, A]`` per weight, ``[G]`` per bias. ``kfac_approx="reduce"`` differs from it
        for convolutions and layers on sequences, which ASDL cannot compute: it raises
        :class:`~curvlib.CapabilityError` there (before any backward pass); for layers
        without weight sharing both variants coincide and it is accepted.
        """
        from asdl.matrices import SHAPE_KRON

        inp, y = self._prepare(x, y)
        N = self._kron_num_data(x, N)
        self._check_asdl("kron")
        mods = self._owning_modules()
        if self.kfac_approx == "reduce":
            convs = [path for path, m in mods if isinstance(m, nn.Conv2d)]
            if convs:
                raise self._reduce_error(f"convolutions {convs}")

        def read(model: nn.Module, attr: str) -> dict[int, tuple[Tensor, Tensor | None]]:
            return {
                id(m): (getattr(m, attr).kron.B, getattr(m, attr).kron.A)
                for _, m in mods
                if getattr(m, attr, None) is not None
            }

        if self.kfac_approx == "reduce":  # layers on sequences: stop before the backward pass
            try:
                with self._session(), self._checked_forward(y, "kron", "raise") as (fn, _):
                    with torch.no_grad():
                        fn(inp)
            except _WeightSharing as e:
                where = f"layer {str(e) or '<root>'!r} applied to sequences"
                raise self._reduce_error(where) from None
        f, factors, L = self._run_fisher(inp, y, SHAPE_KRON, generator, "kron", read)
        scale = self._scale()
        owner = {
            id(getattr(m, kind)): (m, kind)
            for _, m in mods
            for kind in ("weight", "bias")
            if getattr(m, kind, None) is not None
        }
        kfacs = []
        for p in self.params:
            m, kind = owner[id(p)]
            G, A = factors[id(m)]
            G = G * scale
            if kind == "weight":
                # the MC batch is repeated num_samples times (see _run_fisher)
                reps = self.num_samples if getattr(self, "stochastic", False) else 1
                L_m = L[id(m)] if isinstance(m, nn.Linear) else 1
                kfacs.append([G, A / (N * L_m * reps)])
            else:
                kfacs.append([G.clone()])
        return self._loss(f, y), Kron(kfacs)

    def _reduce_error(self, where: str) -> CapabilityError:
        from curvlib.backends import backend_class, backends_supporting

        others = [
            b
            for b in backends_supporting(self.curvature_name(), "kron")
            if "reduce" in backend_class(b, self.curvature_name()).kfac_approximations
        ]
        return CapabilityError(
            f"backend 'asdl' computes only the 'expand' K-FAC, which differs from "
            f"kfac_approx='reduce' for {where}; backends that compute 'reduce': {others}"
        )


class AsdlGGN(_AsdlFisher, GGNInterface):
    """GGN (exact, ``FISHER_EXACT``) and MC Fisher (``stochastic=True``, ``FISHER_EMP`` at
    pseudo-targets drawn by curvlib's likelihood)
    with the ASDL backend; see the module docstring for the conversions."""


class AsdlEF(_AsdlFisher, EFInterface):
    """Empirical Fisher (``FISHER_EMP`` on the reported loss) with the ASDL backend."""


class AsdlHessian(_AsdlBase, CurvatureInterface):
    r"""Hessian :math:`\nabla^2_\theta` of the reported loss ``factor * lossfunc``.

    ``full`` and ``diag`` come from ASDL's ``HessianMaker`` (double backward, so any
    differentiable module works for ``full``; ``diag`` reads ASDL's per-module results and
    needs parameters named ``weight``/``bias``). :meth:`eig_lowrank` finds top eigenpairs of
    the Hessian over a data loader with ASDL's Hessian-vector products and Lanczos.
    """

    structures: ClassVar[tuple[str, ...]] = ("full", "diag")
    supported_modules: ClassVar[dict[str, tuple[type, ...] | None]] = {
        "full": None,
        "diag": None,
    }

    @classmethod
    def curvature_name(cls) -> str:
        return "hessian"

    def _check_hessian(self, structure: str) -> None:
        if structure != "diag":
            return
        for path, m in self._owning_modules():
            names = {n for n, p in m.named_parameters(recurse=False) if p.requires_grad}
            if names - {"weight", "bias"}:
                raise self._unsupported_module(
                    path, m, structure, "ASDL's Hessian diagonal reads only weight and bias"
                )

    def _maker(self, shape: str):
        from asdl.hessian import HessianConfig, HessianMaker

        return HessianMaker(self._model, HessianConfig(hessian_shapes=[shape], **_HESSIAN_ATTRS))

    def _setup(self, hm: Any, inp: Any, y: Tensor) -> None:
        def model_fn(inp: Any) -> Tensor:
            f = self._model(inp)
            Likelihood.check_output(f)
            self.lik.check_target(f, y)
            return f

        dummy = hm.setup_model_call(model_fn, inp)
        hm.setup_loss_call(self.lik.loss, dummy, y)

    def full(
        self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Dense Hessian ``(loss, H (P, P))`` from ASDL's ``HessianMaker`` (``SHAPE_FULL``)."""
        from asdl.matrices import SHAPE_FULL

        inp, y = self._prepare(x, y)
        self._check_hessian("full")
        with self._session():
            hm = self._maker(SHAPE_FULL)
            self._setup(hm, inp, y)
            hm.forward_and_backward()
            H = getattr(self._model, _HESSIAN_ATTRS["hessian_attr"]).data.clone()
            loss = hm.loss.detach()
        return loss, self._select_full(H)

    def diag(
        self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Hessian diagonal ``(loss, h (P,))`` from ASDL's ``HessianMaker`` (``SHAPE_DIAG``).

        ASDL computes each module's Hessian block and keeps its diagonal.
        """
        from asdl.matrices import SHAPE_DIAG

        inp, y = self._prepare(x, y)
        self._check_hessian("diag")
        attr = _HESSIAN_ATTRS["hessian_attr"]
        with self._session():
            hm = self._maker(SHAPE_DIAG)
            self._setup(hm, inp, y)
            hm.forward_and_backward()
            per_param = {}
            for m in self._model.modules():
                res = getattr(m, attr, None)
                if res is not None and getattr(res, "diag", None) is not None:
                    for n in ("weight", "bias"):
                        d = getattr(res.diag, n, None)
                        if d is not None:
                            per_param[id(getattr(m, n))] = d.flatten()
            h = torch.cat([per_param[id(p)] for p in self.params]).clone()
            loss = hm.loss.detach()
        return loss, self._select(h)

    def eig_lowrank(
        self,
        data_loader: Iterable[tuple[Any, Tensor]],
        k: int = 10,
        *,
        generator: torch.Generator | None = None,
        positive_only: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        r"""Top-``k`` eigenpairs of the Hessian of the loss summed over a data loader.

        :math:`H = \sum_{(x, y)} \nabla^2_\theta\, \mathrm{factor}\cdot
        \mathrm{lossfunc}(f(x), y)` over the selected parameters (last layer, subnetwork
        respected). Matrix-vector products :math:`Hv` are ASDL's Hessian-vector products
        (``HessianMaker.forward_and_backward(hvp=True)``) summed over the batches; the
        largest *algebraic* eigenvalues are found by implicitly restarted Lanczos
        (``scipy.sparse.linalg.eigsh``, ``which="LA"``), or by a dense eigendecomposition
        from ``P`` products when ``k >= P``. ASDL's own ``power_method`` is not used: it
        returns the largest-magnitude eigenvalues and unnormalized vectors when it hits
        ``max_iters``.

        Parameters
        ----------
        data_loader : iterable of (x, y)
            Batches; tensors are moved to the model's device.
        k : int, default 10
            Number of eigenpairs (at most ``P``).
        generator : torch.Generator, optional
            Seeds the Lanczos start vector; default a fixed seed, so results are
            reproducible and the global RNG is never touched.
        positive_only : bool, default False
            Drop eigenpairs with eigenvalue ``<= 1e-6`` (laplace-torch's low-rank Laplace
            does this).

        Returns
        -------
        eigvecs : Tensor
            ``(P, k)``, orthonormal columns, in the order of ``eigvals``.
        eigvals : Tensor
            ``(k,)``, descending.
        loss : Tensor
            The reported loss summed over the loader, detached.
        """
        import numpy as np
        from asdl.matrices import SHAPE_FULL
        from asdl.vector import ParamVector
        from scipy.sparse.linalg import LinearOperator, eigsh

        self._check_params()
        ref = self._ref_param()
        batches = [
            tree_map(lambda t: t.to(ref.device) if isinstance(t, Tensor) else t, b)
            for b in data_loader
        ]
        if not batches:
            raise InputError("data_loader yielded no batches")
        prepared = [self._prepare(xb, yb) for xb, yb in batches]
        params = self.params
        P = self.num_params
        idx = self._subnet()
        n = P if idx is None else idx.numel()
        if not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"k must be an integer in [1, {n}], got {k!r}")
        attr = _HESSIAN_ATTRS["hvp_attr"]

        with self._session():
            hm = self._maker(SHAPE_FULL)
            loss = torch.zeros((), dtype=ref.dtype, device=ref.device)
            for inp, y in prepared:
                with torch.no_grad():
                    f = self._model(inp)
                Likelihood.check_output(f)
                self.lik.check_target(f, y)
                loss = loss + self._loss(f, y)

            def hvp(v: Tensor) -> Tensor:
                if idx is not None:
                    v = torch.zeros(P, dtype=v.dtype, device=v.device).index_copy_(0, idx, v)
                vec = ParamVector(params, v)
                out = torch.zeros(P, dtype=ref.dtype, device=ref.device)
                for inp, y in prepared:
                    self._setup(hm, inp, y)
                    hm.forward_and_backward(hvp=True, vec=vec)
                    out += getattr(self._model, attr).get_flatten_vector().detach()
                return out if idx is None else out[idx]

            if k >= n:
                eye = torch.eye(n, dtype=ref.dtype, device=ref.device)
                H = torch.stack([hvp(e) for e in eye], dim=1)
                vals, vecs = torch.linalg.eigh((H + H.T) / 2)
                vals, vecs = vals.flip(0)[:k], vecs.flip(1)[:, :k]
            else:
                gen = generator if generator is not None else torch.Generator().manual_seed(0)
                v0 = torch.randn(n, generator=gen, dtype=torch.float64, device=gen.device)

                def matvec(v: np.ndarray) -> np.ndarray:
                    t = torch.as_tensor(np.asarray(v).ravel(), dtype=ref.dtype, device=ref.device)
                    return hvp(t).double().cpu().numpy()

                op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
                w, V = eigsh(op, k=k, which="LA", v0=v0.cpu().numpy())
                order = np.argsort(w)[::-1].copy()
                vals = torch.from_numpy(w[order].copy()).to(ref.device, ref.dtype)
                vecs = torch.from_numpy(V[:, order].copy()).to(ref.device, ref.dtype)
        if positive_only:
            keep = vals > 1e-6
            vals, vecs = vals[keep], vecs[:, keep]
        return vecs, vals, loss.detach()
