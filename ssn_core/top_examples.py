"""Streaming top-k activating prompts: per (language, label), the prompts on which each neuron fires most and least.

A prompt's *top* value for a neuron is its largest activation over the prompt's counted tokens, its *bottom* value
the smallest (most negative) one (``aggregate="content"``: the user's own text, as the scores count it; ``"all"``:
every token of the chat-formatted prompt).

Hooks (`ssn_core.hooks`) reduce each carrier to per-prompt statistics [B, M] inside the forward pass and merge
them into running top-k tensors [M, k] per (language, label); the activations are dropped there, so memory does
not grow with the number of prompts and `collect_top_examples` can do it for every neuron of the model at once
(``bench``: explorer-topk). Prompts are batched by group and length, so a batch mostly holds one group (one merge
per site) and little padding. For a few *explained* neurons (and a set's mean |activation|) the collector also
keeps each prompt's max / min / mean and, only while a prompt sits in a top/bottom list, its per-token
activations: never a cache of all activations. When only some layers are tracked, the forward pass stops after
the last of them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from ssn_core._conventions import Progress, check_cancel, input_device, pad_id
from ssn_core.errors import SSNError
from ssn_core.hooks import hook_sites
from ssn_core.neurons import NeuronSet, format_neuron
from ssn_core.scoring import Aggregate, EncodedBatch, _aggregate, _forward, encode_prompt, make_batch
from ssn_core.sites import NeuronSite, SiteKind, SiteMap

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

Triple = tuple[int, str, int]
Group = tuple[str, str]  # (language, label)
SiteKey = tuple[int, str]
AGGREGATES: tuple[str, ...] = ("content", "all")


def group_key(group: Group) -> str:
    return f"{group[0]}/{group[1]}"


# ---------------------------------------------------------------------------------------------------
# Streaming top-k over prompts
# ---------------------------------------------------------------------------------------------------
class _RunningTopK:
    """The k largest (or smallest) values seen so far per row: values [M, k], prompt indices [M, k] (-1 = empty)."""

    def __init__(self, m: int, k: int, largest: bool, device):
        self.largest = largest
        self.values = torch.full((m, k), -math.inf if largest else math.inf, device=device)
        self.index = torch.full((m, k), -1, dtype=torch.int32, device=device)

    def add(self, values: torch.Tensor, prompt_index: torch.Tensor) -> None:
        """values [b, M] (one column per tracked neuron), prompt_index [b]."""
        k = self.values.shape[1]
        merged = torch.cat([self.values, values.T], dim=1)  # [M, k + b]
        ids = torch.cat([self.index, prompt_index[None, :].expand(values.shape[1], -1)], dim=1)
        best = merged.topk(k, dim=1, largest=self.largest, sorted=True)
        self.values, self.index = best.values, ids.gather(1, best.indices)


class _TokenKeeper:
    """Top-k (value, prompt index, per-token activations) of one signal and group; tokens only for the kept ones."""

    def __init__(self, k: int, largest: bool):
        self.k, self.largest = k, largest
        self.kept: list[tuple[float, int, list[float]]] = []

    def offer(self, value: float, prompt: int, tokens: torch.Tensor, keep: torch.Tensor) -> None:
        """tokens [T] of this prompt's row, keep [T] the positions that count (read only when the prompt is kept)."""
        if len(self.kept) >= self.k:
            worst = self.kept[-1][0]
            if (value <= worst) if self.largest else (value >= worst):
                return
        self.kept.append((value, prompt, tokens[keep].tolist()))
        self.kept.sort(key=lambda item: (-item[0] if self.largest else item[0], item[1]))
        del self.kept[self.k:]


