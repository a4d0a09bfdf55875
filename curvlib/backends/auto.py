"""``backend="auto"``: per structure, the backend measured fastest (``docs/performance.md``).

The autograd backend is the default for every structure: its per-layer rules are the
fastest way to the GGN, MC Fisher and EF diagonals, K-FAC and dense matrices. The one
exception is the Hessian diagonal of a model that is not a piecewise-linear chain, where
BackPACK's ``DiagHessian`` (a backpropagated square root with second-derivative corrections)
is orders of magnitude faster than autograd's Hessian-vector products.
:data:`AUTO_PREFERENCES` lists, per curvature and structure, the backends tried before
autograd; a preferred backend whose capability row refuses the model
(:class:`~curvlib.UnsupportedModuleError`, :class:`~curvlib.CapabilityError`,
:class:`~curvlib.SharedParameterError`, raised before any work) passes the call on to the
next. This is the only place where curvlib chooses a backend for the user, and
``curvlib.available()`` reports it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from curvlib._call import Call
from curvlib.backends.autograd import AutogradEF, AutogradGGN, AutogradHessian
from curvlib.errors import CapabilityError, SharedParameterError, UnsupportedModuleError

__all__ = ["AUTO_PREFERENCES", "AutoGGN", "AutoEF", "AutoHessian"]

#: ``{curvature: {structure: backends tried before autograd}}``.
AUTO_PREFERENCES: dict[str, dict[str, tuple[str, ...]]] = {
    "ggn": {},
    "fisher": {},
    "ef": {},
    "hessian": {"diag": ("backpack",)},
}

_PASS_ON = (UnsupportedModuleError, CapabilityError, SharedParameterError)


class _Auto:
    """Hooks that try the preferred backends' public methods, then autograd's hook."""

    backend_name: ClassVar[str] = "auto"

    @classmethod
    def preferences(cls, curvature: str | None = None) -> dict[str, tuple[str, ...]]:
        """Per structure, the backends tried in order (autograd last)."""
        name = curvature or cls.curvature_name()
        prefs = AUTO_PREFERENCES.get(name, {})
        return {s: (*prefs.get(s, ()), "autograd") for s in cls.structures_of(name)}

    def _delegate(self, structure: str, call: Call) -> tuple[Any, Any] | None:
        from curvlib.backends import backend_class

        for name in self.preferences(self.curvature_key())[structure][:-1]:
            try:
                cls = backend_class(name, self.curvature_name())
            except ImportError:
                continue
            options = {"kfac_approx": self.kfac_approx, "memory_limit": self.memory_limit}
            if hasattr(self, "stochastic"):
                options.update(stochastic=self.stochastic, num_samples=self.num_samples)
            other = cls(
                self.model,
                self.lik,
                last_layer=self.last_layer,
                subnetwork_indices=self.subnetwork_indices,
                dict_key_x=self.dict_key_x,
                dict_key_y=self.dict_key_y,
                **options,
            )
            kw = {"generator": call.generator, "num_samples": call.num_samples}
            if structure == "kron":
                kw["kfac_approx"] = call.kfac_approx
            try:
                loss, result = getattr(other, structure)(call.x, call.y, N=call.N, **kw)
            except _PASS_ON:
                continue
            if structure == "diag" and call.idx is not None:
                # the template selects the subnetwork of the full-length diagonal
                full = result.new_zeros(self.num_params).index_copy_(0, call.idx, result)
                return loss, full
            return loss, result
        return None

    def _diag(self, call: Call):
        if self.curvature_name() == "hessian" and self.diag_is_ggn_diag():
            return super()._diag(call)
        return self._delegate("diag", call) or super()._diag(call)

    def _full(self, call: Call):
        return self._delegate("full", call) or super()._full(call)

    def _kron(self, call: Call):
        return self._delegate("kron", call) or super()._kron(call)


class AutoGGN(_Auto, AutogradGGN):
    """GGN / MC Fisher with the fastest backend per structure."""


class AutoEF(_Auto, AutogradEF):
    """Empirical Fisher with the fastest backend per structure."""


class AutoHessian(_Auto, AutogradHessian):
    """Hessian with the fastest backend per structure.

    The diagonal: autograd's GGN-diagonal rule where it is exact (a piecewise-linear chain,
    :meth:`~curvlib.AutogradHessian.diag_is_ggn_diag`), else BackPACK's ``DiagHessian``,
    else autograd's Hessian-vector products.
    """
