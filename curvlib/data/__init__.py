r"""Accumulation over data loaders, shards and ranks (``torch.distributed``).

Curvature for a Laplace approximation is a sum over the whole training set. This package
splits that sum into parts that can be computed anywhere and added up later:

* :class:`Accumulator` (:mod:`~curvlib.data.accumulator`) holds **only unnormalized sums
  and a count** — :math:`\sum_n \ell_n`, :math:`\sum_n h_n` or :math:`\sum_n H_n`, and for
  K-FAC every factor as a plain sum (:math:`G = \sum_n g g^\top`,
  :math:`\tilde A = \sum_n a a^\top`) — plus the number of data points :math:`N`.
  Accumulators of disjoint parts merge by addition, in one process or across ranks;
  :meth:`Accumulator.finalize` normalizes once: :math:`A = \tilde A / N`.
* :data:`STRUCTURES` (:mod:`~curvlib.data.structures`): one rule per structure (how to
  call the curvature object, pack its result into summands, and finalize).
* :func:`fit` (:mod:`~curvlib.data.fitting`) runs an accumulator over a ``DataLoader``
  with a progress bar; with a process group over every rank's shard, guarded by a
  handshake (:mod:`~curvlib.data.fields`: what the ranks must agree on) and status rounds,
  and finished by one packed ``SUM`` all-reduce (:mod:`~curvlib.data.distributed`,
  :mod:`~curvlib.data.rounds`).
* :func:`shard_indices`, :func:`sample_seed` (:mod:`~curvlib.data.keys`): contiguous,
  non-padded shards, and the per-data-point keying of the Monte-Carlo draws.
* :func:`split_batch` (:mod:`~curvlib.data.batches`): the one rule of what a loader batch
  is — ``(x, y)`` or a dict holding the targets.
"""

from curvlib.data.accumulator import Accumulator
from curvlib.data.batches import split_batch
from curvlib.data.fitting import fit
from curvlib.data.keys import MC_KEYINGS, sample_seed, shard_indices
from curvlib.data.structures import STRUCTURES, StructureRule

__all__ = [
    "Accumulator",
    "fit",
    "shard_indices",
    "sample_seed",
    "split_batch",
    "STRUCTURES",
    "StructureRule",
    "MC_KEYINGS",
]
