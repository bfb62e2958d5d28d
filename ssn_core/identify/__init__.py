"""MS-Neuron and SS-Neuron selection from importance scores, the language overlap matrix, and result files.

- MS-Neurons(lang): per layer and site kind, the top p of neurons by importance on that language's
  harmful prompts, minus the top p on its harmless prompts (k = floor(p · N) per layer-site, so a tiny
  p selects nothing in a layer and p = 1 selects everything on both sides: an empty difference).
  ``ranking="pooled"`` ranks all kinds of a layer together (k = floor(p · Σ N)) after dividing each kind's
  scores by their mean, so kinds with larger raw scales do not take every slot.
- SS-Neurons(lang) = MS(lang) ∩ MS(HR) for every non-high-resource language. With several HR languages
  MS(HR) is the union of their MS sets (a neuron is "high-resource safety" if any HR language uses it).
- Also: the union of all SS sets (what the paper suppresses as "all SS-Neurons"), the neurons shared by
  the SS sets of every NHR language, and language × language overlap counts and Jaccard indices.

One idea per module; every public name is importable from ``ssn_core.identify`` as before the split:

- `recipes`: `Recipe`, `RECIPES`, `get_recipe`.
- `selection`: `top_fraction`, `ms_neurons`, `ss_neurons`, `overlap_table`, `select`, `RANKINGS`.
- `result`: `IdentifyResult` (its folder: save, load, bundles), `MANIFEST_FORMAT`.
- `run`: `identify`, the entry point.

Tests that replace a helper patch it in the module that uses it (e.g. ``ssn_core.identify.result.atomic_write_json``).
"""

from __future__ import annotations

from ssn_core.identify.recipes import RECIPES, Recipe, get_recipe
from ssn_core.identify.result import MANIFEST_FORMAT, IdentifyResult
from ssn_core.identify.run import identify
from ssn_core.identify.selection import (
    OVERLAP_COLUMNS,
    RANKINGS,
    ms_neurons,
    overlap_table,
    select,
    ss_neurons,
    top_fraction,
)

__all__ = [
    "MANIFEST_FORMAT",
    "OVERLAP_COLUMNS",
    "RANKINGS",
    "RECIPES",
    "IdentifyResult",
    "Recipe",
    "get_recipe",
    "identify",
    "ms_neurons",
    "overlap_table",
    "select",
    "ss_neurons",
    "top_fraction",
]
