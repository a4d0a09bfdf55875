"""curvlib: curvature of a PyTorch model's loss, with swappable backends.

GGN, Monte-Carlo Fisher, empirical Fisher and Hessian as full matrices, diagonals and
Kronecker factors, through one interface (a drop-in for laplace-torch's
``laplace.curvature``) with three backends: pure autograd, BackPACK and ASDL.
"""

from curvlib import functional, layers  # noqa: E402  (one-call helpers, per-layer analysis)
from curvlib.backends import CURVATURES, backend_class, register_backend
from curvlib.backends.autograd import AutogradEF, AutogradGGN, AutogradHessian
from curvlib.config import CurvatureConfig, available, make_curvature, supports
from curvlib.data import fit
from curvlib.errors import (
    CapabilityError,
    CurvlibError,
    DecompositionError,
    DistributedError,
    InputError,
    LikelihoodError,
    NonFiniteError,
    SharedParameterError,
    TargetError,
    UnsupportedModuleError,
)
from curvlib.estimators import hutchinson_diagonal, hutchinson_trace, hutchpp_trace, lanczos
from curvlib.interface import CurvatureInterface, EFInterface, GGNInterface
from curvlib.kron import IndefiniteFactorError, Kron, KronDecomposed
from curvlib.likelihood import Classification, Likelihood, Regression, get_likelihood
from curvlib.linops import CurvatureOperator, curvature_operator

__version__ = "0.1.0"

__all__ = [
    "CURVATURES",
    "AutogradEF",
    "AutogradGGN",
    "AutogradHessian",
    "CapabilityError",
    "CurvatureConfig",
    "CurvatureOperator",
    "Classification",
    "CurvatureInterface",
    "CurvlibError",
    "DecompositionError",
    "DistributedError",
    "EFInterface",
    "GGNInterface",
    "IndefiniteFactorError",
    "InputError",
    "Kron",
    "KronDecomposed",
    "Likelihood",
    "LikelihoodError",
    "NonFiniteError",
    "Regression",
    "SharedParameterError",
    "TargetError",
    "UnsupportedModuleError",
    "available",
    "backend_class",
    "curvature_operator",
    "fit",
    "functional",
    "get_likelihood",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "layers",
    "make_curvature",
    "register_backend",
    "supports",
]
