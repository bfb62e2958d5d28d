"""Tiny LoadedModel-like objects for the scoring / identify tests.

Uses `ssn_core.testing.tiny_model` when it exists; until then a local stand-in with a character-level
tokenizer (with offset mapping) and a fixed chat template.
"""

from __future__ import annotations

from functools import cache

from ssn_core.sites import find_sites
from ssn_core.testing import tiny_hf_model


class _CharTokenizer:
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids = [3 + (ord(c) % 256) for c in text]
        offsets = [(i, i + 1) for i in range(len(text))]
        if add_special_tokens:
            ids, offsets = [1, *ids], [(0, 0), *offsets]
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out


class _StandInLM:
    def __init__(self, family: str):
        self.model = tiny_hf_model(family)
        self.sites = find_sites(self.model)
        self.tokenizer = _CharTokenizer()
        self.summary = None

    def format_chat_with_span(self, user_text, system=None):
        prefix = f"<sys>{system or 'be helpful'}</sys><user>"
        return prefix + user_text + "</user><bot>", (len(prefix), len(prefix) + len(user_text))

    def format_chat(self, user_text, system=None):
        return self.format_chat_with_span(user_text, system)[0]


@cache
def tiny_lm(family: str = "qwen2"):
    try:
        from ssn_core.testing import tiny_model
    except ImportError:
        return _StandInLM(family)
    return tiny_model(family)
