"""Bundled neuron sets (`ssn_core.bundle`, `ssn bundle`): round trip, what is left out, and the model check (tiny)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ssn_core.bundle import (
    bundle_problem,
    find_bundle,
    folder_name,
    load_bundle,
    make_bundle,
    save_bundle,
)
from ssn_core.cli import main
from ssn_core.errors import NeuronFileError, SSNError
from ssn_core.generation import GenerationSettings
from ssn_core.identify import IdentifyResult, identify
from ssn_core.prompts import load_builtin
from ssn_core.testing import tiny_model
from ssn_core.validation import shift_offsets, validate


@pytest.fixture(scope="module")
def lm():
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def found(lm):
    prompts = load_builtin(["en", "bn"], n=3)
    result = identify(lm, prompts, ["bn"], method="attribution", aggregate="all", p=0.2,
                      kinds=("mlp", "attn_v", "attn_o"), find_direction=True, activation_means=True, batch_size=8)
    # a tiny random model has almost no SS-Neurons: give bn's MS set the SS role (as the app tests do)
    return dataclasses.replace(result, ss={"bn": result.ms["bn"]}, ss_all=result.ms["bn"])


def test_bundle_round_trip_keeps_sets_direction_and_hr_activations_only(lm, found, tmp_path):
    full = found.save(tmp_path / "run")
    out = save_bundle(IdentifyResult.load(full), tmp_path / "bundles" / "tiny-qwen2", origin=str(full))
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert "scores.safetensors" not in files and "pairs.json" not in files
    assert {"manifest.json", "counts.csv", "overlap.csv", "direction.safetensors", "activations.safetensors",
            "sets/ss_all.json", "sets/ms_en.json", "sets/ms_bn.json", "sets/ss_bn.json"} <= files
    assert (out / "activations.safetensors").stat().st_size < (full / "activations.safetensors").stat().st_size / 3

    bundle = IdentifyResult.load(out, lm.sites)
    assert bundle.is_bundle and not found.is_bundle and bundle.scores is None
    info = bundle.manifest["bundle"]
    assert info["model_source"] == "tiny:qwen2" and info["model_fingerprint"] == lm.sites.fingerprint()
    assert info["origin"] == str(full) and any("score table" in x for x in info["left_out"])
    assert bundle.ms == found.ms and bundle.ss == found.ss and bundle.ss_all == found.ss_all
    assert bundle.item_ids == found.item_ids and bundle.hr == ("en",)
    assert bundle.direction.layer == found.direction.layer
    assert torch.equal(bundle.direction.unit, found.direction.unit)
    assert bundle.counts.equals(found.counts)
    # activations: only the signed means of English harmful prompts, exactly those identify measured
    assert list(bundle.activations.signed) == [("en", "harmful")] and not bundle.activations.groups
    assert set(found.activations.signed) > {("en", "harmful")}
    for key, expected in shift_offsets(found.ss_all, found.activations, "en", 1.5).items():
        assert torch.equal(shift_offsets(bundle.ss_all, bundle.activations, "en", 1.5)[key], expected)
    # a bundle saves and bundles again (the Neurons page's "Save result", `ssn bundle` of a bundle)
    again = IdentifyResult.load(bundle.save(tmp_path / "saved"), lm.sites)
    assert again.is_bundle and again.scores is None and again.ss_all == found.ss_all
    rebundled = IdentifyResult.load(save_bundle(bundle, tmp_path / "rebundled"))
    assert rebundled.manifest["bundle"]["origin"] == str(full)

    # validation runs on a bundle: direction control, additive reinforcement from the kept means, held-out items
    val = validate(lm, bundle, load_builtin(["en", "bn"], n=4).select(limit_per_language=1), ["bn"],
                   GenerationSettings(max_new_tokens=2), seeds=(0,), betas=(1.0,))
    conditions = {r["condition"] for r in val.table}
    assert {"baseline", "direction_refusal", "suppress_ss", "random_ss", "shift_ss"} <= conditions
    assert val.summary["direction"]["bn"]["drop"] is not None


def test_bundle_is_offered_only_to_its_model(lm, found, tmp_path):
    root = tmp_path / "starter_neurons"
    save_bundle(found, root / folder_name("tiny:qwen2"))
    assert folder_name("starter:qwen2.5-coder-0.5b") == "qwen2.5-coder-0.5b"
    assert find_bundle(lm, root) == root / "qwen2" and bundle_problem(root / "qwen2", lm) is None
    assert load_bundle(root / "qwen2", lm).ss_all == found.ss_all
    assert find_bundle(lm, tmp_path / "absent") is None  # no asset folder: no bundle, no error

    # another model: another family (other geometry), and the same geometry under another source
    llama = tiny_model("llama")
    assert find_bundle(llama, root) is None
    with pytest.raises(NeuronFileError, match="bundle of tiny:qwen2; the loaded model is tiny:llama"):
        load_bundle(root / "qwen2", llama)
    same_shape = dataclasses.replace(lm, summary=dataclasses.replace(lm.summary, source="starter:other"))
    assert find_bundle(same_shape, root) is None
    with pytest.raises(NeuronFileError, match="starter:other"):
        load_bundle(root / "qwen2", same_shape)
    # same source, another geometry fingerprint (e.g. a bundle made on another version of the model)
    manifest_path = root / "qwen2" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model_fingerprint"] = "0" * 16
    manifest_path.write_text(json.dumps(manifest))
    assert find_bundle(lm, root) is None
    assert "fingerprint 0000000000000000" in bundle_problem(root / "qwen2", lm)
    # a folder that is no bundle
    (root / "junk").mkdir()
    assert "not an SSN Lab neuron bundle" in bundle_problem(root / "junk", lm)


def test_make_bundle_needs_the_model_source(found):
    unnamed = dataclasses.replace(found, manifest={k: v for k, v in found.manifest.items() if k != "model_source"})
    with pytest.raises(SSNError, match="--model-source"):
        make_bundle(unnamed)
    assert make_bundle(unnamed, "tiny:qwen2").manifest["bundle"]["model_source"] == "tiny:qwen2"


def test_cli_bundle_keeps_walkthrough_and_delta_and_refuses_bad_input(lm, found, tmp_path, capsys):
    from ssn_core.delta import NeuronDelta

    run = found.save(tmp_path / "run")
    walkthrough = tmp_path / "walk.json"
    walkthrough.write_text(json.dumps({"language": "bn"}))
    delta_path = NeuronDelta.zeros(lm.model, lm.sites, found.ss_all).save(tmp_path / "delta.safetensors")
    out = tmp_path / "bundle"
    assert main(["bundle", "--neurons", str(run), "--out", str(out), "--walkthrough", str(walkthrough),
                 "--delta", str(delta_path)]) == 0
    printed = capsys.readouterr().out
    assert "bundle for tiny:qwen2" in printed and "refusal direction: layer" in printed
    assert "signed means of en harmful prompts" in printed and "walkthrough.json, delta.safetensors" in printed
    assert json.loads((out / "walkthrough.json").read_text()) == {"language": "bn"}
    # bundling again without them keeps the earlier bundle's walkthrough and delta
    assert main(["bundle", "--neurons", str(run), "--out", str(out)]) == 0
    assert (out / "walkthrough.json").is_file() and (out / "delta.safetensors").is_file()
    assert "walkthrough.json" in json.loads((out / "manifest.json").read_text())["files"]
    capsys.readouterr()

    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["bundle", "--neurons", str(run), "--out", str(out), "--walkthrough", str(bad)]) == 2
    assert "JSON object" in capsys.readouterr().err
    assert main(["bundle", "--neurons", str(run), "--out", str(run)]) == 2
    assert "score table would be lost" in capsys.readouterr().err
    assert main(["bundle", "--neurons", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # commands that need the score table say that a bundle has none
    assert main(["faithfulness", "--neurons", str(out), "--model", "tiny", "--out", str(tmp_path / "f")]) == 2
    assert "is a bundle" in capsys.readouterr().err
