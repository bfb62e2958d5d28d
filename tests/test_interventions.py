"""Interventions (`ssn_core.interventions`): row masks, packed conditions as one multiply per site, reinforce and
clamp values, and neuron sets checked against the model."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import TOKENS, logits

from ssn_core import hooks
from ssn_core.errors import SSNError
from ssn_core.hooks import active_hook_count, hook_sites
from ssn_core.interventions import Intervention, clamp, intervene, reinforce, suppress
from ssn_core.neurons import NeuronSet
from ssn_core.sites import SITE_KINDS, find_sites
from ssn_core.testing import tiny_hf_model


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


def test_intervention_validates_neurons_against_model():
    model = tiny_hf_model("gpt2")
    with pytest.raises(SSNError, match="layer 5, but the model has 2 layers"), \
            suppress(model, NeuronSet({(5, "mlp"): [0]})):
        pass
    with pytest.raises(SSNError, match="has 128 neurons"), \
            intervene(model, Intervention(NeuronSet({(0, "mlp"): [128]}))):
        pass
    assert active_hook_count(model) == 0