def _take(values: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The batch rows of one group: values [B, M] -> [b, M] (all of them when ``rows`` is None)."""
    return values if rows is None else values.index_select(0, rows.to(values.device))


class _StopForward(Exception):
    """Raised by the last hook when the layers after it are not needed."""


@dataclass
class _Batch:
    """What the hooks of one forward pass share."""

    window: slice  # the columns holding every counted token (the shared template prefix is cut off)
    pad: torch.Tensor  # [B, W, 1] True at tokens of the window that do not count
    weights: torch.Tensor  # [B, W]
    row_groups: list[tuple[Group, torch.Tensor | None, torch.Tensor]]  # group, rows (None = all), prompt indices
    tokens: dict[Triple, torch.Tensor] = field(default_factory=dict)  # explained neuron -> [B, W] on the CPU
    set_sum: torch.Tensor | None = None  # [B, W] sum of |a| over the set's neurons
    seen: int = 0


@dataclass
class TopExamples:
    """Top-k / bottom-k prompts of every tracked neuron per (language, label), from one streaming pass.

    ``top[group][(layer, kind)]`` = (values [M, k], prompt indices [M, k]) for the M neurons ``tracked[(layer,
    kind)]`` of that site (index -1 and ±inf where a group has fewer than k prompts); ``means`` [M] is the mean
    over the group's prompts of each prompt's mean activation.
    """

    k: int
    aggregate: Aggregate
    prompts: list
    groups: list[Group]
    tracked: dict[SiteKey, torch.Tensor]
    top: dict[Group, dict[SiteKey, tuple[torch.Tensor, torch.Tensor]]]
    bottom: dict[Group, dict[SiteKey, tuple[torch.Tensor, torch.Tensor]]]
    means: dict[Group, dict[SiteKey, torch.Tensor]]
    counts: dict[Group, int]

    def _row(self, neuron: Triple) -> tuple[SiteKey, int]:
        layer, kind, index = neuron
        tracked = self.tracked.get((layer, kind))
        hits = [] if tracked is None else (tracked == index).nonzero().flatten().tolist()
        if not hits:
            raise SSNError(f"{format_neuron(neuron)} was not among the neurons these examples were collected for")
        return (layer, kind), hits[0]

    def examples(self, neuron: Triple, group: Group, which: str = "top") -> list[tuple[int, float]]:
        """(prompt index, value) of the neuron's top (or bottom) prompts in ``group``, best first."""
        key, row = self._row(neuron)
        store = self.top if which == "top" else self.bottom
        if group not in store:
            return []
        values, index = store[group][key]
        return [(int(i), float(v)) for v, i in zip(values[row].tolist(), index[row].tolist(), strict=True) if i >= 0]

    def mean(self, neuron: Triple, group: Group) -> float | None:
        key, row = self._row(neuron)
        return float(self.means[group][key][row]) if group in self.means else None


class _Collector:
    """Hooks for one streaming pass: top/bottom-k tensors of the tracked neurons, per-prompt statistics and
    per-token activations of the explained neurons, and the set's mean |activation|."""

    def __init__(self, sites: SiteMap, tracked: dict[SiteKey, torch.Tensor | None], groups: list[Group], k: int,
                 n_prompts: int, explained: Sequence[Triple] = (), set_neurons: NeuronSet | None = None):
        self.sites, self.groups, self.k = sites, groups, k
        self.tracked = {key: (torch.arange(sites.get(*key).size) if idx is None else idx) for key, idx in
                        tracked.items()}
        self.select = {key: idx for key, idx in tracked.items() if idx is not None}  # None: the whole site
        self.top: dict[Group, dict[SiteKey, _RunningTopK]] = {g: {} for g in groups}
        self.bottom: dict[Group, dict[SiteKey, _RunningTopK]] = {g: {} for g in groups}
        self.sums: dict[Group, dict[SiteKey, torch.Tensor]] = {g: {} for g in groups}
        self.counts = {g: 0 for g in groups}
        self.explained = list(explained)
        self.explained_at: dict[SiteKey, list[tuple[Triple, int]]] = {}
        for neuron in self.explained:
            key = neuron[:2]
            position = int((self.tracked[key] == neuron[2]).nonzero()[0, 0])
            self.explained_at.setdefault(key, []).append((neuron, position))
        self.set_size = len(set_neurons) if set_neurons is not None else 0
        self.set_at: dict[SiteKey, torch.Tensor] = {}
        if set_neurons is not None:
            for key, indices in set_neurons.neurons.items():
                self.set_at[key] = torch.isin(self.tracked[key], indices).nonzero().flatten()
        # per explained neuron (and "set"): per-prompt max, min, mean [P]; top/bottom keepers with tokens
        signals: list = [*self.explained] + (["set"] if set_neurons is not None else [])
        self.records = {s: torch.full((3, n_prompts), math.nan) for s in signals}
        self.keepers = {(s, g, which): _TokenKeeper(k, which == "top") for s in signals for g in groups
                        for which in ("top", "bottom")}
        self.batch: _Batch | None = None

    def hook(self, site: NeuronSite, stop_after: int | None):
        key = site.key

        def fn(carrier: torch.Tensor) -> None:
            batch = self.batch
            assert batch is not None, "the site hooks run inside _stream, which sets the batch"
            values = site.read(carrier)[:, batch.window]  # [B, W, N]
            if key in self.select:
                values = values.index_select(-1, self.select[key].to(values.device))  # [B, W, M]
            high = values.masked_fill(batch.pad.to(values.device), -math.inf).amax(1).float()  # [B, M]
            low = values.masked_fill(batch.pad.to(values.device), math.inf).amin(1).float()
            mean = _aggregate(values, batch.weights).float()
            for group, rows, prompts in batch.row_groups:
                m = values.shape[-1]
                if key not in self.top[group]:
                    self.top[group][key] = _RunningTopK(m, self.k, True, values.device)
                    self.bottom[group][key] = _RunningTopK(m, self.k, False, values.device)
                    self.sums[group][key] = torch.zeros(m, device=values.device)
                prompts = prompts.to(values.device)
                self.top[group][key].add(_take(high, rows), prompts)
                self.bottom[group][key].add(_take(low, rows), prompts)
                self.sums[group][key] += _take(mean, rows).sum(0)
            for neuron, position in self.explained_at.get(key, ()):
                batch.tokens[neuron] = values[..., position].float().cpu()
            if key in self.set_at and self.set_at[key].numel():
                part = values.index_select(-1, self.set_at[key].to(values.device)).abs().float().sum(-1)  # [B, W]
                batch.set_sum = part if batch.set_sum is None else batch.set_sum + part.to(batch.set_sum.device)
            batch.seen += 1
            if stop_after is not None and batch.seen == stop_after:
                raise _StopForward

        return fn

    def after_batch(self, prompt_index: list[int], row_group: list[Group]) -> None:
        """Per-prompt statistics and token keepers of the explained neurons and of the set (CPU, small)."""
        batch = self.batch
        assert batch is not None, "called by _stream after each batch"
        keep = ~batch.pad[..., 0].cpu()  # [B, W]
        weights = batch.weights.float().cpu()
        signals: dict[Triple | str, torch.Tensor] = {neuron: tokens for neuron, tokens in batch.tokens.items()}
        if batch.set_sum is not None:
            signals["set"] = batch.set_sum.float().cpu() / max(self.set_size, 1)
        for signal, tokens in signals.items():  # tokens [B, W]
            high = tokens.masked_fill(~keep, -math.inf).amax(1)
            low = tokens.masked_fill(~keep, math.inf).amin(1)
            mean = (tokens.nan_to_num() * weights).sum(1)
            for row, (p, group) in enumerate(zip(prompt_index, row_group, strict=True)):
                self.records[signal][:, p] = torch.stack([high[row], low[row], mean[row]])
                self.keepers[(signal, group, "top")].offer(float(high[row]), p, tokens[row], keep[row])
                self.keepers[(signal, group, "bottom")].offer(float(low[row]), p, tokens[row], keep[row])
        for group in dict.fromkeys(row_group):
            self.counts[group] += sum(g == group for g in row_group)

    def result(self, prompts: list, aggregate: Aggregate) -> TopExamples:
        def done(store):
            return {g: {key: (t.values.cpu(), t.index.cpu()) for key, t in per.items()} for g, per in store.items()
                    if per}

        means = {g: {key: (s / max(self.counts[g], 1)).cpu() for key, s in per.items()} for g, per in
                 self.sums.items() if per}
        return TopExamples(k=self.k, aggregate=aggregate, prompts=prompts, groups=list(self.groups),
                           tracked=self.tracked, top=done(self.top), bottom=done(self.bottom), means=means,
                           counts=dict(self.counts))


def _tracked_sites(sites: SiteMap, neurons: NeuronSet | None, kinds: Sequence[str] | None
                   ) -> dict[SiteKey, torch.Tensor | None]:
    if neurons is not None:
        neurons.validate(sites)
        return {key: indices.clone() for key, indices in neurons.neurons.items()}
    kinds = tuple(kinds) if kinds else sites.kinds
    for kind in kinds:
        if kind not in sites.kinds:
            raise SSNError(f"this model has no {kind!r} sites")
    return {site.key: None for site in sites if site.kind in kinds}


def plan_batches(lm: LoadedModel, items: list, groups: list[Group], aggregate: Aggregate = "content",
                 template: str = "chat", batch_size: int = 8) -> list[tuple[list[int], EncodedBatch]]:
    """[(prompt indices, EncodedBatch)]: the batches a collection runs, by group and then by length (a batch mostly
    holds one group, so one merge per site, and little padding)."""
    if aggregate not in AGGREGATES:
        raise SSNError(f"unknown aggregate {aggregate!r} for examples; expected one of {', '.join(AGGREGATES)}")
    if batch_size < 1:
        raise SSNError(f"batch size must be at least 1, got {batch_size}")
    group_order = {g: i for i, g in enumerate(groups)}
    encoded = [encode_prompt(lm, p.text, template) for p in items]
    order = sorted(range(len(items)), key=lambda i: (group_order[(items[i].language, items[i].label)],
                                                     len(encoded[i][0])))
    pad = pad_id(lm)
    device = input_device(lm.model)
    return [(order[start:start + batch_size],
             make_batch([encoded[i] for i in order[start:start + batch_size]], aggregate, pad, device))
            for start in range(0, len(items), batch_size)]


def _stream(lm: LoadedModel, items: list, collector: _Collector, aggregate: Aggregate, template: str, batch_size: int,
            stop_early: bool, progress: Progress | None, cancel: threading.Event | None) -> None:
    sites: SiteMap = lm.sites
    batches = plan_batches(lm, items, collector.groups, aggregate, template, batch_size)
    keys = set(collector.tracked)
    hooked = [site for site in sites if site.key in keys]
    last_layer = max(key[0] for key in keys)
    stop_after = len(hooked) if stop_early and last_layer < sites.n_layers - 1 else None
    total, done = len(items), 0
    if progress:
        progress(0, total, f"collecting activations of {total} prompts")
    with hook_sites([(site, collector.hook(site, stop_after)) for site in hooked]):
        for rows, batch in batches:
            check_cancel(cancel, "collecting examples was cancelled; nothing was written")
            row_group = [(items[i].language, items[i].label) for i in rows]
            row_groups = []
            for group in dict.fromkeys(row_group):
                chosen = [r for r, g in enumerate(row_group) if g == group]
                prompts = torch.tensor([rows[r] for r in chosen], dtype=torch.int32)
                row_groups.append((group, None if len(chosen) == len(rows) else torch.tensor(chosen), prompts))
            counted = (batch.weights > 0).any(0).nonzero().flatten()
            window = slice(int(counted[0]), int(counted[-1]) + 1)
            weights = batch.weights[:, window]
            collector.batch = _Batch(window=window, pad=(weights <= 0)[..., None], weights=weights,
                                     row_groups=row_groups)
            try:
                with torch.no_grad():
                    _forward(lm.model, batch)
            except _StopForward:
                pass
            collector.after_batch(rows, row_group)
            done += len(rows)
            if progress:
                progress(done, total, f"collected {done}/{total} prompts")
    collector.batch = None


def _items(prompts) -> list:
    items = list(getattr(prompts, "prompts", prompts))
    if not items:
        raise SSNError("no prompts to collect examples from")
    return items


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SSNError(f"k (examples per language and label) must be a whole number >= 1, got {k!r}")
    return k


def collect_top_examples(lm: LoadedModel, prompts, k: int = 5, neurons: NeuronSet | None = None,
                         kinds: Sequence[SiteKind] | None = None, aggregate: Aggregate = "content",
                         template: str = "chat", batch_size: int = 8, progress: Progress | None = None,
                         cancel: threading.Event | None = None) -> TopExamples:
    """Top-k / bottom-k prompts per (language, label) of every neuron (of ``kinds``), or of ``neurons`` only."""
    items = _items(prompts)
    sites: SiteMap = lm.sites
    tracked = _tracked_sites(sites, neurons, kinds)
    if not tracked:
        raise SSNError("no neurons to collect examples for")
    groups = list(dict.fromkeys((p.language, p.label) for p in items))
    collector = _Collector(sites, tracked, groups, _check_k(k), len(items))
    _stream(lm, items, collector, aggregate, template, batch_size, neurons is not None, progress, cancel)
    return collector.result(items, aggregate)


# ---------------------------------------------------------------------------------------------------
# Tokens as text
# ---------------------------------------------------------------------------------------------------
def token_pieces(lm: LoadedModel, text: str, template: str = "chat", aggregate: Aggregate = "content") -> list[str]:
    """The text of each token that counts (the positions the per-token activations refer to), in order.

    Tokens are cut from the formatted prompt by their character offsets, so the pieces join to the text; a
    character split over several byte tokens belongs to the first of them (the others get "").
    """
    ids, content = encode_prompt(lm, text, template)
    positions = content if aggregate == "content" and content else list(range(len(ids)))
    formatted = lm.format_chat_with_span(text)[0] if template == "chat" else text
    try:
        encoded = lm.tokenizer(formatted, add_special_tokens=template != "chat", return_offsets_mapping=True)
        offsets = list(encoded["offset_mapping"])
        if list(encoded["input_ids"]) != list(ids):
            raise ValueError("different tokenization")
    except (NotImplementedError, KeyError, TypeError, ValueError):
        return [cast(str, lm.tokenizer.decode([ids[i]])) for i in positions]  # one sequence: one string
    pieces, cursor = [], 0
    for i in positions:
        start, end = offsets[i]
        start = max(start, cursor)
        pieces.append(formatted[start:end] if end > start else "")
        cursor = max(cursor, end)
    return pieces
