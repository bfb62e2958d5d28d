"""Loading models: a hub id, a local directory, a .gguf file, or a built-in starter model.

`load_model(spec)` returns a `LoadedModel`: the transformers model (eval mode), its tokenizer, a
`ModelSummary`, the lazily built neuron `SiteMap`, and the chat formatting every other module uses.

One idea per module; every name is importable from ``ssn_core.loading`` as before the split:

- `spec`: `ModelSpec` (what to load and how), `ModelSummary` (what was loaded), the allowed option values.
- `loaded`: `LoadedModel` and its chat formatting (`format_chat`, `format_chat_with_span`, `tokenize_prompts`).
- `preflight`: what is decided and checked before any weight is read (device, dtype, memory, quantization,
  architecture, safetensors headers), so that a model that cannot work fails fast with a clear error.
- `gguf`: the GGUF header check (`inspect_gguf`) and the load dequantized to float32.
- `starter`: starter models (GGUF chunks shipped as PyPI packages): assembly, checksums, the safetensors cache,
  `prepare_starter`.
- `load`: `load_model` (which kind of source, and the load of each) and `finish_loaded`, the common tail.

Tests that replace a helper patch it in the module that calls it (e.g. ``ssn_core.loading.preflight``), not here.
"""

from __future__ import annotations

import warnings

from ssn_core.loading.gguf import GgufInfo, inspect_gguf
from ssn_core.loading.load import finish_loaded, load_model
from ssn_core.loading.loaded import FALLBACK_CHAT_TEMPLATE, LoadedModel
from ssn_core.loading.spec import (
    DEVICE_MAPS,
    DTYPES,
    QUANTIZATIONS,
    ModelSpec,
    ModelSummary,
    Progress,
)
from ssn_core.loading.starter import (
    DEFAULT_STARTER,
    STARTERS,
    StarterModel,
    _find_part,  # noqa: F401 - used by tests/conftest.py and bench/gpu_profile.py
    assemble_starter,
    cache_dir,
    check_starter_cache,
    get_starter,
    prepare_starter,
    starter_cache_ready,
    starter_dir,
)
from ssn_core.quantized import quiet_bitsandbytes

# bitsandbytes' 8-bit CPU matmul warns on every call that it casts float32 inputs to float16 (a warning in older
# releases, a log message in newer ones), and on a CPU every import says it could not fetch an optional hub kernel
# (harmless: see ssn_core.quantized). None of the modules above imports bitsandbytes, so the filters are in
# place before it is.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
quiet_bitsandbytes()

__all__ = [
    "DEFAULT_STARTER",
    "DEVICE_MAPS",
    "DTYPES",
    "FALLBACK_CHAT_TEMPLATE",
    "QUANTIZATIONS",
    "STARTERS",
    "GgufInfo",
    "LoadedModel",
    "ModelSpec",
    "ModelSummary",
    "Progress",
    "StarterModel",
    "assemble_starter",
    "cache_dir",
    "check_starter_cache",
    "finish_loaded",
    "get_starter",
    "inspect_gguf",
    "load_model",
    "prepare_starter",
    "starter_cache_ready",
    "starter_dir",
]
