"""The parallel safety data: harmful prompts paired with refusals, a retain set, and the train / held-out split.

Harmful prompts of the chosen languages are paired with refusal templates of the same language (phrasing picked
deterministically from seed and item id), plus a *retain* set of harmless prompts paired with the base model's
own greedy replies (self-distillation), so that the model does not learn to refuse everything. Items are split
into train / held-out by item id, so that the same request in another language never leaks from train into
evaluation. `SafetyData` is saved as JSON with the fingerprint of the model whose replies it holds, so other
targets and baselines can train on exactly the same data (``--data``) and another model's file is refused.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ssn_core.errors import PromptSetError, TrainingError
from ssn_core.io import read_json
from ssn_core.pairs import own_replies, pick_template
from ssn_core.sites import SiteMap
from ssn_core.training.results import TrainProgress

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

SAFETY_DATA_FORMAT = "ssn-lab/safety-data"


@dataclass(frozen=True)
class TrainExample:
    item_id: str  # the parallel item (same id in every language)
    language: str
    kind: str  # "refusal" (harmful prompt -> refusal) | "retain" (harmless prompt -> base model's own reply)
    user_text: str
    reply: str


@dataclass
class SafetyData:
    """Train and held-out examples, and the held-out prompts used for generation-based evaluation."""

    train: list[TrainExample]
    heldout: list[TrainExample]
    languages: list[str]
    heldout_ids: list[str]
    data_hash: str

    def counts(self) -> dict:
        def count(items):
            out: dict[str, int] = {}
            for ex in items:
                out[f"{ex.kind}:{ex.language}"] = out.get(f"{ex.kind}:{ex.language}", 0) + 1
            return out

        return {"train": count(self.train), "heldout": count(self.heldout)}

    def save(self, path: str | Path, lm: LoadedModel | None = None) -> Path:
        """Write the set as JSON (atomically), so other targets and baselines can train on exactly the same data.

        The retain replies are the base model's own, so the file records which model produced them.
        """
        from ssn_core.io import atomic_write_json

        path = Path(path)
        atomic_write_json(path, {
            "format": SAFETY_DATA_FORMAT, "version": 1, "data_hash": self.data_hash, "languages": self.languages,
            "heldout_ids": self.heldout_ids,
            "model_fingerprint": _sites_of(lm).fingerprint() if lm is not None else None,
            "model_name": _model_name(lm) if lm is not None else None, "counts": self.counts(),
            "train": [asdict(ex) for ex in self.train], "heldout": [asdict(ex) for ex in self.heldout],
        })
        return path

    @classmethod
    def load(cls, path: str | Path, sites: SiteMap | None = None) -> SafetyData:
        """Read a set written by ``save``; with ``sites``, refuse one whose retain replies came from another model."""
        path = Path(path)
        if not path.is_file():
            raise PromptSetError(f"safety data file not found: {path}")
        data = read_json(path, PromptSetError)
        if not isinstance(data, dict) or data.get("format") != SAFETY_DATA_FORMAT:
            raise PromptSetError(f"{path} is not an SSN Lab safety data file (missing format {SAFETY_DATA_FORMAT!r}; "
                                 "`ssn train --out DIR` writes DIR/safety_data.json)")
        recorded = data.get("model_fingerprint")
        if sites is not None and recorded and recorded != sites.fingerprint():
            raise PromptSetError(f"{path} was built with another model ({data.get('model_name') or recorded}); its "
                                 "retain replies are that model's own. Build the data again for this model")
        try:
            train = [TrainExample(**ex) for ex in data["train"]]
            heldout = [TrainExample(**ex) for ex in data["heldout"]]
            languages = [str(lang) for lang in data["languages"]]
            heldout_ids = [str(i) for i in data["heldout_ids"]]
            data_hash = str(data["data_hash"])
        except (KeyError, TypeError) as exc:
            raise PromptSetError(f"{path}: malformed safety data ({exc!r})") from None
        if not train:
            raise PromptSetError(f"{path} has no training examples")
        leaked = {ex.item_id for ex in train} & set(heldout_ids)
        if leaked:
            raise PromptSetError(
                f"{path}: {len(leaked)} held-out item id(s) also appear in train (e.g. {min(leaked)!r})")
        return cls(train=train, heldout=heldout, languages=languages, heldout_ids=heldout_ids, data_hash=data_hash)


def split_ids(ids: Sequence[str], heldout_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Split item ids into (train, held-out), deterministically; at least one of each when there are two ids."""
    if not (isinstance(heldout_fraction, int | float) and 0 <= heldout_fraction < 1):
        raise TrainingError(f"the held-out share must be a number in [0, 1), got {heldout_fraction}")
    unique = sorted(set(ids))
    shuffled = unique[:]
    random.Random(seed).shuffle(shuffled)
    n_held = round(len(unique) * heldout_fraction)
    if len(unique) >= 2:
        n_held = min(max(n_held, 1), len(unique) - 1)
    return set(shuffled[n_held:]), set(shuffled[:n_held])


