"""The neuron explorer engine on a tiny model: streamed top-k vs a brute-force sort over a full activation cache,
per-token activations, the vocabulary projection vs an explicit matrix product, importance ranks, set summaries."""

from __future__ import annotations

import math

import pytest
import torch

from ssn_core.errors import SSNError
from ssn_core.explorer import (
    collect_top_examples,
    explain,
    format_neuron,
    importance,
    parse_neuron,
    parse_neurons,
    token_pieces,
)
from ssn_core.hooks import active_hook_count, hook_sites
from ssn_core.neurons import NeuronSet
from ssn_core.prompts import load_builtin
from ssn_core.scoring import encode_prompt, score
from ssn_core.vocab import output_direction, project_direction, vocabulary_projection


@pytest.fixture(scope="module")
def lm():
    from ssn_core.testing import tiny_model

    return tiny_model("qwen2", seed=3)


@pytest.fixture(scope="module")
def prompts():
    return load_builtin(["en", "zh"], n=4)  # 4 groups (language × label) of 4 prompts


@pytest.fixture(scope="module")
def cache(lm, prompts):
    """The brute force: every site's activations at every counted token of every prompt, one prompt at a time."""
    out = []
    for prompt in prompts.prompts:
        ids, content = encode_prompt(lm, prompt.text, "chat")
        captured = {}

        def grab(site, captured=captured, content=content):
            def fn(carrier):
                captured[site.key] = site.read(carrier)[0, content].float().clone()  # [T_content, N]
            return fn

        with hook_sites([(site, grab(site)) for site in lm.sites]), torch.no_grad():
            lm.model.base_model(input_ids=torch.tensor([ids]), use_cache=False)
        out.append(captured)
    return out


def brute_force(cache, prompts, key, group, k, largest=True):
    """(values [N, k], prompt indices [N, k], every prompt's value [N, P_all]) by sorting every prompt's max (min)
    activation over its tokens."""
    rows = [i for i, p in enumerate(prompts.prompts) if (p.language, p.label) == group]
    stat = torch.stack([cache[i][key].amax(0) if largest else cache[i][key].amin(0) for i in rows], dim=1)  # [N, P]
    order = torch.argsort(stat, dim=1, descending=largest, stable=True)[:, :k]
    every = torch.full((stat.shape[0], len(prompts.prompts)), math.nan)
    every[:, rows] = stat
    return stat.gather(1, order), torch.tensor(rows)[order], every


def assert_same_top(values, index, expected_values, expected_index, every):
    """Same values as the sort, and each listed prompt really has its value (prompts tie where they share the
    tokens up to the peak, so which of two tied prompts is listed is not fixed)."""
    assert torch.allclose(values, expected_values, atol=1e-5), (values - expected_values).abs().max()
    index = index.long()
    assert torch.allclose(every.gather(1, index), values, atol=1e-5)
    assert all(len(set(row)) == len(row) for row in index.tolist())
    untied = (expected_values[:, :1] - expected_values[:, 1:2]).abs()[:, 0] > 1e-4
    assert torch.equal(index[untied, 0], expected_index[untied, 0])


def test_neuron_names_parse_and_bad_ones_say_how_to_write_them(lm):
    assert parse_neuron("L1.mlp.7") == (1, "mlp", 7)
    assert parse_neuron(" l0 attn_v 3 ") == (0, "attn_v", 3)
    assert parse_neuron("1.attn_o.12", lm.sites) == (1, "attn_o", 12)
    assert format_neuron((2, "mlp", 3814)) == "L2.mlp.3814"
    assert parse_neurons("L0.mlp.1, L1.mlp.2,L0.mlp.1") == [(0, "mlp", 1), (1, "mlp", 2)]
    with pytest.raises(SSNError, match="L<layer>.<site>.<index>"):
        parse_neuron("neuron 5")
    with pytest.raises(SSNError, match="layers 0–1"):
        parse_neuron("L7.mlp.1", lm.sites)
    with pytest.raises(SSNError, match="neurons 0–127"):
        parse_neuron("L1.mlp.128", lm.sites)


