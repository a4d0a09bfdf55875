"""mkdocs hook: the API reference, one generated page per public module.

Adding a module to the reference is one line in :data:`MODULES`. The top-level page lists
every name of ``curvlib.__all__`` and every registered backend class (read from the lazy
package: nothing heavy is imported) with a link to its documentation.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

# Public modules, in the order of the navigation; each gets the page ``api/<module>.md``.
MODULES = [
    "curvlib.interface",
    "curvlib.likelihood",
    "curvlib.kron",
    "curvlib.structures",
    "curvlib.capabilities",
    "curvlib.support",
    "curvlib.kfac",
    "curvlib.kfac.rules",
    "curvlib.kfac.conv",
    "curvlib.kfac.attention",
    "curvlib.linops",
    "curvlib.estimators",
    "curvlib.layers",
    "curvlib.functional",
    "curvlib.config",
    "curvlib.data",
    "curvlib.backends",
    "curvlib.backends.autograd",
    "curvlib.backends.auto",
    "curvlib.backends.backpack",
    "curvlib.backends.asdl",
    "curvlib.backends.asdl_hessian",
    "curvlib.integrations.laplace",
    "curvlib.errors",
]
SECTION = "API reference"


def _module_of(name: str) -> str:
    curvlib = importlib.import_module("curvlib")
    if name in curvlib._EXPORTS:
        return curvlib._EXPORTS[name]
    return f"curvlib.{name}"  # a submodule


def _index() -> str:
    """The top-level page: ``curvlib.X`` -> where it is documented."""
    curvlib = importlib.import_module("curvlib")
    from curvlib.backends import _REGISTRY

    lines = [
        "# `curvlib`",
        "",
        "::: curvlib",
        "    options:",
        "      members: false",
        "      show_root_heading: false",
        "      show_root_toc_entry: false",
        "",
        "## Names in `curvlib.__all__`",
        "",
        "| name | defined in |",
        "| --- | --- |",
    ]
    for name in curvlib.__all__:
        module = _module_of(name)
        if module == f"curvlib.{name}":
            lines.append(f"| [`curvlib.{name}`][{module}] | a module |")
        else:
            lines.append(f"| [`curvlib.{name}`][{module}.{name}] | [`{module}`][{module}] |")
    lines += [
        "",
        "## Backend classes",
        "",
        "Every registered backend class is also a top-level name, resolved on first use (so",
        "`import curvlib` imports no backend library): `from curvlib import BackPackGGN`.",
        "A backend's MC Fisher class is its GGN class with `stochastic=True` by default.",
        "",
        "| name | backend | curvature | class |",
        "| --- | --- | --- | --- |",
    ]
    for name, (backend, curvature) in curvlib._backend_exports().items():
        table = _REGISTRY[backend]
        ref = table.get(curvature) or table["ggn"]
        if not isinstance(ref, str):
            continue
        module, _, cls = ref.partition(":")
        target = f"[`{module}.{cls}`][{module}.{cls}]"
        if curvature == "fisher" and "fisher" not in table:
            target = f"{target} with `stochastic=True`"
        lines.append(f"| `curvlib.{name}` | `{backend}` | `{curvature}` | {target} |")
    return "\n".join(lines) + "\n"


def on_config(config: Any) -> Any:
    root = str(Path(config.config_file_path).parent)
    if root not in sys.path:  # this checkout's curvlib, also when another one is installed
        sys.path.insert(0, root)
    nav = config["nav"]
    for item in nav:
        if isinstance(item, dict) and SECTION in item:
            item[SECTION] = [{"curvlib": "api/index.md"}] + [
                {module: f"api/{module}.md"} for module in MODULES
            ]
            break
    else:
        nav.append({SECTION: [{"curvlib": "api/index.md"}]})
    return config


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "api/index.md", content=_index()))
    for module in MODULES:
        content = f"# `{module}`\n\n::: {module}\n    options:\n      show_root_heading: false\n"
        files.append(File.generated(config, f"api/{module}.md", content=content))
    return files
