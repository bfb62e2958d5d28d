"""The project's refusal phrase files: the versioned refusal markers per language the marker judge reads
(assets/judges/refusal_markers.json) and the refusal templates used as training targets
(assets/refusals/refusal_templates.json)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ssn_core.errors import JudgeError

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
DEFAULT_MARKERS_PATH = ASSETS / "judges" / "refusal_markers.json"
DEFAULT_TEMPLATES_PATH = ASSETS / "refusals" / "refusal_templates.json"


@dataclass(frozen=True)
class MarkerLists:
    """Versioned refusal markers per language, as read from a markers JSON file."""

    version: str
    markers: dict[str, tuple[str, ...]]
    window_chars: int
    path: str
    openings: dict[str, tuple[str, ...]] = field(default_factory=dict)
    opening_chars: int = 80


def load_refusal_markers(path: str | os.PathLike | None = None) -> MarkerLists:
    """Read a markers file ({"version", "window_chars", "markers": {lang: [phrase, ...]}}, optional "openings":
    {lang: [phrase, ...]} and "opening_chars")."""
    path = Path(path) if path is not None else DEFAULT_MARKERS_PATH
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JudgeError(f"refusal marker file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JudgeError(f"refusal marker file {path} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("markers"), dict) or "version" not in data:
        raise JudgeError(f"refusal marker file {path} needs a 'version' and a 'markers' object {{language: [...]}}")
    def phrase_lists(section: str) -> dict[str, tuple[str, ...]]:
        lists: dict[str, tuple[str, ...]] = {}
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise JudgeError(f"refusal marker file {path}: '{section}' must be an object {{language: [...]}}")
        for lang, phrases in table.items():
            if not isinstance(phrases, list) or not all(isinstance(p, str) and p.strip() for p in phrases):
                raise JudgeError(f"refusal marker file {path}: {section}[{lang!r}] must be a list of non-empty "
                                 "strings")
            lists[str(lang).lower()] = tuple(phrases)
        return lists

    markers = phrase_lists("markers")
    openings = phrase_lists("openings")
    if "en" not in markers:
        raise JudgeError(f"refusal marker file {path} has no English ('en') markers; they are always checked")
    window = data.get("window_chars", 300)
    if not isinstance(window, int) or window <= 0:
        raise JudgeError(f"refusal marker file {path}: window_chars must be a positive integer")
    opening_chars = data.get("opening_chars", 80)
    if not isinstance(opening_chars, int) or opening_chars <= 0:
        raise JudgeError(f"refusal marker file {path}: opening_chars must be a positive integer")
    return MarkerLists(version=str(data["version"]), markers=markers, window_chars=window, path=str(path),
                       openings=openings, opening_chars=opening_chars)


def load_refusal_templates(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Refusal replies per language (assets/refusals/refusal_templates.json), used as training targets."""
    path = Path(path) if path is not None else DEFAULT_TEMPLATES_PATH
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        templates = data["templates"]
        assert isinstance(templates, dict)
        assert all(isinstance(v, list) and v and all(isinstance(t, str) and t.strip() for t in v)
                   for v in templates.values())
    except FileNotFoundError:
        raise JudgeError(f"refusal template file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise JudgeError(f"refusal template file {path} must be JSON {{\"templates\": {{language: [text, ...]}}}}"
                         ) from None
    return {str(lang).lower(): list(v) for lang, v in templates.items()}
