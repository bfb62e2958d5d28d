"""Several training methods on the same data, steps and evaluation, and the paired difference of two of them.

`compare_finetunes` runs the neuron target, random neurons of the same shape, LoRA (matched rank and r=8) and full
fine-tuning, each evaluated with the same held-out evaluation, and returns the results and the comparison table.
`paired_refusal_difference` compares two methods' held-out refusal prompt by prompt (the same prompts, so
paired), with a bootstrap CI and a sign-flip p-value. (Not `ssn_core.scoring.compare_methods`, which compares
scoring methods.)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from torch import nn

from ssn_core._conventions import check_cancel
from ssn_core.delta import NeuronDelta, apply_delta
from ssn_core.errors import TrainingError
from ssn_core.neurons import NeuronSet
from ssn_core.sites import SiteMap
from ssn_core.training.baselines import lora_rank_for, train_full, train_lora
from ssn_core.training.data import SafetyData, _sites_of
from ssn_core.training.results import SafetyEval, TrainConfig, TrainProgress, TrainResult
from ssn_core.training.safety_eval import evaluate_safety
from ssn_core.training.targeted import train_neurons

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

FINETUNE_METHODS: tuple[str, ...] = ("neurons", "random", "lora-match", "lora-8", "full")


def paired_refusal_difference(a: SafetyEval, b: SafetyEval, languages: Sequence[str] | None = None) -> dict:
    """Held-out refusal after method a minus after method b, per harmful prompt (the same prompts, so paired), pooled
    over ``languages``: mean, bootstrap CI, sign-flip p-value (`metrics.paired_difference`), and per language."""
    from ssn_core.metrics import paired_difference

    def refusals(ev: SafetyEval) -> dict[tuple[str, str], float]:
        return {(r["language"], str(r["id"])): 1.0 if r["verdict"] == "refusal" else 0.0 for r in ev.rows
                if r["label"] == "harmful" and (languages is None or r["language"] in languages)}

    ra, rb = refusals(a), refusals(b)
    keys = sorted(set(ra) & set(rb))
    out = {"pooled": paired_difference([ra[k] - rb[k] for k in keys]).to_dict(), "languages": {}}
    for lang in dict.fromkeys(lang for lang, _ in keys):
        diffs = [ra[k] - rb[k] for k in keys if k[0] == lang]
        out["languages"][lang] = {"n": len(diffs), "mean": sum(diffs) / len(diffs)}
    return out


def compare_finetunes(lm: LoadedModel, neurons: NeuronSet, data: SafetyData, config: TrainConfig,
                      methods: Sequence[str] = ("neurons", "random", "lora-8"), *, eval_kwargs: dict | None = None,
                      random_seed: int = 0, before: SafetyEval | None = None, progress: TrainProgress | None = None,
                      cancel: threading.Event | None = None) -> tuple[list[TrainResult], list[dict]]:
    """Run several methods on the same data, steps and evaluation; returns the results and the comparison table.

    ``before``: the base model's evaluation when already computed (same data and eval settings).
    """
    from ssn_core.validation import random_matched

    unknown = [m for m in methods if m not in FINETUNE_METHODS]
    if unknown:
        raise TrainingError(f"unknown training method(s) {', '.join(unknown)}; "
                            f"choose from {', '.join(FINETUNE_METHODS)}")
    eval_kwargs = dict(eval_kwargs or {})
    eval_kwargs.setdefault("max_length", config.max_length)
    sites = _sites_of(lm)
    if before is None:
        before = evaluate_safety(lm, data, cancel=cancel, progress=progress, phase="evaluating before", **eval_kwargs)
    results: list[TrainResult] = []
    for method in methods:
        check_cancel(cancel, "the comparison was cancelled; nothing was written")
        if method in ("neurons", "random"):
            target = neurons if method == "neurons" else random_matched(neurons, sites, seed=random_seed)
            result = train_neurons(lm, target, data, config, method=method, progress=progress, cancel=cancel)
            delta = result.delta
            result.after = evaluate_safety(lm, data, lambda d=delta: apply_delta(lm.model, d), cancel=cancel,
                                           progress=progress, phase=f"evaluating {method}", **eval_kwargs)
        elif method.startswith("lora"):
            size = _neuron_param_count(lm.model, sites, neurons)
            rank = 8 if method == "lora-8" else lora_rank_for(lm.model, sites, size)
            result = train_lora(lm, data, config, rank, method=method if method == "lora-8" else f"lora-r{rank}",
                                evaluate=partial(evaluate_safety, lm, data, cancel=cancel, progress=progress,
                                                 phase=f"evaluating {method}", **eval_kwargs),
                                progress=progress, cancel=cancel)
        else:  # full
            result = train_full(lm, data, config,
                                evaluate=lambda tuned: evaluate_safety(tuned, data, cancel=cancel, progress=progress,
                                                                       phase="evaluating full", **eval_kwargs),
                                progress=progress, cancel=cancel)
        result.before = before
        results.append(result)
    return results, [r.summary_row() for r in results]


def _neuron_param_count(model: nn.Module, sites: SiteMap, neurons: NeuronSet) -> int:
    return NeuronDelta.zeros(model, sites, neurons).num_params
