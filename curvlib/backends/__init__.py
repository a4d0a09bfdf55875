"""The backend registry: ``(backend name, curvature name) -> class``, with lazy imports.

Curvature names: ``ggn`` (exact GGN), ``fisher`` (the GGN class with ``stochastic=True`` by
default, i.e. the MC Fisher), ``ef`` (empirical Fisher) and ``hessian``. Backends register
themselves here by import path, so importing curvlib does not import BackPACK or ASDL;
research code adds its own with :func:`register_backend`.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CURVATURES",
    "register_backend",
    "backend_class",
    "backends_supporting",
    "backends_supporting_module",
    "registry",
]

CURVATURES = ("ggn", "fisher", "ef", "hessian")

# name -> {curvature: "module:Class" or class}; "fisher" entries are derived from "ggn".
_REGISTRY: dict[str, dict[str, Any]] = {
    "autograd": {
        "ggn": "curvlib.backends.autograd:AutogradGGN",
        "ef": "curvlib.backends.autograd:AutogradEF",
        "hessian": "curvlib.backends.autograd:AutogradHessian",
    },
    "auto": {
        "ggn": "curvlib.backends.auto:AutoGGN",
        "ef": "curvlib.backends.auto:AutoEF",
        "hessian": "curvlib.backends.auto:AutoHessian",
    },
    "backpack": {
        "ggn": "curvlib.backends.backpack:BackPackGGN",
        "ef": "curvlib.backends.backpack:BackPackEF",
        "hessian": "curvlib.backends.backpack:BackPackHessian",
    },
    "asdl": {
        "ggn": "curvlib.backends.asdl:AsdlGGN",
        "ef": "curvlib.backends.asdl:AsdlEF",
        "hessian": "curvlib.backends.asdl:AsdlHessian",
    },
}
_FISHER_CACHE: dict[type, type] = {}


def register_backend(name: str, curvature: str, cls: type | str) -> None:
    """Register ``cls`` (a class or ``"module:Class"``) as ``name``'s ``curvature``.

    Registering ``ggn`` also makes ``fisher`` available (the class with ``stochastic=True``).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; known curvatures: {list(CURVATURES)}")
    _REGISTRY.setdefault(name, {})[curvature] = cls


def _load(ref: type | str) -> type:
    if isinstance(ref, str):
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)
    return ref


def _fisher(ggn: type) -> type:
    """The MC Fisher class of a GGN class: ``stochastic=True`` by default."""
    if ggn not in _FISHER_CACHE:

        def __init__(self, *args: Any, stochastic: bool = True, **kwargs: Any) -> None:
            ggn.__init__(self, *args, stochastic=stochastic, **kwargs)

        name = (
            ggn.__name__[:-3] + "Fisher"
            if ggn.__name__.endswith("GGN")
            else ggn.__name__ + "Fisher"
        )
        _FISHER_CACHE[ggn] = type(
            name,
            (ggn,),
            {"__init__": __init__, "__module__": ggn.__module__, "__doc__": ggn.__doc__},
        )
    return _FISHER_CACHE[ggn]


def registry() -> dict[str, tuple[str, ...]]:
    """Registered backends and their curvature names."""
    out = {}
    for name, table in _REGISTRY.items():
        curvs = set(table)
        if "ggn" in table:
            curvs.add("fisher")
        out[name] = tuple(c for c in CURVATURES if c in curvs)
    return out


def backend_class(backend: str, curvature: str = "ggn") -> type:
    """The class computing ``curvature`` with ``backend``.

    Raises
    ------
    ValueError
        For an unknown backend or curvature name; the message lists the known ones.
    """
    if backend not in _REGISTRY:
        raise ValueError(f"unknown backend {backend!r}; known backends: {sorted(_REGISTRY)}")
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; known curvatures: {list(CURVATURES)}")
    table = _REGISTRY[backend]
    if curvature == "fisher" and "ggn" in table:
        return _fisher(_load(table["ggn"]))
    if curvature not in table:
        raise ValueError(
            f"backend {backend!r} has no {curvature!r}; it has {list(registry()[backend])}"
        )
    return _load(table[curvature])


def backends_supporting(curvature: str, structure: str) -> list[str]:
    """Names of registered backends that compute ``structure`` of ``curvature``."""
    names = []
    for name in _REGISTRY:
        try:
            cls = backend_class(name, curvature)
        except (ValueError, ImportError):
            continue
        if structure in getattr(cls, "structures", ()):
            names.append(name)
    return names


def backends_supporting_module(curvature: str, structure: str, module: Any) -> list[str]:
    """Names of registered backends whose ``structure`` of ``curvature`` handles ``module``."""
    names = []
    for name in backends_supporting(curvature, structure):
        cls = backend_class(name, curvature)
        types = getattr(cls, "supported_modules", {}).get(structure)
        owns = any(p.requires_grad for p in module.parameters(recurse=False))
        all_leaves = getattr(cls, "checks_all_leaves", lambda s: False)(structure)
        if types is None or isinstance(module, types) or (not owns and not all_leaves):
            names.append(name)
    return names
