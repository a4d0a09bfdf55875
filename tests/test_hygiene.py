"""Every registered backend, in any order, on one model: same results, model untouched.

BackPACK's ``extend`` and ASDL's hooks must be undone after every call (DESIGN §5), so that
the backends can be used one after another on the same model. The jobs are built from
``curvlib.backends.registry()``, so a backend is covered the moment it is registered.
"""

from __future__ import annotations

import itertools
import random

import pytest
import reference as ref
import torch
from reference import LEGACY
from torch import nn

from curvlib.backends import backend_class, registry
from curvlib.errors import CapabilityError, UnsupportedModuleError

BACKENDS = list(registry())


def make_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).double()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    # state a careless backend would change: training mode, existing and missing .grad
    model.train()
    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)
    model[5].bias.grad = torch.full_like(model[5].bias, -1.0)
    return model, x, y


def jobs_of(backend: str, x: torch.Tensor, y: torch.Tensor) -> dict:
    """``{(backend, curvature, what): job(model)}`` for everything ``backend`` offers."""
    jobs = {}
    for curvature in registry()[backend]:
        try:
            cls = backend_class(backend, curvature)
        except ImportError as err:  # an optional library that is absent
            pytest.skip(f"backend {backend!r} unavailable: {err}")

        def call(model: nn.Module, what: str, curvature=curvature):
            return ref.run_job(backend, curvature, what, model, x, y, seed=5)

        whats = list(LEGACY(cls.structures))
        if curvature == "ggn":
            whats += ["jacobians", "gradients"]
        for what in whats:
            jobs[(backend, curvature, what)] = lambda model, what=what, call=call: call(model, what)
    return jobs


def reference_results(jobs: dict) -> dict:
    """Each job once, alone on a fresh model, checked for leaving that model untouched."""
    results = {}
    for key, job in jobs.items():
        model, _, _ = make_model()
        before = ref.model_state(model)
        try:
            results[key] = job(model)
        except (UnsupportedModuleError, CapabilityError):
            pass  # declared and refused before any work: not part of the mix
        ref.assert_same_state(before, ref.model_state(model))
    return results


def run_in_order(order: list, jobs: dict, expected: dict, model: nn.Module) -> None:
    before = ref.model_state(model)
    for key in order:
        out = jobs[key](model)
        assert ref.rel_err(out, expected[key]) < 1e-10, (key, order.index(key))
        state = ref.model_state(model)
        try:
            ref.assert_same_state(before, state)
        except AssertionError as err:
            raise AssertionError(f"{key} changed the model ({err})") from None


@pytest.fixture(scope="module")
def all_jobs() -> tuple[dict, dict]:
    """Every registered backend's jobs and their results alone on a fresh model (once)."""
    _, x, y = make_model()
    jobs = {}
    for backend in BACKENDS:
        jobs.update(jobs_of(backend, x, y))
    expected = reference_results(jobs)
    assert expected, "no job ran"
    return jobs, expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_backends_any_order(seed, all_jobs):
    jobs, expected = all_jobs
    model, _, _ = make_model()
    order = list(expected)
    random.Random(seed).shuffle(order)
    run_in_order(order, jobs, expected, model)


@pytest.mark.parametrize(
    "first,second",
    [p for p in itertools.permutations(BACKENDS, 2)],
    ids=[f"{a}-then-{b}" for a, b in itertools.permutations(BACKENDS, 2)],
)
def test_backend_after_backend(first, second, all_jobs):
    """All of one backend's computations, then all of another's."""
    jobs, expected = all_jobs
    model, _, _ = make_model()
    keys = [k for b in (first, second) for k in expected if k[0] == b]
    run_in_order(keys, jobs, expected, model)
