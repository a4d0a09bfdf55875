r"""The capability table: what each backend computes, for which models, at what cost.

One row per ``(backend, curvature)`` and entry point (``full``, ``diag``, ``kron``,
``operator``, ``jacobians``, ``gradients``), each a :class:`Capability`. Everything that
asks "can this backend do this?" reads this table and nothing else:

* the call-time check of every public method (:mod:`curvlib._checks`, before any work);
* :func:`curvlib.supports` (per parameter), :func:`curvlib.available`,
  ``curvlib info``, the size estimate before dense work (:mod:`curvlib._memory`);
* the tests' expected refusals.

A research backend registers its rows with :func:`curvlib.register_backend`
(``capabilities=``); the built-in rows are :data:`BUILTIN`.

Module checks (:mod:`curvlib._checks`)
---------------------------------------
For a structure with ``modules=None`` the backend handles any differentiable module. Otherwise
every module that owns a selected parameter (with ``leaves=True``: every leaf module, since
the library propagates quantities module by module) must be an instance of one of
``modules`` (the exact type with ``exact_type=True``: BackPACK dispatches on
``type(module)``), unless ``rules=True`` and it owns parameters, in which case the parameter
is computed by curvlib's shared K-FAC rule table (:mod:`curvlib.kfac.rules`). Each of the
row's ``constraints`` may veto a module with a reason. With ``shared_parameters=False``
a parameter owned by several modules (tied weights) or a module registered under several
names is refused, and, after the forward pass, so is a module called more than once;
``chain=True`` also requires the forward pass to be a chain of modules (each module's input
is the previous module's output). Those two need the model's forward pass: the call runs them
where the backend runs its forward, :func:`curvlib.supports` when given an input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

__all__ = [
    "STRUCTURES",
    "ENTRY_POINTS",
    "Capability",
    "Constraint",
    "Problem",
    "BUILTIN",
    "TABLE",
    "row",
    "register_rows",
]

#: The curvature structures (the public methods returning ``(loss, curvature)``).
STRUCTURES: tuple[str, ...] = ("full", "diag", "kron", "ekfac", "blocks", "lowrank")
#: Every entry point the table describes.
ENTRY_POINTS: tuple[str, ...] = (*STRUCTURES, "operator", "jacobians", "gradients")


@dataclass(frozen=True)
class Constraint:
    """A condition on a module beyond its type: ``check(module, owns) -> reason or ""``.

    ``owns`` tells whether the module owns a selected parameter.
    """

    name: str
    check: Callable[[nn.Module, bool], str]


@dataclass(frozen=True)
class Capability:
    """What one backend computes for one curvature and entry point.

    Attributes
    ----------
    impl : {"native", "shared"}
        ``"native"``: the backend's own library computes it; ``"shared"``: curvlib's shared
        implementation (torch.func / hooks) does, for this backend too.
    exact : bool
        Whether the result is the exact quantity (``False`` for K-FAC, and for the MC
        Fisher, an unbiased estimate).
    memory : str
        The memory model (a key of :data:`curvlib._memory.MODELS`), read by the size
        estimate before any work.
    modules : tuple of module types or None
        The module types the library handles natively; ``None``: any differentiable module.
    exact_type : bool
        Match ``type(module)`` exactly (no subclasses).
    leaves : bool
        Every leaf module must be handled, not only the owners of selected parameters.
    rules : bool
        Parameter owners outside ``modules`` are computed by curvlib's K-FAC rule table.
    likelihoods : tuple of str
    dict_inputs : bool
        Dict (HuggingFace-style) inputs accepted.
    positions : bool
        Outputs with positions ``(B, ..., C)`` accepted (else only ``(B, C)``).
    kfac_approx : tuple of str
        Weight-sharing K-FAC variants (``kron`` only).
    shared_parameters : bool
        Tied weights and modules called more than once are handled.
    chain : bool
        The forward pass must be a chain of modules.
    differentiable : bool
        ``jacobians(x, enable_backprop=True)`` keeps the graph.
    constraints : tuple of Constraint
        Further per-module conditions.
    note : str
        One line shown by ``curvlib info`` (how it is computed).
    """

    impl: str = "native"
    exact: bool = True
    memory: str = "P"
    modules: tuple[type[nn.Module], ...] | None = None
    exact_type: bool = False
    leaves: bool = False
    rules: bool = False
    likelihoods: tuple[str, ...] = ("classification", "regression")
    dict_inputs: bool = True
    positions: bool = True
    kfac_approx: tuple[str, ...] = ()
    shared_parameters: bool = True
    chain: bool = False
    differentiable: bool = False
    constraints: tuple[Constraint, ...] = ()
    note: str = ""

    def handles(self, module: nn.Module) -> bool:
        """Whether ``module``'s type is handled natively."""
        if self.modules is None:
            return True
        if self.exact_type:
            return type(module) in self.modules
        return isinstance(module, self.modules)

    def refusal(self, module: nn.Module, owns: bool) -> str:
        """Why the library cannot compute ``module`` natively (empty if it can)."""
        if not self.handles(module):
            return "its type is not handled by the library"
        for c in self.constraints:
            reason = c.check(module, owns)
            if reason:
                return reason
        return ""

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (for :func:`curvlib.available` and ``curvlib info``)."""
        return {
            "impl": self.impl,
            "exact": self.exact,
            "memory": self.memory,
            "modules": "any" if self.modules is None else [t.__name__ for t in self.modules],
            "exact_type": self.exact_type,
            "all_leaf_modules": self.leaves,
            "kfac_rules_for_other_layers": self.rules,
            "likelihoods": list(self.likelihoods),
            "dict_inputs": self.dict_inputs,
            "outputs_with_positions": self.positions,
            "kfac_approx": list(self.kfac_approx),
            "tied_weights": self.shared_parameters,
            "differentiable_jacobians": self.differentiable,
            "constraints": [c.name for c in self.constraints],
            "note": self.note,
        }


@dataclass(frozen=True)
class Problem:
    """Why a module (or the whole call) cannot be computed: path, module and reason."""

    path: str
    module: nn.Module | None
    reason: str
    kind: str = "module"  # "module" (a condition), "type" (not handled), "shared" (tied)

    def where(self) -> str:
        if self.module is None:
            return "the model"
        return f"module {self.path or '<root>'!r} of type {type(self.module).__name__}"


# -- constraints ---------------------------------------------------------------------------
def _zero_padding(m: nn.Module, owns: bool) -> str:
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r}: the library assumes zero padding"
        if isinstance(m.padding, str):
            return f"padding={m.padding!r}: the library needs integer padding"
    return ""


def _ungrouped(m: nn.Module, owns: bool) -> str:
    if owns and isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1:
        return f"groups={m.groups}: the library's K-FAC needs groups=1"
    return ""


def _no_regular_backward_hooks(m: nn.Module, owns: bool) -> str:
    if m._backward_hooks and m.__dict__.get("_is_full_backward_hook") is False:
        return "it has regular backward hooks, which exclude the library's full backward hooks"
    return ""


def _no_full_backward_hooks(m: nn.Module, owns: bool) -> str:
    if m._backward_pre_hooks or (m._backward_hooks and m._is_full_backward_hook):
        return "it has full backward hooks, which cannot coexist with the library's hooks"
    return ""


def _weight_bias_only(m: nn.Module, owns: bool) -> str:
    names = {n for n, _ in m.named_parameters(recurse=False)}
    if owns and names - {"weight", "bias"}:
        return f"the library handles only parameters named weight and bias, got {sorted(names)}"
    return ""


def _original_forward(types: tuple[type[nn.Module], ...]) -> Constraint:
    def check(m: nn.Module, owns: bool) -> str:
        base = next((t for t in types if isinstance(m, t)), None)
        if owns and base is not None and type(m).forward is not base.forward:
            return (
                f"a subclass of {base.__name__} with its own forward; the library assumes "
                "the original"
            )
        return ""

    return Constraint("original_forward", check)


def _asdl_conv(m: nn.Module, owns: bool) -> str:
    if owns and isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return f"groups={m.groups}: ASDL's result would be silently wrong"
        if m.dilation != (1, 1):
            return f"dilation={m.dilation}: ASDL supports only dilation 1"
        if isinstance(m.padding, str) and m.padding != "valid":
            return f"padding={m.padding!r}: ASDL supports only integer padding"
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r}: ASDL pads with zeros"
    return ""


_NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def _asdl_norm(m: nn.Module, owns: bool) -> str:
    if owns and isinstance(m, _NORMS):
        if m.weight is None or m.bias is None:
            return "ASDL needs both the scale (weight) and the shift (bias)"
        if not m.weight.is_meta and bool((m.weight == 0).any()):
            return "its weight has zero entries, by which ASDL divides"
    return ""


ZERO_PADDING = Constraint("zero_padding", _zero_padding)
UNGROUPED = Constraint("groups_1", _ungrouped)
NO_REGULAR_BACKWARD_HOOKS = Constraint("no_regular_backward_hooks", _no_regular_backward_hooks)
NO_FULL_BACKWARD_HOOKS = Constraint("no_full_backward_hooks", _no_full_backward_hooks)
WEIGHT_BIAS_ONLY = Constraint("weight_and_bias_only", _weight_bias_only)
ASDL_CONV = Constraint("asdl_conv2d", _asdl_conv)
ASDL_NORM = Constraint("asdl_affine_norm", _asdl_norm)

# -- module tables -------------------------------------------------------------------------
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

#: The module types BackPACK 1.7 handles, per extension (exact types).
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # eval mode (training is refused)
BACKPACK_MODULES: Mapping[str, tuple[type[nn.Module], ...]] = {
    "BatchGrad": (nn.Linear, *_CONV, *_CONV_T, *_BN),
    "DiagGGN": (nn.Linear, *_CONV, *_CONV_T, *_POOL, *_ACT, *_SHAPE, nn.Identity, *_BN),
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
#: The module types with K-FAC factors computed inside BackPACK's KFLR/KFAC pass.
BACKPACK_KRON_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, *_CONV)
#: The module types ASDL 0.1a4 has per-sample, dense and diagonal rules for.
ASDL_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, *_NORMS, nn.Embedding)
#: The module types ASDL has K-FAC rules for.
ASDL_KRON_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

# -- the built-in rows ---------------------------------------------------------------------
_ANY = Capability()
_SHARED_OPERATOR = Capability(
    impl="shared",
    memory="PK",
    note="curvlib's torch.func products (jvp, vjp, Hessian-vector products)",
)


def _autograd(curvature: str) -> dict[str, Capability]:
    mc = curvature == "fisher"
    rows = {
        "jacobians": Capability(memory="BCP", differentiable=True, note="torch.func vjp"),
        "gradients": Capability(memory="BP", note="per-sample gradients"),
        "operator": replace(_SHARED_OPERATOR, impl="native"),
    }
    if curvature == "hessian":
        rows["full"] = Capability(memory="P2", note="Hessian-vector products")
        rows["diag"] = Capability(memory="P", note="Hessian-vector products or GGN rule")
        return rows
    rows["full"] = Capability(exact=not mc, memory="P2", note="per-sample products V^T V")
    rows["diag"] = Capability(exact=not mc, memory="P", note="per-layer rules or torch.func")
    rows["kron"] = Capability(
        exact=False,
        memory="kron",
        rules=True,
        kfac_approx=("expand", "reduce"),
        note="K-FAC rule table (every parameter covered)",
    )
    return rows


def _backpack(curvature: str) -> dict[str, Capability]:
    first = Capability(
        memory="BCP",
        modules=BACKPACK_MODULES["BatchGrad"],
        exact_type=True,
        dict_inputs=True,  # first-order: module hooks only
        positions=False,
        shared_parameters=False,
        differentiable=True,
        constraints=(ZERO_PADDING, NO_REGULAR_BACKWARD_HOOKS),
        note="BatchGrad",
    )
    # second-order: BackPACK's module graph from the input tensor to the loss
    second = replace(first, leaves=True, chain=True, differentiable=False, dict_inputs=False)
    rows = {
        "jacobians": first,
        "gradients": replace(first, memory="BP"),
        "operator": _SHARED_OPERATOR,
    }
    if curvature == "hessian":
        rows["diag"] = replace(second, modules=BACKPACK_MODULES["DiagHessian"], note="DiagHessian")
        return rows
    mc = curvature == "fisher"
    rows["full"] = replace(first, exact=not mc, memory="P2+BCP", differentiable=False)
    if curvature == "ef":
        rows["diag"] = replace(first, memory="P", differentiable=False, note="SumGradSquared")
    else:
        rows["diag"] = replace(
            second,
            exact=not mc,
            memory="P",
            modules=BACKPACK_MODULES["DiagGGN"],
            note="DiagGGNMC" if mc else "DiagGGNExact",
        )
    rows["kron"] = replace(
        second,
        exact=False,
        memory="kron",
        modules=BACKPACK_MODULES["KFLR"],
        kfac_approx=("expand", "reduce"),
        constraints=(*second.constraints, UNGROUPED),
        note="KFAC (MC)" if mc else "KFLR",
    )
    return rows


def _asdl(curvature: str) -> dict[str, Capability]:
    import torch

    def embedding_float32(m: nn.Module, owns: bool) -> str:
        if owns and isinstance(m, nn.Embedding) and m.weight.dtype != torch.float32:
            return (
                f"its weight is {m.weight.dtype}: asdfghjkl 0.1a4 allocates Embedding's "
                "per-sample gradients in float32"
            )
        return ""

    def not_out_proj(m: nn.Module, owns: bool) -> str:
        if owns and isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
            return (
                "it is the out_proj of a MultiheadAttention, which uses its weights "
                "functionally: ASDL's hooks never see it"
            )
        return ""

    base = Capability(
        memory="BCP",
        modules=ASDL_MODULES,
        positions=False,
        shared_parameters=False,
        constraints=(
            WEIGHT_BIAS_ONLY,
            _original_forward(ASDL_MODULES),
            ASDL_CONV,
            ASDL_NORM,
            NO_FULL_BACKWARD_HOOKS,
            Constraint("embedding_float32", embedding_float32),
            Constraint("not_attention_out_proj", not_out_proj),
        ),
        note="OP_BATCH_GRADS",
    )
    rows = {
        "jacobians": base,
        "gradients": replace(base, memory="BP"),
        "operator": _SHARED_OPERATOR,
    }
    if curvature == "hessian":
        rows["full"] = Capability(memory="P2", positions=False, note="HessianMaker SHAPE_FULL")
        rows["diag"] = Capability(
            memory="layer_blocks",
            positions=False,
            constraints=(WEIGHT_BIAS_ONLY,),
            note="HessianMaker SHAPE_DIAG (one dense block per module)",
        )
        return rows
    mc = curvature == "fisher"
    rows["full"] = replace(base, exact=not mc, memory="P2", note="fisher maker SHAPE_FULL")
    rows["diag"] = replace(base, exact=not mc, memory="P", note="fisher maker SHAPE_DIAG")
    rows["kron"] = replace(
        base,
        exact=False,
        memory="kron",
        modules=ASDL_KRON_MODULES,
        rules=True,
        kfac_approx=("expand", "reduce"),
        note="fisher maker SHAPE_KRON (expand; reduce only where they coincide); other layers "
        "by curvlib's K-FAC rules",
    )
    return rows


def _beyond_kfac(rows: dict[str, Capability], own: bool) -> dict[str, Capability]:
    """EKFAC, per-layer blocks and low rank from a backend's rows (``own``: the backend is
    curvlib's own autograd backend, whose machinery the shared implementations are)."""
    impl = "native" if own else "shared"
    if "kron" in rows:
        rows["ekfac"] = replace(
            rows["kron"],
            impl=impl,
            note="eigenbases of this backend's K-FAC; eigenvalues from curvlib's per-layer "
            "per-sample products",
        )
    if "full" in rows and rows["full"].impl == "native" and rows["full"].memory != "P2+BCP":
        rows["blocks"] = replace(
            rows["full"], memory="layer_blocks", note="the exact block of every layer"
        )
    elif "full" in rows:  # from the backend's Jacobians
        rows["blocks"] = replace(rows["full"], memory="BCP", note="from this backend's Jacobians")
    else:  # the Hessian by curvlib's Hessian-vector products
        rows["blocks"] = Capability(
            impl="shared", memory="layer_blocks", note="Hessian-vector products per layer"
        )
    rows["lowrank"] = Capability(
        impl=impl,
        exact=False,
        memory="lowrank",
        note="Lanczos on curvlib's operator; remainder from curvlib's diagonal",
    )
    return rows


