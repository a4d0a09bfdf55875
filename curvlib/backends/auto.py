"""``backend="auto"``: per structure, the backend measured fastest (docs/performance.md).

The autograd backend is the default for every structure: in ``bench/`` its per-layer rules
are the fastest way to the GGN, MC Fisher and EF diagonals, K-FAC and dense matrices. The
one exception is the Hessian diagonal, where BackPACK's ``DiagHessian`` (a backpropagated
square root with second-derivative corrections) is orders of magnitude faster than
autograd's Hessian-vector products (unless the model is a piecewise-linear chain, where the
Hessian diagonal is the GGN diagonal and autograd's per-layer rule is fastest).
:data:`AUTO_PREFERENCES` lists, per curvature and
structure, the backends tried before autograd; a preferred backend that cannot handle the
model (it raises :class:`~curvlib.UnsupportedModuleError`, :class:`~curvlib.CapabilityError`
or :class:`~curvlib.SharedParameterError` before any work, leaving the model untouched)
passes the call on to the next. This is the only place where curvlib chooses a backend for
the user, and it is reported by ``curvlib.available()``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from curvlib.backends.autograd import AutogradEF, AutogradGGN, AutogradHessian
from curvlib.errors import CapabilityError, SharedParameterError, UnsupportedModuleError

__all__ = ["AUTO_PREFERENCES", "AutoGGN", "AutoEF", "AutoHessian"]

#: ``{curvature: {structure: backends tried before autograd}}``.
AUTO_PREFERENCES: dict[str, dict[str, tuple[str, ...]]] = {
    "ggn": {},
    "ef": {},
    "hessian": {"diag": ("backpack",)},
}

_PASS_ON = (UnsupportedModuleError, CapabilityError, SharedParameterError)


class _Auto:
    """Dispatch ``full`` / ``diag`` / ``kron`` to the preferred backends, then autograd."""

    backend_name: ClassVar[str] = "auto"

    @classmethod
    def preferences(cls) -> dict[str, tuple[str, ...]]:
        """Per structure, the backends tried in order (autograd last)."""
        prefs = AUTO_PREFERENCES.get(cls.curvature_name(), {})
        return {s: (*prefs.get(s, ()), "autograd") for s in cls.structures}

    def _delegate(self, structure: str, *args: Any, **kwargs: Any) -> Any:
        from curvlib.backends import backend_class

        options = dict(self.backend_options, kfac_approx=self.kfac_approx)
        if hasattr(self, "stochastic"):
            options.update(stochastic=self.stochastic, num_samples=self.num_samples)
        for name in self.preferences()[structure][:-1]:
            other = backend_class(name, self.curvature_name())(
                self.model,
                self.lik,
                last_layer=self.last_layer,
                subnetwork_indices=self.subnetwork_indices,
                dict_key_x=self.dict_key_x,
                dict_key_y=self.dict_key_y,
                **options,
            )
            if structure not in other.structures:
                continue
            try:
                return getattr(other, structure)(*args, **kwargs)
            except _PASS_ON:
                continue
        return getattr(super(), structure)(*args, **kwargs)

    def full(self, *args: Any, **kwargs: Any) -> Any:
        """Dense curvature by the preferred backend (see :data:`AUTO_PREFERENCES`)."""
        return self._delegate("full", *args, **kwargs)

    def diag(self, *args: Any, **kwargs: Any) -> Any:
        """Diagonal by the preferred backend (see :data:`AUTO_PREFERENCES`)."""
        return self._delegate("diag", *args, **kwargs)

    def kron(self, *args: Any, **kwargs: Any) -> Any:
        """K-FAC by the preferred backend (see :data:`AUTO_PREFERENCES`)."""
        return self._delegate("kron", *args, **kwargs)


class AutoGGN(_Auto, AutogradGGN):
    """GGN / MC Fisher with the fastest backend per structure."""


class AutoEF(_Auto, AutogradEF):
    """Empirical Fisher with the fastest backend per structure."""


class AutoHessian(_Auto, AutogradHessian):
    """Hessian with the fastest backend per structure.

    The diagonal: autograd's GGN-diagonal rule where it is exact (a piecewise-linear
    chain, :meth:`~curvlib.AutogradHessian.diag_is_ggn_diag`), else BackPACK's
    ``DiagHessian``, else autograd's Hessian-vector products.
    """

    def diag(self, *args: Any, **kwargs: Any) -> Any:
        if self.diag_is_ggn_diag():
            return AutogradHessian.diag(self, *args, **kwargs)
        return self._delegate("diag", *args, **kwargs)

    def kron(self, *args: Any, **kwargs: Any) -> Any:
        raise self._unsupported("kron")
