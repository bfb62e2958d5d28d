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
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from contextvars import copy_context
from dataclasses import dataclass

import torch

from ssn_core.errors import Cancelled, SSNError, finite
from ssn_core.loading import LoadedModel
from ssn_core.progress import current_cancel

StopFn = Callable[[int, str], bool]  # (row index in user_texts, the reply so far) -> True: end this reply now
RowProgress = Callable[[int, int], None]  # (replies finished, replies in all)


@dataclass
class GenerationSettings:
    """Greedy by default. ``system``: see `LoadedModel.format_chat` (None = the model's default).

    ``stop_at_verdict``: in validation and evaluation, end each reply as soon as the judge's verdict on it can no
    longer change (`ssn_core.judges.MarkerJudge.settled`: a refusal marker is already in its judged window). The
    verdicts are the same as with full replies; the replies themselves are cut short, so leave it off to read them.
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    system: str | None = None
    chat: bool = True  # False: the texts are raw prompts, no chat template
    stop_at_verdict: bool = False

    def validate(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not hasattr(self.max_new_tokens, "__index__"):
            raise SSNError(f"max_new_tokens must be a whole number, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise SSNError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        finite(self.temperature, "temperature")
        finite(self.top_p, "top_p")
        if self.do_sample and self.temperature <= 0:
            raise SSNError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.do_sample and not 0 < self.top_p <= 1:
            raise SSNError(f"top_p must be in (0, 1], got {self.top_p}")


class RowSampler:
    """Temperature + top-p sampling with one seeded generator per row of the caller's list.

    A row's k-th token uses the k-th draw of its own generator, whichever rows share its batch.
    """

    def __init__(self, n_rows: int, seed: int, temperature: float, top_p: float):
        self.seed, self.temperature, self.top_p = seed, temperature, top_p
        self.generators: list[torch.Generator | None] = [None] * n_rows

    def pick(self, rows: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
        """One token per row: ``rows`` [m] indices into the caller's list, ``scores`` [m, V] float logits."""
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= self.top_p  # keep the token crossing top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        chosen = []
        for position, row in enumerate(rows):
            if self.generators[row] is None:
                self.generators[row] = torch.Generator(device=scores.device).manual_seed(self.seed)
            chosen.append(torch.multinomial(probs[position], 1, generator=self.generators[row])[0])
        return torch.stack(chosen)  # [m]


