"""One validated call: what the template hands to a backend's hook.

:class:`Call` carries the checked inputs, targets, options and capability of one public call
of :class:`~curvlib.interface.CurvatureInterface`, and the helpers every hook uses:
:meth:`Call.forward` (the first forward pass: a failure of the user's forward becomes an
:class:`~curvlib.errors.InputError`; output, targets, loss and the output-dependent size
estimate are checked before any backward pass), :meth:`Call.cotangents` (the curvature's
output-space square root, exact or sampled), the subnetwork selection and the reported loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from curvlib._inputs import check_generator, describe
from curvlib.capabilities import Capability
from curvlib.errors import CapabilityError, CurvlibError, InputError, NonFiniteError

__all__ = ["Call", "generator_state", "set_generator_state"]

_UNSET: Any = object()


@dataclass
class Call:
    """A validated call of one entry point (see the module docstring).

    Attributes
    ----------
    what : str
        The entry point (``"full"``, ``"diag"``, ``"kron"``, ``"jacobians"``, ...).
    cap : Capability
        The backend's row for it.
    x, inp : Any
        The user's input, and the input of the differentiated module (the features with
        ``last_layer=True``).
    y : Tensor or None
        The checked targets (integer labels as ``long``).
    B, N : int
        Batch size, and the number of data points of the whole data set (``kron``).
    generator : torch.Generator, sequence of generators, or None
        The MC draws' source (one generator, or one per data point).
    num_samples : int
        MC samples per data point; ``stochastic``: whether this is the MC Fisher.
    kfac_approx : str
    enable_backprop : bool
    idx : Tensor or None
        The subnetwork indices.
    options : dict
        The entry point's own per-call options (``basis`` of ``ekfac``, ``k`` of ``lowrank``).
    memo : dict
        What the call's steps compute once and share (:mod:`curvlib._memo`).
    selection : dict or None
        The selected parameters by name, fixed by the call's checks for all its steps.
    """

    curv: Any
    what: str
    cap: Capability
    x: Any
    inp: Any
    y: Tensor | None
    B: int
    N: int | None = None
    generator: Any = None
    num_samples: int = 1
    stochastic: bool = False
    kfac_approx: str = "expand"
    enable_backprop: bool = False
    idx: Tensor | None = None
    C: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    after_forward: list[Callable[[Call, Tensor], None]] = field(default_factory=list)
    memo: dict = field(default_factory=dict)
    selection: dict[str, Tensor] | None = None
    _forwarded: bool = False
    _checked_loss: tuple[Tensor, Any, Tensor] | None = None

    def __post_init__(self) -> None:
        check_generator(self.generator, self.B)

    def __setattr__(self, name: str, value: Any) -> None:
        # The input of the differentiated module is detached unless the caller asked for
        # the graph (``enable_backprop``): no backend accumulates into ``x.grad`` or
        # differentiates into the user's graph.
        if name == "inp" and value is not None and not self.enable_backprop:
            value = tree_map(
                lambda t: t.detach() if isinstance(t, Tensor) and t.requires_grad else t, value
            )
        super().__setattr__(name, value)

    # -- what the hooks read ------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The differentiated module (the model, or its last layer)."""
        return self.curv._model

    @property
    def params(self) -> list[Tensor]:
        """The selected parameters, in order."""
        return self.curv.params

    @property
    def lik(self):
        return self.curv.lik

    # -- the first forward pass ------------------------------------------------------------
    def forward(
        self,
        inp: Any = _UNSET,
        y: Any = _UNSET,
        grad: bool = True,
        fn: Callable[[Any], Tensor] | None = None,
    ) -> Tensor:
        """Run the differentiated module (or ``fn``) on ``inp`` and check its output.

        The first call of a call turns an exception of the user's forward into an
        :class:`InputError` naming the input (chained from it). Every call checks the output
        shape and finiteness, the targets against it and the loss, and runs the checks that
        need the output (the size estimate), before any backward pass.
        """
        inp = self.inp if inp is _UNSET else inp
        y = self.y if y is _UNSET else y
        run = self.module if fn is None else fn
        try:
            with torch.set_grad_enabled(grad):
                f = run(inp)
        except CurvlibError:
            raise
        except Exception as err:
            if self._forwarded:
                raise
            raise InputError(
                f"the model's forward pass failed on the input ({describe(self.x)}): "
                f"{type(err).__name__}: {err}. Check the input's shape and dtype against the "
                "model"
            ) from err
        self.check_output(f, inp, y)
        return f

    def check_output(self, f: Tensor, inp: Any, y: Tensor | None) -> None:
        """The checks of :meth:`forward` on an output computed elsewhere."""
        from curvlib._inputs import batch_size

        lik = self.lik
        lik.check_output(f, batch_size(inp, self.curv.dict_key_x) if inp is not None else None)
        if f.ndim > 2 and not self.cap.positions:
            raise CapabilityError(
                f"backend {self.curv.backend_name!r} computes {self.what!r} only for outputs "
                f"of shape (batch, outputs), got {tuple(f.shape)} (outputs with positions); "
                "use backend 'autograd' or 'auto'"
            )
        if y is not None:
            lik.check_target(f, y)
            loss = lik.loss(f.detach(), y)
            # what :meth:`loss` reports for this output (detached: the graph is not kept)
            self._checked_loss = (f.detach(), y, loss)
            if not bool(torch.isfinite(loss)):
                raise NonFiniteError(
                    f"the loss is {float(loss)} although inputs and outputs are finite: the "
                    f"outputs (largest magnitude {float(f.detach().abs().max()):.3g}) overflow "
                    f"the {lik.name} loss in {f.dtype}; rescale the inputs or the model"
                )
        if not self._forwarded:
            self._forwarded = True
            self.C = int(f[0].numel())
            for check in self.after_forward:
                check(self, f)

    # -- cotangents, selection, loss ----------------------------------------------------------
    def cotangents(self, f: Tensor, y: Any = _UNSET, generator: Any = _UNSET) -> Tensor:
        """``(B, K, *f.shape[1:])`` cotangents of the curvature (see :mod:`curvlib.likelihood`)."""
        y = self.y if y is _UNSET else y
        gen = self.generator if generator is _UNSET else generator
        return self.curv._cotangents(self, f.detach(), y, gen)

    def select(self, t: Tensor) -> Tensor:
        """Restrict the last (parameter) dimension of ``t`` to the subnetwork."""
        return t if self.idx is None else t.index_select(-1, self.idx)

    def select_full(self, H: Tensor) -> Tensor:
        """Restrict both dimensions of a ``(P, P)`` matrix to the subnetwork."""
        return H if self.idx is None else H[self.idx][:, self.idx]

    def loss(self, f: Tensor, y: Any = _UNSET) -> Tensor:
        """The reported loss ``factor * lossfunc(f, y)``, detached."""
        y = self.y if y is _UNSET else y
        if self._checked_loss is not None:
            f0, y0, loss = self._checked_loss
            if y is y0 and _same_values(f, f0):  # computed by the output's check
                return loss.detach()
        return self.lik.loss(f.detach(), y).detach()

    def generator_state(self) -> Any:
        """The state of the MC draws' generator(s), to draw the same samples again."""
        return generator_state(self.generator)

    def restore_generator(self, state: Any) -> None:
        """Put back the state :meth:`generator_state` read."""
        set_generator_state(self.generator, state)

    def generator_slice(self, s: slice) -> Any:
        """The generator(s) of the data points ``s`` (one per point, or the shared one)."""
        from collections.abc import Sequence

        g = self.generator
        return g[s] if isinstance(g, Sequence) else g


def _same_values(a: Tensor, b: Tensor) -> bool:
    """``a`` is a view of the same memory as ``b`` (alive: the caller holds ``b``), with the
    same layout, not written to since (``detach`` shares the version counter)."""
    return (
        isinstance(a, Tensor)
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
        and a._version == b._version
    )


def generator_state(generator: Any) -> Any:
    """The state of the MC draws' generator(s), to draw the same samples twice."""
    if generator is None:
        return None
    if isinstance(generator, Sequence):
        return [g.get_state() for g in generator]
    return generator.get_state()


def set_generator_state(generator: Any, state: Any) -> None:
    if generator is None:
        return
    if isinstance(generator, Sequence):
        for g, st in zip(generator, state, strict=True):
            g.set_state(st)
    else:
        generator.set_state(state)
