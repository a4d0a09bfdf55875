r"""laplace-torch adapter: any curvlib backend as a ``Laplace(..., backend=...)`` backend.

>>> from laplace import Laplace
>>> from curvlib.integrations.laplace import laplace_backend
>>> la = Laplace(model, "classification", hessian_structure="kron",
...              backend=laplace_backend("autograd", "ggn"))             # doctest: +SKIP

:func:`laplace_backend` returns a class (laplace-torch instantiates the backend itself) that
holds a curvlib curvature object and answers laplace-torch 0.3's curvature protocol with
laplace-torch's own numbers, so swapping ``backend=CurvlinopsGGN`` for
``backend=laplace_backend(...)`` leaves posterior precision, marginal likelihood and
predictive unchanged up to float round-off. What laplace-torch needs of a backend, found by
reading and running it, and how each need is met, is in ``docs/laplace.md``.

Scaling
-------
laplace-torch's backends compute the curvature :math:`C_\ell` of the *unscaled* loss
``lossfunc`` (``MSELoss``/``CrossEntropyLoss`` with sum reduction) and multiply the result by
``factor`` (1/2 for regression, 1 for classification) once. curvlib returns the curvature
:math:`C` of the reported loss ``factor * lossfunc`` (curvlib's conventions). For the GGN,
MC Fisher and Hessian, which are linear in the loss, :math:`C = \text{factor}\, C_\ell`;
the empirical Fisher is quadratic in it, :math:`C = \text{factor}^2 C_\ell`. So with ``p``
that power (:data:`LOSS_POWER`) the adapter returns

.. math:: C_{\text{laplace}} = \text{factor} \cdot C / \text{factor}^{p},

i.e. the same for GGN, MC Fisher and Hessian and ``C / factor`` (twice curvlib's) for the EF
of regression. For ``kron`` it does what laplace-torch's default backend (``CurvlinopsGGN``/
``CurvlinopsEF``) does: it forms :math:`C_\ell` (first factor of each entry divided by
:math:`\text{factor}^p`) and multiplies the :class:`laplace.utils.matrix.Kron` by ``factor``
with laplace-torch's own ``Kron.__mul__``, which spreads it as :math:`\sqrt{\text{factor}}`
over the two factors of a weight. Hence even the individual factors, which matter for
``KronLaplace(damping=True)``, are laplace-torch's.

``N``: ``kron(x, y, N)`` is curvlib's definition and laplace-torch's alike — summed over the
batches of a data set of ``N`` points, ``A = (1/N) Σ a aᵀ``. laplace-torch's backends reach it
by rescaling the second factor by ``M/N`` (``_rescale_kron_factors``); curvlib's ``kron``
already returns it, so ``N`` is passed through and nothing is rescaled here. laplace-torch's
backends also accept ``N`` below the batch size ``M`` (its tests call ``kron(X, y, N=1)`` on
a batch of 10), which curvlib's ``kron`` refuses as a likely mistake; laplace's formula still
defines the result, so for ``N < M`` the adapter computes with ``N = M`` and multiplies the
factor that carries ``1/N`` (``A``) of each entry by ``M/N``, as laplace-torch's backends do.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from curvlib._inputs import batch_size
from curvlib.backends import CURVATURES, backend_class
from curvlib.errors import CapabilityError, CurvlibError
from curvlib.kron import Kron as CurvlibKron

try:
    from laplace.curvature import CurvatureInterface as LaplaceCurvatureInterface
    from laplace.curvature import EFInterface as LaplaceEFInterface
    from laplace.curvature import GGNInterface as LaplaceGGNInterface
    from laplace.utils.matrix import Kron as LaplaceKron
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "curvlib.integrations.laplace needs laplace-torch (>=0.3); install it with "
        "`pip install curvlib[laplace]` or `pip install laplace-torch`"
    ) from err

__all__ = [
    "CurvlibLaplaceBackend",
    "laplace_backend",
    "to_laplace_kron",
    "LOSS_POWER",
    "LAPLACE_BASES",
    "NAME_TRIGGERS",
]

#: Power ``p`` of the loss scale in each curvature: curvlib's curvature of
#: ``factor * lossfunc`` is ``factor**p`` times that of ``lossfunc``.
LOSS_POWER: Mapping[str, int] = MappingProxyType({"ggn": 1, "fisher": 1, "hessian": 1, "ef": 2})

#: laplace-torch base class of the generated backend per curvature name. SubnetLaplace
#: accepts only ``GGNInterface``/``EFInterface`` subclasses, as for laplace-torch's own
#: Hessian backends.
LAPLACE_BASES: Mapping[str, type] = MappingProxyType(
    {
        "ggn": LaplaceGGNInterface,
        "fisher": LaplaceGGNInterface,
        "ef": LaplaceEFInterface,
        "hessian": LaplaceCurvatureInterface,
    }
)

#: Substrings laplace-torch 0.3 looks for in ``backend.__name__.lower()``; the generated
#: class names contain none of them (see ``docs/laplace.md``):
#:
#: * ``"backpack"``: ``ParametricLaplace.fit`` (and ``FunctionalLaplace.fit``) refuse dict
#:   (HuggingFace-style) inputs up front. curvlib backends declare and check what inputs
#:   they support themselves.
#: * ``"asdl"``: ``_glm_predictive_distribution`` always warns and calls
#:   ``functorch_jacobians`` instead of ``jacobians`` (ASDL's cannot backpropagate). The
#:   adapter's ``jacobians`` use the backend's own Jacobians and switch to torch.func only
#:   where they are needed and the backend cannot provide them (``enable_backprop=True``).
NAME_TRIGGERS: tuple[str, ...] = ("asdl", "backpack")

_CLASS_NAMES = MappingProxyType(
    {"ggn": "CurvlibGGN", "fisher": "CurvlibFisher", "ef": "CurvlibEF", "hessian": "CurvlibHessian"}
)

# Constructor arguments laplace-torch passes itself; they cannot be baked into a backend.
_SET_BY_LAPLACE = (
    "model",
    "likelihood",
    "last_layer",
    "subnetwork_indices",
    "dict_key_x",
    "dict_key_y",
)

_CACHE: dict[Any, type] = {}


#: 1-D (diagonal) factors up to this size become dense matrices for laplace-torch's Kron
_DENSE_DIAG_MAX = 4096


def to_laplace_kron(kron: CurvlibKron) -> LaplaceKron:
    """Copy a curvlib :class:`~curvlib.Kron` into a :class:`laplace.utils.matrix.Kron`.

    Same entries and factor order (``[G, A]`` per weight, ``[G]`` per bias); 1-D (diagonal)
    factors become dense ``diag`` matrices, and every factor is a fresh tensor in a list, as
    laplace-torch adds and rescales factors in place (``F[1] *= s``). No scaling is applied.

    Parameters
    ----------
    kron : curvlib.Kron

    Returns
    -------
    laplace.utils.matrix.Kron
        ``type(result) is laplace.utils.matrix.Kron`` (laplace-torch tests exactly that).
    """
    if not isinstance(kron, CurvlibKron):
        raise TypeError(f"expected a curvlib.Kron, got {type(kron).__name__}")
    for i, entry in enumerate(kron.kfacs):
        if kron.groups[i] is not None:
            raise CapabilityError(
                f"Kron entry {i} is block-diagonal over groups (a grouped convolution), "
                "which laplace-torch's Kron cannot represent; use hessian_structure='diag' "
                "or 'full', or freeze that layer"
            )
        big = [F.numel() for F in entry if F.ndim == 1 and F.numel() > _DENSE_DIAG_MAX]
        if big:
            raise CapabilityError(
                f"Kron entry {i} has a diagonal factor of {big[0]} entries (an embedding's "
                "token counts or a large parameter's exact diagonal) that laplace-torch's "
                f"Kron would store as a dense {big[0]}x{big[0]} matrix; freeze that "
                "parameter (requires_grad=False) or use hessian_structure='diag'"
            )
    kfacs = [
        [torch.diag(F.detach()) if F.ndim == 1 else F.detach().clone() for F in entry]
        for entry in kron.kfacs
    ]
    return LaplaceKron(kfacs)


class CurvlibLaplaceBackend(LaplaceCurvatureInterface):
    """Base of the classes made by :func:`laplace_backend`; a laplace-torch curvature backend.

    An instance holds the curvlib curvature object :attr:`curvlib` and answers
    laplace-torch's protocol with it (composition: laplace-torch's interface keeps plain
    attributes ``params``, ``params_dict``, ... that it assigns in ``__init__`` and reads
    from unbound calls such as ``CurvatureInterface.jacobians(backend, x)``; curvlib's are
    computed properties, so the two are kept side by side rather than merged by
    inheritance).

    Parameters
    ----------
    model : torch.nn.Module
        laplace-torch passes the model (a ``FeatureExtractor`` for last-layer Laplace).
    likelihood : {"classification", "regression"}
    last_layer : bool, default False
    subnetwork_indices : torch.LongTensor, optional
        Also settable later (``SubnetLaplace`` does); it is forwarded to :attr:`curvlib`,
        which reads it at call time.
    dict_key_x, dict_key_y : str
    **options
        Options of the curvlib class; they override those baked in by
        :func:`laplace_backend` (laplace-torch's ``backend_kwargs`` arrive here).

    Attributes
    ----------
    curvlib : curvlib.CurvatureInterface
        The curvlib object doing the work.
    curvlib_backend, curvlib_curvature : str
        Registry names (class attributes).
    curvlib_class : type
        ``curvlib.backend_class(curvlib_backend, curvlib_curvature)`` (class attribute).
    curvlib_options : Mapping
        The baked options (class attribute).
    """

    curvlib_backend: ClassVar[str] = ""
    curvlib_curvature: ClassVar[str] = ""
    curvlib_class: ClassVar[type | None] = None
    curvlib_options: ClassVar[Mapping[str, Any]] = MappingProxyType({})

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        low_rank: int = 10,
        **options: Any,
    ) -> None:
        if isinstance(low_rank, bool) or not isinstance(low_rank, numbers.Integral) or low_rank < 1:
            raise CurvlibError(f"low_rank must be a positive integer, got {low_rank!r}")
        self.low_rank = int(low_rank)
        if self.curvlib_class is None:
            raise TypeError(
                "CurvlibLaplaceBackend is abstract; make a backend class with "
                "curvlib.integrations.laplace.laplace_backend(backend, curvature)"
            )
        self.curvlib = self.curvlib_class(
            model,
            likelihood,
            last_layer=last_layer,
            subnetwork_indices=subnetwork_indices,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            **{**self.curvlib_options, **options},
        )
        # laplace-torch's attributes (model, likelihood, lossfunc, factor, params,
        # params_dict, buffers_dict, ...); subnetwork_indices goes to self.curvlib.
        LaplaceCurvatureInterface.__init__(
            self, model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y
        )
        if self.factor != self.curvlib.factor:  # pragma: no cover - a broken convention
            raise CurvlibError(
                f"laplace-torch's factor {self.factor} differs from curvlib's "
                f"{self.curvlib.factor} for {likelihood!r}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}(curvlib={self.curvlib.__class__.__name__})"

    # -- attributes that laplace-torch sets after construction -------------------------
    @property
    def subnetwork_indices(self) -> Tensor | None:
        """The subnetwork of :attr:`curvlib` (read by it at call time)."""
        return self.curvlib.subnetwork_indices

    @subnetwork_indices.setter
    def subnetwork_indices(self, value: Tensor | None) -> None:
        self.curvlib.subnetwork_indices = value

    @property
    def stochastic(self) -> bool:
        """``stochastic`` of a GGN :attr:`curvlib` (MC Fisher if true)."""
        return self.curvlib.stochastic

    @stochastic.setter
    def stochastic(self, value: bool) -> None:
        self.curvlib.stochastic = bool(value)

    @property
    def num_samples(self) -> int:
        """``num_samples`` of a GGN :attr:`curvlib` (MC samples per data point)."""
        return self.curvlib.num_samples

    @num_samples.setter
    def num_samples(self, value: int) -> None:
        self.curvlib.num_samples = value

    # -- scaling ---------------------------------------------------------------------------
    @property
    def _loss_power(self) -> int:
        return LOSS_POWER[self.curvlib_curvature]

    def _dense_scale(self, H: Tensor) -> Tensor:
        """``factor * H / factor**p``: laplace-torch's value of a dense curvature ``H``."""
        p = self._loss_power
        return H if p == 1 else H * self.factor ** (1 - p)

    # -- Jacobians and gradients -----------------------------------------------------------
    def jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """``(Js (B, C, P), f (B, C))`` from the curvlib backend (subnetwork applied).

        With ``enable_backprop=True`` a backend whose Jacobians are not differentiable
        (it raises :class:`~curvlib.CapabilityError`, e.g. ASDL's) is answered by the
        class's torch.func Jacobians (``functorch_jacobians``), as laplace-torch itself
        does for its ASDL backend.
        """
        if enable_backprop:
            try:
                return self.curvlib.jacobians(x, enable_backprop=True)
            except CapabilityError:
                return self.curvlib.functorch_jacobians(x, enable_backprop=True)
        return self.curvlib.jacobians(x)

    def functorch_jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """``(Js, f)`` by curvlib's torch.func Jacobians."""
        return self.curvlib.functorch_jacobians(x, enable_backprop=enable_backprop)

    def last_layer_jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """``(Js (B, C, P_last), f (B, C))`` w.r.t. the last layer's parameters.

        With ``enable_backprop=True`` the features keep their graph to ``x`` (``LLLaplace``
        differentiates the GLM predictive through them). A backend whose Jacobians are not
        differentiable (it raises :class:`~curvlib.CapabilityError`, e.g. ASDL's) is then
        answered by curvlib's torch.func Jacobians of the last layer, as in :meth:`jacobians`.
        """
        if not enable_backprop:
            return self.curvlib.last_layer_jacobians(x)
        try:
            return self.curvlib.last_layer_jacobians(x, enable_backprop=True)
        except CapabilityError:
            return self._last_layer_curvlib().functorch_jacobians(x, enable_backprop=True)

    def _last_layer_curvlib(self) -> Any:
        """:attr:`curvlib` if it is a last-layer object, else a last-layer twin of it."""
        if self.curvlib.last_layer and self.curvlib.subnetwork_indices is None:
            return self.curvlib
        return type(self.curvlib)(
            self.model,
            self.likelihood,
            last_layer=True,
            dict_key_x=self.dict_key_x,
            dict_key_y=self.dict_key_y,
        )

    def selected_output_jacobians(
        self, x: Any, outputs: Tensor, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Jacobians of selected outputs per input, ``(Js (B, S, P), f (B, C))``.

        ``outputs`` has shape ``(B,)`` or ``(B, S)`` (output indices per input);
        ``Js[b, s] = J_b[outputs[b, s]]``.
        """
        Js, f = self.jacobians(x, enable_backprop=enable_backprop)
        if outputs.ndim == 1:
            outputs = outputs[:, None]
        if outputs.ndim != 2 or outputs.shape[0] != Js.shape[0]:
            raise ValueError(
                f"outputs must have shape (B,) or (B, S) with B = {Js.shape[0]}, got "
                f"{tuple(outputs.shape)}"
            )
        index = outputs.to(Js.device, dtype=torch.long).unsqueeze(-1)
        return torch.gather(Js, 1, index.expand(-1, -1, Js.shape[-1])), f

    def gradients(self, x: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample gradients ``(Gs (B, P), loss)`` of the terms of ``lossfunc``.

        laplace-torch's convention, which curvlib shares: no ``factor``.
        """
        return self.curvlib.gradients(x, y)

    # -- curvature -------------------------------------------------------------------------
    def full(self, x: Any, y: Tensor, N: int | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(loss, H (P, P))`` in laplace-torch's scaling (module docstring)."""
        loss, H = self.curvlib.full(x, y, N=N, **kwargs)
        return loss, self._dense_scale(H)

    def diag(self, x: Any, y: Tensor, N: int | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(loss, h (P,))`` in laplace-torch's scaling (module docstring)."""
        loss, h = self.curvlib.diag(x, y, N=N, **kwargs)
        return loss, self._dense_scale(h)

    def kron(
        self, x: Any, y: Tensor, N: int | None = None, **kwargs: Any
    ) -> tuple[Tensor, LaplaceKron]:
        """``(loss, laplace.utils.matrix.Kron)`` for a batch of a data set of ``N`` points.

        ``N`` goes to curvlib's ``kron`` (which already normalises ``A`` by ``1/N``); the
        factors are scaled as laplace-torch's default backend scales them (module docstring)
        and are fresh tensors.
        """
        B = _batch_size(x, self.dict_key_x)
        below = B is not None and isinstance(N, numbers.Integral) and 0 < N < B
        loss, K = self.curvlib.kron(x, y, N=B if below else N, **kwargs)
        if len(K) != len(self.params):
            raise CurvlibError(
                f"{type(self.curvlib).__name__}.kron returned {len(K)} Kronecker entries for "
                f"{len(self.params)} selected parameter tensors; laplace-torch needs one per "
                "parameter tensor"
            )
        raw = K * (1.0 / self.factor**self._loss_power)  # curvature of the unscaled lossfunc
        kron = to_laplace_kron(raw)
        if below:  # laplace-torch's _rescale_kron_factors: A = (1/N) sum over the batch
            from curvlib.kfac.compute import entry_specs

            specs = entry_specs(self.curvlib.differentiated_module, self.curvlib.params)
            for entry, (_, a) in zip(kron.kfacs, specs, strict=True):
                if a is not None:  # the factor that carries 1/N (the layer rule says which)
                    entry[a] *= B / int(N)
        return loss, kron * self.factor

    def eig_lowrank(self, data_loader: Any) -> tuple[Tensor, Tensor, Tensor]:
        r"""laplace-torch's ``LowRankLaplace`` hook: ``(U (P, k'), λ (k',), loss)``.

        The top ``low_rank`` eigenpairs of the curvature summed over ``data_loader`` (any
        curvature and backend: Lanczos with full reorthogonalization,
        :func:`curvlib.lanczos`, on curvlib's matrix-free operator over the data, at most
        ``10 · low_rank`` iterations as laplace-torch's ASDL backend), in laplace-torch's
        scaling; as there, only eigenvalues above ``1e-6`` are kept. ``loss`` is the summed
        loss :math:`\sum_n \ell_n` (``factor * lossfunc``) over the data.
        """
        from curvlib._inputs import split_batch
        from curvlib.estimators import lanczos

        op = self.curvlib.operator(data_loader)
        P = op.shape[0]
        k = min(self.low_rank, P)
        gen = torch.Generator().manual_seed(0)
        vals, U = lanczos(op, k, num_iters=min(P, max(10 * k, 2 * k + 20)), generator=gen)
        vals = self._dense_scale(vals)
        keep = vals > _LOWRANK_EPS
        loss = torch.zeros((), dtype=U.dtype, device=U.device)
        with torch.no_grad():
            for batch in data_loader:
                x, y = split_batch(batch)
                if y is None and isinstance(x, Mapping):
                    y = x[self.dict_key_y]
                x = tree_map(lambda t: t.to(U.device) if isinstance(t, Tensor) else t, x)
                f = self.model(x)
                loss = loss + self.factor * self.lossfunc(f.detach(), y.to(f.device))
        return U[:, keep], vals[keep], loss


#: eigenvalues kept by :meth:`CurvlibLaplaceBackend.eig_lowrank` (laplace-torch's ``EPS``)
_LOWRANK_EPS = 1e-6


def _batch_size(x: Any, dict_key_x: str) -> int | None:
    """The batch size of ``x`` (``None`` if ``x`` is malformed: curvlib then says why)."""
    try:
        return batch_size(x, dict_key_x)
    except CurvlibError:
        return None


def _accepted_options(cls: type) -> set[str]:
    """Keyword arguments the curvlib class ``cls`` accepts besides the laplace-set ones."""
    return set(cls.accepted_options()) - set(_SET_BY_LAPLACE)


def _options_repr(options: Mapping[str, Any]) -> str:
    return "".join(f", {k}={v!r}" for k, v in sorted(options.items()))


def laplace_backend(backend: str = "autograd", curvature: str = "ggn", **options: Any) -> type:
    """A laplace-torch 0.3 backend class computing ``curvature`` with curvlib's ``backend``.

    Pass the returned class as ``Laplace(..., backend=...)`` (or to ``marglik_training``,
    which passes no backend options: hence ``options`` are baked into the class).

    Parameters
    ----------
    backend : str, default "autograd"
        A registered curvlib backend (``curvlib.backends.registry()``).
    curvature : {"ggn", "fisher", "ef", "hessian"}, default "ggn"
        ``fisher`` is the MC Fisher (the GGN class with ``stochastic=True``).
    **options
        Options of the curvlib class, e.g. ``num_samples=4`` or ``kfac_approx="reduce"``.
        laplace-torch's ``backend_kwargs`` override them per ``Laplace`` object.

    Returns
    -------
    type
        A subclass of :class:`CurvlibLaplaceBackend` and of laplace-torch's ``GGNInterface``
        (``ggn``, ``fisher``), ``EFInterface`` (``ef``) or ``CurvatureInterface``
        (``hessian``, which like laplace-torch's own Hessian backends ``SubnetLaplace``
        refuses). Its ``__name__`` is ``CurvlibGGN``/``CurvlibFisher``/``CurvlibEF``/
        ``CurvlibHessian`` and never contains a substring laplace-torch dispatches on
        (:data:`NAME_TRIGGERS`); its ``__qualname__`` names backend and options, e.g.
        ``CurvlibGGN[autograd]`` (laplace-torch's checkpoints record it). The same
        arguments give the same class.

    Raises
    ------
    ValueError
        Unknown backend or curvature (the message lists the known ones).
    TypeError
        An option the curvlib class does not accept, or one laplace-torch sets itself
        (``last_layer``, ``subnetwork_indices``, ``dict_key_x``, ...).

    Notes
    -----
    Numbers equal laplace-torch's own backends' to round-off, including its empirical
    Fisher of regression, which is twice curvlib's (see the module docstring and
    ``docs/laplace.md``).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; known curvatures: {list(CURVATURES)}")
    cls = backend_class(backend, curvature)
    reserved = sorted(set(options) & set(_SET_BY_LAPLACE))
    if reserved:
        raise TypeError(
            f"laplace_backend options {reserved} are set by laplace-torch itself; pass them "
            "to Laplace(...) (e.g. subset_of_weights='last_layer', dict_key_x=...) instead"
        )
    accepted = _accepted_options(cls)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(
            f"{cls.__name__} ({backend}:{curvature}) does not accept options {unknown}; "
            f"accepted: {sorted(accepted)}"
        )
    try:
        key = (backend, curvature, cls, tuple(sorted(options.items())))
        hash(key)
    except TypeError:  # unhashable option values: a new class each time
        key = None
    if key is not None and key in _CACHE:
        return _CACHE[key]

    name = _CLASS_NAMES[curvature]  # free of NAME_TRIGGERS whatever the backend is called
    qualname = f"{name}[{backend}{_options_repr(options)}]"
    doc = (
        f"laplace-torch backend: curvlib's {cls.__name__} ({backend}:{curvature}"
        f"{_options_repr(options)}). See :class:`CurvlibLaplaceBackend`."
    )
    new = type(
        name,
        (CurvlibLaplaceBackend, LAPLACE_BASES[curvature]),
        {
            "__module__": __name__,
            "__qualname__": qualname,
            "__doc__": doc,
            "curvlib_backend": backend,
            "curvlib_curvature": curvature,
            "curvlib_class": cls,
            "curvlib_options": MappingProxyType(dict(options)),
        },
    )
    if key is not None:
        _CACHE[key] = new
    return new
