"""Decided and checked before any weight is read: device, dtype, memory estimate, quantization, architecture.

Each of these can fail, and each fails here, from the spec, the config and a few header bytes, rather than
after minutes of loading: the architecture against `ssn_core.sites.SUPPORTED_FAMILIES` (so a model SSN Lab
cannot analyse gives `UnsupportedArchitectureError`), the memory estimate (parameters x bytes per parameter)
against the free memory (a clear error instead of the OOM killer), and each safetensors file's length against
its own header (a truncated download or copy). Shared by the hub / local loader, the GGUF loader and the
starter cache.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from ssn_core.errors import ModelLoadError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from ssn_core.loading.spec import ModelSpec

def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _resolve_device(device_map: str) -> str:
    """'cpu', 'cuda' or 'auto' (multi-device via accelerate); 'auto' without CUDA is plain CPU.

    Under a multi-process launch (`ssn_core.distributed`) every process holds a whole copy of the model, so 'auto'
    means this process's own GPU ('cuda', the device the launcher selected by local rank), not all of them.
    """
    import torch

    if device_map == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "device 'cuda' was asked for but this torch has no usable CUDA GPU; use --device cpu, or install a "
            "CUDA build of torch (see README: make run TORCH_SPEC=...)"
        )
    if device_map == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        from ssn_core.distributed import launched, world

        return "cuda" if launched() and world().active else "auto"
    return device_map


def _cuda_device() -> str:
    """This process's GPU: cuda:0 alone, cuda:<local rank> under a launch (accelerate selects it before the load)."""
    import torch

    return f"cuda:{torch.cuda.current_device()}"


def _resolve_dtype(spec: ModelSpec, device: str, config) -> str:
    if spec.dtype != "auto":
        return spec.dtype
    if device == "cpu":
        return "float32"
    config_dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "")
    return "bfloat16" if "bfloat16" in config_dtype else "float16" if "float16" in config_dtype else "float32"


def _available_memory(device: str) -> int:
    """Bytes the weights may use on the target device(s)."""
    import psutil
    import torch

    cpu_free = int(psutil.virtual_memory().available)
    if device == "cpu":
        return cpu_free
    if device == "cuda":  # this process's GPU only
        return int(torch.cuda.mem_get_info(torch.cuda.current_device())[0])
    gpu_free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return gpu_free + (cpu_free if device == "auto" else 0)


def _check_memory(n_params: int | None, dtype: str, quantization: str, device: str, factor: float = 1.0) -> None:
    if not n_params:
        return
    bytes_per = {"8bit": 1.0, "4bit-nf4": 0.5, "4bit-fp4": 0.5}.get(quantization) or {"float32": 4, "bfloat16": 2,
                                                                                    "float16": 2}[dtype]
    need = int(n_params * bytes_per * factor)
    available = _available_memory(device)
    if need > available:
        raise ModelLoadError(
            f"not enough memory: this model ({n_params / 1e9:.2f} B parameters in {dtype}"
            f"{'' if quantization == 'none' else ', ' + quantization}) needs about {need / 2**30:.1f} GiB but only "
            f"{available / 2**30:.1f} GiB is free on {device}. "
            "Use a smaller model, --dtype bfloat16, or --quant 4bit-nf4."
        )


def _count_params_meta(config, trust_remote_code: bool) -> int | None:
    """Parameter count from the config alone (model built on the meta device: no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            meta_model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in meta_model.parameters())
    except Exception:  # noqa: BLE001 - exotic configs: skip the estimate rather than refuse the model
        return None


def _check_architecture(model_type: str) -> None:
    from ssn_core.sites import SUPPORTED_FAMILIES

    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported by SSN Lab (no neuron-site mapping); supported model "
            f"types: {', '.join(sorted(SUPPORTED_FAMILIES))}"
        )


def _quantization_config(quantization: str, compute_dtype: str):
    if quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"{quantization} quantization needs bitsandbytes: pip install 'bitsandbytes>=0.50'")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.split("-")[1],
        bnb_4bit_compute_dtype=_torch_dtype(compute_dtype),
    )


def _safetensors_size_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be complete (its header and its size disagree), or None; reads 8 bytes + the
    JSON header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is cut short ({size} bytes)"
            header_len = struct.unpack("<Q", head)[0]
            if header_len > min(size - 8, 100_000_000):
                return f"{path.name} is cut short or damaged (its header is longer than the file)"
            header = json.loads(f.read(header_len))
        ends = [int(t["data_offsets"][1]) for key, t in header.items() if key != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return f"{path.name} has a damaged header"
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{path.name} has {size:,} bytes but its header describes {expected:,} (truncated or damaged)"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
