"""Selection on score tensors: the top p per layer (per site, pooled over kinds, or global), MS-Neurons (harmful top
minus harmless top), SS-Neurons (MS(lang) ∩ MS(HR)), the overlap table, and `select`, all of it from a score table
(no model needed)."""

from __future__ import annotations

import math

import pandas as pd
import torch

from ssn_core.errors import SSNError
from ssn_core.neurons import NeuronSet
from ssn_core.scoring import ScoreTable
from ssn_core.sites import SiteMap

RANKINGS: tuple[str, ...] = ("per-site", "pooled", "global")


def _check_p(p: float) -> float:
    if not isinstance(p, (int, float)) or math.isnan(p) or not 0 < p <= 1:
        raise SSNError(f"p (the top fraction per layer) must be in (0, 1], got {p}")
    return float(p)


def _top_k_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask [L, N] of the k highest entries of each row (NaN ranks last; ties broken by index)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    values = torch.nan_to_num(scores.float(), nan=-math.inf)
    order = torch.argsort(-values, dim=-1, stable=True)[:, :k]
    return mask.scatter_(1, order, True)


def top_fraction(per_kind: dict[str, torch.Tensor], p: float, ranking: str = "per-site") -> dict[str, torch.Tensor]:
    """{kind: bool mask [L, N]}: the top p of neurons per layer (per site, or pooled over kinds)."""
    p = _check_p(p)
    if ranking == "per-site":
        return {kind: _top_k_rows(scores, math.floor(p * scores.shape[1])) for kind, scores in per_kind.items()}
    if ranking == "global":
        return _top_global(per_kind, p)
    if ranking != "pooled":
        raise SSNError(f"unknown ranking {ranking!r}; expected one of {', '.join(RANKINGS)}")
    kinds = list(per_kind)
    normalised = []
    for kind in kinds:
        scores = torch.nan_to_num(per_kind[kind].float(), nan=-math.inf)
        finite = torch.where(torch.isfinite(scores), scores, 0.0)
        mean = finite.sum(1, keepdim=True) / torch.isfinite(scores).sum(1, keepdim=True).clamp(min=1)
        normalised.append(scores / torch.where(mean > 0, mean, 1.0))
    pooled = torch.cat(normalised, dim=1)  # [L, Σ N]
    mask = _top_k_rows(pooled, math.floor(p * pooled.shape[1]))
    sizes = [per_kind[kind].shape[1] for kind in kinds]
    return dict(zip(kinds, torch.split(mask, sizes, dim=1), strict=True))


def _top_global(per_kind: dict[str, torch.Tensor], p: float) -> dict[str, torch.Tensor]:
    """The top p of all scored neurons of every layer and kind together, by raw score (k = floor(p · Σ L·N)).

    Meant for scores in one unit across layers and kinds (attribution: nats of refusal margin; global: the final
    hidden state's change; direction: the write along the refusal direction), where a layer that matters more
    should take more of the set.
    """
    kinds = list(per_kind)
    flat = torch.cat([torch.nan_to_num(per_kind[k].float(), nan=-math.inf).flatten() for k in kinds])  # [Σ L·N]
    k = math.floor(p * flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.argsort(-flat, stable=True)[:k]] = True
    out, offset = {}, 0
    for kind in kinds:
        shape = per_kind[kind].shape
        out[kind] = mask[offset:offset + shape.numel()].view(shape)
        offset += shape.numel()
    return out


def _mask_to_set(masks: dict[str, torch.Tensor], meta: dict) -> NeuronSet:
    neurons = {}
    for kind, mask in masks.items():
        for layer in range(mask.shape[0]):
            indices = mask[layer].nonzero().flatten()
            if indices.numel():
                neurons[(layer, kind)] = indices
    return NeuronSet(neurons, meta)


def ms_neurons(scores: ScoreTable, language: str, p: float = 0.03, ranking: str = "per-site",
               kinds: tuple[str, ...] | None = None, meta: dict | None = None) -> NeuronSet:
    """Top p by importance on harmful prompts minus top p on harmless prompts, per layer (and site)."""
    kinds = kinds or scores.kinds
    harmful = {k: scores.get(language, "harmful", k) for k in kinds}
    harmless = {k: scores.get(language, "harmless", k) for k in kinds}
    top_harmful = top_fraction(harmful, p, ranking)
    top_harmless = top_fraction(harmless, p, ranking)
    masks = {k: top_harmful[k] & ~top_harmless[k] for k in kinds}
    return _mask_to_set(masks, {"set": "MS", "language": language, "p": p, "ranking": ranking, **(meta or {})})


