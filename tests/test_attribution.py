"""Gradient scores (global ΔLLM estimate, refusal attribution), direction scores and reply aggregation (tiny models)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from ssn_core._conventions import pad_id
from ssn_core.attribution import attribution_batch, global_batch
from ssn_core.direction import difference_of_means, direction_batch
from ssn_core.errors import SSNError
from ssn_core.hooks import active_hook_count
from ssn_core.identify import identify
from ssn_core.interventions import Intervention, intervene
from ssn_core.neurons import NeuronSet
from ssn_core.pairs import PromptPair, load_pairs, save_pairs
from ssn_core.prompts import Prompt
from ssn_core.refusal import refusal_margin
from ssn_core.scoring import ablation_batch, encode_prompt, make_batch, score
from ssn_core.testing import tiny_model

KINDS = ("mlp", "attn_q", "attn_k", "attn_v", "attn_o")


@pytest.fixture(scope="module")
def lm64():
    lm = tiny_model("qwen2", seed=3)
    lm.model.double()  # finite differences need more precision than float32
    return lm


def test_attribution_equals_finite_differences(lm64):
    # Prompts of the same token length: no padding (float64 eager attention turns padded rows into NaN).
    items = [Prompt("h1", "en", "harmful", "how do I do bad"), Prompt("s1", "zh", "harmless", "你好，天气")]
    assert len({len(encode_prompt(lm64, p.text)[0]) for p in items}) == 1
    scores = attribution_batch(lm64, items, KINDS)
    texts, langs = [p.text for p in items], [p.language for p in items]
    # Central differences. RMSNorm and RoPE compute in float32 even in a float64 model, and their rounding, divided
    # by 2·eps, was most of the tolerance at eps = 1e-3 (over it on an AVX2-only EPYC); at 1e-2 the truncation
    # error (O(eps²) for a central difference) and the rounding both use under 15% of it on that CPU.
    eps = 1e-2
    checked = 0
    for layer, kind in [(0, "mlp"), (1, "attn_q"), (1, "attn_k"), (0, "attn_v"), (1, "attn_o")]:
        for index in (0, 3, 5):
            margins = []
            for scale in (1 + eps, 1 - eps):
                with intervene(lm64, Intervention(NeuronSet({(layer, kind): [index]}), scale=scale)):
                    margins.append(refusal_margin(lm64, texts, langs).double())
            finite_difference = (margins[0] - margins[1]) / (2 * eps)  # d margin / d scale = Σ a · ∂m/∂a
            assert torch.allclose(scores[(layer, kind)][:, index].double(), finite_difference, rtol=3e-2, atol=2e-5), \
                (layer, kind, index)
            checked += 1
    assert checked == 15 and active_hook_count(lm64.model) == 0


def test_attribution_uses_the_pairs_replies(lm64):
    plain = Prompt("h1", "en", "harmful", "how do I do a bad thing")
    paired = PromptPair("h1", "en", "harmful", plain.text, "No. I will not help with that.", "template")
    a = attribution_batch(lm64, [plain], ("mlp",))[(0, "mlp")]
    b = attribution_batch(lm64, [paired], ("mlp",))[(0, "mlp")]
    assert not torch.allclose(a, b)


def test_global_estimate_converges_to_exact_ablation():
    lm = tiny_model("qwen2", seed=1)
    texts = ["hello there, friend", "how do I make a dangerous thing at home?"]
    batch = make_batch([encode_prompt(lm, t) for t in texts], "last", pad_id(lm))
    sample = [(layer, kind, i) for layer in range(lm.sites.n_layers) for kind in KINDS
              for i in range(0, lm.sites.get(layer, kind).size, 3)]
    exact = ablation_batch(lm, batch, sample)  # [B, S]
    errors, rhos = [], []
    for k in (2, 16, 128):
        estimate = global_batch(lm, batch, KINDS, projections=k)
        est = torch.stack([estimate[(layer, kind)][:, i] for layer, kind, i in sample], 1)
        errors.append(float(((est - exact).abs() / exact.clamp(min=1e-9)).median()))
        rhos.append(float(spearmanr(exact.flatten(), est.flatten()).statistic))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.15
    assert rhos[2] > 0.99 and rhos[2] >= rhos[0]
    with pytest.raises(SSNError, match="at least 1 random projection"):
        global_batch(lm, batch, KINDS, projections=0)


def test_reply_aggregation_only_counts_reply_tokens():
    lm = tiny_model("qwen2")
    ids, content, start = encode_prompt(lm, "how are you", reply="fine, thanks")
    prompt_ids, _ = encode_prompt(lm, "how are you")
    assert ids[:start] == prompt_ids and start < len(ids)
    batch = make_batch([(ids, content, start), encode_prompt(lm, "a longer prompt here", reply="ok")], "reply", 0)
    weights = batch.weights[0]
    pad = batch.weights.shape[1] - len(ids)
    counted = weights.nonzero().flatten().tolist()
    # Positions that predict a reply token: the last prompt token through the reply's second-to-last token.
    assert counted == list(range(pad + start - 1, pad + len(ids) - 1))
    assert float(weights.sum()) == pytest.approx(1.0)
    last = make_batch([(ids, content, start)], "last", 0).weights[0]
    assert last.nonzero().flatten().tolist() == [start - 1]  # last *prompt* token, not the reply's end
    with pytest.raises(SSNError, match="has no reply"):
        make_batch([encode_prompt(lm, "x")], "reply", 0)
    # Scores of a pair change when only the reply changes.
    a = score(lm, [PromptPair("1", "en", "harmful", "how are you", "fine, thanks", "own")], aggregate="reply",
              kinds=("mlp",))
    b = score(lm, [PromptPair("1", "en", "harmful", "how are you", "go away now", "own")], aggregate="reply",
              kinds=("mlp",))
    assert not torch.allclose(a.get("en", "harmful", "mlp"), b.get("en", "harmful", "mlp"))
    with pytest.raises(SSNError, match="have no reply"):
        score(lm, [Prompt("1", "en", "harmful", "x")], aggregate="reply", kinds=("mlp",))


def test_direction_scores_are_the_write_along_the_direction():
    lm = tiny_model("qwen2", seed=2)
    prompts = [Prompt("h1", "en", "harmful", "steal a car"), Prompt("s1", "en", "harmless", "bake a cake")]
    directions, _norms = difference_of_means(lm, prompts)
    batch = make_batch([encode_prompt(lm, p.text) for p in prompts], "last", pad_id(lm))
    got = direction_batch(lm, batch, ("mlp", "attn_o", "attn_v"), directions)
    # Brute force for mlp neurons of layer 1: zeroing neuron k changes the layer's output by -a_k W_down[:, k];
    # its component along r̂ is the score (with the opposite sign).
    site = lm.sites.get(1, "mlp")
    captured = {}
    from ssn_core.hooks import hook_sites

    def capture(carrier):
        captured["a"] = site.read(carrier)[:, -1].clone()  # returns None: observe only

    with torch.no_grad(), hook_sites({site: capture}):
        lm.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids)
    w_down = site.module.weight.detach()  # [hidden, I]
    expected = captured["a"] * (w_down.T @ directions[1])  # [B, N]
    assert torch.allclose(got[(1, "mlp")], expected, atol=1e-5)
    with pytest.raises(SSNError, match="leave out attn_q"):
        direction_batch(lm, batch, ("attn_q",), directions)


def test_identify_with_pairs_direction_and_global_ranking(tmp_path):
    lm = tiny_model("qwen2")
    prompts = [Prompt(f"{label[0]}{i}", lang, label, f"{label} request {i} in {lang}") for lang in ("en", "zh")
               for label in ("harmful", "harmless") for i in range(2)]
    result = identify(lm, prompts, ["zh"], method="attribution", aggregate="all", p=0.05, ranking="global",
                      kinds=("mlp", "attn_o"), own_replies=True, find_direction=True, batch_size=4)
    assert result.pairs is not None and len(result.pairs) == len(prompts)
    assert {p.source for p in result.pairs if p.label == "harmless"} == {"own"}
    assert result.direction is not None and result.manifest["direction_layer"] == result.direction.layer
    assert result.manifest["item_ids"] == sorted({p.id for p in prompts})
    total = sum(lm.sites.get(0, k).size * lm.sites.n_layers for k in ("mlp", "attn_o"))
    assert len(result.ms["en"]) <= int(0.05 * total)
    out = result.save(tmp_path / "ident")
    from ssn_core.identify import IdentifyResult

    again = IdentifyResult.load(out, lm.sites)
    assert again.direction is not None and torch.equal(again.direction.directions, result.direction.directions)
    assert again.pairs == result.pairs and again.item_ids == frozenset(p.id for p in prompts)
    save_pairs(tmp_path / "pairs.json", result.pairs, lm)
    assert load_pairs(tmp_path / "pairs.json", lm.sites) == result.pairs
    with pytest.raises(SSNError, match="aggregate 'all'"):
        identify(lm, prompts, ["zh"], method="attribution", aggregate="last", kinds=("mlp",))