def test_streamed_top_k_equals_a_brute_force_sort_over_a_full_cache(lm, prompts, cache):
    k = 3
    # batch size 3 over groups of 4: batches straddle groups, so the per-group row merges are exercised
    examples = collect_top_examples(lm, prompts, k=k, batch_size=3)
    assert set(examples.groups) == {(lang, label) for lang in ("en", "zh") for label in ("harmful", "harmless")}
    for group in examples.groups:
        assert examples.counts[group] == 4
        for site in lm.sites:
            values, index = examples.top[group][site.key]
            assert values.shape == (site.size, k)
            assert_same_top(values, index, *brute_force(cache, prompts, site.key, group, k))
            values, index = examples.bottom[group][site.key]
            assert_same_top(values, index, *brute_force(cache, prompts, site.key, group, k, largest=False))
            rows = [i for i, p in enumerate(prompts.prompts) if (p.language, p.label) == group]
            expected_mean = torch.stack([cache[i][site.key].mean(0) for i in rows]).mean(0)
            assert torch.allclose(examples.means[group][site.key], expected_mean, atol=1e-5)
    # the lookup helpers read the same tensors
    found = examples.examples((1, "mlp", 9), ("zh", "harmful"))
    values, index = examples.top[("zh", "harmful")][(1, "mlp")]
    assert found == [(int(i), float(v)) for i, v in zip(index[9], values[9], strict=True)]
    assert active_hook_count(lm.model) == 0


def test_a_group_with_fewer_prompts_than_k_lists_only_what_it_has(lm, prompts, cache):
    examples = collect_top_examples(lm, prompts, k=6, kinds=("mlp",), batch_size=16)
    listed = examples.examples((0, "mlp", 4), ("en", "harmless"), "bottom")
    assert len(listed) == 4 and sorted(v for _, v in listed) == [v for _, v in listed]


def test_tracking_a_few_neurons_stops_early_and_agrees_with_tracking_all(lm, prompts):
    everything = collect_top_examples(lm, prompts, k=2, batch_size=5)
    few = NeuronSet({(0, "mlp"): [3, 70], (0, "attn_o"): [5]})
    some = collect_top_examples(lm, prompts, k=2, neurons=few, batch_size=5)  # layer 0 only: stops after it
    assert set(some.tracked) == {(0, "mlp"), (0, "attn_o")}
    for neuron in few.triples():
        for group in everything.groups:
            a, b = everything.examples(neuron, group), some.examples(neuron, group)
            assert [i for i, _ in a] == [i for i, _ in b]
            assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a, b, strict=True))
    with pytest.raises(SSNError, match="not among the neurons"):
        some.examples((1, "mlp", 3), everything.groups[0])
    assert active_hook_count(lm.model) == 0


def test_explain_keeps_per_token_activations_of_the_shown_prompts(lm, prompts, cache):
    neuron = (1, "mlp", 9)
    report = explain(lm, prompts, [neuron], k=3, batch_size=3).neurons[0]
    assert report.name == "L1.mlp.9"
    for group_name, per in report.examples.items():
        language, label = group_name.split("/")
        values, _, _ = brute_force(cache, prompts, (1, "mlp"), (language, label), 3)
        assert [e.value for e in per["top"]] == pytest.approx(values[9].tolist(), abs=1e-5)
        for example in per["top"] + per["bottom"]:
            i = next(j for j, p in enumerate(prompts.prompts) if (p.id, p.language, p.label) ==
                     (example.prompt_id, example.language, example.label))
            expected = cache[i][(1, "mlp")][:, 9]
            assert len(example.activations) == len(example.tokens) == expected.numel()
            assert torch.allclose(torch.tensor(example.activations), expected, atol=1e-5)
            assert "".join(example.tokens) == example.text  # byte tokens: the pieces join to the prompt
        assert per["top"][0].value == pytest.approx(float(values[9, 0]), abs=1e-5)
    dist = {(r["prompt_id"], r["language"], r["label"]): r for r in report.distribution}
    for i, p in enumerate(prompts.prompts):
        row = dist[(p.id, p.language, p.label)]
        activations = cache[i][(1, "mlp")][:, 9]
        assert row["max"] == pytest.approx(float(activations.max()), abs=1e-5)
        assert row["min"] == pytest.approx(float(activations.min()), abs=1e-5)
        assert row["mean"] == pytest.approx(float(activations.mean()), abs=1e-5)
    assert {(g["language"], g["label"]) for g in report.groups} == {tuple(k.split("/")) for k in report.examples}
    assert active_hook_count(lm.model) == 0


