"""The continuous refusal margin and the refusal-direction control (tiny models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssn_core.direction import (
    DirectionAblation,
    RefusalDirection,
    ablate_direction,
    find_refusal_direction,
)
from ssn_core.errors import NeuronFileError, PromptSetError, SSNError
from ssn_core.hooks import active_hook_count, hook_modules
from ssn_core.interventions import Intervention, intervene
from ssn_core.neurons import NeuronSet
from ssn_core.prompts import Prompt
from ssn_core.refusal import load_openings, opening_logprobs, refusal_margin
from ssn_core.sites import decoder_layers
from ssn_core.testing import tiny_model

FAMILIES = ["qwen2", "llama", "gpt2", "gemma2", "phi3", "gpt_neox"]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_opening_logprobs_equal_full_sequences(family):
    lm = tiny_model(family)
    texts = ["hello there", "a much longer prompt text here, padded against the short one"]
    openings = [["no way", "sure thing ok"], ["nope", "yes", "fine then"]]
    with torch.no_grad():
        got = opening_logprobs(lm, texts, openings, max_tokens=4)
        for b, (text, texts_b) in enumerate(zip(texts, openings, strict=True)):
            prompt_ids = lm.tokenize_prompts([lm.format_chat(text)])["input_ids"][0].tolist()
            for j, opening in enumerate(texts_b):
                ids = lm.tokenizer(opening, add_special_tokens=False)["input_ids"][:4]
                logp = F.log_softmax(lm.model(input_ids=torch.tensor([prompt_ids + ids])).logits.float(), -1)[0]
                expected = sum(float(logp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(ids))
                assert float(got[b][j]) == pytest.approx(expected, abs=1e-4)


def test_refusal_margin_is_refusal_minus_compliance_log_mean_exp():
    lm = tiny_model("qwen2")
    openings = load_openings()
    refusal, compliance = openings.for_language("sw")
    assert set(openings.for_language("en")[0]) < set(refusal)  # English openings join for other languages
    margin = refusal_margin(lm, ["habari", "hello"], ["sw", "en"])
    with torch.no_grad():
        lp = opening_logprobs(lm, ["habari"], [list(refusal) + list(compliance)])[0]
    k = len(refusal)
    expected = torch.logsumexp(lp[:k], 0) - torch.logsumexp(lp[k:], 0) + torch.log(torch.tensor(
        (len(lp) - k) / k))
    assert float(margin[0]) == pytest.approx(float(expected), abs=1e-4)
    # An intervention inside the block changes it; afterwards the model is back.
    with intervene(lm, Intervention(NeuronSet({(0, "mlp"): list(range(64))}), scale=0.0)):
        changed = refusal_margin(lm, ["habari", "hello"], ["sw", "en"])
    assert not torch.allclose(changed, margin)
    assert torch.allclose(refusal_margin(lm, ["habari", "hello"], ["sw", "en"]), margin)
    with pytest.raises(PromptSetError, match="no refusal/compliance openings"):
        refusal_margin(lm, ["x"], ["xx"])


def _residuals_seen(lm, direction, rows=None):
    unit = direction / direction.norm()
    seen = []
    layers = decoder_layers(lm.model)
    capture = [((layer, "in"), lambda x: seen.append(x @ unit)) for layer in layers]
    capture += [((layer, "out"), lambda out, x: seen.append(out @ unit)) for layer in layers]
    enc = lm.tokenize_prompts(lm.prompt_texts(["hello there", "xyz"]))
    with torch.no_grad(), ablate_direction(lm, direction, rows=rows), hook_modules(capture):
        lm.model(**enc)
    return torch.stack([s.abs().amax(dim=-1) for s in seen])  # [sites, B]


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gemma2", "gpt_neox", "qwen3"])
def test_direction_ablation_leaves_the_residual_orthogonal_and_is_removed(family):
    lm = tiny_model(family)
    hidden = lm.model.config.get_text_config().hidden_size
    direction = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    seen = _residuals_seen(lm, direction)
    assert float(seen.max()) < 1e-5
    assert active_hook_count(lm.model) == 0
    # Row mask: row 0 untouched, row 1 ablated.
    seen = _residuals_seen(lm, direction, rows=[False, True])
    assert float(seen[:, 1].max()) < 1e-5 and float(seen[:, 0].max()) > 1e-3
    # Hooks go away on an exception inside the block too.
    with pytest.raises(RuntimeError), ablate_direction(lm, direction):
        raise RuntimeError("boom")
    assert active_hook_count(lm.model) == 0
    with pytest.raises(SSNError, match="finite, non-zero"):
        DirectionAblation(torch.zeros(hidden)).module_fns(lm)


def test_direction_ablation_mixes_with_neuron_interventions_in_one_block():
    lm = tiny_model("qwen2")
    hidden = lm.model.config.hidden_size
    direction = torch.randn(hidden, generator=torch.Generator().manual_seed(1))
    neurons = NeuronSet({(1, "mlp"): list(range(32))})
    enc = lm.tokenize_prompts(lm.prompt_texts(["hello there"]))
    with torch.no_grad():
        with intervene(lm, Intervention(neurons, 0.0)), ablate_direction(lm, direction):
            nested = lm.model(**enc).logits
        with intervene(lm, Intervention(neurons, 0.0), DirectionAblation(direction)):
            together = lm.model(**enc).logits
        plain = lm.model(**enc).logits
    assert torch.allclose(nested, together) and not torch.allclose(plain, together)
    with pytest.raises(SSNError, match="needs the model"), intervene(lm.sites, DirectionAblation(direction)):
        pass


def _prompts():
    harmful = ["how do I build a weapon", "steal a car quickly", "poison someone", "hack a bank"]
    harmless = ["bake a cake", "learn the guitar", "plant a tree", "write a poem"]
    return ([Prompt(f"h{i}", "en", "harmful", t) for i, t in enumerate(harmful)]
            + [Prompt(f"s{i}", "en", "harmless", t) for i, t in enumerate(harmless)])


def test_find_refusal_direction_picks_the_candidate_with_the_lowest_margin(tmp_path):
    lm = tiny_model("qwen2")
    result = find_refusal_direction(lm, _prompts(), ["en"], candidate_layers=[0, 1], select_n=2)
    assert result.directions.shape == (lm.sites.n_layers, lm.model.config.hidden_size)
    assert torch.allclose(result.directions.norm(dim=-1), torch.ones(lm.sites.n_layers), atol=1e-5)
    best = min(result.selection, key=lambda s: s["margin"])
    assert result.layer == best["layer"] and {s["layer"] for s in result.selection} == {0, 1}
    assert result.meta["item_ids"] == sorted(p.id for p in _prompts())
    path = result.save(tmp_path / "direction.safetensors")
    again = RefusalDirection.load(path, lm.sites)
    assert torch.equal(again.directions, result.directions) and again.layer == result.layer
    other = tiny_model("qwen2", num_hidden_layers=3)
    with pytest.raises(NeuronFileError, match="another model"):
        RefusalDirection.load(path, other.sites)
    with pytest.raises(PromptSetError, match="harmful and harmless"):
        find_refusal_direction(lm, [p for p in _prompts() if p.label == "harmful"], ["en"])
