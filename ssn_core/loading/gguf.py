"""GGUF files: a header check before transformers sees the file, and the load dequantized to float32.

`inspect_gguf` parses the header (metadata and tensor table) itself, so that a wrong or truncated file gives a
clear error, and so that the memory estimate and the architecture check run before the weights are unpacked.
`_load_gguf` then loads it with transformers' GGUF loader, every weight unpacked to a plain dense tensor (SSN
Lab's hooks, scores and training deltas need plain nn.Linear weights), on the CPU; `_place` moves it to the
dtype and device asked for. Used for a user's .gguf file and to convert the starter model once.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssn_core.errors import ModelLoadError
from ssn_core.loading.preflight import _first_line, _torch_dtype
from ssn_core.loading.spec import ModelSpec

_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass
class GgufInfo:
    version: int
    architecture: str
    n_tensors: int
    n_elements: int  # total weights (for the memory estimate)
    expected_size: int  # bytes the file must have to hold every tensor
    file_size: int


def inspect_gguf(path: str | os.PathLike) -> GgufInfo:
    """Parse a GGUF header (metadata + tensor table) and check that the file holds all its tensor data."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    file_size = path.stat().st_size
    if file_size < 24:
        raise ModelLoadError(f"{path} is not a GGUF file (only {file_size} bytes)")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (wrong magic bytes at the start)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        pos = 4

        def take(fmt: str):
            nonlocal pos
            values = struct.unpack_from("<" + fmt, buf, pos)
            pos += struct.calcsize("<" + fmt)
            return values[0] if len(values) == 1 else values

        def take_str() -> str:
            nonlocal pos
            n = take("Q")
            if pos + n > file_size:
                raise struct.error("string past end of file")
            s = bytes(buf[pos : pos + n]).decode("utf-8", errors="replace")
            pos += n
            return s

        def take_value(vtype: int):
            nonlocal pos
            if vtype == 8:
                return take_str()
            if vtype == 9:
                elem_type, count = take("I"), take("Q")
                if elem_type in _GGUF_SCALAR:  # skip fixed-size arrays without decoding them
                    pos += struct.calcsize("<" + _GGUF_SCALAR[elem_type]) * count
                elif elem_type == 8:  # string arrays (the vocabulary): skip each string by its length
                    read_len = struct.Struct("<Q").unpack_from
                    for _ in range(count):
                        pos += 8 + read_len(buf, pos)[0]
                else:
                    for _ in range(count):
                        take_value(elem_type)
                return None
            if vtype not in _GGUF_SCALAR:
                raise ModelLoadError(f"{path}: unknown GGUF metadata type {vtype} (corrupt file?)")
            return take(_GGUF_SCALAR[vtype])

        version = take("I")
        if version not in (2, 3):
            raise ModelLoadError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
        n_tensors, n_kv = take("Q"), take("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = take_str()
            metadata[key] = take_value(take("I"))
        tensors = []
        for _ in range(n_tensors):
            take_str()
            n_dims = take("I")
            dims = [take("Q") for _ in range(n_dims)]
            ggml_type, offset = take("I"), take("Q")
            tensors.append((dims, ggml_type, offset))
        alignment = int(metadata.get("general.alignment") or 32)
        data_start = (pos + alignment - 1) // alignment * alignment
        n_elements, end = 0, data_start
        for dims, ggml_type, offset in tensors:
            count = 1
            for d in dims:
                count *= d
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise ModelLoadError(
                    f"{path}: unknown GGUF tensor type {ggml_type} (file newer than the gguf package?)"
                ) from None
            n_elements += count
            end = max(end, data_start + offset + count // block * type_size)
    except (struct.error, IndexError, OverflowError, MemoryError):
        raise ModelLoadError(
            f"{path} is cut short or corrupt: its GGUF header is incomplete (truncated download?)"
        ) from None
    finally:
        buf.close()
    if file_size < end:
        raise ModelLoadError(
            f"{path} is truncated: its tensors need {end:,} bytes but the file has {file_size:,} (incomplete download?)"
        )
    return GgufInfo(version, str(metadata.get("general.architecture", "")), len(tensors), n_elements, end, file_size)


_GGUF_ARCH_TO_MODEL_TYPE = {
    "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text", "gptneox": "gpt_neox",
}


def _clear_gguf_quantization(model) -> None:
    """A GGUF-loaded model may carry quantizer state that blocks saving and training; drop it.

    Safe because the weights were dequantized to plain tensors at load time.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if "quantization_config" in model.config.__dict__:
        del model.config.__dict__["quantization_config"]
    for flag in ("is_quantized", "is_loaded_in_8bit", "is_loaded_in_4bit"):
        if flag in model.__dict__:
            model.__dict__[flag] = False
    if "quantization_method" in model.__dict__:
        del model.__dict__["quantization_method"]


def _load_gguf(gguf_path: Path, spec: ModelSpec | None):
    """Load model + tokenizer from one GGUF file, dequantized to float32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = bool(spec and spec.trust_remote_code)
    kwargs: dict[str, Any] = {"gguf_file": str(gguf_path), "trust_remote_code": trust}
    try:
        from transformers import GgufConfig

        # Unpack every weight to a dense tensor even when a GGUF kernel package is installed: SSN Lab's
        # hooks, scores and training deltas need plain nn.Linear weights.
        model_kwargs = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older transformers always dequantize
        model_kwargs = {}
    parent = str(gguf_path.parent)
    try:
        tokenizer = AutoTokenizer.from_pretrained(parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32, **kwargs, **model_kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, NotImplementedError, TypeError) as exc:
        raise ModelLoadError(f"could not load the GGUF file {gguf_path}: {_first_line(exc)}") from exc
    _clear_gguf_quantization(model)
    return model.eval(), tokenizer


def _place(model, spec: ModelSpec, device: str):
    """dtype / device for a model that was loaded as float32 on the CPU (GGUF path)."""
    dtype = spec.dtype if spec.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
    if dtype != "float32":
        model = model.to(_torch_dtype(dtype))
    if device != "cpu":
        model = model.to("cuda")
    return model
