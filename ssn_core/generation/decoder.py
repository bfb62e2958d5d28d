"""The decoding loop: our own greedy (or per-row seeded) decoding over the model's forward with a KV cache (the same
calls transformers' greedy `generate` makes), whose batch can lose finished rows and take new ones; the prompt
prefix every row shares is run once per intervention group."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ssn_core._conventions import pad_id
from ssn_core.generation.encode import _decode
from ssn_core.generation.masks import _applied
from ssn_core.generation.settings import GenerationSettings, RowSampler
from ssn_core.loading import LoadedModel

StopFn = Callable[[int, str], bool]  # (row index in user_texts, the reply so far) -> True: end this reply now


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
    if not isinstance(cache, DynamicCache) or not layers:
        return False
    return all(type(layer) is DynamicLayer and isinstance(layer.keys, torch.Tensor) and layer.keys.dim() == 4
               and isinstance(layer.values, torch.Tensor) for layer in layers)


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
    cache: Any  # the model's KV cache over ``mask``'s columns
    mask: torch.Tensor  # [m, L] 1 = a real token (left padding is 0)
    positions: torch.Tensor  # [m] position id of the next token fed
    last: list[int]  # the token each row feeds next
    done: list[bool]


@dataclass
class _Prefix:
    """The prompt tokens every row starts with (system prompt, chat template), run once per group of rows that share
    the same interventions: a prompt's cached keys and values do not depend on what follows them."""

    length: int
    cache: Any  # [groups, K, length, D] per layer
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
        self.pad_id = pad_id(lm)
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
        group: list[int] = []
        representatives: list[int] = []
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
