"""`_generate_rows`: every prompt's tokens through at most ``batch_size`` rows in flight (longest first, finished
rows replaced by waiting ones), or as one fixed batch; the one loop `generate`, `generate_many` and
`stream_generate` share."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence

from ssn_core._conventions import check_cancel
from ssn_core.generation import greedy_screen
from ssn_core.generation.decoder import StopFn, _Batch, _Decoder, _keep_rows, _merge, _plain_cache
from ssn_core.generation.masks import _applied, _row_masks
from ssn_core.generation.settings import GenerationSettings
from ssn_core.loading import LoadedModel
from ssn_core.packed_linear import enabled as packing_enabled
from ssn_core.packed_linear import pack_rows, packed_linears, packing_kernel, weight_left_products

RowProgress = Callable[[int, int], None]  # (replies finished, replies in all)


# A finished row stays in the batch (fed a pad token) until this share of the batch has finished. A decoding step
# costs about the same for 12 rows as for 16 (it streams every weight once), while each change of the batch
# re-enters the interventions (their per-site multipliers are rebuilt on the next forward) and copies the cache:
# so rows leave a quarter at a time while others wait to take their places, and half at a time once none wait (or
# the cache cannot take new rows). A cache that cannot drop rows runs its batch to the end (leaving would only
# re-enter the interventions every step).
_LEAVE_SHARE = 1 / 4
_LEAVE_SHARE_LAST = 1 / 2

# Rows joining the batch are prefilled in length groups, each its own forward, then merged: a prefill costs per
# token, and one forward over prompts of 35 to 140 tokens (six languages of one evaluation) was 2/3 left padding. A
# group closes once it holds this many real tokens and the next row would make it more than this share padding;
# fewer tokens than that cost a forward about what a decoding step does (it streams every weight).
_PREFILL_GROUP_TOKENS = 256
_PREFILL_MAX_PADDING = 1 / 4


def _length_groups(rows: list[int], lengths: list[int]) -> list[list[int]]:
    """``rows`` (longest first) cut into runs whose left padding stays small (see `_PREFILL_GROUP_TOKENS`)."""
    order = sorted(rows, key=lambda row: -lengths[row])
    groups: list[list[int]] = [[]]
    real = 0
    for row in order:
        group = groups[-1]
        if group:
            padded = (len(group) + 1) * lengths[group[0]]
            if real >= _PREFILL_GROUP_TOKENS and padded - (real + lengths[row]) > _PREFILL_MAX_PADDING * padded:
                groups.append([])
                group, real = groups[-1], 0
        group.append(row)
        real += lengths[row]
    return groups


def _generate_rows(lm: LoadedModel, prompts: list[list[int]], settings: GenerationSettings, *, batch_size: int,
                   fixed: bool = False, interventions: Sequence = (), stop: StopFn | None = None,
                   cancel=None, halt: threading.Event | None = None,
                   progress: RowProgress | None = None,
                   on_step: Callable[[list[list[int]]], None] | None = None) -> list[list[int]]:
    """Generated tokens of every prompt. ``fixed``: all prompts as one batch that never changes (`generate`);
    otherwise at most ``batch_size`` rows in flight, prefilled longest first, finished rows replaced by waiting ones.
    ``halt`` ends quietly (a closed stream); ``cancel`` raises `Cancelled`."""
    n = len(prompts)
    masks = _row_masks(interventions, n)
    finished = [0]

    def on_finish(_row: int) -> None:
        finished[0] += 1
        if progress is not None:
            progress(finished[0], n)

    decoder = _Decoder(lm, settings, n, stop, on_finish)
    waiting = deque(range(n) if fixed else sorted(range(n), key=lambda i: -len(prompts[i])))
    capacity = n if fixed else max(1, int(batch_size))
    batch: _Batch | None = None
    prefix = None if fixed else decoder.shared_prefix(lm, prompts, interventions, masks)
    # Whether prefilled batches can be merged (plain KV caches): known from the prefix, else from the first batch.
    mergeable = not fixed and prefix is not None
    own_tokens = [len(p) - (prefix.length if prefix is not None else 0) for p in prompts]  # what a prefill runs

    def halted() -> bool:
        check_cancel(cancel, "generation was cancelled")
        return halt is not None and halt.is_set()

    # Decoding steps of this many rows run MKL's packed products (CPU, float32; see ssn_core.packed_linear), packed
    # before the first prefill. Packing after it instead was tried: it spared the first prefills re-faulting their
    # memory in one run and cost the evaluation benchmark more in two (bench/README.md, issue 17 third pass).
    # Greedy decoding reads only the argmax of the output layer: screened in bfloat16 (ssn_core.generation.
    # greedy_screen) at the row counts where that is faster, entered first so that packing leaves that layer alone
    # (its other calls run what the layer would run unscreened). Steps of fewer rows than were packed for (or of any
    # rows, where nothing was packed) run the weight-left product where it pays (the same module).
    # Where the batch is packed, the layer is packed too unless the screen beats its packed product here (on an AMD
    # EPYC oneDNN's did: bench/README.md, issue 17 eighth pass).
    rows_packed = pack_rows(min(capacity, n), settings.max_new_tokens)
    kernel = packing_kernel() if rows_packed is not None and packing_enabled() else None
    screen = (decoder.sampler is None and min(capacity, n) >= greedy_screen.MIN_ROWS
              and settings.max_new_tokens >= greedy_screen.MIN_STEPS
              and greedy_screen.may_pay(lm.model, min(capacity, n))
              and (kernel is None or rows_packed is None or greedy_screen.beats_packed(lm.model, kernel, rows_packed)))
    with (greedy_screen.screened_head(lm.model, screen),
          weight_left_products(lm.model),
          packed_linears(lm.model, rows_packed)):
        while not halted():
            if batch is not None and any(batch.done) and not fixed:
                keep = [p for p, d in enumerate(batch.done) if not d]
                if not keep:
                    batch = None
                elif hasattr(batch.cache, "batch_select_indices"):
                    _keep_rows(batch, keep)
            if waiting and (batch is None or (not fixed and len(batch.rows) < capacity and _plain_cache(batch.cache))):
                room = capacity - (0 if batch is None else len(batch.rows))
                chunk = [waiting.popleft() for _ in range(min(room, len(waiting)))]
                for group in _length_groups(chunk, own_tokens) if mergeable else [chunk]:
                    with _applied(lm, interventions, masks, group):
                        new = decoder.prefill(group, prompts, prefix)
                    batch = new if batch is None else _merge(batch, new)
                    mergeable = mergeable or (not fixed and _plain_cache(batch.cache))
                if on_step is not None:
                    on_step(decoder.tokens)
                continue
            if batch is None or all(batch.done):
                if not waiting:
                    break
                continue
            if fixed or not hasattr(batch.cache, "batch_select_indices"):
                leave_at = len(batch.rows)  # this cache cannot drop rows: run the batch to its end
            else:
                refill = bool(waiting) and _plain_cache(batch.cache)
                leave_at = max(1, int(len(batch.rows) * (_LEAVE_SHARE if refill else _LEAVE_SHARE_LAST)))
            with _applied(lm, interventions, masks, batch.rows):
                while not all(batch.done) and not halted():
                    decoder.step(batch)
                    if on_step is not None:
                        on_step(decoder.tokens)
                    if sum(batch.done) >= leave_at:
                        break
    return decoder.tokens
