"""Exception classes of curvlib.

Every error curvlib raises on bad input is one of these. Each subclasses the builtin that
fits (``ValueError`` for bad input, ``NotImplementedError`` for a capability a backend
lacks, ``RuntimeError`` for failures during the computation), so ``except ValueError``
keeps working, and each message names what was given, what was expected and the fix.
"""

from __future__ import annotations

__all__ = [
    "CurvlibError",
    "InputError",
    "TargetError",
    "LikelihoodError",
    "UnsupportedModuleError",
    "SharedParameterError",
    "CapabilityError",
    "NonFiniteError",
    "DecompositionError",
    "DistributedError",
    "MemoryLimitError",
]


class CurvlibError(Exception):
    """Base class of every exception raised by curvlib."""


class InputError(CurvlibError, ValueError):
    """Inputs that do not fit the model: device, dtype, shape or type."""


class TargetError(CurvlibError, ValueError):
    """Targets whose shape, dtype or range does not fit the likelihood."""


class LikelihoodError(CurvlibError, ValueError):
    """An unknown likelihood, or a loss function curvlib cannot interpret."""


class UnsupportedModuleError(CurvlibError, ValueError):
    """A module that the selected backend or structure cannot handle.

    The message names the module's path in the model, its type, the parameters it owns and,
    where one exists, a backend that supports it.
    """


class SharedParameterError(UnsupportedModuleError):
    """A parameter used by several modules (tied weights), or a module called more than once,
    where a backend cannot handle it (an :class:`UnsupportedModuleError`)."""


class CapabilityError(CurvlibError, NotImplementedError):
    """A backend asked for a quantity or structure it cannot compute.

    The message names the backend, the structure and a backend that can.
    """


class NonFiniteError(CurvlibError, ValueError, RuntimeError):
    """A NaN or infinity in the inputs, the model output or a curvature result.

    Both a ``ValueError`` (bad data) and a ``RuntimeError`` (a failed computation); the
    message names the offending batch indices or module.
    """


class DecompositionError(CurvlibError, RuntimeError):
    """An eigendecomposition failed or met an indefinite factor beyond round-off."""


class DistributedError(CurvlibError, RuntimeError):
    """A failure on one rank of a ``torch.distributed`` accumulation, reported on all ranks."""


class MemoryLimitError(CurvlibError, MemoryError):
    """A request whose estimated memory exceeds the limit, refused before any allocation.

    The message gives the estimate, the limit (and where it comes from) and the cheaper
    structures that would fit.
    """
