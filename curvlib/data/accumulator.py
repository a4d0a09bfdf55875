r"""The mergeable accumulator: unnormalized sums and a count, normalized once at the end.

An :class:`Accumulator` holds the summed loss :math:`\sum_n \ell_n`, the number of data
points :math:`N` and the summands of one structure (see :mod:`curvlib.data.structures`).
Accumulators of disjoint parts of the data merge by addition (:meth:`Accumulator.merge` in
one process, :meth:`Accumulator.all_reduce_` across ranks), so batches, shards and ranks
are one code path; :meth:`Accumulator.finalize` normalizes by the global :math:`N`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from curvlib.data import distributed as D
from curvlib.data.batches import batch_dim
from curvlib.data.fields import MANUAL, describe, protocol_field
from curvlib.data.keys import MC_KEYINGS, draw_seed, sample_generators, sample_seed
from curvlib.data.structures import STRUCTURES
from curvlib.data.wrappers import check_not_sharded, unwrapped
from curvlib.errors import CapabilityError, DistributedError, InputError, NonFiniteError
from curvlib.kron import Kron

__all__ = ["Accumulator"]


class Accumulator:
    r"""Mergeable, unnormalized accumulation of one curvature structure.

    Holds the loss sum :math:`L = \sum_n \ell_n`, the count :math:`N` and the curvature
    sums: ``diag`` :math:`\sum_n h_n` ``(P,)``, ``full`` :math:`\sum_n H_n` ``(P, P)``,
    ``kron`` per weight :math:`[G, \tilde A] = [\sum g g^\top, \sum a a^\top]` and per bias
    ``[G]`` (the backend is called as ``kron(x, y, N=B)`` on a batch of ``B`` and its
    :math:`A` multiplied by ``B``; with weight sharing ``"expand"`` the sum over locations
    is still divided by ``L``). Memory is that of one result, independent of the number of
    updates. Nothing is normalized until :meth:`finalize`. Each batch's loss and result
    are checked for NaN/inf before they are added.

    Parameters
    ----------
    curv : CurvatureInterface
        The curvature object; a DDP-wrapped ``curv.model`` is unwrapped during each call.
    structure : str
        A key of :data:`curvlib.data.structures.STRUCTURES` (``"full"``, ``"diag"``,
        ``"kron"``) that is in ``type(curv).structures``.
    seed : int, optional
        Base seed of the per-sample MC generators (stochastic curvatures only, see
        :mod:`curvlib.data.keys`). Default: drawn from ``generator``.
    generator : torch.Generator, optional
        Source of the base seed when ``seed`` is not given; default torch's global RNG.
    index_offset : int, default 0
        Global index of the first data point passed to :meth:`update` without ``index``.
    mc_keying : {"sample", "batch"}, default "sample"
        ``"sample"``: one generator per data point (one backend call per batch); the MC
        result is independent of batching, sharding and the number of ranks.
        ``"batch"``: one generator per batch, keyed by the batch's first global index;
        reproducible, but dependent on how the data are batched.
    options : dict, optional
        The structure's own options (:data:`curvlib.data.structures.STRUCTURES`): ``basis``
        for ``"ekfac"`` (required: the eigenbases of the data set's K-FAC, see
        :func:`curvlib.fit`), ``k``, ``sketch``, ``seed`` and ``remainder`` for ``"lowrank"``.

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
        options: dict[str, Any] | None = None,
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
        check_not_sharded(curv.model)
        self.curv = curv
        self.structure = structure
        self.rule = STRUCTURES[structure]
        self.options = self.rule.check_options(curv, dict(options or {}))
        self.stochastic = bool(getattr(curv, "stochastic", False))
        if self.stochastic and seed is None:
            seed = draw_seed(generator)
        self.seed = None if seed is None else int(seed)
        self.mc_keying = mc_keying
        self._next_index = int(index_offset)
        self.count = 0
        #: number of :meth:`update` calls (the next batch's 0-based index)
        self.batches = 0
        self.loss: Tensor | None = None
        self._tensors: list[Tensor] | None = None
        self._layout: tuple[int, ...] | None = None
        self._status = D.OK
        self._exc: BaseException | None = None
        self._reduced = False
        self._agreed: Any = None  # the process group a handshake succeeded on

    # ------------------------------------------------------------------ layout
    def _template(self) -> tuple[list[tuple[int, ...]], tuple[int, ...], torch.dtype, Any]:
        """Shapes and layout of the sums from the parameters (what an empty rank sends)."""
        with unwrapped(self.curv) as c:
            params = list(c.params)
            if not params:
                raise InputError("the curvature has no selected parameters (requires_grad=True)")
            shapes, layout = self.rule.template(c, self.options)
        return shapes, layout, params[0].dtype, params[0].device

    def describe(self) -> list[tuple[str, str, str]]:
        """What every rank must agree on, for the handshake (:func:`curvlib.data.fields.describe`).

        Returns
        -------
        list of (field, description, shown)
        """
        shapes, layout, _, _ = self._template()
        with unwrapped(self.curv) as c:
            return describe(c, self.structure, self.mc_keying, shapes, layout)

    # ------------------------------------------------------------------ accumulation
    def _call(self, x: Any, y: Tensor | None, B: int, generator: Any):
        kw: dict[str, Any] = {} if generator is None else {"generator": generator}
        with unwrapped(self.curv) as c:
            loss, result = self.rule.call(c, x, y, B, {**kw, **self.options})
        tensors, layout = self.rule.pack(c, result, B)
        return loss.detach(), [t.detach() for t in tensors], layout

    def _check_finite(
        self, loss: Tensor, tensors: list[Tensor], layout: tuple[int, ...], k: int
    ) -> None:
        """Raise :class:`NonFiniteError` naming the first non-finite quantity of batch ``k``."""
        flags = torch.stack([torch.isfinite(t).all() for t in [loss, *tensors]])
        if bool(flags.all()):
            return
        with unwrapped(self.curv) as c:
            names = list(c.params_dict)
        labels = ["loss", *self.rule.labels(layout, names)]
        bad = [labels[i] if i < len(labels) else f"summand {i}" for i in (~flags).nonzero()[:, 0]]
        raise NonFiniteError(
            f"batch {k} (0-based) gave a non-finite (NaN or inf) {bad[0]}"
            + (f" (and {len(bad) - 1} more: {bad[1:4]})" if len(bad) > 1 else "")
            + "; check the model's weights and the batch's inputs and targets for overflow"
        )

    def _add(self, loss: Tensor, tensors: list[Tensor], layout: tuple[int, ...]) -> None:
        if self._tensors is None:
            self._tensors = [t.clone() for t in tensors]
            self._layout = layout
            self.loss = loss.detach().clone()
            return
        shapes = [tuple(t.shape) for t in self._tensors]
        if layout != self._layout or [tuple(t.shape) for t in tensors] != shapes:
            raise InputError(
                f"the {self.structure!r} result changed its layout between batches: "
                f"{shapes} before, {[tuple(t.shape) for t in tensors]} now"
            )
        for acc, t in zip(self._tensors, tensors, strict=True):
            acc.add_(t)
        self.loss = self.loss + loss.detach()

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

        Raises
        ------
        NonFiniteError
            The batch's loss or result contains NaN or inf (named, with the batch index:
            the number of earlier updates), or the curvature object raised one (chained);
            the sums are left as they were before the batch.
        """
        if self._reduced:
            raise InputError("this accumulator has been all-reduced; create a new one to update")
        k = self.batches
        self.batches += 1
        B = batch_dim(x, getattr(self.curv, "dict_key_x", "input_ids"))
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
            gen = None
        elif self.mc_keying == "batch":
            gen = torch.Generator(device="cpu").manual_seed(sample_seed(self.seed, idx[0]))
        else:  # one generator per data point, in one batched call
            gen = sample_generators(self.seed, idx)
        try:
            loss, tensors, layout = self._call(x, y, B, gen)
        except NonFiniteError as exc:
            raise NonFiniteError(f"batch {k} (0-based): {exc}") from exc
        self._check_finite(loss, tensors, layout, k)
        self._add(loss, tensors, layout)
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
        if other._status != D.OK and self._status == D.OK:
            self._status, self._exc = other._status, other._exc
        if other._tensors is not None:
            self._add(other.loss, other._tensors, other._layout)
        self.count += other.count
        return self

    def mark_failed(self, exc: BaseException | None = None) -> None:
        """Record that this rank failed (``exc``), so that :meth:`all_reduce_` raises on all.

        Use in hand-written loops: wrap the updates in ``try``, call ``mark_failed`` in
        ``except BaseException`` and still call :meth:`all_reduce_`, which then raises the
        same :class:`~curvlib.errors.DistributedError` on every rank instead of leaving the
        healthy ranks waiting in the collective.
        """
        self._status, self._exc = D.status_of(exc) or D.FAILED, exc

    # ------------------------------------------------------------------ distributed
    def handshake(self, group: Any = None, extras: Sequence[int] = ()) -> list[list[int]]:
        """Check that every rank of ``group`` accumulates the same thing (see :meth:`describe`).

        One fixed-size int64 ``SUM`` all-reduce (:func:`curvlib.data.distributed.handshake`);
        every rank must call it. :meth:`all_reduce_` calls it first unless it succeeded on
        the same group before (as in :func:`~curvlib.data.fit`).

        Returns
        -------
        list of list of int
            ``extras`` of every rank, by rank.

        Raises
        ------
        DistributedError
            On every rank, naming the field that differs and each rank's value.
        """
        pg = D.world_group(group, "Accumulator.handshake")
        out = D.handshake(pg, [*self.describe(), protocol_field(MANUAL)], extras)
        self._agreed = pg
        return out

    def _local_status(self, shapes: list[tuple[int, ...]], layout: tuple[int, ...]) -> int:
        if self._status != D.OK or self._tensors is None:
            return self._status
        if [tuple(t.shape) for t in self._tensors] != shapes or self._layout != layout:
            return D.LAYOUT
        finite = all(bool(torch.isfinite(t).all()) for t in [self.loss, *self._tensors])
        return D.OK if finite else D.NONFINITE

    def all_reduce_(self, group: Any = None) -> Accumulator:
        r"""Sum this accumulator over the ranks of ``group`` in place; return ``self``.

        First the :meth:`handshake` (unless done on ``group``), then one ``SUM``
        all-reduce of one packed buffer ``[status per rank, count (hi, lo), number of
        ranks, loss, every summand]`` (:func:`curvlib.data.distributed.reduce_sums`) —
        never ``ReduceOp.AVG``. Every rank must call it (also a rank without data, or one
        that failed: see :meth:`mark_failed`). Afterwards all ranks hold bit-identical sums.

        Parameters
        ----------
        group : ProcessGroup or "world" or None
            The process group; ``None`` and ``"world"`` mean the default (world) group.

        Raises
        ------
        DistributedError
            On every rank, with the same message naming the failing rank(s), if any rank
            failed, produced NaN/inf, or differs in what it accumulates.
        """
        pg = D.world_group(group, "all_reduce_")
        if self._reduced:
            raise DistributedError("this accumulator has been all-reduced already")
        if self._agreed is not pg:
            try:
                fields, failure = [*self.describe(), protocol_field(MANUAL)], None
            except Exception as exc:  # joins the handshake anyway, so no peer hangs
                fields, failure = None, exc
            D.handshake(pg, fields, (), failure)
            self._agreed = pg
        shapes, layout, dtype, device = self._template()
        status = self._local_status(shapes, layout)
        self.count, self.loss, self._tensors = D.reduce_sums(
            pg, status, self.count, self.loss, self._tensors, shapes, dtype, device, self._exc
        )
        self._layout = layout
        self._reduced = True
        return self

    # ------------------------------------------------------------------ result
    def finalize(self, num_data: int | None = None) -> tuple[Tensor, int, Tensor | Kron]:
        r"""Normalize once by the global count and return ``(loss, N, curvature)``.

        ``loss`` is the summed loss :math:`\sum_n \ell_n`; ``curvature`` the summed
        ``diag`` ``(P,)`` or ``full`` ``(P, P)``, or the :class:`~curvlib.Kron` with
        :math:`G = \sum g g^\top` and :math:`A = \frac1N \sum a a^\top` — what one
        ``kron(X, Y, N)`` call on the whole data set returns. The accumulator is not
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
        if self._status != D.OK and not self._reduced:
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
        with unwrapped(self.curv) as c:
            result = self.rule.finalize(c, self._tensors, self._layout, N, self.options)
        return self.loss.clone(), N, result
