"""What to load and what was loaded: `ModelSpec`, `ModelSummary` and the allowed option values.

Kept apart from the loaders so that the CLI and the app can build their option lists (`DTYPES`, `QUANTIZATIONS`,
`DEVICE_MAPS`) and a `ModelSpec` without reading how each kind of source is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ssn_core._conventions import Progress  # noqa: F401 - re-exported: ssn_core.loading.Progress
from ssn_core.errors import ModelLoadError

DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS: tuple[str, ...] = ("none", "8bit", "4bit-nf4", "4bit-fp4")
DEVICE_MAPS: tuple[str, ...] = ("auto", "cpu", "cuda")


@dataclass
class ModelSpec:
    """What to load and how.

    source: a hub id (``Qwen/Qwen2.5-7B-Instruct``), a local model directory, a path to a ``.gguf``
    file, or ``starter:qwen2.5-coder-0.5b`` / ``starter:qwen2.5-coder-1.5b``.
    dtype: ``auto`` = float32 on CPU (exact and fast enough there), the checkpoint's dtype on GPU.
    quantization: bitsandbytes ``8bit`` / ``4bit-nf4`` / ``4bit-fp4`` (CPU works with bitsandbytes >= 0.50).
    device_map: ``cpu``, ``cuda`` (all on the first GPU) or ``auto`` (GPU(s) when CUDA is available,
    spread by accelerate; plain CPU otherwise).
    gguf_file: a GGUF file name inside ``source`` (a directory or hub repo holding several GGUFs).
    """

    source: str
    dtype: str = "auto"
    quantization: str = "none"
    device_map: str = "auto"
    trust_remote_code: bool = False
    gguf_file: str | None = None

    def validate(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ModelLoadError("no model given: pass a hub id, a local directory, a .gguf file or a starter name")
        for name, value, allowed in (
            ("dtype", self.dtype, DTYPES),
            ("quantization", self.quantization, QUANTIZATIONS),
            ("device_map", self.device_map, DEVICE_MAPS),
        ):
            if value not in allowed:
                raise ModelLoadError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")


@dataclass
class ModelSummary:
    """What was loaded, for the CLI's `info`, the app's model page and result-file metadata."""

    name: str
    source: str
    family: str  # SSN Lab site family ("llama-like", "phi3", "gpt2", "gpt_neox")
    model_type: str  # transformers model_type ("qwen2", ...)
    n_params: int
    n_layers: int
    hidden_size: int
    mlp_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: str
    device_map: str
    quantization: str
    has_chat_template: bool
    chat_template_fallback: bool
    memory_bytes: int
    load_seconds: float
    loaded_from: str  # "gguf" | "safetensors-cache" | "hub" | "local" | "memory" (tiny test models)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for display."""
        return [
            ("name", self.name),
            ("source", self.source),
            ("model type", f"{self.model_type} ({self.family})"),
            ("parameters", f"{self.n_params:,} ({self.n_params / 1e9:.2f} B)"),
            ("layers", str(self.n_layers)),
            ("hidden size", str(self.hidden_size)),
            ("MLP size", str(self.mlp_size)),
            ("attention heads", f"{self.n_heads} query / {self.n_kv_heads} key-value, head dim {self.head_dim}"),
            ("dtype", self.dtype),
            ("device", self.device_map),
            ("quantization", self.quantization),
            ("chat template", "yes" if self.has_chat_template else "no (plain 'User:/Assistant:' fallback)"),
            ("memory", f"{self.memory_bytes / 2**30:.2f} GiB"),
            ("loaded from", self.loaded_from),
            ("load time", f"{self.load_seconds:.1f} s"),
        ]
