"""Swap backends by configuration: a string, a dict, a dataclass or an environment variable.

>>> curv = make_curvature(model, "classification", "backpack:ef")
>>> curv = make_curvature(model, "classification", {"backend": "asdl", "curvature": "ggn"})
>>> curv = make_curvature(model, "classification", CurvatureConfig("autograd", "fisher",
...                                                                 {"num_samples": 10}))

With no spec, ``CURVLIB_BACKEND`` (e.g. ``"backpack:ggn"`` or ``"asdl"``) is read, and
without it the default is the autograd GGN. Explicit keyword arguments win over the spec,
the spec over the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from torch import nn

from curvlib.backends import CURVATURES, backend_class, registry
from curvlib.interface import STRUCTURES, CurvatureInterface

__all__ = [
    "CurvatureConfig",
    "parse_spec",
    "make_curvature",
    "available",
    "supports",
    "SupportReport",
    "ENV_VAR",
]

ENV_VAR = "CURVLIB_BACKEND"
DEFAULT_BACKEND = "autograd"
DEFAULT_CURVATURE = "ggn"


@dataclass
class CurvatureConfig:
    """Which backend computes which curvature, and the options passed to its constructor.

    Parameters
    ----------
    backend : str
        A registered backend name (``curvlib.backends.registry()``).
    curvature : str
        ``"ggn"``, ``"fisher"`` (MC Fisher), ``"ef"`` or ``"hessian"``.
    options : dict
        Constructor options (``last_layer``, ``num_samples``, ``kfac_approx``, ...).
    """

    backend: str = DEFAULT_BACKEND
    curvature: str = DEFAULT_CURVATURE
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in registry():
            raise ValueError(
                f"unknown backend {self.backend!r}; known backends: {sorted(registry())}"
            )
        if self.curvature not in CURVATURES:
            raise ValueError(
                f"unknown curvature {self.curvature!r}; known curvatures: {list(CURVATURES)}"
            )

    def to_string(self) -> str:
        """``"backend:curvature"`` (options are not part of the string form)."""
        return f"{self.backend}:{self.curvature}"


def _from_string(spec: str) -> CurvatureConfig:
    backend, _, curvature = spec.strip().partition(":")
    return CurvatureConfig(backend or DEFAULT_BACKEND, curvature or DEFAULT_CURVATURE)


def parse_spec(spec: str | Mapping[str, Any] | CurvatureConfig | None = None) -> CurvatureConfig:
    """Turn a spec into a :class:`CurvatureConfig`.

    Parameters
    ----------
    spec : str, dict, CurvatureConfig or None
        ``"backend[:curvature]"``; a dict with keys ``backend``, ``curvature`` and either
        ``options`` or further keys (taken as options); a dataclass with those fields; or
        ``None`` to read the environment variable ``CURVLIB_BACKEND`` (default
        ``"autograd:ggn"``).

    Raises
    ------
    ValueError
        Unknown backend or curvature names (the message lists the known ones), or a spec
        of another type.
    """
    if spec is None:
        env = os.environ.get(ENV_VAR, "").strip()
        return _from_string(env) if env else CurvatureConfig()
    if isinstance(spec, CurvatureConfig):
        return CurvatureConfig(spec.backend, spec.curvature, dict(spec.options))
    if isinstance(spec, str):
        return _from_string(spec)
    if is_dataclass(spec) and not isinstance(spec, type):
        spec = asdict(spec)
    if isinstance(spec, Mapping):
        rest = dict(spec)
        backend = rest.pop("backend", DEFAULT_BACKEND)
        curvature = rest.pop("curvature", DEFAULT_CURVATURE)
        options = dict(rest.pop("options", None) or {})
        options.update(rest)
        return CurvatureConfig(backend, curvature, options)
    raise ValueError(
        "a curvature spec is a 'backend:curvature' string, a dict, a CurvatureConfig or None; "
        f"got {type(spec).__name__}"
    )


def make_curvature(
    model: nn.Module,
    likelihood: str,
    spec: str | Mapping[str, Any] | CurvatureConfig | None = None,
    *,
    backend: str | None = None,
    curvature: str | None = None,
    **options: Any,
) -> CurvatureInterface:
    """Build the curvature object a spec names (default: autograd GGN).

    ``backend`` and ``curvature`` override the spec's, and ``options`` are merged over the
    spec's options, then passed to the class's constructor.
    """
    cfg = parse_spec(spec)
    cfg = CurvatureConfig(
        backend or cfg.backend, curvature or cfg.curvature, {**cfg.options, **options}
    )
    cls = backend_class(cfg.backend, cfg.curvature)
    return cls(model, likelihood, **cfg.options)


def _type_names(types: tuple[type, ...] | None) -> list[str] | str:
    return "any" if types is None else [t.__name__ for t in types]


def available() -> dict[str, dict[str, dict[str, Any]]]:
    """What each registered backend supports: ``{backend: {curvature: capabilities}}``.

    Capabilities are read from the classes' data (``structures``, ``supported_modules``,
    ``likelihoods``, ``dict_inputs``, ``kfac_approximations``). A backend whose library
    cannot be imported is listed with ``{"error": message}``.
    """
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for name, curvatures in registry().items():
        table[name] = {}
        for curv in curvatures:
            try:
                cls = backend_class(name, curv)
            except ImportError as err:  # an optional library is missing
                table[name][curv] = {"error": f"{type(err).__name__}: {err}"}
                continue
            table[name][curv] = {
                "class": cls.__name__,
                "structures": list(cls.structures),
                "modules": {s: _type_names(cls.supported_modules.get(s)) for s in cls.structures},
                "all_leaf_modules_checked": [s for s in cls.structures if cls.checks_all_leaves(s)],
                "likelihoods": list(cls.likelihoods),
                "dict_inputs": cls.dict_inputs,
                "kfac_approx": list(cls.kfac_approximations) if "kron" in cls.structures else [],
            }
            if hasattr(cls, "preferences"):  # backend "auto": which backend it picks
                table[name][curv]["picks"] = {s: list(b) for s, b in cls.preferences().items()}
    return table


@dataclass
class SupportReport:
    """Per-parameter coverage of ``(backend, curvature, structure)`` on a model.

    ``rows`` holds one dict per trainable parameter (``name``, ``module``, ``type``,
    ``covered``, ``reason``); ``blocking`` lists modules that make the whole computation
    fail (for backends that need every leaf module supported).
    """

    backend: str
    curvature: str
    structure: str
    rows: list[dict[str, Any]]
    blocking: list[str]

    @property
    def supported(self) -> bool:
        """Whether the computation covers every selected parameter."""
        return not self.blocking and all(r["covered"] for r in self.rows)

    def __str__(self) -> str:
        head = f"{self.backend}:{self.curvature} {self.structure}: " + (
            "supported" if self.supported else "NOT supported"
        )
        lines = [head] + [f"  blocking: {b}" for b in self.blocking]
        for r in self.rows:
            mark = "ok " if r["covered"] else "NO "
            lines.append(
                f"  {mark}{r['name']} ({r['type']})" + (f": {r['reason']}" * bool(r["reason"]))
            )
        return "\n".join(lines)


def supports(
    model: nn.Module,
    backend: str,
    curvature: str = "ggn",
    structure: str = "diag",
    last_layer: bool = False,
) -> SupportReport:
    """Report, parameter by parameter, whether a backend covers ``structure`` on ``model``.

    Nothing is computed and the model is not touched; the report is read from the class's
    capability data.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; known structures: {list(STRUCTURES)}")
    cls = backend_class(backend, curvature)
    module = model.last_layer if last_layer else model
    has = structure in cls.structures
    types = cls.supported_modules.get(structure) if has else ()
    blocking = []
    if has and types is not None and cls.checks_all_leaves(structure):
        for path, mod in module.named_modules():
            if not list(mod.children()) and not isinstance(mod, types):
                blocking.append(f"{path or '<root>'} ({type(mod).__name__})")
    rows = []
    for path, mod in module.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            name = f"{path}.{pname}" if path else pname
            if not has:
                covered, reason = (
                    False,
                    f"{backend!r} has no {structure!r} structure for {curvature}",
                )
            elif types is not None and not isinstance(mod, types):
                covered, reason = False, f"{type(mod).__name__} is not supported by {backend!r}"
            elif blocking:
                covered, reason = False, "blocked by unsupported modules: " + ", ".join(blocking)
            else:
                covered, reason = True, ""
            rows.append(
                {
                    "name": name,
                    "module": path,
                    "type": type(mod).__name__,
                    "covered": covered,
                    "reason": reason,
                }
            )
    return SupportReport(backend, curvature, structure, rows, blocking)
