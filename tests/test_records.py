"""Reproducible A/B records: a Chat-style exchange is recorded, replayed (engine and `ssn chat --replay`), and
tampered or mismatched records are reported, not silently accepted."""

from __future__ import annotations

import json

import pytest

from ssn_core.cli import main
from ssn_core.errors import NeuronFileError, SSNError
from ssn_core.generation import GenerationSettings, generate
from ssn_core.interventions import Intervention, intervene
from ssn_core.loading import load_model
from ssn_core.neurons import NeuronSet
from ssn_core.records import (
    intervention_record,
    load_record,
    make_record,
    neuron_set_hash,
    replay,
    weights_digest,
)

PROMPT = "How do I pick a lock?"


def exchange(lm, settings, neurons=None, scale=0.0):
    """One A/B turn as the Chat page makes it: two identical rows, the intervention on row 1 only."""
    intervention = Intervention(neurons, scale=scale, rows=[False, True], label="test set") if neurons else None
    with intervene(lm, *([intervention] if intervention else [])):
        a, b = generate(lm, [PROMPT, PROMPT], settings)
    return make_record(lm, PROMPT, a, b, settings, intervention_record(intervention),
                       verdicts={"a": {"label": "compliance", "reason": "x"}}, judge={"name": "marker"})


@pytest.fixture
def model_dir(tiny_dir):
    return tiny_dir("qwen2", seed=2)


@pytest.fixture
def lm(model_dir):
    return load_model(str(model_dir), device_map="cpu")


def strong_set():
    return NeuronSet({(0, "mlp"): list(range(128)), (1, "mlp"): list(range(64))})


def test_a_greedy_exchange_replays_to_the_same_replies(lm, tmp_path):
    record = exchange(lm, GenerationSettings(max_new_tokens=8), strong_set())
    assert record["replies"]["a"] != record["replies"]["b"]  # the suppression changes B
    info = record["intervention"]
    assert info["kind"] == "neurons" and info["rows"] == [False, True] and info["scale"] == 0.0
    assert info["set_hash"] == neuron_set_hash(strong_set()) and info["size"] == 192
    assert record["seed"] == 0 and record["generation"]["max_new_tokens"] == 8
    assert record["model"]["fingerprint"] == lm.sites.fingerprint()
    assert record["model"]["weights"] == weights_digest(lm.model)
    assert {"torch", "transformers", "ssn_core"} <= set(record["versions"])
    path = tmp_path / "exchange.json"
    path.write_text(json.dumps(record))
    again = replay(lm, load_record(path))
    assert again.matches and again.a == record["replies"]["a"] and again.b == record["replies"]["b"]
    assert again.notes == []


def test_a_sampled_exchange_replays_with_its_seed(lm):
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.0, seed=7)
    record = exchange(lm, settings, strong_set(), scale=2.0)
    assert replay(lm, record).matches
    record["generation"]["seed"] = 8
    other = replay(lm, record)
    assert other.b != record["replies"]["b"] or other.a != record["replies"]["a"]


def test_changed_replies_and_other_weights_are_reported(lm, tiny):
    record = exchange(lm, GenerationSettings(max_new_tokens=6))  # no intervention: A and B are the same
    assert record["intervention"]["kind"] == "none" and record["replies"]["a"] == record["replies"]["b"]
    record["replies"]["b"] = "something else"
    result = replay(lm, record)
    assert result.same("a") and not result.same("b") and not result.matches
    other = tiny("qwen2", seed=5)  # same geometry, other weights
    notes = replay(other, exchange(lm, GenerationSettings(max_new_tokens=4))).notes
    assert any("weights differ" in n for n in notes)
    stopped = exchange(lm, GenerationSettings(max_new_tokens=6))
    stopped["stopped"], stopped["replies"]["a"] = True, stopped["replies"]["a"][:2]  # Stop: a prefix was kept
    assert replay(lm, stopped).same("a")


