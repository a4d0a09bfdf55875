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

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvlib import _autodiff, _inputs, _memory, _selection
from curvlib._call import Call
from curvlib._hygiene import differentiable_kernels, preserved_model
from curvlib.capabilities import (
    STRUCTURES,
    Capability,
    Problem,
    dynamic_problems,
    row,
    static_problems,
)
from curvlib.errors import (
    CapabilityError,
    InputError,
    NonFiniteError,
    SharedParameterError,
    UnsupportedModuleError,
)
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

KFAC_APPROX = ("expand", "reduce")

#: per entry point, the keywords a call accepts besides ``x``, ``y`` and ``N``
CALL_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "full": ("generator", "num_samples", "mc_samples", "kfac_approx"),
    "diag": ("generator", "num_samples", "mc_samples", "kfac_approx"),
    "kron": ("generator", "num_samples", "mc_samples", "kfac_approx"),
    "jacobians": ("enable_backprop",),
    "gradients": (),
    "operator": (),
}
#: the options of :meth:`CurvatureInterface.operator`
OPERATOR_OPTIONS = (
    "data",
    "num_curv_samples",
    "num_total_samples",
    "generator",
    "progress",
    "create_graph",
    "chunk_size",
)
#: the row of curvlib's shared torch.func Jacobians (``functorch_jacobians``)
SHARED_JACOBIANS = Capability(
    impl="shared", memory="BCP", differentiable=True, note="torch.func vjp"
)
_CONSTRUCTOR = (
    "model",
    "likelihood",
    "last_layer",
    "subnetwork_indices",
    "dict_key_x",
    "dict_key_y",
)


class _Structures:
    """``cls.structures`` / ``obj.structures``: the structures in the capability table."""

    def __get__(self, obj: Any, cls: type) -> tuple[str, ...]:
        if obj is None:
            key = "fisher" if getattr(cls, "_stochastic_default", False) else None
            return cls.structures_of(key)
        return cls.structures_of(obj.curvature_key())


