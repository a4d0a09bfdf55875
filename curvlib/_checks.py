"""Checking a model and a call against the capability table, before any work.

:func:`static_problems` reads everything a row refuses that is visible without running the
model (module types, constraints, tied weights); :func:`dynamic_problems` what needs the
forward pass just recorded (modules called twice, BackPACK's chain of modules).
:class:`CapabilityChecks` (a base of :class:`~curvlib.interface.CurvatureInterface`) turns
them, the call-level conditions (likelihood, dict inputs, K-FAC variant, subnetwork,
differentiable Jacobians) and the size estimate (:mod:`curvlib._memory`) into the named
errors of a call; :func:`curvlib.supports` runs the same checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlib import _memory
from curvlib._call import Call
from curvlib._selection import is_leaf, own_params
from curvlib.capabilities import STRUCTURES, Capability, Problem, row
from curvlib.errors import (
    CapabilityError,
    NonFiniteError,
    SharedParameterError,
    UnsupportedModuleError,
)

__all__ = [
    "static_problems",
    "dynamic_problems",
    "Record",
    "Records",
    "CapabilityChecks",
]


# -- checks --------------------------------------------------------------------------------
def _owners(root: nn.Module, selected: set[int]) -> dict[int, list[tuple[str, nn.Module]]]:
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, mod in root.named_modules(remove_duplicate=False):
        for _, p in own_params(mod):
            if id(p) in selected:
                owners.setdefault(id(p), []).append((path, mod))
    return owners


def static_problems(
    cap: Capability,
    root: nn.Module,
    params: Iterable[Tensor],
) -> list[Problem]:
    """Everything the row refuses on this model that is visible without running it.

    Parameters
    ----------
    cap : Capability
    root : nn.Module
        The differentiated module (the model, or its last layer).
    params : iterable of Tensor
        The selected parameters.
    """
    selected = {id(p) for p in params}
    problems: list[Problem] = []
    if not cap.shared_parameters:
        for paths in _owners(root, selected).values():
            if len({id(m) for _, m in paths}) > 1 or len(paths) > 1:
                names = [p or "<root>" for p, _ in paths]
                problems.append(
                    Problem(
                        paths[0][0],
                        paths[0][1],
                        f"a parameter is shared by several modules {names} (tied weights); "
                        "the library keeps one result per parameter and module call",
                        kind="shared",
                    )
                )
                break
    for path, mod in root.named_modules():
        owns = any(id(p) in selected for _, p in own_params(mod))
        leaf = is_leaf(mod)
        relevant = owns or (cap.leaves and leaf)
        if not relevant:
            continue
        reason = cap.refusal(mod, owns)
        if reason and cap.rules and owns:
            continue  # curvlib's K-FAC rule table computes it (a layer rule or an exact block)
        if reason:
            problems.append(Problem(path, mod, reason, "module" if cap.handles(mod) else "type"))
    return problems


@dataclass
class Record:
    """One recorded module call of a forward pass (for the dynamic checks)."""

    order: int
    inp: Any
    out: Any


@dataclass
class Records:
    """The module calls of one forward pass, by module id."""

    calls: dict[int, list[Record]] = field(default_factory=dict)
    counter: int = 0

    def hook(self, mod: nn.Module, args: tuple, out: Any) -> None:
        """A forward hook recording the call (first positional input and the output)."""
        self.calls.setdefault(id(mod), []).append(
            Record(self.counter, args[0] if args else None, out)
        )
        self.counter += 1


def _key(t: Tensor) -> tuple:
    """What identifies a tensor passed from one module to the next (storage, shape, stride)."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def dynamic_problems(
    cap: Capability,
    root: nn.Module,
    params: Iterable[Tensor],
    records: Records,
    f: Tensor,
) -> list[Problem]:
    """What the row refuses about the forward pass just recorded (call counts, chain).

    ``records`` holds the calls of the relevant modules (the parameter owners; every leaf
    with ``cap.leaves``), ``f`` the model output (with its graph for the chain check).
    """
    if cap.shared_parameters and not cap.chain:
        return []
    selected = {id(p) for p in params}
    mods = [
        (path, m)
        for path, m in root.named_modules()
        if (cap.leaves and is_leaf(m)) or any(id(p) in selected for _, p in own_params(m))
    ]
    for path, m in mods:
        n = len(records.calls.get(id(m), []))
        if n > 1:
            return [
                Problem(
                    path,
                    m,
                    f"it ran {n} times in one forward pass; the library keeps one call per module",
                    kind="shared",
                )
            ]
    if not cap.chain:
        return []
    leaves = [(path, m) for path, m in mods if is_leaf(m)]
    names = {id(m): (path, m) for path, m in leaves}
    producers: dict[tuple, list[tuple[int, int]]] = {}
    for mid, calls in records.calls.items():
        out = calls[0].out
        if mid in names and isinstance(out, Tensor):
            producers.setdefault(_key(out), []).append((calls[0].order, mid))
    visited: set[int] = set()
    cur, before, consumer = f, records.counter, None
    while isinstance(cur, Tensor) and cur.requires_grad:
        cands = [(o, mid) for o, mid in producers.get(_key(cur), []) if o < before]
        if not cands:
            path, mod = names[consumer] if consumer is not None else ("", root)
            where = "its input" if consumer is not None else "the model output"
            return [
                Problem(
                    path,
                    mod,
                    f"{where} comes from a functional operation, not from a module; the "
                    "library needs the forward pass to be a chain of modules",
                )
            ]
        before, consumer = max(cands)
        visited.add(consumer)
        cur = records.calls[consumer][0].inp
    for mid, calls in records.calls.items():
        out = calls[0].out
        if mid in names and mid not in visited and isinstance(out, Tensor) and out.requires_grad:
            path, mod = names[mid]
            return [
                Problem(
                    path,
                    mod,
                    "its output does not reach the model output through a chain of modules "
                    "(branching or a functional operation); the library needs the forward "
                    "pass to be a chain of modules",
                )
            ]
    return []


