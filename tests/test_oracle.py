"""Every backend x curvature x entry point x shared case against the brute force.

The parametrization is read from the registry (``curvlib.backends.registry()``) when the
tests are collected; the expected refusals from the capability table (``curvlib.supports``).
Each test is one call of :func:`oracle.check`, which also asserts that ``supports`` agrees
with the call on every shared case (``tests/test_capabilities.py`` does the same over a zoo
of models). Library bugs found are ``xfail(strict=True)`` (``tests/known_bugs.py``).
"""

from __future__ import annotations

import oracle
import pytest
from cases import CASE_IDS


@pytest.mark.parametrize("backend, curvature, entry, case", oracle.params(oracle.jobs(), CASE_IDS))
def test_oracle(backend, curvature, entry, case):
    oracle.check(backend, curvature, entry, oracle.CASE_BY_NAME[case])