def ss_neurons(ms: dict[str, NeuronSet], hr: tuple[str, ...]) -> tuple[NeuronSet, dict[str, NeuronSet]]:
    """(MS(HR) = union of the HR languages' MS sets, {nhr_lang: MS(lang) ∩ MS(HR)})."""
    missing = [lang for lang in hr if lang not in ms]
    if missing:
        raise SSNError(f"high-resource language(s) {', '.join(missing)} have no MS-Neurons computed")
    ms_hr = NeuronSet()
    for lang in hr:
        ms_hr = ms_hr | ms[lang]
    ss = {}
    for lang, neurons in ms.items():
        if lang in hr:
            continue
        meta = {k: v for k, v in neurons.meta.items() if k not in ("set", "language")}
        ss[lang] = neurons.intersection(ms_hr, meta={**meta, "set": "SS", "language": lang, "hr": list(hr)})
    return ms_hr, ss


OVERLAP_COLUMNS = ["set", "language_a", "language_b", "a", "b", "intersection", "union", "jaccard"]


def overlap_table(sets: dict[str, NeuronSet], name: str = "MS") -> pd.DataFrame:
    """Long table: set, language_a, language_b, a, b, intersection, union, jaccard for every ordered pair."""
    rows = []
    for a, set_a in sets.items():
        for b, set_b in sets.items():
            inter, union = len(set_a & set_b), len(set_a | set_b)
            rows.append({"set": name, "language_a": a, "language_b": b, "a": len(set_a), "b": len(set_b),
                         "intersection": inter, "union": union, "jaccard": inter / union if union else 0.0})
    return pd.DataFrame(rows, columns=OVERLAP_COLUMNS)


def _counts_rows(name: str, language: str, neurons: NeuronSet, sites: SiteMap | None, kinds) -> list[dict]:
    counts = neurons.counts()
    n_layers = sites.n_layers if sites is not None else (max((k[0] for k in counts), default=-1) + 1)
    return [{"language": language, "set": name, "layer": layer, "kind": kind, "count": counts.get((layer, kind), 0)}
            for layer in range(n_layers) for kind in kinds]


def select(scores: ScoreTable, languages: list[str] | tuple[str, ...], hr: tuple[str, ...] = ("en",), p: float = 0.03,
           ranking: str = "per-site", sites: SiteMap | None = None, set_meta: dict | None = None) -> dict:
    """MS, SS, union, shared, counts and overlap from a score table (no model needed)."""
    p = _check_p(p)
    if ranking not in RANKINGS:
        raise SSNError(f"unknown ranking {ranking!r}; expected one of {', '.join(RANKINGS)}")
    languages = list(dict.fromkeys([*hr, *languages]))
    for lang in languages:
        for label in ("harmful", "harmless"):
            if (lang, label) not in scores.groups:
                raise SSNError(f"language {lang} has no {label} prompts; MS-Neurons contrast harmful with harmless "
                               "prompts of the same language")
    base_meta = dict(set_meta or {})
    base_meta.update(method=scores.method, aggregate=scores.aggregate)

    def finish(neurons: NeuronSet) -> NeuronSet:
        return neurons.with_model_meta(sites) if sites is not None else neurons

    ms = {lang: finish(ms_neurons(scores, lang, p, ranking, meta=base_meta)) for lang in languages}
    _, ss = ss_neurons(ms, tuple(hr))
    ss = {lang: finish(neurons) for lang, neurons in ss.items()}
    ss_all, shared = NeuronSet(), None
    for neurons in ss.values():
        ss_all = ss_all | neurons
        shared = neurons if shared is None else shared & neurons
    union_meta = {**base_meta, "p": p, "ranking": ranking, "hr": list(hr)}
    ss_all = finish(NeuronSet(ss_all.neurons, {**union_meta, "set": "SS-all", "language": "+".join(ss)}))
    shared = finish(NeuronSet((shared or NeuronSet()).neurons,
                              {**union_meta, "set": "SS-shared", "language": "&".join(ss)}))
    kinds = scores.kinds
    rows = []
    for lang in languages:
        rows += _counts_rows("MS", lang, ms[lang], sites, kinds)
        if lang in ss:
            rows += _counts_rows("SS", lang, ss[lang], sites, kinds)
    rows += _counts_rows("SS-all", "all", ss_all, sites, kinds)
    rows += _counts_rows("SS-shared", "all", shared, sites, kinds)
    counts = pd.DataFrame(rows, columns=["language", "set", "layer", "kind", "count"])
    return {"ms": ms, "ss": ss, "ss_all": ss_all, "ss_shared_all_nhr": shared, "counts": counts,
            "overlap": pd.concat([overlap_table(ms, "MS"), overlap_table(ss, "SS")], ignore_index=True)}