class _Structures:
    """``cls.structures`` / ``obj.structures``: the structures in the capability table."""

    def __get__(self, obj: Any, cls: type) -> tuple[str, ...]:
        if obj is None:
            key = "fisher" if getattr(cls, "_stochastic_default", False) else None
            return cls.structures_of(key)
        return cls.structures_of(obj.curvature_key())


class CapabilityChecks:
    """Steps 3 and 4 of the template: the capability row and the size estimate."""

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
        if what in ("kron", "ekfac", "blocks", "lowrank") and call.idx is not None:
            raise CapabilityError(
                f"the {what} structure does not support subnetwork_indices (it has no block "
                "for a subset of a parameter's entries); use diag or full"
            )
        if what in ("kron", "ekfac"):
            if call.kfac_approx not in cap.kfac_approx:
                raise CapabilityError(
                    f"backend {self.backend_name!r} computes only the {list(cap.kfac_approx)} "
                    f"K-FAC, not kfac_approx={call.kfac_approx!r}; backends that do: "
                    f"{self._others(what, kfac=call.kfac_approx)}"
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
        cap = self.capability(what) if cap is None else cap
        return static_problems(cap, self._model, self.params)

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
            if model and static_problems(cap, self._model, self.params):
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
            kron_entries=lambda: kron_entries(self._model, self.params),
            layer_blocks=lambda: _layer_blocks(self._model, self.params),
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

    @staticmethod
    def _finite(what: str, t: Tensor) -> None:
        """Step 6: a NaN or infinity in a result is an error, never a silent return."""
        if t.is_meta or t.numel() == 0:
            return
        # one reduction first (NaN and inf propagate through a sum); the elementwise check
        # only when the sum is not finite (it may overflow although every entry is finite)
        if bool(t.sum().isfinite()) or bool(torch.isfinite(t).all()):
            return
        raise NonFiniteError(
            f"the {what} contains NaN or infinite values although inputs, outputs and loss are "
            "finite (an overflow inside the model or the curvature); compute in float64 or "
            "rescale the model"
        )

    def _finish(self, call: Call, loss: Tensor, result: Any) -> tuple[Tensor, Any]:
        """Step 6: finiteness of loss and result, subnetwork selection, the reported loss."""
        with self._fixed_selection(call.memo, call.selection):
            return self._finished(call, loss, result)

    def _finished(self, call: Call, loss: Tensor, result: Any) -> tuple[Tensor, Any]:
        """The body of :meth:`_finish` (with the selection fixed)."""
        self._finite("loss", loss)
        if call.what == "diag":
            result = call.select(result)
        what = f"{call.what} {self.curvature_key()} result"
        if isinstance(result, Tensor):
            self._finite(what, result)
        else:  # a structure: every tensor of its state
            tensors = (
                [f for fs in result.kfacs for f in fs]
                if hasattr(result, "kfacs")
                else _tensors(result.state_dict())
            )
            flags = [t.sum() for t in tensors if not t.is_meta and t.numel()]
            if flags and not bool(torch.stack(flags).isfinite().all()):
                for t in _tensors(result.state_dict()):
                    self._finite(what, t)
        return loss.detach(), result


def _tensors(obj: Any):
    """Every tensor in a (nested) state dict."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _layer_blocks(root: nn.Module, params: list[Tensor]) -> int:
    """``sum_l P_l^2`` over the modules owning selected parameters (ASDL's Hessian diagonal)."""
    sel = {id(p) for p in params}
    total = 0
    for m in root.modules():
        n = sum(p.numel() for _, p in own_params(m) if id(p) in sel)
        total += n * n
    return total
