"""K-FAC: the layer-rule table, hook-based recording and the per-layer quantities.

* :mod:`curvlib.kfac.rules`: the table, one rule per module type
  (:func:`register_kfac_rule`), and the rules of Linear-like, Embedding and normalization
  layers; :mod:`curvlib.kfac.conv`: the convolutions' rules;
  :mod:`curvlib.kfac.attention`: the rule of ``nn.MultiheadAttention`` (both register
  themselves when this package is imported);
* :mod:`curvlib.kfac.capture`: forward hooks and the backward pass to layer outputs;
* :mod:`curvlib.kfac.compute`: factors, per-sample products and diagonals per parameter.
"""

from curvlib.kfac.rules import (  # isort: skip (the table first, then the rules it holds)
    DENSE_BLOCK_MAX,
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
)
from curvlib.kfac.conv import ConvRule, ConvTransposeRule, unfold  # noqa: I001
from curvlib.kfac.attention import MultiheadAttentionRule
from curvlib.kfac.compute import Claim, Coverage, LayerPass, coverage, exact_block

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
