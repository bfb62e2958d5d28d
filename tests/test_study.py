"""The fine-tune study (`ssn_core.training.run_study`), on a tiny model: data, target, evaluation and baselines in
one call; the loaded model is never modified (LoRA runs on a private copy); a failing baseline keeps the training."""

from __future__ import annotations

import pytest
import torch

from ssn_core.errors import Cancelled, TrainingError
from ssn_core.hooks import active_hook_count
from ssn_core.neurons import NeuronSet
from ssn_core.prompts import load_builtin
from ssn_core.testing import tiny_model
from ssn_core.training import BASELINES, FINETUNE_METHODS, SafetyData, StudyConfig, TrainConfig, run_study, run_train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread

NEURONS = NeuronSet({(0, "mlp"): [1, 5, 7], (1, "attn_v"): [4, 9], (1, "attn_o"): [1, 2, 40]})
LANGUAGES = ["en", "bn"]


def _config(**kwargs) -> StudyConfig:
    train = TrainConfig(steps=2, lr=1e-2, batch_size=2, max_length=64)
    return StudyConfig(train=train, languages=LANGUAGES, n_per_language=3, eval_max_new_tokens=4, **kwargs)


def _wrapped_by_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") or any("lora_" in name for name, _ in model.named_modules())


def _watch(lm):
    """A progress callback that notes whether the loaded model carried a LoRA adapter at any moment of the run."""
    seen = {"peft": False, "calls": 0}

    def progress(done, total, info) -> None:
        seen["calls"] += 1
        seen["peft"] |= _wrapped_by_peft(lm.model)

    return seen, progress


def test_study_runs_target_and_baselines_and_never_modifies_the_loaded_model():
    lm = tiny_model("qwen2")
    weights = {name: p.detach().clone() for name, p in lm.model.state_dict().items()}
    modules = dict(lm.model.named_modules())
    seen, progress = _watch(lm)
    prompts = load_builtin(LANGUAGES, n=3)
    study = run_study(lm, NEURONS, _config(baselines=("random", "lora-8")), prompts=prompts, progress=progress)

    assert seen["calls"] > 0 and not seen["peft"], "LoRA must run on a private copy, never on the shared model"
    assert all(torch.equal(p, weights[name]) for name, p in lm.model.state_dict().items())
    assert dict(lm.model.named_modules()).keys() == modules.keys() and active_hook_count(lm.model) == 0
    assert study.baseline_error is None and [r.method for r in study.baselines] == ["random", "lora-8"]
    assert study.result.method == "neurons" and len(study.result.losses) == 2 and study.result.delta.norm() > 0
    assert study.result.before is not None and study.result.after is not None
    assert all(r.before is study.result.before for r in study.baselines)  # one evaluation of the base for all
    assert set(study.data.languages) == set(LANGUAGES) and study.seconds > 0
    # the same training as run_train on the same data: the study adds no randomness of its own
    again = run_train(lm, NEURONS, study.data, _config().train, evaluate=False)
    assert again.losses == study.result.losses

    table = study.comparison()
    assert [row["method"] for row in table] == ["neurons", "random", "lora-8"]
    assert table[1:] == study.baseline_rows()
    paired = table[0]["vs_random_nhr_refusal"]
    assert set(paired["languages"]) == {"bn"} and paired["pooled"]["n"] > 0


def test_without_the_private_copy_lora_wraps_the_model_while_it_trains():
    """The negative control of the test above: the watch does see PEFT when the copy is turned off (the CLI, which
    owns its model); afterwards the model is unwrapped again."""
    lm = tiny_model("qwen2")
    seen, progress = _watch(lm)
    run_study(lm, NEURONS, _config(baselines=("lora-8",), evaluate=False, private_copy_for_lora=False),
              prompts=load_builtin(LANGUAGES, n=3), progress=progress)
    assert seen["peft"]
    assert not _wrapped_by_peft(lm.model)


def test_saved_data_is_reused_and_the_files_are_written(tmp_path):
    lm = tiny_model("qwen2")
    first = run_study(lm, NEURONS, _config(evaluate=False), prompts=load_builtin(LANGUAGES, n=3))
    first.write_files(tmp_path, lm)
    assert {p.name for p in tmp_path.iterdir()} == {"delta.safetensors", "train_result.json", "safety_data.json"}
    data = SafetyData.load(tmp_path / "safety_data.json", lm.sites)
    second = run_study(lm, NEURONS, _config(evaluate=False), data=data)
    assert second.data.data_hash == first.data.data_hash and second.result.losses == first.result.losses
    assert second.comparison() == [] and second.paired_vs_random() is None


def test_a_failing_baseline_keeps_the_training_and_a_cancel_is_raised(monkeypatch):
    import ssn_core.training.study as study_module

    lm = tiny_model("qwen2")
    prompts = load_builtin(LANGUAGES, n=3)

    def fail(*args, **kwargs):
        raise TrainingError("full fine-tuning needs a full-precision model")

    monkeypatch.setattr(study_module, "compare_finetunes", fail)
    study = run_study(lm, NEURONS, _config(baselines=("full",), evaluate=False), prompts=prompts)
    assert "full-precision" in str(study.baseline_error) and study.result.delta is not None and not study.baselines

    def cancelled(*args, **kwargs):
        raise Cancelled("cancelled")

    monkeypatch.setattr(study_module, "compare_finetunes", cancelled)
    with pytest.raises(Cancelled):
        run_study(lm, NEURONS, _config(baselines=("random",), evaluate=False), prompts=prompts)


def test_bad_settings_fail_before_any_work():
    assert set(BASELINES) == set(FINETUNE_METHODS) - {"neurons"}  # every training method is a baseline but the target
    lm = tiny_model("qwen2")
    prompts = load_builtin(LANGUAGES, n=3)
    with pytest.raises(TrainingError, match="unknown baseline.*lora-99; choose from random, lora-8, lora-match, full"):
        run_study(lm, NEURONS, _config(baselines=("lora-99",)), prompts=prompts)
    with pytest.raises(TrainingError, match="held-out share"):
        run_study(lm, NEURONS, _config(heldout_fraction=1.0), prompts=prompts)
    with pytest.raises(TrainingError, match="not both"):
        run_study(lm, NEURONS, _config(), prompts=None)
