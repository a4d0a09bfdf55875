r"""The ASDL backend: curvature from ASDL's Fisher and Hessian makers.

ASDL comes from the PyPI package ``asdfghjkl`` (it imports as ``asdl``); laplace-torch pins
``asdfghjkl==0.1a4`` and this module works with it.

==========================  ==============================================================
hook                        computation
==========================  ==============================================================
``_jacobians``,             ASDL's per-sample gradients (``asdl.core.extend`` with
``_gradients``              ``OP_BATCH_GRADS``), one backward pass per cotangent column;
                            rows of a layer applied at several locations summed per sample
``_full`` / ``_diag``       ``asdl.fisher`` makers: ``FISHER_EXACT`` (GGN), the EF maker at
                            curvlib-drawn pseudo-targets (MC Fisher), ``FISHER_EMP`` (EF),
                            ``SHAPE_FULL`` / ``SHAPE_DIAG``
``_kron``                   the same makers with ``SHAPE_KRON`` for Linear and Conv2d; every
                            other layer by curvlib's K-FAC rules in a second pass
Hessian ``_full``/``_diag`` ``asdl.hessian.HessianMaker`` (``SHAPE_FULL`` / ``SHAPE_DIAG``)
``eig_lowrank``             ASDL's Hessian-vector products with Lanczos
==========================  ==============================================================

The operator is curvlib's shared torch.func implementation.

Conversions to curvlib's conventions, measured against brute force:

* every maker is called with ``data_size=1``; curvlib rescales itself;
* exact GGN: ASDL backpropagates the square root of :math:`\Lambda`: no conversion;
* MC Fisher: ASDL's own ``FISHER_MC`` samples from the global RNG and is off by
  :math:`1/S`; curvlib draws the pseudo-targets from the call's ``generator`` and uses the
  EF maker on the batch repeated :math:`S` times, divided by :math:`S`;
* EF: ASDL squares gradients of ``lossfunc``; times ``factor**2``;
* K-FAC: ASDL's ``kron.B`` is :math:`G = \sum_{n,l} g g^\top`, ``kron.A`` is
  :math:`\sum_n a a^\top` (Linear), :math:`\frac1L \sum_{n,l} a a^\top` (Conv2d),
  :math:`\sum_{n,l} a a^\top` (Linear on sequences): curvlib returns ``[G, A / N]``
  (``A / (N L)`` for sequences), the *expand* K-FAC.

ASDL reads the outputs of its layers after the forward pass; an in-place operation later
in the forward pass (``out += identity`` in a residual block) would change them, so every
hooked layer passes a copy of its output on. Layers applied to sequences make ASDL's dense
and diagonal Fisher treat every location as a sample; curvlib detects them in the forward
pass and builds ``full``/``diag`` from ASDL's (exact) per-sample products instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

with warnings.catch_warnings():  # asdfghjkl 0.1a4 uses the deprecated torch.jit.script
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    import asdl  # noqa: F401  (an absent asdfghjkl makes this backend unavailable at once)

from curvlib._call import Call
from curvlib._checks import Records
from curvlib._hygiene import preserved_model
from curvlib.errors import CapabilityError, UnsupportedModuleError
from curvlib.interface import EFInterface, GGNInterface
from curvlib.kron import Kron

__all__ = ["AsdlGGN", "AsdlEF"]  # AsdlHessian: curvlib.backends.asdl_hessian

# Unique attribute names for ASDL's results: its makers delete any attribute of that name
# before a call, so the defaults (``fisher``, ``hessian``, ...) could destroy a user's.
_ATTR = "_curvlib_asdl_"
_FISHER_ATTRS = {"fisher_attr": _ATTR + "fisher", "fvp_attr": _ATTR + "fvp"}


class _Fallback(Exception):
    """Raised inside the forward pass: ASDL's dense and diagonal makers would be wrong."""


class _WeightSharing(_Fallback):
    """A layer is applied to a sequence (ASDL would treat every location as a sample)."""


class _NotRun(_Fallback):
    """A module owning selected parameters never ran (ASDL has no result for it)."""