def build_safety_data(lm: LoadedModel, prompts, languages: Sequence[str], *, heldout_fraction: float = 0.25,
                      seed: int = 0, n_per_language: int | None = None, retain: bool = True,
                      retain_max_new_tokens: int = 48, templates: dict[str, list[str]] | None = None,
                      batch_size: int = 8, exclude_ids=(), extra_heldout=None,
                      progress: TrainProgress | None = None, cancel: threading.Event | None = None) -> SafetyData:
    """The parallel safety set: harmful -> refusal (same language) and harmless -> base model's own reply.

    ``prompts``: a PromptSet (or any iterable of Prompt with .id .language .label .text). Held-out items are
    chosen by item id, so a request's translations are all in train or all held out. The retain replies
    are generated once, greedily, by the *base* model (call this before any delta is active).
    ``exclude_ids``: item ids never used (those identification found the neurons on). ``extra_heldout``: harmful
    prompts of another set (e.g. MultiJail) added to the held-out evaluation only (ids prefixed with ``x:``).
    """
    from ssn_core.judges import load_refusal_templates

    languages = list(dict.fromkeys(languages))
    if not languages:
        raise PromptSetError("no training languages given")
    templates = templates if templates is not None else load_refusal_templates()
    missing = [lang for lang in languages if lang not in templates]
    if missing:
        raise PromptSetError(f"no refusal templates for language(s) {', '.join(missing)}; "
                             f"templates exist for: {', '.join(sorted(templates))}")
    excluded = {str(i) for i in exclude_ids}
    items = [p for p in prompts if p.language in languages and p.label in ("harmful", "harmless")
             and p.id not in excluded]
    harmful = [p for p in items if p.label == "harmful"]
    harmless = [p for p in items if p.label == "harmless"] if retain else []
    if n_per_language is not None:
        harmful = _limit_ids(harmful, n_per_language)
        harmless = _limit_ids(harmless, n_per_language)
    for lang in languages:
        if not any(p.language == lang for p in harmful):
            raise PromptSetError(f"the prompt set has no harmful prompts in {lang!r}")
    train_ids, held_ids = split_ids([p.id for p in harmful], heldout_fraction, seed)
    train_ids_s, held_ids_s = split_ids([p.id for p in harmless], heldout_fraction, seed + 1)
    train_ids |= train_ids_s
    held_ids |= held_ids_s

    examples: list[TrainExample] = [
        TrainExample(p.id, p.language, "refusal", p.text, pick_template(templates[p.language], seed, p.id, p.language))
        for p in harmful
    ]
    if harmless:
        if progress is not None:
            progress(0, len(harmless), {"phase": "retain replies"})

        def retain_progress(done: int, total: int, message: str) -> None:
            if progress is not None:
                progress(done, total, {"phase": "retain replies"})

        replies = own_replies(lm, [p.text for p in harmless], max_new_tokens=retain_max_new_tokens,
                              batch_size=batch_size, progress=retain_progress, cancel=cancel, what="retain replies")
        examples += [TrainExample(p.id, p.language, "retain", p.text, reply.strip() or ".")
                     for p, reply in zip(harmless, replies, strict=True)]
    train = [ex for ex in examples if ex.item_id in train_ids]
    heldout = [ex for ex in examples if ex.item_id in held_ids]
    for p in extra_heldout or ():
        if p.label == "harmful" and p.language in languages:
            item = f"x:{p.id}"
            heldout.append(TrainExample(item, p.language, "refusal", p.text,
                                        pick_template(templates[p.language], seed, item, p.language)))
            held_ids.add(item)
            examples.append(heldout[-1])
    if not train:
        raise PromptSetError("no training items left after the held-out split; add prompts or lower the held-out share")
    digest = hashlib.sha256(json.dumps([asdict(ex) for ex in examples], ensure_ascii=False).encode()).hexdigest()
    return SafetyData(train=train, heldout=heldout, languages=languages, heldout_ids=sorted(held_ids),
                      data_hash=digest[:16])


def _limit_ids(prompts: list, n: int) -> list:
    """The first ``n`` item ids (in sorted order) in every language, so the limit keeps items parallel."""
    keep = set(sorted({p.id for p in prompts})[:n])
    return [p for p in prompts if p.id in keep]


def _sites_of(lm: LoadedModel) -> SiteMap:
    from ssn_core.interventions import resolve_sites

    return resolve_sites(lm)


def _model_name(lm: LoadedModel) -> str:
    summary = getattr(lm, "summary", None)
    for attr in ("name", "model_id", "spec"):
        value = getattr(summary, attr, None)
        if value:
            return str(value)
    return getattr(getattr(lm.model, "config", None), "_name_or_path", "") or ""
