"""Prompt sets: languages and language groups, the `Prompt` / `PromptSet` types, and their loaders.

Every source ends up in one schema: a `PromptSet` of `Prompt(id, language, label, text, category)` where
``label`` is "harmful" or "harmless". MS-Neuron selection contrasts the two labels within one language, so a
study needs both; MultiJail only has harmful prompts, which is why `with_harmless` pairs it with the built-in
harmless set (or any other harmless set) and fails when a language would be left without a counterpart.

Sources:
- `load_builtin`: the project's own parallel set in ``assets/prompts/builtin/`` (see its README): 12 languages,
  the same items in every language, harmless item ``sNNN`` a minimal-edit counterpart of harmful ``hNNN``.
- `load_multijail`: the MultiJail CSV (UTF-8 with BOM, one column per language) or its hub id.
- `load_file`: a user CSV / TSV / JSONL in long format (one row per prompt) or wide format (one column per language).

Prompt formatting (chat template or raw text) is not done here: callers choose a `PromptFormat` and
`LoadedModel.format_chat` / `scoring.encode_prompt` apply it.

One idea per module; every name is importable from ``ssn_core.prompts`` as before the split:

- `languages`: `LANGUAGES`, `LABELS`, the built-in and MultiJail languages and groups, `parse_languages`,
  `LanguageGroups`.
- `prompt_set`: `Prompt`, `PromptSet`, `PromptFormat`.
- `files`: reading CSV / TSV / JSONL rows (every failure a `PromptSetError`) and `load_file`.
- `builtin`: `load_builtin`, `with_harmless`.
- `multijail`: `load_multijail` (CSV or hub id).
"""

from __future__ import annotations

from ssn_core.prompts.builtin import BUILTIN_DIR, load_builtin, with_harmless
from ssn_core.prompts.files import load_file
from ssn_core.prompts.languages import (
    BUILTIN_LANGUAGES,
    LABELS,
    LANGUAGES,
    MULTIJAIL_GROUPS,
    MULTIJAIL_LANGUAGES,
    PAPER_GROUPS,
    LanguageGroups,
    language_name,
    parse_languages,
)
from ssn_core.prompts.multijail import MULTIJAIL_HUB_ID, load_multijail
from ssn_core.prompts.prompt_set import DEFAULT_MIN_PER_LANGUAGE, Prompt, PromptFormat, PromptSet

__all__ = [
    "BUILTIN_DIR",
    "BUILTIN_LANGUAGES",
    "DEFAULT_MIN_PER_LANGUAGE",
    "LABELS",
    "LANGUAGES",
    "MULTIJAIL_GROUPS",
    "MULTIJAIL_HUB_ID",
    "MULTIJAIL_LANGUAGES",
    "PAPER_GROUPS",
    "LanguageGroups",
    "Prompt",
    "PromptFormat",
    "PromptSet",
    "language_name",
    "load_builtin",
    "load_file",
    "load_multijail",
    "parse_languages",
    "with_harmless",
]
