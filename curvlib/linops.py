r"""Matrix-free curvature: the linear operator :math:`v \mapsto C v`, never forming ``C``.

With :math:`f_n` the model output of sample ``n``, :math:`J_n = \partial f_n/\partial\theta`
and the reported loss :math:`L = \sum_n \ell_n` (``factor * lossfunc``, see
:mod:`curvlib.likelihood`), the
products on a batch are

* exact GGN: :math:`G v = \sum_n J_n^\top \Lambda(f_n) (J_n v)` — a Jacobian-vector product
  (``torch.func.jvp``), the output-space Hessian, a vector-Jacobian product (``vjp``);
* MC Fisher (``stochastic=True``): :math:`F v = \sum_n J_n^\top \sum_s c_{n,s}
  (c_{n,s}^\top J_n v)`, with the sampled cotangents :math:`c_{n,s} = \tilde g_{n,s} /
  \sqrt S` drawn **once**, when the operator is built, so that it is a fixed symmetric
  linear map (reproducible with ``generator``);
* empirical Fisher: :math:`E v = \sum_n g_n (g_n^\top v) = \sum_n J_n^\top r_n (r_n^\top
  J_n v)` with :math:`r_n = \nabla_{f_n} \ell_n` and :math:`g_n = J_n^\top r_n`;
* Hessian: :math:`H v = \frac{d}{d\epsilon} \nabla_\theta L(\theta + \epsilon v)` at
  :math:`\epsilon = 0`, forward-over-reverse (``jvp`` of ``grad``).

Over a data set (any iterable of batches, e.g. a ``DataLoader``) the batch products are
summed, and everything is multiplied by ``num_total_samples / num_curv_samples`` (laplax's
convention; 1 unless ``num_total_samples`` is given). Columns of a ``(P, K)`` input are
processed with ``torch.func.vmap``. ``v`` lives in the space of the selected parameters
(last layer, ``subnetwork_indices``): it is embedded into the full parameter vector,
multiplied, and the subnetwork's entries are returned.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from curvlib import _autodiff
from curvlib._inputs import batch_size, check_generator, split_batch
from curvlib.errors import CapabilityError, InputError

__all__ = ["CurvatureOperator", "curvature_operator", "shared_matmat"]

_KINDS = {"ggn", "ef", "hessian"}


def _is_data(x: Any) -> bool:
    """Whether ``x`` is a data set (an iterable of batches) rather than one batch's input."""
    atomic = (Tensor, Mapping, str, bytes)
    return x is not None and not isinstance(x, atomic) and isinstance(x, Iterable)


