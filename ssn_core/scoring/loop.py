"""`score(lm, prompts, method, aggregate)`: the public entry point, every method's score table.

Checks the request, encodes every prompt once, batches by length (little compute spent on padding), hands each
batch to its method (`score_batch`, `ablation_batch`, or `ssn_core.attribution` / `ssn_core.direction`), and keeps
running sums per (language, label) (`_Accumulator`), so memory does not grow with the number of prompts. Under
several processes (`ssn_core.distributed`) each runs its share of the batches and the sums are added once.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from ssn_core import distributed
from ssn_core._conventions import Progress, check_cancel, input_device, pad_id
from ssn_core.errors import SSNError
from ssn_core.scoring.ablation import Triple, ablation_batch, sample_neurons
from ssn_core.scoring.batch import AGGREGATES, Aggregate, encode_prompt, make_batch
from ssn_core.scoring.forward import _check_kinds, score_batch
from ssn_core.scoring.table import METHODS, Group, ScoreTable, ScoringMethod
from ssn_core.sites import SITE_KINDS, SiteKind, SiteMap

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

# One batch's values per (layer, kind): [B, N], or (magnitude, signed) for ``activation``.
BatchResults = Mapping[tuple[int, str], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


class _Accumulator:
    """Running sums per (language, label) and (layer, kind); memory independent of the prompt count."""

    def __init__(self, sites: SiteMap, kinds: Sequence[str], groups: Sequence[Group], signed: bool):
        sizes = sites.sizes()
        self.n_layers = sites.n_layers
        self.sums = {g: {k: torch.zeros(sites.n_layers, sizes[k], dtype=torch.float64) for k in kinds} for g in groups}
        self.signed = ({g: {k: torch.zeros(sites.n_layers, sizes[k], dtype=torch.float64) for k in kinds}
                        for g in groups} if signed else None)
        self.counts = {g: 0 for g in groups}

    def add(self, row_groups: Sequence[Group], results: BatchResults) -> None:
        for group in dict.fromkeys(row_groups):
            rows = torch.tensor([i for i, g in enumerate(row_groups) if g == group])
            for (layer, kind), value in results.items():
                if isinstance(value, tuple):
                    assert self.signed is not None, "(magnitude, signed) results need the signed sums"
                    magnitude, signed = value
                    self.sums[group][kind][layer] += magnitude.index_select(0, rows.to(magnitude.device)).sum(0).cpu()
                    self.signed[group][kind][layer] += signed.index_select(0, rows.to(signed.device)).sum(0).cpu()
                else:
                    self.sums[group][kind][layer] += value.index_select(0, rows.to(value.device)).sum(0).double().cpu()
            self.counts[group] += len(rows)

    def all_reduce(self) -> None:
        """Add up every process's sums and counts (`ssn_core.distributed`, one message); no-op with one process."""
        from ssn_core.distributed import all_reduce_

        groups = list(self.sums)
        counts = torch.tensor([float(self.counts[g]) for g in groups], dtype=torch.float64)
        stores = [self.sums] + ([self.signed] if self.signed is not None else [])
        all_reduce_([t for store in stores for g in groups for t in store[g].values()] + [counts],
                    "adding up the scores")
        self.counts = {g: round(c) for g, c in zip(groups, counts.tolist(), strict=True)}

    def means(self, store) -> dict[Group, dict[str, torch.Tensor]]:
        return {g: {k: (s / max(self.counts[g], 1)).float() for k, s in per_kind.items()} for g, per_kind in
                store.items() if self.counts[g] > 0}


