r"""The loop over a data loader: :func:`fit`, in one process or over the ranks of a group.

In one process :func:`fit` feeds every batch to an :class:`~curvlib.data.Accumulator` and
finalizes it. With a process group the loop is wrapped in the three exchanges of
:mod:`curvlib.data.distributed` and :mod:`curvlib.data.rounds`:

1. the **handshake** (one fixed-size all-reduce) — every rank accumulates the same
   structure of the same curvature, dtype and parameter layout; it also carries rank 0's
   MC base seed and each rank's number of samples (its offset in the global order);
2. the **status rounds** during the loop — a failure on one rank (any ``BaseException``,
   ``KeyboardInterrupt`` included) reaches every peer within about two status intervals
   plus one batch;
3. the **packed sum** of the count, the loss and the summands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from curvlib.data import distributed as D
from curvlib.data.accumulator import Accumulator
from curvlib.data.batches import split_batch
from curvlib.data.fields import FIT, protocol_field
from curvlib.data.keys import draw_seed
from curvlib.data.rounds import DEFAULT_INTERVAL, StatusRounds
from curvlib.errors import DistributedError
from curvlib.kron import Kron

__all__ = ["fit"]


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
    status_interval: float | None = DEFAULT_INTERVAL,
    options: dict[str, Any] | None = None,
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
        Yields ``(x, y)`` pairs or dicts (targets under ``curv.dict_key_y``;
        :func:`curvlib.data.split_batch`); the last batch may be smaller. With ``group``,
        each rank passes the loader of its own shard (:func:`shard_indices`).
    structure : {"diag", "kron", "full"}
    num_data : int, optional
        Expected global number of data points; a different count raises. With ``group`` and
        a ``DistributedSampler`` it defaults to ``len(sampler.dataset)``, so the sampler's
        padding is caught.
    group : ProcessGroup or "world", optional
        Sum over the ranks of this process group; all ranks return bit-identical results,
        or all raise the same :class:`~curvlib.errors.DistributedError` naming the failing
        rank. ``None`` (default) never touches ``torch.distributed``.
    generator : torch.Generator, optional
        Source of the MC base seed for stochastic curvatures (rank 0's draw is used on all
        ranks); default torch's global RNG. See :mod:`curvlib.data.keys`.
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
    status_interval : float or None, default 0.5
        With ``group``: seconds between two non-blocking status exchanges of a rank
        (:mod:`curvlib.data.rounds`), which bound how long the peers of a failing rank keep
        working; ``None`` exchanges the status only when the loops end.
    options : dict, optional
        The structure's own options (:class:`Accumulator`). ``"ekfac"`` without a ``basis``
        runs two passes over the loader: the K-FAC of the whole data set (its
        eigendecomposition is the basis), then the corrected eigenvalues in that basis.

    Returns
    -------
    loss : Tensor
        Summed loss (0-dim).
    N : int
        Global number of data points.
    curvature : Tensor or Kron

    Raises
    ------
    NonFiniteError
        Without ``group``: at the first batch whose loss or result is NaN/inf, naming the
        quantity and the batch index.
    DistributedError
        With ``group``, on every rank: the ranks differ in what they accumulate (named by
        the handshake), a rank failed (its ``KeyboardInterrupt``/``SystemExit`` is re-raised
        on that rank itself), or the global count differs from ``num_data``.
    """
    structure_options = dict(options or {})
    if structure == "ekfac" and "basis" not in structure_options:
        common = dict(
            num_data=num_data,
            group=group,
            progress=progress,
            batch_size_fn=batch_size_fn,
            index_fn=index_fn,
            mc_keying=mc_keying,
            status_interval=status_interval,
        )
        seed = draw_seed(generator) if getattr(curv, "stochastic", False) else None
        gens = [None if seed is None else torch.Generator().manual_seed(seed) for _ in range(2)]
        _, _, K = fit(curv, loader, "kron", generator=gens[0], **common)
        structure_options["basis"] = K.decompose()
        return fit(curv, loader, "ekfac", generator=gens[1], options=structure_options, **common)
    pg = D.resolve_group(group)
    options = {"batch_size_fn": batch_size_fn, "index_fn": index_fn}
    if pg is None:
        seed = draw_seed(generator) if getattr(curv, "stochastic", False) else None
        acc = Accumulator(
            curv, structure, seed=seed, mc_keying=mc_keying, options=structure_options
        )
        with _progress(loader, structure, progress) as bar:
            for batch in bar:
                _update(acc, batch, **options)
        return acc.finalize(num_data)
    if status_interval is not None and not status_interval >= 0:
        raise ValueError(f"status_interval must be >= 0 seconds or None, got {status_interval!r}")
    acc, num_data = _agree(
        curv, loader, structure, num_data, pg, generator, index_fn, mc_keying, structure_options
    )
    import torch.distributed as dist

    rounds = StatusRounds(pg, status_interval)
    position = 0  # index of the batch being drawn or processed
    try:
        with _progress(loader, structure, progress and dist.get_rank(pg) == 0) as bar:
            for batch in bar:
                _update(acc, batch, **options)
                position += 1
                rounds.poll()
        rounds.finish()
    except BaseException as exc:
        if exc is rounds.error:  # a peer failed: every rank raises this
            raise
        err = rounds.fail(exc, position)
        if err is None:  # the rounds ended before the failure: it travels with the sum
            acc.mark_failed(exc)
            try:
                acc.all_reduce_(pg)
            except DistributedError as e:
                err = e
        if err is None or not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit: this rank ends as it was told to
        raise err from exc
    acc.all_reduce_(pg)
    return acc.finalize(num_data)