def _builtin() -> dict[tuple[str, str], dict[str, Capability]]:
    table = {}
    for curvature in ("ggn", "fisher", "ef", "hessian"):
        table["autograd", curvature] = _beyond_kfac(_autograd(curvature), True)
        table["auto", curvature] = _beyond_kfac(_autograd(curvature), True)
        table["backpack", curvature] = _beyond_kfac(_backpack(curvature), False)
        table["asdl", curvature] = _beyond_kfac(_asdl(curvature), False)
    return table


#: The rows of the built-in backends, ``{(backend, curvature): {entry point: Capability}}``.
BUILTIN: Mapping[tuple[str, str], Mapping[str, Capability]] = _builtin()
#: The table in use: the built-in rows plus those registered by research backends.
TABLE: dict[tuple[str, str], dict[str, Capability]] = {k: dict(v) for k, v in BUILTIN.items()}


def register_rows(backend: str, curvature: str, rows: Mapping[str, Capability]) -> None:
    """Record the rows of a backend (called by :func:`curvlib.register_backend`).

    Registering ``ggn`` rows also registers them for ``fisher`` unless given separately.
    The structures built on other entry points (``ekfac`` on ``kron``, ``blocks`` on
    ``full``, ``lowrank`` on the operator) get curvlib's shared rows unless given.
    """
    for key, cap in rows.items():
        if key not in ENTRY_POINTS:
            raise ValueError(f"unknown entry point {key!r}; known: {list(ENTRY_POINTS)}")
        if not isinstance(cap, Capability):
            raise TypeError(f"capability of {key!r} must be a Capability, got {type(cap).__name__}")
    full = {**_beyond_kfac(dict(rows), False), **rows}
    TABLE[backend, curvature] = full
    if curvature == "ggn":
        TABLE.setdefault((backend, "fisher"), dict(full))


def row(backend: str, curvature: str) -> Mapping[str, Capability]:
    """The capabilities of ``backend`` for ``curvature`` (empty if none are registered)."""
    return TABLE.get((backend, curvature), {})
