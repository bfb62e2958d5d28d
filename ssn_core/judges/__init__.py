"""Judges: turn (prompt, reply, language) into a three-way `Verdict`: refusal, compliance or off_target.

Why three labels: small models often do neither — they echo the prompt, loop on a phrase or answer in an
unrelated language. Counting those as compliance inflates the attack success rate, counting them as
refusals inflates safety; `off_target` keeps them apart (the SS-Neuron paper reports them separately).

Three judges share the interface `judge(prompt, reply, language) -> Verdict` and `judge_many(...)`:

- `MarkerJudge` (default, offline, deterministic): surface checks for off-target replies, then versioned
  refusal-marker lists (assets/judges/refusal_markers.json) of the prompt's language and of English.
- `GuardModelJudge`: a guard model (Qwen3Guard-Gen, Llama Guard, or any chat model prompted with
  `JUDGE_PROMPT`) loaded through `ssn_core.loading`.
- `ApiJudge`: an OpenAI-compatible `/chat/completions` endpoint prompted with `JUDGE_PROMPT`; off by default,
  the API key is read from an environment variable at call time and never stored.

`judge_agreement` compares two judges' verdicts (raw agreement and Cohen's kappa).

One idea per module; every public name is importable from ``ssn_core.judges`` as before the split:

- `base`: the labels, `Verdict`, the `Judge` interface, `judge_agreement`.
- `text`: normalisation, scripts (`char_script`, `script_counts`, `LANGUAGE_SCRIPTS`), echo and repetition checks.
- `assets`: the refusal marker lists (`load_refusal_markers`) and refusal templates (`load_refusal_templates`).
- `marker`: `MarkerJudge` (and `settled`, for ``stop_at_verdict``).
- `prompt`: `JUDGE_PROMPT`, the one fixed judging prompt of the guard and API judges, and its answer's reading.
- `guard`: `GuardModelJudge` and its batched greedy generation (`_generate_raw`).
- `api`: `ApiJudge`.

Tests that replace a helper patch it in the module that calls it (``ssn_core.judges.guard._generate_raw``), not here:
it is deliberately not re-exported, so that a patch aimed here fails instead of silently changing nothing.
"""

from __future__ import annotations

from ssn_core.judges.api import ApiJudge
from ssn_core.judges.assets import (
    ASSETS,
    DEFAULT_MARKERS_PATH,
    DEFAULT_TEMPLATES_PATH,
    MarkerLists,
    load_refusal_markers,
    load_refusal_templates,
)
from ssn_core.judges.base import (
    COMPLIANCE,
    LABELS,
    OFF_TARGET,
    REFUSAL,
    Judge,
    Progress,
    Verdict,
    judge_agreement,
)
from ssn_core.judges.guard import GUARD_KINDS, GuardModelJudge
from ssn_core.judges.marker import AUTO, MARKER_RULES_VERSION, MarkerJudge
from ssn_core.judges.prompt import JUDGE_PROMPT, JUDGE_PROMPT_VERSION, JUDGE_SYSTEM_PROMPT, parse_one_word_label
from ssn_core.judges.text import (
    LANGUAGE_SCRIPTS,
    char_script,
    distinct_ngram_ratio,
    echo_overlap,
    is_degenerate,
    normalize_text,
    script_counts,
)

__all__ = [
    "ASSETS",
    "AUTO",
    "COMPLIANCE",
    "DEFAULT_MARKERS_PATH",
    "DEFAULT_TEMPLATES_PATH",
    "GUARD_KINDS",
    "JUDGE_PROMPT",
    "JUDGE_PROMPT_VERSION",
    "JUDGE_SYSTEM_PROMPT",
    "LABELS",
    "LANGUAGE_SCRIPTS",
    "MARKER_RULES_VERSION",
    "OFF_TARGET",
    "REFUSAL",
    "ApiJudge",
    "GuardModelJudge",
    "Judge",
    "MarkerJudge",
    "MarkerLists",
    "Progress",
    "Verdict",
    "char_script",
    "distinct_ngram_ratio",
    "echo_overlap",
    "is_degenerate",
    "judge_agreement",
    "load_refusal_markers",
    "load_refusal_templates",
    "normalize_text",
    "parse_one_word_label",
    "script_counts",
]
