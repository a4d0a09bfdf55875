r"""Accumulation over data loaders, shards and ranks (``torch.distributed``).

Curvature for a Laplace approximation is a sum over the whole training set. This module
splits that sum into parts that can be computed anywhere and added up later:

* :class:`Accumulator` holds **only unnormalized sums and a count** — the summed loss
  :math:`\sum_n \ell_n`, the summed diagonal :math:`\sum_n h_n` or dense matrix
  :math:`\sum_n H_n`, and for K-FAC every factor as a plain sum
  (:math:`G = \sum_n g g^\top`, :math:`\tilde A = \sum_n a a^\top`) — plus the number of data
  points :math:`N`. Accumulators of disjoint parts of the data merge by addition
  (:meth:`Accumulator.merge` in one process, :meth:`Accumulator.all_reduce_` across ranks),
  so batches, shards and ranks are one code path.
* Normalization by the global :math:`N` happens once, in :meth:`Accumulator.finalize`:
  :math:`A = \tilde A / N` (DESIGN §4). ``full`` and ``diag`` are sums and stay sums.
* :func:`fit` runs an accumulator over a ``DataLoader`` (with a progress bar), and with a
  process group over every rank's shard, finishing with **one** packed ``SUM`` all-reduce.
* :func:`shard_indices` splits ``range(N)`` into contiguous, balanced, non-padded shards.

Monte-Carlo keying
------------------
For a stochastic curvature (the MC Fisher, ``curv.stochastic``) every data point draws its
pseudo-targets from its own CPU ``torch.Generator``, seeded with

.. math:: s_i = \operatorname{splitmix64}\bigl(s + (i + 1)\,\varphi \bmod 2^{64}\bigr)
          \bmod 2^{63}, \qquad \varphi = \texttt{0x9E3779B97F4A7C15},

where :math:`s` is a base seed (drawn once from the ``generator`` given to :func:`fit`, or
from torch's global RNG, and shared by all ranks) and :math:`i` the global index of the
data point: given by ``index_fn`` / ``index``, or its position in the concatenation of the
ranks' streams in rank order (correct for :func:`shard_indices` shards read in order). The
result therefore does not depend on the batch size, the partition or the number of ranks,
nor on the device (the generators live on the CPU). The backend is still called once per
batch: it receives the list of the batch's generators, and the likelihood draws each data
point's pseudo-targets from its own (:meth:`curvlib.likelihood.Likelihood.sample_grad_outputs`).
``mc_keying="batch"`` keys one generator by the batch's first index instead (reproducible,
but dependent on the batching).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from curvlib.errors import CapabilityError, DistributedError, InputError, NonFiniteError
from curvlib.kron import Kron

__all__ = ["Accumulator", "fit", "shard_indices", "sample_seed", "STRUCTURES", "MC_KEYINGS"]

STRUCTURES = ("full", "diag", "kron")
MC_KEYINGS = ("sample", "batch")

# status codes carried by the packed all-reduce, one slot per rank
_OK, _FAILED, _NONFINITE, _LAYOUT, _NO_LENGTH = 0, 1, 2, 3, 4
_REASONS = {
    _FAILED: "raised an exception during accumulation (see that rank's traceback)",
    _NONFINITE: "produced non-finite values (NaN or inf)",
    _LAYOUT: "produced results whose shapes differ from the parameters' layout",
    _NO_LENGTH: (
        "cannot tell how many samples its loader yields, which the position-keyed MC "
        "sampling needs; pass index_fn (global sample indices) to fit"
    ),
}
# counts travel as hi * 2**12 + lo so that they stay exact in a float32 buffer
_COUNT_BASE = 4096
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def shard_indices(N: int, rank: int, world_size: int) -> range:
    r"""The contiguous shard of ``range(N)`` that ``rank`` of ``world_size`` processes.

    Shards are balanced (sizes differ by at most one: the first ``N mod W`` ranks get
    :math:`\lceil N/W \rceil`), disjoint, cover ``range(N)`` in rank order, and are **not
    padded** — unlike ``torch.utils.data.DistributedSampler``, which repeats samples so that
    every rank gets the same number (21 points on 2 ranks become 22). A shard may be empty
    (``N < world_size``); :func:`fit` handles that.

    Parameters
    ----------
    N : int
        Number of data points.
    rank, world_size : int
        ``0 <= rank < world_size``.

    Returns
    -------
    range
        ``range(start, stop)``; use it with ``torch.utils.data.Subset(dataset, shard)``.
    """
    N, rank, world_size = int(N), int(rank), int(world_size)
    if N < 0:
        raise InputError(f"N must be non-negative, got {N}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    q, r = divmod(N, world_size)
    start = rank * q + min(rank, r)
    return range(start, start + q + (1 if rank < r else 0))


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample_seed(base_seed: int, index: int) -> int:
    r"""Seed of the MC generator of the data point with global index ``index``.

    :math:`\operatorname{splitmix64}(s + (i + 1)\varphi \bmod 2^{64}) \bmod 2^{63}` (module
    docstring); a bijective mix, so distinct indices get unrelated streams.
    """
    z = (int(base_seed) + (int(index) + 1) * 0x9E3779B97F4A7C15) & _MASK64
    return _splitmix64(z) & ((1 << 63) - 1)


def _draw_seed(generator: torch.Generator | None) -> int:
    """A base seed in ``[0, 2**62)`` from ``generator`` (or torch's global CPU RNG)."""
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=dev).item())


