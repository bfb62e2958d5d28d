"""The Neurons page's check of fast scores against exact ablation (`ssn_core.scoring.sampled_scores`,
`rank_agreement`), on a tiny model."""

from __future__ import annotations

import math

import pytest
from scipy.stats import spearmanr

from ssn_core.prompts import load_builtin
from ssn_core.scoring import rank_agreement, sampled_scores, score
from ssn_core.testing import tiny_model


@pytest.fixture(scope="module")
def tables():
    lm = tiny_model("qwen2")
    prompts = load_builtin(["en"], n=2)
    fast = score(lm, prompts, method="impact", kinds=("mlp", "attn_v"))
    exact = score(lm, prompts.select(label="harmful"), method="ablation", kinds=("mlp", "attn_v", "attn_o"), sample=3,
                  seed=0)
    return fast, exact


def test_sampled_scores_pair_every_sampled_neuron_with_both_scores(tables):
    fast, exact = tables
    frame = sampled_scores(fast, exact, "en")
    # attn_o was sampled but the fast table has no scores for it: left out
    sampled = {kind: int((~t.isnan()).sum()) for kind, t in exact.groups[("en", "harmful")].items() if kind != "attn_o"}
    assert frame.groupby("site").size().to_dict() == sampled and sampled["mlp"] > 2
    for row in frame.itertuples():
        assert row.fast == float(fast.groups[("en", "harmful")][row.site][row.layer, row.index])
        assert row.exact == float(exact.groups[("en", "harmful")][row.site][row.layer, row.index])
        assert not math.isnan(row.exact)


def test_rank_agreement_is_the_spearman_correlation_per_kind_and_overall(tables):
    fast, exact = tables
    frame = sampled_scores(fast, exact, "en")
    table = rank_agreement(frame)
    assert list(table["site"]) == ["mlp", "attn_v", "all"]
    assert list(table["neurons"]) == [*frame.groupby("site", sort=False).size(), len(frame)]
    for row in table.itertuples():
        part = frame if row.site == "all" else frame[frame["site"] == row.site]
        assert row.spearman == pytest.approx(spearmanr(part["fast"], part["exact"]).statistic)
