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
"""

from __future__ import annotations

import ast
import csv
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ssn_core.errors import PromptSetError
from ssn_core.io import atomic_write_text

LABELS: tuple[str, ...] = ("harmful", "harmless")

# ISO 639-1 code -> English name. The first block is what the built-in set and MultiJail cover; the rest are
# well-known codes that MGSM or users' own data may carry.
LANGUAGES: dict[str, str] = {
    "en": "English",
    "zh": "Chinese",
    "it": "Italian",
    "vi": "Vietnamese",
    "ar": "Arabic",
    "ko": "Korean",
    "th": "Thai",
    "bn": "Bengali",
    "sw": "Swahili",
    "jv": "Javanese",
    "af": "Afrikaans",
    "ne": "Nepali",
    # more languages (MGSM: de fr es ja ru te; others for user data)
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "ja": "Japanese",
    "ru": "Russian",
    "te": "Telugu",
    "pt": "Portuguese",
    "nl": "Dutch",
    "pl": "Polish",
    "uk": "Ukrainian",
    "cs": "Czech",
    "sv": "Swedish",
    "da": "Danish",
    "no": "Norwegian",
    "fi": "Finnish",
    "el": "Greek",
    "hu": "Hungarian",
    "ro": "Romanian",
    "bg": "Bulgarian",
    "tr": "Turkish",
    "he": "Hebrew",
    "fa": "Persian",
    "ur": "Urdu",
    "hi": "Hindi",
    "mr": "Marathi",
    "gu": "Gujarati",
    "pa": "Punjabi",
    "ta": "Tamil",
    "kn": "Kannada",
    "ml": "Malayalam",
    "si": "Sinhala",
    "my": "Burmese",
    "km": "Khmer",
    "lo": "Lao",
    "id": "Indonesian",
    "ms": "Malay",
    "tl": "Tagalog",
    "su": "Sundanese",
    "am": "Amharic",
    "ha": "Hausa",
    "yo": "Yoruba",
    "ig": "Igbo",
    "zu": "Zulu",
    "xh": "Xhosa",
    "so": "Somali",
}

BUILTIN_LANGUAGES: tuple[str, ...] = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv", "af", "ne")
MULTIJAIL_LANGUAGES: tuple[str, ...] = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")
MULTIJAIL_HUB_ID = "DAMO-NLP-SG/MultiJail"

# MultiJail's paper lists English on its own as high-resource; here it sits in "high" with zh, it, vi.
MULTIJAIL_GROUPS: dict[str, list[str]] = {
    "high": ["en", "zh", "it", "vi"],
    "medium": ["ar", "ko", "th"],
    "low": ["bn", "sw", "jv"],
}
# The SS-Neuron paper: English is the one high-resource (HR) language, everything else is non-high-resource.
PAPER_GROUPS: dict[str, list[str]] = {
    "hr": ["en"],
    "nhr": [lang for lang in BUILTIN_LANGUAGES if lang != "en"],
}

DEFAULT_MIN_PER_LANGUAGE = 4
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets" / "prompts" / "builtin"


class PromptFormat(StrEnum):
    """How a prompt reaches the model: through the chat template ("chat") or as plain text ("raw")."""

    CHAT = "chat"
    RAW = "raw"


def language_name(code: str) -> str:
    return LANGUAGES.get(code, code)


def _known_list(known: Iterable[str]) -> str:
    return ", ".join(known)


def parse_languages(spec: str | Sequence[str], known: Iterable[str] | None = None) -> list[str]:
    """"en,zh,bn" (or "en zh bn", or a list) -> ["en", "zh", "bn"]: lower-cased, de-duplicated, validated."""
    known = tuple(known) if known is not None else tuple(LANGUAGES)
    parts = spec.replace(",", " ").split() if isinstance(spec, str) else [str(s) for s in spec]
    codes = list(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))
    if not codes:
        raise PromptSetError("no language codes given; expected a comma-separated list such as en,zh,bn")
    unknown = [c for c in codes if c not in known]
    if unknown:
        raise PromptSetError(f"unknown language code(s) {', '.join(repr(c) for c in unknown)}; "
                             f"known codes: {_known_list(known)}")
    return codes


# ---------------------------------------------------------------------------------------------------------------
# Language groups
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LanguageGroups:
    """Named groups of languages (e.g. high / medium / low resource); one of them is the high-resource group.

    SS-Neurons are defined against the HR languages; everything outside the HR group counts as NHR.
    """

    groups: dict[str, tuple[str, ...]]
    hr_group: str

    def __post_init__(self) -> None:
        groups = {str(name): tuple(langs) for name, langs in self.groups.items()}
        if not groups:
            raise PromptSetError("language groups are empty; give at least one group, e.g. {'hr': ['en']}")
        seen: dict[str, str] = {}
        for name, langs in groups.items():
            if not langs:
                raise PromptSetError(f"language group {name!r} has no languages")
            for lang in langs:
                if lang not in LANGUAGES:
                    raise PromptSetError(f"language group {name!r} has unknown language code {lang!r}; "
                                         f"known codes: {_known_list(LANGUAGES)}")
                if lang in seen:
                    raise PromptSetError(f"language {lang!r} is in two groups: {seen[lang]!r} and {name!r}")
                seen[lang] = name
        if self.hr_group not in groups:
            raise PromptSetError(f"high-resource group {self.hr_group!r} is not one of the groups "
                                 f"({', '.join(groups)})")
        object.__setattr__(self, "groups", groups)

    @classmethod
    def from_dict(cls, groups: Mapping[str, Iterable[str] | str], hr_group: str | None = None) -> LanguageGroups:
        """Build (and validate) groups from {"name": ["en", ...] or "en,zh"}; HR group defaults to "hr" or "high"."""
        if not isinstance(groups, Mapping):
            raise PromptSetError(f"language groups must be a mapping of group name -> languages, got "
                                 f"{type(groups).__name__}")
        parsed = {name: tuple(parse_languages(langs)) for name, langs in groups.items()}
        if hr_group is None:
            hr_group = next((g for g in ("hr", "high") if g in parsed), None)
            if hr_group is None:
                raise PromptSetError(f"say which group is high-resource (hr_group=...); groups: {', '.join(parsed)}")
        return cls(parsed, hr_group)

    @classmethod
    def multijail(cls) -> LanguageGroups:
        return cls.from_dict(MULTIJAIL_GROUPS, hr_group="high")

    @classmethod
    def paper(cls) -> LanguageGroups:
        return cls.from_dict(PAPER_GROUPS, hr_group="hr")

    def to_dict(self) -> dict[str, list[str]]:
        return {name: list(langs) for name, langs in self.groups.items()}

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(lang for langs in self.groups.values() for lang in langs)

    @property
    def hr_languages(self) -> tuple[str, ...]:
        return self.groups[self.hr_group]

    @property
    def nhr_languages(self) -> tuple[str, ...]:
        return tuple(lang for name, langs in self.groups.items() if name != self.hr_group for lang in langs)

    def group_of(self, lang: str) -> str:
        for name, langs in self.groups.items():
            if lang in langs:
                return name
        raise PromptSetError(f"language {lang!r} is in no group; groups: "
                             + "; ".join(f"{n}: {', '.join(ls)}" for n, ls in self.groups.items()))


# ---------------------------------------------------------------------------------------------------------------
# Prompt and PromptSet
# ---------------------------------------------------------------------------------------------------------------


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
    _index: dict = field(default=None, init=False, repr=False, compare=False)

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


# ---------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs from a CSV / TSV / JSONL file; every failure is a PromptSetError."""
    if not path.exists():
        raise PromptSetError(f"prompt file not found: {path}")
    if path.is_dir():
        raise PromptSetError(f"{path} is a folder; give a .csv, .tsv or .jsonl file")
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if suffix in (".jsonl", ".ndjson"):
                rows = []
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PromptSetError(f"{path.name} line {lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise PromptSetError(f"{path.name} line {lineno}: expected a JSON object, got "
                                             f"{type(row).__name__}")
                    rows.append((lineno, row))
                return rows
            if suffix in (".csv", ".tsv"):
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                if reader.fieldnames is None:
                    raise PromptSetError(f"{path.name} is empty: expected a header row")
                rows = []
                for row in reader:
                    if None in row:  # more cells than header columns
                        raise PromptSetError(f"{path.name} line {reader.line_num}: more cells than header columns")
                    if any(v is not None and v.strip() for v in row.values()):
                        rows.append((reader.line_num, row))
                return rows
    except UnicodeDecodeError as e:
        raise PromptSetError(f"{path.name} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") \
            from None
    except csv.Error as e:
        raise PromptSetError(f"{path.name} is not a readable CSV file: {e}") from None
    except OSError as e:
        raise PromptSetError(f"cannot read {path}: {e.strerror or e}") from None
    raise PromptSetError(f"unsupported prompt file type {path.suffix or '(none)'!r} for {path.name}; "
                         f"use .csv, .tsv or .jsonl")


