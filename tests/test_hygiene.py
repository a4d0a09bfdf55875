"""No trace on the user's model or process, on success and on failure.

For every backend x curvature x entry point (read from the registry), on a model carrying
state a careless backend would change (mixed training flags, existing and missing
``.grad``, a frozen parameter, a buffer, a user attribute and a user hook):

* a successful call leaves hooks, attributes, ``.grad``, ``requires_grad``, training
  flags, buffers and the Parameter objects themselves as they were
  (``reference.model_state``), and the global RNG too (an MC call is given a generator);
  the same call again gives the same numbers;
* a failure injected mid-computation — a module whose ``forward`` raises on its n-th call
  (in curvlib's first forward pass it is re-raised as ``InputError`` chained from the
  original), a backward pass that raises on its n-th pass through the module's output —
  or raised by curvlib itself after the forward pass (a class index out of range), for
  ``n`` the first, second and last of a clean run's passes, leaves the same state and the
  global RNG; afterwards the same model gives the same numbers;
* an MC call without a generator draws from the global RNG (advancing it) on success only;
* 200 calls of each backend's ``diag``, ``kron`` and ``full`` leave no live tensors or
  modules behind;
* every backend, in a random order on one model, gives the numbers it gives alone.

Entry points a backend does not support on the model are refusals: those leave no trace
either (``oracle.expect_refusal``).
"""

from __future__ import annotations

import copy
import functools
import gc
import pickle
import random

import oracle
import pytest
import reference as ref
import torch
from torch import Tensor, nn

import curvlib
from curvlib.backends import registry
from curvlib.errors import InputError, TargetError

DT = torch.float64
ENTRIES = [e for e in oracle.ENTRIES if e.name != "kron_reduce"]
FAILURES = ("forward", "backward", "curvlib")
LEAK_STRUCTURES = ("diag", "kron", "full")


def jobs(backends: list[str] | None = None) -> list[tuple[str, str, oracle.Entry]]:
    return [j for j in oracle.jobs(backends) if j[2] in ENTRIES]


class Injected(RuntimeError):
    """The failure the tests inject."""


class Injector:
    """Makes ``module`` fail on its n-th forward call or n-th backward pass.

    ``kind="forward"``: the module's ``forward`` is replaced (an instance attribute, i.e.
    user state that must survive) by one that raises on call ``n``; ``kind="backward"``: a
    forward hook (user state too) puts a tensor hook on the output that raises on the n-th
    backward pass through it. ``n=None`` only counts.
    """

    def __init__(self, module: nn.Module, kind: str) -> None:
        self.kind, self.n, self.calls = kind, None, 0
        if kind == "forward":
            original = type(module).forward.__get__(module)

            def forward(*args, **kwargs):
                self.calls += 1
                if self.calls == self.n:
                    raise Injected(f"forward call {self.calls}")
                return original(*args, **kwargs)

            module.forward = forward
        else:
            module.register_forward_hook(self._hook)

    def _hook(self, mod: nn.Module, args: tuple, out: Tensor) -> None:
        if out.requires_grad:
            out.register_hook(self._backward)

    def _backward(self, grad: Tensor) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise Injected(f"backward pass {self.calls}")

    def arm(self, n: int | None) -> None:
        self.n, self.calls = n, 0