class CurvatureInterface:
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

    @classmethod
    def capability_row(cls, curvature: str | None = None) -> Mapping[str, Capability]:
        """This backend's rows of the capability table (:mod:`curvlib.capabilities`)."""
        return row(cls.backend_name, curvature or cls.curvature_name())

    @classmethod
    def structures_of(cls, curvature: str | None = None) -> tuple[str, ...]:
        """The structures this class computes, from the capability table."""
        rows = cls.capability_row(curvature)
        return tuple(s for s in STRUCTURES if s in rows)

    structures = _Structures()

    def capability(self, what: str) -> Capability:
        """The row for ``what``; :class:`CapabilityError` if the backend lacks it."""
        rows = self.capability_row(self.curvature_key())
        if what not in rows:
            raise self._unsupported(what)
        return rows[what]

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
        accepted = CALL_OPTIONS[what]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.{what}() got unexpected keyword(s) {unknown}; accepted: "
                f"{sorted((('x', 'y', 'N') if what in STRUCTURES else ('x',)) + accepted)}"
            )
        opts = dict(kwargs)
        if "mc_samples" in opts:
            if "num_samples" in opts:
                raise TypeError("pass num_samples or mc_samples (the same option), not both")
            opts["num_samples"] = opts.pop("mc_samples")
        if "num_samples" in opts:
            opts["num_samples"] = _inputs.check_positive_int("num_samples", opts["num_samples"])
        if opts.get("kfac_approx", "expand") not in KFAC_APPROX:
            raise InputError(
                f"kfac_approx must be one of {KFAC_APPROX}, got {opts['kfac_approx']!r}"
            )
        gen = opts.get("generator")
        if gen is not None and not isinstance(gen, torch.Generator):
            if not (isinstance(gen, Sequence) and all(isinstance(g, torch.Generator) for g in gen)):
                raise InputError(
                    "generator must be a torch.Generator (or one per data point), got "
                    f"{type(gen).__name__}"
                )
        return opts

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
        )
        self._check_capability(call, x)
        self._check_memory(call, None)
        call.after_forward.append(lambda c, f: self._check_memory(c, f))
        return call

    def _check_capability(self, call: Call, x: Any) -> None:
        """Step 3: the call-level and module-level checks of the capability row."""
        cap, what = call.cap, call.what
        name = self.curvature_key()
        if self.likelihood not in cap.likelihoods:
            raise CapabilityError(
                f"backend {self.backend_name!r} computes {what!r} of {name!r} only for the "
                f"likelihoods {list(cap.likelihoods)}, got {self.likelihood!r}"
            )
        if isinstance(x, Mapping) and not cap.dict_inputs:
            raise CapabilityError(
                f"backend {self.backend_name!r} does not support dict inputs for {what!r} "
                f"({cap.note}); backends that do: {self._others(what, dict_inputs=True)}"
            )
        if what == "kron":
            if call.idx is not None:
                raise CapabilityError(
                    "the kron structure does not support subnetwork_indices; use diag or full"
                )
            if call.kfac_approx not in cap.kfac_approx:
                raise CapabilityError(
                    f"backend {self.backend_name!r} computes only the {list(cap.kfac_approx)} "
                    f"K-FAC, not kfac_approx={call.kfac_approx!r}; backends that do: "
                    f"{self._others('kron', kfac=call.kfac_approx)}"
                )
        if call.enable_backprop and not cap.differentiable:
            raise CapabilityError(
                f"backend {self.backend_name!r} computes Jacobians that are not differentiable "
                f"({cap.note}); for enable_backprop=True use functorch_jacobians or backend "
                "'autograd'"
            )
        problems = self.problems(what, cap)
        if problems:
            raise self._problem_error(problems[0], what)

    def problems(self, what: str, cap: Capability | None = None) -> list[Problem]:
        """Everything the capability row of ``what`` refuses on the model (static checks)."""
        from curvlib.kfac import rule_for

        cap = self.capability(what) if cap is None else cap

        def by_rules(m: nn.Module) -> bool:
            rule = rule_for(m)
            return rule is not None and not rule.problem(m)

        return static_problems(cap, self._model, self.params, by_rules)

    def _dynamic_check(self, call: Call, records: Any, f: Tensor) -> None:
        """The checks of the row that need the forward pass just recorded."""
        problems = dynamic_problems(call.cap, self._model, self.params, records, f)
        if problems:
            raise self._problem_error(problems[0], call.what)

    def _problem_error(self, p: Problem, what: str) -> Exception:
        names = []
        if p.module is not None:
            names = [n for n, q in p.module.named_parameters(recurse=False) if q.requires_grad]
        cls = SharedParameterError if p.kind == "shared" else UnsupportedModuleError
        return cls(
            f"backend {self.backend_name!r} cannot compute the {what!r} structure of "
            f"{self.curvature_key()!r} for {p.where()}"
            + (f" ({p.reason})" if p.kind != "type" else "")
            + (f" with parameters {names}" if names else "")
            + f"; backends that support it: {self._others(what, model=True) or 'none'}"
            + (" (or freeze its parameters / use last_layer=True)" if names else "")
        )

    def _others(
        self, what: str, model: bool = False, dict_inputs: bool = False, kfac: str | None = None
    ) -> list[str]:
        """Other backends whose row for ``what`` accepts this call (static checks only)."""
        from curvlib.backends import registry

        out = []
        for name in registry():
            if name == self.backend_name:
                continue
            cap = row(name, self.curvature_key()).get(what)
            if cap is None or (dict_inputs and not cap.dict_inputs):
                continue
            if kfac is not None and kfac not in cap.kfac_approx:
                continue
            if model:
                from curvlib.kfac import rule_for

                if static_problems(
                    cap, self._model, self.params, lambda m: rule_for(m) is not None
                ):
                    continue
            out.append(name)
        return out

    def _sizes(self, call: Call, f: Tensor | None) -> _memory.Sizes:
        from curvlib.kfac.compute import kron_entries

        P = self.num_params
        return _memory.Sizes(
            P=P,
            P_s=P if call.idx is None else int(call.idx.numel()),
            B=call.B,
            C=None if f is None else int(f[0].numel()),
            kron_entries=kron_entries(self._model, self.params) if call.cap.memory == "kron" else 0,
            layer_blocks=_layer_blocks(self._model, self.params)
            if call.cap.memory == "layer_blocks"
            else 0,
        )

    def _check_memory(self, call: Call, f: Tensor | None) -> None:
        """Step 4: the size estimate of the row's memory model against the limit."""
        ref = self.params[0]
        limit = _memory.limit_of(self.memory_limit, ref.device)
        if limit[0] is None:
            return
        sizes = self._sizes(call, f)
        alts = [(s, c.memory) for s, c in self.capability_row(self.curvature_key()).items()]
        _memory.check(
            call.what, call.cap.memory, sizes, ref.element_size(), limit, alts, self.curvature_key()
        )

    @contextmanager
    def _hygiene(self, call: Call):
        """Step 5's context: the model and the global RNG as they were, also on error.

        An MC call without a generator draws one seed from the global RNG (advancing it as
        any torch sampling does) and samples from a generator seeded with it; if the call
        fails, the global RNG is put back as it was before.
        """
        state = None
        if call.stochastic and call.generator is None and call.what in STRUCTURES:
            state = torch.get_rng_state()
            seed = int(torch.randint(0, 2**62, (1,)).item())
            call.generator = torch.Generator().manual_seed(seed)
        try:
            with preserved_model(self.model), differentiable_kernels():
                yield
        except BaseException:
            if state is not None:
                torch.set_rng_state(state)
            raise

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

    @staticmethod
    def _finite(what: str, t: Tensor) -> None:
        """Step 6: a NaN or infinity in a result is an error, never a silent return."""
        if t.is_meta or bool(torch.isfinite(t).all()):
            return
        raise NonFiniteError(
            f"the {what} contains NaN or infinite values although inputs, outputs and loss are "
            "finite (an overflow inside the model or the curvature); compute in float64 or "
            "rescale the model"
        )

    def _finish(self, call: Call, loss: Tensor, result: Any) -> tuple[Tensor, Any]:
        """Step 6: finiteness of loss and result, subnetwork selection, the reported loss."""
        self._finite("loss", loss)
        if call.what == "diag":
            result = call.select(result)
        if isinstance(result, Tensor):
            self._finite(f"{call.what} {self.curvature_key()} result", result)
        else:
            for F_ in (f for fs in result.kfacs for f in fs):
                self._finite("kron result", F_)
        return loss.detach(), result

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
        """K-FAC from the rule table (:mod:`curvlib.kfac`), every parameter covered."""
        from curvlib.kfac import LayerPass
        from curvlib.kron import Kron

        lp = LayerPass(self._model, self.params)
        f = lp.run(
            lambda: call.forward(),
            lambda f: call.cotangents(f),
            self._generic_products_for(call.inp),
        )
        return call.loss(f), Kron(lp.factors(call.N, call.kfac_approx))

    def _generic_products_for(self, inp: Any):
        """``(params, cot) -> (B, K, P_sub)`` by torch.func, for parameters without rules."""

        def products(params: list[Tensor], cot: Tensor) -> Tensor:
            return _autodiff.per_sample_vjps(self._model, params, inp, cot, model_key=self.model)

        return products

    def _unsupported(self, structure: str) -> CapabilityError:
        from curvlib.backends import backends_supporting

        others = [
            b
            for b in backends_supporting(self.curvature_key(), structure)
            if b != self.backend_name
        ]
        return CapabilityError(
            f"backend {self.backend_name!r} cannot compute the {structure!r} structure of "
            f"{self.curvature_key()!r}; backends that can: {others or 'none'}; structures "
            f"{self.backend_name!r} offers for it: {list(self.structures)}"
        )