def score(lm: LoadedModel, prompts, method: ScoringMethod = "impact", aggregate: Aggregate = "content",
          kinds: Sequence[SiteKind] = SITE_KINDS, batch_size: int = 8, template: str = "chat",
          sample: Sequence[Triple] | int | None = None, seed: int = 0,
          projections: int = 8, directions: torch.Tensor | None = None,
          progress: Progress | None = None, cancel: threading.Event | None = None) -> ScoreTable:
    """Mean importance per neuron for every (language, label) group of ``prompts``.

    ``prompts``: a PromptSet or any iterable of objects with ``.text``, ``.language`` and ``.label`` (and ``.reply``
    for ``aggregate="reply"``: `ssn_core.pairs.PromptPair`). ``sample`` (ablation only): explicit (layer, kind,
    index) triples, or a count per site (drawn with ``seed``); unsampled neurons get NaN. ``projections``: random
    projections of the ``global`` estimate. ``directions`` ([L, hidden], ``direction`` only): the refusal direction of
    every layer; by default the difference of means of these prompts' harmful and harmless groups.
    Method notes: `ssn_core.attribution` (global, attribution), `ssn_core.direction` (direction).
    """
    if method not in METHODS:
        raise SSNError(f"unknown scoring method {method!r}; expected one of {', '.join(METHODS)}")
    if aggregate not in AGGREGATES:
        raise SSNError(f"unknown aggregate {aggregate!r}; expected one of {', '.join(AGGREGATES)}")
    if method == "attribution" and aggregate != "all":
        raise SSNError("attribution sums a · ∂margin/∂a over every position (the estimate of zeroing the neuron "
                       f"everywhere); use aggregate 'all', not {aggregate!r}")
    if batch_size < 1:
        raise SSNError(f"batch size must be at least 1, got {batch_size}")
    sites: SiteMap = lm.sites
    kinds = _check_kinds(kinds, sites)
    items = list(getattr(prompts, "prompts", prompts))
    if not items:
        raise SSNError("no prompts to score")
    if aggregate == "reply":
        missing = [p for p in items if not getattr(p, "reply", None)]
        if missing:
            raise SSNError(f"aggregate 'reply' scores (prompt, reply) pairs, but {len(missing)} prompt(s) have no "
                           f"reply (e.g. {missing[0].id!r}); build them with ssn_core.pairs.build_pairs")
    if method == "direction" and directions is None:
        from ssn_core.direction import difference_of_means

        directions, _ = difference_of_means(lm, items, batch_size=batch_size, cancel=cancel)
    groups = list(dict.fromkeys((p.language, p.label) for p in items))
    device = input_device(lm.model)
    pad = pad_id(lm)
    if method == "ablation":
        if sample is None:
            raise SSNError("ablation scores one neuron at a time: give a sample (neuron triples or a count per site)")
        triples = sample_neurons(sites, kinds, sample, seed) if isinstance(sample, int) else \
            [(int(layer), str(kind), int(index)) for layer, kind, index in sample]
        for layer, kind, index in triples:
            if kind not in kinds or not 0 <= index < sites.get(layer, kind).size:
                raise SSNError(f"sampled neuron ({layer}, {kind}, {index}) is not a scored neuron of this model")
    accumulator = _Accumulator(sites, kinds, groups, signed=(method == "activation"))

    # Encode everything first (cheap), then batch by length so little compute is wasted on padding.
    encoded = [encode_prompt(lm, p.text, template, p.reply if aggregate == "reply" else None) for p in items]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i][0]))
    total = len(items)
    distributed.check_enough(total, "prompts to score")
    if progress:
        progress(0, total, f"scoring {total} prompts ({method})")

    def run_batch(b: int) -> None:  # batch b of the one-process order; under a launch each process runs its share
        check_cancel(cancel, "scoring was cancelled; nothing was written")
        start = b * batch_size
        rows = order[start:start + batch_size]
        batch = make_batch([encoded[i] for i in rows], aggregate, pad, device)
        row_groups = [(items[i].language, items[i].label) for i in rows]
        results: BatchResults
        if method == "ablation":
            values = ablation_batch(lm, batch, triples)  # [B, S]
            dense_results: dict[tuple[int, str], torch.Tensor] = {}
            for column, (layer, kind, index) in enumerate(triples):
                dense = dense_results.setdefault((layer, kind), torch.zeros(len(rows), sites.get(layer, kind).size))
                dense[:, index] = values[:, column]
            results = dense_results
        elif method == "global":
            from ssn_core.attribution import global_batch

            results = global_batch(lm, batch, kinds, projections=projections, seed=seed + start)
        elif method == "attribution":
            from ssn_core.attribution import attribution_batch

            results = attribution_batch(lm, [items[i] for i in rows], kinds)
        elif method == "direction":
            from ssn_core.direction import direction_batch

            assert directions is not None, "set above: the difference of means when none was given"
            results = direction_batch(lm, batch, kinds, directions)
        else:
            results = score_batch(lm, batch, method, kinds)
        accumulator.add(row_groups, results)

    def report(done_batches: int) -> None:
        if progress:
            done = min(total, done_batches * batch_size)
            progress(done, total, f"scored {done}/{total} prompts")

    distributed.run_batches(math.ceil(total / batch_size), run_batch, after=report, gather=False,
                            what=f"scoring prompts ({method})")
    accumulator.all_reduce()  # the running sums of every process, added once
    means = accumulator.means(accumulator.sums)
    if method == "ablation":
        sampled: dict[str, torch.Tensor] = {}
        for layer, kind, index in triples:
            mask = sampled.setdefault(kind, torch.zeros(sites.n_layers, sites.get(0, kind).size, dtype=torch.bool))
            mask[layer, index] = True
        for per_kind in means.values():
            for kind, tensor in per_kind.items():
                tensor[~sampled.get(kind, torch.zeros_like(tensor, dtype=torch.bool))] = math.nan
    meta = {"model_fingerprint": sites.fingerprint(), **sites.shape_signature(), "template": template,
            "kinds": list(kinds)}
    if method == "ablation":
        meta["sample"] = [list(t) for t in triples]
    if method == "global":
        meta["projections"] = int(projections)
    return ScoreTable(method=method, aggregate=aggregate, groups=means, counts=dict(accumulator.counts), meta=meta,
                      signed=accumulator.means(accumulator.signed) if accumulator.signed is not None else None)