def _update(acc: Accumulator, batch: Any, batch_size_fn: Any, index_fn: Any) -> None:
    x, y = split_batch(batch)
    acc.update(
        x,
        y,
        batch_size=None if batch_size_fn is None else batch_size_fn(batch),
        index=None if index_fn is None else index_fn(batch),
    )


@contextmanager
def _progress(loader: Iterable, structure: str, show: bool) -> Iterator[Iterable]:
    """``loader`` wrapped in a tqdm bar (disabled unless ``show``), closed on exit."""
    from tqdm.auto import tqdm

    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    bar = tqdm(
        loader,
        total=total,
        disable=not show,
        desc=f"curvlib.fit {structure}",
        unit="batch",
        dynamic_ncols=True,
    )
    try:
        yield bar
    finally:
        bar.close()


def _agree(
    curv: Any,
    loader: Iterable,
    structure: str,
    num_data: int | None,
    pg: Any,
    generator: torch.Generator | None,
    index_fn: Any,
    mc_keying: str,
    options: dict[str, Any] | None = None,
) -> tuple[Accumulator, int | None]:
    """Set up this rank's accumulator and run the handshake (module docstring, step 1).

    A local failure here (a capability error, an interrupt) still joins the handshake, so
    that the peers raise instead of waiting in it.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    stochastic = bool(getattr(curv, "stochastic", False))
    acc, fields, extras, failure = None, None, [0, D.OK, 0], None
    try:
        if num_data is None:
            num_data = _distributed_sampler_size(loader)
        acc = Accumulator(
            curv,
            structure,
            seed=0 if stochastic else None,
            mc_keying=mc_keying,
            options=options,
        )
        fields = [*acc.describe(), protocol_field(FIT)]
        if stochastic:
            n = _local_num_samples(loader) if index_fn is None else 0
            seed = draw_seed(generator)
            extras = [n or 0, D.NO_LENGTH if n is None else D.OK, seed if rank == 0 else 0]
    except BaseException as exc:
        failure = exc
    try:
        rows = D.handshake(pg, fields, extras, failure)
    except DistributedError:
        if failure is not None and not isinstance(failure, Exception):
            raise failure from None
        raise
    no_length = [r for r in range(world) if rows[r][1] == D.NO_LENGTH]
    if no_length:
        raise D.failure_error(world, [(r, D.NO_LENGTH, "", -1) for r in no_length])
    acc._agreed = pg
    if stochastic:
        acc.seed, acc._next_index = int(rows[0][2]), int(sum(rows[r][0] for r in range(rank)))
    return acc, num_data


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
