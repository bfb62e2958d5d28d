"""MS-Neuron and SS-Neuron selection from importance scores, the language overlap matrix, and result files.

- MS-Neurons(lang): per layer and site kind, the top p of neurons by importance on that language's
  harmful prompts, minus the top p on its harmless prompts (k = floor(p · N) per layer-site, so a tiny
  p selects nothing in a layer and p = 1 selects everything on both sides: an empty difference).
  ``ranking="pooled"`` ranks all kinds of a layer together (k = floor(p · Σ N)) after dividing each kind's
  scores by their mean, so kinds with larger raw scales do not take every slot.
- SS-Neurons(lang) = MS(lang) ∩ MS(HR) for every non-high-resource language. With several HR languages
  MS(HR) is the union of their MS sets (a neuron is "high-resource safety" if any HR language uses it).
- Also: the union of all SS sets (what the paper suppresses as "all SS-Neurons"), the neurons shared by
  the SS sets of every NHR language, and language × language overlap counts and Jaccard indices.
"""

from __future__ import annotations

import math
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ssn_core import distributed
from ssn_core.direction import RefusalDirection
from ssn_core.errors import NeuronFileError, SSNError
from ssn_core.io import atomic_write_json, atomic_write_text, read_json, writing_result_dir
from ssn_core.neurons import NeuronSet
from ssn_core.pairs import PromptPair, load_pairs, save_pairs
from ssn_core.scoring import AGGREGATES, METHODS, Progress, ScoreTable, score
from ssn_core.sites import SITE_KINDS, SiteMap

RANKINGS: tuple[str, ...] = ("per-site", "pooled", "global")
MANIFEST_FORMAT = "ssn-lab/identify-result"


# ---------------------------------------------------------------------------------------------------
# Recipes: named settings of method, aggregate, ranking, p and sites
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """A named identification setting. ``default`` was chosen by held-out evidence (README, "Which neurons");
    the others stay available by name so that results can be compared and reproduced."""

    name: str
    method: str
    aggregate: str
    ranking: str
    p: float
    kinds: tuple[str, ...]
    own_replies: bool
    note: str


RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (
    Recipe("default", "attribution", "all", "per-site", 0.01, ("mlp", "attn_q", "attn_k", "attn_v", "attn_o"), False,
           "refusal attribution (activation x gradient of the refusal margin), top 1% per layer and site"),
    Recipe("paper", "global", "reply", "per-site", 0.01, ("mlp", "attn_q", "attn_k", "attn_v", "attn_o"), True,
           "the paper's form: ΔLLM (final-output change, estimated) on (prompt, reply) pairs, top 1% per layer"),
    Recipe("plnd", "impact", "content", "per-site", 0.03, ("mlp", "attn_v", "attn_o"), False,
           "SSN Lab's first default: layer-local deactivation effect over the user's tokens, top 3% per layer"),
    Recipe("last", "impact", "last", "per-site", 0.03, ("mlp", "attn_v", "attn_o"), False,
           "layer-local deactivation effect at the last prompt token, top 3% per layer"),
    Recipe("direction", "direction", "last", "per-site", 0.01, ("mlp", "attn_v", "attn_o"), False,
           "each neuron's write along the refusal direction at the last prompt token, top 1% per layer"),
)}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise SSNError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}") from None