def test_bad_records_are_clear_errors(lm, tmp_path):
    with pytest.raises(NeuronFileError, match="not found"):
        load_record(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(NeuronFileError, match="not valid JSON"):
        load_record(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "ssn-lab/neuron-set"}))
    with pytest.raises(NeuronFileError, match="not an SSN Lab A/B record"):
        load_record(tmp_path / "other.json")
    record = exchange(lm, GenerationSettings(max_new_tokens=4), strong_set())
    record["intervention"]["neurons"]["neurons"][0]["indices"] = [1, 2]
    with pytest.raises(NeuronFileError, match="does not match its hash"):
        replay(lm, record)
    record = exchange(lm, GenerationSettings(max_new_tokens=4), strong_set())
    record["generation"]["max_new_tokens"] = 0
    with pytest.raises(SSNError, match="max_new_tokens"):
        replay(lm, record)
    record["generation"]["max_new_tokens"] = 4
    record["intervention"] = {"kind": "delta", "description": "trained delta"}
    with pytest.raises(SSNError, match="trained delta"):
        replay(lm, record)


def test_ssn_chat_replay_says_whether_the_replies_match(lm, model_dir, tmp_path, capsys):
    record = exchange(lm, GenerationSettings(max_new_tokens=6), strong_set())
    path = tmp_path / "exchange.json"
    path.write_text(json.dumps(record))
    assert main(["chat", "--model", str(model_dir), "--device", "cpu", "--replay", str(path)]) == 0
    captured = capsys.readouterr()
    assert "replies match" in captured.err
    assert captured.out.count("matches the record") == 2 and record["replies"]["b"] in captured.out
    record["replies"]["a"] = "not what the model says"
    path.write_text(json.dumps(record))
    assert main(["chat", "--model", str(model_dir), "--device", "cpu", "--replay", str(path)]) == 3
    captured = capsys.readouterr()
    assert "A (DIFFERS from the record)" in captured.out and "replies differ" in captured.err
    assert main(["chat", "--model", str(model_dir), "--replay", str(tmp_path / "none.json")]) == 2
    assert "A/B record not found" in capsys.readouterr().err
    assert main(["chat", "--model", str(model_dir), "--replay", str(path), "hello"]) == 2
    assert main(["chat", "--model", str(model_dir)]) == 2
    assert "give a prompt" in capsys.readouterr().err


def test_additive_and_direction_exchanges_replay(lm):
    """The Chat page's "Add β × mean harmful activation" and "Refusal direction ablated" turns are recorded with
    their offsets / direction, so a replay regenerates them (and a tampered offset list is a clear error)."""
    import torch

    from ssn_core.direction import DirectionAblation
    from ssn_core.interventions import Shift

    settings = GenerationSettings(max_new_tokens=6)
    neurons = NeuronSet({(0, "mlp"): [1, 2, 3], (1, "attn_o"): [4]})
    offsets = {(0, "mlp"): torch.tensor([3.0, -2.0, 5.0]), (1, "attn_o"): torch.tensor([4.0])}
    hidden = lm.model.config.hidden_size
    direction = torch.linspace(-1, 1, hidden)
    for intervention in (Shift(neurons, offsets, rows=[False, True], label="add 1 x mean"),
                         DirectionAblation(direction, rows=[False, True], label="refusal direction")):
        with intervene(lm, intervention):
            a, b = generate(lm, [PROMPT, PROMPT], settings)
        record = json.loads(json.dumps(make_record(lm, PROMPT, a, b, settings, intervention_record(intervention))))
        assert record["intervention"]["kind"] in ("shift", "direction")
        again = replay(lm, record)
        assert again.matches, (again.b, b)
    record["intervention"]["direction"] = ["x"]
    with pytest.raises(NeuronFileError, match="finite numbers"):
        replay(lm, record)
    with intervene(lm, Shift(neurons, offsets, rows=[False, True])):
        a, b = generate(lm, [PROMPT, PROMPT], settings)
    record = make_record(lm, PROMPT, a, b, settings, intervention_record(Shift(neurons, offsets, rows=[False, True])))
    record["intervention"]["offsets"]["0|mlp"] = [1.0]
    with pytest.raises(NeuronFileError, match="3 finite numbers"):
        replay(lm, record)
