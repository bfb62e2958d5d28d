"""Neuron sites, hooks and interventions on tiny random models of every supported family."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ssn_core import hooks
from ssn_core.errors import SSNError, UnsupportedArchitectureError
from ssn_core.hooks import active_hook_count, bind_context, hook_sites
from ssn_core.interventions import Intervention, clamp, intervene, reinforce, suppress
from ssn_core.neurons import NeuronSet
from ssn_core.sites import SITE_KINDS, find_sites, weight_axis
from ssn_core.testing import TINY_FAMILIES, tiny_hf_model

TOKENS = torch.tensor([[5, 17, 42, 99, 7, 250, 31], [8, 8, 120, 64, 200, 3, 77]])


def logits(model, input_ids=TOKENS):
    with torch.no_grad():
        return model(input_ids).logits


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_model(request):
    return request.param, tiny_hf_model(request.param)


def test_site_discovery_and_counts(family_model):
    family, model = family_model
    sites = find_sites(model)
    config = model.config
    assert sites.n_layers == 2
    assert sites.kinds == SITE_KINDS
    sizes = sites.sizes()
    assert sizes["mlp"] == 128
    assert sizes["attn_q"] == sizes["attn_o"] == 64
    kv_heads = 4 if family in ("gpt2", "gpt_neox") else config.num_key_value_heads
    assert sizes["attn_k"] == sizes["attn_v"] == kv_heads * 16
    assert sites.total_neurons == 2 * sum(sizes.values())
    # Fused projections: q, k and v of one layer never share a carrier coordinate.
    q, k, v = (sites.get(0, kind) for kind in ("attn_q", "attn_k", "attn_v"))
    if q.module is k.module:
        all_coords = torch.cat([q.coords, k.coords, v.coords])
        assert all_coords.unique().numel() == all_coords.numel()


def test_reading_a_site_sees_the_carrier(family_model):
    family, model = family_model
    sites = find_sites(model)
    seen = {}

    def recorder(site):
        def record(carrier):
            seen[site.kind] = site.read(carrier).clone()
        return record

    with hook_sites({site: recorder(site) for site in sites if site.layer == 1}):
        logits(model)
    for kind in SITE_KINDS:
        assert seen[kind].shape == (2, TOKENS.shape[1], sites.get(1, kind).size)
        assert seen[kind].abs().sum() > 0
    if family == "llama":  # mlp carrier = act(gate(x)) * up(x): check against a manual computation
        mlp = model.model.layers[1].mlp
        captured = {}
        handle = mlp.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0]))
        logits(model)
        handle.remove()
        x = captured["x"]
        expected = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        torch.testing.assert_close(seen["mlp"], expected)


def _zero_owned_slices(model, site, neuron_index: int) -> None:
    for owned in site.owned:
        module = model.get_submodule(owned.module_name)
        coord = owned.coords[neuron_index]
        with torch.no_grad():
            module.weight.index_fill_(weight_axis(module, owned.axis), coord.view(1), 0.0)
            if owned.axis == "out" and getattr(module, "bias", None) is not None:
                module.bias[coord] = 0.0


@pytest.mark.parametrize("kind", SITE_KINDS)
def test_zeroing_a_neuron_equals_zeroing_its_parameter_slice(family_model, kind):
    family, model = family_model
    sites = find_sites(model)
    site = sites.get(1, kind)
    neuron = site.size // 2 + 1
    with suppress(model, NeuronSet({(1, kind): [neuron]})):
        hooked = logits(model)
    baseline = logits(model)
    assert not torch.allclose(hooked, baseline), "zeroing a neuron should change the output"

    edited = tiny_hf_model(family)  # same seed: same weights
    _zero_owned_slices(edited, find_sites(edited).get(1, kind), neuron)
    torch.testing.assert_close(logits(edited), hooked, rtol=1e-5, atol=1e-5)


def test_hooks_removed_after_context_and_after_exception(family_model):
    _, model = family_model
    neurons = NeuronSet({(0, "mlp"): [1, 2, 3], (1, "attn_v"): [0, 5], (1, "attn_q"): [4]})
    baseline = logits(model)
    assert active_hook_count(model) == 0
    with suppress(model, neurons):
        assert active_hook_count(model) > 0
    assert active_hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"), reinforce(model, neurons, alpha=3.0):
        raise RuntimeError("boom")
    assert active_hook_count(model) == 0
    with pytest.raises(KeyboardInterrupt), clamp(model, neurons, value=1.0):
        raise KeyboardInterrupt
    assert active_hook_count(model) == 0
    assert torch.equal(logits(model), baseline)


def test_row_mask_leaves_row_zero_bit_identical():
    model = tiny_hf_model("qwen2")
    sites = find_sites(model)
    neurons = NeuronSet({(layer, kind): torch.arange(0, sites.get(layer, kind).size, 3)
                         for layer in range(2) for kind in SITE_KINDS})
    same_prompt = TOKENS[:1].repeat(2, 1)
    baseline = logits(model, same_prompt)
    with suppress(model, neurons, rows=[False, True]):
        mixed = logits(model, same_prompt)
    with suppress(model, neurons):
        all_suppressed = logits(model, same_prompt)
    assert torch.equal(mixed[0], baseline[0])
    torch.testing.assert_close(mixed[1], all_suppressed[1])
    assert not torch.allclose(mixed[1], baseline[1])


def test_packed_conditions_merge_into_one_multiply_per_site_and_match_separate_runs():
    """Validation packs conditions as row-masked interventions: one hook fn per site, same numbers as one by one."""
    model = tiny_hf_model("qwen2")
    sites = find_sites(model)
    ms = NeuronSet({(0, "mlp"): [1, 4, 9], (1, "attn_v"): [2]})
    ss = NeuronSet({(0, "mlp"): [4, 11], (1, "attn_o"): [5, 6]})
    batch = TOKENS[:1].repeat(4, 1)
    packed = [Intervention(ms, scale=0.0, rows=[False, True, False, False]),
              Intervention(ss, scale=0.0, rows=[False, False, True, False]),
              Intervention(ss, scale=3.0, rows=[False, False, False, True])]
    site = sites.get(0, "mlp")  # touched by all three conditions
    with intervene(model, *packed):
        registered = sum(len(fns) for fns in hooks._DISPATCHERS[(id(site.module), site.where)].fns.values())
        mixed = logits(model, batch)
    assert registered == 1 and active_hook_count(model) == 0
    single = TOKENS[:1]
    torch.testing.assert_close(mixed[0], logits(model, single)[0])
    with suppress(model, ms):
        torch.testing.assert_close(mixed[1], logits(model, single)[0])
    with suppress(model, ss):
        torch.testing.assert_close(mixed[2], logits(model, single)[0])
    with reinforce(model, ss, alpha=3.0):
        torch.testing.assert_close(mixed[3], logits(model, single)[0])


def test_row_mask_of_wrong_size_is_a_clear_error():
    model = tiny_hf_model("llama")
    rows = [True, False, True]
    with pytest.raises(SSNError, match="row mask has 3 rows but the batch has 2"), \
            suppress(model, NeuronSet({(0, "mlp"): [1]}), rows=rows):
        logits(model)
    assert active_hook_count(model) == 0


def test_reinforce_and_clamp_change_the_neuron_values():
    model = tiny_hf_model("mistral")
    site = find_sites(model).get(0, "mlp")
    neurons = NeuronSet({(0, "mlp"): [3, 9]})
    observed = {}

    def observe(name):
        # Runs after the intervention's edit because it is registered later on the same module.
        return lambda carrier: observed.__setitem__(name, site.read(carrier)[..., [3, 9, 10]].clone())

    with hook_sites({site: observe("base")}):
        logits(model)
    with reinforce(model, neurons, alpha=2.5), hook_sites({site: observe("reinforced")}):
        logits(model)
    with clamp(model, neurons, value=0.75), hook_sites({site: observe("clamped")}):
        logits(model)
    torch.testing.assert_close(observed["reinforced"][..., :2], 2.5 * observed["base"][..., :2])
    torch.testing.assert_close(observed["reinforced"][..., 2], observed["base"][..., 2])
    assert torch.all(observed["clamped"][..., :2] == 0.75)


def test_two_threads_never_see_each_others_hooks():
    model = tiny_hf_model("qwen2")
    sites = find_sites(model)
    strong = NeuronSet({(layer, kind): torch.arange(sites.get(layer, kind).size)
                        for layer in range(2) for kind in ("mlp", "attn_v")})
    baseline = logits(model)
    with suppress(model, strong):
        suppressed = logits(model)
    assert not torch.allclose(baseline, suppressed)

    barrier = threading.Barrier(2)

    def plain_worker() -> list[bool]:
        outcomes = []
        for _ in range(20):
            barrier.wait(timeout=10)
            outcomes.append(torch.equal(logits(model), baseline))
        return outcomes

    def suppressing_worker() -> list[bool]:
        outcomes = []
        with suppress(model, strong):
            for _ in range(20):
                barrier.wait(timeout=10)
                outcomes.append(torch.allclose(logits(model), suppressed))
        return outcomes

    with ThreadPoolExecutor(max_workers=2) as pool:
        plain_future, suppressing_future = pool.submit(plain_worker), pool.submit(suppressing_worker)
        results = {"plain": plain_future.result(), "suppressed": suppressing_future.result()}
    assert results["plain"] == [True] * 20
    assert results["suppressed"] == [True] * 20
    assert active_hook_count(model) == 0


def test_bind_context_carries_hooks_into_a_worker_thread():
    model = tiny_hf_model("llama")
    neurons = NeuronSet({(0, "mlp"): list(range(128)), (1, "mlp"): list(range(128))})
    with suppress(model, neurons):
        expected = logits(model)
        out = {}
        plain = threading.Thread(target=lambda: out.__setitem__("plain", logits(model)))
        bound = threading.Thread(target=bind_context(lambda: out.__setitem__("bound", logits(model))))
        for t in (plain, bound):
            t.start()
            t.join()
    assert torch.equal(out["bound"], expected)
    assert not torch.allclose(out["plain"], expected)


def test_intervention_validates_neurons_against_model():
    model = tiny_hf_model("gpt2")
    with pytest.raises(SSNError, match="layer 5, but the model has 2 layers"), \
            suppress(model, NeuronSet({(5, "mlp"): [0]})):
        pass
    with pytest.raises(SSNError, match="has 128 neurons"), intervene(model, Intervention(NeuronSet({(0, "mlp"): [128]}))):
        pass
    assert active_hook_count(model) == 0


def test_unsupported_architecture_names_supported_families():
    model = tiny_hf_model("llama")
    model.config.model_type = "mamba"
    with pytest.raises(UnsupportedArchitectureError, match="not supported; supported model types: .*gpt2.*llama"):
        find_sites(model)


def test_bnb_quantized_linear_sites_are_hookable():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_hf_model("llama")
    # Swap one MLP's down projection for an 8-bit module: the carrier is still an ordinary tensor.
    layer = model.model.layers[0].mlp
    down = layer.down_proj
    quantized = bnb.nn.Linear8bitLt(down.in_features, down.out_features, bias=False, has_fp16_weights=False)
    quantized.weight = bnb.nn.Int8Params(down.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer.down_proj = quantized.to("cpu")  # bitsandbytes >= 0.49 runs int8 on CPU
    sites = find_sites(model)
    assert type(sites.get(0, "mlp").module).__name__ == "Linear8bitLt"
    baseline = logits(model)
    with suppress(model, NeuronSet({(0, "mlp"): list(range(64))})):
        suppressed = logits(model)
    assert not torch.allclose(baseline, suppressed)
    assert torch.equal(logits(model), baseline)
