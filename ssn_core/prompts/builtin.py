"""The project's own parallel prompt set (``assets/prompts/builtin/``): `load_builtin`, and `with_harmless`, which
gives a harmful-only set (MultiJail, a user file) the harmless counterpart MS-Neurons need."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

from ssn_core.errors import PromptSetError
from ssn_core.prompts.files import _read_rows
from ssn_core.prompts.languages import BUILTIN_LANGUAGES, LABELS, parse_languages
from ssn_core.prompts.prompt_set import DEFAULT_MIN_PER_LANGUAGE, Prompt, PromptSet

BUILTIN_DIR = Path(__file__).resolve().parent.parent.parent / "assets" / "prompts" / "builtin"


@functools.lru_cache(maxsize=4)
def _builtin_rows(label: str, directory: str) -> tuple[dict, ...]:
    path = Path(directory) / f"{label}.jsonl"
    return tuple(row for _, row in _read_rows(path))


def load_builtin(languages: Iterable[str] | str | None = None, n: int | None = None,
                 label: str | None = None) -> PromptSet:
    """The built-in parallel set: the first ``n`` items of each label (all by default) in ``languages``.

    No minimum-count check: the set has 60+ items per label and language, and a small ``n`` is a deliberate
    choice (quick tries, tests).
    """
    if n is not None and n < 1:
        raise PromptSetError(f"n (items per label and language) must be at least 1, got {n}")
    if label is not None and label not in LABELS:
        raise PromptSetError(f"label must be 'harmful' or 'harmless', got {label!r}")
    langs = BUILTIN_LANGUAGES if languages is None else tuple(parse_languages(languages))
    absent = [lang for lang in langs if lang not in BUILTIN_LANGUAGES]
    if absent:
        raise PromptSetError(f"the built-in prompt set has no language(s) {', '.join(absent)}; it has "
                             f"{', '.join(BUILTIN_LANGUAGES)}. Load your own prompts with prompts.load_file")
    prompts: list[Prompt] = []
    for lab in LABELS if label is None else (label,):
        rows = _builtin_rows(lab, str(BUILTIN_DIR))
        rows = rows if n is None else rows[:n]
        for lang in langs:
            prompts.extend(Prompt(row["id"], lang, lab, row[lang], row.get("category")) for row in rows)
    n_items = len(_builtin_rows(LABELS[0], str(BUILTIN_DIR))) if n is None else n
    return PromptSet(tuple(prompts), f"builtin ({n_items} items x {len(langs)} languages)")


def with_harmless(harmful_set: PromptSet, harmless_set: PromptSet | None = None,
                  min_per_language: int = DEFAULT_MIN_PER_LANGUAGE) -> PromptSet:
    """``harmful_set`` plus harmless prompts of the same languages (default: the built-in harmless set).

    Fails when a language of the harmful set has no harmless counterpart, naming the language.
    """
    harmful = harmful_set.select(label="harmful")
    if not len(harmful):
        raise PromptSetError(f"{harmful_set.source or 'the harmful set'} has no harmful prompts")
    langs = harmful.languages
    if harmless_set is None:
        usable = [lang for lang in langs if lang in BUILTIN_LANGUAGES]
        harmless_set = load_builtin(usable, label="harmless") if usable else PromptSet((), "builtin harmless")
    harmless = harmless_set.select(label="harmless")
    missing = [lang for lang in langs if not harmless.by_language(lang)]
    if missing:
        raise PromptSetError(
            f"no harmless counterpart for language(s) {', '.join(missing)}: {harmless_set.source or 'the harmless set'}"
            f" has harmless prompts in {', '.join(harmless.languages) or 'no language'}. MS-Neurons need harmless "
            f"prompts in every language; give a harmless set (prompts.load_file) that covers {', '.join(missing)}")
    combined = PromptSet(harmful.prompts + harmless.select(languages=langs).prompts,
                         f"{harmful_set.source or 'harmful'} + {harmless_set.source or 'harmless'}")
    return combined.check(min_per_language=min_per_language)
