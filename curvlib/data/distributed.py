r"""The collectives of a distributed accumulation: handshake, packed sum, failure reports.

Everything here is a ``SUM`` all-reduce of ``torch.distributed`` (never ``AVG``) in which
each rank writes only into its own slots, so that after the sum every rank holds every
rank's contribution and all ranks take the same decision from the same numbers:

* :func:`handshake` — before accumulating, a **fixed-size** int64 buffer of
  ``world * HANDSHAKE_SLOTS`` entries: per rank a status, and per field a 63-bit hash of
  its full description plus its first bytes as text. The ranks compare the hashes; a
  mismatch raises the same :class:`~curvlib.errors.DistributedError` on every rank, naming
  the field and the ranks' values. Its size depends on nothing but the world size, so the
  handshake itself cannot fail with a size mismatch (gloo aborts the process on one).
* :func:`reduce_sums` — after accumulating, one packed buffer ``[status per rank,
  count_hi, count_lo, number of ranks, loss, every summand]``.
* :func:`failure_error` — the one message of a failure, built from the reduced status
  slots (code, exception type, batch index), identical on every rank.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from curvlib.errors import DistributedError, NonFiniteError

__all__ = [
    "OK",
    "FAILED",
    "NONFINITE",
    "LAYOUT",
    "NO_LENGTH",
    "INTERRUPTED",
    "status_of",
    "resolve_group",
    "world_group",
    "comm_device",
    "sum_all_reduce",
    "collective_error",
    "encode_text",
    "decode_text",
    "failure_error",
    "handshake",
    "reduce_sums",
]

# status codes, one slot per rank in every exchange
OK, FAILED, NONFINITE, LAYOUT, NO_LENGTH, INTERRUPTED = 0, 1, 2, 3, 4, 5
_REASONS = {
    FAILED: "raised an exception",
    INTERRUPTED: "was interrupted",
    NONFINITE: "produced non-finite values (NaN or inf)",
    LAYOUT: "produced results whose shapes differ from the parameters' layout",
    NO_LENGTH: (
        "cannot tell how many samples its loader yields, which the position-keyed MC "
        "sampling needs; pass index_fn (global sample indices) to fit"
    ),
}
NAME_SLOTS = 4  # an exception's type name: 32 bytes
TEXT_SLOTS = 10  # a handshake field's readable value: 80 bytes
MAX_FIELDS = 8
MAX_EXTRAS = 4
#: int64 slots per rank of the handshake: status, exception name, fields, extras
HANDSHAKE_SLOTS = 1 + NAME_SLOTS + MAX_FIELDS * (1 + TEXT_SLOTS) + MAX_EXTRAS
# counts travel as hi * 2**12 + lo so that they stay exact in a float32 buffer
_COUNT_BASE = 4096


def status_of(exc: BaseException | None) -> int:
    """The status code of a failure: interrupted, non-finite or failed (``OK`` for None)."""
    if exc is None:
        return OK
    if not isinstance(exc, Exception):
        return INTERRUPTED
    return NONFINITE if isinstance(exc, NonFiniteError) else FAILED


# --------------------------------------------------------------------------------------------
# groups and devices
# --------------------------------------------------------------------------------------------


def resolve_group(group: Any) -> Any:
    """The process group of ``fit(group=...)``: ``None`` stays ``None`` (no distribution).

    Raises
    ------
    DistributedError
        For a group without an initialized ``torch.distributed``.
    """
    if group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            f"fit(group={group!r}) needs an initialized torch.distributed process group; "
            "call torch.distributed.init_process_group (torchrun sets the environment) or "
            "pass group=None for a single process"
        )
    return dist.group.WORLD if group == "world" else group


def world_group(group: Any, what: str) -> Any:
    """The process group of an explicitly distributed call (``None``/``"world"``: world).

    Raises
    ------
    DistributedError
        Without an initialized ``torch.distributed``, naming ``what`` was called.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            f"{what} needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    return dist.group.WORLD if group is None or group == "world" else group


def comm_device(pg: Any, device: torch.device | str = "cpu") -> torch.device:
    """Device of a communication buffer: CUDA for NCCL, the CPU for gloo/MPI.

    With a mixed ``"cpu:gloo,cuda:nccl"`` backend, ``device`` (the curvature's) decides.
    """
    import torch.distributed as dist

    device = torch.device(device)
    backend = str(dist.get_backend(pg)).lower()
    if "nccl" in backend and ("gloo" not in backend or device.type == "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    return device


def sum_all_reduce(buf: Tensor, pg: Any, async_op: bool = False) -> Any:
    """``SUM`` all-reduce of ``buf`` in place; a failing collective is a DistributedError."""
    import torch.distributed as dist

    try:
        return dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=pg, async_op=async_op)
    except Exception as exc:
        raise collective_error(pg, exc) from exc


