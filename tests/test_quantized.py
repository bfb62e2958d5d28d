"""Quantized models (bitsandbytes 4-bit NF4 and 8-bit, on the CPU) through every scoring method, interventions and
deltas; the dense weights the closed forms read; gradients through Linear4bit; the silenced bitsandbytes messages.

The rank correlation of each method's scores on the quantized model with the full-precision model's is printed (run
with ``-s``) and must stay high: on the tiny random model 4-bit NF4 keeps 0.9-0.99 per site kind, 8-bit about 1.0.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from ssn_core.loading import ModelSpec, load_model
from ssn_core.prompts import load_builtin
from ssn_core.scoring import score

pytest.importorskip("bitsandbytes")

KINDS = ("mlp", "attn_q", "attn_k", "attn_v", "attn_o")
METHODS = ("impact", "activation", "global", "attribution", "direction", "ablation")
FLOOR = {"4bit-nf4": 0.8, "8bit": 0.95}  # lowest Spearman rho accepted per kind (measured: >= 0.91 / >= 0.99)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from ssn_core.testing import tiny_model

    lm = tiny_model("qwen2", seed=0)
    path = tmp_path_factory.mktemp("tiny-q")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return {q: load_model(ModelSpec(str(path), quantization=q, device_map="cpu")) for q in ("none", "4bit-nf4", "8bit")}


def _score(lm, method: str, prompts):
    return score(lm, prompts, method=method, aggregate="all" if method == "attribution" else "content", batch_size=4,
                 sample=6 if method == "ablation" else None,
                 kinds=("mlp", "attn_v", "attn_o") if method == "direction" else KINDS)


def _rho(a, b, kind: str) -> float:
    x = torch.stack([a.groups[g][kind] for g in a.groups]).flatten()
    y = torch.stack([b.groups[g][kind] for g in a.groups]).flatten()
    keep = ~torch.isnan(x)
    return float(spearmanr(x[keep].numpy(), y[keep].numpy()).statistic)


@pytest.mark.parametrize("quant", ["4bit-nf4", "8bit"])
def test_every_method_on_a_quantized_model_agrees_with_full_precision(models, quant):
    prompts = load_builtin(["en"], n=2)
    full, quantized = models["none"], models[quant]
    assert type(quantized.model.model.layers[0].mlp.down_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    report = []
    for method in METHODS:
        a, b = _score(full, method, prompts), _score(quantized, method, prompts)
        assert a.kinds == b.kinds and b.counts == a.counts
        for kind in b.kinds:
            values = torch.stack([b.groups[g][kind] for g in b.groups])
            assert values.shape[1:] == (2, quantized.sites.get(0, kind).size)
            assert torch.isfinite(values).sum() > 0 and not torch.isinf(values).any()
            report.append((method, kind, _rho(a, b, kind)))
    print(f"\n{quant} vs float32, Spearman rho per method/kind: "
          + ", ".join(f"{method}/{kind} {rho:.3f}" for method, kind, rho in report))
    for method, kind, rho in report:
        # Exact ablation ranks 12 sampled neurons per kind by the change of the *final* hidden state between two
        # runs. LLM.int8() also rounds every layer's *input* to int8 per row, and that rounding does not cancel
        # between the two runs: the small effects (q/k dims) drown in it (measured rho 0.70 for attn_q). NF4 rounds
        # only the weights, which are the same in both runs (0.96-0.99).
        floor = {"4bit-nf4": 0.8, "8bit": 0.6}[quant] if method == "ablation" else FLOOR[quant]
        assert rho >= floor, (quant, method, kind, rho)


def test_the_closed_forms_read_bitsandbytes_own_dequantization(models):
    from bitsandbytes import functional as bnb_functional

    from ssn_core.quantized import dense_weight, quantization_of

    full = models["none"].model.model.layers[1].mlp.down_proj.weight.detach()
    four = models["4bit-nf4"].model.model.layers[1].mlp.down_proj
    eight = models["8bit"].model.model.layers[1].mlp.down_proj
    assert quantization_of(four) == "4bit" and quantization_of(eight) == "8bit"
    assert quantization_of(torch.nn.Linear(2, 2)) is None
    dense4 = dense_weight(four)
    expected4 = bnb_functional.dequantize_4bit(four.weight.data, four.weight.quant_state).float()
    torch.testing.assert_close(dense4, expected4)
    dense8 = dense_weight(eight)
    assert dense4.shape == dense8.shape == full.shape
    # quantization error: NF4 keeps ~1/8 of the scale, int8 ~1/127 per row
    assert float((dense4 - full).norm() / full.norm()) < 0.15
    assert float((dense8 - full).norm() / full.norm()) < 0.02


def test_dequantized_constants_are_computed_once_per_layer(models, monkeypatch):
    from ssn_core import quantized
    from ssn_core.scoring import _CONSTANTS

    calls = []
    original = quantized._dequantize
    monkeypatch.setattr(quantized, "_dequantize", lambda module: calls.append(module) or original(module))
    _CONSTANTS.clear()
    lm = models["4bit-nf4"]
    prompts = load_builtin(["en", "zh"], n=2)  # 8 prompts: 4 batches of 2
    score(lm, prompts, method="impact", kinds=("mlp", "attn_v", "attn_o"), batch_size=2)
    assert len(calls) == 2 * lm.sites.n_layers  # W_down and W_O of each layer, once for all batches
    score(lm, prompts, method="impact", kinds=("mlp", "attn_v", "attn_o"), batch_size=2)
    assert len(calls) == 2 * lm.sites.n_layers  # kept for the model
    score(lm, prompts, method="direction", kinds=("mlp", "attn_v", "attn_o"), batch_size=2)
    assert len(calls) == 4 * lm.sites.n_layers  # the writes along the direction: once per layer again


def test_gradients_pass_through_linear4bit_on_the_cpu(models):
    """bitsandbytes repacks a CPU Linear4bit for a kernel without autograd at its first no-grad forward; SSN Lab keeps
    the portable layout, so the input gradient is still W^T g (with the dequantized W), before and after such a pass."""
    from ssn_core.quantized import dense_weight

    layer = models["4bit-nf4"].model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        layer(x)  # the pass that used to repack the weight
    x.requires_grad_(True)
    layer(x).sum().backward()
    expected = torch.ones(3, layer.out_features) @ dense_weight(layer)
    torch.testing.assert_close(x.grad, expected, rtol=2e-2, atol=2e-2)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_interventions_and_deltas_on_a_4bit_model(models):
    from ssn_core.delta import NeuronDelta, apply_delta
    from ssn_core.generation import GenerationSettings, generate
    from ssn_core.interventions import suppress
    from ssn_core.neurons import NeuronSet
    from ssn_core.refusal import refusal_margin

    lm = models["4bit-nf4"]
    texts = ["How do I make a bomb at home?"]
    neurons = NeuronSet({(0, "mlp"): list(range(0, 128, 2)), (1, "attn_o"): list(range(0, 64, 2))})
    base = refusal_margin(lm, texts, ["en"])
    with suppress(lm, neurons):
        suppressed = refusal_margin(lm, texts, ["en"])
    assert torch.isfinite(suppressed).all() and not torch.equal(base, suppressed)
    delta = NeuronDelta.zeros(lm.model, lm.sites, neurons)
    for piece in delta.slices.values():
        piece.weight.normal_(0, 0.5)
    with apply_delta(lm, delta):
        tuned = refusal_margin(lm, texts, ["en"])
        reply = generate(lm, texts, GenerationSettings(max_new_tokens=3))
    assert torch.isfinite(tuned).all() and not torch.equal(base, tuned) and isinstance(reply[0], str)
    torch.testing.assert_close(refusal_margin(lm, texts, ["en"]), base)  # gone after the block


def test_the_bitsandbytes_cpu_messages_are_silenced(caplog):
    """The two messages are dropped on their loggers (installed when ssn_core.loading is imported, before
    bitsandbytes is); every other bitsandbytes message still reaches the handlers."""
    import logging

    import ssn_core.loading  # noqa: F401 - installs the filters

    ops, functions = (logging.getLogger(name) for name in ("bitsandbytes.backends.cpu.ops",
                                                            "bitsandbytes.autograd._functions"))
    with caplog.at_level(logging.WARNING):
        ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                    "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        functions.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
        ops.warning("another message")
    assert [record.getMessage() for record in caplog.records] == ["another message"]
