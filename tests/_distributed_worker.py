"""Worker of the 2-process gloo suite (tests/test_distributed.py).

Each rank joins a gloo group by file rendezvous, runs every scenario of :func:`scenarios`
on its shard with ``curvlib.data.fit(..., group="world")``, records the result (or the
error and how long it took to surface) and saves everything to ``out_dir/rank{r}.pt``.
The parent compares with the single-process results computed by :func:`single`.
"""

from __future__ import annotations

import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import curvlib
from curvlib.backends import backend_class, registry
from curvlib.data import fit, shard_indices

N_DATA = 9  # odd: shards of 5 and 4, a ragged batch, DistributedSampler pads to 10
BATCH = 4
SEED = 7


def problem(n: int = N_DATA, seed: int = 0, hidden: int = 6):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, 5, dtype=torch.float64, generator=g)
    Y = torch.randint(0, 3, (n,), generator=g)
    return model, X, Y


def scenarios() -> list[tuple[str, str, str]]:
    """``(backend, curvature, structure)`` for every registered combination."""
    out = []
    for backend, curvatures in registry().items():
        for curvature in curvatures:
            for structure in backend_class(backend, curvature).structures:
                # EKFAC, blocks and low rank share one implementation: autograd covers them
                if structure in ("full", "diag", "kron") or backend == "autograd":
                    out.append((backend, curvature, structure))
    return out


def pack(res) -> dict:
    loss, N, H = res
    if isinstance(H, curvlib.Kron):
        tensors = [f for F in H.kfacs for f in F]
    elif isinstance(H, curvlib.CurvatureStructure):
        tensors = [H.to_matrix()]
    else:
        tensors = [H]
    return {"status": "ok", "loss": loss, "N": N, "tensors": tensors}


def single(backend: str, curvature: str, structure: str) -> dict:
    """The single-process result (another batch size, so batching is exercised too)."""
    model, X, Y = problem()
    curv = backend_class(backend, curvature)(model, "classification")
    loader = DataLoader(TensorDataset(X, Y), batch_size=5)
    g = torch.Generator().manual_seed(SEED)
    return pack(fit(curv, loader, structure, generator=g, progress=False))


class Interrupted:
    """A loader whose batch ``at`` raises ``exc`` (as Ctrl-C would), recording the time."""

    def __init__(self, loader, at: int, exc: BaseException, clock: dict) -> None:
        self.loader, self.at, self.exc, self.clock = loader, at, exc, clock

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.at:
                self.clock["failed_at"] = time.time()
                raise self.exc
            yield batch


class Endless:
    """A loader that never ends (a long fit): only failure propagation can stop its rank."""

    def __init__(self, x, y, clock: dict) -> None:
        self.x, self.y, self.clock = x, y, clock

    def __iter__(self):
        self.clock["batches"] = 0
        while True:
            time.sleep(0.005)  # stands for the work of a batch
            self.clock["batches"] += 1
            yield self.x, self.y


