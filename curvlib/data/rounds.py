r"""Failure propagation during a distributed loop: asynchronous status rounds.

Without them a rank whose loop fails (an exception, a ``KeyboardInterrupt``) can only tell
its peers at the final all-reduce — which they reach after *their* whole loop, or never if
the failing process exits: then they wait for the process group's timeout (30 minutes by
default). :class:`StatusRounds` lets every rank learn of a failure within about two status
intervals plus the duration of one batch, without a barrier per batch.

Protocol (every rank runs it; all decisions are taken from reduced numbers that are the
same on every rank, so all ranks run the same number of rounds):

* A round is one **non-blocking** ``SUM`` all-reduce (``async_op=True``) of a fixed-size
  int64 buffer, ``ROUND_SLOTS`` per rank: ``[status, done, batch index, exception type
  name]``, each rank writing its own row. A rank has at most one round in flight.
* :meth:`StatusRounds.poll`, after each batch: if the round in flight has completed
  (``Work.is_completed()``, no waiting), read it; then post the next one if
  ``interval`` seconds have passed since the last. Ranks never wait for each other here.
* :meth:`StatusRounds.finish`, when the loader is exhausted: post rounds with ``done=1``
  and wait for them until a round shows every rank done.
* :meth:`StatusRounds.fail`, when the loop raised: wait for the round in flight, post one
  with this rank's status and wait for it.
* A round that shows a failed rank ends the loop on every rank: each raises the same
  :class:`~curvlib.errors.DistributedError` naming the rank, its exception type and batch.
  A round that shows every rank done ends it too; then the final packed sum follows.

A rank waits in a round at most until the slowest peer posts it, i.e. about ``interval``
plus one batch, so the process group's timeout only needs to exceed that — not the length
of the whole loop (a rank with an empty shard no longer waits for its peers' loops in one
collective). A process that is killed or crashes cannot report; its peers then raise when
the process group's timeout expires.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from curvlib.data.distributed import (
    NAME_SLOTS,
    OK,
    collective_error,
    comm_device,
    decode_text,
    encode_text,
    failure_error,
    status_of,
    sum_all_reduce,
)
from curvlib.errors import DistributedError

__all__ = ["StatusRounds", "ROUND_SLOTS", "DEFAULT_INTERVAL"]

#: int64 slots per rank of a round: status, done, batch index, exception type name
ROUND_SLOTS = 3 + NAME_SLOTS
#: seconds between two status rounds of a rank (``fit(status_interval=...)``)
DEFAULT_INTERVAL = 0.5


class StatusRounds:
    """Asynchronous status rounds over the ranks of ``pg`` (module docstring).

    Parameters
    ----------
    pg : ProcessGroup
    interval : float or None
        Minimum seconds between two rounds posted by :meth:`poll`; ``None`` posts none, so
        that failures surface only when the loops end (one round in :meth:`finish`).

    Attributes
    ----------
    closed : bool
        A round ended the loop (every rank done, or a rank failed): no more rounds.
    error : DistributedError or None
        The error of the group, once a round showed a failure or a collective failed.
    rounds : int
        Rounds completed so far.
    """

    def __init__(self, pg: Any, interval: float | None = DEFAULT_INTERVAL) -> None:
        import torch.distributed as dist

        if interval is not None and not interval >= 0:
            raise ValueError(f"status_interval must be >= 0 seconds or None, got {interval!r}")
        self.pg = pg
        self.rank, self.world = dist.get_rank(pg), dist.get_world_size(pg)
        self.interval = interval
        self.comm = comm_device(pg)
        self.closed = False
        self.error: DistributedError | None = None
        self.rounds = 0
        self._work: Any = None
        self._buf: torch.Tensor | None = None
        self._last = time.monotonic()

    # ------------------------------------------------------------------ one round
    def _post(self, status: int, done: bool, batch: int, name: str) -> None:
        row = [status, int(done), int(batch), *encode_text(name, NAME_SLOTS)]
        buf = torch.zeros(self.world, ROUND_SLOTS, dtype=torch.int64)
        buf[self.rank] = torch.tensor(row, dtype=torch.int64)
        buf = buf.to(self.comm)
        try:
            self._work = sum_all_reduce(buf, self.pg, async_op=True)
        except DistributedError as err:
            self.closed, self.error = True, err
            raise
        self._buf = buf
        self._last = time.monotonic()

    def _collect(self) -> None:
        """Wait for the round in flight and act on it (close; raise for a failure)."""
        # The state changes in one statement after the result is read: an interrupt that
        # arrives earlier (Python runs signal handlers between calls) leaves the completed
        # round in flight, and the next _collect (in fail) reads it again.
        try:
            self._work.wait()
        except Exception as exc:
            self._work = self._buf = None
            self.closed, self.error = True, collective_error(self.pg, exc)
            raise self.error from exc
        rows = self._buf.cpu().tolist()
        failed = [
            (r, row[0], decode_text(row[3 : 3 + NAME_SLOTS]), row[2])
            for r, row in enumerate(rows)
            if row[0] != OK
        ]
        error = failure_error(self.world, failed) if failed else None
        closed = bool(failed) or all(row[1] for row in rows)
        self._work, self._buf, self.rounds, self.closed, self.error = (
            None,
            None,
            self.rounds + 1,
            closed,
            error,
        )
        if error is not None:
            raise error

    # ------------------------------------------------------------------ the loop
    def poll(self) -> None:
        """After a batch: read a completed round, post the next when due; never waits.

        Raises
        ------
        DistributedError
            A peer failed (the same error on every rank).
        """
        if self.closed:
            return
        if self._work is not None:
            if not self._work.is_completed():
                return
            self._collect()
        if self.interval is not None and time.monotonic() - self._last >= self.interval:
            self._post(OK, False, -1, "")

    def finish(self) -> None:
        """This rank is done: take part in rounds until every rank is done.

        Raises
        ------
        DistributedError
            A peer failed.
        """
        while not self.closed:
            if self._work is None:
                self._post(OK, True, -1, "")
            self._collect()

    def fail(self, exc: BaseException, batch: int) -> DistributedError | None:
        """Report this rank's failure ``exc`` (at ``batch``) to every rank.

        Returns
        -------
        DistributedError or None
            The error every rank raises; ``None`` if the rounds had already ended with every
            rank done (then the failure must travel with the final sum:
            :meth:`curvlib.data.Accumulator.mark_failed`).
        """
        if self.closed:
            return self.error
        try:
            if self._work is not None:
                self._collect()
            if not self.closed:
                self._post(status_of(exc), True, batch, type(exc).__name__)
                self._collect()
        except DistributedError as err:
            return err
        return self.error
