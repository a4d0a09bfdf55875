"""Adapters that plug curvlib into other libraries.

:mod:`curvlib.integrations.laplace`
    :func:`~curvlib.integrations.laplace.laplace_backend` turns any curvlib backend into a
    laplace-torch 0.3 curvature backend (``Laplace(..., backend=laplace_backend(...))``).

The adapters import their target library when they are imported, so importing curvlib
itself never needs the optional extras (``pip install curvlib[laplace]``).
"""