def _record(results: dict, name: str, fn, clock: dict | None = None) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = pack(fn())
    except BaseException as e:  # KeyboardInterrupt too: recorded, compared by the parent
        results[name] = {
            "status": "error",
            "type": type(e).__name__,
            "cause": type(e.__cause__).__name__ if e.__cause__ is not None else None,
            "message": str(e),
            "elapsed": time.perf_counter() - t0,
            "raised_at": time.time(),
            "traceback": traceback.format_exc(),
        }
    if clock is not None:
        results[name].update(clock)


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    results: dict = {}
    try:
        model, X, Y = problem()
        ds = TensorDataset(X, Y)
        shard = Subset(ds, shard_indices(N_DATA, rank, world))
        loader = DataLoader(shard, batch_size=BATCH)

        for backend, curvature, structure in scenarios():

            def job(b=backend, c=curvature, s=structure):
                curv = backend_class(b, c)(model, "classification")
                g = torch.Generator().manual_seed(SEED)
                return fit(
                    curv, loader, s, num_data=N_DATA, group="world", generator=g, progress=False
                )

            _record(results, f"{backend}-{curvature}-{structure}", job)

        # a DDP-wrapped model is unwrapped
        ddp = nn.parallel.DistributedDataParallel(model)
        for structure in ("diag", "kron"):
            _record(
                results,
                f"ddp-{structure}",
                lambda s=structure, m=ddp: fit(
                    curvlib.AutogradGGN(m, "classification"),
                    loader,
                    s,
                    group="world",
                    progress=False,
                ),
            )
        del ddp

        # an empty shard: 1 data point on 2 ranks
        tiny = DataLoader(Subset(ds, shard_indices(1, rank, world)), batch_size=BATCH)
        _record(
            results,
            "empty_shard",
            lambda: fit(
                curvlib.AutogradGGN(model, "classification"),
                tiny,
                "kron",
                group="world",
                progress=False,
            ),
        )

        # NaN on rank 1 only: every rank raises, naming rank 1, without hanging
        Xn = X.clone()
        if rank == 1:
            Xn[shard_indices(N_DATA, 1, world)[2], 0] = float("nan")
        nan_loader = DataLoader(
            Subset(TensorDataset(Xn, Y), shard_indices(N_DATA, rank, world)), batch_size=BATCH
        )
        _record(
            results,
            "nan_rank1",
            lambda: fit(
                curvlib.AutogradGGN(model, "classification"),
                nan_loader,
                "diag",
                group="world",
                progress=False,
            ),
        )

        # an exception on rank 0 only (bad targets in its second batch)
        Yb = Y.clone()
        if rank == 0:
            Yb[4] = 99
        bad_loader = DataLoader(
            Subset(TensorDataset(X, Yb), shard_indices(N_DATA, rank, world)), batch_size=BATCH
        )
        _record(
            results,
            "raise_rank0",
            lambda: fit(
                curvlib.AutogradGGN(model, "classification"),
                bad_loader,
                "kron",
                group="world",
                progress=False,
            ),
        )

        # the padding DistributedSampler: 9 points become 10
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        padded = DataLoader(ds, batch_size=BATCH, sampler=sampler)
        _record(
            results,
            "padded_sampler",
            lambda: fit(
                curvlib.AutogradGGN(model, "classification"),
                padded,
                "diag",
                group="world",
                progress=False,
            ),
        )

        # different models on the ranks (hidden width 6 vs 7): the handshake names the
        # parameter layout on every rank instead of a size mismatch in the all-reduce
        other, _, _ = problem(hidden=6 + rank)
        _record(
            results,
            "mismatch_model",
            lambda: fit(
                curvlib.AutogradGGN(other, "classification"),
                loader,
                "kron",
                group="world",
                progress=False,
            ),
        )
        _record(
            results,
            "mismatch_structure",
            lambda: fit(
                curvlib.AutogradGGN(model, "classification"),
                loader,
                ("diag", "kron")[rank],
                group="world",
                progress=False,
            ),
        )

        # rank 0 runs fit, rank 1 a hand-written loop: different collectives would follow
        def hand_written():
            acc = curvlib.AutogradGGN(model, "classification").accumulator("diag")
            for x, y in loader:
                acc.update(x, y)
            return acc.all_reduce_("world").finalize()

        _record(
            results,
            "mismatch_protocol",
            (
                lambda: fit(
                    curvlib.AutogradGGN(model, "classification"),
                    loader,
                    "diag",
                    group="world",
                    progress=False,
                )
            )
            if rank == 0
            else hand_written,
        )

        # Ctrl-C in rank 1's loader at its batch 1 while rank 0 is in an endless loop:
        # rank 0 raises DistributedError, rank 1 its KeyboardInterrupt
        clock: dict = {}
        interrupted = Endless(X[:BATCH], Y[:BATCH], clock)
        if rank == 1:
            interrupted = Interrupted(interrupted, 1, KeyboardInterrupt(), clock)
        _record(
            results,
            "interrupt_rank1",
            lambda: fit(
                curvlib.AutogradGGN(model, "classification"),
                interrupted,
                "diag",
                group="world",
                progress=False,
            ),
            clock,
        )

        # the group is still healthy after the failures
        _record(
            results,
            "after_failures",
            lambda: fit(
                curvlib.AutogradGGN(model, "classification"),
                loader,
                "diag",
                group="world",
                progress=False,
            ),
        )
    finally:
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.destroy_process_group()
