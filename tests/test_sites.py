"""Neuron sites (`ssn_core.sites`) on tiny random models of every supported family: discovery, what a site
reads, the parameter slices a neuron owns, unsupported architectures, bitsandbytes layers. Hooks and
interventions have their own files (test_hooks.py, test_interventions.py)."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import TOKENS, logits

from ssn_core.errors import UnsupportedArchitectureError
from ssn_core.hooks import hook_sites
from ssn_core.interventions import suppress
from ssn_core.neurons import NeuronSet
from ssn_core.sites import SITE_KINDS, find_sites, weight_axis
from ssn_core.testing import tiny_hf_model


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