def _raise_if_cancelled(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("generation was cancelled")


def context_length(lm: LoadedModel) -> int | None:
    """The most tokens (prompt + reply) the model's position embeddings cover, from its config; None if unknown."""
    config = lm.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_texts(user_texts: list[str]) -> None:
    for i, text in enumerate(user_texts):
        if not isinstance(text, str) or not text.strip():
            where = "the prompt" if len(user_texts) == 1 else f"prompt {i + 1} of {len(user_texts)}"
            raise SSNError(f"{where} is empty; give some text to answer")


def _check_lengths(lm: LoadedModel, lengths: list[int], settings: GenerationSettings) -> None:
    limit = context_length(lm)
    if limit is None or not lengths:
        return
    worst = max(range(len(lengths)), key=lambda i: lengths[i])
    if lengths[worst] + settings.max_new_tokens > limit:
        where = "the prompt" if len(lengths) == 1 else f"prompt {worst + 1} of {len(lengths)}"
        raise SSNError(f"{where} is {lengths[worst]:,} tokens long (with the chat template); with up to "
                       f"{settings.max_new_tokens:,} new tokens that exceeds the model's context of {limit:,} tokens. "
                       "Shorten the prompt or lower max_new_tokens")


def _encode(lm: LoadedModel, user_texts: list[str], settings: GenerationSettings) -> list[list[int]]:
    """Token ids of each prompt (chat-formatted unless ``settings.chat`` is False), checked against the context."""
    settings.validate()
    _check_texts(user_texts)
    prompts = lm.prompt_texts(user_texts, chat=settings.chat, system=settings.system)
    add_special = not (settings.chat and lm.has_chat_template)  # as `LoadedModel.tokenize_prompts`
    ids = [list(row) for row in lm.tokenizer(prompts, add_special_tokens=add_special)["input_ids"]]
    _check_lengths(lm, [len(row) for row in ids], settings)
    return ids


def check_prompts(lm: LoadedModel, user_texts: list[str], settings: GenerationSettings) -> None:
    """Raise SSNError unless every text can be answered: not empty, and prompt + max_new_tokens within the model's
    context. `generate` checks each batch; callers with long jobs check all their prompts up front with this."""
    _encode(lm, user_texts, settings)


def _reply_tokens(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """Tokens of one reply up to (not including) its first stop token."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens


def _decode(lm: LoadedModel, tokens: list[int], stop_ids: list[int]) -> str:
    return lm.tokenizer.decode(_reply_tokens(tokens, stop_ids), skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------
# The decoding loop


def _pad_id(lm: LoadedModel) -> int:
    stop_ids = lm.stop_token_ids
    return lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else (stop_ids or [0])[0]


def _forward_names(model) -> tuple[str, bool]:
    """(the forward's KV-cache keyword, whether it takes ``logits_to_keep``), read from the unwrapped model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(inner.forward).parameters
    cache_name = "cache" if "cache" in parameters or "past_key_values" not in parameters else "past_key_values"
    return cache_name, "logits_to_keep" in parameters


def _plain_cache(cache) -> bool:
    """True when every layer of the cache is a plain growing [B, K, L, D] key/value pair we can pad and concatenate
    (not sliding-window, static or recurrent layers)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    return (isinstance(cache, DynamicCache) and bool(layers)
            and all(type(layer) is DynamicLayer and isinstance(layer.keys, torch.Tensor) and layer.keys.dim() == 4
                    and isinstance(layer.values, torch.Tensor) for layer in layers))


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)  # [B, T] each


def _pad_columns(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros prepended along ``dim`` up to ``width`` (left padding)."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


@dataclass
class _Batch:
    """The rows in flight. Position p of the batch answers ``rows[p]`` (an index into the caller's list)."""

    rows: list[int]
    cache: object  # the model's KV cache over ``mask``'s columns
    mask: torch.Tensor  # [m, L] 1 = a real token (left padding is 0)
    positions: torch.Tensor  # [m] position id of the next token fed
    last: list[int]  # the token each row feeds next
    done: list[bool]


@dataclass
class _Prefix:
    """The prompt tokens every row starts with (system prompt, chat template), run once per group of rows that share
    the same interventions: a prompt's cached keys and values do not depend on what follows them."""

    length: int
    cache: object  # [groups, K, length, D] per layer
    group: list[int]  # row -> its group (a row of ``cache``)


_MIN_SHARED_PREFIX = 8  # fewer common tokens than this are not worth the extra forward pass


def _common_prefix(prompts: list[list[int]]) -> int:
    """Length of the token prefix all prompts share, leaving every prompt at least one token of its own."""
    first = prompts[0]
    length = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < length and p[k] == first[k]:
            k += 1
        length = k
    return max(length, 0)


class _Decoder:
    """Greedy (or per-row seeded) decoding with a KV cache; a batch can lose finished rows and take new ones."""

    def __init__(self, lm: LoadedModel, settings: GenerationSettings, n_rows: int, stop: StopFn | None,
                 on_finish: Callable[[int], None] | None = None):
        self.lm, self.model = lm, lm.model
        self.stop_ids = lm.stop_token_ids
        self.stop_set = set(self.stop_ids)
        self.pad_id = _pad_id(lm)
        self.max_new = settings.max_new_tokens
        self.sampler = (RowSampler(n_rows, settings.seed, settings.temperature, settings.top_p)
                        if settings.do_sample else None)
        self.stop = stop
        self.on_finish = on_finish
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]  # generated tokens (the stop token included)
        self.cache_name, self.keeps_logits = _forward_names(self.model)
        self.device = lm.device

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
        kwargs = {"input_ids": ids, "attention_mask": None if bool(mask.all()) else mask, "position_ids": positions,
                  self.cache_name: cache, "use_cache": True}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.logits[:, -1], new_cache  # [m, V]

    def _accept(self, batch: _Batch, logits: torch.Tensor) -> None:
        live = [p for p, d in enumerate(batch.done) if not d]
        scores = logits[live].float() if len(live) < len(batch.done) else logits.float()
        if self.sampler is not None:
            chosen = self.sampler.pick([batch.rows[p] for p in live], scores).tolist()
        else:
            chosen = scores.argmax(dim=-1).tolist()
        for p, token in zip(live, chosen, strict=True):
            row = batch.rows[p]
            self.tokens[row].append(token)
            batch.last[p] = token
            finished = token in self.stop_set or len(self.tokens[row]) >= self.max_new
            if not finished and self.stop is not None:
                finished = bool(self.stop(row, _decode(self.lm, self.tokens[row], self.stop_ids)))
            if finished:
                batch.done[p] = True
                if self.on_finish is not None:
                    self.on_finish(row)

    def prefill(self, rows: list[int], prompts: list[list[int]], prefix: _Prefix | None = None) -> _Batch:
        """Run the prompts of ``rows`` (after ``prefix``'s cached tokens, when given) and pick each first token."""
        if prefix is None:
            ids, mask = _left_pad([prompts[r] for r in rows], self.pad_id, self.device)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as transformers' generate
            cache = None
        else:
            # [prefix | left padding | rest of the prompt]: the padding sits between the two, masked out.
            ids, rest = _left_pad([prompts[r][prefix.length:] for r in rows], self.pad_id, self.device)
            mask = torch.cat([rest.new_ones((len(rows), prefix.length)), rest], dim=1)
            positions = (prefix.length + rest.cumsum(-1) - 1).masked_fill(rest == 0, 0)
            cache = copy.deepcopy(prefix.cache)
            cache.batch_select_indices(torch.tensor([prefix.group[r] for r in rows], device=self.device))
        logits, cache = self._forward(ids, mask, positions, cache)
        batch = _Batch(rows=list(rows), cache=cache, mask=mask, positions=positions[:, -1] + 1,
                       last=[self.pad_id] * len(rows), done=[False] * len(rows))
        self._accept(batch, logits)
        return batch

    def shared_prefix(self, lm: LoadedModel, prompts: list[list[int]], interventions: Sequence,
                      masks: list[torch.Tensor | None]) -> _Prefix | None:
        """The common prompt prefix run once per intervention group, or None when too short or not cacheable."""
        length = _common_prefix(prompts)
        if length < _MIN_SHARED_PREFIX:
            return None
        signatures: dict[tuple, int] = {}
        group, representatives = [], []
        for row in range(len(prompts)):
            signature = tuple(bool(m[row]) for m in masks if m is not None)
            if signature not in signatures:
                signatures[signature] = len(representatives)
                representatives.append(row)
            group.append(signatures[signature])
        ids = torch.tensor([prompts[0][:length]] * len(representatives), dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        positions = torch.arange(length, device=self.device).expand_as(ids)
        with _applied(lm, interventions, masks, representatives):
            _, cache = self._forward(ids, mask, positions, None)
        return _Prefix(length, cache, group) if _plain_cache(cache) else None

    def step(self, batch: _Batch) -> None:
        feed = torch.tensor([self.pad_id if d else t for t, d in zip(batch.last, batch.done, strict=True)],
                            dtype=torch.long, device=self.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.mask.shape[0], 1))], dim=1)
        logits, batch.cache = self._forward(feed[:, None], batch.mask, batch.positions[:, None], batch.cache)
        batch.positions = batch.positions + 1
        self._accept(batch, logits)


def _keep_rows(batch: _Batch, keep: list[int]) -> None:
    """Drop every batch position not in ``keep`` (the cache follows), then padding columns no row needs."""
    index = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    batch.cache.batch_select_indices(index)
    batch.mask, batch.positions = batch.mask[index], batch.positions[index]
    batch.rows = [batch.rows[p] for p in keep]
    batch.last = [batch.last[p] for p in keep]
    batch.done = [batch.done[p] for p in keep]
    if _plain_cache(batch.cache):
        first = int(batch.mask.any(dim=0).long().argmax())  # first column some row attends to
        if first > 0:
            for layer in batch.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            batch.mask = batch.mask[:, first:]


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch of both (``_plain_cache`` on both): the shorter side is left-padded to the longer's columns."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        la.keys = torch.cat([_pad_columns(la.keys, width, 2), _pad_columns(lb.keys, width, 2)], dim=0)
        la.values = torch.cat([_pad_columns(la.values, width, 2), _pad_columns(lb.values, width, 2)], dim=0)
    return _Batch(rows=a.rows + b.rows, cache=a.cache,
                  mask=torch.cat([_pad_columns(a.mask, width, 1), _pad_columns(b.mask, width, 1)], dim=0),
                  positions=torch.cat([a.positions, b.positions]), last=a.last + b.last, done=a.done + b.done)


def _row_masks(interventions: Sequence, n_rows: int) -> list[torch.Tensor | None]:
    masks = []
    for intervention in interventions:
        rows = getattr(intervention, "rows", None)
        if rows is None:
            masks.append(None)
            continue
        mask = torch.as_tensor(rows, dtype=torch.bool).flatten()
        if mask.numel() != n_rows:
            raise SSNError(f"an intervention's row mask has {mask.numel()} rows but there are {n_rows} prompts")
        if not dataclasses.is_dataclass(intervention):
            raise SSNError(f"{type(intervention).__name__}: a row-masked intervention must be a dataclass with a "
                           "'rows' field")
        masks.append(mask)
    return masks


def _restricted(interventions: Sequence, masks: list[torch.Tensor | None], rows: list[int]) -> list:
    """The interventions for a batch holding ``rows``: masks cut to those rows; ones touching none of them dropped
    (an all-False mask leaves every row bit-identical, so dropping it changes nothing)."""
    out = []
    index = torch.tensor(rows, dtype=torch.long)
    for intervention, mask in zip(interventions, masks, strict=True):
        if mask is None:
            out.append(intervention)
            continue
        sub = mask[index]
        if bool(sub.any()):
            out.append(dataclasses.replace(intervention, rows=sub))
    return out


def _applied(lm: LoadedModel, interventions: Sequence, masks: list[torch.Tensor | None], rows: list[int]):
    """The context that applies ``interventions`` to a batch holding ``rows`` (nothing to enter when none)."""
    if not interventions:
        return nullcontext()
    from ssn_core.interventions import intervene

    return intervene(lm, *_restricted(interventions, masks, rows))


# A finished row stays in the batch (fed a pad token) until this share of the batch has finished. A decoding step
# costs about the same for 12 rows as for 16 (it streams every weight once), while each change of the batch
# re-enters the interventions (their per-site multipliers are rebuilt on the next forward) and copies the cache:
# so rows leave a quarter at a time while others wait to take their places, and half at a time once none wait (or
# the cache cannot take new rows). A cache that cannot drop rows runs its batch to the end (leaving would only
# re-enter the interventions every step).
_LEAVE_SHARE = 1 / 4
_LEAVE_SHARE_LAST = 1 / 2


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

    def halted() -> bool:
        _raise_if_cancelled(cancel)
        return halt is not None and halt.is_set()

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
            with _applied(lm, interventions, masks, chunk):
                new = decoder.prefill(chunk, prompts, prefix)
            batch = new if batch is None else _merge(batch, new)
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


def generate(lm: LoadedModel, user_texts: list[str], settings: GenerationSettings | None = None) -> list[str]:
    """The reply to each user text (without the prompt and special tokens), in input order, as one batch.

    Inside a `ssn_core.progress.cancel_scope` whose event gets set, generation stops after the current token
    and raises `Cancelled`.
    """
    settings = settings or GenerationSettings()
    if not user_texts:
        return []
    cancel = current_cancel()
    _raise_if_cancelled(cancel)
    prompts = _encode(lm, user_texts, settings)
    with torch.no_grad():
        tokens = _generate_rows(lm, prompts, settings, batch_size=len(prompts), fixed=True, cancel=cancel)
    return [_decode(lm, row, lm.stop_token_ids) for row in tokens]


def generate_many(lm: LoadedModel, user_texts: Sequence[str], settings: GenerationSettings | None = None, *,
                  batch_size: int = 8, interventions: Sequence = (), stop: StopFn | None = None,
                  progress: RowProgress | None = None, cancel: threading.Event | None = None) -> list[str]:
    """The reply to each user text, in input order, with at most ``batch_size`` rows in any forward pass.

    Rows go through the model longest prompt first; a row leaves as soon as it is finished and a waiting one
    takes its place, so no step is spent on padding after a short reply and few on padding before a short prompt.
    ``interventions``: applied here, to the rows their ``rows`` mask selects (a mask over ``user_texts``; None: all
    rows). Interventions entered around the call must not have row masks (the batch changes under them).
    ``stop(row, reply_so_far)``: True ends that reply early (e.g. once a judge's verdict on it is settled).
    ``progress(done, total)``: after each finished reply. ``cancel`` (or an enclosing `cancel_scope`) raises
    `Cancelled` within a token.
    """
    settings = settings or GenerationSettings()
    if batch_size < 1:
        raise SSNError("batch_size must be at least 1")
    texts = list(user_texts)
    if not texts:
        return []
    stop_events = _AnyEvent([e for e in (cancel, current_cancel()) if e is not None])
    _raise_if_cancelled(stop_events)
    prompts = _encode(lm, texts, settings)
    with torch.no_grad():
        tokens = _generate_rows(lm, prompts, settings, batch_size=batch_size, interventions=interventions,
                                stop=stop, cancel=stop_events, progress=progress)
    return [_decode(lm, row, lm.stop_token_ids) for row in tokens]


class _AnyEvent:
    """Set when any of several events is set (all that `_raise_if_cancelled` asks of an event)."""

    def __init__(self, events: list[threading.Event]):
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def stream_generate(
    lm: LoadedModel, user_texts: list[str], settings: GenerationSettings | None = None
) -> Iterator[list[str]]:
    """Yield the partial replies of every row as tokens arrive; the last yield equals `generate`'s result.

    The model runs in a worker thread started in a *copy of the caller's context*, so interventions
    entered by the caller (contextvars-scoped hooks) apply to it. Closing the iterator early stops
    the worker after its current step; so does the event of an enclosing `cancel_scope` (then `Cancelled`).
    """
    settings = settings or GenerationSettings()
    if not user_texts:
        return
    cancel = current_cancel()
    _raise_if_cancelled(cancel)
    prompts = _encode(lm, user_texts, settings)
    stop_ids = lm.stop_token_ids
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    context = copy_context()

    def work() -> None:
        try:
            with torch.no_grad():
                tokens = _generate_rows(lm, prompts, settings, batch_size=len(prompts), fixed=True, cancel=cancel,
                                        halt=stop, on_step=lambda rows: events.put(("tokens", [list(r) for r in rows])))
            events.put(("done", tokens))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            events.put(("error", exc))

    worker = threading.Thread(target=lambda: context.run(work), name="ssn-generate", daemon=True)
    worker.start()
    try:
        while True:
            kind, payload = events.get()
            if kind == "error":
                raise payload
            if kind == "done":
                _raise_if_cancelled(cancel)
                yield [_decode(lm, row, stop_ids) for row in payload]
                return
            # Hold back a trailing partial UTF-8 character ("\ufffd") until its other bytes arrive.
            yield [_decode(lm, row, stop_ids).rstrip("\ufffd") for row in payload]
    finally:
        stop.set()
        worker.join()
