"""Library bugs the suite has found and not yet seen fixed: one place, each with its reason.

A test of ``(backend, curvature, entry, model)`` that :func:`known_bug` names is marked
``xfail(strict=True)``: it must fail as long as the bug is there, and fixing the bug makes
it fail until its entry here is removed. Models are the shared cases of ``tests/cases.py``
and the models of ``tests/test_capabilities.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Bug:
    """A library bug and where it shows: ``applies(backend, curvature, entry, model)``."""

    name: str
    reason: str
    applies: Callable[[str, str, str, str], bool]


_KRON = ("kron", "kron_reduce")
_SECOND_ORDER = ("ggn", "fisher", "ef")
#: models where ASDL computes some parameters' K-FAC by curvlib's rules (layers ASDL lacks
#: or refuses: Conv1d/3d, ConvTranspose, grouped/dilated/'same' convolutions, norms,
#: Embedding, a module with a backward hook)
_ASDL_BY_RULES = {
    "conv1d_reg",
    "layernorm_reg",
    "eval_layers_cls",
    "groupnorm_cls",
    "dilated_conv_cls",
    "conv_same",
    "batchnorm1d_cls",
    "batchnorm2d_cls",
    "layernorm_no_bias",
    "conv3d_cls",
    "batchnorm_zero_weight",
    "full_backward_hook",
    "convtranspose2d_cls",
    "grouped_conv_cls",
    "embedding_cls",
}
#: models with a Conv2d or a layer applied to a sequence (ASDL refuses kfac_approx='reduce')
_ASDL_SHARED = {
    "cnn_cls",
    "seq_cls",
    "embedding_cls",
    "conv_reflect",
    "conv_same",
    "groupnorm_cls",
    "dilated_conv_cls",
    "batchnorm2d_cls",
    "gpt2_lora_cls",
}

#: backends that refuse K-FAC of MultiheadAttention / grouped and transposed convolutions
_REFUSE_ATTENTION = ("backpack", "asdl")

BUGS: tuple[Bug, ...] = (
    Bug(
        "asdl-reduce-not-in-the-table",
        "curvlib/capabilities.py _asdl(): the asdl kron row lists kfac_approx ('expand', "
        "'reduce') without a condition, so supports(..., kfac_approx='reduce') says "
        "supported; the call then raises CapabilityError in _AsdlFisher._kron "
        "(curvlib/backends/asdl.py) for Conv2d layers and for layers applied to sequences",
        lambda b, c, e, m: (
            b == "asdl" and c in _SECOND_ORDER and e == "kron_reduce" and m in _ASDL_SHARED
        ),
    ),
    Bug(
        "asdl-mc-kron-two-draws",
        "curvlib/backends/asdl.py _AsdlFisher._kron: _run_fisher draws the MC pseudo-targets "
        "from call.generator, then _shared_kron draws the cotangents of the parameters left "
        "to curvlib's rules again from the advanced generator, so their blocks use other "
        "draws than ASDL's blocks and than every other backend with the same seed (the "
        "generator state is not put back, as _dense does)",
        lambda b, c, e, m: b == "asdl" and c == "fisher" and e in _KRON and m in _ASDL_BY_RULES,
    ),
    Bug(
        "mha-out-proj-dropped",
        "nn.MultiheadAttention's out_proj (a Linear subclass) is used functionally by "
        "F.multi_head_attention_forward, its forward never runs; curvlib/kfac/compute.py "
        "coverage() gives it to LinearRule anyway, whose hooks record nothing, so the "
        "per-layer products of the autograd backend (full, diag: backends/autograd.py "
        "layer_products) and every rule-table K-FAC return zeros for out_proj.weight/bias "
        "(silently; expected the exact GGN/EF entries, nonzero)",
        lambda b, c, e, m: (
            m == "mha_cls"
            and c in _SECOND_ORDER
            and b not in _REFUSE_ATTENTION
            and (e in _KRON or (b in ("autograd", "auto") and e in ("full", "diag")))
        ),
    ),
    Bug(
        "embedding-padding-forward-mode",
        "nn.Embedding(padding_idx=0): reverse mode gives the padding row no gradient, "
        "forward mode (torch.func.jvp) does not know padding_idx; the shared operator "
        "(curvlib/linops.py shared_matmat: jvp then vjp) and the autograd Hessian "
        "(forward-over-reverse, curvlib/_autodiff.py hvp) mix both conventions, so op @ v "
        "differs from full @ v of the same backend (the operator is not even symmetric)",
        lambda b, c, e, m: (
            m == "embedding_cls"
            and (e == "operator" or (c == "hessian" and e == "full" and b in ("autograd", "auto")))
        ),
    ),
    Bug(
        "asdl-embedding-float64",
        "curvlib/capabilities.py ASDL_MODULES includes nn.Embedding, but ASDL 0.1a4's "
        "Embedding operation fails in float64 (asdl/operations/embedding.py:29: 'Index put "
        "requires the source and destination dtypes match, got Float ... Double'): a raw "
        "RuntimeError from AsdlGGN/AsdlEF/AsdlHessian jacobians, gradients, full and diag "
        "instead of a result or a curvlib refusal",
        lambda b, c, e, m: (
            b == "asdl"
            and m == "embedding_cls"
            and e in ("full", "diag", "jacobians", "gradients")
            and not (c == "hessian" and e in ("full", "diag"))
        ),
    ),
    Bug(
        "asdl-unused-layer",
        "a Linear that never runs (tests/zoo.py WithUnused): curvlib/backends/asdl.py "
        "_asdl_vjps raises KeyError (per_param[id(p)]: ASDL has no per-sample gradients for "
        "it), the Fisher maker's dense matrix omits it (size 43 vs 73 in _dense) and ASDL's "
        "HessianMaker raises 'appears to not have been used in the graph'; expected zeros "
        "for its parameters (as the autograd backend gives) or a curvlib refusal",
        lambda b, c, e, m: (
            b == "asdl"
            and m == "unused_cls"
            and e != "operator"
            and not (c == "hessian" and e in _KRON)
        ),
    ),
    Bug(
        "jvp-full-backward-hook",
        "a module with a user full backward hook: the shared operator's forward-mode "
        "product (curvlib/_autodiff.py jvp) raises torch's 'In order to use an "
        "autograd.Function with functorch transforms ... setup_context' RuntimeError "
        "(BackwardHookFunction); _transform_limit does not treat it as a torch.func "
        "limitation, so there is no fallback and no curvlib error",
        lambda b, c, e, m: m == "full_backward_hook" and e == "operator" and c != "hessian",
    ),
    Bug(
        "grouped-conv-bias-per-group",
        "curvlib/kfac/rules.py LinearLikeRule.factors: the bias factor of a grouped "
        "convolution is _G over (K, B, L, g, o) bias_grads, i.e. one o x o block per group "
        "(shape (g, o, o)), dropping the cross-group terms; the K-FAC definition (tests/"
        "zoo_reference.py, exact at one datum and location) has G over all g*o channels",
        lambda b, c, e, m: (
            m == "grouped_conv_cls" and e in _KRON and c in _SECOND_ORDER and b != "backpack"
        ),
    ),
    Bug(
        "convtranspose-definition",
        "ConvTranspose K-FAC: curvlib/kfac/rules.py ConvTransposeRule factors the weight "
        "per input location as [A (in x in), G (out*k x out*k)]; tests/zoo_reference.py "
        "defines it per output location as G (out x out) x A (in*k x in*k). The two "
        "definitions disagree (both are Kronecker approximations; DESIGN.md is silent): "
        "one of them must change",
        lambda b, c, e, m: (
            m == "convtranspose2d_cls" and e in _KRON and c in _SECOND_ORDER and b != "backpack"
        ),
    ),
)


def known_bug(backend: str, curvature: str, entry: str, model: str) -> str | None:
    """The reasons of the bugs that show in this test (``None`` if none)."""
    reasons = [
        f"[{g.name}] {g.reason}" for g in BUGS if g.applies(backend, curvature, entry, model)
    ]
    return " ".join(reasons) or None


def marks(backend: str, curvature: str, entry: str, model: str) -> list:
    bug = known_bug(backend, curvature, entry, model)
    return [pytest.mark.xfail(strict=True, reason=bug)] if bug else []


def expect_bug(bug: str, run: Callable[[], object]) -> None:
    """Inside a loop (the dummy backend's tests): ``run()`` must still fail."""
    try:
        run()
    except (AssertionError, Exception):
        return
    raise AssertionError(f"a known bug no longer shows; remove it from known_bugs.py: {bug}")