def test_token_pieces_cover_the_whole_prompt_with_all_tokens(lm):
    pieces = token_pieces(lm, "Hi there", aggregate="all")
    ids, _ = encode_prompt(lm, "Hi there", "chat")
    assert len(pieces) == len(ids) and "".join(pieces) == lm.format_chat_with_span("Hi there")[0]


def _rms_explicit(lm, direction):
    norm = lm.model.model.norm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    normed = norm.weight * direction / torch.sqrt(direction.pow(2).mean() + eps)
    return lm.model.lm_head.weight @ normed


def test_vocabulary_projection_equals_an_explicit_matrix_product(lm):
    layer, index = 1, 9
    w_down = lm.model.model.layers[layer].mlp.down_proj.weight  # [hidden, I]
    direction, how = output_direction(lm, (layer, "mlp", index))
    assert torch.equal(direction, w_down[:, index].float()) and "W_down" in how
    with torch.no_grad():
        expected = _rms_explicit(lm, w_down[:, index])
    logits = project_direction(lm, direction)
    assert torch.allclose(logits, expected, atol=1e-5)
    projection, note = vocabulary_projection(lm, (layer, "mlp", index), top=5, languages=["en", "zh"])
    assert note == ""
    expected = expected[:len(lm.tokenizer)]  # the tiny model's output rows past the byte tokens are never produced
    assert [r["token_id"] for r in projection.promoted] == expected.topk(5).indices.tolist()
    assert [r["token_id"] for r in projection.suppressed] == (-expected).topk(5).indices.tolist()
    assert {"latin", "han"} <= set(projection.by_script)
    latin = projection.by_script["latin"]
    assert latin["languages"] == ["en"] and all(r["script"] == "latin" for r in latin["promoted"])
    best_latin = max((float(expected[i]), i) for i, s in enumerate(_scripts(lm)) if s == "latin")
    assert latin["promoted"][0]["token_id"] == best_latin[1]
    assert latin["promoted"][0]["logit"] == pytest.approx(best_latin[0], abs=1e-5)


def _scripts(lm):
    from ssn_core.vocab import token_texts

    return token_texts(lm.tokenizer)[1]


def test_attention_directions_and_layer_norm_models(tiny):
    lm = tiny("qwen2", seed=1)
    o_proj = lm.model.model.layers[0].self_attn.o_proj.weight  # [hidden, H*D]; 4 heads over 2 kv heads, D = 16
    v_dir, how = output_direction(lm, (0, "attn_v", 16 + 5))  # kv group 1, dim 5: read by query heads 2 and 3
    assert torch.allclose(v_dir, o_proj[:, 2 * 16 + 5] + o_proj[:, 3 * 16 + 5]) and "2 query head" in how
    o_dir, _ = output_direction(lm, (0, "attn_o", 40))
    assert torch.equal(o_dir, o_proj[:, 40])
    assert vocabulary_projection(lm, (0, "attn_q", 3))[0] is None
    assert "no vocabulary projection" in vocabulary_projection(lm, (0, "attn_k", 3))[1]

    gpt2 = tiny("gpt2")
    c_proj = gpt2.model.transformer.h[1].mlp.c_proj.weight  # Conv1D: [I, hidden]
    direction, _ = output_direction(gpt2, (1, "mlp", 17))
    assert torch.equal(direction, c_proj[17].float())
    ln = gpt2.model.transformer.ln_f
    centred = direction - direction.mean()
    with torch.no_grad():
        expected = gpt2.model.lm_head.weight @ (ln.weight * centred / torch.sqrt(centred.pow(2).mean() + ln.eps))
    assert torch.allclose(project_direction(gpt2, direction), expected, atol=1e-5)


