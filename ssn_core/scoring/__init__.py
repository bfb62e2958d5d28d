"""Neuron importance scores, computed for every site in one forward pass per batch.

Importance of neuron N on prompt x (the paper's deactivation effect ΔLLM, made layer-local as in
PLND, Zhao et al. 2024): how much the output of N's own layer component changes when N is zeroed.
The component output is the module right after the site: ``down_proj`` output for ``mlp`` neurons,
``o_proj`` output for the four attention kinds. Per token t:

- ``mlp`` neuron k:    ‖Δout_t‖ = |a_tk| · ‖W_down[:, k]‖                    (exact, closed form)
- ``attn_o`` neuron k: ‖Δout_t‖ = |z_tk| · ‖W_O[:, k]‖                       (exact, closed form)
- ``attn_v`` neuron (kv head g, dim j): zeroing it zeroes z_thj for every query head h of group g, so
  Δout_t = Σ_h z_thj W_O[:, hD+j] and ‖Δout_t‖² = z_gj^T G_gj z_gj with the Gram matrix
  G_gj[h, h'] = <W_O[:, hD+j], W_O[:, h'D+j]>                                  (exact, closed form)
- ``attn_q`` / ``attn_k`` dim j: the effect passes through q/k norms (Qwen3, Gemma3), RoPE (zeroing a
  pre-RoPE coordinate moves its rotation partner too; GPT-NeoX rotates only the first dims), soft-capping
  and the softmax. We recompute the layer's attention from the captured q, k, v carriers with dim j
  zeroed, for a chunk of dims at once along a new axis (memory bounded by ``_chunk_size``), respecting
  the causal, padding and sliding-window masks. This is EXACT, not first-order:
  Δout_t = Σ_h W_O,h (A'_h - A_h)_t V, and its norm is computed as ‖(A' - A)(V F^T)‖ with F the R factor
  of W_O's head (q) or kv-group (k) columns, so no [hidden]-sized tensor is formed per dim. The
  recomputation is checked against the model's own attention output on every batch, so a family whose
  attention we do not reproduce fails loudly instead of producing wrong scores. A first-order estimate
  is not offered: its per-dim Jacobian needs the same T² · D work per head as the exact softmax, so it
  would save little and be less correct. Cost per token and layer ~ 2 · T · H · D² (q) and
  T · H · D · r (k): it grows with the prompt length T; leave q/k out with ``kinds`` / ``--sites``
  when that is too slow (see the measured per-site costs in the report / ``bench``).

Per prompt the per-token values are averaged over the user's own tokens (``aggregate="content"``,
default: the chat template's fixed tokens are the same for every prompt and would dilute the
harmful/harmless contrast), the ``last`` token, or ``all`` tokens. Hooks reduce each carrier to a
per-prompt vector [B, N] inside the forward pass and drop the activation; statistics are running
sums per (language, label), so memory does not grow with the number of prompts.

Other methods: ``activation`` (mean |activation| and mean signed activation per neuron, the cheap
LAPE / safety-neuron contrast) and ``ablation`` (exact: zero one neuron at a time with
`ssn_core.interventions` and measure the change of the final-layer hidden state; slow, run on a sample

One idea per module; every name is importable from ``ssn_core.scoring`` as before the split:

- `table`: `ScoreTable` (what every method produces, saved as safetensors), `METHODS`, the file format.
- `batch`: encoding prompts and (prompt, reply) pairs (`encode_prompt`), left-padded batches with per-token
  aggregation weights (`make_batch`, `AGGREGATES`, `TEMPLATES`), the weighted mean over tokens (`_aggregate`).
- `constants`: per-model constants of the closed forms (column norms, W_O's factors and Gram matrices, attention
  geometry), computed once per layer and model.
- `attention`: the parts of a layer's attention the q/k recomputation rebuilds (RoPE, masks, softmax, counted rows).
- `qk`: the exact attn_q / attn_k kernels (`_qk_impact`).
- `forward`: `score_batch`, every site's ``impact`` or ``activation`` scores from one forward pass.
- `ablation`: exact ablation (`ablation_batch`) and the neuron sample it runs on (`sample_neurons`).
- `loop`: `score`, the public entry point: batching, the method of each batch, streaming statistics.
- `compare`: `compare_methods`, the fast methods against exact ablation (`MethodComparison`, `parse_method_spec`).
- `agreement`: one result's fast scores against an exact-ablation sample on one group (`sampled_scores`,
  `rank_agreement`: Spearman per kind and overall), the Neurons page's check.

Tests and benchmarks that replace a helper patch it in the module that calls it (e.g. ``ssn_core.scoring.qk`` for
the q/k kernels, ``ssn_core.scoring.forward`` for ``_qk_impact``), not here: those helpers are deliberately not
re-exported, so that a patch aimed here fails instead of silently changing nothing.
"""

from __future__ import annotations

# Private names below are re-exported because other modules, tests and benchmarks import them from here.
from ssn_core.scoring.ablation import Triple, ablation_batch, sample_neurons
from ssn_core.scoring.agreement import rank_agreement, sampled_scores
from ssn_core.scoring.attention import (  # noqa: F401 - bench/legacy.py
    _chunk_size,
    _prep,
    _rope_pairs,
    _shifted_softmax,
    _softmax_scores,
    _take_rows,
    _weighted_rows,
)
from ssn_core.scoring.batch import (  # noqa: F401 - _aggregate: top_examples, direction, tests, bench
    AGGREGATES,
    TEMPLATES,
    Aggregate,
    EncodedBatch,
    _aggregate,
    encode_prompt,
    make_batch,
)
from ssn_core.scoring.compare import COMPARISON_KIND, MethodComparison, compare_methods, parse_method_spec
from ssn_core.scoring.constants import (  # noqa: F401 - vocab, direction, tests/test_quantized.py, bench
    _CONSTANTS,
    _constants,
    _LayerAttention,
    _weight_out_in,
)
from ssn_core.scoring.forward import _forward, score_batch  # noqa: F401 - attribution, direction, top_examples
from ssn_core.scoring.loop import Progress, score
from ssn_core.scoring.table import FORMAT, FORMAT_VERSION, METHODS, Group, ScoreTable, ScoringMethod
from ssn_core.sites import SITE_KINDS, SiteKind

__all__ = [
    "AGGREGATES",
    "COMPARISON_KIND",
    "FORMAT",
    "FORMAT_VERSION",
    "METHODS",
    "SITE_KINDS",
    "TEMPLATES",
    "Aggregate",
    "EncodedBatch",
    "Group",
    "MethodComparison",
    "Progress",
    "ScoreTable",
    "ScoringMethod",
    "SiteKind",
    "Triple",
    "ablation_batch",
    "compare_methods",
    "encode_prompt",
    "make_batch",
    "parse_method_spec",
    "rank_agreement",
    "sample_neurons",
    "sampled_scores",
    "score",
    "score_batch",
]
