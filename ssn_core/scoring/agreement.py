"""How far an identification's fast scores rank neurons like exact ablation does, on one group of prompts.

The Neurons page checks its result this way: exact ablation scores a sample of neurons (`score(...,
method="ablation", sample=...)`: NaN outside the sample) on the same prompts as the fast scores; `sampled_scores`
pairs both scores of every sampled neuron of a (language, label) group and `rank_agreement` gives their Spearman rank
correlation per site kind and over all of them. (`compare_methods` does the same for several fast methods at once,
averaged over every group, with the top-fraction overlap beside it.)
"""

from __future__ import annotations

import pandas as pd

from ssn_core.scoring.table import ScoreTable

SAMPLED_COLUMNS = ["layer", "site", "index", "fast", "exact"]


def sampled_scores(fast: ScoreTable, exact: ScoreTable, language: str, label: str = "harmful") -> pd.DataFrame:
    """One row per neuron that ``exact`` sampled in the group (language, label), with both scores.

    Kinds the fast table did not score are left out.
    """
    rows = []
    for kind, exact_scores in exact.groups[(language, label)].items():
        fast_scores = fast.groups.get((language, label), {}).get(kind)
        if fast_scores is None:
            continue
        sampled = (~exact_scores.isnan()).nonzero().tolist()  # [[layer, index], ...]
        for layer, index in sampled:
            rows.append({"layer": layer, "site": kind, "index": index, "fast": float(fast_scores[layer, index]),
                         "exact": float(exact_scores[layer, index])})
    return pd.DataFrame(rows, columns=SAMPLED_COLUMNS)


def rank_agreement(sampled: pd.DataFrame) -> pd.DataFrame:
    """Spearman rank correlation of the fast and exact scores (`sampled_scores`), per site kind and over all."""
    rows = [{"site": kind, "neurons": len(group), "spearman": group["fast"].corr(group["exact"], method="spearman")}
            for kind, group in sampled.groupby("site", sort=False)]
    rows.append({"site": "all", "neurons": len(sampled),
                 "spearman": sampled["fast"].corr(sampled["exact"], method="spearman")})
    return pd.DataFrame(rows)
