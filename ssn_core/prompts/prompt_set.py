"""`Prompt` and `PromptSet`: the one schema every source ends up in (selection by language and label, minimum-count
checks, hashes for manifests, saving), and `PromptFormat`."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ssn_core.errors import PromptSetError
from ssn_core.io import atomic_write_text
from ssn_core.prompts.languages import LABELS, parse_languages

DEFAULT_MIN_PER_LANGUAGE = 4


class PromptFormat(StrEnum):
    """How a prompt reaches the model: through the chat template ("chat") or as plain text ("raw")."""

    CHAT = "chat"
    RAW = "raw"


@dataclass(frozen=True)
class Prompt:
    id: str  # the item id: the same request has the same id in every language
    language: str
    label: str  # "harmful" | "harmless"
    text: str
    category: str | None = None

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise PromptSetError(f"prompt {self.id!r}: label must be 'harmful' or 'harmless', got {self.label!r}")


@dataclass(frozen=True)
class PromptSet:
    prompts: tuple[Prompt, ...]
    source: str = ""  # where the prompts came from, for manifests and the app
    _index: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # set in __post_init__

    def __post_init__(self) -> None:
        prompts = tuple(self.prompts)
        index: dict[tuple[str, str], list[Prompt]] = {}
        seen: set[tuple[str, str, str]] = set()
        for p in prompts:
            key = (p.id, p.language, p.label)
            if key in seen:
                raise PromptSetError(f"duplicate prompt: id {p.id!r}, language {p.language!r}, label {p.label!r} "
                                     f"appears twice in {self.source or 'the prompt set'}")
            seen.add(key)
            index.setdefault((p.language, p.label), []).append(p)
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "_index", {k: tuple(v) for k, v in index.items()})

    # ----- basics -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    def __add__(self, other: PromptSet) -> PromptSet:
        source = " + ".join(s for s in (self.source, other.source) if s)
        return PromptSet(self.prompts + other.prompts, source)

    @property
    def languages(self) -> tuple[str, ...]:
        """Languages in first-seen order."""
        return tuple(dict.fromkeys(p.language for p in self.prompts))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(label for label in LABELS if any(k[1] == label for k in self._index))

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.category for p in self.prompts if p.category))

    @property
    def item_ids(self) -> tuple[str, ...]:
        """Distinct item ids in first-seen order (an item is one request across languages)."""
        return tuple(dict.fromkeys(p.id for p in self.prompts))

    def counts(self) -> dict[str, dict[str, int]]:
        """{language: {"harmful": n, "harmless": n}}."""
        return {lang: {label: len(self._index.get((lang, label), ())) for label in LABELS} for lang in self.languages}

    def by_language(self, lang: str, label: str | None = None) -> tuple[Prompt, ...]:
        if label is not None and label not in LABELS:
            raise PromptSetError(f"label must be 'harmful' or 'harmless', got {label!r}")
        labels = LABELS if label is None else (label,)
        return tuple(p for lab in labels for p in self._index.get((lang, lab), ()))

    # ----- selection ----------------------------------------------------------------------------------------
    def select(self, languages: Iterable[str] | str | None = None, label: str | None = None,
               limit_per_language: int | None = None) -> PromptSet:
        """The prompts of ``languages`` (in that order) with ``label``; at most ``limit_per_language`` per
        (language, label), taken in file order so that parallel sets keep the same items in every language.

        Languages that are known codes but absent from the set are simply absent from the result (callers
        that need them call `check`).
        """
        if label is not None and label not in LABELS:
            raise PromptSetError(f"label must be 'harmful' or 'harmless', got {label!r}")
        if limit_per_language is not None and limit_per_language < 1:
            raise PromptSetError(f"limit_per_language must be at least 1, got {limit_per_language}")
        langs = self.languages if languages is None else tuple(parse_languages(languages))
        labels = LABELS if label is None else (label,)
        chosen: list[Prompt] = []
        for lang in langs:
            for lab in labels:
                items = self._index.get((lang, lab), ())
                chosen.extend(items if limit_per_language is None else items[:limit_per_language])
        if languages is None:  # keep the original interleaving when nothing was reordered
            keep = set(map(id, chosen))
            chosen = [p for p in self.prompts if id(p) in keep]
        return PromptSet(tuple(chosen), self.source)

    def check(self, languages: Iterable[str] | str | None = None, labels: Sequence[str] = LABELS,
              min_per_language: int = DEFAULT_MIN_PER_LANGUAGE) -> PromptSet:
        """Raise PromptSetError unless every language has at least ``min_per_language`` prompts of each label.

        A harmful-only language gets its own message: MS-Neurons need a harmless counterpart in the same language.
        Returns self so calls chain.
        """
        langs = self.languages if languages is None else tuple(parse_languages(languages))
        if not langs:
            raise PromptSetError(f"{self.source or 'the prompt set'} has no prompts")
        missing = [lang for lang in langs if not self.by_language(lang)]
        if missing:
            raise PromptSetError(f"{self.source or 'the prompt set'} has no prompts in language(s) "
                                 f"{', '.join(missing)}; it has: {', '.join(self.languages) or 'none'}")
        for lang in langs:
            counts = {label: len(self._index.get((lang, label), ())) for label in LABELS}
            if "harmless" in labels and counts["harmless"] == 0 and counts["harmful"] > 0:
                raise PromptSetError(
                    f"language {lang} has {counts['harmful']} harmful prompts but no harmless counterpart; "
                    f"MS-Neurons contrast harmful with harmless prompts of the same language. Combine it with a "
                    f"harmless set (prompts.with_harmless) that covers {lang}")
            for label in labels:
                if counts[label] < min_per_language:
                    raise PromptSetError(
                        f"language {lang} has only {counts[label]} {label} prompt(s); at least {min_per_language} "
                        f"are needed (this minimum only keeps the statistics defined: a real study should use "
                        f"50 or more per language and label)")
        return self

    # ----- identity and export ------------------------------------------------------------------------------
    def content_hash(self) -> str:
        """sha256 (hex) of the canonical content, independent of order and of ``source``; used in manifests."""
        rows = sorted([p.language, p.label, p.id, p.category or "", p.text] for p in self.prompts)
        payload = json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def data_hash(self) -> str:
        return self.content_hash()

    def to_records(self) -> list[dict]:
        return [{"id": p.id, "language": p.language, "label": p.label, "category": p.category, "text": p.text}
                for p in self.prompts]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.to_records(), columns=["id", "language", "label", "category", "text"])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the set in long format (.jsonl or .csv, atomically); `load_file` reads it back."""
        path = Path(path)
        records = self.to_records()
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        elif path.suffix.lower() == ".csv":
            import io

            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=["id", "language", "label", "category", "text"],
                                    lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in records)
            text = buffer.getvalue()
        else:
            raise PromptSetError(f"cannot save a prompt set as {path.name}: use a .jsonl or .csv file name")
        atomic_write_text(path, text)
        return path
