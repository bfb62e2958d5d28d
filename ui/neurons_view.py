"""Tables derived from an `IdentifyResult` for display: counts, overlaps, the neuron table."""

from __future__ import annotations

import pandas as pd

from ssn_core.neurons import NeuronSet


def overlap_matrix(result, kind: str = "ms") -> pd.DataFrame:
    """Language × language Jaccard overlap of the MS (or SS) sets (for MS, the result's own matrix)."""
    if kind == "ms":
        return result.overlap_matrix("jaccard").astype(float)
    sets: dict[str, NeuronSet] = getattr(result, kind)
    languages = list(sets)
    return pd.DataFrame([[sets[a].jaccard(sets[b]) for b in languages] for a in languages],
                        index=languages, columns=languages)


def ss_counts(result, groups: dict[str, str] | None = None) -> pd.DataFrame:
    rows = [{"language": lang, "ss_count": len(s), "ms_count": len(result.ms.get(lang, NeuronSet())),
             "group": (groups or {}).get(lang, "")} for lang, s in result.ss.items()]
    return pd.DataFrame(rows, columns=["language", "ss_count", "ms_count", "group"])


def neuron_table(result, languages: list[str] | None = None, which: str = "ss_all") -> pd.DataFrame:
    """One row per neuron of the chosen set with its membership (and score where available) per language."""
    target: NeuronSet = result.ss_all if which == "ss_all" else (
        result.ms[which[3:]] if which.startswith("ms:") else result.ss[which[3:]])
    languages = languages or list(result.ms)
    rows = []
    for layer, kind, index in target.triples():
        row = {"layer": layer, "site": kind, "index": index}
        for lang in languages:
            row[f"MS {lang}"] = (layer, kind, index) in result.ms[lang]
        rows.append(row)
    df = pd.DataFrame(rows, columns=["layer", "site", "index"] + [f"MS {lang}" for lang in languages])
    scores = neuron_scores(result, target, languages)
    if scores is not None:
        df = df.merge(scores, on=["layer", "site", "index"], how="left")
    return df


def neuron_scores(result, target: NeuronSet, languages: list[str]) -> pd.DataFrame | None:
    """Harmful-prompt importance of each neuron per language, if the result kept its `ScoreTable`.

    ``result.scores.groups[(language, "harmful")][kind]`` is a tensor [n_layers, N].
    """
    if result.scores is None or not result.scores.groups:  # a bundle has no score table
        return None
    groups = result.scores.groups
    rows = []
    for layer, kind, index in target.triples():
        row = {"layer": layer, "site": kind, "index": index}
        for lang in languages:
            tensor = groups.get((lang, "harmful"), {}).get(kind)
            if tensor is not None:
                row[f"score {lang}"] = float(tensor[layer, index])
        rows.append(row)
    df = pd.DataFrame(rows)
    return df if len(df.columns) > 3 else None

