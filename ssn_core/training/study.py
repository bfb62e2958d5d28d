"""The fine-tune study: safety data, the neuron target trained and evaluated, and the baselines beside it.

`run_study` is the whole run that the Fine-tune page and ``ssn train`` share: build the parallel safety data (or
take data saved by an earlier run), train the neuron deltas with the held-out evaluation before and after
(`run_train`), then train the chosen baselines on the same data, steps and evaluation (`compare_finetunes`).

The loaded model is never modified. Neuron deltas and random-neuron deltas are hooks, full fine-tuning trains a deep
copy, but PEFT wraps the model's modules in place while a LoRA baseline runs: on a model that others share (the
app's model is shared by every browser session) LoRA baselines therefore run on a private copy
(`StudyConfig.private_copy_for_lora`). A process that owns its model (the CLI) can skip the copy and its memory.

A baseline that fails with an `SSNError` does not lose the finished neuron training: the error is kept in
`StudyResult.baseline_error` for the caller to report (a cancel, and any error under a multi-process launch except
on the main process, is raised as usual).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ssn_core.errors import Cancelled, SSNError, TrainingError
from ssn_core.neurons import NeuronSet
from ssn_core.training.compare import compare_finetunes, paired_refusal_difference
from ssn_core.training.data import SafetyData, build_safety_data
from ssn_core.training.loop import is_main_process
from ssn_core.training.results import TrainConfig, TrainProgress, TrainResult
from ssn_core.training.targeted import run_train

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

# The methods of FINETUNE_METHODS beside "neurons".
BASELINES: tuple[str, ...] = ("random", "lora-8", "lora-match", "full")


@dataclass
class StudyConfig:
    """What one study trains on and compares with (the hyperparameters of every method are ``train``)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    languages: Sequence[str] = ("en", "zh", "bn", "sw")  # of the safety data (saved data brings its own)
    n_per_language: int | None = None  # harmful (and harmless) items per language; None: all
    heldout_fraction: float = 0.25  # share of item ids held out for the evaluation
    exclude_ids: Iterable[str] = ()  # item ids never used (e.g. those identification found the neurons on)
    evaluate: bool = True  # held-out evaluation before and after
    eval_max_new_tokens: int = 48  # of the evaluation replies
    eval_per_language: int | None = None  # held-out items per language and kind to generate for; None: all
    baselines: Sequence[str] = ()  # some of BASELINES, trained on the same data and steps
    private_copy_for_lora: bool = True  # run LoRA baselines on a copy of the model (PEFT wraps modules in place)

    def check(self) -> None:
        """Every setting, before any work (TrainingError naming what is wrong)."""
        self.train.check()
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise TrainingError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
        if not (isinstance(self.heldout_fraction, int | float) and 0 <= self.heldout_fraction < 1):
            raise TrainingError(f"the held-out share must be in [0, 1), got {self.heldout_fraction}")
        if self.eval_max_new_tokens < 1:
            raise TrainingError(f"evaluation replies need at least 1 new token, got {self.eval_max_new_tokens}")

    def eval_kwargs(self) -> dict:
        """The evaluation settings every method shares (`evaluate_safety`'s keywords)."""
        from ssn_core.generation import GenerationSettings

        return {"settings": GenerationSettings(max_new_tokens=self.eval_max_new_tokens),
                "max_eval_per_language": self.eval_per_language}


