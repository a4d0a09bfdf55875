r"""The curvature interface: a drop-in for laplace-torch 0.3's ``laplace.curvature``.

:class:`CurvatureInterface` holds everything backends share: the likelihood, parameter
selection (frozen parameters, last layer, subnetwork), input handling (tensors and
HuggingFace-style dicts), validation before any work, and the torch.func Jacobians and
per-sample gradients. :class:`GGNInterface` and :class:`EFInterface` add the dense ``full``
and ``diag`` built from those Jacobians (:math:`\sum_n J_n^\top M_n J_n`) and gradients
(:math:`\sum_n g_n g_n^\top`). A backend overrides only what its library does better.

Shapes: ``B`` batch, ``C`` outputs, ``P`` selected parameters (those with
``requires_grad=True`` in ``model.parameters()`` order, each flattened row-major; only the
last layer's with ``last_layer=True``; only ``subnetwork_indices`` of that vector if given).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from curvlib.errors import (
    CapabilityError,
    InputError,
    NonFiniteError,
    TargetError,
    UnsupportedModuleError,
)
from curvlib.likelihood import Likelihood, get_likelihood

__all__ = [
    "CurvatureInterface",
    "GGNInterface",
    "EFInterface",
    "STRUCTURES",
    "KFAC_APPROX",
    "preserved_model",
]

STRUCTURES = ("full", "diag", "kron")
KFAC_APPROX = ("expand", "reduce")

# Modules whose training-mode forward couples samples or draws random numbers.
_TRAIN_MODE_MODULES = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)

# Upper bound on the number of entries of one per-sample product tensor (B, K, P) held at
# once; larger batches are processed in chunks.
_CHUNK_ENTRIES = 2**25


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
    saved_mods = []
    for m in modules:
        attrs = dict(m.__dict__)
        containers = {k: list(v.items()) for k, v in attrs.items() if isinstance(v, dict)}
        saved_mods.append((m, attrs, containers))
    params = list(model.parameters())
    saved_params = [(p, dict(p.__dict__), p.grad, p.requires_grad) for p in params]
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
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
            for m, attrs, containers in saved_mods:
                for k in set(m.__dict__) - set(attrs):
                    del m.__dict__[k]
                for k, v in attrs.items():
                    if m.__dict__.get(k) is not v:
                        m.__dict__[k] = v
                for k, items in containers.items():
                    d = m.__dict__[k]
                    now = list(d.items())
                    same = len(now) == len(items) and all(
                        k1 == k2 and v1 is v2 for (k1, v1), (k2, v2) in zip(now, items, strict=True)
                    )
                    if not same:
                        d.clear()
                        d.update(items)
            for p, attrs, grad, requires_grad in saved_params:
                for k in set(p.__dict__) - set(attrs):
                    delattr(p, k)
                for k, v in attrs.items():
                    if p.__dict__.get(k) is not v:
                        p.__dict__[k] = v
                p.requires_grad_(requires_grad)
                p.grad = grad


class CurvatureInterface:
    """Curvature of ``factor * lossfunc`` of a model w.r.t. its selected parameters.

    Parameters
    ----------
    model : torch.nn.Module
        The network. With ``last_layer=True`` it must expose ``last_layer`` (the module whose
        parameters are used) and ``forward_with_features(x) -> (f, features)``, as
        laplace-torch's ``FeatureExtractor`` does.
    likelihood : {"classification", "regression"} or Likelihood
        See :mod:`curvlib.likelihood` for the conventions.
    last_layer : bool, default False
        Use only the last layer's parameters; the features are treated as fixed inputs.
    subnetwork_indices : torch.LongTensor, optional
        Indices into the flat vector of selected parameters; results are restricted to them.
        Read at call time, so it may be set after construction (laplace-torch does).
    dict_key_x, dict_key_y : str
        For dict (HuggingFace-style) inputs: the key holding the batched input tensor (used to
        read the batch size) and the key of the targets when ``y`` is not given.
    **backend_options
        ``kfac_approx`` (``"expand"`` or ``"reduce"``, the weight-sharing K-FAC variant) and
        options specific to a backend.

    Attributes
    ----------
    model, likelihood (the name), last_layer, subnetwork_indices, lossfunc, factor,
    params, params_dict, buffers_dict
    """

    #: name of the backend in the registry (``curvlib.backend_class``).
    backend_name: ClassVar[str] = "base"
    #: structures this class computes.
    structures: ClassVar[tuple[str, ...]] = ()
    #: backend options accepted by the constructor besides ``kfac_approx``.
    extra_options: ClassVar[tuple[str, ...]] = ()
    #: per structure, the module types the backend handles (``None``: any differentiable
    #: module). Checked before any work by :meth:`_check_modules`.
    supported_modules: ClassVar[dict[str, tuple[type[nn.Module], ...] | None]] = {}
    #: whether every leaf module must be supported (libraries that propagate quantities
    #: module by module, like BackPACK), or only the modules owning selected parameters;
    #: a tuple names the structures for which every leaf is checked.
    check_all_leaves: ClassVar[bool | tuple[str, ...]] = False

    @classmethod
    def checks_all_leaves(cls, structure: str) -> bool:
        """Whether ``structure`` needs every leaf module supported (not only param owners)."""
        flag = cls.check_all_leaves
        return flag is True or (isinstance(flag, tuple) and structure in flag)

    #: likelihoods the backend handles.
    likelihoods: ClassVar[tuple[str, ...]] = ("classification", "regression")
    #: whether dict (HuggingFace-style) inputs are supported.
    dict_inputs: ClassVar[bool] = True
    #: weight-sharing K-FAC variants the backend computes.
    kfac_approximations: ClassVar[tuple[str, ...]] = KFAC_APPROX

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        last_layer: bool = False,
        subnetwork_indices: Tensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        **backend_options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.lik = get_likelihood(likelihood)
        self.model = model
        self.likelihood = self.lik.name
        self.lossfunc = self.lik.lossfunc
        self.factor = self.lik.factor
        self.last_layer = bool(last_layer)
        self.subnetwork_indices = subnetwork_indices
        self.dict_key_x = dict_key_x
        self.dict_key_y = dict_key_y
        kfac_approx = backend_options.pop("kfac_approx", "expand")
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}, got {kfac_approx!r}")
        self.kfac_approx = kfac_approx
        unknown = set(backend_options) - set(self.extra_options)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown options {sorted(unknown)}; accepted: "
                f"{sorted(('kfac_approx',) + self.extra_options)}"
            )
        self.backend_options = backend_options
        if self.last_layer:
            for attr in ("last_layer", "forward_with_features"):
                if not hasattr(model, attr):
                    raise InputError(
                        f"last_layer=True needs a model with `{attr}` (e.g. laplace-torch's "
                        f"FeatureExtractor); {type(model).__name__} has none"
                    )

    # -- parameter selection ------------------------------------------------------------
    @property
    def _model(self) -> nn.Module:
        """The module whose parameters are differentiated (the last layer, or the model)."""
        if self.last_layer:
            layer = self.model.last_layer
            if layer is None:
                raise InputError("last_layer=True but model.last_layer is None (not found yet)")
            return layer
        return self.model

    @property
    def params_dict(self) -> dict[str, Tensor]:
        """Selected parameters by name, in ``parameters()`` order."""
        return {n: p for n, p in self._model.named_parameters() if p.requires_grad}

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

    def _check_params(self) -> None:
        ref = self._ref_param()
        if ref.dtype in (torch.float16, torch.bfloat16):
            raise InputError(
                f"the model's parameters are {ref.dtype}; curvature is accumulated in the "
                "model's dtype, which is too imprecise in half precision. Compute on a float32 "
                "or float64 copy (e.g. copy.deepcopy(model).float())"
            )
        for path, mod in self._model.named_modules():
            if mod.training and isinstance(mod, _TRAIN_MODE_MODULES):
                raise InputError(
                    f"module {path or '<root>'!r} ({type(mod).__name__}) is in training mode, "
                    "where its output depends on randomness or on the other samples of the "
                    "batch, so per-sample curvature is undefined; call model.eval() first"
                )
        if self.num_params == 0:
            raise InputError(
                f"{type(self.model).__name__} has no parameters with requires_grad=True"
                + (" in its last layer" if self.last_layer else "")
            )

    def _subnet(self) -> Tensor | None:
        idx = self.subnetwork_indices
        if idx is None:
            return None
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        P = self.num_params
        if idx.ndim != 1 or idx.dtype not in (torch.int32, torch.int64):
            raise InputError(
                "subnetwork_indices must be a 1-D tensor of integer indices (or a boolean "
                f"mask) into the {P} selected parameters, got shape {tuple(idx.shape)} "
                f"dtype {idx.dtype}"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= P):
            raise InputError(
                f"subnetwork_indices must lie in [0, {P - 1}], got values in "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        return idx.to(self.params[0].device)

    def _select(self, t: Tensor) -> Tensor:
        """Restrict the last dimension (parameters) of ``t`` to the subnetwork."""
        idx = self._subnet()
        return t if idx is None else t.index_select(-1, idx)

    def _select_full(self, H: Tensor) -> Tensor:
        idx = self._subnet()
        return H if idx is None else H[idx][:, idx]

    # -- inputs -------------------------------------------------------------------------
    def _ref_param(self) -> Tensor:
        p = next(iter(self.model.parameters()), None)
        if p is None:
            raise InputError(f"{type(self.model).__name__} has no parameters")
        return p

    def _batch_size(self, x: Any) -> int:
        if isinstance(x, Mapping):
            if self.dict_key_x not in x:
                raise InputError(
                    f"dict input has no key {self.dict_key_x!r} (dict_key_x); keys: {list(x)}"
                )
            return int(x[self.dict_key_x].shape[0])
        if not isinstance(x, Tensor):
            raise InputError(f"x must be a tensor or a dict of tensors, got {type(x).__name__}")
        if x.ndim == 0:
            raise InputError("x must have a batch dimension, got a 0-dim tensor")
        return int(x.shape[0])

    def _check_x(self, x: Any) -> int:
        """Check device and dtype of every input tensor against the model; return B."""
        B = self._batch_size(x)
        ref = self._ref_param()
        for leaf in tree_flatten(dict(x) if isinstance(x, Mapping) else x)[0]:
            if not isinstance(leaf, Tensor):
                continue
            if leaf.device != ref.device:
                raise InputError(
                    f"input is on {leaf.device} but the model is on {ref.device}; "
                    f"move it with x.to({str(ref.device)!r})"
                )
            if torch.is_floating_point(leaf) and leaf.dtype != ref.dtype:
                raise InputError(
                    f"input has dtype {leaf.dtype} but the model's parameters have dtype "
                    f"{ref.dtype}; convert with x.to({ref.dtype})"
                )
            if leaf.shape[:1] != (B,):
                raise InputError(
                    f"every input tensor must have batch size {B} first, got {tuple(leaf.shape)}"
                )
            # one cheap reduction first (NaN and inf propagate through a sum); the per-row
            # check only when it is not finite (or overflowed)
            if torch.is_floating_point(leaf) and leaf.numel() and not leaf.sum().isfinite():
                bad = ~torch.isfinite(leaf).reshape(B, -1).all(dim=1)
                if bad.any():
                    idx = bad.nonzero().flatten().tolist()
                    raise NonFiniteError(
                        f"the inputs contain NaN or infinite values at batch indices {idx[:10]}"
                        + (" ..." if len(idx) > 10 else "")
                    )
        if B == 0:
            raise InputError("the batch is empty (batch size 0)")
        return B

    def _check_y_early(self, y: Any, B: int) -> None:
        """Checks on the targets that need no forward pass (the rest: ``check_target``)."""
        if not isinstance(y, Tensor):
            raise TargetError(f"targets must be a tensor, got {type(y).__name__}")
        if y.ndim == 0 or y.shape[0] != B:
            raise TargetError(f"targets must have batch size {B} first, got shape {tuple(y.shape)}")
        ref = self._ref_param()
        if y.device != ref.device:
            raise TargetError(f"targets are on {y.device} but the model is on {ref.device}")

    def _targets(self, x: Any, y: Tensor | None) -> Tensor:
        if y is None and isinstance(x, Mapping) and self.dict_key_y in x:
            return x[self.dict_key_y]
        if y is None:
            raise TargetError("targets y are required")
        return y

    def _features(self, x: Any) -> Any:
        """The input of ``_model``: ``x`` itself, or the (fixed) last-layer features."""
        if not self.last_layer:
            if isinstance(x, Mapping):
                return dict(x)
            return x
        with torch.no_grad():
            _, phi = self.model.forward_with_features(x)
        return phi.detach()

    def _prepare(self, x: Any, y: Tensor | None = None, need_y: bool = True) -> tuple[Any, Any]:
        """Validate ``x`` (and ``y``) before any work; return ``(input of _model, y)``."""
        self._check_params()
        B = self._check_x(x)
        if need_y:
            y = self._targets(x, y)
            self._check_y_early(y, B)
        self._subnet()
        return self._features(x), y

    # -- torch.func machinery -----------------------------------------------------------
    def _functional(self, detach: bool = True) -> tuple[Callable, dict[str, Tensor]]:
        """``(fn, params)`` with ``fn(params, inp) == _model(inp)`` and the selected params."""
        module = self._model
        sel = self.params_dict
        params = {n: (p.detach() if detach else p) for n, p in sel.items()}
        rest = {n: p.detach() for n, p in module.named_parameters() if n not in sel}
        rest.update(dict(module.named_buffers()))

        def fn(p: dict[str, Tensor], inp: Any) -> Tensor:
            return torch.func.functional_call(module, {**rest, **p}, (inp,))

        return fn, params

    def _per_sample_vjps(self, inp: Any, cot: Tensor, detach: bool = True) -> Tensor:
        r"""Per-sample products :math:`V_{n,k} = J_n^\top c_{n,k}`, shape ``(B, K, P)``.

        One vmapped backward pass per sample and cotangent column (torch.func).
        """
        fn, params = self._functional(detach)

        def single(inp_n: Any, cot_n: Tensor) -> Tensor:
            inp_1 = tree_map(lambda t: t.unsqueeze(0), inp_n)
            _, vjp_fn = torch.func.vjp(lambda p: fn(p, inp_1).squeeze(0), params)
            (grads,) = torch.func.vmap(vjp_fn)(cot_n)
            return torch.cat([g.flatten(1) for g in grads.values()], dim=1)

        return torch.func.vmap(single)(inp, cot)

    def _forward(self, inp: Any, grad: bool = False) -> Tensor:
        with torch.set_grad_enabled(grad):
            f = self._model(inp)
        Likelihood.check_output(f)
        return f

    def _chunks(self, B: int, K: int) -> Iterator[slice]:
        """Batch slices such that a ``(b, K, P)`` tensor stays below the memory budget."""
        size = max(1, _CHUNK_ENTRIES // max(1, K * self.num_params))
        for start in range(0, B, size):
            yield slice(start, min(B, start + size))

    @staticmethod
    def _slice(inp: Any, s: slice) -> Any:
        return tree_map(lambda t: t[s] if isinstance(t, Tensor) else t, inp)

    # -- public API -----------------------------------------------------------------------
    def functorch_jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        r"""Per-sample Jacobians :math:`J_n = \partial f_n / \partial\theta` by torch.func.

        Returns
        -------
        Js : Tensor
            ``(B, C, P)``, restricted to ``subnetwork_indices`` if given.
        f : Tensor
            ``(B, C)`` model output.
        """
        inp, _ = self._prepare(x, need_y=False)
        f = self._forward(inp, grad=enable_backprop)
        eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
        Js = self._per_sample_vjps(inp, eye.expand(f.shape[0], -1, -1), detach=not enable_backprop)
        Js = self._select(Js)
        return (Js, f) if enable_backprop else (Js.detach(), f.detach())

    def jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians ``(Js (B, C, P), f (B, C))`` of the selected parameters."""
        return self.functorch_jacobians(x, enable_backprop)

    def last_layer_jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """Jacobians ``(Js (B, C, P_last), f (B, C))`` w.r.t. the last layer's parameters.

        The model must expose ``last_layer`` and ``forward_with_features``. The subnetwork
        selection does not apply.
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

    def gradients(self, x: Any, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample gradients of the terms of ``lossfunc`` (without ``factor``).

        Returns
        -------
        Gs : Tensor
            ``(B, P)``: row ``n`` is the gradient of ``lossfunc(f_n, y_n)``.
        loss : Tensor
            ``lossfunc(f, y)``, the sum of those terms (without ``factor``), detached.
        """
        inp, y = self._prepare(x, y)
        f = self._forward(inp)
        self.lik.check_target(f, y)
        Gs = self._per_sample_vjps(inp, self.lik.ef_cotangents(f, y))[:, 0] / self.factor
        return self._select(Gs), self.lossfunc(f, y).detach()

    def full(self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any):
        """Dense curvature ``(loss, H (P, P))``."""
        raise self._unsupported("full")

    def diag(self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any):
        """Diagonal of the curvature ``(loss, h (P,))``."""
        raise self._unsupported("diag")

    def kron(self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any):
        """Kronecker-factored curvature ``(loss, Kron)``."""
        raise self._unsupported("kron")

    def operator(self, x: Any = None, y: Tensor | None = None, **kwargs: Any):
        """Matrix-free curvature operator ``v -> C v`` on a batch, or over a DataLoader.

        See :func:`curvlib.linops.curvature_operator` for the options.
        """
        from curvlib.linops import curvature_operator

        return curvature_operator(self, x, y, **kwargs)

    def accumulator(self, structure: str, **kwargs: Any):
        """A mergeable accumulator of ``structure`` over batches, shards and ranks.

        See :class:`curvlib.data.Accumulator`.
        """
        from curvlib.data import Accumulator

        return Accumulator(self, structure, **kwargs)

    def _check_modules(self, structure: str) -> None:
        """Raise :class:`UnsupportedModuleError` for a module this backend cannot handle."""
        types = self.supported_modules.get(structure)
        if types is None:
            return
        owners = {id(p) for p in self.params}
        for path, mod in self._model.named_modules():
            if self.checks_all_leaves(structure):
                relevant = not list(mod.children())
            else:
                relevant = any(id(p) in owners for p in mod.parameters(recurse=False))
            if relevant and not isinstance(mod, types):
                raise self._unsupported_module(path, mod, structure)

    def _unsupported_module(
        self, path: str, module: nn.Module, structure: str, detail: str = ""
    ) -> UnsupportedModuleError:
        """The error for ``module`` at ``path``: names it, its parameters, and alternatives."""
        from curvlib.backends import backends_supporting_module

        names = [n for n, _ in module.named_parameters(recurse=False)]
        others = [
            b
            for b in backends_supporting_module(self.curvature_name(), structure, module)
            if b != self.backend_name
        ]
        return UnsupportedModuleError(
            f"backend {self.backend_name!r} cannot compute the {structure!r} structure for "
            f"module {path or '<root>'!r} of type {type(module).__name__}"
            + (f" ({detail})" if detail else "")
            + (f" with parameters {names}" if names else "")
            + f"; backends that support it: {others or 'none'}"
            + (
                " (or freeze its parameters / use last_layer=True)"
                if names and not self.checks_all_leaves(structure)
                else ""
            )
        )

    def _kron_num_data(self, x: Any, N: int | None) -> int:
        """Checks shared by every ``kron``: no subnetwork, and ``N`` (default: the batch size).

        Call it after the inputs were validated (``_prepare`` or ``_check_x``).

        Raises
        ------
        CapabilityError
            With ``subnetwork_indices`` (K-FAC has no block for a subset of entries).
        ValueError
            For ``N < 1``.
        """
        if self.subnetwork_indices is not None:
            raise CapabilityError(
                "the kron structure does not support subnetwork_indices; use diag or full"
            )
        N = self._batch_size(x) if N is None else int(N)
        if N < 1:
            raise ValueError(f"N (number of data points) must be positive, got {N}")
        return N

    def _unsupported(self, structure: str) -> CapabilityError:
        from curvlib.backends import backends_supporting

        others = backends_supporting(self.curvature_name(), structure)
        return CapabilityError(
            f"backend {self.backend_name!r} cannot compute the {structure!r} structure of "
            f"{self.curvature_name()!r}; backends that can: {others or 'none'}; structures "
            f"{self.backend_name!r} offers for it: {list(self.structures)}"
        )

    @classmethod
    def curvature_name(cls) -> str:
        """The registry's curvature name of this class (``ggn``, ``ef``, ``hessian``)."""
        return "curvature"

    def _loss(self, f: Tensor, y: Tensor) -> Tensor:
        """The reported loss ``factor * lossfunc(f, y)``, detached."""
        return self.lik.loss(f, y).detach()


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
        **backend_options: Any,
    ) -> None:
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            **backend_options,
        )
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.stochastic = bool(stochastic)
        self.num_samples = num_samples

    @classmethod
    def curvature_name(cls) -> str:
        return "ggn"

    def _checked_targets(self, x: Any, y: Tensor | None) -> Tensor:
        """Validate inputs and targets completely before the Jacobians are computed.

        The checks that need the number of outputs (class range, regression shape) get the
        output of one forward pass without graph, so that bad targets raise before any
        backward pass.
        """
        inp, y = self._prepare(x, y)
        with torch.no_grad():
            f = self._forward(inp)
        self.lik.check_target(f, y)
        return y

    def _cotangents(self, f: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``(B, K, C)`` cotangents whose outer products sum to Λ (exact or sampled)."""
        if self.stochastic:
            return self.lik.mc_cotangents(f.detach(), self.num_samples, generator)
        return self.lik.sqrt_cotangents(f.detach())

    def full(
        self,
        x: Any,
        y: Tensor | None = None,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        r"""Dense GGN / MC Fisher :math:`\sum_n J_n^\top M_n J_n` from the Jacobians.

        Returns ``(loss, H)`` with ``H`` of shape ``(P, P)`` and ``loss`` the detached
        ``factor * lossfunc(f, y)``.
        """
        y = self._checked_targets(x, y)
        Js, f = self.jacobians(x)
        V = torch.einsum("bkc,bcp->bkp", self._cotangents(f, y, generator), Js).flatten(0, 1)
        return self._loss(f, y), V.T @ V

    def diag(
        self,
        x: Any,
        y: Tensor | None = None,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        r"""Diagonal :math:`\sum_{n,k} (J_n^\top c_{n,k})^2` with :math:`\sum_k c c^\top = M_n`."""
        y = self._checked_targets(x, y)
        Js, f = self.jacobians(x)
        V = torch.einsum("bkc,bcp->bkp", self._cotangents(f, y, generator), Js)
        return self._loss(f, y), V.pow(2).sum((0, 1))


class EFInterface(CurvatureInterface):
    r"""Empirical Fisher :math:`\sum_n g_n g_n^\top`, :math:`g_n` the gradient of sample
    ``n``'s term of the reported loss ``factor * lossfunc``.

    For classification this equals laplace-torch's EF. For regression it is **half** of what
    laplace-torch's backends return (they square the gradient of the unscaled MSE and
    multiply by 1/2 once); curvlib returns the consistent value (DESIGN §3), and the
    laplace-torch adapter reproduces laplace-torch's numbers.
    """

    @classmethod
    def curvature_name(cls) -> str:
        return "ef"

    def _cotangents(self, f: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.lik.ef_cotangents(f.detach(), y)

    def _scaled_gradients(self, x: Any, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-sample gradients of the reported loss's terms and the reported loss."""
        Gs, loss = self.gradients(x, y)
        return Gs * self.factor, loss * self.factor

    def full(
        self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        r"""Dense EF :math:`\sum_n g_n g_n^\top`, ``(loss, H (P, P))``."""
        G, loss = self._scaled_gradients(x, y)
        return loss, G.T @ G

    def diag(
        self, x: Any, y: Tensor | None = None, N: int | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        r"""Diagonal EF :math:`\sum_n g_n^2`, ``(loss, h (P,))``."""
        G, loss = self._scaled_gradients(x, y)
        return loss, G.pow(2).sum(0)
