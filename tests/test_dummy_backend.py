"""A new backend is one class plus one registry line, and it gets the whole suite.

:class:`DummyGGN` implements one hook, ``_jacobians`` (a reverse-mode pass per output),
and registers its rows of the capability table. The GGN / MC Fisher templates build
``full`` and ``diag`` on its Jacobians; ``kron``, ``operator`` and ``gradients`` are
curvlib's shared implementations. Registered inside a fixture (the registry and the table
are put back afterwards), it is run through the same functions the suite runs over the
built-in backends, read from the registry: the oracle (``tests/oracle.py``) on every
shared case, the capability checks and ``supports``-agrees-with-the-call over the zoo
(``tests/test_capabilities.py``) and the hygiene checks (``tests/test_hygiene.py``).
"""

from __future__ import annotations

import contextlib
import copy

import known_bugs
import oracle
import pytest
import test_capabilities as caps
import test_hygiene as hygiene
import torch
from cases import CASES

import curvlib
from curvlib import backends, capabilities
from curvlib.capabilities import Capability


class DummyGGN(curvlib.GGNInterface):
    """Jacobians by one reverse-mode pass per output entry; the rest is inherited."""

    backend_name = "dummy"

    def _jacobians(self, call):
        f = call.forward(grad=True)
        rows = [
            torch.autograd.grad(
                fk, self.params, retain_graph=True, allow_unused=True, materialize_grads=True
            )
            for fk in f.flatten()
        ]
        J = torch.stack([torch.cat([g.flatten() for g in r]) for r in rows])
        return J.reshape(*f.shape, -1), f


ROWS = {
    "jacobians": Capability(memory="BCP", note="a reverse-mode pass per output"),
    "full": Capability(memory="P2+BCP", note="J^T M J from the Jacobians"),
    "diag": Capability(memory="BCP", note="from the Jacobians"),
    "kron": Capability(
        impl="shared", exact=False, memory="kron", rules=True, kfac_approx=("expand", "reduce")
    ),
    "operator": Capability(impl="shared", memory="PK"),
    "gradients": Capability(impl="shared", memory="BP"),
}


@contextlib.contextmanager
def registered():
    """``dummy`` in the registry and the capability table, only inside the block."""
    saved = (copy.deepcopy(backends._REGISTRY), copy.copy(capabilities.TABLE))
    curvlib.register_backend("dummy", "ggn", DummyGGN, capabilities=ROWS)  # the one line
    try:
        yield "dummy"
    finally:
        backends._REGISTRY.clear()
        backends._REGISTRY.update(saved[0])
        capabilities.TABLE.clear()
        capabilities.TABLE.update(saved[1])
        backends._FISHER_CACHE.pop(DummyGGN, None)


@pytest.fixture
def dummy():
    with registered() as name:
        yield name


def test_registration_is_undone():
    before = (copy.deepcopy(backends._REGISTRY), dict(capabilities.TABLE))
    with registered():
        assert curvlib.backends.registry()["dummy"] == ("ggn", "fisher")
        # the structures built on its rows come with them (curvlib's shared rows)
        derived = {"ekfac", "blocks", "lowrank"}
        assert set(capabilities.row("dummy", "fisher")) == set(ROWS) | derived
        assert "dummy" in curvlib.available()
    assert (backends._REGISTRY, capabilities.TABLE) == before
    assert "dummy" not in curvlib.backends.registry()


def each(jobs, model: str, run) -> dict[str, str]:
    """``run(*job)`` for every job; a known bug (known_bugs.py) must still show."""
    out = {}
    for job in jobs:
        bug = known_bugs.known_bug(job[0], job[1], job[2].name, model)
        if bug:
            known_bugs.expect_bug(bug, lambda job=job: run(*job))
        else:
            out[oracle.job_id(job)] = run(*job)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_oracle(dummy, case):
    jobs = oracle.jobs([dummy])
    assert {c for _, c, _ in jobs} == {"ggn", "fisher"} and len(jobs) == 2 * len(oracle.ENTRIES)
    outcomes = each(jobs, case.name, lambda *job: oracle.check(*job, case))
    if case.name == "mlp_cls":  # what the rows promise runs
        assert set(outcomes.values()) == {"computed"}


def test_capability_table(dummy, monkeypatch):
    caps.test_available_is_derived_from_the_table(monkeypatch)
    caps.test_every_row_is_complete()
    caps.test_impl_native_iff_the_backend_defines_the_hook()
    for curvature in ("ggn", "fisher"):
        caps.test_missing_entry_point_names_the_backends_that_have_it(curvature)


@pytest.mark.parametrize("name", caps.MODELS_UNDER_TEST)
def test_supports_agrees_with_the_call(dummy, name):
    each(caps.zoo_jobs([dummy]), name, lambda *job: caps.agree(*job, name))


def test_hygiene(dummy):
    for job in hygiene.jobs([dummy]):
        hygiene.check_success(*job)
        for kind in hygiene.FAILURES:
            hygiene.check_failure(*job, kind)
    hygiene.check_no_leak(dummy, "diag")  # its own hook; kron and full are the templates