def _batch_dim(x: Any, key: str) -> int:
    if isinstance(x, Mapping):
        if key not in x:
            raise InputError(
                f"dict batch has no key {key!r} (the curvature's dict_key_x); keys: "
                f"{list(x)}; pass batch_size_fn to fit"
            )
        return int(x[key].shape[0])
    if not isinstance(x, Tensor) or x.ndim == 0:
        raise InputError(f"x must be a batched tensor or a dict of tensors, got {type(x).__name__}")
    return int(x.shape[0])


def _slice(x: Any, s: slice) -> Any:
    if isinstance(x, Mapping):
        return {k: (v[s] if isinstance(v, Tensor) else v) for k, v in x.items()}
    return tree_map(lambda t: t[s] if isinstance(t, Tensor) else t, x)


def _check_not_sharded(model: nn.Module) -> None:
    """Raise for FSDP-wrapped or DTensor-sharded models (their parameters are not local)."""
    names = ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")
    kinds = []
    for name in names:
        mod = sys.modules.get(name)  # not imported: the model cannot be FSDP-wrapped
        for attr in ("FullyShardedDataParallel", "FSDPModule"):
            cls = getattr(mod, attr, None) if mod is not None else None
            if isinstance(cls, type):
                kinds.append(cls)
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    sharded = any(isinstance(m, tuple(kinds)) for m in model.modules()) if kinds else False
    if not sharded and isinstance(dtensor, type):
        sharded = any(isinstance(p, dtensor) for p in model.parameters())
    if sharded:
        raise InputError(
            f"{type(model).__name__} is sharded by FSDP (its parameters are DTensors or "
            "flat shards that no rank holds in full); curvlib needs every rank to hold the "
            "full parameters. Compute the curvature on an unsharded copy (e.g. load the "
            "full state dict into the plain model), or inside FSDP.summon_full_params(model)"
        )


@contextmanager
def _unwrapped(curv: Any):
    """Temporarily point ``curv.model`` at ``model.module`` for a DDP-wrapped model."""
    model = curv.model
    ddp = getattr(nn.parallel, "DistributedDataParallel", None)
    if isinstance(ddp, type) and isinstance(model, ddp):
        curv.model = model.module
        try:
            yield curv
        finally:
            curv.model = model
    else:
        yield curv


