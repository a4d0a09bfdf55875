r"""Keys of the Monte-Carlo draws and of the shards: which data point gets which seed.

For a stochastic curvature (the MC Fisher, ``curv.stochastic``) every data point draws its
pseudo-targets from its own CPU ``torch.Generator``, seeded with

.. math:: s_i = \operatorname{splitmix64}\bigl(s + (i + 1)\,\varphi \bmod 2^{64}\bigr)
          \bmod 2^{63}, \qquad \varphi = \texttt{0x9E3779B97F4A7C15},

where :math:`s` is a base seed (drawn once, shared by all ranks) and :math:`i` the global
index of the data point. The result therefore does not depend on the batch size, the
partition into shards or the number of ranks, nor on the device (the generators live on the
CPU). :func:`shard_indices` gives the contiguous, non-padded shards whose concatenation in
rank order is the single-process order, so that position keying is correct across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from curvlib.errors import InputError

__all__ = ["MC_KEYINGS", "shard_indices", "sample_seed", "sample_generators", "draw_seed"]

#: how the MC draws are keyed: one generator per data point, or one per batch
MC_KEYINGS = ("sample", "batch")

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def shard_indices(N: int, rank: int, world_size: int) -> range:
    r"""The contiguous shard of ``range(N)`` that ``rank`` of ``world_size`` processes.

    Shards are balanced (sizes differ by at most one: the first ``N mod W`` ranks get
    :math:`\lceil N/W \rceil`), disjoint, cover ``range(N)`` in rank order, and are **not
    padded** — unlike ``torch.utils.data.DistributedSampler``, which repeats samples so that
    every rank gets the same number (21 points on 2 ranks become 22). A shard may be empty
    (``N < world_size``); :func:`curvlib.data.fit` handles that.

    Parameters
    ----------
    N : int
        Number of data points.
    rank, world_size : int
        ``0 <= rank < world_size``.

    Returns
    -------
    range
        ``range(start, stop)`` with ``start = rank * (N // W) + min(rank, N % W)``; use it
        with ``torch.utils.data.Subset(dataset, shard)``.

    Raises
    ------
    InputError
        For ``N < 0`` or a rank outside ``[0, world_size)``.
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
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample_seed(base_seed: int, index: int) -> int:
    r"""Seed of the MC generator of the data point with global index ``index``.

    Parameters
    ----------
    base_seed : int
        The base seed :math:`s` shared by all ranks.
    index : int
        The global index :math:`i` of the data point.

    Returns
    -------
    int
        :math:`\operatorname{splitmix64}(s + (i + 1)\varphi \bmod 2^{64}) \bmod 2^{63}`; a
        bijective mix, so distinct indices get unrelated streams.
    """
    z = (int(base_seed) + (int(index) + 1) * _GOLDEN) & _MASK64
    return _splitmix64(z) & ((1 << 63) - 1)


def sample_generators(base_seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per global index, seeded with :func:`sample_seed`.

    Parameters
    ----------
    base_seed : int
        The shared base seed.
    indices : sequence of int
        Global indices of the data points.

    Returns
    -------
    list of torch.Generator
        ``[Generator().manual_seed(sample_seed(base_seed, i)) for i in indices]``.
    """
    return [torch.Generator(device="cpu").manual_seed(sample_seed(base_seed, i)) for i in indices]


def draw_seed(generator: torch.Generator | None) -> int:
    """A base seed in ``[0, 2**62)`` drawn from ``generator`` (or torch's global CPU RNG).

    Parameters
    ----------
    generator : torch.Generator, optional
        The source; ``None`` draws from torch's global RNG (advancing it, as any draw does).

    Returns
    -------
    int
        The seed.
    """
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=dev).item())
