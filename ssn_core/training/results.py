"""What a training run is given and what it gives back: `TrainConfig`, `SafetyEval`, `TrainResult`.

`TrainConfig` holds the hyperparameters of one run and checks them before any work. `SafetyEval` is the held-out
safety and utility of one model state (base, or base + a trained method); `TrainResult` one run's losses, cost,
delta and its evaluations before and after, with the comparison-table row (`summary_row`) and the result folder
(`save`: delta.safetensors, train_result.json, manifest.json). Every method (neurons, random, LoRA, full) returns
the same `TrainResult`, so the comparison treats them alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ssn_core.delta import NeuronDelta
from ssn_core.errors import TrainingError
from ssn_core.neurons import NeuronSet

# progress(step, total, info): info has "phase" and, during training, "loss" (for the live loss chart).
TrainProgress = Callable[[int, int, dict], None]


RESULT_KIND = "ssn-lab/train-result"  # manifest kind of an `ssn train --out` folder


@dataclass
class TrainConfig:
    """Hyperparameters of one run. ``epochs`` (when set) overrides ``steps``."""

    steps: int = 60
    epochs: float | None = None
    lr: float = 5e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    seed: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 0
    target: str = "ss"  # what was trained: ss | ss:LANG | ms-hr | ms:LANG | random | a file path (for the record)

    def check(self) -> None:
        problems = []
        if self.epochs is None and self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            problems.append(f"epochs must be a positive number (got {self.epochs})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number (got {self.lr})")
        if self.batch_size < 1 or self.grad_accum < 1:
            problems.append("batch_size and grad_accum must be >= 1")
        if self.max_length < 8:
            problems.append(f"max_length must be >= 8 tokens (got {self.max_length})")
        if not (self.weight_decay >= 0 and self.grad_clip >= 0 and math.isfinite(self.weight_decay)
                and math.isfinite(self.grad_clip)):
            problems.append(f"weight_decay and grad_clip must be finite numbers >= 0 (got {self.weight_decay}, "
                            f"{self.grad_clip})")
        if problems:
            raise TrainingError("bad training configuration: " + "; ".join(problems))

    def total_steps(self, n_train: int) -> int:
        if self.epochs is None:
            return self.steps
        per_step = self.batch_size * self.grad_accum
        return max(1, math.ceil(self.epochs * n_train / per_step))


@dataclass
class SafetyEval:
    """Held-out safety and utility of one model state (base, or base + a trained method)."""

    refusal: dict[str, float]  # language -> refusal rate on held-out harmful prompts (marker judge)
    over_refusal: dict[str, float]  # language -> refusal rate on held-out harmless prompts
    refusal_nll: dict[str, float]  # language -> NLL (nats/token) of template refusals on held-out harmful prompts
    retain_nll: dict[str, float]  # language -> NLL of the base model's own replies on held-out harmless prompts
    n_harmful: dict[str, int]
    n_harmless: dict[str, int]
    rows: list[dict] = field(default_factory=list)  # one per generated reply (prompt, reply, verdict)

    def table(self) -> list[dict]:
        return [
            {"language": lang, "refusal": self.refusal.get(lang), "over_refusal": self.over_refusal.get(lang),
             "refusal_nll": self.refusal_nll.get(lang), "retain_nll": self.retain_nll.get(lang),
             "n_harmful": self.n_harmful.get(lang, 0), "n_harmless": self.n_harmless.get(lang, 0)}
            for lang in self.refusal_nll
        ]

    def to_dict(self) -> dict:
        return {"table": self.table(), "rows": self.rows}


@dataclass
class TrainResult:
    """One training run: what was trained, how it went, and held-out safety before and after."""

    method: str  # neurons | random | lora-match | lora-8 | full
    config: TrainConfig
    losses: list[float]
    trainable_params: int
    total_params: int
    seconds: float
    seconds_per_step: float
    peak_memory_mb: float | None  # peak RSS (CPU) or peak allocated CUDA memory during training
    delta: NeuronDelta | None = None  # set for neuron-targeted methods
    neurons: NeuronSet | None = None
    before: SafetyEval | None = None
    after: SafetyEval | None = None
    meta: dict = field(default_factory=dict)

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def summary_row(self) -> dict:
        """One row of the comparison table."""
        row = {"method": self.method, "trainable_params": self.trainable_params,
               "trainable_share": float(f"{self.trainable_share:.4g}"),
               "seconds_per_step": round(self.seconds_per_step, 3),
               "peak_memory_mb": None if self.peak_memory_mb is None else round(self.peak_memory_mb, 1),
               "final_loss": round(self.losses[-1], 4) if self.losses else None}
        if self.before is not None and self.after is not None:
            for lang in self.after.refusal_nll:
                b, a = self.before.refusal.get(lang), self.after.refusal.get(lang)
                row[f"refusal_gain:{lang}"] = None if a is None or b is None else round(a - b, 3)
            over_b = _mean(self.before.over_refusal.values())
            over_a = _mean(self.after.over_refusal.values())
            row["over_refusal_change"] = None if over_a is None or over_b is None else round(over_a - over_b, 3)
            ret_b, ret_a = _mean(self.before.retain_nll.values()), _mean(self.after.retain_nll.values())
            row["retain_nll_change"] = None if ret_a is None or ret_b is None else round(ret_a - ret_b, 4)
            ref_b, ref_a = _mean(self.before.refusal_nll.values()), _mean(self.after.refusal_nll.values())
            row["refusal_nll_change"] = None if ref_a is None or ref_b is None else round(ref_a - ref_b, 4)
        return row

    def to_dict(self) -> dict:
        return {
            "method": self.method, "config": asdict(self.config), "losses": self.losses,
            "trainable_params": self.trainable_params, "total_params": self.total_params,
            "trainable_share": self.trainable_share, "seconds": self.seconds,
            "seconds_per_step": self.seconds_per_step, "peak_memory_mb": self.peak_memory_mb,
            "n_neurons": None if self.neurons is None else len(self.neurons),
            "before": None if self.before is None else self.before.to_dict(),
            "after": None if self.after is None else self.after.to_dict(),
            "summary": self.summary_row(), "meta": self.meta,
        }

    def write_files(self, folder: str | Path) -> None:
        """delta.safetensors (neuron methods) and train_result.json into an existing folder, each atomically."""
        from ssn_core.io import atomic_write_json

        folder = Path(folder)
        if self.delta is not None:
            self.delta.save(folder / "delta.safetensors",
                            {"config": asdict(self.config), "method": self.method, **self.meta})
        atomic_write_json(folder / "train_result.json", _json_ready(self.to_dict()))

    def save(self, out_dir: str | Path) -> Path:
        """Write the result folder (`write_files` + manifest.json) as a whole; an existing folder is only replaced
        when it is an earlier training result (`ssn_core.io.check_out_dir`)."""
        from ssn_core.io import writing_result_dir

        with writing_result_dir(out_dir, RESULT_KIND) as tmp:
            self.write_files(tmp)
        return Path(out_dir).expanduser()


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _json_ready(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    return obj
