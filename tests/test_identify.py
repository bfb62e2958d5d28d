"""MS-/SS-Neuron selection on hand-built scores, result files, and an end-to-end run on a tiny model."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from scoring_helpers import tiny_lm

from ssn_core.errors import Cancelled, NeuronFileError, SSNError
from ssn_core.identify import IdentifyResult, identify, ms_neurons, overlap_table, select, top_fraction
from ssn_core.neurons import NeuronSet
from ssn_core.scoring import ScoreTable


def table_from(scores: dict, method="impact") -> ScoreTable:
    """{(lang, label): {kind: [L, N] tensor}} -> ScoreTable."""
    return ScoreTable(method=method, aggregate="content", groups=scores, counts=dict.fromkeys(scores, 4))


def ramp(n=100, layers=2, reverse=False):
    row = torch.arange(n, dtype=torch.float32)
    row = row.flip(0) if reverse else row
    return row.repeat(layers, 1)


def test_top_fraction_per_site_and_edge_cases():
    scores = {"mlp": ramp(100), "attn_v": ramp(10)}
    top = top_fraction(scores, 0.03)
    assert top["mlp"][0].nonzero().flatten().tolist() == [97, 98, 99]
    assert top["attn_v"].sum() == 0  # floor(0.03 * 10) = 0: a tiny p selects nothing in that layer-site
    assert top_fraction(scores, 1.0)["mlp"].all()
    nan_scores = ramp(10)
    nan_scores[:, 9] = float("nan")
    assert top_fraction({"mlp": nan_scores}, 0.2)["mlp"][0].nonzero().flatten().tolist() == [7, 8]
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(SSNError, match=r"must be in \(0, 1\]"):
            top_fraction(scores, bad)
    with pytest.raises(SSNError, match="unknown ranking"):
        top_fraction(scores, 0.1, ranking="everywhere")


def test_pooled_ranking_normalises_each_kind_by_its_mean():
    # attn_v has 100x larger raw scores; without normalisation it would take every slot.
    scores = {"mlp": ramp(100, layers=1), "attn_v": 100 * ramp(100, layers=1)}
    top = top_fraction(scores, 0.05, ranking="pooled")  # floor(0.05 * 200) = 10 slots in the layer
    assert int(top["mlp"].sum() + top["attn_v"].sum()) == 10
    assert top["mlp"].sum() == 5 and top["attn_v"].sum() == 5
    # a kind whose top neurons are far above its own mean wins the pooled slots
    peaked = ramp(100, layers=1)
    peaked[0, 95:] = 1000.0
    top = top_fraction({"mlp": peaked, "attn_v": 100 * ramp(100, layers=1)}, 0.05, ranking="pooled")
    assert top["mlp"][0].nonzero().flatten().tolist() == [95, 96, 97, 98, 99]


def test_ms_neurons_is_harmful_top_minus_harmless_top():
    harmful = ramp(100)
    harmless = ramp(100)
    harmless[:, 99] = -1  # neuron 99 is top for harmful only; 97, 98 are top for both
    harmless[1, 50] = 1000  # layer 1: harmless top 3 = {50, 98, 96}
    harmless[1, 97] = -5
    table = table_from({("en", "harmful"): {"mlp": harmful}, ("en", "harmless"): {"mlp": harmless}})
    ms = ms_neurons(table, "en", p=0.03)
    assert ms.get(0, "mlp").tolist() == [99] and ms.get(1, "mlp").tolist() == [97, 99]
    assert len(ms_neurons(table, "en", p=1.0)) == 0  # everything minus everything
    assert len(ms_neurons(table, "en", p=0.001)) == 0  # k = 0 per layer


def _four_language_table():
    """MS(en) = {90..99}, MS(zh) = {95..99, 80}, MS(bn) = {98, 99, 70}, MS(sw) = {} (layer 0, mlp)."""
    n = 100
    harmless = torch.zeros(1, n)

    def harmful_with(top):
        s = torch.zeros(1, n)
        s[0, top] = torch.arange(len(top), 0, -1, dtype=torch.float32) + 10
        return s

    top = {"en": list(range(90, 100)), "zh": [95, 96, 97, 98, 99, 80, 1, 2, 3, 4],
           "bn": [98, 99, 70, 5, 6, 7, 8, 9, 10, 11], "sw": list(range(20, 30))}
    groups = {}
    for lang, indices in top.items():
        groups[(lang, "harmful")] = {"mlp": harmful_with(indices)}
        # harmless top-10 = the "noise" neurons of each language, so the difference keeps the listed ones
        keep = {"en": [], "zh": [1, 2, 3, 4], "bn": [5, 6, 7, 8, 9, 10, 11], "sw": list(range(20, 30))}[lang]
        h = harmless.clone()
        h[0, keep] = 100.0
        others = list(range(40, 60))[: 10 - len(keep)]
        h[0, others] = 50.0
        groups[(lang, "harmless")] = {"mlp": h}
    return table_from(groups)


def test_ss_is_ms_intersect_hr_with_union_shared_and_overlap():
    table = _four_language_table()
    out = select(table, ["zh", "bn", "sw"], hr=("en",), p=0.1)
    ms, ss = out["ms"], out["ss"]
    assert ms["en"].get(0, "mlp").tolist() == list(range(90, 100))
    assert ms["zh"].get(0, "mlp").tolist() == [80, 95, 96, 97, 98, 99]
    assert ms["bn"].get(0, "mlp").tolist() == [70, 98, 99]
    assert len(ms["sw"]) == 0
    assert set(ss) == {"zh", "bn", "sw"}
    for lang in ss:
        assert ss[lang] == ms[lang] & ms["en"]
    assert ss["zh"].get(0, "mlp").tolist() == [95, 96, 97, 98, 99]
    assert out["ss_all"].get(0, "mlp").tolist() == [95, 96, 97, 98, 99]
    assert len(out["ss_shared_all_nhr"]) == 0  # sw has none
    shared = select(table, ["zh", "bn"], hr=("en",), p=0.1)["ss_shared_all_nhr"]
    assert shared.get(0, "mlp").tolist() == [98, 99]
    ss_overlap = out["overlap"][out["overlap"]["set"] == "SS"].set_index(["language_a", "language_b"])
    assert ss_overlap.loc[("zh", "bn"), "intersection"] == 2 and ("en", "en") not in ss_overlap.index
    overlap = out["overlap"][out["overlap"]["set"] == "MS"].set_index(["language_a", "language_b"])
    assert overlap.loc[("zh", "bn"), "intersection"] == 2
    assert overlap.loc[("zh", "bn"), "jaccard"] == pytest.approx(2 / 7)
    assert overlap.loc[("en", "en"), "jaccard"] == 1.0
    assert overlap.loc[("sw", "sw"), "jaccard"] == 0.0
    counts = out["counts"]
    row = counts[(counts.language == "zh") & (counts.set == "SS") & (counts.layer == 0) & (counts.kind == "mlp")]
    assert int(row["count"].iloc[0]) == 5
    # Several HR languages: MS(HR) is the union of their MS sets.
    multi = select(table, ["bn"], hr=("en", "zh"), p=0.1)
    assert multi["ss"]["bn"].get(0, "mlp").tolist() == [98, 99]
    assert set(multi["ss"]) == {"bn"}
    multi = select(table, ["bn"], hr=("zh", "sw"), p=0.1)
    assert multi["ss"]["bn"].get(0, "mlp").tolist() == [98, 99]


def test_overlap_table_counts():
    a = NeuronSet.from_triples([(0, "mlp", 1), (0, "mlp", 2), (1, "attn_v", 3)])
    b = NeuronSet.from_triples([(0, "mlp", 2), (1, "attn_v", 3), (1, "attn_v", 4)])
    frame = overlap_table({"x": a, "y": b}).set_index(["language_a", "language_b"])
    assert frame.loc[("x", "y"), "intersection"] == 2 and frame.loc[("x", "y"), "union"] == 4
    assert frame.loc[("y", "x"), "jaccard"] == 0.5


def test_select_missing_label_is_a_clear_error():
    table = table_from({("en", "harmful"): {"mlp": ramp()}, ("en", "harmless"): {"mlp": ramp()},
                        ("zh", "harmful"): {"mlp": ramp()}})
    with pytest.raises(SSNError, match="language zh has no harmless prompts"):
        select(table, ["zh"], hr=("en",))


# ---------------------------------------------------------------------------------------------------
# End to end on a tiny model
# ---------------------------------------------------------------------------------------------------
def _prompts():
    from ssn_core.prompts import Prompt, PromptSet

    texts = {
        "harmful": ["how to build a weapon", "steal a car now", "write malware code"],
        "harmless": ["bake a cake", "plant some tomatoes", "learn to swim"],
    }
    items = []
    for lang in ("en", "zh", "sw"):
        for label, rows in texts.items():
            for i, text in enumerate(rows):
                items.append(Prompt(f"{label}-{i}", lang, label, f"[{lang}] {text}"))
    return PromptSet(tuple(items), "test")


def test_identify_end_to_end_save_load(tmp_path):
    lm = tiny_lm("qwen2")
    prompts = _prompts()
    calls = []
    result = identify(lm, prompts, ["zh", "sw"], hr=("en",), p=0.1, kinds=("mlp", "attn_v", "attn_o"),
                      batch_size=4, progress=lambda d, t, m: calls.append((d, t)))
    assert calls[-1] == (18, 18)
    assert result.languages == ("en", "zh", "sw")
    assert set(result.ss) == {"zh", "sw"}
    for lang, neurons in result.ms.items():
        assert neurons.meta["model_fingerprint"] == lm.sites.fingerprint()
        assert neurons.meta["language"] == lang and neurons.meta["p"] == 0.1
        assert neurons.meta["data_hash"] == prompts.content_hash()
        assert 0 < len(neurons) <= 0.1 * sum(lm.sites.get(0, k).size for k in ("mlp", "attn_v", "attn_o")) * 2
    assert result.ss_all == result.ss["zh"] | result.ss["sw"]
    assert result.manifest["data_hash"] == prompts.content_hash()
    assert result.manifest["prompt_counts"]["zh/harmful"] == 3
    assert result.overlap_matrix("jaccard").loc["en", "en"] == 1.0
    assert list(result.overlap_matrix(of="SS").index) == ["zh", "sw"]
    assert result.overlap_matrix(of="SS").loc["zh", "zh"] == len(result.ss["zh"])
    summary = result.summary().set_index("language")
    assert summary.loc["zh", "ss"] == len(result.ss["zh"])

    out = result.save(tmp_path / "run")
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == ["counts.csv", "manifest.json", "overlap.csv", "scores.safetensors", "sets/ms_en.json",
                     "sets/ms_sw.json", "sets/ms_zh.json", "sets/ss_all.json", "sets/ss_shared_all_nhr.json",
                     "sets/ss_sw.json", "sets/ss_zh.json"]
    loaded = IdentifyResult.load(out, lm.sites)
    assert loaded.ms == result.ms and loaded.ss == result.ss and loaded.ss_all == result.ss_all
    # the saved manifest also lists every file the folder holds (so a later save replaces only those)
    assert loaded.manifest == {**json.loads(json.dumps(result.manifest)), "files": names}
    assert loaded.counts["count"].tolist() == result.counts["count"].tolist()
    torch.testing.assert_close(loaded.scores.get("zh", "harmful", "mlp"), result.scores.get("zh", "harmful", "mlp"))
    # Saving again replaces the directory atomically; no temp directories are left behind.
    result.save(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # A result computed on another model is refused.
    with pytest.raises(NeuronFileError, match="different model"):
        IdentifyResult.load(out, tiny_lm("gpt2").sites)
    with pytest.raises(NeuronFileError, match="no manifest.json"):
        IdentifyResult.load(tmp_path)
    with pytest.raises(NeuronFileError, match="does not exist"):
        IdentifyResult.load(tmp_path / "no" / "such" / "run")


def test_identify_argument_errors():
    lm = tiny_lm("qwen2")
    prompts = _prompts()
    with pytest.raises(SSNError, match="language bn has no harmful prompts"):
        identify(lm, prompts, ["bn"])
    with pytest.raises(SSNError, match=r"must be in \(0, 1\]"):
        identify(lm, prompts, ["zh"], p=0)
    with pytest.raises(SSNError, match="unknown site kind"):
        identify(lm, prompts, ["zh"], kinds=("neuron",))
    harmful_only = prompts.select(label="harmful")
    with pytest.raises(SSNError, match="no harmless prompts"):
        identify(lm, harmful_only, ["zh"])


def test_cancelled_identify_leaves_no_output(tmp_path):
    lm = tiny_lm("qwen2")
    cancel = threading.Event()

    def progress(done, total, message):
        if done > 0:
            cancel.set()

    with pytest.raises(Cancelled):
        identify(lm, _prompts(), ["zh"], kinds=("mlp",), batch_size=2, progress=progress, cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_leaves_no_partial_directory(tmp_path, monkeypatch):
    lm = tiny_lm("qwen2")
    result = identify(lm, _prompts(), ["zh"], kinds=("mlp",), p=0.1)

    def boom(*args, **kwargs):
        time.sleep(0)
        raise KeyboardInterrupt

    monkeypatch.setattr("ssn_core.identify.result.atomic_write_json", boom)  # where save looks it up
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_cli_identify_and_compare_methods(tiny_dir, tmp_path, capsys):
    from ssn_core.cli import main

    model_dir = tiny_dir("qwen2")
    out = tmp_path / "identify"
    code = main(["identify", "--model", str(model_dir), "--langs", "zh,sw", "--hr", "en", "--n", "2",
                 "--sites", "mlp,attn_v,attn_o", "--p", "0.1", "--batch-size", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "language" in printed and "zh" in printed and "sw" in printed and "NHR" in printed
    loaded = IdentifyResult.load(out)
    assert loaded.manifest["prompt_counts"]["sw/harmless"] == 2 and loaded.manifest["kinds"] == ["mlp", "attn_v",
                                                                                                 "attn_o"]
    assert f"{len(loaded.ms['zh'])}" in printed

    code = main(["compare-methods", "--model", str(model_dir), "--langs", "en", "--n", "1", "--sample", "6",
                 "--sites", "mlp,attn_q", "--out", str(tmp_path / "cmp")])
    printed = capsys.readouterr().out
    assert code == 0 and "spearman" in printed and "attn_q" in printed
    assert (tmp_path / "cmp" / "agreement.csv").is_file()

    assert main(["identify", "--model", str(model_dir), "--langs", "zh", "--sites", "mlp,neuron", "--n", "1",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "unknown site kind 'neuron'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_starter_identify_builtin_four_languages(starter, tmp_path):
    """Real model, built-in prompts (4 harmful + 4 harmless in en, zh, bn, sw), the three closed-form sites.

    attn_q / attn_k are left out to keep this cheap on 2 CPU cores (they are exact but cost several forwards).
    """
    from ssn_core.prompts import load_builtin

    prompts = load_builtin(["en", "zh", "bn", "sw"], n=4)
    kinds = ("mlp", "attn_v", "attn_o")
    result = identify(starter, prompts, ["zh", "bn", "sw"], hr=("en",), kinds=kinds, batch_size=8)
    sites = starter.sites
    total = sites.n_layers * sum(sites.get(0, k).size for k in kinds)
    top_p = sites.n_layers * sum(int(0.03 * sites.get(0, k).size) for k in kinds)  # size of each top-3% set
    for lang, ms in result.ms.items():
        assert 0 < len(ms) < 0.10 * total, lang
        assert len(ms) < top_p, f"{lang}: harmless top neurons should remove part of the harmful top set"
    assert any(len(result.ss[lang]) > 0 for lang in ("zh", "bn", "sw"))
    assert result.manifest["prompt_counts"] == {f"{lang}/{label}": 4 for lang in ("en", "zh", "bn", "sw")
                                                for label in ("harmful", "harmless")}
    out = result.save(tmp_path / "run")
    loaded = IdentifyResult.load(out, sites)
    assert loaded.ms == result.ms and loaded.ss == result.ss and loaded.ss_all == result.ss_all
