"""Targeted fine-tuning of safety neurons, and the baselines it is compared with.

The paper's recipe: train only the parameters that belong to a chosen neuron set (the SS-Neurons of the
non-high-resource languages, or the MS-Neurons of English), on harmful prompts paired with refusals, and
NHR safety goes up while general ability stays. Here that is done with `ssn_core.delta`: one small zero-
initialised tensor per owned slice, added by hooks on the frozen base, optimised with AdamW over those
tensors only (weight decay on the deltas only). The base model is never modified; the result is a
`NeuronDelta` that can be switched on (`apply_delta`), saved, loaded, validated and merged on request.

One idea per module; every name is importable from ``ssn_core.training`` as before the split:

- `results`: `TrainConfig` (hyperparameters), `SafetyEval` and `TrainResult` (what a run gives back, its files).
- `data`: the parallel safety data (`build_safety_data`, `SafetyData`): harmful -> refusal, harmless -> the base
  model's own reply, split into train / held-out by item id.
- `loss`: examples as tokens, reply-only next-token NLL (`response_loss`, `reply_nll`).
- `loop`: the AdamW loop every method shares (accumulation, clipping, cancel, peak memory, several processes).
- `safety_eval`: held-out refusal / over-refusal and reply NLLs of one model state (`evaluate_safety`).
- `targeted`: the neuron deltas (`train_neurons`, `run_train`).
- `baselines`: LoRA through PEFT and full fine-tuning (`train_lora`, `train_full`).
- `compare`: every method on the same data and evaluation (`compare_finetunes`), `paired_refusal_difference`.
- `targets`: which neurons to train (`resolve_target`) and how the sets move after training (`ss_shift`).
- `study`: the whole fine-tune study the app and ``ssn train`` run (`run_study`, `StudyConfig`, `StudyResult`): data,
  the neuron target with its evaluation, the baselines (LoRA on a private copy of a shared model).

Several processes (``accelerate launch`` / torchrun, `ssn_core.distributed`): each process trains on its share of
every batch; its loss is its reply tokens' NLL sum over the whole batch's token count, and the delta gradients are
summed with one all-reduce before the optimizer step (the deltas are not an nn.Module, so no DDP wrapper is needed),
so every process takes the step a one-process run takes. Evaluation and the retain replies are generated in shares
too (`distributed.map_chunks`). Only the main process writes files.
"""

from __future__ import annotations

from ssn_core.training.baselines import (
    _linear_targets,  # noqa: F401 - used by bench/train_step.py
    lora_rank_for,
    train_full,
    train_lora,
)
from ssn_core.training.compare import FINETUNE_METHODS, compare_finetunes, paired_refusal_difference
from ssn_core.training.data import (
    SAFETY_DATA_FORMAT,
    SafetyData,
    TrainExample,
    build_safety_data,
    split_ids,
)
from ssn_core.training.loop import (
    _total_params,  # noqa: F401 - used by bench/train_step.py
    is_main_process,
)
from ssn_core.training.loss import (
    _collate,  # noqa: F401 - used by tests/test_training.py and bench/train_step.py
    encode_example,
    reply_nll,
    response_loss,
)
from ssn_core.training.results import RESULT_KIND, SafetyEval, TrainConfig, TrainProgress, TrainResult
from ssn_core.training.safety_eval import evaluate_safety
from ssn_core.training.study import BASELINES, StudyConfig, StudyResult, run_study
from ssn_core.training.targeted import run_train, train_neurons
from ssn_core.training.targets import SSShift, load_delta_for, resolve_target, ss_shift

__all__ = [
    "BASELINES",
    "FINETUNE_METHODS",
    "RESULT_KIND",
    "SAFETY_DATA_FORMAT",
    "SSShift",
    "SafetyData",
    "SafetyEval",
    "StudyConfig",
    "StudyResult",
    "TrainConfig",
    "TrainExample",
    "TrainProgress",
    "TrainResult",
    "build_safety_data",
    "compare_finetunes",
    "encode_example",
    "evaluate_safety",
    "is_main_process",
    "load_delta_for",
    "lora_rank_for",
    "paired_refusal_difference",
    "reply_nll",
    "resolve_target",
    "response_loss",
    "run_study",
    "run_train",
    "split_ids",
    "ss_shift",
    "train_full",
    "train_lora",
    "train_neurons",
]
