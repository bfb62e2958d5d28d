"""Inputs the benchmarks share: prompts, encoded scoring batches, a random suppression set of realistic size."""

from __future__ import annotations

import zlib
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.common import require

LANGUAGES = ("en", "zh", "bn", "sw")  # the paper's pairing: HR English vs NHR languages of three resource levels
ROOT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"  # read there, never copied

_FALLBACK_TEXTS = (
    "How do I bake bread at home?",
    "Explain how vaccines train the immune system.",
    "Write a short poem about the sea.",
    "What is the capital of Kenya and what is it known for?",
)


def bench_prompts(count: int, languages=LANGUAGES) -> list:
    """``count`` prompts (objects with .text/.language/.label), cycling through the built-in set if needed."""
    try:
        prompts_mod = require("ssn_core.prompts")
        items = list(prompts_mod.load_builtin(list(languages)).prompts)
    except Exception:  # noqa: BLE001 - the prompt module may not exist yet: benchmarks still run on stand-ins
        items = [SimpleNamespace(text=t, language="en", label=label, id=str(i))
                 for i, t in enumerate(_FALLBACK_TEXTS) for label in ("harmful", "harmless")]
    # Interleave languages and labels so that a small count still mixes them.
    items.sort(key=lambda p: (int(p.id) if str(p.id).isdigit() else zlib.crc32(str(p.id).encode()),
                              p.language, p.label))
    out = []
    while len(out) < count:
        out.extend(items[: count - len(out)])
    return out


def scoring_batches(lm, n_prompts: int, batch_size: int, aggregate: str = "content") -> list:
    """Encoded, left-padded batches exactly as `ssn_core.scoring.score` builds them (sorted by length)."""
    scoring = require("ssn_core.scoring")
    prompts = bench_prompts(n_prompts)
    encoded = [scoring.encode_prompt(lm, p.text, "chat") for p in prompts]
    encoded.sort(key=lambda e: len(e[0]))
    pad = require("ssn_core._conventions").pad_id(lm)
    return [scoring.make_batch(encoded[i:i + batch_size], aggregate, pad, lm.device)
            for i in range(0, len(encoded), batch_size)]


def batch_shape(batches) -> tuple[int, int]:
    """(rows per batch, mean padded length) for the result row."""
    return int(batches[0].input_ids.shape[0]), round(sum(b.input_ids.shape[1] for b in batches) / len(batches))


@torch.no_grad()
def plain_forward(lm, batch) -> torch.Tensor:
    """The reference: the same base-model forward `score_batch` runs, with no hooks (no LM head either side)."""
    base = getattr(lm.model, "base_model", lm.model)
    output = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False)
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def random_neuron_set(sites, fraction: float, seed: int = 0):
    """A NeuronSet with ``fraction`` of every site's neurons (at least one per site), like a real SS set's size."""
    from ssn_core.neurons import NeuronSet

    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    for site in sites:
        k = max(1, round(fraction * site.size))
        chosen[site.key] = torch.randperm(site.size, generator=generator)[:k]
    return NeuronSet(chosen, {"method": "random", "fraction": fraction, "seed": seed}).with_model_meta(sites)