def _layer_blocks(root: nn.Module, params: list[Tensor]) -> int:
    """``sum_l P_l^2`` over the modules owning selected parameters (ASDL's Hessian diagonal)."""
    sel = {id(p) for p in params}
    total = 0
    for m in root.modules():
        n = sum(p.numel() for p in m.parameters(recurse=False) if id(p) in sel)
        total += n * n
    return total


class GGNInterface(CurvatureInterface):
    r"""Generalized Gauss-Newton :math:`\sum_n J_n^\top \Lambda(f_n) J_n`, or with
    ``stochastic=True`` the Monte-Carlo Fisher, which replaces :math:`\Lambda` by the mean of
    :math:`\tilde g \tilde g^\top` over ``num_samples`` pseudo-targets drawn from the model's
    predictive (unbiased for the GGN).

    Parameters
    ----------
    stochastic : bool, default False
        MC Fisher instead of the exact GGN.
    num_samples : int, default 1
        Number of MC samples per data point.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        last_layer: bool = False,
        subnetwork_indices: Tensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, **options
        )
        self.stochastic = bool(stochastic)
        self.num_samples = _inputs.check_positive_int("num_samples", num_samples)

    @classmethod
    def curvature_name(cls) -> str:
        return "ggn"

    def _cotangents(self, call: Call, f: Tensor, y: Tensor | None, generator: Any) -> Tensor:
        if call.stochastic:
            return self.lik.mc_cotangents(f, call.num_samples, generator, y)
        return self.lik.sqrt_cotangents(f, y)

    def _full(self, call: Call) -> tuple[Tensor, Tensor]:
        r""":math:`\sum_n J_n^\top M_n J_n` from the backend's Jacobians."""
        Js, f = self._jacobians(call)
        cot = call.cotangents(f)
        V = torch.einsum(
            "bkc,bcp->bkp", cot.flatten(2), call.select(Js.reshape(Js.shape[0], -1, Js.shape[-1]))
        )
        V = V.flatten(0, 1)
        return call.loss(f), V.T @ V

    def _diag(self, call: Call) -> tuple[Tensor, Tensor]:
        Js, f = self._jacobians(call)
        cot = call.cotangents(f)
        V = torch.einsum("bkc,bcp->bkp", cot.flatten(2), Js.reshape(Js.shape[0], -1, Js.shape[-1]))
        return call.loss(f), V.pow(2).sum((0, 1))


