"""The size estimate before dense work (``curvlib._memory``): refused by name, before the work.

A dense request whose estimate exceeds the limit raises ``MemoryLimitError`` naming the
estimate (checked against the memory model's formula), the limit and its source, and the
cheaper structures that fit. "Before the work" is measured: a probe on the first layer
counts forward and backward passes, and torch's own allocator accounting (the autograd
profiler with ``profile_memory``) shows that no large tensor was allocated.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from curvlib import MemoryLimitError
from curvlib._memory import ENV_VAR, Sizes, check, human, limit_of, parse_limit
from curvlib.backends import backend_class, registry
from curvlib.errors import InputError

B, C = 8, 10


def mlp(*widths: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def batch(d: int, c: int = C, b: int = B):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, d, generator=g), torch.randint(0, c, (b,), generator=g)


def classes_with(entry: str) -> list[tuple[str, str]]:
    out = []
    for backend, curvatures in registry().items():
        for curvature in curvatures:
            try:
                cls = backend_class(backend, curvature)
            except ImportError:
                continue
            key = "fisher" if curvature == "fisher" else cls.curvature_name()
            if entry in cls.capability_row(key):
                out.append((backend, curvature))
    return out


class Probe:
    """Forward passes through ``module`` and backward passes through its output."""

    def __init__(self, module: nn.Module) -> None:
        self.forward = self.backward = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, mod, args, out) -> None:
        self.forward += 1
        if out.requires_grad:
            out.register_hook(self._count)

    def _count(self, grad) -> None:
        self.backward += 1


def largest_allocation(fn) -> tuple[int, BaseException | None]:
    """The largest CPU allocation (bytes) of one op during ``fn()``, and its exception."""
    err = None
    with torch.autograd.profiler.profile(profile_memory=True, use_kineto=False) as prof:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- returned to the test
            err = e
    return max((e.cpu_memory_usage for e in prof.function_events), default=0), err


@pytest.fixture(autouse=True)
def no_env_limit(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


# -- full at P = 52,760: refused before any forward pass, nothing allocated ----------------
BIG = (200, 250, C)
P_BIG = 200 * 250 + 250 + 250 * C + C


@pytest.mark.parametrize("backend,curvature", classes_with("full"), ids=lambda v: v)
def test_full_refused_before_any_work(backend, curvature):
    model = mlp(*BIG)
    assert sum(p.numel() for p in model.parameters()) == P_BIG == 52_760
    x, y = batch(BIG[0])
    curv = backend_class(backend, curvature)(model, "classification", memory_limit="1G")
    probe = Probe(model[0])
    peak, err = largest_allocation(lambda: curv.full(x, y))
    assert isinstance(err, MemoryLimitError), err
    msg = str(err)
    # the estimate: P^2 (+ P, or + B*P: B*C*P at its lower bound C = 1 before the forward)
    extra = B * P_BIG if "P2+BCP" in msg else P_BIG
    assert human(4 * (P_BIG**2 + extra)) in msg
    assert "10.4 GiB" in msg
    assert "more than the limit of 1.0 GiB (memory_limit)" in msg
    key = "fisher" if curvature == "fisher" else curv.curvature_name()
    if curv.capability_row(key)["diag"].memory == "P":
        assert re.search(r"Cheaper structures that fit: diag \(206\.1 KiB\)", msg), msg
    else:  # ASDL's Hessian diagonal holds the per-layer blocks: 9.4 GiB does not fit
        assert "diag (" not in msg
    assert "kron" not in msg or "kron (" in msg or "not estimated: kron" in msg
    assert probe.forward == 0 and probe.backward == 0
    assert peak < 2**20, f"allocated {human(peak)} before refusing"


def test_env_var_and_option_override_the_default(monkeypatch):
    model = mlp(*BIG)
    x, y = batch(BIG[0])
    monkeypatch.setenv(ENV_VAR, "1G")
    with pytest.raises(MemoryLimitError, match=rf"limit of 1\.0 GiB \({ENV_VAR}\)"):
        backend_class("autograd", "ggn")(model, "classification").full(x, y)
    # the option wins over the environment variable
    with pytest.raises(MemoryLimitError, match=r"limit of 512\.0 MiB \(memory_limit\)"):
        backend_class("autograd", "ggn")(model, "classification", memory_limit="512M").full(x, y)


# -- Jacobians: B*C*P, estimated after the first forward pass, before any backward ---------
@pytest.mark.parametrize("backend,curvature", classes_with("jacobians"), ids=lambda v: v)
def test_jacobians_refused_after_the_forward_before_any_backward(backend, curvature):
    model = mlp(*BIG)
    x, _ = batch(BIG[0])
    # B*P (the bound before the forward) = 1.6 MiB fits, B*C*P = 16.1 MiB does not
    curv = backend_class(backend, curvature)(model, "classification", memory_limit="8M")
    probe = Probe(model[0])
    with pytest.raises(MemoryLimitError) as info:
        curv.jacobians(x)
    msg = str(info.value)
    assert f"needs about {human(4 * B * C * P_BIG)}" in msg, msg
    assert f"B = {B}, C = {C}" in msg
    assert "smaller batches" in msg
    assert probe.forward >= 1, "C is known only after the first forward pass"
    assert probe.backward == 0


def test_jacobians_lower_bound_before_the_forward():
    """Where even ``C = 1`` exceeds the limit, the call is refused before any forward pass."""
    model = mlp(*BIG)
    x, _ = batch(BIG[0])
    curv = backend_class("autograd", "ggn")(model, "classification", memory_limit="1M")
    probe = Probe(model[0])
    with pytest.raises(MemoryLimitError, match=rf"needs at least {human(4 * B * P_BIG)}.*C >= 1"):
        curv.jacobians(x)
    assert probe.forward == 0


# -- ASDL's Hessian diagonal: the per-layer blocks sum_l P_l^2 -----------------------------
def _asdl_hessian():
    try:
        return backend_class("asdl", "hessian")
    except ImportError as err:
        pytest.skip(f"asdl unavailable: {err}")


def test_asdl_hessian_diag_layer_blocks():
    cls = _asdl_hessian()
    model = mlp(300, 320, C)
    P1, P2 = 300 * 320 + 320, 320 * C + C
    assert P1 + P2 == 99_530  # a 100k-parameter MLP
    x, y = batch(300)
    probe = Probe(model[0])
    with pytest.raises(MemoryLimitError) as info:
        cls(model, "classification", memory_limit="16G").diag(x, y)
    msg = str(info.value)
    assert f"needs about {human(4 * (P1**2 + P2**2))}" in msg  # 34.6 GiB
    assert "memory model layer_blocks" in msg and "16.0 GiB (memory_limit)" in msg
    assert probe.forward == 0


def test_default_limit_is_the_available_memory():
    """One 2000 x 2000 layer: ASDL's Hessian diagonal block needs 58 TiB, beyond any machine."""
    cls = _asdl_hessian()
    model = nn.Linear(2000, 2000)
    x = torch.randn(2, 2000)
    y = torch.randn(2, 2000)
    P = 2000 * 2000 + 2000
    with pytest.raises(MemoryLimitError) as info:
        cls(model, "regression").diag(x, y)
    msg = str(info.value)
    assert f"needs about {human(4 * (P**2))}" in msg
    assert "(memory available on cpu)" in msg


