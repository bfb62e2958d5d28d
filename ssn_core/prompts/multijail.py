"""MultiJail's harmful prompts (`load_multijail`): from its CSV (UTF-8 with BOM, one column per language) or its hub
id through `datasets`, never downloaded in offline mode."""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from ssn_core.errors import PromptSetError
from ssn_core.prompts.files import _cell, _finish, _read_rows, _require_columns
from ssn_core.prompts.languages import MULTIJAIL_LANGUAGES, parse_languages
from ssn_core.prompts.prompt_set import DEFAULT_MIN_PER_LANGUAGE, Prompt, PromptSet

MULTIJAIL_HUB_ID = "DAMO-NLP-SG/MultiJail"


def _multijail_prompts(rows: list[tuple[int, dict]], name: str, langs: Sequence[str]) -> list[Prompt]:
    _require_columns(name, rows, ["id", *langs])
    prompts = []
    for lineno, row in rows:
        item = _cell(row, "id")
        if not item:
            raise PromptSetError(f"{name} line {lineno}: empty id")
        category = _multijail_category(_cell(row, "tags"))
        for lang in langs:
            text = _cell(row, lang)
            if text:  # a missing translation leaves that language one item short; `check` reports real gaps
                prompts.append(Prompt(f"mj{item}", lang, "harmful", text, category))
    return prompts


def _multijail_category(tags: str) -> str | None:
    """"['Weapons', 'Violence & incitement']" -> "Weapons; Violence & incitement" (a literal, never executed)."""
    if not tags:
        return None
    try:
        value = ast.literal_eval(tags)
    except (ValueError, SyntaxError):
        return tags
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value) or None
    return str(value)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _multijail_hub_rows(hub_id: str) -> list[tuple[int, dict]]:
    hint = ("download MultiJail.csv (https://github.com/DAMO-NLP-SG/multilingual-safety-for-LLMs) and pass its "
            "path instead")
    if _offline():
        raise PromptSetError(f"cannot load {hub_id} from the Hugging Face hub: offline mode is on "
                             f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); {hint}")
    try:
        import datasets
    except ImportError:
        raise PromptSetError(f"loading {hub_id} from the hub needs the 'datasets' package "
                             f"(pip install datasets); or {hint}") from None
    try:
        data = datasets.load_dataset(hub_id, split="train")
    except Exception as e:  # noqa: BLE001 -- network, auth, missing dataset: all mean "use the CSV"
        raise PromptSetError(f"could not load {hub_id} from the Hugging Face hub ({type(e).__name__}: {e}); "
                             f"{hint}") from None
    return [(i + 2, dict(row)) for i, row in enumerate(data)]


def load_multijail(path_or_hub_id: str | os.PathLike = MULTIJAIL_HUB_ID, languages: Iterable[str] | str | None = None,
                   n: int | None = None, min_per_language: int = DEFAULT_MIN_PER_LANGUAGE) -> PromptSet:
    """MultiJail's harmful prompts (315 per language): from the CSV path, or from the hub id via `datasets`.

    Harmful only; combine with `with_harmless` before identifying MS-Neurons.
    """
    langs = MULTIJAIL_LANGUAGES if languages is None else tuple(parse_languages(languages))
    absent = [lang for lang in langs if lang not in MULTIJAIL_LANGUAGES]
    if absent:
        raise PromptSetError(f"MultiJail has no language(s) {', '.join(absent)}; it has "
                             f"{', '.join(MULTIJAIL_LANGUAGES)}")
    if n is not None and n < 1:
        raise PromptSetError(f"n (prompts per language) must be at least 1, got {n}")
    spec = str(path_or_hub_id)
    path = Path(spec).expanduser()
    if not path.exists() and _HUB_ID.match(spec):  # "owner/name" that is not a local file
        rows, name = _multijail_hub_rows(spec), spec
    else:
        rows, name = _read_rows(path), path.name
    if n is not None:
        rows = rows[:n]
    prompts = _multijail_prompts(rows, name, langs)
    return _finish(prompts, f"MultiJail ({name})", None, min_per_language, labels=("harmful",))