@dataclass
class StudyResult:
    """The neuron target's run (evaluated before and after), the data it used and each baseline's run."""

    result: TrainResult
    data: SafetyData
    baselines: list[TrainResult] = field(default_factory=list)
    baseline_error: SSNError | None = None  # the baselines failed; ``result`` is complete
    seconds: float = 0.0  # the whole study: data, evaluations, training, baselines

    def baseline_rows(self) -> list[dict]:
        """One comparison row per baseline (`TrainResult.summary_row`)."""
        return [r.summary_row() for r in self.baselines]

    def paired_vs_random(self) -> dict | None:
        """Held-out NHR refusal after the target minus after random neurons of the same shape, prompt by prompt
        (`paired_refusal_difference`); None without a random baseline or an evaluation."""
        random_result = next((r for r in self.baselines if r.method == "random"), None)
        if random_result is None or self.result.after is None or random_result.after is None:
            return None
        nhr = [lang for lang in self.data.languages if lang != "en"]
        return paired_refusal_difference(self.result.after, random_result.after, nhr)

    def comparison(self) -> list[dict]:
        """The comparison table: the target's row first (with ``vs_random_nhr_refusal`` when there is a random
        baseline), then every baseline's; empty without baselines."""
        if not self.baselines:
            return []
        first = self.result.summary_row()
        paired = self.paired_vs_random()
        if paired is not None:
            first["vs_random_nhr_refusal"] = paired
        return [first, *self.baseline_rows()]

    def write_files(self, folder: str | Path, lm: LoadedModel) -> None:
        """delta.safetensors and train_result.json (`TrainResult.write_files`), safety_data.json (reusable as
        ``--data``) and, with baselines, comparison.json, into an existing folder, each atomically."""
        from ssn_core.io import atomic_write_json

        folder = Path(folder)
        self.result.write_files(folder)
        self.data.save(folder / "safety_data.json", lm)
        comparison = self.comparison()
        if comparison:
            atomic_write_json(folder / "comparison.json", comparison)


def run_study(lm: LoadedModel, neurons: NeuronSet, config: StudyConfig, *, prompts=None,
              data: SafetyData | None = None, extra_heldout=None, progress: TrainProgress | None = None,
              cancel: threading.Event | None = None) -> StudyResult:
    """Build the safety data from ``prompts`` (or take ``data``), train and evaluate the neuron target, then the
    baselines on the same data; ``lm`` is left as it was (see the module docstring).

    ``extra_heldout``: harmful prompts of another set added to the held-out evaluation only (`build_safety_data`).
    """
    config.check()
    if (prompts is None) == (data is None):
        raise TrainingError("give the prompts to build the safety data from, or saved safety data, not both")
    started = time.perf_counter()
    if data is None:
        data = build_safety_data(lm, prompts, config.languages, heldout_fraction=config.heldout_fraction,
                                 seed=config.train.seed, n_per_language=config.n_per_language,
                                 exclude_ids=config.exclude_ids, extra_heldout=extra_heldout, progress=progress,
                                 cancel=cancel)
    eval_kwargs = config.eval_kwargs()
    result = run_train(lm, neurons, data, config.train, evaluate=config.evaluate, eval_kwargs=eval_kwargs,
                       progress=progress, cancel=cancel)
    study = StudyResult(result=result, data=data)
    if config.baselines:
        try:
            study.baselines = _run_baselines(lm, neurons, data, config, result, progress, cancel)
        except SSNError as exc:  # the neuron training is done: keep it, the caller reports the failure
            if isinstance(exc, Cancelled) or not is_main_process():
                raise
            study.baseline_error = exc
    study.seconds = time.perf_counter() - started
    return study


def _run_baselines(lm: LoadedModel, neurons: NeuronSet, data: SafetyData, config: StudyConfig, result: TrainResult,
                   progress: TrainProgress | None, cancel: threading.Event | None) -> list[TrainResult]:
    """Every baseline on the same data, steps and evaluation as ``result`` (whose ``before`` is reused)."""
    lora = any(b.startswith("lora") for b in config.baselines)
    own = dataclasses.replace(lm, model=copy.deepcopy(lm.model)) if lora and config.private_copy_for_lora else lm
    try:
        results, _ = compare_finetunes(own, neurons, data, config.train, methods=tuple(config.baselines),
                                       eval_kwargs=config.eval_kwargs(), random_seed=config.train.seed,
                                       before=result.before, progress=progress, cancel=cancel)
    finally:
        del own
    return results
