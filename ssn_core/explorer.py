"""Neuron explorer: what one neuron (or a set) responds to, in which languages, and what it writes.

A neuron is (layer, site kind, index), written ``L2.mlp.3814``. For a neuron and a prompt set:

- the top-k / bottom-k prompts per (language, label). A prompt's *top* value is the neuron's largest activation
  over the prompt's own tokens, its *bottom* value the smallest (most negative) one, so the highlighted token is
  where it fires most / most negatively. Tokens are those the scores use (``aggregate="content"``: the user's
  text; ``"all"``: the whole chat-formatted prompt);
- the activation distribution per (language, label): every prompt's max, min and mean over those tokens;
- the vocabulary projection of its output direction (`ssn_core.vocab`);
- its importance under every method of the given score tables, per language and label, and its rank;
- for a set: the same summaries aggregated (the set's activation at a token is the mean |activation| of its
  neurons), and which neurons are shared by which languages (MS / SS membership from an identify result).

Everything comes from one streaming pass (`ssn_core.top_examples`: running top-k per neuron, never a cache of all
activations), the weights (`ssn_core.vocab`) and the score tables given. Reports are written by
`ssn_core.explain_report` (JSON, Markdown, HTML); the app's Explorer page shows the same objects.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ssn_core.errors import SSNError
from ssn_core.neurons import NeuronSet, check_neuron, format_neuron, parse_neuron, parse_neurons
from ssn_core.sites import SiteMap

if TYPE_CHECKING:  # vocab is imported when a projection is made
    from ssn_core.loading import LoadedModel
    from ssn_core.scoring import Aggregate
    from ssn_core.vocab import VocabProjection
from ssn_core.top_examples import (
    AGGREGATES,
    Group,
    Progress,
    TopExamples,
    Triple,
    _check_k,
    _Collector,
    _items,
    _stream,
    _tracked_sites,
    collect_top_examples,
    group_key,
    token_pieces,
)

__all__ = ["AGGREGATES", "RESULT_KIND", "Example", "Explanation", "NeuronReport", "SetReport", "TopExamples",
           "check_neuron", "collect_top_examples", "explain", "format_neuron", "group_key", "importance",
           "membership", "parse_neuron", "parse_neurons", "token_pieces"]

RESULT_KIND = "ssn-lab/neuron-explanation"


def importance(tables: Sequence, neuron: Triple) -> list[dict]:
    """The neuron's score under every table (method) and (language, label), and its rank among the neurons of its
    layer and site (1 = most important; ``top_percent`` = rank / neurons × 100, compare with the top p) and among
    all neurons of its kind in every layer. NaN scores (ablation outside its sample) give None."""
    layer, kind, index = neuron
    rows = []
    for table in tables:
        for (language, label), per_kind in table.groups.items():
            scores = per_kind.get(kind)
            if scores is None:
                continue
            value = float(scores[layer, index])
            row = {"method": table.method, "aggregate": table.aggregate, "language": language, "label": label,
                   "value": None, "rank_in_layer": None, "of_layer": None, "top_percent": None,
                   "rank_in_kind": None, "of_kind": None}
            if table.signed is not None and (language, label) in table.signed:
                row["signed"] = float(table.signed[(language, label)][kind][layer, index])
            if not math.isnan(value):
                in_layer = scores[layer][~scores[layer].isnan()]
                everywhere = scores[~scores.isnan()]
                rank = 1 + int((in_layer > value).sum())
                row.update(value=value, rank_in_layer=rank, of_layer=int(in_layer.numel()),
                           top_percent=100.0 * rank / max(int(in_layer.numel()), 1),
                           rank_in_kind=1 + int((everywhere > value).sum()), of_kind=int(everywhere.numel()))
            rows.append(row)
    return rows


def membership(result, neuron: Triple) -> dict[str, dict]:
    """{language: {"ms": bool, "ss": bool | None}} from an identify result (SS is None for HR languages)."""
    if result is None:
        return {}
    return {language: {"ms": neuron in ms, "ss": (neuron in result.ss[language]) if language in result.ss else None}
            for language, ms in result.ms.items()}


def _tables(result, tables: Sequence) -> list:
    found = list(tables or ())
    scores = getattr(result, "scores", None)
    if scores is not None and all(t is not scores for t in found):
        found.insert(0, scores)
    return found


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One prompt shown for a neuron: its value, and the activation at each of its tokens."""

    prompt_id: str
    language: str
    label: str
    text: str
    value: float
    tokens: list[str]
    activations: list[float]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class NeuronReport:
    neuron: Triple
    examples: dict[str, dict[str, list[Example]]]  # "en/harmful" -> {"top": [...], "bottom": [...]}
    groups: list[dict]  # language, label, prompts, mean, mean_max, max, min
    distribution: list[dict]  # one row per prompt: prompt_id, language, label, max, min, mean
    vocabulary: VocabProjection | None  # ssn_core.vocab.VocabProjection (None with a reason in vocabulary_note)
    vocabulary_note: str
    importance: list[dict]
    membership: dict[str, dict]

    @property
    def name(self) -> str:
        return format_neuron(self.neuron)

    def to_dict(self) -> dict:
        layer, kind, index = self.neuron
        return {"neuron": self.name, "layer": layer, "kind": kind, "index": index,
                "examples": {g: {w: [e.to_dict() for e in lst] for w, lst in per.items()}
                             for g, per in self.examples.items()},
                "groups": self.groups, "distribution": self.distribution,
                "vocabulary": self.vocabulary.to_dict() if self.vocabulary is not None else None,
                "vocabulary_note": self.vocabulary_note, "importance": self.importance, "membership": self.membership}


