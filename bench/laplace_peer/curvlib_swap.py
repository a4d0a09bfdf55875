"""pytest plugin: run laplace-torch's own tests with curvlib's adapters in place of its backends.

Second version of the swap plugin.

Load with `-p curvlib_swap` (this folder on PYTHONPATH). CURVLIB_SWAP selects what is swapped:
  all      every laplace backend class in MAPPING is replaced by curvlib's adapter
  default  only CurvlinopsGGN, the default backend most tests use
  A,B,...  the named classes only, e.g. AsdlGGN (the reference side stays laplace's own)
  none     nothing swapped; only the counters run (a control for the counting itself)
The adapters get the original class names (__name__/__qualname__), so laplace's name-based
branches ("asdl" -> functorch_jacobians in the GLM predictive, "backpack" -> refuse dict
inputs) and the parametrize ids stay as in the baseline.

Counters (printed at the end, and written as JSON to $CURVLIB_SWAP_COUNTS if set):
  adapter:<Name>.<method>   calls that reached a curvlib adapter (incl. __init__)
  laplace:<Class>.<method>  calls that reached laplace's OWN backend code (methods defined
                            in the library-specific classes CurvlinopsInterface,
                            AsdlInterface, BackPackInterface and the six GGN/EF classes).
                            Under CURVLIB_SWAP=all, these come only from tests that use
                            laplace classes directly (Hessian backends, *Interface in
                            test_jacobians, ...); a swapped name should never appear.
"""

import collections
import functools
import json
import os
import sys

import laplace.baselaplace as lbl
import laplace.curvature as lc
import laplace.curvature.asdl as lca
import laplace.curvature.backpack as lcb
import laplace.curvature.curvlinops as lcc
import laplace.lllaplace as lll
import laplace.subnetlaplace as lsn

lmt = sys.modules["laplace.marglik_training"]  # the attribute is shadowed by the function

MAPPING = {
    "CurvlinopsGGN": (lcc, "autograd", "ggn"),
    "CurvlinopsEF": (lcc, "autograd", "ef"),
    "AsdlGGN": (lca, "asdl", "ggn"),
    "AsdlEF": (lca, "asdl", "ef"),
    "BackPackGGN": (lcb, "backpack", "ggn"),
    "BackPackEF": (lcb, "backpack", "ef"),
}
METHODS = (
    "jacobians",
    "functorch_jacobians",
    "last_layer_jacobians",
    "selected_output_jacobians",
    "gradients",
    "full",
    "kron",
    "diag",
)
CALLS = collections.Counter()
MODE = os.environ.get("CURVLIB_SWAP", "all")
ORIGINALS = {}


def _selected():
    if MODE == "all":
        return list(MAPPING)
    if MODE == "default":
        return ["CurvlinopsGGN"]
    if MODE == "none":
        return []
    names = [n.strip() for n in MODE.split(",") if n.strip()]
    bad = [n for n in names if n not in MAPPING]
    if bad:
        raise ValueError(f"CURVLIB_SWAP: unknown names {bad}; known: {list(MAPPING)}")
    return names


def _adapter(name, backend, curvature):
    from curvlib.integrations.laplace import CurvlibLaplaceBackend, laplace_backend

    base = laplace_backend(backend, curvature)
    assert issubclass(base, CurvlibLaplaceBackend), base

    def counted(meth):
        def f(self, *a, **k):
            CALLS[f"adapter:{name}.{meth}"] += 1
            return getattr(super(cls, self), meth)(*a, **k)

        f.__name__ = meth
        return f

    ns = {m: counted(m) for m in METHODS if hasattr(base, m)}

    def __init__(self, *a, **k):
        CALLS[f"adapter:{name}.__init__"] += 1
        super(cls, self).__init__(*a, **k)

    ns["__init__"] = __init__
    ns["__module__"] = "curvlib_swap"
    cls = type(name, (base,), ns)
    cls.__qualname__ = name
    return cls


def _count_laplace_originals():
    """Wrap (in place) the methods laplace's own backend code defines, to count leaks.

    Only classes that are not bases of the adapters are touched (laplace's
    CurvatureInterface/GGNInterface/EFInterface are shared with the adapters).
    """
    shared = {lc.CurvatureInterface, lc.GGNInterface, lc.EFInterface, object}
    seen = set()
    for mod in (lcc, lca, lcb):
        for attr in dir(mod):
            k = getattr(mod, attr)
            if not isinstance(k, type) or not issubclass(k, lc.CurvatureInterface):
                continue
            if k in shared or k in seen or k.__module__ != mod.__name__:
                continue
            seen.add(k)
            for m in METHODS:
                fn = k.__dict__.get(m)
                if fn is None or not callable(fn):
                    continue

                def wrap(fn, tag):
                    @functools.wraps(fn)
                    def f(*a, **kw):
                        CALLS[tag] += 1
                        return fn(*a, **kw)

                    return f

                setattr(k, m, wrap(fn, f"laplace:{k.__name__}.{m}"))


def pytest_configure(config):
    _count_laplace_originals()  # before swapping, so it sees laplace's classes
    for name in _selected():
        mod, backend, curvature = MAPPING[name]
        ORIGINALS[name] = getattr(mod, name)
        new = _adapter(name, backend, curvature)
        for m in (lc, mod, lbl, lll, lsn, lmt):
            if hasattr(m, name):
                setattr(m, name, new)

    # defaults bound at definition time
    def swap(defaults):
        if not defaults:
            return defaults
        out = []
        for d in defaults:
            for name, orig in ORIGINALS.items():
                if d is orig:
                    d = getattr(lc, name)
            out.append(d)
        return tuple(out)

    lmt.marglik_training.__defaults__ = swap(lmt.marglik_training.__defaults__)
    for klass in (lbl.FunctionalLaplace, lll.FunctionalLLLaplace):
        klass.__init__.__defaults__ = swap(klass.__init__.__defaults__)


def pytest_unconfigure(config):
    ad = sum(v for k, v in CALLS.items() if k.startswith("adapter:"))
    la = sum(v for k, v in CALLS.items() if k.startswith("laplace:"))
    print(f"\n[curvlib_swap] mode={MODE} swapped={sorted(ORIGINALS)}")
    print(f"[curvlib_swap] calls reaching curvlib adapters={ad} laplace's own backend code={la}")
    for k, v in sorted(CALLS.items()):
        print(f"  {k}: {v}")
    path = os.environ.get("CURVLIB_SWAP_COUNTS")
    if path:
        with open(path, "w") as fh:
            json.dump(
                {"mode": MODE, "swapped": sorted(ORIGINALS), "calls": dict(CALLS)},
                fh,
                indent=1,
                sort_keys=True,
            )
