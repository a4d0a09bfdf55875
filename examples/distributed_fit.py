"""Data-parallel K-FAC with ``torchrun``: every rank accumulates its shard, one all-reduce.

Run::

    torchrun --standalone --nproc_per_node=2 examples/distributed_fit.py

Each rank builds the same model and data set (fixed seeds), takes its contiguous,
non-padded shard (``curvlib.data.shard_indices``), wraps the model in DDP as a training
script would, and calls ``curvlib.data.fit(..., group="world")``. All ranks end with
bit-identical results (the test suite checks it), equal to the single-process ones up to
float64 round-off of the summation order: rank 0 computes the single-process K-FAC and
prints the largest relative difference of a factor. Uses NCCL and the GPU of
``LOCAL_RANK`` when CUDA is available, gloo on the CPU otherwise. About 12 s of CPU time,
most of it starting two Python processes that import torch.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import curvlib
from curvlib.data import fit, shard_indices

N_DATA = 203
BATCH = 16


def build(device: torch.device | str = "cpu") -> tuple[nn.Module, TensorDataset]:
    """The model and the whole data set, identical on every rank (fixed seeds)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4)).double().to(device)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N_DATA, 10, dtype=torch.float64, generator=g)
    Y = torch.randint(0, 4, (N_DATA,), generator=g)
    return model, TensorDataset(X.to(device), Y.to(device))


def to_cpu(loss: torch.Tensor, N: int, K: curvlib.Kron) -> dict:
    return {"loss": loss.cpu(), "N": N, "kfacs": [f.cpu() for F in K.kfacs for f in F]}


def single_process() -> dict:
    """The reference: one process, the whole data set."""
    model, ds = build()
    curv = curvlib.AutogradGGN(model, "classification")
    return to_cpu(*fit(curv, DataLoader(ds, batch_size=BATCH), "kron", progress=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for each rank's result")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # a finite timeout: the longest a rank may wait in one collective (a peer that died
    # without reporting); curvlib's status rounds report every other failure within seconds
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else "cpu"
    try:
        model, ds = build(device)
        # what a training script has; curvlib unwraps model.module
        ddp = nn.parallel.DistributedDataParallel(model)
        shard = Subset(ds, shard_indices(len(ds), rank, world))  # no padding
        loader = DataLoader(shard, batch_size=BATCH)
        curv = curvlib.AutogradGGN(ddp, "classification")
        loss, N, K = fit(
            curv, loader, "kron", num_data=len(ds), group="world", progress=not args.no_progress
        )
        print(f"rank {rank}: N={N} loss={loss.item():.6f} shard={len(shard)}", flush=True)
        if rank == 0:
            ref, got = single_process(), to_cpu(loss, N, K)
            diff = max(
                ((a - b).norm() / b.norm()).item()
                for a, b in zip(got["kfacs"], ref["kfacs"], strict=True)
            )
            print(
                f"rank 0: largest relative difference of a K-FAC factor to one process: "
                f"{diff:.1e} (loss {abs(got['loss'] - ref['loss']).item():.1e})",
                flush=True,
            )
        if args.out is not None:
            torch.save(to_cpu(loss, N, K), os.path.join(args.out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