class EFInterface(CurvatureInterface):
    r"""Empirical Fisher :math:`\sum_n g_n g_n^\top`, :math:`g_n` the gradient of data point
    ``n``'s term of the reported loss ``factor * lossfunc`` (summed over its positions).

    For classification this equals laplace-torch's EF. For regression it is **half** of what
    laplace-torch's backends return (they square the gradient of the unscaled MSE and
    multiply by 1/2 once); curvlib returns the consistent value, and the laplace-torch
    adapter reproduces laplace-torch's numbers.
    """

    @classmethod
    def curvature_name(cls) -> str:
        return "ef"

    def _cotangents(self, call: Call, f: Tensor, y: Tensor | None, generator: Any) -> Tensor:
        return self.lik.ef_cotangents(f, y)

    def _full(self, call: Call) -> tuple[Tensor, Tensor]:
        G, loss = self._gradients(call)
        G = call.select(G) * self.factor
        return loss * self.factor, G.T @ G

    def _diag(self, call: Call) -> tuple[Tensor, Tensor]:
        G, loss = self._gradients(call)
        return loss * self.factor, (G * self.factor).pow(2).sum(0)


class HessianInterface(CurvatureInterface):
    r"""Hessian :math:`\nabla^2_\theta` of the reported loss ``factor * lossfunc``.

    The shared hooks build rows of the Hessian from Hessian-vector products (forward over
    reverse, or double backward where an op lacks a forward derivative), a chunk of unit
    vectors at a time: ``full`` stacks them, ``diag`` keeps one entry of each.
    """

    @classmethod
    def curvature_name(cls) -> str:
        return "hessian"

    def _hessian_rows(self, call: Call, keep) -> tuple[Tensor, Tensor]:
        f = call.forward(grad=False)
        params = self.params
        fn = _autodiff.functional(self._model, params)
        values = [p.detach() for p in params]
        P = sum(p.numel() for p in params)
        ref = params[0]

        def loss_fn(vals: Sequence[Tensor]) -> Tensor:
            return self.lik.loss(fn(vals, call.inp), call.y)

        rows_idx = torch.arange(P, device=ref.device) if call.idx is None else call.idx
        chunk = max(1, 2**24 // max(1, P))
        parts = []
        for start in range(0, rows_idx.numel(), chunk):
            sel = rows_idx[start : start + chunk]
            E = torch.zeros(sel.numel(), P, dtype=ref.dtype, device=ref.device)
            E[torch.arange(sel.numel()), sel] = 1
            parts.append(keep(_autodiff.hvp(loss_fn, values, E, self.model), sel))
        return call.loss(f), torch.cat(parts)

    def _full(self, call: Call) -> tuple[Tensor, Tensor]:
        loss, H = self._hessian_rows(call, lambda rows, sel: call.select(rows))
        return loss, (H + H.T) / 2

    def _diag(self, call: Call) -> tuple[Tensor, Tensor]:
        loss, d = self._hessian_rows(call, lambda rows, sel: rows[torch.arange(sel.numel()), sel])
        if call.idx is None:
            return loss, d
        # the template selects the subnetwork from the full-length diagonal
        return loss, d.new_zeros(self.num_params).index_copy_(0, call.idx, d)
