"""`Manifest`: what produced a set of results (generation settings, judges, model, chat template hash), with secrets
redacted, written beside every result."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ssn_core.errors import SSNError
from ssn_core.io import atomic_write_json

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

_SECRET_KEYS = frozenset({"api_key", "apikey", "authorization", "password", "secret", "token", "access_token"})


def _settings_dict(settings) -> dict:
    if settings is None:
        return {}
    if is_dataclass(settings) and not isinstance(settings, type):
        return asdict(settings)
    if isinstance(settings, Mapping):
        return dict(settings)
    raise SSNError(f"generation settings must be a dataclass or a dict, got {type(settings).__name__}")


def _redact(obj):
    if isinstance(obj, Mapping):
        return {k: ("***" if str(k).lower() in _SECRET_KEYS else _redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redact(v) for v in obj]
    return obj


def _library_versions() -> dict:
    """torch, transformers, ssn_core and Python versions, and whether packed products may run (greedy replies can
    change with any of them)."""
    from ssn_core.identify.run import _versions

    return _versions()


@dataclass
class Manifest:
    """What produced a set of results: generation settings, chat template, judges, model, library versions (never
    secrets)."""

    generation: dict
    judges: list[dict] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    versions: dict = field(default_factory=_library_versions)

    def to_dict(self) -> dict:
        return _redact(asdict(self))

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())


def make_manifest(settings=None, judges: Sequence = (), lm: LoadedModel | None = None, **extra) -> Manifest:
    """Manifest from a `GenerationSettings` (default settings when None), judges (their `info()`) and a model."""
    if settings is None:
        try:
            from ssn_core.generation import GenerationSettings
            settings = GenerationSettings()
        except ImportError:
            settings = {}
    model: dict = {}
    if lm is not None:
        summary = getattr(lm, "summary", None)
        for key in ("name", "source", "model_type", "dtype", "quantization", "device_map"):
            if getattr(summary, key, None) is not None:
                model[key] = getattr(summary, key)
        template = getattr(lm.tokenizer, "chat_template", None)
        model["chat_template_sha256"] = hashlib.sha256(template.encode("utf-8")).hexdigest()[:16] if isinstance(
            template, str) else None
    judge_infos = [j.info() if hasattr(j, "info") else dict(j) for j in judges]
    return Manifest(generation=_settings_dict(settings), judges=judge_infos, model=model, extra=dict(extra))
