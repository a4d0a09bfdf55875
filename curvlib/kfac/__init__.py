"""K-FAC: the layer-rule table, hook-based recording and the per-layer quantities.

* :mod:`curvlib.kfac.rules`: one rule per module type (:func:`register_kfac_rule`);
  :mod:`curvlib.kfac.attention`: the rule of ``nn.MultiheadAttention``;
* :mod:`curvlib.kfac.capture`: forward hooks and the backward pass to layer outputs;
* :mod:`curvlib.kfac.compute`: factors, per-sample products and diagonals per parameter.
"""

from curvlib.kfac.attention import MultiheadAttentionRule
from curvlib.kfac.compute import Claim, Coverage, LayerPass, coverage, exact_block
from curvlib.kfac.rules import (
    DENSE_BLOCK_MAX,
    ConvRule,
    ConvTransposeRule,
    EmbeddingRule,
    ExactBlockRule,
    HFConv1DRule,
    KFACRule,
    LinearLikeRule,
    LinearRule,
    NormRule,
    Site,
    kfac_rules,
    register_kfac_rule,
    rule_for,
    unfold,
)

__all__ = [
    "DENSE_BLOCK_MAX",
    "Claim",
    "ConvRule",
    "ConvTransposeRule",
    "Coverage",
    "EmbeddingRule",
    "ExactBlockRule",
    "HFConv1DRule",
    "KFACRule",
    "LayerPass",
    "LinearLikeRule",
    "LinearRule",
    "MultiheadAttentionRule",
    "NormRule",
    "Site",
    "coverage",
    "exact_block",
    "kfac_rules",
    "register_kfac_rule",
    "rule_for",
    "unfold",
]