# -- the limit's sources and parsing -----------------------------------------------------
def test_sources_in_order(monkeypatch):
    cpu = torch.device("cpu")
    assert limit_of("2K", cpu) == (2048, "memory_limit")
    monkeypatch.setenv(ENV_VAR, "3M")
    assert limit_of(None, cpu) == (3 * 2**20, ENV_VAR)
    assert limit_of("2K", cpu) == (2048, "memory_limit")  # the option first
    assert limit_of("none", cpu) == (None, "memory_limit")  # no limit, whatever the env says
    monkeypatch.setenv(ENV_VAR, "none")
    assert limit_of(None, cpu) == (None, ENV_VAR)
    monkeypatch.setenv(ENV_VAR, "  ")  # empty: unset
    cap, source = limit_of(None, cpu)
    assert source == "memory available on cpu" and cap is not None and cap > 0


def test_option_and_env_limits_in_a_call(monkeypatch):
    """A tiny model's ``full``: refused under the environment's 1 KiB, computed with the
    option's larger limit or without a limit, with the same numbers as without any."""
    model = mlp(3, 4, 3).double()
    x, y = batch(3, c=3)
    x = x.double()
    cls = backend_class("autograd", "ggn")
    expected = cls(model, "classification", memory_limit=0).full(x, y)[1]
    P = 3 * 4 + 4 + 4 * 3 + 3
    monkeypatch.setenv(ENV_VAR, "1K")
    with pytest.raises(
        MemoryLimitError, match=rf"{human(8 * (P * P + P))}.*1\.0 KiB \({ENV_VAR}\)"
    ):
        cls(model, "classification").full(x, y)
    for option in ("1M", "none", 0, None):
        if option is None:
            monkeypatch.setenv(ENV_VAR, "0")
        H = cls(model, "classification", memory_limit=option).full(x, y)[1]
        assert torch.equal(H, expected)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("4G", 4 * 2**30),
        ("4GiB", 4 * 2**30),
        ("4gb", 4 * 2**30),
        ("1.5K", 1536),
        ("512", 512),
        (" 2 M ", 2 * 2**20),
        (2**20, 2**20),
        (1e9, 10**9),
        ("none", None),
        ("0", None),
        (0, None),
        (None, None),
    ],
)
def test_parse_limit(value, expected):
    assert parse_limit(value, "memory_limit") == expected


