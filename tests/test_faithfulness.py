"""Dose-response faithfulness, held-out prompt selection, recipes and the refusal-direction control (tiny models)."""

from __future__ import annotations

import json

import pytest

from ssn_core.cli import RECIPE_NAMES, main
from ssn_core.errors import PromptSetError
from ssn_core.evaluation import heldout_prompt_set
from ssn_core.faithfulness import faithfulness
from ssn_core.generation import GenerationSettings
from ssn_core.identify import RECIPES, identify
from ssn_core.prompts import load_builtin
from ssn_core.testing import tiny_model
from ssn_core.validation import validate


@pytest.fixture(scope="module")
def lm():
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def found(lm):
    prompts = load_builtin(["en", "bn"], n=3)
    return identify(lm, prompts, ["bn"], method="attribution", aggregate="all", p=0.2, kinds=("mlp", "attn_o"),
                    find_direction=True, batch_size=8)


def test_faithfulness_rows_for_every_dose_set_and_control(lm, found):
    heldout, _ = heldout_prompt_set("builtin", ["en", "bn"], 2, exclude_ids=found.item_ids, harmless=False)
    assert not {p.id for p in heldout} & found.item_ids
    result = faithfulness(lm, {"attr": found.scores}, heldout, ["en", "bn"], fractions=(0.05, 0.2), seeds=(0, 1),
                          generate_at=(0.2,), settings=GenerationSettings(max_new_tokens=3),
                          direction=found.direction.unit)
    targets = [r for r in result.rows if r["condition"] == "target"]
    # en: MS only (HR); bn: MS and SS, at each dose with a non-empty set
    assert {(r["language"], r["set"]) for r in targets} <= {("en", "ms"), ("bn", "ms"), ("bn", "ss")}
    assert {r["p"] for r in targets} <= {0.05, 0.2} and any(r["p"] == 0.2 for r in targets)
    for r in targets:
        randoms = [x for x in result.rows if x["condition"] == "random" and (x["language"], x["set"], x["p"]) ==
                   (r["language"], r["set"], r["p"])]
        assert len(randoms) == 2 and all(x["n_neurons"] == r["n_neurons"] for x in randoms)
        assert (r["refusal"] is not None) == (r["p"] == 0.2)  # generated only at the asked doses
        assert r["margin_drop"] == pytest.approx(
            next(b["margin"] for b in result.rows if b["condition"] == "baseline" and b["language"] == r["language"])
            - r["margin"])
    assert {r["language"] for r in result.rows if r["condition"] == "direction"} == {"en", "bn"}
    summary = result.summary()
    assert all("margin_drop_vs_random" in row for row in summary)
    assert result.replies and {r["condition"] for r in result.replies} >= {"baseline", "suppress_ms"}
    assert result.chart().to_dict()  # a valid Vega-Lite spec


def test_heldout_prompt_set_excludes_identify_items_and_says_so():
    ids = frozenset(f"h{i:03d}" for i in range(1, 33)) | frozenset(f"s{i:03d}" for i in range(1, 33))
    prompts, note = heldout_prompt_set("builtin", ["en", "zh"], None, exclude_ids=ids)
    assert {p.id for p in prompts}.isdisjoint(ids) and len(prompts.by_language("en", "harmful")) == 32
    assert note["n_per_language"] == {"en": 32, "zh": 32} and "not used by identify" in note["source"]
    everything = frozenset(p.id for p in load_builtin(["en"]))
    with pytest.raises(PromptSetError, match="none are left"):
        heldout_prompt_set("builtin", ["en"], None, exclude_ids=everything)