def test_importance_ranks_match_a_sort(lm, prompts):
    table = score(lm, prompts, method="activation", kinds=("mlp",))
    rows = importance([table], (1, "mlp", 9))
    assert len(rows) == 4 and {r["method"] for r in rows} == {"activation"}
    for row in rows:
        scores = table.groups[(row["language"], row["label"])]["mlp"]
        assert row["value"] == pytest.approx(float(scores[1, 9]))
        assert row["rank_in_layer"] == 1 + int((scores[1] > scores[1, 9]).sum())
        assert row["rank_in_kind"] == 1 + int((scores > scores[1, 9]).sum())
        assert row["top_percent"] == pytest.approx(100 * row["rank_in_layer"] / 128)
        assert "signed" in row
    assert importance([table], (1, "attn_o", 3)) == []  # no attn_o scores in this table
    sampled = score(lm, prompts.select(languages=["en"]), method="ablation", kinds=("mlp",), sample=[(1, "mlp", 9)])
    hit = importance([sampled], (1, "mlp", 9))[0]
    miss = importance([sampled], (1, "mlp", 10))[0]
    assert hit["value"] is not None and hit["rank_in_layer"] == 1 and hit["of_layer"] == 1
    assert miss["value"] is None and miss["rank_in_layer"] is None


def test_set_summary_sharing_and_set_activation(lm, prompts, cache):
    from ssn_core.identify import identify

    result = identify(lm, prompts, ["zh"], hr=("en",), method="activation", p=0.4, kinds=("mlp",))
    target = result.ms["en"] | result.ms["zh"]
    explanation = explain(lm, prompts, [next(iter(target.triples()))], target, result=result, k=2, batch_size=4,
                          set_name="MS en ∪ zh")
    summary = explanation.set
    assert summary.size == len(target) and summary.name == "MS en ∪ zh"
    assert sum(row["neurons"] for row in summary.sharing) == len(target)
    shared = {row["languages"]: row["neurons"] for row in summary.sharing}
    assert shared.get("en, zh", 0) == len(result.ms["en"] & result.ms["zh"])
    assert shared.get("zh", 0) == len(result.ms["zh"] - result.ms["en"])
    for row in summary.neurons:
        neuron = (row["layer"], row["kind"], row["index"])
        assert row["ms_languages"] == ", ".join(lang for lang in ("en", "zh") if neuron in result.ms[lang])
    per_language = {row["language"]: row for row in summary.per_language}
    assert per_language["zh"]["ms"] == len(result.ms["zh"]) and per_language["zh"]["ss"] == len(result.ss["zh"])
    assert {r["method"] for r in summary.importance} == {"activation"}
    assert explanation.neurons[0].membership["en"]["ms"] in (True, False)
    assert explanation.neurons[0].importance  # from the result's own score table
    # the set's activation at a token: mean |a| over its neurons (brute force over the cache)
    keys = list(target.neurons)
    group = ("zh", "harmless")
    rows = [i for i, p in enumerate(prompts.prompts) if (p.language, p.label) == group]
    per_prompt = []
    for i in rows:
        summed = sum(cache[i][key][:, target.neurons[key]].abs().sum(-1) for key in keys)  # [T]
        per_prompt.append(float((summed / len(target)).max()))
    top = summary.examples["zh/harmless"]["top"]
    assert [e.value for e in top] == pytest.approx(sorted(per_prompt, reverse=True)[:2], abs=1e-5)
    assert max(top[0].activations) == pytest.approx(top[0].value, abs=1e-6)


def test_bad_requests_are_ssn_errors(lm, prompts):
    with pytest.raises(SSNError, match="nothing to explain"):
        explain(lm, prompts)
    with pytest.raises(SSNError, match="k "):
        explain(lm, prompts, [(0, "mlp", 1)], k=0)
    with pytest.raises(SSNError, match="empty"):
        explain(lm, prompts, [], NeuronSet())
    with pytest.raises(SSNError, match="aggregate"):
        collect_top_examples(lm, prompts, aggregate="reply")
    with pytest.raises(SSNError, match="no prompts"):
        collect_top_examples(lm, [])
    with pytest.raises(SSNError, match="neurons 0–127"):
        explain(lm, prompts, [(0, "mlp", 500)])
    assert active_hook_count(lm.model) == 0
