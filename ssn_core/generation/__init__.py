"""Batched chat generation, plain and streaming, and many-prompt generation through a pool of rows.

Interventions are applied by the caller: wrap the call in ``with intervene(lm, ...)`` (or
``suppress`` / ``reinforce`` / ``clamp``). A per-row mask refers to the positions in ``user_texts``:
row i of the batch is ``user_texts[i]``, always, because the whole list is generated as one batch
(callers chunk long lists themselves, and give each chunk its own mask).

    with suppress(lm, ss_neurons, rows=[False, True]):
        baseline, suppressed = generate(lm, [prompt, prompt], settings)

`generate_many` answers a long list with at most ``batch_size`` rows in flight: rows are prefilled in
length-sorted chunks, a row leaves the batch as soon as it is finished (a stop token, ``max_new_tokens``, or
the caller's ``stop`` test, e.g. a judge whose verdict can no longer change) and a waiting row takes its place.
Row-specific interventions are therefore passed *to it* (``interventions=``, masks over ``user_texts``), never
entered around it: it re-applies them, masked to the rows in flight, whenever the batch changes.

Sampling draws every row from its own random generator seeded with ``settings.seed``: a row's reply
does not depend on which other rows share its batch, a call is reproducible, and two identical rows
(an A/B pair) see the same random draws, so any difference between them comes from the intervention.
Only the settings given here shape the output: the checkpoint's own generation defaults (sampling
temperature, repetition penalty, ...) are not applied.

Decoding is our own loop over the model's forward with a KV cache (the same calls `transformers`' greedy
`generate` makes, so a fixed batch gives the same tokens); owning the loop is what lets rows leave and join.
Under greedy decoding a row's reply does not depend on the rows around it, up to float rounding: the kernels
of a batched matrix product may round a row differently when the batch changes, which can flip a near-tie.

One idea per module; every name is importable from ``ssn_core.generation`` as before the split:

- `settings`: `GenerationSettings`, `RowSampler` (one seeded generator per row), `GENERATION_BATCH_SIZE`.
- `encode`: the prompt checks (`check_prompts`, `context_length`), token ids of the prompts, replies' text.
- `masks`: row-masked interventions re-masked to the rows in flight.
- `decoder`: the decoding loop (`_Decoder`: prefill, step, the shared prompt prefix) and the batch's rows and cache.
- `pool`: `_generate_rows`, rows leaving and joining the batch.
- `run`: `generate`, `generate_many`, `stream_generate`.

A test that replaces `generate` patches it here (`ssn_core.metrics` imports it from here at call time).
"""

from __future__ import annotations

from ssn_core.generation.decoder import (  # noqa: F401 - bench/validation_bench.py times _Decoder's methods
    StopFn,
    _Decoder,
)
from ssn_core.generation.encode import check_prompts, context_length
from ssn_core.generation.pool import RowProgress
from ssn_core.generation.run import generate, generate_many, stream_generate
from ssn_core.generation.settings import GENERATION_BATCH_SIZE, GenerationSettings, RowSampler

__all__ = [
    "GENERATION_BATCH_SIZE",
    "GenerationSettings",
    "RowProgress",
    "RowSampler",
    "StopFn",
    "check_prompts",
    "context_length",
    "generate",
    "generate_many",
    "stream_generate",
]
