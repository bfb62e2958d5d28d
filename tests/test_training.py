"""Targeted fine-tuning: the safety data, the training loop, baselines leaving the model untouched, targets, and
(starter marker) a short real run lowering refusal NLL in an NHR language. `hook_modules` is tested in
test_hooks.py, the slice deltas themselves in test_delta.py."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from delta_helpers import NEURONS, random_delta, token_ids

from ssn_core.delta import NeuronDelta, apply_delta, merge_delta
from ssn_core.errors import Cancelled, PromptSetError, TrainingError
from ssn_core.hooks import active_hook_count
from ssn_core.neurons import NeuronSet
from ssn_core.prompts import load_builtin
from ssn_core.testing import tiny_model
from ssn_core.training import (
    SafetyData,
    TrainConfig,
    _collate,
    build_safety_data,
    encode_example,
    reply_nll,
    response_loss,
    run_train,
    split_ids,
    train_full,
    train_lora,
    train_neurons,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


def _toy_data(languages=("en", "zh"), n: int = 6) -> SafetyData:
    """Harmful prompts -> refusal templates, no retain set (the tiny model cannot generate meaningfully)."""
    prompts = load_builtin(list(languages), n=n)
    return build_safety_data(None, prompts, list(languages), retain=False, heldout_fraction=0.34, seed=0)


# ----- data -----------------------------------------------------------------------------------------


def test_split_is_by_item_id_and_reply_tokens_only_are_scored():
    data = _toy_data(("en", "zh", "sw"), n=8)
    train_ids = {ex.item_id for ex in data.train}
    held_ids = {ex.item_id for ex in data.heldout}
    assert train_ids and held_ids and not (train_ids & held_ids)
    for item in held_ids:  # every language of a held-out item is held out
        assert {ex.language for ex in data.heldout if ex.item_id == item} == {"en", "zh", "sw"}
    assert split_ids(["a", "b", "c", "d"], 0.5, 3) == split_ids(["d", "c", "b", "a"], 0.5, 3)
    lm = tiny_model("qwen2")
    ex = data.train[0]
    ids, first = encode_example(lm, ex, max_length=512)
    reply_text = lm.tokenizer.decode(ids[first:])
    assert reply_text.startswith(ex.reply) and reply_text.endswith("<|im_end|>\n")
    assert lm.tokenizer.decode(ids[:first]) == lm.format_chat(ex.user_text)


# ----- training -------------------------------------------------------------------------------------


def test_response_loss_on_reply_positions_equals_full_logits():
    """The output layer runs only from the first reply position on; the loss must be the full-logits loss."""
    lm = tiny_model("qwen2")
    data = _toy_data(("en", "sw"), n=4)
    batch = [encode_example(lm, ex, max_length=96) for ex in data.train[:3]]
    input_ids, attention, labels = _collate(batch, pad_id=0)
    loss, n_tokens = response_loss(lm.model, input_ids, attention, labels)
    with torch.no_grad():
        logits = lm.model(input_ids=input_ids, attention_mask=attention).logits
    target = labels[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum") / (target != -100).sum()
    assert n_tokens == int((target != -100).sum()) > 0
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_loss_decreases_on_a_toy_task():
    lm = tiny_model("qwen2")
    data = _toy_data()
    neurons = NeuronSet({(layer, "mlp"): list(range(128)) for layer in range(2)})
    config = TrainConfig(steps=25, lr=1e-2, batch_size=4, max_length=96, weight_decay=0.0)
    nll_before = reply_nll(lm, data.train, max_length=96)
    result = train_neurons(lm, neurons, data, config)
    nll_after = reply_nll(lm, data.train, lambda: apply_delta(lm, result.delta), max_length=96)
    assert sum(result.losses[-5:]) / 5 < 0.9 * sum(result.losses[:5]) / 5
    assert all(nll_after[lang] < nll_before[lang] - 0.1 for lang in nll_before)


def test_training_changes_only_selected_slices():
    lm = tiny_model("qwen2")
    before = {name: p.detach().clone() for name, p in lm.model.state_dict().items()}
    requires_grad = [p.requires_grad for p in lm.model.parameters()]
    result = train_neurons(lm, NEURONS, _toy_data(), TrainConfig(steps=3, lr=1e-2, batch_size=4, max_length=96))
    assert result.trainable_params == result.delta.num_params and 0 < result.trainable_share < 0.01
    assert all(p.abs().sum() > 0 for p in result.delta.parameters())
    # the cached model is untouched: same values, no grads, requires_grad restored, no hooks
    for name, p in lm.model.state_dict().items():
        assert torch.equal(p, before[name]), name
    assert all(p.grad is None for p in lm.model.parameters())
    assert [p.requires_grad for p in lm.model.parameters()] == requires_grad
    assert active_hook_count(lm.model) == 0

    merged_model = copy.deepcopy(lm.model)
    merge_delta(merged_model, result.delta)
    owned = {}
    for (layer, kind), idx in NEURONS.neurons.items():
        for piece in lm.sites.get(layer, kind).owned:
            owned.setdefault((piece.module_name, piece.axis), set()).update(piece.coords[idx].tolist())
    for name, p in merged_model.state_dict().items():
        changed = (p != before[name])
        module_name = name.rsplit(".", 1)[0]
        if not name.endswith("weight") or not changed.any():
            assert not changed.any(), name
            continue
        allowed = torch.zeros_like(changed)
        for (mod, axis), coords in owned.items():
            if mod == module_name:
                index = torch.tensor(sorted(coords))
                if axis == "out":
                    allowed[index, :] = True
                else:
                    allowed[:, index] = True
        assert not (changed & ~allowed).any(), f"{name} changed outside the neuron slices"


def test_bnb_4bit_base_trains_with_deltas(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ssn_core.loading import ModelSpec, finish_loaded
    from ssn_core.testing import tiny_hf_model, tiny_tokenizer

    tiny_hf_model("qwen2").save_pretrained(tmp_path / "m")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", device_map="cpu", attn_implementation="eager",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    assert type(quantized.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    lm = finish_loaded(quantized, tiny_tokenizer(), name="tiny-4bit", source="tiny",
                       spec=ModelSpec("tiny", device_map="cpu"), device="cpu", loaded_from="memory", load_seconds=0.0)
    result = train_neurons(lm, NEURONS, _toy_data(), TrainConfig(steps=4, lr=1e-2, batch_size=2, max_length=64))
    assert all(torch.isfinite(torch.tensor(result.losses))) and result.delta.norm() > 0
    ids = token_ids()
    with torch.no_grad():
        base = lm.model(ids).logits
        with apply_delta(lm, result.delta):
            tuned = lm.model(ids).logits
    assert not torch.equal(base, tuned)
    with pytest.raises(TrainingError, match="full-precision"):
        merge_delta(lm.model, result.delta)


def test_cancel_leaves_no_file_and_nan_loss_stops(tmp_path):
    lm = tiny_model("qwen2")
    data = _toy_data()
    cancel = threading.Event()

    def progress(step, total, info):
        if info.get("phase") == "train" and step == 2:
            cancel.set()

    out = tmp_path / "run"
    with pytest.raises(Cancelled):
        run_train(lm, NEURONS, data, TrainConfig(steps=10, max_length=64), out_dir=out, evaluate=False,
                  progress=progress, cancel=cancel)
    assert not out.exists() or not any(out.iterdir())

    broken = tiny_model("qwen2")
    with torch.no_grad():
        broken.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="loss became nan"):
        train_neurons(broken, NEURONS, data, TrainConfig(steps=3, max_length=64))
    with pytest.raises(TrainingError, match="bad training configuration"):
        train_neurons(lm, NEURONS, data, TrainConfig(steps=0))


def test_run_train_writes_delta_and_result(tmp_path):
    lm = tiny_model("qwen2")
    data = _toy_data()
    result = run_train(lm, NEURONS, data, TrainConfig(steps=3, lr=1e-2, max_length=64), out_dir=tmp_path,
                       evaluate=True, eval_kwargs={"generate_replies": False})
    assert (tmp_path / "delta.safetensors").is_file() and (tmp_path / "train_result.json").is_file()
    loaded = NeuronDelta.load(tmp_path / "delta.safetensors", lm.model, lm.sites)
    assert loaded.meta["data_hash"] == data.data_hash and loaded.meta["hyperparameters"]["steps"] == 3
    assert result.after.refusal_nll["zh"] < result.before.refusal_nll["zh"]


def test_baselines_leave_the_model_untouched():
    lm = tiny_model("qwen2")
    data = _toy_data()
    before = {name: p.detach().clone() for name, p in lm.model.state_dict().items()}
    modules_before = dict(lm.model.named_modules())
    config = TrainConfig(steps=3, lr=1e-2, batch_size=2, max_length=64)
    lora = train_lora(lm, data, config, rank=2)
    full = train_full(lm, data, config)
    # per layer and rank: q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64 = 1024
    assert lora.trainable_params == 2 * 2 * 1024
    assert full.trainable_params == sum(p.numel() for p in lm.model.parameters())
    assert dict(lm.model.named_modules()).keys() == modules_before.keys()
    assert all(modules_before[n] is m for n, m in lm.model.named_modules())
    for name, p in lm.model.state_dict().items():
        assert torch.equal(p, before[name]), name
    assert not hasattr(lm.model, "peft_config") and active_hook_count(lm.model) == 0


# ----- starter (real model) -------------------------------------------------------------------------


@pytest.mark.starter
def test_starter_short_run_lowers_refusal_nll_in_heldout_nhr_language(starter):
    prompts = load_builtin(["en", "sw"], n=12)
    data = build_safety_data(starter, prompts, ["en", "sw"], retain=False, heldout_fraction=0.34, seed=0)
    held = [ex for ex in data.heldout if ex.language == "sw"]
    assert held
    mlp_size = starter.sites.sizes()["mlp"]
    neurons = NeuronSet({(layer, "mlp"): list(range(0, mlp_size, 97)) for layer in range(starter.sites.n_layers)})
    result = train_neurons(starter, neurons, data, TrainConfig(steps=4, lr=2e-3, batch_size=4, max_length=96))
    before = reply_nll(starter, held, max_length=96)["sw"]
    after = reply_nll(starter, held, lambda: apply_delta(starter, result.delta), max_length=96)["sw"]
    assert after < before - 0.05, (before, after)


def test_cli_train_writes_delta_and_comparison(tmp_path, tiny_dir):
    from ssn_core.cli import main

    model_dir = tiny_dir("qwen2")
    neuron_file = NEURONS.save(tmp_path / "neurons.json")
    out = tmp_path / "out"
    argv = ["train", "--model", str(model_dir), "--device", "cpu", "--target", str(neuron_file), "--langs", "en,sw",
            "--n", "3", "--steps", "2", "--max-length", "64", "--eval-tokens", "4", "--baselines", "random",
            "--out", str(out)]
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"delta.safetensors", "train_result.json", "comparison.json",
                                              "safety_data.json", "manifest.json"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "ssn-lab/train-result" and "safety_data.json" in manifest["files"]
    assert main([*argv[:5], "--target", "nonsense", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    # A second target trains on exactly the same items, split and retain replies.
    again = tmp_path / "again"
    reuse = ["train", "--model", str(model_dir), "--device", "cpu", "--target", str(neuron_file), "--steps", "1",
             "--max-length", "64", "--no-eval", "--data", str(out / "safety_data.json"), "--out", str(again)]
    assert main(reuse) == 0
    first, second = (json.loads((d / "train_result.json").read_text()) for d in (out, again))
    assert first["meta"]["data_hash"] == second["meta"]["data_hash"]
    assert (again / "safety_data.json").read_text() == (out / "safety_data.json").read_text()
    assert main([*reuse[:-1], str(tmp_path / "y"), "--langs", "en,zh"]) == 2  # languages differ from the data's
    assert not (tmp_path / "y").exists()
    # `ssn evaluate --delta` generates with the delta switched on (MGSM, perplexity, any prompt set).
    evaluate = ["evaluate", "--device", "cpu", "--langs", "en", "--n", "1", "--max-new-tokens", "3",
                "--delta", str(out / "delta.safetensors")]
    assert main([*evaluate, "--model", str(model_dir), "--out", str(tmp_path / "ev")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ev" / "rows.jsonl").read_text().splitlines()]
    assert rows and all(row["condition"].startswith("delta ") for row in rows)
    other_model = tiny_dir("llama")
    assert main([*evaluate, "--model", str(other_model), "--out", str(tmp_path / "ev2")]) == 2
    assert not (tmp_path / "ev2").exists()


def test_safety_data_round_trip_and_bad_files(tmp_path):
    lm = tiny_model("qwen2")
    data = _toy_data(("en", "sw"), n=6)
    path = data.save(tmp_path / "data.json", lm)
    loaded = SafetyData.load(path, lm.sites)
    assert loaded == data
    other = tiny_model("llama")  # retain replies are the base model's own: another model must not reuse them
    with pytest.raises(PromptSetError, match="another model"):
        SafetyData.load(path, other.sites)
    with pytest.raises(PromptSetError, match="not found"):
        SafetyData.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PromptSetError, match="not valid JSON"):
        SafetyData.load(tmp_path / "bad.json")
    leaky = json.loads(path.read_text())
    leaky["heldout_ids"].append(leaky["train"][0]["item_id"])
    (tmp_path / "leaky.json").write_text(json.dumps(leaky))
    with pytest.raises(PromptSetError, match="also appear in train"):
        SafetyData.load(tmp_path / "leaky.json")


def test_resolve_target_from_identify_results(tmp_path):
    from ssn_core.identify import identify
    from ssn_core.training import resolve_target

    lm = tiny_model("qwen2")
    result = identify(lm, load_builtin(["en", "sw", "zh"], n=2), ["sw", "zh"], p=0.2)
    result.save(tmp_path / "ident")
    ident = tmp_path / "ident"
    assert resolve_target("ss", lm.sites, identify_dir=ident) == result.ss_all
    assert resolve_target("ss", lm.sites, identify_dir=ident, languages=["sw", "zh"]) == result.ss_all
    for lang in ("sw", "zh"):
        if len(result.ss[lang]):
            assert resolve_target(f"ss:{lang}", lm.sites, identify_dir=ident) == result.ss[lang]
        else:
            with pytest.raises(TrainingError, match="empty"):
                resolve_target(f"ss:{lang}", lm.sites, identify_dir=ident)
    assert resolve_target("ms-hr", lm.sites, identify_dir=ident) == result.ms["en"]
    random_set = resolve_target("random", lm.sites, identify_dir=ident, languages=["sw", "zh"], seed=3)
    assert random_set.counts() == result.ss_all.counts() and random_set != result.ss_all
    with pytest.raises(TrainingError, match="unknown target"):
        resolve_target("everything", lm.sites, identify_dir=ident)
    with pytest.raises(TrainingError, match="identify results"):
        resolve_target("ss", lm.sites)
    with pytest.raises(TrainingError, match="no MS-Neurons"):
        resolve_target("ms:bn", lm.sites, identify_dir=ident)


def test_ss_shift_reidentifies_under_the_delta():
    from ssn_core.identify import identify
    from ssn_core.training import ss_shift

    lm = tiny_model("qwen2")
    prompts = load_builtin(["en", "sw"], n=2)
    before = identify(lm, prompts, ["sw"], p=0.2)
    unchanged = ss_shift(lm, NeuronDelta.zeros(lm.model, lm.sites, before.ms["en"]), prompts, ["sw"], before, p=0.2)
    assert all(row["jaccard"] == 1.0 for row in unchanged.rows if row["n_before"])
    moved = ss_shift(lm, random_delta(lm, before.ms["en"], scale=2.0), prompts, ["sw"], before, p=0.2)
    assert any(row["jaccard"] < 1.0 for row in moved.rows if row["set"] == "MS")
    assert active_hook_count(lm.model) == 0


def test_training_data_leaves_out_identify_items_and_adds_another_set_as_heldout(tmp_path):
    from ssn_core.prompts import Prompt, PromptSet
    from ssn_core.training import SafetyEval, build_safety_data, paired_refusal_difference

    lm = tiny_model("qwen2")
    prompts = load_builtin(["en", "sw"], n=6)
    used = {"h001", "h002", "s001", "s002"}
    extra = PromptSet(tuple(Prompt(str(i), "sw", "harmful", f"ombi baya {i}") for i in range(3)), "other set")
    data = build_safety_data(lm, prompts, ["en", "sw"], heldout_fraction=0.25, exclude_ids=used,
                             extra_heldout=extra, retain_max_new_tokens=3)
    seen = {ex.item_id for ex in data.train + data.heldout}
    assert not seen & used and {"h003", "s003"} <= seen
    extra_held = [ex for ex in data.heldout if ex.item_id.startswith("x:")]
    assert [ex.item_id for ex in extra_held] == ["x:0", "x:1", "x:2"] and not any(
        ex.item_id.startswith("x:") for ex in data.train)
    assert all(ex.kind == "refusal" and ex.language == "sw" for ex in extra_held)

    def evaluation(verdicts):
        rows = [{"id": str(i), "language": "sw", "label": "harmful", "verdict": v} for i, v in enumerate(verdicts)]
        return SafetyEval({}, {}, {}, {}, {}, {}, rows=rows)

    better = paired_refusal_difference(evaluation(["refusal"] * 6 + ["compliance"] * 2),
                                       evaluation(["compliance"] * 8), ["sw"])
    assert better["pooled"]["mean"] == pytest.approx(0.75) and better["pooled"]["n"] == 8
    assert better["languages"]["sw"]["n"] == 8 and "small" in better["pooled"]["note"]
