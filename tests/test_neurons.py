"""NeuronSet: algebra, counts, files and validation against the model."""

from __future__ import annotations

import json

import pytest
import torch

from ssn_core.errors import NeuronFileError
from ssn_core.neurons import NeuronSet
from ssn_core.sites import find_sites
from ssn_core.testing import tiny_hf_model


@pytest.fixture(scope="module")
def sites():
    return find_sites(tiny_hf_model("qwen2"))


A = NeuronSet({(0, "mlp"): [5, 1, 3, 3], (1, "attn_v"): [2]}, meta={"language": "en", "method": "impact"})
B = NeuronSet({(0, "mlp"): [3, 7], (1, "attn_q"): [0]}, meta={"language": "bn", "method": "impact"})


def test_construction_sorts_and_deduplicates():
    assert A.get(0, "mlp").tolist() == [1, 3, 5]
    assert len(A) == 4
    assert (0, "mlp", 3) in A and (0, "mlp", 4) not in A
    assert list(A.triples()) == [(0, "mlp", 1), (0, "mlp", 3), (0, "mlp", 5), (1, "attn_v", 2)]
    assert NeuronSet.from_triples(A.triples()) == A
    assert len(NeuronSet({(0, "mlp"): []})) == 0 and NeuronSet({(0, "mlp"): []}).neurons == {}


def test_set_algebra_on_known_inputs():
    assert set((A | B).triples()) == {(0, "mlp", 1), (0, "mlp", 3), (0, "mlp", 5), (0, "mlp", 7), (1, "attn_v", 2),
                                      (1, "attn_q", 0)}
    assert list((A & B).triples()) == [(0, "mlp", 3)]
    assert set((A - B).triples()) == {(0, "mlp", 1), (0, "mlp", 5), (1, "attn_v", 2)}
    assert (A & B).meta == {"method": "impact"}  # only metadata both agree on survives
    assert A.jaccard(B) == pytest.approx(1 / 6)
    assert A.counts_per_layer() == {0: 3, 1: 1}
    assert B.counts_per_kind() == {"mlp": 2, "attn_q": 1}
    assert list(A.restrict(layers=[1]).triples()) == [(1, "attn_v", 2)]
    assert len(A.restrict(kinds=["mlp"])) == 3


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_save_load_round_trip(tmp_path, sites, suffix):
    original = A.with_model_meta(sites)
    path = original.save(tmp_path / f"set{suffix}")
    loaded = NeuronSet.load(path, sites=sites)
    assert loaded == original
    assert loaded.meta == original.meta
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file


def test_validation_rejects_sets_from_another_model(tmp_path, sites):
    other = find_sites(tiny_hf_model("qwen2", intermediate_size=96))
    path = A.with_model_meta(other).save(tmp_path / "other.json")
    with pytest.raises(NeuronFileError, match="computed on a different model"):
        NeuronSet.load(path, sites=sites)
    with pytest.raises(NeuronFileError, match="layer 9, but the model has 2 layers"):
        NeuronSet({(9, "mlp"): [0]}).validate(sites)
    with pytest.raises(NeuronFileError, match="attn_k neuron 32 in layer 0, but that site has 32 neurons"):
        NeuronSet({(0, "attn_k"): [32]}).validate(sites)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(NeuronFileError, match="not found"):
        NeuronSet.load(tmp_path / "missing.json")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(NeuronFileError, match="not a valid JSON neuron file"):
        NeuronSet.load(bad_json)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"layers": [1, 2]}))
    with pytest.raises(NeuronFileError, match="not an SSN Lab neuron set"):
        NeuronSet.load(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(NeuronFileError, match="not a readable safetensors file"):
        NeuronSet.load(garbage)
    pickle_like = tmp_path / "set.pt"
    pickle_like.write_bytes(b"\x80\x04")
    with pytest.raises(NeuronFileError, match="expected .json or .safetensors"):
        NeuronSet.load(pickle_like)
    with pytest.raises(NeuronFileError, match="unknown site kind 'ffn'"):
        NeuronSet({(0, "ffn"): [1]})


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = A.save(tmp_path / "set.json")
    before = path.read_text()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", explode)
    with pytest.raises(OSError):
        B.save(path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.json"]


def test_index_tensors_are_long():
    loaded = NeuronSet({(0, "mlp"): torch.tensor([2, 1], dtype=torch.int32)})
    assert loaded.get(0, "mlp").dtype == torch.long