def collective_error(pg: Any, exc: BaseException) -> DistributedError:
    """The error of a collective that itself failed (a peer crashed or timed out)."""
    import torch.distributed as dist

    return DistributedError(
        f"a collective of the curvature accumulation failed on rank {dist.get_rank(pg)}: "
        f"{exc}. A peer may have crashed or timed out (see init_process_group(timeout=...))"
    )


# --------------------------------------------------------------------------------------------
# text in int64 slots
# --------------------------------------------------------------------------------------------


def encode_text(text: str, slots: int) -> list[int]:
    """The first ``8 * slots`` UTF-8 bytes of ``text`` as ``slots`` int64 values."""
    raw = text.encode("utf-8")[: 8 * slots].ljust(8 * slots, b"\0")
    return [int.from_bytes(raw[8 * i : 8 * i + 8], "little", signed=True) for i in range(slots)]


def decode_text(values: Sequence[int]) -> str:
    """Inverse of :func:`encode_text` (a character cut at the end is dropped)."""
    raw = b"".join(int(v).to_bytes(8, "little", signed=True) for v in values)
    return raw.rstrip(b"\0").decode("utf-8", errors="ignore")


def _digest(text: str) -> int:
    """A 63-bit hash of ``text`` (blake2b), the same in every process."""
    raw = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(raw, "little") >> 1


# --------------------------------------------------------------------------------------------
# failure reports
# --------------------------------------------------------------------------------------------


def failure_error(
    world: int, failures: Sequence[tuple[int, int, str, int]], when: str = ""
) -> DistributedError:
    """The error every rank raises for ``failures``: ``(rank, code, exception name, batch)``.

    ``batch`` is the 0-based batch index at which the rank failed, or ``-1`` if unknown;
    ``when`` (e.g. ``" before accumulating"``) follows the list of ranks.
    """
    parts = []
    for rank, code, name, batch in failures:
        what = f"rank {rank} {_REASONS.get(code, f'failed (code {code})')}"
        if name:
            what += f" ({name})"
        if batch >= 0:
            what += f" at batch {batch}"
        if code in (FAILED, INTERRUPTED, NONFINITE):
            what += " (see that rank's traceback)"
        parts.append(what)
    return DistributedError(
        f"curvature accumulation failed on rank(s) {[f[0] for f in failures]} of {world}"
        f"{when}: " + "; ".join(parts) + ". No result on any rank"
    )


