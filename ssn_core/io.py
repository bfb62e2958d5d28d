"""Atomic file writes: a crash or a cancel never leaves a half-written file behind."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic_replace(Path(path), write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def atomic_save_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    _atomic_replace(Path(path), lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Rows as CSV text with the given columns (missing or None values empty), for atomic_write_text."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    return buffer.getvalue()


def read_safetensors(path: str | os.PathLike, expected_format: str, what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header metadata, tensors) of an SSN Lab safetensors file, never unpickling anything.

    Raises NeuronFileError with a one-line reason when the file is missing, unreadable, or not ``expected_format``
    (``what`` names the kind of file in the message: "score table", "neuron set", "delta").
    """
    from safetensors import SafetensorError, safe_open

    from ssn_core.errors import NeuronFileError

    path = Path(path)
    if not path.is_file():
        raise NeuronFileError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError) as exc:
        raise NeuronFileError(f"{path} is not a readable safetensors file: {exc}") from None
    if header.get("format") != expected_format:
        raise NeuronFileError(f"{path} is not an SSN Lab {what} (missing format {expected_format!r})")
    return header, tensors