def test_validate_runs_the_direction_control_and_over_refusal(lm, found):
    import dataclasses

    found = dataclasses.replace(found, ss={"bn": found.ms["bn"]}, ss_all=found.ms["bn"])  # tiny: give SS a role
    prompts, _ = heldout_prompt_set("builtin", ["en", "bn"], 2, exclude_ids=found.item_ids)
    result = validate(lm, found, prompts, ["en", "bn"], GenerationSettings(max_new_tokens=3), alphas=(2.0,),
                      seeds=(0,), batch_size=16)
    names = {(r["language"], r["label"], r["condition"]) for r in result.table}
    assert ("en", "harmful", "direction_refusal") in names and ("bn", "harmful", "direction_refusal") in names
    assert ("en", "harmless", "baseline") in names and ("bn", "harmless", "reinforce_ss") in names
    assert not any(label == "harmless" and cond.startswith("suppress") for _, label, cond in names)
    assert set(result.summary["direction"]) == {"en", "bn"}
    for comparisons in result.summary["languages"].values():
        for comparison in comparisons.values():
            paired = comparison["paired"]
            assert paired["n"] == 2 and "small" in paired["note"]  # n = 2 is said to be too small
            assert comparison["beats_random"] == (paired["ci_low"] > 0)
    sweep = result.summary["reinforce"]["bn"]
    assert sweep and "over_refusal_change" in sweep[0]
    text = result.format_table()
    assert "refusal-direction control" in text and "[harmless]" in text
    off = validate(lm, found, prompts, ["en"], GenerationSettings(max_new_tokens=2), seeds=(0,), direction=False,
                   over_refusal=False)
    assert not any(r["condition"] == "direction_refusal" or r["label"] == "harmless" for r in off.table)