# ---------------------------------------------------------------------------------------------------
# Selection on score tensors
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------------
@dataclass
class IdentifyResult:
    scores: ScoreTable | None  # None for a bundle (`ssn_core.bundle`: shipped without its score table)
    ms: dict[str, NeuronSet]
    ss: dict[str, NeuronSet]
    ss_all: NeuronSet
    ss_shared_all_nhr: NeuronSet
    counts: pd.DataFrame  # language, set, layer, kind, count
    overlap: pd.DataFrame  # MS overlap of all languages and SS overlap of the NHR languages (see overlap_table)
    manifest: dict = field(default_factory=dict)
    direction: RefusalDirection | None = None  # the positive control, found on the same prompts
    pairs: list[PromptPair] | None = None  # the (prompt, reply) pairs scored, when replies were used
    activations: ScoreTable | None = None  # mean |a| and mean a per neuron and group (the additive reinforcement)

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.ms)

    @property
    def hr(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("hr", ()))

    def overlap_matrix(self, value: str = "intersection", of: str = "MS") -> pd.DataFrame:
        """Square language × language matrix of ``intersection`` counts or ``jaccard`` indices of the MS
        sets (``of="MS"``, every language) or the SS sets (``of="SS"``, NHR languages)."""
        langs = list(self.languages) if of == "MS" else list(self.ss)
        rows = self.overlap[self.overlap["set"] == of]
        return rows.pivot(index="language_a", columns="language_b", values=value).loc[langs, langs]

    def summary(self) -> pd.DataFrame:
        """One row per language: MS and SS counts (what the CLI prints)."""
        rows = []
        for lang, ms in self.ms.items():
            ss = self.ss.get(lang)
            rows.append({"language": lang, "role": "HR" if lang in self.hr else "NHR", "ms": len(ms),
                         "ss": len(ss) if ss is not None else None})
        return pd.DataFrame(rows, columns=["language", "role", "ms", "ss"]).astype({"ss": "Int64"})  # HR: <NA>

    # ----- files --------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the result folder atomically (a temp folder next to it, then one rename); an existing folder is
        only replaced when it is an earlier identify result (`ssn_core.io.check_out_dir`)."""
        with writing_result_dir(directory, MANIFEST_FORMAT) as tmp:
            self.write_files(tmp)
        return Path(directory).expanduser()

    def write_files(self, tmp: Path) -> None:
        """The result's files, written into the (temporary) folder ``tmp``; a bundle has no scores.safetensors."""
        if self.scores is not None:
            self.scores.save(tmp / "scores.safetensors")
        (tmp / "sets").mkdir()
        for lang, neurons in self.ms.items():
            neurons.save(tmp / "sets" / f"ms_{lang}.json")
        for lang, neurons in self.ss.items():
            neurons.save(tmp / "sets" / f"ss_{lang}.json")
        self.ss_all.save(tmp / "sets" / "ss_all.json")
        self.ss_shared_all_nhr.save(tmp / "sets" / "ss_shared_all_nhr.json")
        atomic_write_text(tmp / "counts.csv", self.counts.to_csv(index=False))
        atomic_write_text(tmp / "overlap.csv", self.overlap.to_csv(index=False))
        atomic_write_json(tmp / "manifest.json", self.manifest)
        if self.direction is not None:
            self.direction.save(tmp / "direction.safetensors")
        if self.activations is not None:
            self.activations.save(tmp / "activations.safetensors")
        if self.pairs is not None:
            save_pairs(tmp / "pairs.json", self.pairs, meta={"model_fingerprint": self.manifest.get(
                "model_fingerprint")})

    @classmethod
    def load(cls, directory: str | os.PathLike, sites: SiteMap | None = None) -> IdentifyResult:
        """Read a result directory; with ``sites``, check every file against the loaded model."""
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        if not directory.exists():
            raise NeuronFileError(f"{directory} does not exist (give the folder an identify run wrote with --out)")
        if not manifest_path.is_file():
            raise NeuronFileError(f"{directory} is not an SSN Lab identify result (no manifest.json)")
        manifest = read_json(manifest_path, NeuronFileError)
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise NeuronFileError(f"{manifest_path} is not an SSN Lab identify manifest")
        if sites is not None and manifest.get("model_fingerprint") not in (None, sites.fingerprint()):
            raise NeuronFileError(
                f"{directory} was computed on a different model ({manifest.get('model_name')}, fingerprint "
                f"{manifest.get('model_fingerprint')}); the loaded model has fingerprint {sites.fingerprint()}")
        scores_path = directory / "scores.safetensors"
        bundle = bool(manifest.get("bundle")) and not scores_path.is_file()  # a bundle ships without its scores
        scores = None if bundle else ScoreTable.load(scores_path, sites)
        languages = manifest.get("languages", [])
        hr = manifest.get("hr", [])
        ms = {lang: NeuronSet.load(directory / "sets" / f"ms_{lang}.json", sites) for lang in languages}
        ss = {lang: NeuronSet.load(directory / "sets" / f"ss_{lang}.json", sites) for lang in languages
              if lang not in hr}
        ss_all = NeuronSet.load(directory / "sets" / "ss_all.json", sites)
        shared_path = directory / "sets" / "ss_shared_all_nhr.json"
        shared = NeuronSet.load(shared_path, sites) if shared_path.is_file() else NeuronSet()
        try:
            counts = pd.read_csv(directory / "counts.csv")
            overlap = pd.read_csv(directory / "overlap.csv", keep_default_na=False)
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            raise NeuronFileError(f"{directory}: unreadable counts/overlap table ({exc})") from None
        for frame in (counts,):
            frame["language"] = frame["language"].astype(str)
        direction_path = directory / "direction.safetensors"
        direction = RefusalDirection.load(direction_path, sites) if direction_path.is_file() else None
        pairs_path = directory / "pairs.json"
        pairs = load_pairs(pairs_path) if pairs_path.is_file() else None
        activations_path = directory / "activations.safetensors"
        activations = ScoreTable.load(activations_path, sites) if activations_path.is_file() else None
        return cls(scores=scores, ms=ms, ss=ss, ss_all=ss_all, ss_shared_all_nhr=shared, counts=counts,
                   overlap=overlap, manifest=manifest, direction=direction, pairs=pairs, activations=activations)

    @property
    def is_bundle(self) -> bool:
        """A bundled result (`ssn_core.bundle`): sets, counts, direction and a few activation means, no scores."""
        return bool(self.manifest.get("bundle"))

    @property
    def item_ids(self) -> frozenset[str]:
        """The prompt item ids identification used (held-out evaluation must use others)."""
        return frozenset(self.manifest.get("item_ids", ()))


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


def _versions() -> dict:
    import transformers

    from ssn_core import __version__ as ssn_version

    return {"torch": torch.__version__, "transformers": transformers.__version__, "ssn_core": ssn_version,
            "python": platform.python_version()}


def identify(lm, prompts, languages, hr=("en",), method: str | None = None, p: float | None = None,
             aggregate: str | None = None, kinds=None, batch_size: int = 8, ranking: str | None = None,
             template: str = "chat", sample=None, seed: int = 0, pairs=None, own_replies: bool | None = None,
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
    if hasattr(prompts, "select"):
        data_hash = prompts.select(all_languages).content_hash()
    else:
        data_hash = None
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