def _split_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """``(x, y)`` of a loader batch: a pair, or a dict (targets inside, ``y = None``)."""
    if isinstance(batch, Mapping):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise InputError(
        "loader batches must be (x, y) pairs or dicts (HuggingFace style, the targets under "
        f"the curvature's dict_key_y); got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


# --------------------------------------------------------------------------------------------
# Accumulator
# --------------------------------------------------------------------------------------------


class Accumulator:
    r"""Mergeable, unnormalized accumulation of one curvature structure.

    Holds the loss sum :math:`L = \sum_n \ell_n`, the count :math:`N` and the curvature
    sums: ``diag`` :math:`\sum_n h_n` ``(P,)``, ``full`` :math:`\sum_n H_n` ``(P, P)``,
    ``kron`` per weight :math:`[G, \tilde A] = [\sum g g^\top, \sum a a^\top]` (the
    backend's ``kron(x, y, N=1)``; with weight sharing ``"expand"`` the sum over locations
    is still divided by ``L``) and per bias ``[G]``. Memory is that of one result,
    independent of the number of updates. Nothing is normalized until :meth:`finalize`.

    Parameters
    ----------
    curv : CurvatureInterface
        The curvature object; a DDP-wrapped ``curv.model`` is unwrapped during each call.
    structure : {"full", "diag", "kron"}
        Must be in ``type(curv).structures``.
    seed : int, optional
        Base seed of the per-sample MC generators (stochastic curvatures only, see the
        module docstring). Default: drawn from ``generator``.
    generator : torch.Generator, optional
        Source of the base seed when ``seed`` is not given; default torch's global RNG.
    index_offset : int, default 0
        Global index of the first data point passed to :meth:`update` without ``index``
        (position keying of the MC draws).
    mc_keying : {"sample", "batch"}, default "sample"
        ``"sample"``: one generator per data point (one backend call per batch); the MC
        result is independent of batching, sharding and the number of ranks.
        ``"batch"``: one generator per batch, keyed by the batch's first global index;
        reproducible, but dependent on how the data are batched.

    Examples
    --------
    >>> acc = curv.accumulator("kron")
    >>> for x, y in loader:
    ...     acc.update(x, y)
    >>> loss, N, K = acc.finalize()
    """

    def __init__(
        self,
        curv: Any,
        structure: str,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        index_offset: int = 0,
        mc_keying: str = "sample",
    ) -> None:
        if mc_keying not in MC_KEYINGS:
            raise ValueError(f"mc_keying must be one of {MC_KEYINGS}, got {mc_keying!r}")
        if structure not in STRUCTURES:
            raise ValueError(f"unknown structure {structure!r}; known: {list(STRUCTURES)}")
        if structure not in getattr(type(curv), "structures", ()):
            from curvlib.backends import backends_supporting

            name = type(curv).curvature_name()
            raise CapabilityError(
                f"backend {getattr(curv, 'backend_name', type(curv).__name__)!r} cannot "
                f"compute the {structure!r} structure of {name!r}; backends that can: "
                f"{backends_supporting(name, structure) or 'none'}"
            )
        _check_not_sharded(curv.model)
        self.curv = curv
        self.structure = structure
        self.stochastic = bool(getattr(curv, "stochastic", False))
        if self.stochastic and seed is None:
            seed = _draw_seed(generator)
        self.seed = None if seed is None else int(seed)
        self.mc_keying = mc_keying
        self._next_index = int(index_offset)
        self.count = 0
        self.loss: Tensor | None = None
        self._tensors: list[Tensor] | None = None
        self._entries: list[int] | None = None  # kron: number of factors per entry
        self._status = _OK
        self._exc: BaseException | None = None
        self._reduced = False

    # ------------------------------------------------------------------ layout
    def _template(self) -> tuple[list[tuple[int, ...]], list[int] | None, torch.dtype, Any]:
        """Shapes of the curvature sums from the parameters (what an empty rank sends)."""
        with _unwrapped(self.curv) as c:
            params = list(c.params)
        if not params:
            raise InputError("the curvature has no selected parameters (requires_grad=True)")
        dtype, device = params[0].dtype, params[0].device
        if self.structure == "kron":
            kfacs = Kron.init_from_model(params, device="meta").kfacs
            return (
                [tuple(f.shape) for F in kfacs for f in F],
                [len(F) for F in kfacs],
                dtype,
                device,
            )
        idx = getattr(self.curv, "subnetwork_indices", None)
        if idx is None:
            P = sum(p.numel() for p in params)
        else:
            idx = torch.as_tensor(idx)
            P = int(idx.sum()) if idx.dtype == torch.bool else int(idx.numel())
        return ([(P,)] if self.structure == "diag" else [(P, P)]), None, dtype, device

    # ------------------------------------------------------------------ accumulation
    def _call(self, x: Any, y: Tensor | None, generator: Any):
        kw: dict[str, Any] = {} if generator is None else {"generator": generator}
        with _unwrapped(self.curv) as c:
            if self.structure == "kron":
                loss, K = c.kron(x, y, N=1, **kw)
                return loss, [f for F in K.kfacs for f in F], [len(F) for F in K.kfacs]
            loss, H = getattr(c, self.structure)(x, y, **kw)
            return loss, [H], None

    def _add(self, loss: Tensor, tensors: list[Tensor], entries: list[int] | None) -> None:
        loss = loss.detach()
        if self._tensors is None:
            self._tensors = [t.detach().clone() for t in tensors]
            self._entries = entries
            self.loss = loss.clone()
            return
        shapes = [tuple(t.shape) for t in self._tensors]
        if entries != self._entries or [tuple(t.shape) for t in tensors] != shapes:
            raise InputError(
                f"the {self.structure!r} result changed its layout between batches: "
                f"{shapes} before, {[tuple(t.shape) for t in tensors]} now"
            )
        for acc, t in zip(self._tensors, tensors, strict=True):
            acc.add_(t.detach())
        self.loss = self.loss + loss

    def update(
        self,
        x: Any,
        y: Tensor | None = None,
        *,
        batch_size: int | None = None,
        index: Tensor | Sequence[int] | None = None,
    ) -> int:
        r"""Add the batch ``(x, y)`` to the sums.

        Parameters
        ----------
        x : Tensor or dict of Tensor
            The inputs; a dict holds the targets under ``curv.dict_key_y`` if ``y`` is None.
        y : Tensor, optional
            The targets.
        batch_size : int, optional
            Number of data points the batch adds to the count; default its first dimension
            (of ``x[curv.dict_key_x]`` for a dict).
        index : 1-D integer Tensor or sequence, optional
            Global indices of the batch's data points, keying the MC draws; default the
            running position ``index_offset, index_offset + 1, ...``.

        Returns
        -------
        int
            The number of data points added.
        """
        if self._reduced:
            raise InputError("this accumulator has been all-reduced; create a new one to update")
        B = _batch_dim(x, getattr(self.curv, "dict_key_x", "input_ids"))
        M = B if batch_size is None else int(batch_size)
        if M < 0:
            raise InputError(f"batch_size must be non-negative, got {M}")
        if index is None:
            idx = list(range(self._next_index, self._next_index + B))
        else:
            idx = [int(i) for i in (index.tolist() if isinstance(index, Tensor) else index)]
            if len(idx) != B:
                raise InputError(f"index has {len(idx)} entries for a batch of {B}")
        if B == 0:
            return 0
        if not self.stochastic:
            loss, tensors, entries = self._call(x, y, None)
            self._add(loss, tensors, entries)
        elif self.mc_keying == "batch":
            g = torch.Generator(device="cpu").manual_seed(sample_seed(self.seed, idx[0]))
            loss, tensors, entries = self._call(x, y, g)
            self._add(loss, tensors, entries)
        else:  # one generator per data point, in one batched call
            gens = [
                torch.Generator(device="cpu").manual_seed(sample_seed(self.seed, i)) for i in idx
            ]
            loss, tensors, entries = self._call(x, y, gens)
            self._add(loss, tensors, entries)
        self._next_index += B
        self.count += M
        return M

    def merge(self, other: Accumulator) -> Accumulator:
        """Add ``other``'s sums and count into this accumulator (in place); return ``self``.

        Both must accumulate the same structure of the same kind of curvature.
        """
        if not isinstance(other, Accumulator):
            raise InputError(f"can only merge an Accumulator, got {type(other).__name__}")
        if other.structure != self.structure or type(other.curv) is not type(self.curv):
            raise InputError(
                f"cannot merge a {type(other.curv).__name__} {other.structure!r} accumulator "
                f"into a {type(self.curv).__name__} {self.structure!r} one"
            )
        if other._status != _OK and self._status == _OK:
            self._status, self._exc = other._status, other._exc
        if other._tensors is not None:
            self._add(other.loss, other._tensors, other._entries)
        self.count += other.count
        return self

    def mark_failed(self, exc: BaseException | None = None) -> None:
        """Record that this rank failed (``exc``), so that :meth:`all_reduce_` raises on all.

        Use in hand-written loops: wrap the updates in ``try``, call ``mark_failed`` in
        ``except`` and still call :meth:`all_reduce_`, which then raises the same
        :class:`~curvlib.errors.DistributedError` on every rank instead of leaving the
        healthy ranks waiting in the collective.
        """
        code = _NONFINITE if isinstance(exc, NonFiniteError) else _FAILED
        self._status, self._exc = code, exc

    # ------------------------------------------------------------------ distributed
    def _local_status(self, shapes: list[tuple[int, ...]], entries: list[int] | None) -> int:
        if self._status != _OK or self._tensors is None:
            return self._status
        if [tuple(t.shape) for t in self._tensors] != shapes or self._entries != entries:
            return _LAYOUT
        finite = all(bool(torch.isfinite(t).all()) for t in [self.loss, *self._tensors])
        return _OK if finite else _NONFINITE

    def all_reduce_(self, group: Any = None) -> Accumulator:
        r"""Sum this accumulator over the ranks of ``group`` in place; return ``self``.

        One ``SUM`` all-reduce of one packed buffer ``[status per rank, count (hi, lo),
        number of ranks, loss, every curvature tensor]`` — never ``ReduceOp.AVG``. Every
        rank must call it (also a rank without data, or one that failed: see
        :meth:`mark_failed`). Afterwards all ranks hold bit-identical sums.

        Parameters
        ----------
        group : ProcessGroup or "world" or None
            The process group; ``None`` and ``"world"`` mean the default (world) group.

        Raises
        ------
        DistributedError
            On every rank, with the same message naming the failing rank(s), if any rank
            failed, produced NaN/inf, or produced a differently shaped result.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError(
                "all_reduce_ needs an initialized torch.distributed process group "
                "(torch.distributed.init_process_group, e.g. under torchrun)"
            )
        if self._reduced:
            raise DistributedError("this accumulator has already been all-reduced")
        pg = dist.group.WORLD if group is None or group == "world" else group
        rank, world = dist.get_rank(pg), dist.get_world_size(pg)
        shapes, entries, dtype, device = self._template()
        status = self._local_status(shapes, entries)
        buf_dtype = torch.promote_types(dtype, torch.float32)
        comm = _comm_device(dist, pg, device)
        ok = status == _OK and self._tensors is not None
        count = self.count if status == _OK else 0
        header = torch.zeros(world + 4, dtype=buf_dtype)
        header[rank] = status
        header[world], header[world + 1] = count // _COUNT_BASE, count % _COUNT_BASE
        header[world + 2] = 1  # number of contributing ranks
        if ok:
            header[world + 3] = self.loss.detach().to("cpu", buf_dtype)
            body = [t.reshape(-1).to(comm, buf_dtype) for t in self._tensors]
        else:
            size = sum(math.prod(s) for s in shapes)
            body = [torch.zeros(size, dtype=buf_dtype, device=comm)]
        parts = [header.to(comm), *body]
        buf = torch.cat(parts)
        _sum_all_reduce(dist, buf, pg)
        head = buf[: world + 4].cpu()
        codes = [int(round(float(c))) for c in head[:world]]
        failed = [(r, c) for r, c in enumerate(codes) if c != _OK]
        if failed:
            what = "; ".join(f"rank {r} {_REASONS.get(c, f'failed (code {c})')}" for r, c in failed)
            err = DistributedError(
                f"curvature accumulation failed on rank(s) {[r for r, _ in failed]} of "
                f"{world}: {what}. No result on any rank"
            )
            raise err from (self._exc if status != _OK else None)
        ranks = int(round(float(head[world + 2])))
        if ranks != world:
            raise DistributedError(f"expected {world} contributions, the all-reduce saw {ranks}")
        self.count = int(round(float(head[world]))) * _COUNT_BASE + int(
            round(float(head[world + 1]))
        )
        self.loss = head[world + 3].to(device, dtype)
        out, pos = [], world + 4
        for s in shapes:
            n = math.prod(s)
            out.append(buf[pos : pos + n].reshape(s).to(device, dtype))
            pos += n
        self._tensors, self._entries = out, entries
        self._reduced = True
        return self

    # ------------------------------------------------------------------ result
    def finalize(self, num_data: int | None = None) -> tuple[Tensor, int, Tensor | Kron]:
        r"""Normalize once by the global count and return ``(loss, N, curvature)``.

        ``loss`` is the summed loss :math:`\sum_n \ell_n`; ``curvature`` the summed
        ``diag`` ``(P,)`` or ``full`` ``(P, P)``, or the :class:`~curvlib.Kron` with
        :math:`G = \sum g g^\top` and :math:`A = \frac1N \sum a a^\top` (DESIGN §4) — what
        one ``kron(X, Y, N)`` call on the whole data set returns. The accumulator is not
        modified, so it can be finalized again or merged further.

        Parameters
        ----------
        num_data : int, optional
            The expected global number of data points. A mismatch raises: with a padding
            ``DistributedSampler`` the ranks see repeated samples (21 points on 2 ranks
            give 22) and every normalized quantity would be off.

        Raises
        ------
        InputError
            No data was accumulated, or the count differs from ``num_data``
            (:class:`~curvlib.errors.DistributedError` after :meth:`all_reduce_`).
        NonFiniteError
            The sums contain NaN or inf.
        """
        if self._status != _OK and not self._reduced:
            if self._exc is not None:
                raise self._exc
            raise NonFiniteError("the accumulation failed")
        N = self.count
        if num_data is not None and int(num_data) != N:
            cls = DistributedError if self._reduced else InputError
            raise cls(
                f"accumulated {N} data points but num_data={int(num_data)}: "
                + (
                    "a DistributedSampler pads (repeats samples) when the data set size is "
                    "not divisible by the number of ranks, or drops them with drop_last; "
                    "shard with curvlib.data.shard_indices (no padding) instead"
                    if N > int(num_data) or self._reduced
                    else "did the loader drop its last batch (drop_last=True)?"
                )
            )
        if self._tensors is None or N == 0:
            raise InputError("no data points were accumulated; the loader yielded nothing")
        if not all(bool(torch.isfinite(t).all()) for t in [self.loss, *self._tensors]):
            raise NonFiniteError(
                f"the accumulated {self.structure!r} curvature or loss contains NaN or inf"
            )
        loss = self.loss.clone()
        if self.structure != "kron":
            return loss, N, self._tensors[0].clone()
        kfacs, pos = [], 0
        for k in self._entries:
            F = [t.clone() for t in self._tensors[pos : pos + k]]
            if k == 2:
                F[1] = F[1] / N
            kfacs.append(F)
            pos += k
        return loss, N, Kron(kfacs)


def _sum_all_reduce(dist: Any, buf: Tensor, pg: Any) -> None:
    """``SUM`` all-reduce in place; a failing collective raises :class:`DistributedError`."""
    try:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=pg)
    except Exception as exc:
        raise DistributedError(
            f"the all-reduce of the curvature sums failed on rank {dist.get_rank(pg)}: {exc}. "
            "A peer may have crashed or timed out (see init_process_group(timeout=...))"
        ) from exc


def _comm_device(dist: Any, pg: Any, device: torch.device) -> torch.device:
    """Device of the communication buffer: CUDA for NCCL, else the CPU for gloo."""
    backend = str(dist.get_backend(pg)).lower()
    if "nccl" in backend and ("gloo" not in backend or device.type == "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    return torch.device(device)


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------


def _resolve_group(group: Any) -> Any:
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


def _local_num_samples(loader: Iterable) -> int | None:
    """How many samples this rank's ``DataLoader`` yields, if knowable before iterating."""
    bs = getattr(loader, "batch_sampler", None)
    sampler, size = getattr(bs, "sampler", None), getattr(bs, "batch_size", None)
    if sampler is None or size is None:
        return None
    try:
        n = len(sampler)
    except TypeError:  # an iterable-style dataset
        return None
    return (n // size) * size if getattr(bs, "drop_last", False) else n


def _distributed_sampler_size(loader: Iterable) -> int | None:
    """``len(dataset)`` if the loader draws through a ``DistributedSampler``."""
    from torch.utils.data.distributed import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        try:
            return len(sampler.dataset)
        except TypeError:
            return None
    return None


def _mc_keys(
    loader: Iterable, generator: torch.Generator | None, pg: Any, need_offset: bool
) -> tuple[int, int]:
    """Agree on the base seed (rank 0's) and this rank's position offset."""
    seed = _draw_seed(generator)
    if pg is None:
        return seed, 0
    import torch.distributed as dist

    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    n = _local_num_samples(loader) if need_offset else 0
    vec = torch.zeros(2 * world + 1, dtype=torch.int64)
    vec[rank] = 0 if n is None else n
    vec[world + rank] = _NO_LENGTH if n is None else _OK
    vec[2 * world] = seed if rank == 0 else 0
    comm = _comm_device(dist, pg, torch.device("cpu"))
    vec = vec.to(comm)
    _sum_all_reduce(dist, vec, pg)
    vec = vec.cpu().tolist()
    failed = [r for r in range(world) if vec[world + r] != _OK]
    if failed:
        raise DistributedError(
            f"curvature accumulation failed on rank(s) {failed} of {world}: "
            + "; ".join(f"rank {r} {_REASONS[_NO_LENGTH]}" for r in failed)
        )
    return int(vec[2 * world]), int(sum(vec[:rank]))


def fit(
    curv: Any,
    loader: Iterable,
    structure: str,
    num_data: int | None = None,
    group: Any = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    batch_size_fn: Callable[[Any], int] | None = None,
    index_fn: Callable[[Any], Tensor | Sequence[int]] | None = None,
    mc_keying: str = "sample",
) -> tuple[Tensor, int, Tensor | Kron]:
    r"""Accumulate ``structure`` of ``curv`` over a data loader, optionally over all ranks.

    Computes the loss sum :math:`\sum_n \ell_n`, the number of data points :math:`N` and the
    curvature of the whole data set: ``diag`` :math:`\sum_n h_n`, ``full``
    :math:`\sum_n H_n`, or ``kron`` with :math:`G = \sum g g^\top`,
    :math:`A = \frac1N \sum a a^\top` — exactly what one call on the concatenated data gives
    (up to summation order). Only sums are held while iterating (memory independent of the
    number of batches); normalization by the global ``N`` happens once at the end.

    Parameters
    ----------
    curv : CurvatureInterface
        E.g. ``curvlib.AutogradGGN(model, "classification")``. A DDP-wrapped model is
        unwrapped (``model.module``); an FSDP-sharded one raises :class:`InputError`.
    loader : iterable
        Yields ``(x, y)`` pairs or dicts (targets under ``curv.dict_key_y``); the last batch
        may be smaller. With ``group``, each rank passes the loader of its own shard
        (:func:`shard_indices`).
    structure : {"diag", "kron", "full"}
    num_data : int, optional
        Expected global number of data points; a different count raises. With ``group`` and
        a ``DistributedSampler`` it defaults to ``len(sampler.dataset)``, so the sampler's
        padding is caught.
    group : ProcessGroup or "world", optional
        Sum over the ranks of this process group with one packed ``SUM`` all-reduce; all
        ranks return bit-identical results, or all raise the same
        :class:`~curvlib.errors.DistributedError` naming the failing rank. ``None`` (default)
        never touches ``torch.distributed``.
    generator : torch.Generator, optional
        Source of the MC base seed for stochastic curvatures (rank 0's draw is used on all
        ranks); default torch's global RNG. See the module docstring for the keying.
    progress : bool, default True
        A tqdm progress bar (only on rank 0).
    batch_size_fn : callable, optional
        ``batch -> int``, the number of data points in a batch; default the first dimension
        of ``x`` (of ``x[curv.dict_key_x]`` for dicts).
    index_fn : callable, optional
        ``batch -> global indices`` of its data points, keying the MC draws; default the
        position in the rank-ordered concatenation of the ranks' streams.
    mc_keying : {"sample", "batch"}, default "sample"
        See :class:`Accumulator`; ``"batch"`` trades independence of the batching and of
        the number of ranks for one backend call per batch.

    Returns
    -------
    loss : Tensor
        Summed loss (0-dim).
    N : int
        Global number of data points.
    curvature : Tensor or Kron

    Raises
    ------
    DistributedError
        With ``group``: on every rank if any rank failed, or if the global count differs
        from ``num_data`` (e.g. a padding ``DistributedSampler``).
    """
    pg = _resolve_group(group)
    rank = 0
    if pg is not None:
        import torch.distributed as dist

        rank = dist.get_rank(pg)
        if num_data is None:
            num_data = _distributed_sampler_size(loader)
    seed, offset = None, 0
    if getattr(curv, "stochastic", False):
        seed, offset = _mc_keys(loader, generator, pg, index_fn is None)
    acc = Accumulator(curv, structure, seed=seed, index_offset=offset, mc_keying=mc_keying)
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    from tqdm.auto import tqdm

    bar = tqdm(
        loader,
        total=total,
        disable=not progress or rank != 0,
        desc=f"curvlib.fit {structure}",
        unit="batch",
        dynamic_ncols=True,
    )
    try:
        for batch in bar:
            x, y = _split_batch(batch)
            acc.update(
                x,
                y,
                batch_size=None if batch_size_fn is None else batch_size_fn(batch),
                index=None if index_fn is None else index_fn(batch),
            )
    except Exception as exc:
        if pg is None:
            raise
        acc.mark_failed(exc)
    finally:
        bar.close()
    if pg is not None:
        acc.all_reduce_(pg)
    return acc.finalize(num_data)