class CurvatureOperator:
    r"""The curvature of a model's loss as a matrix-free symmetric linear operator.

    Build it with :func:`curvature_operator` or ``curv.operator(x, y)``. ``op @ v`` (also
    ``op.matmul(v)`` and ``op(v)``) returns :math:`s\,C v` for ``v`` of shape ``(P,)`` or
    ``(P, K)``, with ``C`` the curvature of ``curv`` summed over the data and ``s`` the
    scale ``num_total_samples / num_curv_samples`` (times any scalar it was multiplied by:
    ``2.0 * op`` is an operator too).

    Attributes
    ----------
    shape : tuple[int, int]
        ``(P, P)``, ``P`` the number of selected parameters (after ``subnetwork_indices``).
    dtype, device
        Those of the model's parameters; inputs are cast to them.
    curvature : str
        ``"ggn"``, ``"fisher"`` (MC), ``"ef"`` or ``"hessian"``.
    scale : float
        The constant ``s`` above.
    """

    def __init__(
        self,
        curv: Any,
        x: Any = None,
        y: Tensor | None = None,
        *,
        data: Iterable | None = None,
        num_curv_samples: int | None = None,
        num_total_samples: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        create_graph: bool = False,
        chunk_size: int = 8,
    ) -> None:
        name = curv.curvature_name()
        if name not in _KINDS:
            raise CapabilityError(
                f"{type(curv).__name__} has curvature {name!r}; operators exist for {_KINDS}"
            )
        if data is None and _is_data(x):
            if y is not None:
                raise InputError("pass either a data set (as x or data=) or a batch x, y; not both")
            x, data = None, x
        if (data is None) == (x is None):
            raise InputError("pass either one batch (x, y) or a data set (data=DataLoader)")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        check_generator(generator, None)
        self.curv = curv
        self.curvature = "fisher" if getattr(curv, "stochastic", False) else name
        self.create_graph = bool(create_graph)
        self.chunk_size = chunk_size
        self.progress = progress
        self.generator = generator
        ref = curv.params[0] if curv.params else None
        if ref is None:
            raise InputError(
                f"{type(curv.model).__name__} has no parameters with requires_grad=True"
            )
        self.dtype, self.device = ref.dtype, ref.device
        self._data = data
        self._batch: Any = None
        self._samples: list[tuple[Tensor, Tensor]] | None = None
        self._num_data: int | None = None
        self._data_checked = False  # every batch of the data seen by the output checks
        if data is None:
            self._batch = self._checked(x, y)
            self._num_data = self._batch.B
        from curvlib._selection import subnetwork

        self._idx = subnetwork(curv.subnetwork_indices, curv.num_params, self.device)
        self._P_full = curv.num_params
        P = self._P_full if self._idx is None else int(self._idx.numel())
        self.shape = (P, P)
        if self.curvature == "fisher":
            self._samples = self._draw(generator)
        if num_curv_samples is not None and num_curv_samples < 1:
            raise ValueError(f"num_curv_samples must be positive, got {num_curv_samples}")
        if num_total_samples is None:
            self.scale = 1.0
        else:
            n_curv = self.num_data if num_curv_samples is None else num_curv_samples
            self.scale = float(num_total_samples) / float(n_curv)

    # -- data -----------------------------------------------------------------------------
    def _to_device(self, t: Any) -> Any:
        # meta tensors stay where they are, so that the batch's check names them
        return tree_map(
            lambda a: a.to(self.device) if isinstance(a, Tensor) and not a.is_meta else a, t
        )

    def _checked(self, x: Any, y: Tensor | None):
        """Validate one batch (the template's checks and one forward pass); its call."""
        check_generator(self.generator, batch_size(x, self.curv.dict_key_x))
        return self._call_of(x, y, forward=True)

    def _call_of(self, x: Any, y: Tensor | None, forward: bool):
        """The template's checks of one batch, its input features and, with ``forward``,
        the output checks of one forward pass (no graph)."""
        call = self.curv._begin("operator", self._to_device(x), self._to_device(y))
        with self.curv._hygiene(call):
            call.inp = self.curv._features(call)
            if forward:
                call.forward(grad=False)
        return call

    def _batches(self) -> Iterator[Any]:
        """The validated call of every batch of the data.

        Before the first product every batch is checked, its output included (the targets
        against the outputs, the loss), in one forward pass over the data: a bad batch is
        refused before any product is computed.
        """
        if self._batch is not None:
            yield self._batch
            return
        if not self._data_checked:
            for _ in self._calls(check=True):
                pass
            self._data_checked = True
        yield from self._calls(check=False)

    def _calls(self, check: bool) -> Iterator[Any]:
        it: Iterable = self._data
        if self.progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="checking the data" if check else "curvature product", leave=False)
        for batch in it:
            yield self._call_of(*split_batch(batch), forward=check)

    def _draw(self, generator: torch.Generator | None) -> list[tuple[Tensor, Tensor]]:
        """MC cotangents of every batch, drawn once (with the batch's targets, to check
        later that the data come in the same order)."""
        out, n = [], 0
        for call in self._batches():
            with self.curv._hygiene(call):
                f = call.forward(grad=False)
            if generator is None:  # one seed from the global RNG, as every MC call
                generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
            out.append((call.cotangents(f, generator=generator), call.y.detach().clone()))
            n += int(f.shape[0])
        self._num_data = n
        return out

    @property
    def num_data(self) -> int:
        """``N_curv``: the number of data points the curvature is summed over."""
        if self._num_data is None:
            data = self._data
            dataset = getattr(data, "dataset", None)
            sampler = getattr(data, "sampler", None)
            exact_len = not getattr(data, "drop_last", False) and hasattr(sampler, "__len__")
            if dataset is not None and sampler is not None and exact_len:
                n = len(sampler)
            else:
                n = sum(batch_size(split_batch(b)[0], self.curv.dict_key_x) for b in data)
            self._num_data = int(n)
        return self._num_data

    # -- products ---------------------------------------------------------------------------
    def _full_product(self, V: Tensor) -> Tensor:
        out, n = None, 0
        samples = self._samples
        for i, call in enumerate(self._batches()):
            n = i + 1
            cot = None
            if samples is not None:
                if i >= len(samples) or not torch.equal(samples[i][1], call.y):
                    raise InputError(
                        "the data changed since the MC Fisher operator was built: its "
                        "samples belong to the batches in their first order; iterate the "
                        "data deterministically (DataLoader(shuffle=False))"
                    )
                cot = samples[i][0]
            with self.curv._hygiene(call):
                part = torch.cat(
                    [
                        self.curv._matmat(
                            call, V[:, s : s + self.chunk_size], cot, self.create_graph
                        )
                        for s in range(0, V.shape[1], self.chunk_size)
                    ],
                    dim=1,
                )
            out = part if out is None else out + part
        if out is None:
            raise InputError("the data set is empty (it yielded no batch)")
        if samples is not None and n != len(samples):
            raise InputError("the data has a different number of batches than when built")
        return out

    def matmul(self, v: Tensor) -> Tensor:
        """``s C v`` for ``v`` of shape ``(P,)`` or ``(P, K)``; the result has ``v``'s shape."""
        if not isinstance(v, Tensor):
            raise InputError(f"v must be a torch.Tensor, got {type(v).__name__}")
        P = self.shape[0]
        if v.ndim not in (1, 2) or v.shape[0] != P:
            raise InputError(f"v must have shape ({P},) or ({P}, K), got {tuple(v.shape)}")
        V = v.to(device=self.device, dtype=self.dtype)
        vector = V.ndim == 1
        if vector:
            V = V.unsqueeze(1)
        if self._idx is not None:
            V = V.new_zeros(self._P_full, V.shape[1]).index_copy(0, self._idx, V)
        out = self._full_product(V)
        if self._idx is not None:
            out = out.index_select(0, self._idx)
        out = out * self.scale
        return out.squeeze(1) if vector else out

    __matmul__ = matmul
    __call__ = matmul

    def __mul__(self, c: float) -> CurvatureOperator:
        """The operator scaled by the real number ``c`` (no recomputation)."""
        if isinstance(c, Tensor):
            c = c.item()
        if not isinstance(c, (int, float)):
            return NotImplemented
        new = copy.copy(self)
        new.scale = self.scale * float(c)
        return new

    __rmul__ = __mul__

    def to_dense(self) -> Tensor:
        """The ``(P, P)`` matrix, by ``P`` products with unit vectors (for small ``P`` only)."""
        return self @ torch.eye(self.shape[0], dtype=self.dtype, device=self.device)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out).

        Inputs are cast to the operator's dtype and device, outputs to float64 on the CPU.
        """
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(a: Any) -> Any:
            t = torch.as_tensor(np.asarray(a, dtype=np.float64))
            with torch.no_grad():
                out = self @ t
            return out.detach().cpu().double().numpy()

        return LinearOperator(
            self.shape, matvec=mv, rmatvec=mv, matmat=mv, rmatmat=mv, dtype=np.float64
        )

    def __repr__(self) -> str:
        return (
            f"CurvatureOperator({self.curvature}, shape={self.shape}, dtype={self.dtype}, "
            f"device={self.device}, scale={self.scale:g})"
        )


def curvature_operator(
    curv: Any,
    x: Any = None,
    y: Tensor | None = None,
    *,
    data: Iterable | None = None,
    num_curv_samples: int | None = None,
    num_total_samples: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    create_graph: bool = False,
    chunk_size: int = 8,
) -> CurvatureOperator:
    r"""The matrix-free operator :math:`v \mapsto s\,C v` of a curvature object.

    Parameters
    ----------
    curv : CurvatureInterface
        Any curvature class (GGN — exact or MC with ``stochastic=True`` —, EF, Hessian); its
        likelihood, last layer and subnetwork are used.
    x, y : Tensor or dict, optional
        One batch. ``x`` may instead be a data set: any iterable that is neither a tensor nor
        a dict (a ``DataLoader``, a list of batches) is treated as ``data``.
    data : Iterable, optional
        Batches ``(x, y)`` (or dicts holding the targets under ``dict_key_y``), iterated on
        every product, moved to the model's device. It must yield the same batches in the
        same order each time (``shuffle=False``); the MC Fisher checks this.
    num_curv_samples : int, optional
        ``N_curv``, the number of data points in ``x`` / ``data`` (counted if not given).
    num_total_samples : int, optional
        ``N_total``: the products are multiplied by ``N_total / N_curv`` (laplax), e.g. to
        extrapolate the curvature of a subset to the training set. Default: no scaling.
    generator : torch.Generator, optional
        Draws the MC Fisher's pseudo-targets, once, when the operator is built (without it
        they come from the global RNG, as everywhere in curvlib).
    progress : bool, default False
        A progress bar for each pass over ``data``.
    create_graph : bool, default False
        Keep the graph to the model's parameters, so that results can be differentiated
        (Λ(f) and r_n depend on the parameters too; MC samples are constants).
    chunk_size : int, default 8
        Columns of a ``(P, K)`` input vmapped at once (memory grows with it: each column
        carries its own copy of the activations).

    Returns
    -------
    CurvatureOperator
    """
    return CurvatureOperator(
        curv,
        x,
        y,
        data=data,
        num_curv_samples=num_curv_samples,
        num_total_samples=num_total_samples,
        generator=generator,
        progress=progress,
        create_graph=create_graph,
        chunk_size=chunk_size,
    )


def shared_matmat(
    curv: Any, call: Any, V: Tensor, cot: Tensor | None, create_graph: bool
) -> Tensor:
    """``C_batch @ V`` for ``V (P, K)`` in the full parameter space, by torch.func.

    The curvature's shared product (see the module docstring): Jacobian-vector products
    (forward mode, or reverse over reverse where an op lacks a forward derivative), the
    output-space matrix, vector-Jacobian products; Hessian-vector products for the Hessian.
    ``cot`` holds the MC Fisher's cotangents drawn when the operator was built.
    """
    lik = curv.lik
    params = curv.params
    fn = _autodiff.functional(curv._model, params)
    values = [p if create_graph else p.detach() for p in params]
    sizes = [p.numel() for p in params]
    shapes = [p.shape for p in params]
    inp, y = call.inp, call.y

    def unflat(col: Tensor) -> list[Tensor]:
        return [c.view(s) for c, s in zip(col.split(sizes), shapes, strict=True)]

    if curv.curvature_name() == "hessian":
        return _autodiff.hvp(lambda vals: lik.loss(fn(vals, inp), y), values, V.T, curv.model).T
    f, vjp_fn = _autodiff.vjp(lambda vals: fn(vals, inp), values, curv.model, create_graph)
    JV = torch.stack(
        [
            _autodiff.jvp(lambda vals: fn(vals, inp), values, unflat(V[:, k]), curv.model)
            for k in range(V.shape[1])
        ]
    )  # (K, B, *out)
    f_m = f if create_graph else f.detach()
    JVf = JV.flatten(2)  # (K, B, O)
    if curv.curvature_name() == "ggn" and cot is None:
        c = lik.sqrt_cotangents(f_m, y)  # (B, Kc, *out)
    elif cot is None:
        c = lik.ef_cotangents(f_m, y)
    else:
        c = cot
    c = c.flatten(2)  # (B, Kc, O)
    W = torch.einsum("bso,bsd,kbd->kbo", c, c, JVf).reshape(JV.shape)
    grads = [vjp_fn(W[k]) for k in range(W.shape[0])]
    return torch.stack([torch.cat([g.reshape(-1) for g in gk]) for gk in grads], dim=1)
