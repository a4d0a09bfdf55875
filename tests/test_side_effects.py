"""No side effects, even on failure (issue 10, item 3).

For every backend x curvature x structure (``curvlib.backends.registry()``), failures are
injected mid-computation — a module whose ``forward`` raises on its n-th call, and a
backward pass that raises on its n-th pass through a module's output — for every ``n`` up to
the number of calls a clean run makes (the first, second and last where there are many).
After each failure the model has the same hooks, attributes, ``.grad``, ``requires_grad``,
training flags, parameters and buffers (``reference.model_state``), the global RNG state is
unchanged, and the same model then gives the same numbers as a fresh one (nothing left
behind breaks a later call). Successful calls of deterministic curvatures, and MC calls
given a ``generator``, leave the global RNG alone too.
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from reference import LEGACY
from torch import Tensor, nn

from curvlib.backends import backend_class, registry
from curvlib.errors import InputError

DT = torch.float64


def _jobs() -> list[tuple[str, str, str]]:
    jobs = []
    for backend, curvatures in registry().items():
        for curvature in curvatures:
            try:
                cls = backend_class(backend, curvature)
            except ImportError:
                continue
            for what in LEGACY(cls.structures):
                jobs.append((backend, curvature, what))
            jobs.append((backend, curvature, "gradients"))
            if curvature == "ggn":
                jobs.append((backend, curvature, "jacobians"))
    return jobs


JOBS = _jobs()
JOB_IDS = ["-".join(j) for j in JOBS]


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


def run(job, model, x, y) -> Tensor:
    return ref.run_job(*job, model, x, y, seed=7)


def _ns(total: int) -> list[int]:
    return sorted({1, min(2, total), total}) if total > 0 else []


@pytest.mark.parametrize("kind", ["forward", "backward"])
@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
def test_failure_injection_leaves_no_trace(job, kind):
    x, y = data()
    expected = run(job, make_model(), x, y)  # a clean model, no injector
    model = make_model()
    injector = Injector(model[2], kind)
    injector.arm(None)
    assert ref.rel_err(run(job, model, x, y), expected) < 1e-12  # the injector is harmless
    total = injector.calls
    if kind == "forward":
        assert total >= 1
    ns = _ns(total)
    if not ns:
        pytest.skip(f"{job} makes no backward pass through the module's output")
    for n in ns:
        before = ref.model_state(model)
        rng = torch.get_rng_state()
        injector.arm(n)
        with pytest.raises((Injected, InputError)) as info:
            run(job, model, x, y)
        # a failure of the user's forward in curvlib's first forward pass is an InputError
        # chained from it
        assert isinstance(info.value, Injected) or isinstance(info.value.__cause__, Injected)
        ref.assert_same_state(before, ref.model_state(model))
        assert torch.equal(rng, torch.get_rng_state()), f"global RNG changed (n={n})"
        assert injector.calls == n  # it stopped at the failure
        injector.arm(None)
        # nothing left behind: the same model computes the same numbers afterwards
        assert ref.rel_err(run(job, model, x, y), expected) < 1e-12, n


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
def test_failing_target_check_mid_forward(job):
    """A failure raised by curvlib itself after the forward pass (bad class indices)."""
    model = make_model()
    x, y = data()
    before = ref.model_state(model)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError):
        run(job, model, x, y + 3) if job[2] != "jacobians" else run(job, model, x[:0], y)
    ref.assert_same_state(before, ref.model_state(model))
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("job", JOBS, ids=JOB_IDS)
def test_success_leaves_no_trace_and_global_rng_alone(job):
    """Deterministic curvatures, and MC calls given a generator, never touch the global RNG."""
    model = make_model()
    x, y = data()
    before = ref.model_state(model)
    rng = torch.get_rng_state()
    first = run(job, model, x, y)
    ref.assert_same_state(before, ref.model_state(model))
    assert torch.equal(rng, torch.get_rng_state())
    assert ref.rel_err(run(job, model, x, y), first) == 0.0  # and it is reproducible


def test_mc_without_generator_draws_from_global_rng_only():
    """Without a generator the MC Fisher draws from the global RNG (documented), and a
    library that reseeds it (ASDL) leaves no other trace: the state afterwards is what the
    same draws give, and a failed call leaves it unchanged."""
    x, y = data()
    for backend in registry():
        try:
            cls = backend_class(backend, "fisher")
        except (ImportError, ValueError):
            continue
        for what in LEGACY(cls.structures):
            model = make_model()
            curv = cls(model, "classification")
            torch.manual_seed(123)
            (curv.kron(x, y) if what == "kron" else getattr(curv, what)(x, y))
            after = torch.get_rng_state()
            torch.manual_seed(123)
            (curv.kron(x, y) if what == "kron" else getattr(curv, what)(x, y))
            assert torch.equal(after, torch.get_rng_state()), (backend, what)
            torch.manual_seed(123)
            before = torch.get_rng_state()
            with pytest.raises(ValueError):
                getattr(curv, what)(x, y + 3)
            assert torch.equal(before, torch.get_rng_state()), (backend, what)


def test_asdl_reseeding_is_contained():
    """ASDL samples MC targets from the global RNG; curvlib reseeds it inside a fork and
    draws the seed from the generator: the global state is untouched with a generator."""
    pytest.importorskip("asdl")
    from curvlib.backends.asdl import AsdlGGN

    model = make_model()
    x, y = data()
    curv = AsdlGGN(model, "classification", stochastic=True, num_samples=3)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    _, h1 = curv.diag(x, y, generator=torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.get_rng_state())
    _, h2 = curv.diag(x, y, generator=torch.Generator().manual_seed(1))
    assert torch.equal(h1, h2)  # reproducible through the generator
    _, h3 = curv.diag(x, y, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(h1, h3)


def test_deepcopy_after_calls():
    """After calls of every backend the model deep-copies and pickles as before."""
    import pickle

    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, y = data()
    for job in JOBS:
        run(job, model, x, y)
    copy.deepcopy(model)
    pickle.dumps(model)
