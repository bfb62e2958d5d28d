"""What to train, and what the training did to the neuron sets: `resolve_target`, `ss_shift`, `load_delta_for`.

A target is a keyword over an identify result (``ss``, ``ss:LANG``, ``ms-hr``, ``ms:LANG``, ``random``) or a
neuron file; `resolve_target` turns it into a validated `NeuronSet`. `ss_shift` re-identifies with a trained
delta switched on and says how each language's MS- and SS-Neurons moved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ssn_core.delta import NeuronDelta, apply_delta
from ssn_core.errors import TrainingError
from ssn_core.neurons import NeuronSet
from ssn_core.sites import SiteMap
from ssn_core.training.data import _sites_of

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel


def resolve_target(target: str, sites: SiteMap, *, identify_dir: str | Path | None = None,
                   languages: Sequence[str] = (), seed: int = 0) -> NeuronSet:
    """The neuron set to train.

    ``ss`` union of SS(lang) over ``languages`` (the run's SS-all when none are given); ``ss:LANG`` SS(LANG);
    ``ms-hr`` the MS-Neurons of the run's high-resource languages (English by default: the paper's gradient
    mask); ``ms:LANG`` MS(LANG);
    ``random`` random neurons matched per layer and site to the ``ss`` set (seeded); anything else is a
    neuron file (.json / .safetensors).
    """
    from ssn_core.validation import random_matched

    name = target.strip()
    keyword = name in ("ss", "ms-hr", "ms:hr", "random") or name.startswith(("ss:", "ms:"))
    if not keyword:
        if not name.endswith((".json", ".safetensors")):
            raise TrainingError(f"unknown target {target!r}: use ss, ss:LANG, ms-hr, ms:LANG, random or a neuron "
                                "file (.json / .safetensors)")
        return NeuronSet.load(name, sites)
    if identify_dir is None:
        raise TrainingError(f"target {target!r} needs the identify results: pass --neurons DIR (from `ssn identify`)")
    from ssn_core.identify import IdentifyResult

    result = IdentifyResult.load(identify_dir, sites)
    ss, ms = dict(result.ss), dict(result.ms)

    def ss_union(langs: Sequence[str]) -> NeuronSet:
        if not langs and len(result.ss_all):
            return result.ss_all
        langs = [lang for lang in langs if lang in ss] if langs else sorted(ss)
        if not langs:
            raise TrainingError(f"the identify results in {identify_dir} have no SS-Neurons for "
                                f"{', '.join(languages) or 'any language'} (they have: {', '.join(sorted(ss))})")
        union = NeuronSet({}, {})
        for lang in langs:
            union = union | ss[lang]
        union.meta.update(name=f"SS({'+'.join(langs)})")
        return union

    def pick(table: dict, lang: str, what: str) -> NeuronSet:
        if lang not in table:
            raise TrainingError(
                f"the identify results have no {what} for {lang!r} (they have: {', '.join(sorted(table))})")
        return table[lang]

    if name == "ss":
        neurons = ss_union(list(languages))
    elif name.startswith("ss:"):
        neurons = pick(ss, name[3:], "SS-Neurons")
    elif name in ("ms-hr", "ms:hr"):
        hr = [lang for lang in (getattr(result, "hr", ()) or ("en",)) if lang in ms]
        if not hr:
            raise TrainingError(
                f"the identify results in {identify_dir} have no MS-Neurons of a high-resource language")
        neurons = NeuronSet({}, {})
        for lang in hr:
            neurons = neurons | ms[lang]
        neurons.meta.update(name=f"MS({'+'.join(hr)})")
    elif name.startswith("ms:"):
        neurons = pick(ms, name[3:], "MS-Neurons")
    elif name == "random":
        neurons = random_matched(ss_union(list(languages)), sites, seed=seed)
    if len(neurons) == 0:
        raise TrainingError(f"target {target!r} is empty in {identify_dir}")
    neurons.validate(sites)
    return neurons


@dataclass
class SSShift:
    """How the MS-/SS-Neurons move when the trained delta is active (re-identification under `apply_delta`)."""

    rows: list[dict]  # language, set (MS/SS), n_before, n_after, jaccard
    after: object  # the IdentifyResult computed with the delta on


def ss_shift(lm: LoadedModel, delta: NeuronDelta, prompts, languages: Sequence[str], before,
             **identify_kwargs) -> SSShift:
    """Re-identify with the delta switched on and compare each language's MS and SS sets with ``before``.

    ``before``: the IdentifyResult the target was taken from; use the same prompts and identify settings.
    """
    from ssn_core.identify import identify

    hr = identify_kwargs.pop("hr", None) or (tuple(before.hr) or ("en",))
    with apply_delta(lm, delta):
        after = identify(lm, prompts, list(languages), hr=hr, **identify_kwargs)
    rows = []
    for name, old, new in (("MS", before.ms, after.ms), ("SS", before.ss, after.ss)):
        for lang in new:
            a, b = old.get(lang, NeuronSet()), new[lang]
            rows.append({"language": lang, "set": name, "n_before": len(a), "n_after": len(b),
                         "jaccard": round(a.jaccard(b), 4)})
    return SSShift(rows=rows, after=after)


def load_delta_for(lm: LoadedModel, path: str | Path) -> NeuronDelta:
    """Load a delta file and validate it against this LoadedModel (NeuronFileError if it belongs elsewhere)."""
    return NeuronDelta.load(path, lm.model, _sites_of(lm))
