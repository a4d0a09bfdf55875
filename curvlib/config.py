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
from curvlib.interface import CurvatureInterface

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


from curvlib.support import SupportReport, available, supports  # noqa: E402  (re-exported)