def _shared_locations(module: nn.Module, inp: Tensor, B: int) -> int:
    """Number ``L`` of weight-sharing locations per data point of a layer ASDL treats row by
    row (every row of the flattened input a sample); ``B`` is the batch size."""
    if isinstance(module, nn.Linear):
        return int(inp.numel() // max(1, inp.shape[-1] * B))
    if isinstance(module, nn.LayerNorm):
        return int(inp.numel() // max(1, math.prod(module.normalized_shape) * B))
    if isinstance(module, nn.Embedding):
        return int(inp.numel() // max(1, B))
    return 1  # Conv2d and BatchNorm reduce their locations themselves


def _batch_first(module: nn.Module, a: Tensor, B: int) -> bool:
    """Whether the input ``a`` of ``module`` holds the batch along dimension 0 beyond doubt
    (``(L, B, E)`` with ``L = B`` would be indistinguishable from ``(B, L, E)``)."""
    if a.ndim == 0 or a.shape[0] != B:
        return False
    if isinstance(module, nn.Embedding):
        positions = a.shape[1:]
    elif isinstance(module, (nn.Linear, nn.LayerNorm)):
        positions = a.shape[1:-1]
    else:  # convolutions and batch norms: (B, C, *spatial)
        return True
    return B == 1 or B not in positions


class _AsdlBase:
    """Shared ASDL machinery: the clean session, the checked forward, per-sample products."""

    backend_name: ClassVar[str] = "asdl"

    def _owners(self) -> list[tuple[str, nn.Module]]:
        owners = {id(p) for p in self.params}
        return [
            (path, m)
            for path, m in self._model.named_modules()
            if any(id(p) in owners for p in m.parameters(recurse=False))
        ]

    @contextmanager
    def _session(self) -> Iterator[None]:
        """Run ASDL on the model and leave no trace (hooks, attributes, RNG). Inside the
        template's hygiene step, which restores the model at the end of the call, only
        ASDL's own attributes are removed after the pass (so that a second pass starts
        clean); outside it the whole model is restored."""
        with ExitStack() as stack:
            inside = self.__dict__.get("_params_now") is not None
            if not inside:
                stack.enter_context(preserved_model(self.model))
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
            warnings.filterwarnings("ignore", message=".*register_backward_hook.*")
            before = {id(m): set(m.__dict__) for m in self.model.modules()} if inside else {}
            try:
                yield
            finally:
                for m in self.model.modules() if inside else ():
                    for k in set(m.__dict__) - before.get(id(m), set()):
                        del m.__dict__[k]

    @contextmanager
    def _checked_forward(
        self, call: Call, y: Tensor | None, shared: str = "raise", batch_first: bool = True
    ) -> Iterator[tuple[Callable[[Any], Tensor], dict[int, int]]]:
        """``(model_fn, L)``: the forward pass given to ASDL, validating before backward.

        ``model_fn(inp)`` protects the outputs of the hooked layers (hooks registered after
        ASDL's), runs the model through ``call.forward``, checks that no hooked layer ran
        more than once, and records in ``L`` the weight-sharing locations of each layer that
        ran (a layer that never ran is absent). With ``shared="raise"`` a layer applied to a
        sequence raises :class:`_WeightSharing`, a layer that never ran :class:`_NotRun`.
        With ``batch_first`` a layer whose input does not hold the batch along its first
        dimension (inside ``nn.TransformerEncoderLayer(batch_first=False)``) is refused:
        ASDL's per-sample quantities read the first dimension as the batch.
        """
        mods = self._owners()
        locations: dict[int, int] = {}

        def model_fn(inp: Any) -> Tensor:
            records = Records()
            handles = []

            def protect(mod: nn.Module, args: tuple, out: Any) -> Any:
                records.hook(mod, args, out)
                return out.clone() if isinstance(out, Tensor) else None

            try:
                for _, m in mods:
                    handles.append(m.register_forward_hook(protect))
                f = call.forward(inp, y)
            finally:
                for h in handles:
                    h.remove()
            self._dynamic_check(call, records, f)
            B = f.shape[0]
            for path, m in mods:
                if not records.calls.get(id(m)):
                    if shared == "raise":
                        raise _NotRun()
                    continue  # absent from L: its parameters' results are zero
                a = records.calls[id(m)][0].inp
                if batch_first and isinstance(a, Tensor) and not _batch_first(m, a, B):
                    raise UnsupportedModuleError(
                        f"backend 'asdl' cannot compute {call.what!r} for module "
                        f"{path or '<root>'!r} of type {type(m).__name__}: its input of shape "
                        f"{tuple(a.shape)} does not plainly hold the batch of {B} along its "
                        "first dimension, which ASDL reads as the batch; backends that can: "
                        "'autograd', 'auto'"
                    )
                locations[id(m)] = 1 if a is None else _shared_locations(m, a, B)
                if shared == "raise" and locations[id(m)] > 1:
                    raise _WeightSharing()
            return f

        yield model_fn, locations

    def _asdl_vjps(self, call: Call, y: Tensor | None, cotangent_fn) -> tuple[Tensor, Tensor]:
        r"""``(f, V)`` with :math:`V_{n,k} = J_n^\top c_{n,k}` ``(B, K, P)`` from ASDL."""
        from asdl.core import extend
        from asdl.operations import OP_BATCH_GRADS

        B = call.B
        mods = [m for _, m in self._owners()]
        params = self.params
        with self._session(), self._checked_forward(call, y, shared="keep") as (model_fn, L):
            with extend(self._model, OP_BATCH_GRADS) as cxt:
                with torch.enable_grad():
                    f = model_fn(call.inp)
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
                    for m in mods:  # a module that never ran: zero products
                        if id(m) not in L:
                            for p in m.parameters(recurse=False):
                                per_param[id(p)] = p.new_zeros(B, p.numel())
                    rows.append(torch.cat([per_param[id(p)] for p in params], dim=1))
        return f.detach(), torch.stack(rows, dim=1)

    def _jacobians(self, call: Call) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians from ASDL's per-sample gradients (one pass per output)."""

        def eye(f: Tensor) -> Tensor:
            return torch.eye(f.shape[1], dtype=f.dtype, device=f.device).expand(f.shape[0], -1, -1)

        f, Js = self._asdl_vjps(call, call.y if call.what != "jacobians" else None, eye)
        return Js, f

    def _gradients(self, call: Call) -> tuple[Tensor, Tensor]:
        """Per-sample gradients of the terms of ``lossfunc`` (without ``factor``)."""
        f, G = self._asdl_vjps(
            call, call.y, lambda f: self.lik.ef_cotangents(f, call.y) / self.factor
        )
        return G[:, 0], self.lossfunc(f, call.y).detach()


def _read_diag(model: nn.Module, attr: str, params: Sequence[Tensor]) -> Tensor:
    per_param = {}
    for m in model.modules():
        res = getattr(m, attr, None)
        if res is not None and getattr(res, "diag", None) is not None:
            for n in ("weight", "bias"):
                d = getattr(res.diag, n, None)
                if d is not None:
                    per_param[id(getattr(m, n))] = d.flatten()
    return torch.cat([per_param[id(p)] for p in params]).clone()


class _AsdlFisher(_AsdlBase):
    """``full``, ``diag`` and ``kron`` from ASDL's Fisher makers (GGN, MC Fisher, EF)."""

    def _dynamic_check(self, call: Call, records: Any, f: Tensor) -> None:
        """The row's checks, and ``kfac_approx='reduce'``: ASDL's K-FAC is ``expand``, equal
        to ``reduce`` only for a native layer without weight sharing (a convolution shares
        its weight over its output locations; a Linear layer on sequences over positions).
        Run by the call and by :func:`curvlib.supports` alike, before any backward pass."""
        super()._dynamic_check(call, records, f)
        if call.what not in ("kron", "ekfac") or call.kfac_approx != "reduce":
            return
        B = f.shape[0]
        for path, m in self._model.named_modules():
            if not isinstance(m, nn.Linear | nn.Conv2d) or call.cap.refusal(m, True):
                continue
            if not any(id(p) in {id(q) for q in self.params} for p in m.parameters(False)):
                continue
            seen = records.calls.get(id(m))
            a = seen[0].inp if seen else None
            shared = isinstance(m, nn.Conv2d) or (
                isinstance(a, Tensor) and _shared_locations(m, a, B) > 1
            )
            if shared:
                kind = "convolution" if isinstance(m, nn.Conv2d) else "layer applied to sequences"
                raise self._reduce_error(f"the {kind} {path or '<root>'!r}")

    def _scale(self, call: Call) -> float:
        """Factor from ASDL's ``G`` (or full/diag) to curvlib's convention."""
        if self.curvature_name() == "ef":
            return self.factor**2
        return self.factor**2 / call.num_samples if call.stochastic else 1

    def _run_fisher(
        self, call: Call, shape: str, read: Callable[[nn.Module, str], Any], ignore=None
    ):
        """Run one Fisher maker on the batch; ``(f, read(model, attr), L per module)``."""
        from asdl.fisher import FisherConfig, get_fisher_maker
        from asdl.grad_maker import LOSS_CROSS_ENTROPY, LOSS_MSE
        from asdl.matrices import FISHER_EMP, FISHER_EXACT, SHAPE_KRON

        ftype = FISHER_EMP if self.curvature_name() == "ef" else FISHER_EXACT
        inp, y, f0 = call.inp, call.y, None
        if call.stochastic:
            # the MC Fisher as the EF at pseudo-targets drawn by curvlib's likelihood: the
            # gradient of the loss at y~ is the sampled cotangent g~
            S = call.num_samples
            f0 = call.forward(inp, y, grad=False)
            g = self.lik.sample_grad_outputs(f0, S, call.generator)  # (B, S, C)
            if self.likelihood == "classification":
                y = g.argmin(-1).flatten()  # g~ = p - e_y~: its one negative entry is y~
            else:
                y = (f0.unsqueeze(1) - g).flatten(0, 1)  # g~ = f - y~
            inp = tree_map(
                lambda t: t.repeat_interleave(S, dim=0) if isinstance(t, Tensor) else t, inp
            )
            ftype = FISHER_EMP
            call = _repeated(call, inp, y)
        cfg = FisherConfig(
            fisher_type=ftype,
            fisher_shapes=[shape],
            loss_type=LOSS_MSE if self.likelihood == "regression" else LOSS_CROSS_ENTROPY,
            n_mc_samples=1,
            data_size=1,
            ignore_modules=ignore,
            **_FISHER_ATTRS,
        )
        kron = shape == SHAPE_KRON  # ASDL's factors sum over every row: any batch layout
        shared = "keep" if kron else "raise"
        with self._session(), self._checked_forward(call, y, shared, not kron) as (model_fn, L):
            fm = get_fisher_maker(self._model, cfg)
            dummy = fm.setup_model_call(model_fn, inp)
            fm.setup_loss_call(self.lossfunc, dummy, y)
            f, _ = fm.forward_and_backward()
            result = read(self._model, _FISHER_ATTRS["fisher_attr"])
        return (f if f0 is None else f0).detach(), result, L

    def _dense(self, call: Call, structure: str):
        from asdl.matrices import SHAPE_DIAG, SHAPE_FULL

        params = self.params

        def read_full(model: nn.Module, attr: str) -> Tensor:
            H = getattr(model, attr).data
            start, offset = {}, 0  # ASDL's layout: modules in order, weight then bias
            for m in model.modules():
                for n in ("weight", "bias"):
                    t = getattr(m, n, None)
                    if isinstance(t, Tensor) and t.requires_grad and _asdl_op(m):
                        start[id(t)] = offset
                        offset += t.numel()
            idx = torch.cat([torch.arange(p.numel()) + start[id(p)] for p in params])
            if torch.equal(idx, torch.arange(idx.numel())):
                return H.clone()
            idx = idx.to(H.device)
            return H[idx][:, idx]

        if structure == "full":
            shape, read = SHAPE_FULL, read_full
        else:
            shape, read = SHAPE_DIAG, lambda m, a: _read_diag(m, a, params)
        state = call.generator_state()
        try:
            f, H, _ = self._run_fisher(call, shape, read)
        except _Fallback:
            # a layer on sequences (ASDL's makers would treat every location as a sample)
            # or one that never ran (they have no result for it): the result from ASDL's
            # (exact) per-sample products instead, with the same MC draws (the generator
            # is put back)
            call.restore_generator(state)
            base = GGNInterface if self.curvature_name() == "ggn" else EFInterface
            return getattr(base, "_" + structure)(self, call)
        H = H * self._scale(call)
        if structure == "full":
            H = call.select_full(H)
        return call.loss(f), H

    def _full(self, call: Call):
        return self._dense(call, "full")

    def _diag(self, call: Call):
        return self._dense(call, "diag")

    def _kron(self, call: Call):
        """ASDL's ``SHAPE_KRON`` factors converted to the expand variant for Linear and
        Conv2d; the other selected parameters from curvlib's rule table in a second pass."""
        from asdl.matrices import SHAPE_KRON

        state = call.generator_state()  # both passes see the same MC draws
        native = [(p, m) for p, m in self._owners() if not call.cap.refusal(m, True)]
        native_ids = {id(m) for _, m in native}
        if call.kfac_approx == "reduce":  # equal to expand only without weight sharing
            # (the layers curvlib's rules compute follow kfac_approx themselves)
            convs = [p for p, m in native if isinstance(m, nn.Conv2d)]
            if convs:
                raise self._reduce_error(f"convolutions {convs}")
            checked = self._checked_forward(call, call.y, "keep", batch_first=False)
            with self._session(), checked as (fn, locs):
                with torch.no_grad():
                    fn(call.inp)
            shared = [p for p, m in native if locs.get(id(m), 1) > 1]
            if shared:
                raise self._reduce_error(f"layers applied to sequences {shared}")

        def read(model: nn.Module, attr: str) -> dict[int, tuple[Tensor, Tensor | None]]:
            return {
                id(m): (getattr(m, attr).kron.B, getattr(m, attr).kron.A)
                for _, m in native
                if getattr(getattr(m, attr, None), "kron", None) is not None
            }

        ignore = [m for m in self._model.modules() if id(m) not in native_ids]
        f, factors, L = self._run_fisher(call, SHAPE_KRON, read, ignore)
        scale = self._scale(call)
        reps = call.num_samples if call.stochastic else 1
        owner = {
            id(getattr(m, kind)): (m, kind)
            for _, m in native
            for kind in ("weight", "bias")
            if getattr(m, kind, None) is not None
        }
        entries: dict[int, list[Tensor]] = {}
        for p in self.params:
            if id(p) not in owner or id(owner[id(p)][0]) not in L:
                continue  # not native, or never ran (zero entries from the rule table)
            m, kind = owner[id(p)]
            G, A = factors[id(m)]
            if kind == "weight":
                L_m = L[id(m)] if isinstance(m, nn.Linear) else 1
                entries[id(p)] = [G * scale, A / (call.N * L_m * reps)]
            else:
                entries[id(p)] = [(G * scale).clone()]
        rest = [p for p in self.params if id(p) not in entries]
        if rest:
            call.restore_generator(state)
            entries.update(self._shared_kron(call, rest, native_ids))
        return call.loss(f), Kron([entries[id(p)] for p in self.params])

    def _shared_kron(
        self, call: Call, params: list[Tensor], skip: set[int]
    ) -> dict[int, list[Tensor]]:
        """Entries of ``params`` (layers ASDL lacks) by curvlib's rule table."""
        from curvlib.kfac import LayerPass

        lp = LayerPass(self._model, params)
        with self._session():
            lp.run(
                lambda: call.forward(),
                lambda f: call.cotangents(f),
                self._generic_products_for(call.inp),
            )
            kfacs = lp.factors(call.N, call.kfac_approx)
        return {id(p): k for p, k in zip(params, kfacs, strict=True)}

    def _reduce_error(self, where: str) -> CapabilityError:
        return CapabilityError(
            f"backend 'asdl' computes only the 'expand' K-FAC, which differs from "
            f"kfac_approx='reduce' for {where}; backends that compute 'reduce': "
            f"{self._others('kron', kfac='reduce')}"
        )


def _asdl_op(m: nn.Module) -> bool:
    from asdl.operations import get_op_class

    return get_op_class(m) is not None


def _repeated(call: Call, inp: Any, y: Tensor) -> Call:
    """The call on the batch repeated ``S`` times (the MC Fisher's pseudo-target batch)."""
    from dataclasses import replace

    new = replace(call, inp=inp, y=y, B=call.B * call.num_samples, after_forward=[])
    new._forwarded = True
    return new


class AsdlGGN(_AsdlFisher, GGNInterface):
    """GGN (exact, ``FISHER_EXACT``) and MC Fisher (``stochastic=True``, the EF maker at
    pseudo-targets drawn by curvlib's likelihood) with the ASDL backend."""


class AsdlEF(_AsdlFisher, EFInterface):
    """Empirical Fisher (``FISHER_EMP`` on the reported loss) with the ASDL backend."""
