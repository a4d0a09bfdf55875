"""The backend registry: ``(backend name, curvature name) -> class``, with lazy imports.

Curvature names: ``ggn`` (exact GGN), ``fisher`` (the GGN class with ``stochastic=True`` by
default, i.e. the MC Fisher), ``ef`` (empirical Fisher) and ``hessian``. Backends register
by import path, so importing curvlib imports neither BackPACK nor ASDL; research code adds
its own with :func:`register_backend`, together with its rows of the capability table
(:mod:`curvlib.capabilities`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from curvlib import capabilities as _capabilities

__all__ = [
    "CURVATURES",
    "register_backend",
    "backend_class",
    "backends_supporting",
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
        "hessian": "curvlib.backends.asdl_hessian:AsdlHessian",
    },
}
_FISHER_CACHE: dict[type, type] = {}


def register_backend(
    name: str,
    curvature: str,
    cls: type | str,
    capabilities: Mapping[str, _capabilities.Capability] | None = None,
) -> None:
    """Register ``cls`` (a class or ``"module:Class"``) as ``name``'s ``curvature``.

    Parameters
    ----------
    name : str
        The backend's name (e.g. ``"mylib"``); ``cls.backend_name`` must equal it.
    curvature : {"ggn", "ef", "hessian"}
        Registering ``ggn`` also makes ``fisher`` available (the class with
        ``stochastic=True``).
    cls : type or str
    capabilities : mapping, optional
        The rows of the capability table, ``{entry point: Capability}`` (see
        :mod:`curvlib.capabilities`). Default: the rows ``name`` has, else those of the
        nearest base class of ``cls`` that has rows (a subclass computes what it inherits).

    Raises
    ------
    ValueError
        Unknown curvature, or no capability rows for a new backend.
    """
    if curvature not in CURVATURES or curvature == "fisher":
        raise ValueError(
            f"unknown curvature {curvature!r}; known curvatures: {list(CURVATURES)} (register "
            "'ggn', 'ef' or 'hessian'; fisher is the ggn class with stochastic=True)"
        )
    own = getattr(cls, "backend_name", name) if not isinstance(cls, str) else name
    if own != name and (capabilities is not None or not _capabilities.row(own, curvature)):
        raise ValueError(
            f"{cls.__name__}.backend_name is {cls.backend_name!r} but it is registered as "
            f"{name!r}: set backend_name = {name!r} on the class (its capability rows are "
            "looked up by that name)"
        )
    if capabilities is None and not _capabilities.row(name, curvature):
        capabilities = _inherited_rows(_load(cls), curvature)
        if capabilities is None:
            raise ValueError(
                f"backend {name!r} has no capability rows for {curvature!r}: pass capabilities="
                "{'full': Capability(...), ...} (see curvlib.capabilities)"
            )
    if capabilities is not None:
        _capabilities.register_rows(name, curvature, capabilities)
    _REGISTRY.setdefault(name, {})[curvature] = cls


def _inherited_rows(cls: type, curvature: str):
    """The rows of the nearest base class with rows (a subclass computes what it inherits)."""
    for base in cls.__mro__[1:]:
        rows = _capabilities.row(getattr(base, "backend_name", ""), curvature)
        if rows:
            return dict(rows)
    return None


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
            {
                "__init__": __init__,
                "__module__": ggn.__module__,
                "__doc__": ggn.__doc__,
                "_stochastic_default": True,
            },
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
    if not isinstance(backend, str) or backend not in _REGISTRY:
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
    """Names of registered backends whose capability rows include ``structure`` of ``curvature``."""
    return [
        name
        for name, curvs in registry().items()
        if curvature in curvs and structure in _capabilities.row(name, curvature)
    ]