def _columns(rows: list[tuple[int, dict]]) -> list[str]:
    return list(dict.fromkeys(k for _, row in rows for k in row))


def _require_columns(name: str, rows: list[tuple[int, dict]], required: Sequence[str]) -> None:
    found = _columns(rows)
    missing = [c for c in required if c not in found]
    if missing:
        raise PromptSetError(f"{name}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                             f"columns found: {', '.join(repr(c) for c in found) or 'none'}")


def _cell(row: dict, column: str | None) -> str:
    if column is None:
        return ""
    value = row.get(column)
    return "" if value is None else str(value).strip()


def _label(value: str, where: str) -> str:
    label = value.strip().lower()
    if label not in LABELS:
        raise PromptSetError(f"{where}: label must be 'harmful' or 'harmless', got {value!r}")
    return label


def _language(value: str, where: str) -> str:
    code = value.strip().lower()
    if code not in LANGUAGES:
        raise PromptSetError(f"{where}: unknown language code {value!r}; known codes: {_known_list(LANGUAGES)}")
    return code


def _finish(prompts: list[Prompt], source: str, languages: Iterable[str] | str | None,
            min_per_language: int, labels: Sequence[str]) -> PromptSet:
    full = PromptSet(tuple(prompts), source)
    if not len(full):
        raise PromptSetError(f"{source} has no prompts")
    if languages is not None:
        wanted = parse_languages(languages)
        absent = [lang for lang in wanted if lang not in full.languages]
        if absent:
            raise PromptSetError(f"{source} has no prompts in language(s) {', '.join(absent)}; "
                                 f"it has: {', '.join(full.languages)}")
        full = full.select(languages=wanted)
    return full.check(labels=labels, min_per_language=min_per_language)


# ---------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------


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
    prompts = []
    for lab in LABELS if label is None else (label,):
        rows = _builtin_rows(lab, str(BUILTIN_DIR))
        rows = rows if n is None else rows[:n]
        for lang in langs:
            prompts.extend(Prompt(row["id"], lang, lab, row[lang], row.get("category")) for row in rows)
    n_items = len(_builtin_rows(LABELS[0], str(BUILTIN_DIR))) if n is None else n
    return PromptSet(tuple(prompts), f"builtin ({n_items} items x {len(langs)} languages)")


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


def load_file(path: str | os.PathLike, text_col: str = "text", language_col: str = "language",
              label_col: str = "label", id_col: str = "id", category_col: str | None = None,
              language_columns: Sequence[str] | None = None, label: str | None = None,
              languages: Iterable[str] | str | None = None,
              min_per_language: int = DEFAULT_MIN_PER_LANGUAGE) -> PromptSet:
    """A user's prompt file (.csv, .tsv or .jsonl).

    Long format: one prompt per row with ``text_col``, ``language_col``, ``label_col`` (or a fixed ``label=``)
    and optionally ``id_col`` / ``category_col``. Wide format: ``language_columns=["en", "bn", ...]``, one row
    per item and one column per language, with ``label=`` (or a ``label_col``). Rows without an id get their row
    number, so parallel wide files keep the same item id in every language.
    A set with only harmful prompts passes here (``min_per_language`` applies to the labels present);
    `with_harmless` adds the counterpart.
    """
    path = Path(path).expanduser()
    rows = _read_rows(path)
    name = path.name
    if not rows:
        raise PromptSetError(f"{name} has no rows")
    if label is not None:
        label = _label(label, name)
    columns = _columns(rows)
    if category_col is not None:
        _require_columns(name, rows, [category_col])
    use_id = id_col in columns
    prompts: list[Prompt] = []
    if language_columns is not None:
        lang_cols = list(language_columns)
        if not lang_cols:
            raise PromptSetError("language_columns is empty; name the language columns, e.g. ['en', 'bn']")
        codes = [_language(c, f"{name} column {c!r}") for c in lang_cols]
        _require_columns(name, rows, lang_cols + ([] if label is not None else [label_col]))
        for number, (lineno, row) in enumerate(rows, start=1):
            where = f"{name} line {lineno}"
            item = _cell(row, id_col) if use_id else f"{number:04d}"
            if not item:
                raise PromptSetError(f"{where}: empty {id_col!r}")
            lab = label if label is not None else _label(_cell(row, label_col), where)
            category = _cell(row, category_col) or None
            for col, code in zip(lang_cols, codes, strict=True):
                text = _cell(row, col)
                if not text:
                    raise PromptSetError(f"{where}: empty text in column {col!r}")
                prompts.append(Prompt(item, code, lab, text, category))
    else:
        _require_columns(name, rows, [text_col, language_col] + ([] if label is not None else [label_col]))
        for number, (lineno, row) in enumerate(rows, start=1):
            where = f"{name} line {lineno}"
            text = _cell(row, text_col)
            if not text:
                raise PromptSetError(f"{where}: empty {text_col!r}")
            item = _cell(row, id_col) if use_id else f"{number:04d}"
            if not item:
                raise PromptSetError(f"{where}: empty {id_col!r}")
            lang = _language(_cell(row, language_col), where)
            lab = label if label is not None else _label(_cell(row, label_col), where)
            prompts.append(Prompt(item, lang, lab, text, _cell(row, category_col) or None))
    present = tuple(lab for lab in LABELS if any(p.label == lab for p in prompts))
    return _finish(prompts, f"file {name}", languages, min_per_language, labels=present)
