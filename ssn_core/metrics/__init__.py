"""Metrics: safety rates from verdicts (with bootstrap CIs), MGSM accuracy, perplexity, run manifests.

Safety rates per language (the SS-Neuron paper's evaluation):

- attack success rate  ASR        = compliance / harmful prompts
- refusal rate                    = refusal / harmful prompts
- off-target rate                 = off_target / harmful prompts
- over-refusal                    = refusal / harmless prompts

Utility: MGSM accuracy (the last number of the reply vs. the gold answer) and perplexity (token-weighted mean
NLL), to check that an intervention or a fine-tune did not break the model's general ability.

One idea per module; every name is importable from ``ssn_core.metrics`` as before the split:

- `stats`: `bootstrap_ci`, `sign_flip_p_value`, `paired_difference` (`PairedDifference`).
- `rates`: `Rate`, `LanguageMetrics`, `RateTable`, `rate_table`.
- `mgsm`: `load_mgsm`, `parse_number`, `extract_answer`, `mgsm_accuracy`.
- `perplexity`: `perplexity`, `perplexity_by_language`.
- `manifest`: `Manifest`, `make_manifest`.
"""

from __future__ import annotations

from ssn_core.metrics.manifest import Manifest, make_manifest
from ssn_core.metrics.mgsm import (
    DECIMAL_COMMA_LANGUAGES,
    MGSM_HUB_ID,
    MGSM_LANGUAGES,
    MGSM_TEMPLATE,
    SPACE_GROUP_LANGUAGES,
    MgsmItem,
    MgsmPrediction,
    MgsmResult,
    Progress,
    answers_match,
    extract_answer,
    load_mgsm,
    mgsm_accuracy,
    parse_number,
)
from ssn_core.metrics.perplexity import PerplexityResult, perplexity, perplexity_by_language
from ssn_core.metrics.rates import LanguageMetrics, Rate, RateTable, rate_table
from ssn_core.metrics.stats import PairedDifference, bootstrap_ci, paired_difference, sign_flip_p_value

__all__ = [
    "DECIMAL_COMMA_LANGUAGES",
    "MGSM_HUB_ID",
    "MGSM_LANGUAGES",
    "MGSM_TEMPLATE",
    "SPACE_GROUP_LANGUAGES",
    "LanguageMetrics",
    "Manifest",
    "MgsmItem",
    "MgsmPrediction",
    "MgsmResult",
    "PairedDifference",
    "PerplexityResult",
    "Progress",
    "Rate",
    "RateTable",
    "answers_match",
    "bootstrap_ci",
    "extract_answer",
    "load_mgsm",
    "make_manifest",
    "mgsm_accuracy",
    "paired_difference",
    "parse_number",
    "perplexity",
    "perplexity_by_language",
    "rate_table",
    "sign_flip_p_value",
]
