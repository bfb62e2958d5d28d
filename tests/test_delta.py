"""Neuron deltas (`ssn_core.delta`): off is bit-identical, the hook matches the merged weights, row masks, the
parameter count of the owned slices, and save / load / merge with validation against the model."""

from __future__ import annotations

import copy

import pytest
import torch
from delta_helpers import NEURONS, random_delta, token_ids

from ssn_core.delta import NeuronDelta, apply_delta, merge_delta
from ssn_core.errors import NeuronFileError
from ssn_core.hooks import active_hook_count
from ssn_core.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["qwen2", "phi3", "gpt2", "gpt_neox"])
def test_delta_off_is_bit_identical_and_merge_matches_hook(family):
    lm = tiny_model(family)
    delta = random_delta(lm)
    ids = token_ids()
    with torch.no_grad():
        base = lm.model(ids).logits
        with apply_delta(lm, NeuronDelta.zeros(lm.model, lm.sites, NEURONS)):
            zero = lm.model(ids).logits
        with apply_delta(lm, delta):
            hooked = lm.model(ids).logits
        off = lm.model(ids).logits
        merged_model = copy.deepcopy(lm.model)
        merge_delta(merged_model, delta)
        merged = merged_model(ids).logits
    assert torch.equal(off, base) and torch.equal(zero, base)
    assert (hooked - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-4)
    assert active_hook_count(lm.model) == 0


def test_delta_row_mask_edits_only_masked_rows():
    lm = tiny_model("qwen2")
    delta = random_delta(lm)
    ids = token_ids()
    with torch.no_grad():
        base = lm.model(ids).logits
        with apply_delta(lm, delta):
            tuned = lm.model(ids).logits
        with apply_delta(lm, delta, rows=[False, True]):
            mixed = lm.model(ids).logits
    assert torch.equal(mixed[0], base[0])
    torch.testing.assert_close(mixed[1], tuned[1])


def test_delta_param_count_is_exactly_the_owned_slices():
    lm = tiny_model("qwen2")
    delta = NeuronDelta.zeros(lm.model, lm.sites, NEURONS)
    # mlp neuron: row of gate (64) + row of up (64) + column of down (64); q/k/v: row of 64; o: column of 64
    assert delta.num_params == 3 * 3 * 64 + (2 + 1 + 2) * 64 + 3 * 64


def test_save_load_merge_round_trip_and_validation(tmp_path):
    lm = tiny_model("qwen2")
    delta = random_delta(lm)
    path = delta.save(tmp_path / "delta.safetensors", {"note": "test"})
    loaded = NeuronDelta.load(path, lm.model, lm.sites)
    assert loaded.meta["note"] == "test" and loaded.meta["model_fingerprint"] == lm.sites.fingerprint()
    assert loaded.neurons == NEURONS
    ids = token_ids()
    with torch.no_grad():
        with apply_delta(lm, delta):
            hooked = lm.model(ids).logits
        with apply_delta(lm, loaded):
            hooked_loaded = lm.model(ids).logits
        merged_model = copy.deepcopy(lm.model)
        merge_delta(merged_model, loaded)
        merged = merged_model(ids).logits
    assert torch.equal(hooked, hooked_loaded)
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-4)

    other = tiny_model("gpt2")
    with pytest.raises(NeuronFileError, match="different model"):
        NeuronDelta.load(path, other.model, other.sites)
    wider = tiny_model("qwen2", intermediate_size=96)
    with pytest.raises(NeuronFileError):
        NeuronDelta.load(path, wider.model, wider.sites)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(NeuronFileError):
        NeuronDelta.load(tmp_path / "bad.safetensors")
    with pytest.raises(NeuronFileError):
        NeuronDelta.load(tmp_path / "missing.safetensors")
