"""Reading prompt files: CSV / TSV / JSONL rows with every failure as a `PromptSetError`, the checks of their cells,
and `load_file` (a user's file in long or wide format)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ssn_core.errors import PromptSetError
from ssn_core.prompts.languages import LABELS, LANGUAGES, _known_list, parse_languages
from ssn_core.prompts.prompt_set import DEFAULT_MIN_PER_LANGUAGE, Prompt, PromptSet


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