def make_model() -> nn.Sequential:
    """A model with state a careless backend would change."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)
        ).to(DT)
    model.train()
    model[1].eval()  # mixed training flags
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)  # existing and missing .grad
    model[4].bias.grad = torch.full_like(model[4].bias, -1.0)
    model[2].bias.requires_grad_(False)  # a frozen parameter
    model[0].register_buffer("running_stat", torch.arange(3.0, dtype=DT))
    model[4].note = "user attribute"
    model[4].register_forward_hook(lambda mod, args, out: None)  # a user hook
    return model


def data(seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 4, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)


def problem(model: nn.Module, y: Tensor | None = None) -> oracle.Problem:
    x, y0 = data()
    return oracle.Problem(model, x, y0 if y is None else y, "classification", N=9)


def run(backend, curvature, entry, model, y=None) -> Tensor:
    return oracle.call(backend, curvature, entry, problem(model, y))[1]


def supported(backend, curvature, entry, model) -> bool:
    return oracle.report(backend, curvature, entry, problem(model)).supported


def check_success(backend: str, curvature: str, entry: oracle.Entry) -> None:
    oracle.get_class(backend, curvature)
    model = make_model()
    if not supported(backend, curvature, entry, model):
        oracle.expect_refusal(lambda: run(backend, curvature, entry, model), model)
        return
    W = model[0].weight
    before = ref.model_state(model)
    rng = torch.get_rng_state()
    first = run(backend, curvature, entry, model)
    ref.assert_same_state(before, ref.model_state(model))
    assert model[0].weight is W
    assert torch.equal(rng, torch.get_rng_state()), "global RNG changed"
    assert torch.equal(run(backend, curvature, entry, model), first)  # and it is reproducible


def _ns(total: int) -> list[int]:
    return sorted({1, min(2, total), total}) if total > 0 else []


def check_failure(backend: str, curvature: str, entry: oracle.Entry, kind: str) -> None:
    oracle.get_class(backend, curvature)
    if not supported(backend, curvature, entry, make_model()):
        return  # a refusal: check_success covers it
    expected = run(backend, curvature, entry, make_model())  # a clean model
    model = make_model()
    if kind == "curvlib":  # curvlib's own error after the forward pass (class range)
        if entry.what == "jacobians":
            return  # no targets to check
        before = ref.model_state(model)
        rng = torch.get_rng_state()
        with pytest.raises(TargetError):
            run(backend, curvature, entry, model, y=data()[1] + 3)
        ref.assert_same_state(before, ref.model_state(model))
        assert torch.equal(rng, torch.get_rng_state())
        assert ref.rel_err(run(backend, curvature, entry, model), expected) < 1e-12
        return
    injector = Injector(model[2], kind)
    injector.arm(None)
    assert ref.rel_err(run(backend, curvature, entry, model), expected) < 1e-12  # harmless
    total = injector.calls
    if kind == "forward":
        assert total >= 1
    for n in _ns(total):  # no backward pass through model[2]: nothing to inject
        before = ref.model_state(model)
        rng = torch.get_rng_state()
        injector.arm(n)
        with pytest.raises((Injected, InputError)) as info:
            run(backend, curvature, entry, model)
        # a failure of the user's forward in curvlib's first forward pass is an InputError
        # chained from it
        assert isinstance(info.value, Injected) or isinstance(info.value.__cause__, Injected)
        ref.assert_same_state(before, ref.model_state(model))
        assert torch.equal(rng, torch.get_rng_state()), f"global RNG changed (n={n})"
        assert injector.calls == n  # it stopped at the failure
        injector.arm(None)
        # nothing left behind: the same model computes the same numbers afterwards
        assert ref.rel_err(run(backend, curvature, entry, model), expected) < 1e-12, n


JOBS = jobs()
JOB_IDS = [oracle.job_id(j) for j in JOBS]


@pytest.mark.parametrize("backend, curvature, entry", JOBS, ids=JOB_IDS)
def test_success_leaves_no_trace(backend, curvature, entry):
    check_success(backend, curvature, entry)


@pytest.mark.parametrize("kind", FAILURES)
@pytest.mark.parametrize("backend, curvature, entry", JOBS, ids=JOB_IDS)
def test_failure_leaves_no_trace(backend, curvature, entry, kind):
    check_failure(backend, curvature, entry, kind)


@pytest.mark.parametrize("backend", list(registry()))
def test_mc_without_generator_draws_from_the_global_rng_on_success_only(backend):
    """Without a generator the MC Fisher draws from the global RNG (advancing it, as any
    torch sampling does): the same global seed gives the same numbers and the same state
    afterwards; a failed call leaves the global RNG as it was."""
    cls = oracle.get_class(backend, "fisher")
    x, y = data()
    for what in cls.structures:
        curv = cls(make_model(), "classification")
        results, states = [], []
        for _ in range(2):
            torch.manual_seed(123)
            start = torch.get_rng_state()
            out = curv.kron(x, y, N=9)[1].to_matrix() if what == "kron" else None
            if out is None:
                out = getattr(curv, what)(x, y)[1]
            if not isinstance(out, torch.Tensor):  # a structure: its dense matrix
                out = out.to_matrix()
            results.append(out)
            states.append(torch.get_rng_state())
        assert torch.equal(results[0], results[1]), (backend, what)
        assert torch.equal(states[0], states[1]), (backend, what)
        assert not torch.equal(states[0], start), (backend, what)  # it drew from it
        torch.manual_seed(123)
        with pytest.raises(TargetError):
            getattr(curv, what)(x, y + 3)
        assert torch.equal(start, torch.get_rng_state()), (backend, what)


# -- curvlib._hygiene.preserved_model ------------------------------------------------------
def test_preserved_model_undoes_everything():
    from curvlib.interface import preserved_model

    model = make_model()
    x, y = data()

    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[0].register_buffer("stat", torch.zeros(3))
    model[2]._is_full_backward_hook = False  # stale: no backward hooks left
    before = ref.model_state(model)
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="inside"), preserved_model(model):
        assert model[2]._is_full_backward_hook is None  # cleared for the block
        model[0].stat.add_(1.0)  # in place, as running statistics are updated
        model[0].register_forward_hook(lambda *a: None)
        model[2].register_full_backward_hook(lambda *a: None)
        model[0].extra_attribute = 1
        model[0].weight.extra = 2
        model.eval()
        nn.CrossEntropyLoss()(model(x), y).backward()
        torch.manual_seed(123)
        torch.rand(3)
        raise RuntimeError("inside")
    ref.assert_same_state(before, ref.model_state(model))
    assert torch.equal(rng, torch.get_rng_state())
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert torch.equal(model[0].stat, torch.zeros(3))
    assert model[2]._is_full_backward_hook is False


# -- leaks ------------------------------------------------------------------------------------
def _live() -> tuple[int, int]:
    """Live ``torch.Tensor`` and ``nn.Module`` objects (after a full collection)."""
    gc.collect()
    tensors = modules = 0
    for o in gc.get_objects():
        t = type(o)  # not isinstance: some lazy module proxies warn on __class__
        if issubclass(t, Tensor):
            tensors += 1
        elif issubclass(t, nn.Module):
            modules += 1
    return tensors, modules


def check_no_leak(backend: str, structure: str, calls: int = 200) -> None:
    cls = oracle.get_class(backend, "ggn")
    if structure not in cls.structures:
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)
    x, y = torch.randn(2, 3, dtype=DT), torch.tensor([0, 1])
    curv = cls(model, "classification")
    method = getattr(curv, structure)
    for _ in range(3):  # caches fill on the first calls
        method(x, y)
    before = _live()
    for _ in range(calls):
        method(x, y)
    after = _live()
    assert after <= before, f"{backend} {structure}: live (tensors, modules) {before} -> {after}"


@pytest.mark.parametrize("structure", LEAK_STRUCTURES)
@pytest.mark.parametrize("backend", list(registry()))
def test_no_leak_over_many_calls(backend, structure):
    check_no_leak(backend, structure)


# -- backends one after another on one model -----------------------------------------------
def _sequence_jobs(backends: list[str]) -> list[tuple[str, str, oracle.Entry]]:
    out = []
    for job in jobs(backends):
        try:
            oracle.get_class(*job[:2])
        except pytest.skip.Exception:
            continue
        if supported(*job, make_model()):
            out.append(job)
    return out


@functools.cache
def _alone(job: tuple[str, str, oracle.Entry]) -> Tensor:
    """The result of ``job`` alone on a fresh model."""
    return run(*job, make_model())


def run_in_order(order: list, model: nn.Module) -> None:
    before = ref.model_state(model)
    for job in order:
        got = run(*job, model)
        assert ref.rel_err(got, _alone(job)) < 1e-10, (job, order.index(job))
        try:
            ref.assert_same_state(before, ref.model_state(model))
        except AssertionError as err:
            raise AssertionError(f"{job} changed the model ({err})") from None


@pytest.mark.parametrize("seed", [0, 1])
def test_all_backends_in_a_random_order_on_one_model(seed):
    """Every backend's computations shuffled on one model: each gives what it gives alone."""
    order = _sequence_jobs(list(registry()))
    random.Random(seed).shuffle(order)
    run_in_order(order, make_model())


def test_model_deep_copies_and_pickles_after_every_backend():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    for job in _sequence_jobs(list(registry())):
        run(*job, model)
    copy.deepcopy(model)
    pickle.dumps(model)
    assert curvlib.AutogradGGN(model, "classification").diag(*data())[1].isfinite().all()
