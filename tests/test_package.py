"""The package namespace: lazy imports and the top-level backend classes."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import curvlib
from curvlib.backends import _REGISTRY, backend_class, register_backend, registry

ROOT = Path(__file__).resolve().parents[1]
has_backpack = importlib.util.find_spec("backpack") is not None
has_asdl = importlib.util.find_spec("asdl") is not None


@pytest.mark.skipif(not has_backpack, reason="BackPACK (the [backpack] extra) is not installed")
def test_import_curvlib_imports_no_heavy_library():
    code = (
        "import sys, curvlib\n"
        "print(sorted(m for m in ('torch', 'backpack', 'asdl', 'laplace') if m in sys.modules))\n"
        "from curvlib import BackPackGGN\n"
        "print(BackPackGGN.__module__, 'asdl' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[]", "curvlib.backends.backpack False"]


def test_every_registered_backend_class_is_a_top_level_name():
    names = curvlib._backend_exports()
    for backend, curvatures in registry().items():  # every (backend, curvature) has a name
        for curvature in curvatures:
            try:
                cls = backend_class(backend, curvature)
            except ImportError:  # the backend's library is not installed
                continue
            assert getattr(curvlib, cls.__name__) is cls
    for name, (backend, curvature) in names.items():
        try:
            cls = getattr(curvlib, name)
        except ImportError:
            continue
        assert cls is backend_class(backend, curvature) and cls.__name__ == name
    assert {"BackPackGGN", "BackPackEF", "BackPackHessian", "BackPackFisher"} <= set(names)
    assert {"AsdlGGN", "AsdlEF", "AsdlHessian", "AsdlFisher", "AutoGGN", "AutogradFisher"} <= set(
        names
    )
    assert set(names) <= set(dir(curvlib)) and set(curvlib.__all__) <= set(dir(curvlib))


@pytest.mark.skipif(
    not (has_backpack and has_asdl), reason="BackPACK and ASDL (extras) are not installed"
)
def test_laplace_style_import():
    from curvlib import AsdlEF, BackPackGGN
    from curvlib.backends.asdl import AsdlEF as asdl_ef
    from curvlib.backends.backpack import BackPackGGN as backpack_ggn

    assert BackPackGGN is backpack_ggn and AsdlEF is asdl_ef


def test_a_backend_registered_later_is_a_top_level_name():
    class MyGGN(curvlib.AutogradGGN):
        pass

    register_backend("mine", "ggn", MyGGN)
    try:
        assert curvlib.MyGGN is MyGGN
        assert curvlib.MyFisher is backend_class("mine", "fisher")
        assert curvlib.MyFisher.__name__ == "MyFisher" and "MyGGN" in dir(curvlib)
    finally:
        _REGISTRY.pop("mine")
    assert "MyGGN" not in dir(curvlib)
    with pytest.raises(AttributeError, match="no attribute 'MyGGN'"):
        curvlib.MyGGN  # noqa: B018


def test_all_names_resolve_and_match_the_static_imports():
    exports = {**curvlib._EXPORTS, **{m: f"curvlib.{m}" for m in curvlib._SUBMODULES}}
    assert sorted(curvlib.__all__) == sorted(exports)
    for name, module in curvlib._EXPORTS.items():
        assert getattr(curvlib, name) is getattr(sys.modules[module], name)
    # the TYPE_CHECKING imports (what type checkers and IDEs see) name the same objects
    tree = ast.parse((ROOT / "curvlib" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n))
    static = {}
    for node in block.body:
        for alias in node.names:
            static[alias.name] = (
                f"{node.module}.{alias.name}" if node.module == "curvlib" else node.module
            )
    assert static == exports
    with pytest.raises(AttributeError):
        curvlib.NoSuchName  # noqa: B018
