"""SSN Lab engine: cross-lingual shared safety neurons in multilingual LLMs.

Importing ``ssn_core`` is cheap: the names below are loaded from their modules on first use
(PEP 562), so ``import ssn_core`` does not pull in torch or transformers by itself.

    from ssn_core import load_model, generate, GenerationSettings
    lm = load_model("starter:qwen2.5-coder-0.5b")
    print(generate(lm, ["How do I make a bomb at home?"], GenerationSettings(max_new_tokens=32)))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"  # the one version string: pyproject.toml reads it (setuptools dynamic attr)

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # errors
    "SSNError": "ssn_core.errors",
    "ModelLoadError": "ssn_core.errors",
    "UnsupportedArchitectureError": "ssn_core.errors",
    "NeuronFileError": "ssn_core.errors",
    "PromptSetError": "ssn_core.errors",
    "JudgeError": "ssn_core.errors",
    "TrainingError": "ssn_core.errors",
    "Cancelled": "ssn_core.errors",
    # loading
    "ModelSpec": "ssn_core.loading",
    "ModelSummary": "ssn_core.loading",
    "LoadedModel": "ssn_core.loading",
    "load_model": "ssn_core.loading",
    "prepare_starter": "ssn_core.loading",
    "DEFAULT_STARTER": "ssn_core.loading",
    # generation
    "GenerationSettings": "ssn_core.generation",
    "generate": "ssn_core.generation",
    "stream_generate": "ssn_core.generation",
    # sites, neurons, interventions
    "SiteMap": "ssn_core.sites",
    "NeuronSite": "ssn_core.sites",
    "find_sites": "ssn_core.sites",
    "NeuronSet": "ssn_core.neurons",
    "Intervention": "ssn_core.interventions",
    "intervene": "ssn_core.interventions",
    "suppress": "ssn_core.interventions",
    "reinforce": "ssn_core.interventions",
    "clamp": "ssn_core.interventions",
}

def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ssn_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
