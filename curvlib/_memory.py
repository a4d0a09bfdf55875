r"""The size estimate before dense work, against a memory limit.

Each capability row names a memory model (:data:`MODELS`): the number of tensor entries the
call holds at its peak, as a function of ``P`` (selected parameters), ``P_s`` (after
``subnetwork_indices``), ``B`` (batch), ``C`` (output entries per data point, known after
the first forward pass), ``K`` (cotangent columns) and the parameter shapes. The estimate in
bytes (entries × the parameters' item size) is compared with the limit before the call
allocates: by default the memory available on the model's device (``MemAvailable`` of
``/proc/meminfo`` on the CPU, ``torch.cuda.mem_get_info`` on CUDA), overridden by the
``memory_limit`` option of a curvature object (first) or the environment variable
``CURVLIB_MEMORY_LIMIT`` (bytes, or a number with ``K``/``M``/``G``/``T``, binary units;
``none`` or ``0`` for no limit; an empty variable counts as unset). A value that does not
parse is an :class:`~curvlib.errors.InputError` naming its source. Above the limit the call
raises :class:`~curvlib.errors.MemoryLimitError` with the estimate, the limit and its
source, and the cheaper structures that would fit.

The check runs before any forward pass; models that read ``C`` are checked then with the
lower bound ``C = 1`` and again after the first forward pass, when ``C`` is known, before
any backward pass.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from curvlib.errors import InputError, MemoryLimitError

__all__ = [
    "Sizes",
    "MODELS",
    "USES_C",
    "ENV_VAR",
    "parse_limit",
    "limit_of",
    "estimate",
    "check",
    "human",
]

ENV_VAR = "CURVLIB_MEMORY_LIMIT"


@dataclass
class Sizes:
    """What a memory model reads.

    ``kron_entries`` (entries of the K-FAC factors) and ``layer_blocks``
    (:math:`\\sum_l P_l^2` over the modules owning parameters) may be given as zero-argument
    callables, evaluated only when a memory model reads them; ``0`` means not computed.
    """

    P: int
    P_s: int
    B: int
    C: int | None = None
    K: int = 1
    kron_entries: int | Callable[[], int] = 0
    layer_blocks: int | Callable[[], int] = 0
    shapes: list[tuple[int, ...]] = field(default_factory=list)

    def count(self, name: str) -> int | None:
        """``kron_entries`` or ``layer_blocks``, evaluated; ``None`` if not computed."""
        value = getattr(self, name)
        if callable(value):
            value = int(value())
            setattr(self, name, value)
        return value or None


def _needs_C(f: Callable[[Sizes], int]) -> Callable[[Sizes], int | None]:
    def g(s: Sizes) -> int | None:
        return None if s.C is None else f(s)

    return g


#: memory model name -> entries held at the peak (``None``: not known before the forward)
MODELS: dict[str, Callable[[Sizes], int | None]] = {
    "P": lambda s: s.P,
    "PK": lambda s: 8 * s.P,
    "P2": lambda s: s.P_s * s.P_s + s.P,
    "P2+BCP": _needs_C(lambda s: s.P_s * s.P_s + s.B * s.C * s.P),
    "BCP": _needs_C(lambda s: s.B * s.C * s.P),
    "BP": lambda s: s.B * s.P,
    "kron": lambda s: s.count("kron_entries"),
    "lowrank": lambda s: 64 * s.P,
    "layer_blocks": lambda s: s.count("layer_blocks"),
}

#: the memory models that read ``C`` (checked again after the first forward pass)
USES_C = ("P2+BCP", "BCP")
#: entry points that are no structure, never offered as a cheaper alternative
_NOT_STRUCTURES = ("jacobians", "gradients", "last_layer_jacobians")

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human(n: float) -> str:
    """A byte count as ``12.3 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def parse_limit(value: Any, source: str) -> int | None:
    """A limit in bytes from an int, or a string like ``"4G"``; ``None``/0/"none": no limit."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(f"{source} must be a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise InputError(f"{source} must be a non-negative number of bytes, got {value!r}")
        return None if value == 0 else int(value)
    if isinstance(value, str):
        text = value.strip().upper().removesuffix("IB").removesuffix("B")
        if text in ("NONE", "", "0"):
            return None
        unit = text[-1] if text[-1] in _UNITS else ""
        number = text[:-1] if unit else text
        try:
            v = float(number)
        except ValueError:
            raise InputError(
                f"{source} must be bytes or a number with K/M/G/T (e.g. '4G'), got {value!r}"
            ) from None
        if not math.isfinite(v) or v < 0:
            raise InputError(f"{source} must be non-negative, got {value!r}")
        return int(v * _UNITS[unit]) or None
    raise InputError(f"{source} must be a number of bytes or a string like '4G', got {value!r}")


#: ``[time read, bytes]`` of the last reading of ``MemAvailable``, reused for
#: :data:`_MEMINFO_TTL` seconds
_MEMINFO: list = [-1e9, None]
_MEMINFO_TTL = 0.2


def _available(device: torch.device) -> int | None:
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type == "meta":
        return None
    now = time.monotonic()
    if now - _MEMINFO[0] < _MEMINFO_TTL:  # a call reads it twice (before and after forward)
        return _MEMINFO[1]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    _MEMINFO[:] = [now, int(line.split()[1]) * 1024]
                    return _MEMINFO[1]
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def limit_of(option: Any, device: torch.device) -> tuple[int | None, str]:
    """``(limit in bytes or None, where it comes from)``: option, environment, device."""
    if option is not None:
        return parse_limit(option, "memory_limit"), "memory_limit"
    env = os.environ.get(ENV_VAR)
    if env is not None and env.strip():  # set and not empty
        return parse_limit(env, ENV_VAR), ENV_VAR
    return _available(device), f"memory available on {device}"


def estimate(model: str, sizes: Sizes, itemsize: int) -> int | None:
    """Bytes the memory model ``model`` needs (``None`` if it needs ``C`` and ``C`` is unknown)."""
    entries = MODELS[model](sizes)
    return None if entries is None else int(entries) * itemsize


def check(
    what: str,
    model: str,
    sizes: Sizes,
    itemsize: int,
    limit: tuple[int | None, str],
    alternatives: Sequence[tuple[str, str]] = (),
    curvature: str = "",
) -> None:
    """Raise :class:`MemoryLimitError` if ``model``'s estimate exceeds ``limit``.

    ``alternatives`` are ``(structure, memory model)`` pairs: those whose estimate fits
    are offered with it, those the call cannot estimate (e.g. ``kron`` before its layers
    are counted) are named as not estimated.
    """
    cap, source = limit
    if cap is None:
        return
    # before the first forward pass C is unknown: C >= 1 gives a lower bound
    lower = sizes.C is None and model in USES_C
    need = estimate(model, replace(sizes, C=1) if lower else sizes, itemsize)
    if need is None or need <= cap:
        return
    fits, unknown = [], []
    for name, m in alternatives if what not in _NOT_STRUCTURES else ():
        if name == what or name in _NOT_STRUCTURES:
            continue
        n = estimate(m, sizes, itemsize)
        if n is None:
            unknown.append(name)
        elif n <= cap:
            fits.append((n, name))
    offer = ""
    if fits:
        named = [f"{name} ({human(n)})" for n, name in sorted(fits)]
        offer = f"Cheaper structures that fit: {', '.join(named)}"
        offer += f" (not estimated: {', '.join(unknown)}). " if unknown else ". "
    elif unknown:
        offer = f"Structures not estimated here that may fit: {', '.join(unknown)}. "
    raise MemoryLimitError(
        f"the {what!r} {curvature + ' ' if curvature else ''}call needs "
        f"{'at least' if lower else 'about'} {human(need)} "
        f"(memory model {model} with P = {sizes.P:,}"
        + (f", P_s = {sizes.P_s:,}" if sizes.P_s != sizes.P else "")
        + (
            f", B = {sizes.B}, " + ("C >= 1" if lower else f"C = {sizes.C}")
            if model in USES_C
            else ""
        )
        + f"), more than the limit of {human(cap)} ({source}). "
        + offer
        + f"Raise the limit with memory_limit=... or {ENV_VAR}=... (e.g. '64G'), or select "
        "fewer parameters (last_layer=True, subnetwork_indices, requires_grad=False)"
        + (", or pass smaller batches" if "B" in model else "")
    )


def param_sizes(params: Sequence[Tensor]) -> list[tuple[int, ...]]:
    """The shapes of ``params``."""
    return [tuple(p.shape) for p in params]