def test_recipe_names_match_and_cli_identify_faithfulness(tiny_dir, tmp_path, capsys):
    assert set(RECIPE_NAMES) == set(RECIPES)
    path = tiny_dir("qwen2", seed=1)
    common = ["--model", str(path), "--device", "cpu"]
    assert main(["identify", *common, "--langs", "bn", "--n", "3", "--sites", "mlp,attn_o", "--p", "0.2",
                 "--out", str(tmp_path / "ident")]) == 0
    out = capsys.readouterr().out
    assert "recipe default: method attribution" in out and "refusal direction: layer" in out
    manifest = json.loads((tmp_path / "ident" / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "default" and set(manifest["recipe"]["overridden"]) == {"p", "sites"}
    assert manifest["item_ids"] == [f"{c}{i:03d}" for c in "hs" for i in (1, 2, 3)]
    assert (tmp_path / "ident" / "direction.safetensors").is_file()
    assert main(["faithfulness", *common, "--neurons", str(tmp_path / "ident"), "--langs", "en,bn", "--n", "2",
                 "--fractions", "0.05,0.2", "--generate-at", "0.2", "--max-new-tokens", "3",
                 "--out", str(tmp_path / "faith")]) == 0
    out = capsys.readouterr().out
    assert "refusal-direction control" in out and "builtin items not used by identify" in out
    assert {p.name for p in (tmp_path / "faith").iterdir()} >= {"curve.csv", "summary.json", "chart.html",
                                                               "manifest.json", "replies.jsonl"}
    rows = json.loads((tmp_path / "faith" / "curve.json").read_text())
    assert {r["method"] for r in rows} >= {"default", "baseline", "control"}
    assert main(["faithfulness", *common, "--neurons", str(tmp_path / "ident"), "--generate-at", "0.5",
                 "--out", str(tmp_path / "x")]) == 2
    assert "not one of --fractions" in capsys.readouterr().err
    assert main(["identify", *common, "--langs", "bn", "--method", "direction", "--sites", "mlp,attn_q",
                 "--out", str(tmp_path / "y")]) == 2
    assert "mlp,attn_v,attn_o" in capsys.readouterr().err


def test_additive_reinforcement_adds_beta_times_the_mean_harmful_activation(lm):
    import torch

    from ssn_core.hooks import hook_sites
    from ssn_core.interventions import Shift, intervene
    from ssn_core.neurons import NeuronSet
    from ssn_core.validation import shift_offsets

    prompts = load_builtin(["en", "bn"], n=2)
    found = identify(lm, prompts, ["bn"], method="attribution", aggregate="all", p=0.2, kinds=("mlp",),
                     activation_means=True, batch_size=8)
    neurons = NeuronSet({(1, "mlp"): [0, 5, 9]})
    offsets = shift_offsets(neurons, found.activations, "en", 2.0)
    mean = found.activations.signed[("en", "harmful")]["mlp"][1, [0, 5, 9]]
    assert torch.allclose(offsets[(1, "mlp")], 2.0 * mean)
    site = lm.sites.get(1, "mlp")
    seen = []
    enc = lm.tokenize_prompts(lm.prompt_texts(["hello", "bye"]))
    with torch.no_grad():
        with hook_sites({site: lambda c: seen.append(site.read(c).clone())}):
            lm.model(**enc)
        # Row 1 only: the shift is added there and nowhere else; the capture sees the carrier after the shift.
        with intervene(lm, Shift(neurons, offsets, rows=[False, True])), \
                hook_sites({site: lambda c: seen.append(site.read(c).clone())}):
            lm.model(**enc)
    before, after = seen
    assert torch.allclose(after[0], before[0])
    assert torch.allclose(after[1][..., [0, 5, 9]], before[1][..., [0, 5, 9]] + 2.0 * mean, atol=1e-5)
    assert torch.allclose(after[1][..., 1], before[1][..., 1])
    import dataclasses

    found = dataclasses.replace(found, ss={"bn": neurons}, ss_all=neurons)
    val = validate(lm, found, load_builtin(["en", "bn"], n=4).select(limit_per_language=1), ["en", "bn"],
                   GenerationSettings(max_new_tokens=2), seeds=(0,), betas=(1.0,), direction=False)
    shifted = [r for r in val.table if r["condition"].startswith("shift_")]
    assert {(r["language"], r["label"]) for r in shifted} == {("en", "harmful"), ("en", "harmless"),
                                                              ("bn", "harmful"), ("bn", "harmless")}
    assert {p["form"] for p in val.summary["reinforce"]["bn"]} == {"scale", "add"}
    assert "+1·mean" in val.format_table()


def test_validate_parts_run_only_what_was_asked(lm, found):
    import dataclasses

    from ssn_core.errors import SSNError
    from ssn_core.validation import plan_conditions

    found = dataclasses.replace(found, ss={"bn": found.ms["bn"]}, ss_all=found.ms["bn"])
    direction = found.direction.unit
    suppress, _ = plan_conditions(found, "bn", lm.sites, (2.0,), (0,), "en", direction, parts=("suppress",))
    reinforce, _ = plan_conditions(found, "bn", lm.sites, (2.0, 3.0), (0,), "en", direction, parts=("reinforce",))
    assert {c.kind for c in suppress} == {"baseline", "direction", "suppress", "random"}
    assert [c.kind for c in reinforce] == ["baseline", "reinforce", "reinforce"]
    with pytest.raises(SSNError, match="validation parts"):
        plan_conditions(found, "bn", lm.sites, parts=("everything",))


def test_reinforce_the_union_and_a_matched_random_control(lm, found):
    """``reinforce_sets=("own", "ss_all")`` reinforces a language's own SS set and the union; ``reinforce_random``
    adds, per set and scale, a random set of the same shape scaled the same way (disjoint from the set)."""
    import dataclasses

    from ssn_core.errors import SSNError
    from ssn_core.validation import plan_conditions

    union = found.ms["bn"] | found.ms["en"]
    found = dataclasses.replace(found, ss={"bn": found.ms["bn"]}, ss_all=union)
    plan, _ = plan_conditions(found, "bn", lm.sites, (2.0, 3.0), (0,), "en", parts=("reinforce",),
                              reinforce_sets=("own", "ss_all"), reinforce_random=True)
    keys = [c.key for c in plan]
    assert keys == ["baseline", "reinforce_ss@2", "reinforce_random_ss@2", "reinforce_ss@3", "reinforce_random_ss@3",
                    "reinforce_ss_all@2", "reinforce_random_ss_all@2", "reinforce_ss_all@3",
                    "reinforce_random_ss_all@3"]
    by_key = {c.key: c for c in plan}
    for target, neuron_set in (("ss", found.ss["bn"]), ("ss_all", union)):
        control = by_key[f"reinforce_random_{target}@3"]
        assert control.scale == 3.0 and control.neurons.counts() == neuron_set.counts()
        assert len(control.neurons & neuron_set) == 0
        assert by_key[f"reinforce_random_{target}@2"].neurons.counts() == neuron_set.counts()
    english, _ = plan_conditions(found, "en", lm.sites, (2.0,), (0,), "en", parts=("reinforce",),
                                 reinforce_sets=("own", "ss_all"))
    assert [c.key for c in english] == ["baseline", "reinforce_ss_all@2"]  # English's own set is the union: once
    only_union, _ = plan_conditions(found, "bn", lm.sites, (2.0,), (0,), "en", parts=("reinforce",),
                                    reinforce_sets=("ss_all",))
    assert [c.key for c in only_union] == ["baseline", "reinforce_ss_all@2"]
    with pytest.raises(SSNError, match="reinforced sets"):
        plan_conditions(found, "bn", lm.sites, reinforce_sets=("everything",))
