r"""The curvature interface: a drop-in for laplace-torch 0.3's ``laplace.curvature``.

:class:`CurvatureInterface` defines every public method once — ``jacobians``,
``last_layer_jacobians``, ``gradients``, ``full``, ``diag``, ``kron`` and ``operator`` — as
one fixed sequence (the *template*):

1. the keywords (explicit; per-call ``generator``, ``num_samples``/``mc_samples`` and
   ``kfac_approx`` mean what they mean at construction; anything else is a ``TypeError``
   naming it and listing the accepted ones);
2. inputs and targets, ``N``, the generator and the subnetwork;
3. the capability, read from the one table (:mod:`curvlib.capabilities`);
4. the size estimate against the memory limit (:mod:`curvlib._memory`);
5. one protected hook of the backend — ``_jacobians``, ``_gradients``, ``_full``, ``_diag``,
   ``_kron``, ``_matmat`` — inside :func:`~curvlib._hygiene.preserved_model`;
6. post-processing: finiteness of loss and result, subnetwork selection, the reported loss.

A backend implements only hooks, and only those its library computes; the defaults here
are curvlib's shared implementations (torch.func products, the K-FAC rule table).

Shapes: ``B`` batch, ``C`` outputs, ``P`` selected parameters (those with
``requires_grad=True`` in ``model.parameters()`` order, each flattened row-major; only the
last layer's with ``last_layer=True``; only ``subnetwork_indices`` of that vector if given).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvlib import _autodiff, _inputs, _memory, _selection
from curvlib._call import Call
from curvlib._checks import CapabilityChecks
from curvlib._hygiene import HygieneSteps, preserved_model
from curvlib._options import (
    KFAC_APPROX,
    OPERATOR_OPTIONS,
    SHARED_JACOBIANS,
    check_call_options,
)
from curvlib.capabilities import STRUCTURES, Capability
from curvlib.errors import CapabilityError, InputError
from curvlib.likelihood import Likelihood, get_likelihood

__all__ = [
    "CurvatureInterface",
    "GGNInterface",
    "EFInterface",
    "HessianInterface",
    "STRUCTURES",
    "KFAC_APPROX",
    "preserved_model",
]


_OWN_OPTIONS = ("basis", "k", "remainder", "num_iters", "seed")


class CurvatureInterface(CapabilityChecks, HygieneSteps):
    """Curvature of ``factor * lossfunc`` of a model w.r.t. its selected parameters.

    Parameters
    ----------
    model : torch.nn.Module
        The network, in eval mode. With ``last_layer=True`` it must expose ``last_layer``
        and ``forward_with_features(x) -> (f, features)`` (laplace-torch's
        ``FeatureExtractor``).
    likelihood : {"classification", "regression"} or Likelihood
        See :mod:`curvlib.likelihood` for the conventions.
    last_layer : bool, default False
        Use only the last layer's parameters; the features are fixed inputs.
    subnetwork_indices : torch.LongTensor or bool mask, optional
        Entries of the flat vector of selected parameters to restrict results to (read at
        call time, so it may be set after construction, as laplace-torch does).
    dict_key_x, dict_key_y : str
        For dict (HuggingFace-style) inputs: the key of the batched input tensor (read for
        the batch size) and of the targets when ``y`` is not given.
    kfac_approx : {"expand", "reduce"}, default "expand"
        The weight-sharing K-FAC variant.
    memory_limit : int or str, optional
        Bytes (or ``"4G"``) a dense request may need; default ``CURVLIB_MEMORY_LIMIT`` or
        the memory available on the model's device (:mod:`curvlib._memory`).
    **backend_options
        Options of the backend (:attr:`options`); any other raises ``TypeError``.

    Attributes
    ----------
    model, likelihood (the name), last_layer, subnetwork_indices, lossfunc, factor,
    params, params_dict, buffers_dict, lik (the :class:`~curvlib.Likelihood`)
    """

    #: name of the backend in the registry (``curvlib.backend_class``).
    backend_name: ClassVar[str] = "base"
    #: backend-specific constructor options and their defaults.
    options: ClassVar[Mapping[str, Any]] = {}

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        last_layer: bool = False,
        subnetwork_indices: Tensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        *,
        kfac_approx: str = "expand",
        memory_limit: int | str | None = None,
        **backend_options: Any,
    ) -> None:
        unknown = sorted(set(backend_options) - set(self.options))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown option(s) {unknown}; accepted: "
                f"{sorted(self.accepted_options())}"
            )
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if kfac_approx not in KFAC_APPROX:
            raise InputError(f"kfac_approx must be one of {KFAC_APPROX}, got {kfac_approx!r}")
        self.lik = get_likelihood(likelihood)
        self.model = model
        self.likelihood = self.lik.name
        self.lossfunc = self.lik.lossfunc
        self.factor = self.lik.factor
        self.last_layer = bool(last_layer)
        self.subnetwork_indices = subnetwork_indices
        self.dict_key_x = dict_key_x
        self.dict_key_y = dict_key_y
        self.kfac_approx = kfac_approx
        self.memory_limit = memory_limit
        _memory.parse_limit(memory_limit, "memory_limit")
        self.backend_options = {**self.options, **backend_options}
        if self.last_layer:
            for attr in ("last_layer", "forward_with_features"):
                if not hasattr(model, attr):
                    raise InputError(
                        f"last_layer=True needs a model with `{attr}` (e.g. laplace-torch's "
                        f"FeatureExtractor); {type(model).__name__} has none"
                    )

    @classmethod
    def accepted_options(cls) -> set[str]:
        """Every keyword the constructor accepts."""
        import inspect

        names = set(cls.options)
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            for prm in inspect.signature(init).parameters.values():
                if prm.kind in (prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY) and prm.name != "self":
                    names.add(prm.name)
        return names

    # -- capabilities -------------------------------------------------------------------
    @classmethod
    def curvature_name(cls) -> str:
        """The registry's curvature name of this class (``ggn``, ``ef``, ``hessian``)."""
        return "curvature"

    def curvature_key(self) -> str:
        """The capability-table key: ``fisher`` for a stochastic GGN."""
        return "fisher" if getattr(self, "stochastic", False) else self.curvature_name()

    # -- parameter selection ------------------------------------------------------------
    @property
    def _model(self) -> nn.Module:
        """The module whose parameters are differentiated (the last layer, or the model)."""
        return _selection.differentiated_module(self.model, self.last_layer)

    @property
    def differentiated_module(self) -> nn.Module:
        """The module whose parameters are differentiated: ``model``, or ``model.last_layer``."""
        return self._model

    @property
    def params_dict(self) -> dict[str, Tensor]:
        """Selected parameters by name, in ``parameters()`` order."""
        now = self.__dict__.get("_params_now")
        if now is not None:
            return dict(now)
        return _selection.selected_params(self._model)

    @property
    def params(self) -> list[Tensor]:
        """Selected parameters, in ``parameters()`` order."""
        return list(self.params_dict.values())

    @property
    def buffers_dict(self) -> dict[str, Tensor]:
        """Buffers of the differentiated module by name."""
        return dict(self._model.named_buffers())

    @property
    def num_params(self) -> int:
        """P: the number of selected parameters (before ``subnetwork_indices``)."""
        return sum(p.numel() for p in self.params)

    # -- the template -------------------------------------------------------------------
    def _options(self, what: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Step 1: the per-call keywords, resolved against the construction options."""
        return check_call_options(type(self).__name__, what, kwargs)

    def _begin(
        self,
        what: str,
        x: Any,
        y: Any = None,
        N: Any = None,
        kwargs: Mapping[str, Any] | None = None,
        need_y: bool = True,
        cap: Capability | None = None,
    ) -> Call:
        """Steps 1–4 of the template: a validated :class:`Call`, before any work.

        ``cap`` overrides the backend's row (the shared implementations have their own).
        """
        memo: dict = {}
        with self._fixed_selection(memo):
            call = self._checked_call(what, x, y, N, kwargs, need_y, cap)
            selection = self.__dict__["_params_now"]
        # the call's later steps share what its checks computed, and its selection
        call.memo, call.selection = memo, selection
        return call

    def _checked_call(
        self,
        what: str,
        x: Any,
        y: Any,
        N: Any,
        kwargs: Mapping[str, Any] | None,
        need_y: bool,
        cap: Capability | None,
    ) -> Call:
        """The body of :meth:`_begin` (with the selection fixed)."""
        opts = self._options("jacobians" if what == "last_layer_jacobians" else what, kwargs or {})
        module = self._model
        params = self.params
        _selection.check_params(self.model, module, params, self.last_layer)
        ref = params[0]
        B = _inputs.check_inputs(x, self.dict_key_x, ref.device, ref.dtype)
        if need_y:
            if y is None and isinstance(x, Mapping) and self.dict_key_y in x:
                y = x[self.dict_key_y]
            if y is None:
                from curvlib.errors import TargetError

                raise TargetError("targets y are required")
            y = _inputs.check_targets(y, B, ref.device, self.likelihood)
        n_data = None if N is None else _inputs.check_num_data(N, B)
        idx = _selection.subnetwork(self.subnetwork_indices, self.num_params, ref.device)
        cap = self.capability(what) if cap is None else cap
        call = Call(
            curv=self,
            what=what,
            cap=cap,
            x=x,
            inp=None,
            y=y,
            B=B,
            N=n_data if n_data is not None else B,
            generator=opts.get("generator"),
            num_samples=opts.get("num_samples", getattr(self, "num_samples", 1)),
            stochastic=bool(getattr(self, "stochastic", False)),
            kfac_approx=opts.get("kfac_approx", self.kfac_approx),
            enable_backprop=bool(opts.get("enable_backprop", False)),
            idx=idx,
            options={k: v for k, v in opts.items() if k in _OWN_OPTIONS},
        )
        self._check_capability(call, x)
        self._check_memory(call, None)
        if cap.memory in _memory.USES_C:  # the estimate changes once C is known
            call.after_forward.append(lambda c, f: self._check_memory(c, f))
        return call

    def _run(self, call: Call, hook) -> Any:
        """Steps 5–6 for the first part: the hook inside the hygiene context."""
        with self._hygiene(call):
            call.inp = self._features(call)
            return hook(call)

    def _features(self, call: Call) -> Any:
        """The input of ``_model``: ``x`` itself, or the last-layer features (with their graph
        when ``enable_backprop``)."""
        x = call.x
        if not self.last_layer:
            return dict(x) if isinstance(x, Mapping) else x
        with torch.set_grad_enabled(call.enable_backprop):
            try:
                _, phi = self.model.forward_with_features(x)
            except Exception as err:
                raise InputError(
                    f"forward_with_features failed on the input ({_inputs.describe(x)}): "
                    f"{type(err).__name__}: {err}"
                ) from err
        return phi if call.enable_backprop else phi.detach()

    # -- public API ---------------------------------------------------------------------
    def jacobians(
        self, x: Any, enable_backprop: bool = False, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        r"""Per-sample Jacobians :math:`J_n = \partial f_n / \partial\theta`.

        Parameters
        ----------
        x : Tensor or dict
            Input batch.
        enable_backprop : bool, default False
            Keep the graph, so that ``Js`` and ``f`` can be differentiated w.r.t. ``x``.

        Returns
        -------
        Js : Tensor
            ``(B, C, P)`` (``(B, ..., C, P)`` for outputs with positions), restricted to
            ``subnetwork_indices`` if given.
        f : Tensor
            ``(B, C)`` model output.
        """
        call = self._begin(
            "jacobians", x, kwargs={**kwargs, "enable_backprop": enable_backprop}, need_y=False
        )
        Js, f = self._run(call, self._jacobians)
        Js = call.select(Js)
        self._finite("Jacobians", Js)
        return (Js, f) if enable_backprop else (Js.detach(), f.detach())

    def functorch_jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """The Jacobians by curvlib's torch.func implementation, whatever the backend."""
        call = self._begin(
            "jacobians",
            x,
            kwargs={"enable_backprop": enable_backprop},
            need_y=False,
            cap=SHARED_JACOBIANS,
        )
        Js, f = self._run(call, lambda c: CurvatureInterface._jacobians(self, c))
        Js = call.select(Js)
        return (Js, f) if enable_backprop else (Js.detach(), f.detach())

    def last_layer_jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """Jacobians ``(Js (B, C, P_last), f (B, C))`` w.r.t. the last layer's parameters.

        The model must expose ``last_layer`` and ``forward_with_features``; the subnetwork
        does not apply. With ``enable_backprop`` the features keep their graph to ``x``.
        """
        for attr in ("last_layer", "forward_with_features"):
            if not hasattr(self.model, attr):
                raise InputError(f"last_layer_jacobians needs a model with `{attr}`")
        saved = (self.last_layer, self.subnetwork_indices)
        self.last_layer, self.subnetwork_indices = True, None
        try:
            return self.jacobians(x, enable_backprop)
        finally:
            self.last_layer, self.subnetwork_indices = saved

    def gradients(self, x: Any, y: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Per-sample gradients of the terms of ``lossfunc`` (without ``factor``).

        Returns
        -------
        Gs : Tensor
            ``(B, P)``: row ``n`` is the gradient of data point ``n``'s term of ``lossfunc``
            (summed over its positions).
        loss : Tensor
            ``lossfunc(f, y)``, the sum of those terms (without ``factor``), detached.
        """
        call = self._begin("gradients", x, y, kwargs=kwargs)
        Gs, loss = self._run(call, self._gradients)
        Gs = call.select(Gs)
        self._finite("per-sample gradients", Gs)
        return Gs.detach(), loss.detach()

    def full(
        self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """The dense curvature ``(loss, H (P, P))``.

        Parameters
        ----------
        x, y : the batch (``y`` may be inside a dict ``x``)
        N : int, optional
            Number of data points of the data set (checked; dense sums do not use it).
        **kwargs
            Per-call options with their constructor meaning: ``generator`` (a
            ``torch.Generator``, or one per data point, for the MC draws), ``num_samples`` (or
            its alias ``mc_samples``) and ``kfac_approx``; any other keyword is a
            ``TypeError`` naming it.

        Returns
        -------
        loss : Tensor
            The detached batch loss ``factor * lossfunc(f, y)``.
        H : Tensor
            ``(P, P)`` (restricted to ``subnetwork_indices``).
        """
        call = self._begin("full", x, y, N, kwargs)
        return self._finish(call, *self._run(call, self._full))

    def diag(
        self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """The diagonal of the curvature ``(loss, h (P,))``; arguments as :meth:`full`."""
        call = self._begin("diag", x, y, N, kwargs)
        return self._finish(call, *self._run(call, self._diag))

    def kron(self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any):
        r"""K-FAC ``(loss, Kron)`` on a batch of ``M`` out of ``N`` data points.

        One entry per selected parameter tensor: ``[G, A]`` for a weight of shape
        ``(out, *rest)`` with block :math:`G \otimes A`, ``[G]`` for a bias (see
        :mod:`curvlib.kfac.rules` for other layouts). Summing the results over batches
        that partition the data gives :math:`G = \sum g g^\top` and
        :math:`A = \frac1N \sum a a^\top`.

        Parameters
        ----------
        x, y : the batch
        N : int, optional
            Number of data points of the data set (at least the batch size; default it).
        **kwargs
            Per-call options, as for :meth:`full`.
        """
        call = self._begin("kron", x, y, N, kwargs)
        return self._finish(call, *self._run(call, self._kron))

    def ekfac(self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any):
        r"""Eigenvalue-corrected K-FAC ``(loss, EKFAC)`` (George et al., NeurIPS 2018).

        The eigenbases :math:`U_1, U_2` of this backend's K-FAC factors of every entry
        (``kfac_approx`` applies) and the corrected eigenvalues
        :math:`s = \sum_{n,k} (U_1^\top D_{n,k} U_2)^{\circ 2}`, :math:`D_{n,k}` the per-sample
        product of the parameter (the gradient for the EF) reshaped like the entry: the
        diagonal of the exact curvature block in the Kronecker eigenbasis
        (:mod:`curvlib.structured`). For one datum and one column it is the exact block.

        Parameters
        ----------
        x, y, N : as :meth:`kron`
        **kwargs
            As :meth:`kron`, and ``basis``: an :class:`~curvlib.EKFAC` or
            :class:`~curvlib.KronDecomposed` whose eigenbases to use (then only the
            eigenvalues of this batch are computed: summed over batches, they give the
            data set's; :func:`curvlib.fit` does this in a second pass).
        """
        call = self._begin("ekfac", x, y, N, kwargs)
        return self._finish(call, *self._run(call, self._ekfac))

    def blocks(self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any):
        r"""The exact curvature block of every layer ``(loss, BlockDiag)``.

        A layer is a module owning selected parameters (its own, ``recurse=False``); its
        block is :math:`C[I_l, I_l]` (``P_l × P_l``), built from that layer's per-sample
        products only (for the Hessian, from Hessian-vector products in the layer's
        directions), never the ``P × P`` matrix. Blocks are in parameter order and named by
        the module path. Arguments as :meth:`full`.
        """
        call = self._begin("blocks", x, y, N, kwargs)
        return self._finish(call, *self._run(call, self._blocks))

    def lowrank(self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any):
        r"""The top-``k`` eigenpairs of the curvature plus a remainder ``(loss, LowRank)``.

        Lanczos with full reorthogonalization (:func:`curvlib.lanczos`) on curvlib's
        operator of the batch (every backend), :math:`C \approx U \Lambda U^\top + R`.

        Parameters
        ----------
        x, y, N : the batch (``N`` checked only)
        **kwargs
            ``k`` (default 10, at most ``P``), ``remainder`` (``"diag"``: the exact diagonal
            minus the low rank's, so that the diagonal is exact; ``"scalar"``: the remaining
            trace spread over the ``P - k`` other directions; ``None``: zero; default
            ``"diag"``), ``num_iters`` (Lanczos steps, default ``min(P, 2k + 20)``), ``seed``
            (the start vector's, default 0), and the MC options of :meth:`full`.
        """
        call = self._begin("lowrank", x, y, N, kwargs)
        return self._finish(call, *self._run(call, self._lowrank))

    def operator(self, x: Any = None, y: Tensor | None = None, **kwargs: Any):
        """Matrix-free curvature operator ``v -> C v`` on a batch, or over a DataLoader.

        See :func:`curvlib.linops.curvature_operator` for the options.
        """
        from curvlib.linops import curvature_operator

        unknown = sorted(set(kwargs) - set(OPERATOR_OPTIONS))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.operator() got unexpected keyword(s) {unknown}; "
                f"accepted: {sorted(('x', 'y') + OPERATOR_OPTIONS)}"
            )
        return curvature_operator(self, x, y, **kwargs)

    def accumulator(self, structure: str, **kwargs: Any):
        """A mergeable accumulator of ``structure`` over batches, shards and ranks.

        See :class:`curvlib.data.Accumulator`.
        """
        from curvlib.data import Accumulator

        return Accumulator(self, structure, **kwargs)

    # -- default hooks: curvlib's shared implementations ---------------------------------
    def _cotangents(self, call: Call, f: Tensor, y: Tensor | None, generator: Any) -> Tensor:
        """Output-space cotangents of the curvature (overridden per curvature)."""
        raise CapabilityError(f"{type(self).__name__} has no output-space cotangents")

    def _jacobians(self, call: Call) -> tuple[Tensor, Tensor]:
        """Jacobians by torch.func (or batched reverse mode), ``(B, *out, P)``."""
        f = call.forward(grad=call.enable_backprop)
        out = f.shape[1:]
        K = int(f[0].numel())
        eye = torch.eye(K, dtype=f.dtype, device=f.device).reshape(K, *out)
        cot = eye.expand(f.shape[0], *eye.shape)
        V = _autodiff.per_sample_vjps(
            self._model,
            self.params,
            call.inp,
            cot,
            detach=not call.enable_backprop,
            model_key=self.model,
        )
        return V.reshape(f.shape[0], *out, -1), f

    def _gradients(self, call: Call) -> tuple[Tensor, Tensor]:
        """Per-sample gradients of the terms of ``lossfunc`` by torch.func."""
        f = call.forward(grad=False)
        cot = self.lik.ef_cotangents(f, call.y) / self.factor
        V = _autodiff.per_sample_vjps(self._model, self.params, call.inp, cot, model_key=self.model)
        return V[:, 0], call.loss(f) / self.factor

    def _matmat(self, call: Call, V: Tensor, cot: Tensor | None, create_graph: bool) -> Tensor:
        """``C_batch @ V`` for ``V (P, K)``: curvlib's shared torch.func products
        (:func:`curvlib.linops.shared_matmat`); ``cot``: the MC Fisher's fixed draws."""
        from curvlib.linops import shared_matmat

        return shared_matmat(self, call, V, cot, create_graph)

    def _full(self, call: Call) -> tuple[Tensor, Tensor]:
        raise self._unsupported("full")

    def _diag(self, call: Call) -> tuple[Tensor, Tensor]:
        raise self._unsupported("diag")

    def _kron(self, call: Call):
        """K-FAC from the rule table (:mod:`curvlib.kfac`), every parameter covered
        (:meth:`~curvlib.kfac.LayerPass.kron`: the cotangent columns streamed)."""
        from curvlib.kfac import LayerPass
        from curvlib.kron import Kron

        lp = LayerPass(self._model, self.params)
        f, factors = lp.kron(
            lambda: call.forward(),
            lambda f: call.cotangents(f),
            self._generic_products_for(call.inp),
            call.N,
            call.kfac_approx,
        )
        return call.loss(f), Kron(factors)

    def _ekfac(self, call: Call):
        """The backend's K-FAC for the eigenbases, curvlib's per-layer products for ``s``."""
        from curvlib.structured import ekfac

        return ekfac(self, call)

    def _blocks(self, call: Call):
        """Blocks from the per-sample products of the curvature (per curvature class)."""
        raise self._unsupported("blocks")

    def _lowrank(self, call: Call):
        from curvlib.structured import lowrank

        return lowrank(self, call)

    def _generic_products_for(self, inp: Any):
        """``(params, cot) -> (B, K, P_sub)`` by torch.func, for parameters without rules."""

        def products(params: list[Tensor], cot: Tensor) -> Tensor:
            return _autodiff.per_sample_vjps(self._model, params, inp, cot, model_key=self.model)

        return products


# the curvatures subclass the interface; importable from here as before
from curvlib.curvatures import EFInterface, GGNInterface, HessianInterface  # noqa: E402
