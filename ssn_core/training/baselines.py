"""The baselines targeted fine-tuning is compared with: LoRA through PEFT and full fine-tuning.

LoRA goes on every projection module that owns neuron slices, at a rank matched to the neuron slices' parameter
count (`lora_rank_for`) or r=8. PEFT wraps the model's modules in place while a LoRA baseline runs and unwraps
them in a ``finally``; other sessions sharing the model would see the adapter meanwhile, so the app runs
baselines on a model of its own. Full fine-tuning trains a deep copy (small models only); the given model is
untouched. Both use the shared loop (`ssn_core.training.loop`) on the same data and steps.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn

from ssn_core.delta import module_dims
from ssn_core.errors import TrainingError
from ssn_core.sites import SiteMap
from ssn_core.training.data import SafetyData, _sites_of
from ssn_core.training.loop import _frozen, _total_params, _train_loop
from ssn_core.training.results import SafetyEval, TrainConfig, TrainProgress, TrainResult

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel


def _linear_targets(model: nn.Module, sites: SiteMap) -> dict[str, tuple[int, int]]:
    """Every module that owns neuron slices (q/k/v/o, gate/up/down ...) -> (in, out): the LoRA targets."""
    targets: dict[str, tuple[int, int]] = {}
    for site in sites:
        for owned in site.owned:
            if owned.module_name not in targets:
                targets[owned.module_name] = module_dims(model.get_submodule(owned.module_name))
    return targets


def lora_rank_for(model: nn.Module, sites: SiteMap, n_params: int) -> int:
    """The LoRA rank whose parameter count over all projection modules is closest to ``n_params`` (>= 1)."""
    per_rank = sum(n_in + n_out for n_in, n_out in _linear_targets(model, sites).values())
    return max(1, round(n_params / per_rank))


def train_lora(lm: LoadedModel, data: SafetyData, config: TrainConfig, rank: int = 8, *, method: str | None = None,
               evaluate: Callable[[], SafetyEval] | None = None, progress: TrainProgress | None = None,
               cancel: threading.Event | None = None) -> TrainResult:
    """LoRA baseline through PEFT on every projection module; the model is unwrapped again before returning.

    ``evaluate`` (optional) is called while the adapter is active, to fill ``result.after``.
    """
    from peft import LoraConfig, get_peft_model

    config.check()
    model, sites = lm.model, _sites_of(lm)
    torch.manual_seed(config.seed)
    targets = sorted(_linear_targets(model, sites))
    total = _total_params(model)
    lora_config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, bias="none")
    with _frozen(model):
        peft_model = get_peft_model(model, lora_config)
        try:
            params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
            for p in params:
                p.requires_grad_(True)
            trainable = sum(p.numel() for p in params)
            losses, seconds, peak = _train_loop(lm, peft_model, params, data, config, nullcontext, progress, cancel)
            after = evaluate() if evaluate is not None else None
        finally:
            peft_model.unload()  # puts the original modules back (no merge)
            if hasattr(model, "peft_config"):
                del model.peft_config
    return TrainResult(method=method or f"lora-r{rank}", config=config, losses=losses, trainable_params=trainable,
                       total_params=total, seconds=seconds, seconds_per_step=seconds / len(losses),
                       peak_memory_mb=peak, after=after, meta={"rank": rank, "data_hash": data.data_hash})


def train_full(lm: LoadedModel, data: SafetyData, config: TrainConfig, *,
               evaluate: Callable[[LoadedModel], SafetyEval] | None = None, progress: TrainProgress | None = None,
               cancel: threading.Event | None = None) -> TrainResult:
    """Full fine-tuning baseline on a deep copy of the model (small models only; the given model is untouched).

    ``evaluate(lm_copy)`` (optional) is called with a LoadedModel-like view of the tuned copy.
    """
    config.check()
    for p in lm.model.parameters():
        if not p.dtype.is_floating_point:
            raise TrainingError("full fine-tuning needs a full-precision model (this one is quantized)")
    torch.manual_seed(config.seed)
    tuned = copy.deepcopy(lm.model)
    if dataclasses.is_dataclass(lm):  # a LoadedModel: its site map is rebuilt for the copy
        tuned_lm = dataclasses.replace(lm, model=tuned)
    else:
        tuned_lm = copy.copy(lm)
        tuned_lm.model = tuned
    params = list(tuned.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        losses, seconds, peak = _train_loop(tuned_lm, tuned, params, data, config, nullcontext, progress, cancel)
        after = evaluate(tuned_lm) if evaluate is not None else None
    finally:
        del tuned_lm, params
    total = _total_params(tuned)
    del tuned
    return TrainResult(method="full", config=config, losses=losses, trainable_params=total, total_params=total,
                       seconds=seconds, seconds_per_step=seconds / len(losses), peak_memory_mb=peak, after=after,
                       meta={"data_hash": data.data_hash})
