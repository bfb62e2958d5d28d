"""Models placed by accelerate's device_map: every scoring method, interventions, deltas and the refusal margin give
the same results as the model in one piece.

On the CPU there is one device, so the layers cannot really be split between devices; what can run here is
accelerate's dispatch itself (its hooks on every block and the top model) with one decoder layer *offloaded to disk*:
its weights stay on the meta device between forward passes and are loaded by accelerate's hook for its own forward,
which is the hardest case for the closed forms (they read weights) and for deltas (they live next to their module).
A GPU with a layer waiting in CPU memory (what device_map="auto" does with a model larger than the GPU) and the real
split over two GPUs run only where CUDA is (one or two devices); no GPU was lent to the session that wrote them.
"""

from __future__ import annotations

import pytest
import torch

from ssn_core.prompts import load_builtin
from ssn_core.scoring import score

KINDS = ("mlp", "attn_q", "attn_k", "attn_v", "attn_o")
METHODS = ("impact", "activation", "global", "attribution", "direction", "ablation")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dispatched(device_map: dict, tmp_path=None):
    from accelerate import dispatch_model

    from ssn_core.loading import LoadedModel
    from ssn_core.testing import tiny_model

    lm = tiny_model("qwen2", seed=0)
    model = dispatch_model(lm.model, device_map, offload_dir=str(tmp_path) if tmp_path else None, force_hooks=True)
    return LoadedModel(model=model, tokenizer=lm.tokenizer, summary=lm.summary)


def _same_everywhere(placed, reference, atol: float) -> None:
    from ssn_core.delta import NeuronDelta, apply_delta
    from ssn_core.generation import GenerationSettings, generate
    from ssn_core.interventions import suppress
    from ssn_core.neurons import NeuronSet
    from ssn_core.refusal import refusal_margin

    prompts = load_builtin(["en"], n=2)
    for method in METHODS:
        kinds = ("mlp", "attn_v", "attn_o") if method == "direction" else KINDS
        options = {"aggregate": "all" if method == "attribution" else "content", "kinds": kinds, "batch_size": 2,
                   "sample": 4 if method == "ablation" else None}
        a, b = score(reference, prompts, method=method, **options), score(placed, prompts, method=method, **options)
        for group, per_kind in a.groups.items():
            for kind, tensor in per_kind.items():
                torch.testing.assert_close(b.groups[group][kind], tensor, rtol=1e-4, atol=atol, equal_nan=True,
                                           msg=f"{method} {group} {kind}")
    texts = [p.text for p in prompts][:2]
    neurons = NeuronSet({(1, "mlp"): list(range(0, 128, 3)), (1, "attn_o"): [1, 5, 9], (0, "attn_v"): [2]})
    settings = GenerationSettings(max_new_tokens=5)
    seen = []
    for lm in (reference, placed):
        delta = NeuronDelta.zeros(lm.model, lm.sites, neurons)
        for piece in delta.slices.values():
            piece.weight.copy_(torch.linspace(-0.5, 0.5, piece.weight.numel()).view_as(piece.weight))
        with suppress(lm, neurons, rows=[False, True]):
            replies = generate(lm, texts, settings)  # row 0 as is, row 1 suppressed
        with apply_delta(lm, delta):
            tuned = refusal_margin(lm, texts, ["en", "en"])
        seen.append((replies, tuned, refusal_margin(lm, texts, ["en", "en"])))
    (ref_replies, ref_tuned, ref_margin), (replies, tuned, margin) = seen
    assert replies == ref_replies
    torch.testing.assert_close(tuned, ref_tuned, rtol=1e-4, atol=atol)
    torch.testing.assert_close(margin, ref_margin, rtol=1e-4, atol=atol)


def test_a_layer_offloaded_by_accelerate(tmp_path):
    from ssn_core.testing import tiny_model

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    placed = _dispatched(device_map, tmp_path)
    assert placed.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # really not resident
    _same_everywhere(placed, tiny_model("qwen2", seed=0), atol=1e-6)
    assert placed.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # and put back


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the CPU test above offloads to disk)")
def test_gpu_with_a_layer_offloaded_to_the_cpu():
    """What device_map="auto" does with a model bigger than the GPU: the layers that do not fit wait in CPU memory
    (meta on the module) and run on the GPU."""
    from ssn_core.testing import tiny_model

    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                  "model.norm": 0, "lm_head": 0}
    placed = _dispatched(device_map)
    assert placed.model.model.layers[0].mlp.down_proj.weight.device.type == "cuda"
    assert placed.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    _same_everywhere(placed, tiny_model("qwen2", seed=0), atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="splitting the layers over GPUs needs two of them")
def test_layers_split_over_two_gpus():
    """--device auto on a machine with several GPUs: each layer's tensors on its own GPU."""
    from ssn_core.testing import tiny_model

    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "lm_head": 1}
    placed = _dispatched(device_map)
    assert placed.model.model.layers[1].mlp.down_proj.weight.device == torch.device("cuda", 1)
    _same_everywhere(placed, tiny_model("qwen2", seed=0), atol=1e-4)
