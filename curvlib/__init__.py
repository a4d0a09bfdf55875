"""curvlib: curvature of a PyTorch model's loss, with swappable backends.

GGN, Monte-Carlo Fisher, empirical Fisher and Hessian as full matrices, diagonals and
Kronecker factors, through one interface (a drop-in for laplace-torch's
``laplace.curvature``) with three backends: pure autograd, BackPACK and ASDL.

Every public name is imported on first use (PEP 562), so ``import curvlib`` is cheap: it
imports neither torch nor BackPACK nor ASDL until a name that needs them is read. Besides
the names in ``__all__``, every registered backend class is an attribute, named as its
class: ``curvlib.BackPackGGN``, ``curvlib.AsdlEF``, ``curvlib.AutoHessian``, and the MC
Fisher classes ``curvlib.BackPackFisher`` (the GGN class with ``stochastic=True`` by
default), ... — the same objects as :func:`curvlib.backend_class` returns, so
``from curvlib import BackPackGGN`` replaces ``from laplace.curvature import BackPackGGN``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it; read on first access by ``__getattr__``.
_EXPORTS: dict[str, str] = {
    "CURVATURES": "curvlib.backends",
    "backend_class": "curvlib.backends",
    "register_backend": "curvlib.backends",
    "AutogradEF": "curvlib.backends.autograd",
    "AutogradGGN": "curvlib.backends.autograd",
    "AutogradHessian": "curvlib.backends.autograd",
    "CurvatureConfig": "curvlib.config",
    "available": "curvlib.config",
    "make_curvature": "curvlib.config",
    "supports": "curvlib.config",
    "fit": "curvlib.data",
    "CapabilityError": "curvlib.errors",
    "CurvlibError": "curvlib.errors",
    "DecompositionError": "curvlib.errors",
    "DistributedError": "curvlib.errors",
    "InputError": "curvlib.errors",
    "LikelihoodError": "curvlib.errors",
    "NonFiniteError": "curvlib.errors",
    "SharedParameterError": "curvlib.errors",
    "TargetError": "curvlib.errors",
    "UnsupportedModuleError": "curvlib.errors",
    "hutchinson_diagonal": "curvlib.estimators",
    "hutchinson_trace": "curvlib.estimators",
    "hutchpp_trace": "curvlib.estimators",
    "lanczos": "curvlib.estimators",
    "CurvatureInterface": "curvlib.interface",
    "EFInterface": "curvlib.interface",
    "GGNInterface": "curvlib.interface",
    "IndefiniteFactorError": "curvlib.kron",
    "Kron": "curvlib.kron",
    "KronDecomposed": "curvlib.kron",
    "Classification": "curvlib.likelihood",
    "Likelihood": "curvlib.likelihood",
    "Regression": "curvlib.likelihood",
    "get_likelihood": "curvlib.likelihood",
    "register_kfac_rule": "curvlib.kfac",
    "KFACRule": "curvlib.kfac",
    "HessianInterface": "curvlib.interface",
    "MemoryLimitError": "curvlib.errors",
    "Capability": "curvlib.capabilities",
    "SupportReport": "curvlib.support",
    "CurvatureStructure": "curvlib.structures",
    "Dense": "curvlib.structures",
    "Diagonal": "curvlib.structures",
    "EKFAC": "curvlib.structures",
    "BlockDiag": "curvlib.structures",
    "LowRank": "curvlib.structures",
    "UnsupportedExponentError": "curvlib.structures",
    "CurvatureOperator": "curvlib.linops",
    "curvature_operator": "curvlib.linops",
}
# Public submodules that are also names of the package (``curvlib.functional.diag(...)``).
_SUBMODULES: tuple[str, ...] = ("functional", "layers")

__all__ = [
    "AutogradEF",
    "AutogradGGN",
    "AutogradHessian",
    "BlockDiag",
    "CURVATURES",
    "Capability",
    "CapabilityError",
    "Classification",
    "CurvatureConfig",
    "CurvatureInterface",
    "CurvatureOperator",
    "CurvatureStructure",
    "CurvlibError",
    "DecompositionError",
    "Dense",
    "Diagonal",
    "DistributedError",
    "EFInterface",
    "EKFAC",
    "GGNInterface",
    "HessianInterface",
    "IndefiniteFactorError",
    "InputError",
    "KFACRule",
    "Kron",
    "KronDecomposed",
    "Likelihood",
    "LikelihoodError",
    "LowRank",
    "MemoryLimitError",
    "NonFiniteError",
    "Regression",
    "SharedParameterError",
    "SupportReport",
    "TargetError",
    "UnsupportedExponentError",
    "UnsupportedModuleError",
    "available",
    "backend_class",
    "curvature_operator",
    "fit",
    "functional",
    "get_likelihood",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "layers",
    "make_curvature",
    "register_backend",
    "register_kfac_rule",
    "supports",
]

if TYPE_CHECKING:  # what static tools (type checkers, IDEs, griffe) see; kept equal to _EXPORTS
    from curvlib import functional, layers
    from curvlib.backends import CURVATURES, backend_class, register_backend
    from curvlib.backends.autograd import AutogradEF, AutogradGGN, AutogradHessian
    from curvlib.capabilities import Capability
    from curvlib.config import CurvatureConfig, available, make_curvature, supports
    from curvlib.data import fit
    from curvlib.errors import (
        CapabilityError,
        CurvlibError,
        DecompositionError,
        DistributedError,
        InputError,
        LikelihoodError,
        MemoryLimitError,
        NonFiniteError,
        SharedParameterError,
        TargetError,
        UnsupportedModuleError,
    )
    from curvlib.estimators import hutchinson_diagonal, hutchinson_trace, hutchpp_trace, lanczos
    from curvlib.interface import CurvatureInterface, EFInterface, GGNInterface, HessianInterface
    from curvlib.kfac import KFACRule, register_kfac_rule
    from curvlib.kron import IndefiniteFactorError, Kron, KronDecomposed
    from curvlib.likelihood import Classification, Likelihood, Regression, get_likelihood
    from curvlib.linops import CurvatureOperator, curvature_operator
    from curvlib.structures import (
        EKFAC,
        BlockDiag,
        CurvatureStructure,
        Dense,
        Diagonal,
        LowRank,
        UnsupportedExponentError,
    )
    from curvlib.support import SupportReport


def _class_name(ref: Any) -> str:
    """The class name of a registry entry (``"module:Class"`` or a class), without importing."""
    return ref.partition(":")[2] if isinstance(ref, str) else ref.__name__


def _backend_exports() -> dict[str, tuple[str, str]]:
    """Top-level names of the registered backend classes: ``name -> (backend, curvature)``.

    Read from the backend registry each time (a backend registered later is included),
    without importing any backend. A backend's MC Fisher class is named as its GGN class
    with ``GGN`` replaced by ``Fisher`` (``BackPackGGN`` -> ``BackPackFisher``), the name
    :func:`curvlib.backend_class` gives it. A name already public in ``__all__`` keeps its
    meaning; of two backends whose classes share a name, the first registered wins.

    Returns
    -------
    dict[str, tuple[str, str]]
        For each name, the arguments of :func:`curvlib.backend_class` that give the class.
    """
    from curvlib.backends import _REGISTRY, CURVATURES

    out: dict[str, tuple[str, str]] = {}
    for backend, table in _REGISTRY.items():
        for curvature in CURVATURES:
            if curvature in table:
                name = _class_name(table[curvature])
            elif curvature == "fisher" and "ggn" in table:
                ggn = _class_name(table["ggn"])
                name = ggn[:-3] + "Fisher" if ggn.endswith("GGN") else ggn + "Fisher"
            else:
                continue
            if name not in _EXPORTS and name not in out:
                out[name] = (backend, curvature)
    return out


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(f"module 'curvlib' has no attribute {name!r}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES or importlib.util.find_spec(f"curvlib.{name}") is not None:
        # a submodule (``from curvlib import capabilities`` asks here first)
        value = importlib.import_module(f"curvlib.{name}")
    else:
        spec = _backend_exports().get(name)
        if spec is None:
            raise AttributeError(f"module 'curvlib' has no attribute {name!r}")
        from curvlib.backends import backend_class

        return backend_class(*spec)  # not cached: the registry may change
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_backend_exports()})