@dataclass
class SetReport:
    name: str
    size: int
    counts: list[dict]  # layer, kind, count
    sharing: list[dict]  # languages (MS of exactly these languages), neurons
    per_language: list[dict]  # language, ms, ss, share_ms
    neurons: list[dict]  # neuron, layer, kind, index, ms_languages, ss_languages, mean <group>...
    importance: list[dict]  # method, language, label, kind, neurons, mean, median_top_percent
    examples: dict[str, dict[str, list[Example]]]
    groups: list[dict]
    distribution: list[dict]

    def to_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "examples"},
                "examples": {g: {w: [e.to_dict() for e in lst] for w, lst in per.items()}
                             for g, per in self.examples.items()}}


@dataclass
class Explanation:
    neurons: list[NeuronReport]
    set: SetReport | None
    meta: dict


def _group_rows(records: torch.Tensor, items: list, groups: list[Group]) -> tuple[list[dict], list[dict]]:
    """(summary per group, one row per prompt) from per-prompt [max, min, mean] records [3, P]."""
    distribution = [{"prompt_id": p.id, "language": p.language, "label": p.label, "max": float(records[0, i]),
                     "min": float(records[1, i]), "mean": float(records[2, i])} for i, p in enumerate(items)]
    summary = []
    for language, label in groups:
        rows = [r for r in distribution if r["language"] == language and r["label"] == label]
        means = torch.tensor([r["mean"] for r in rows])
        summary.append({"language": language, "label": label, "prompts": len(rows), "mean": float(means.mean()),
                        "std": float(means.std()) if len(rows) > 1 else 0.0,
                        "mean_max": sum(r["max"] for r in rows) / len(rows), "max": max(r["max"] for r in rows),
                        "min": min(r["min"] for r in rows)})
    return summary, distribution


def _examples(collector: _Collector, signal, items: list, lm: LoadedModel, template: str, aggregate: Aggregate,
              pieces: dict[int, list[str]]) -> dict[str, dict[str, list[Example]]]:
    out: dict[str, dict[str, list[Example]]] = {}
    for group in collector.groups:
        for which in ("top", "bottom"):
            shown = []
            for value, p, activations in collector.keepers[(signal, group, which)].kept:
                if p not in pieces:
                    pieces[p] = token_pieces(lm, items[p].text, template, aggregate)
                prompt = items[p]
                shown.append(Example(prompt.id, prompt.language, prompt.label, prompt.text, value, pieces[p],
                                     activations))
            out.setdefault(group_key(group), {})[which] = shown
    return out


def _set_report(collector: _Collector, examples: TopExamples, neuron_set: NeuronSet, name: str, result,
                tables: list, items: list, example_rows: dict) -> SetReport:
    triples = list(neuron_set.triples())
    counts = [{"layer": layer, "kind": kind, "count": n} for (layer, kind), n in neuron_set.counts().items()]
    ms = dict(getattr(result, "ms", {}) or {})
    ss = dict(getattr(result, "ss", {}) or {})
    signature: dict[tuple[str, ...], int] = {}
    rows = []
    for neuron in triples:
        ms_langs = tuple(lang for lang, s in ms.items() if neuron in s)
        signature[ms_langs] = signature.get(ms_langs, 0) + 1
        ss_langs = [lang for lang, s in ss.items() if neuron in s]
        row = {"neuron": format_neuron(neuron), "layer": neuron[0], "kind": neuron[1], "index": neuron[2],
               "ms_languages": ", ".join(ms_langs), "ss_languages": ", ".join(ss_langs)}
        for group in examples.groups:
            row[f"mean {group_key(group)}"] = examples.mean(neuron, group)
        rows.append(row)
    sharing = [{"languages": ", ".join(langs) or "(none)", "n_languages": len(langs), "neurons": n}
               for langs, n in sorted(signature.items(), key=lambda item: (-len(item[0]), -item[1]))] if ms else []
    per_language = [{"language": lang, "ms": len(s & neuron_set), "ss": len(ss[lang] & neuron_set) if lang in ss
                     else None, "share_ms": len(s & neuron_set) / max(len(neuron_set), 1)} for lang, s in ms.items()]
    aggregated = []
    for table in tables:
        for (language, label), per_kind in table.groups.items():
            for kind, indices_by_layer in _by_kind(neuron_set).items():
                scores = per_kind.get(kind)
                if scores is None:
                    continue
                values, tops = [], []
                for layer, indices in indices_by_layer:
                    layer_scores = scores[layer]
                    finite = layer_scores[~layer_scores.isnan()]
                    for value in layer_scores[indices].tolist():
                        if not math.isnan(value):
                            values.append(value)
                            tops.append(100.0 * (1 + int((finite > value).sum())) / max(int(finite.numel()), 1))
                if values:
                    aggregated.append({"method": table.method, "language": language, "label": label, "kind": kind,
                                       "neurons": len(values), "mean": sum(values) / len(values),
                                       "median_top_percent": float(torch.tensor(tops).median())})
    group_rows, distribution = _group_rows(collector.records["set"], items, collector.groups)
    return SetReport(name=name, size=len(neuron_set), counts=counts, sharing=sharing, per_language=per_language,
                     neurons=rows, importance=aggregated, examples=example_rows, groups=group_rows,
                     distribution=distribution)