@pytest.mark.parametrize(
    "value", ["lots", "12 apples", "-1", "-2G", "inf", "nanG", -1, float("inf"), True, [1]]
)
def test_parse_errors_are_input_errors(value, monkeypatch):
    with pytest.raises(InputError, match=r"memory_limit"):
        parse_limit(value, "memory_limit")
    with pytest.raises(InputError, match=r"memory_limit"):
        backend_class("autograd", "ggn")(mlp(3, 3), "classification", memory_limit=value)
    if isinstance(value, str):
        monkeypatch.setenv(ENV_VAR, value)
        curv = backend_class("autograd", "ggn")(mlp(3, 3), "classification")
        x, y = batch(3, c=3)
        probe = Probe(curv.model[0])
        with pytest.raises(InputError, match=ENV_VAR):
            curv.diag(x, y)
        assert probe.forward == 0


def test_check_offers_only_structures_that_fit():
    sizes = Sizes(P=1000, P_s=1000, B=4, kron_entries=lambda: 5000)
    alternatives = [
        ("diag", "P"),
        ("kron", "kron"),
        ("jacobians", "BCP"),
        ("gradients", "BP"),
        ("lowrank", "lowrank"),
    ]
    with pytest.raises(MemoryLimitError) as info:
        check("full", "P2", sizes, 4, (200_000, "memory_limit"), alternatives, "ggn")
    msg = str(info.value)
    assert "needs about 3.8 MiB" in msg and "195.3 KiB (memory_limit)" in msg
    assert "diag (3.9 KiB), kron (19.5 KiB)" in msg
    assert "jacobians" not in msg and "gradients" not in msg and "lowrank" not in msg
    # not computed (0) is named as not estimated, never offered as 0 B
    sizes = Sizes(P=1000, P_s=1000, B=4)
    with pytest.raises(MemoryLimitError, match=r"diag \(3\.9 KiB\) \(not estimated: kron\)"):
        check("full", "P2", sizes, 4, (200_000, "memory_limit"), alternatives[:2], "ggn")
    # within the limit, or no limit: nothing raised
    check("full", "P2", sizes, 4, (10**7, "memory_limit"), alternatives)
    check("full", "P2", sizes, 4, (None, "memory_limit"), alternatives)