# --------------------------------------------------------------------------------------------
# handshake
# --------------------------------------------------------------------------------------------


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def handshake(
    pg: Any,
    fields: Sequence[tuple[str, str, str]] | None,
    extras: Sequence[int] = (),
    failure: BaseException | None = None,
) -> list[list[int]]:
    """Check that every rank accumulates the same thing; exchange a few integers.

    One ``SUM`` all-reduce of ``world * HANDSHAKE_SLOTS`` int64 values.

    Parameters
    ----------
    pg : ProcessGroup
    fields : sequence of (name, description, shown), or None
        At most ``MAX_FIELDS``; the same names in the same order on every rank. The hash
        of ``description`` is compared; ``shown`` (its first 80 bytes) is what a mismatch
        reports. ``None`` on a rank that failed before it could describe itself.
    extras : sequence of int
        At most ``MAX_EXTRAS`` integers to share (not compared), e.g. a seed and a length.
    failure : BaseException, optional
        This rank already failed: every rank raises, naming it.

    Returns
    -------
    list of list of int
        ``extras`` of every rank, indexed by rank (padded with zeros to ``MAX_EXTRAS``).

    Raises
    ------
    DistributedError
        On every rank: a rank failed, or a field differs (named, with each rank's value).
    """
    import torch.distributed as dist

    fields = list(fields or [])
    if len(fields) > MAX_FIELDS or len(extras) > MAX_EXTRAS:
        raise ValueError(f"at most {MAX_FIELDS} fields and {MAX_EXTRAS} extras")
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    row = [status_of(failure), *encode_text(type(failure).__name__ if failure else "", NAME_SLOTS)]
    for i in range(MAX_FIELDS):
        if failure is None and i < len(fields):
            _, full, shown = fields[i]
            row += [_digest(full), *encode_text(shown, TEXT_SLOTS)]
        else:
            row += [0] * (1 + TEXT_SLOTS)
    row += [int(e) for e in extras] + [0] * (MAX_EXTRAS - len(extras))
    buf = torch.zeros(world, HANDSHAKE_SLOTS, dtype=torch.int64)
    buf[rank] = torch.tensor(row, dtype=torch.int64)
    buf = buf.to(comm_device(pg))
    sum_all_reduce(buf, pg)
    rows = buf.cpu().tolist()
    failed = [
        (r, rows[r][0], decode_text(rows[r][1 : 1 + NAME_SLOTS]), -1)
        for r in range(world)
        if rows[r][0] != OK
    ]
    if failed:
        raise failure_error(world, failed, " before accumulating") from failure
    diffs = []
    for i, (name, _, _) in enumerate(fields):
        pos = 1 + NAME_SLOTS + i * (1 + TEXT_SLOTS)
        values: dict[int, tuple[str, list[int]]] = {}
        for r in range(world):
            text = decode_text(rows[r][pos + 1 : pos + 1 + TEXT_SLOTS])
            values.setdefault(rows[r][pos], (text, []))[1].append(r)
        if len(values) > 1:
            shown = "; ".join(f"{_ranks(rs)}: {t!r}" for t, rs in values.values())
            diffs.append(f"{name!r} differs ({shown})")
    if diffs:
        raise DistributedError(
            f"the {world} ranks do not accumulate the same curvature: "
            + "; ".join(diffs)
            + ". Every rank must build the same model (architecture, trainable parameters), "
            "curvature object, structure and dtype; only the data may differ"
        )
    start = HANDSHAKE_SLOTS - MAX_EXTRAS
    return [r[start:] for r in rows]


# --------------------------------------------------------------------------------------------
# the packed sum
# --------------------------------------------------------------------------------------------


def reduce_sums(
    pg: Any,
    status: int,
    count: int,
    loss: Tensor | None,
    summands: list[Tensor] | None,
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
    cause: BaseException | None = None,
) -> tuple[int, Tensor, list[Tensor]]:
    r"""Sum count, loss and summands over the ranks with one packed all-reduce.

    The buffer is ``[status per rank, count_hi, count_lo, 1, loss, summand_1, ...]`` in
    ``promote_types(dtype, float32)``; the count travels as :math:`hi \cdot 4096 + lo`
    (exact in float32 up to :math:`2^{36}`), the ``1`` counts contributing ranks. A rank
    that failed or has no data sends zeros shaped by ``shapes`` — all ranks send buffers
    of one size once the handshake agreed on ``shapes``.

    Returns
    -------
    count : int
    loss : Tensor
    sums : list of Tensor
        Shaped by ``shapes``, on ``device`` in ``dtype``; bit-identical on all ranks.

    Raises
    ------
    DistributedError
        On every rank, with the same message naming the failing rank(s).
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    buf_dtype = torch.promote_types(dtype, torch.float32)
    comm = comm_device(pg, device)
    ok = status == OK and summands is not None
    count = count if status == OK else 0
    header = torch.zeros(world + 4, dtype=buf_dtype)
    header[rank] = status
    header[world], header[world + 1] = count // _COUNT_BASE, count % _COUNT_BASE
    header[world + 2] = 1
    if ok:
        header[world + 3] = loss.detach().to("cpu", buf_dtype)
        body = [t.reshape(-1).to(comm, buf_dtype) for t in summands]
    else:
        body = [torch.zeros(sum(math.prod(s) for s in shapes), dtype=buf_dtype, device=comm)]
    buf = torch.cat([header.to(comm), *body])
    sum_all_reduce(buf, pg)
    head = buf[: world + 4].cpu()
    codes = [int(round(float(c))) for c in head[:world]]
    failed = [(r, c, "", -1) for r, c in enumerate(codes) if c != OK]
    if failed:
        raise failure_error(world, failed) from (cause if status != OK else None)
    ranks = int(round(float(head[world + 2])))
    if ranks != world:
        raise DistributedError(f"expected {world} contributions, the all-reduce saw {ranks}")
    total = int(round(float(head[world]))) * _COUNT_BASE + int(round(float(head[world + 1])))
    out, pos = [], world + 4
    for s in shapes:
        n = math.prod(s)
        out.append(buf[pos : pos + n].reshape(s).to(device, dtype))
        pos += n
    return total, head[world + 3].to(device, dtype), out
