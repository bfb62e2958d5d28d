"""`identify`: score the prompts (with pairs, the refusal direction and activation means when asked), select the
sets, and record in the manifest everything needed to reproduce the result and to hold its prompts out later."""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ssn_core import distributed
from ssn_core.errors import SSNError
from ssn_core.identify.recipes import get_recipe
from ssn_core.identify.result import MANIFEST_FORMAT, IdentifyResult
from ssn_core.identify.selection import RANKINGS, _check_p, select
from ssn_core.scoring import AGGREGATES, METHODS, Aggregate, Progress, ScoringMethod, score
from ssn_core.sites import SITE_KINDS, SiteKind, SiteMap

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel


def _versions() -> dict:
    import transformers

    from ssn_core import __version__ as ssn_version
    from ssn_core import packed_linear
    from ssn_core.generation import greedy_screen

    return {"torch": torch.__version__, "transformers": transformers.__version__, "ssn_core": ssn_version,
            "python": platform.python_version(), "packed_linear": packed_linear.enabled(),
            "packed_kernel": packed_linear.packing_kernel() if packed_linear.enabled() else None,
            "weight_left_linear": packed_linear.weight_left_enabled(), "greedy_screen": greedy_screen.enabled()}


def identify(lm: LoadedModel, prompts, languages, hr=("en",), method: ScoringMethod | None = None,
             p: float | None = None, aggregate: Aggregate | None = None, kinds: Sequence[SiteKind] | None = None,
             batch_size: int = 8, ranking: str | None = None, template: str = "chat", sample=None, seed: int = 0,
             pairs=None, own_replies: bool | None = None,
             find_direction: bool = False, projections: int = 8, activation_means: bool = False,
             recipe: str = "default", progress: Progress | None = None,
             cancel: threading.Event | None = None) -> IdentifyResult:
    """Score ``prompts`` on ``lm`` and select MS-/SS-Neurons for ``languages`` (HR languages are added).

    Settings left None come from ``recipe`` (`RECIPES`; "default" was chosen by held-out evidence). A method other
    than the recipe's takes its natural aggregate (attribution: all, else content) unless one is given.

    ``pairs``: (prompt, reply) pairs to score instead of bare prompts (`ssn_core.pairs`); with
    ``aggregate="reply"`` they are built from ``prompts`` when not given, and with ``own_replies=True`` also for
    ``attribution`` (whose harmful prompts then take the model's own refusals, harmless ones its own answers).
    ``find_direction``: also find the refusal direction (the positive control) on the HR languages' prompts; the
    ``direction`` method then scores along it. ``activation_means``: also keep every neuron's mean activation per
    group (one more forward pass; validation's additive reinforcement uses it). The manifest records the item ids
    used (``item_ids``), so that validation and evaluation can take the others.
    """
    chosen_recipe = get_recipe(recipe)
    given = [k for k, v in (("method", method), ("aggregate", aggregate), ("ranking", ranking), ("p", p),
                            ("kinds", kinds)) if v is not None]
    if aggregate is None:
        aggregate = chosen_recipe.aggregate if method in (None, chosen_recipe.method) else (
            "all" if method == "attribution" else "content")
    method = method or chosen_recipe.method
    ranking = ranking or chosen_recipe.ranking
    p = chosen_recipe.p if p is None else p
    kinds = chosen_recipe.kinds if kinds is None else kinds
    if own_replies is None:
        own_replies = chosen_recipe.own_replies
    if method == "direction":
        kinds = tuple(k for k in kinds if k not in ("attn_q", "attn_k")) if "kinds" not in given else kinds
    p = _check_p(p)
    if method not in METHODS:
        raise SSNError(f"unknown scoring method {method!r}; expected one of {', '.join(METHODS)}")
    if aggregate not in AGGREGATES:
        raise SSNError(f"unknown aggregate {aggregate!r}; expected one of {', '.join(AGGREGATES)}")
    if ranking not in RANKINGS:
        raise SSNError(f"unknown ranking {ranking!r}; expected one of {', '.join(RANKINGS)}")
    if isinstance(languages, str):
        languages = [lang.strip() for lang in languages.split(",") if lang.strip()]
    hr = (hr,) if isinstance(hr, str) else tuple(hr)
    if not hr:
        raise SSNError("at least one high-resource (HR) language is needed to define SS-Neurons")
    kinds = tuple(kinds)
    for kind in kinds:
        if kind not in SITE_KINDS:
            raise SSNError(f"unknown site kind {kind!r}; expected some of {', '.join(SITE_KINDS)}")
    all_languages = list(dict.fromkeys([*hr, *languages]))
    items = list(getattr(prompts, "prompts", prompts))
    for lang in all_languages:
        for label in ("harmful", "harmless"):
            if not any(x.language == lang and x.label == label for x in items):
                raise SSNError(f"language {lang} has no {label} prompts; MS-Neurons contrast harmful with harmless "
                               "prompts of the same language")
    chosen = [x for x in items if x.language in all_languages]
    data_hash = prompts.select(all_languages).content_hash() if hasattr(prompts, "select") else None
    start = time.perf_counter()
    if pairs is None and (aggregate == "reply" or (method == "attribution" and own_replies)):
        from ssn_core.pairs import build_pairs

        pairs = build_pairs(lm, chosen, batch_size=batch_size, seed=seed, progress=progress, cancel=cancel)
    if pairs is not None:
        pairs = [x for x in pairs if x.language in all_languages]
    pair_seconds = time.perf_counter() - start
    direction = None
    if find_direction or method == "direction":
        from ssn_core.direction import find_refusal_direction

        direction = find_refusal_direction(lm, [x for x in chosen if x.language in hr], list(hr),
                                           batch_size=batch_size, progress=progress, cancel=cancel)
    direction_seconds = time.perf_counter() - start - pair_seconds
    table = score(lm, pairs if pairs is not None else chosen, method=method, aggregate=aggregate, kinds=kinds,
                  batch_size=batch_size, template=template, sample=sample, seed=seed, projections=projections,
                  directions=direction.directions if direction is not None else None, progress=progress,
                  cancel=cancel)
    score_seconds = time.perf_counter() - start - pair_seconds - direction_seconds
    activations = None
    if activation_means:
        activations = table if method == "activation" and aggregate == "all" else score(
            lm, chosen, method="activation", aggregate="all", kinds=kinds, batch_size=batch_size, template=template,
            progress=progress, cancel=cancel)
    sites: SiteMap = lm.sites
    summary = getattr(lm, "summary", None)
    model_name = getattr(summary, "name", None) or type(lm.model).__name__
    set_meta = {"p": p, "data_hash": data_hash, "model_name": model_name}
    selected = select(table, all_languages, hr, p, ranking, sites, set_meta)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "model_name": model_name,
        "model_source": getattr(summary, "source", None),
        "model_fingerprint": sites.fingerprint(),
        **sites.shape_signature(),
        "data_hash": data_hash,
        "prompt_source": getattr(prompts, "source", None),
        "method": method,
        "aggregate": aggregate,
        "template": template,
        "ranking": ranking,
        "kinds": list(table.kinds),
        "p": p,
        "seed": seed,
        "hr": list(hr),
        "languages": all_languages,
        "prompt_counts": {f"{lang}/{label}": n for (lang, label), n in table.counts.items()},
        "item_ids": sorted({x.id for x in chosen}),
        "replies": None if pairs is None else {
            "own": sum(x.source == "own" for x in pairs), "template": sum(x.source == "template" for x in pairs)},
        "projections": projections if method == "global" else None,
        "direction_layer": None if direction is None else direction.layer,
        "recipe": {"name": chosen_recipe.name, "note": chosen_recipe.note, "overridden": given},
        "timing": {"score_seconds": round(score_seconds, 3), "prompts": len(chosen),
                   "prompts_per_second": round(len(chosen) / max(score_seconds, 1e-9), 3),
                   "pair_seconds": round(pair_seconds, 3), "direction_seconds": round(direction_seconds, 3)},
        "versions": _versions(),
        "processes": distributed.world().size,  # > 1 under accelerate launch: the prompts were shared
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return IdentifyResult(scores=table, manifest=manifest, direction=direction, pairs=pairs, activations=activations,
                          **selected)