def _by_kind(neuron_set: NeuronSet) -> dict[str, list[tuple[int, torch.Tensor]]]:
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for (layer, kind), indices in neuron_set.neurons.items():
        out.setdefault(kind, []).append((layer, indices))
    return out


def explain(lm: LoadedModel, prompts, neurons: Sequence[Triple] = (), neuron_set: NeuronSet | None = None, *,
            result=None, tables: Sequence = (), languages: Sequence[str] | None = None, k: int = 5,
            top_tokens: int = 20, aggregate: Aggregate = "content", template: str = "chat", batch_size: int = 8,
            set_name: str = "set", progress: Progress | None = None,
            cancel: threading.Event | None = None) -> Explanation:
    """Everything the explorer shows for ``neurons`` (and a summary of ``neuron_set``), from one streaming pass.

    ``result``: an `IdentifyResult` (MS / SS membership, and its score table); ``tables``: more `ScoreTable`s
    (other methods); ``languages``: whose scripts the vocabulary projection groups tokens by (default: the
    prompts' languages).
    """
    from ssn_core.vocab import vocabulary_projection

    sites: SiteMap = lm.sites
    neurons = list(dict.fromkeys(check_neuron(sites, (layer, kind, index)) for layer, kind, index in neurons))
    if not neurons and neuron_set is None:
        raise SSNError("nothing to explain: give a neuron (such as L2.mlp.3814) or a neuron set")
    if neuron_set is not None:
        neuron_set.validate(sites)
        if len(neuron_set) == 0:
            raise SSNError("the neuron set is empty")
    items = _items(prompts)
    _check_k(k)
    tables = _tables(result, tables)
    for table in tables:
        table.validate(sites)
    tracked_set = NeuronSet.from_triples(neurons) | (neuron_set or NeuronSet())
    groups = list(dict.fromkeys((p.language, p.label) for p in items))
    collector = _Collector(sites, _tracked_sites(sites, tracked_set, None), groups, k, len(items), neurons,
                           neuron_set)
    start = time.perf_counter()
    _stream(lm, items, collector, aggregate, template, batch_size, True, progress, cancel)
    seconds = time.perf_counter() - start
    examples = collector.result(items, aggregate)
    languages = list(languages or dict.fromkeys(p.language for p in items))
    pieces: dict[int, list[str]] = {}
    reports = []
    for neuron in neurons:
        summary, distribution = _group_rows(collector.records[neuron], items, groups)
        projection, note = vocabulary_projection(lm, neuron, top=top_tokens, languages=languages)
        reports.append(NeuronReport(
            neuron=neuron, examples=_examples(collector, neuron, items, lm, template, aggregate, pieces),
            groups=summary, distribution=distribution, vocabulary=projection, vocabulary_note=note,
            importance=importance(tables, neuron), membership=membership(result, neuron)))
    set_report = None
    if neuron_set is not None:
        set_report = _set_report(collector, examples, neuron_set, set_name, result, tables, items,
                                 _examples(collector, "set", items, lm, template, aggregate, pieces))
    model_summary = getattr(lm, "summary", None)
    meta = {"model_name": getattr(model_summary, "name", None), "model_source": getattr(model_summary, "source", None),
            "model_fingerprint": sites.fingerprint(), **sites.shape_signature(),
            "prompt_source": getattr(prompts, "source", None), "prompts": len(items),
            "prompt_counts": {group_key(g): n for g, n in collector.counts.items()}, "k": k, "aggregate": aggregate,
            "template": template, "languages": languages, "methods": [t.method for t in tables],
            "seconds": round(seconds, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return Explanation(neurons=reports, set=set_report, meta=meta)
