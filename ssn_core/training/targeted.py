"""Targeted fine-tuning, the paper's method: train only the parameter slices a neuron set owns.

One small zero-initialised tensor per owned slice (`ssn_core.delta.NeuronDelta`), added by hooks on the frozen
base, optimised with AdamW over those tensors only (weight decay on the deltas only). The base model is never
modified; the result is a delta that can be switched on (`apply_delta`), saved, loaded, validated and merged on
request. `run_train` is the whole run: evaluate the base, train, evaluate base + delta, save.
"""

from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ssn_core._conventions import check_cancel
from ssn_core.delta import NeuronDelta, apply_delta, neuron_set_hash
from ssn_core.errors import TrainingError
from ssn_core.neurons import NeuronSet
from ssn_core.training.data import SafetyData, _model_name, _sites_of
from ssn_core.training.loop import _frozen, _total_params, _train_loop
from ssn_core.training.results import TrainConfig, TrainProgress, TrainResult
from ssn_core.training.safety_eval import evaluate_safety

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel


def train_neurons(lm: LoadedModel, neurons: NeuronSet, data: SafetyData, config: TrainConfig, *,
                  method: str = "neurons", progress: TrainProgress | None = None,
                  cancel: threading.Event | None = None) -> TrainResult:
    """Train deltas on the slices the neurons own (base frozen and untouched). No evaluation here."""
    config.check()
    model, sites = lm.model, _sites_of(lm)
    if len(neurons) == 0:
        raise TrainingError("the target neuron set is empty: nothing to train")
    torch.manual_seed(config.seed)
    meta = {"data_hash": data.data_hash, "languages": data.languages, "target": config.target,
            "hyperparameters": asdict(config), "model_name": _model_name(lm)}
    delta = NeuronDelta.zeros(model, sites, neurons, meta=meta).requires_grad_(True)
    with _frozen(model):
        losses, seconds, peak = _train_loop(lm, model, delta.parameters(), data, config,
                                            lambda: apply_delta(model, delta), progress, cancel)
    delta.requires_grad_(False)
    for p in delta.parameters():
        p.grad = None
    return TrainResult(method=method, config=config, losses=losses, trainable_params=delta.num_params,
                       total_params=_total_params(model), seconds=seconds, seconds_per_step=seconds / len(losses),
                       peak_memory_mb=peak, delta=delta, neurons=neurons,
                       meta={"neuron_set_hash": neuron_set_hash(neurons), "data_hash": data.data_hash})


def run_train(lm: LoadedModel, neurons: NeuronSet, data: SafetyData, config: TrainConfig, *,
              out_dir: str | Path | None = None, evaluate: bool = True, eval_kwargs: dict | None = None,
              progress: TrainProgress | None = None, cancel: threading.Event | None = None) -> TrainResult:
    """Evaluate the base, train the neuron deltas, evaluate base + delta, and (with ``out_dir``) save.

    Files are written only after everything succeeded, atomically: a cancel or an error leaves none.
    """
    eval_kwargs = dict(eval_kwargs or {})
    eval_kwargs.setdefault("max_length", config.max_length)
    before = (evaluate_safety(lm, data, cancel=cancel, progress=progress, phase="evaluating before", **eval_kwargs)
              if evaluate else None)
    result = train_neurons(lm, neurons, data, config, progress=progress, cancel=cancel)
    if evaluate:
        delta = result.delta
        assert delta is not None  # train_neurons always returns its delta
        result.before = before
        result.after = evaluate_safety(lm, data, lambda: apply_delta(lm, delta), cancel=cancel, progress=progress,
                                       phase="evaluating after", **eval_kwargs)
    check_cancel(cancel, "training was cancelled; nothing was written")
    if out_dir is not None:
        result.save(out_dir)
    return result
