"""Targeted fine-tuning of safety neurons, and the baselines it is compared with.

The paper's recipe: train only the parameters that belong to a chosen neuron set (the SS-Neurons of the
non-high-resource languages, or the MS-Neurons of English), on harmful prompts paired with refusals, and
NHR safety goes up while general ability stays. Here that is done with `ssn_core.delta`: one small zero-
initialised tensor per owned slice, added by hooks on the frozen base, optimised with AdamW over those
tensors only (weight decay on the deltas only). The base model is never modified; the result is a
`NeuronDelta` that can be switched on (`apply_delta`), saved, loaded, validated and merged on request.

Data (`build_safety_data`): harmful prompts of the chosen languages paired with refusal templates of the
same language (phrasing picked deterministically from seed and item id), plus a *retain* set of harmless
prompts paired with the base model's own greedy replies (self-distillation), so the model does not learn to
refuse everything. Items are split into train / held-out by item id, so the same request in another
language never leaks from train into evaluation. Loss: next-token NLL on the reply tokens only (the prompt
goes through the chat template as a user turn; the reply is appended as the template renders it,
end-of-turn token included).

Baselines on the same data, steps and evaluation (`compare_methods`): random neurons of the same shape,
LoRA through PEFT (rank matched to the neuron slices' parameter count, and r=8), and full fine-tuning
(small models only, on a deep copy). PEFT wraps the model's modules in place while a LoRA baseline runs
and unwraps them in a ``finally``; other sessions sharing the model would see the adapter meanwhile, so the
app should run baselines on a model of their own.

Several processes (``accelerate launch`` / torchrun, `ssn_core.distributed`): each process trains on its share of
every batch; its loss is its reply tokens' NLL sum over the whole batch's token count, and the delta gradients are
summed with one all-reduce before the optimizer step (the deltas are not an nn.Module, so no DDP wrapper is needed),
so every process takes the step a one-process run takes. Evaluation and the retain replies are generated in shares
too (`distributed.map_chunks`). Only the main process writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ssn_core import distributed
from ssn_core.delta import NeuronDelta, apply_delta, module_dims, neuron_set_hash
from ssn_core.errors import Cancelled, PromptSetError, TrainingError
from ssn_core.neurons import NeuronSet
from ssn_core.pairs import own_replies, pick_template, render_pair
from ssn_core.sites import SiteMap

# progress(step, total, info): info has "phase" and, during training, "loss" (for the live loss chart).
TrainProgress = Callable[[int, int, dict], None]

METHODS: tuple[str, ...] = ("neurons", "random", "lora-match", "lora-8", "full")


# ----------------------------------------------------------------------------------------------------------------
# Configuration and results


SAFETY_DATA_FORMAT = "ssn-lab/safety-data"
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


@dataclass(frozen=True)
class TrainExample:
    item_id: str  # the parallel item (same id in every language)
    language: str
    kind: str  # "refusal" (harmful prompt -> refusal) | "retain" (harmless prompt -> base model's own reply)
    user_text: str
    reply: str


@dataclass
class SafetyData:
    """Train and held-out examples, and the held-out prompts used for generation-based evaluation."""

    train: list[TrainExample]
    heldout: list[TrainExample]
    languages: list[str]
    heldout_ids: list[str]
    data_hash: str

    def counts(self) -> dict:
        def count(items):
            out: dict[str, int] = {}
            for ex in items:
                out[f"{ex.kind}:{ex.language}"] = out.get(f"{ex.kind}:{ex.language}", 0) + 1
            return out

        return {"train": count(self.train), "heldout": count(self.heldout)}

    def save(self, path: str | Path, lm=None) -> Path:
        """Write the set as JSON (atomically), so other targets and baselines can train on exactly the same data.

        The retain replies are the base model's own, so the file records which model produced them.
        """
        from ssn_core.io import atomic_write_json

        path = Path(path)
        atomic_write_json(path, {
            "format": SAFETY_DATA_FORMAT, "version": 1, "data_hash": self.data_hash, "languages": self.languages,
            "heldout_ids": self.heldout_ids,
            "model_fingerprint": _sites_of(lm).fingerprint() if lm is not None else None,
            "model_name": _model_name(lm) if lm is not None else None, "counts": self.counts(),
            "train": [asdict(ex) for ex in self.train], "heldout": [asdict(ex) for ex in self.heldout],
        })
        return path

    @classmethod
    def load(cls, path: str | Path, sites: SiteMap | None = None) -> SafetyData:
        """Read a set written by ``save``; with ``sites``, refuse one whose retain replies came from another model."""
        path = Path(path)
        if not path.is_file():
            raise PromptSetError(f"safety data file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PromptSetError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != SAFETY_DATA_FORMAT:
            raise PromptSetError(f"{path} is not an SSN Lab safety data file (missing format {SAFETY_DATA_FORMAT!r}; "
                                 "`ssn train --out DIR` writes DIR/safety_data.json)")
        recorded = data.get("model_fingerprint")
        if sites is not None and recorded and recorded != sites.fingerprint():
            raise PromptSetError(f"{path} was built with another model ({data.get('model_name') or recorded}); its "
                                 "retain replies are that model's own. Build the data again for this model")
        try:
            train = [TrainExample(**ex) for ex in data["train"]]
            heldout = [TrainExample(**ex) for ex in data["heldout"]]
            languages = [str(lang) for lang in data["languages"]]
            heldout_ids = [str(i) for i in data["heldout_ids"]]
            data_hash = str(data["data_hash"])
        except (KeyError, TypeError) as exc:
            raise PromptSetError(f"{path}: malformed safety data ({exc!r})") from None
        if not train:
            raise PromptSetError(f"{path} has no training examples")
        leaked = {ex.item_id for ex in train} & set(heldout_ids)
        if leaked:
            raise PromptSetError(f"{path}: {len(leaked)} held-out item id(s) also appear in train (e.g. {min(leaked)!r})")
        return cls(train=train, heldout=heldout, languages=languages, heldout_ids=heldout_ids, data_hash=data_hash)


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
               "trainable_share": float(f"{self.trainable_share:.4g}"), "seconds_per_step": round(self.seconds_per_step, 3),
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


# ----------------------------------------------------------------------------------------------------------------
# Data


def split_ids(ids: Sequence[str], heldout_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Split item ids into (train, held-out), deterministically; at least one of each when there are two ids."""
    if not (isinstance(heldout_fraction, int | float) and 0 <= heldout_fraction < 1):
        raise TrainingError(f"the held-out share must be a number in [0, 1), got {heldout_fraction}")
    unique = sorted(set(ids))
    shuffled = unique[:]
    random.Random(seed).shuffle(shuffled)
    n_held = round(len(unique) * heldout_fraction)
    if len(unique) >= 2:
        n_held = min(max(n_held, 1), len(unique) - 1)
    return set(shuffled[n_held:]), set(shuffled[:n_held])


def build_safety_data(lm, prompts, languages: Sequence[str], *, heldout_fraction: float = 0.25, seed: int = 0,
                      n_per_language: int | None = None, retain: bool = True, retain_max_new_tokens: int = 48,
                      templates: dict[str, list[str]] | None = None, batch_size: int = 8,
                      exclude_ids=(), extra_heldout=None,
                      progress: TrainProgress | None = None, cancel: threading.Event | None = None) -> SafetyData:
    """The parallel safety set: harmful -> refusal (same language) and harmless -> base model's own reply.

    ``prompts``: a PromptSet (or any iterable of Prompt with .id .language .label .text). Held-out items are
    chosen by item id, so a request's translations are all in train or all held out. The retain replies
    are generated once, greedily, by the *base* model (call this before any delta is active).
    ``exclude_ids``: item ids never used (those identification found the neurons on). ``extra_heldout``: harmful
    prompts of another set (e.g. MultiJail) added to the held-out evaluation only (ids prefixed with ``x:``).
    """
    from ssn_core.judges import load_refusal_templates

    languages = list(dict.fromkeys(languages))
    if not languages:
        raise PromptSetError("no training languages given")
    templates = templates if templates is not None else load_refusal_templates()
    missing = [lang for lang in languages if lang not in templates]
    if missing:
        raise PromptSetError(f"no refusal templates for language(s) {', '.join(missing)}; "
                             f"templates exist for: {', '.join(sorted(templates))}")
    excluded = {str(i) for i in exclude_ids}
    items = [p for p in prompts if p.language in languages and p.label in ("harmful", "harmless")
             and p.id not in excluded]
    harmful = [p for p in items if p.label == "harmful"]
    harmless = [p for p in items if p.label == "harmless"] if retain else []
    if n_per_language is not None:
        harmful = _limit_ids(harmful, n_per_language)
        harmless = _limit_ids(harmless, n_per_language)
    for lang in languages:
        if not any(p.language == lang for p in harmful):
            raise PromptSetError(f"the prompt set has no harmful prompts in {lang!r}")
    train_ids, held_ids = split_ids([p.id for p in harmful], heldout_fraction, seed)
    train_ids_s, held_ids_s = split_ids([p.id for p in harmless], heldout_fraction, seed + 1)
    train_ids |= train_ids_s
    held_ids |= held_ids_s

    examples: list[TrainExample] = [
        TrainExample(p.id, p.language, "refusal", p.text, pick_template(templates[p.language], seed, p.id, p.language))
        for p in harmful
    ]
    if harmless:
        if progress is not None:
            progress(0, len(harmless), {"phase": "retain replies"})

        def retain_progress(done: int, total: int, message: str) -> None:
            if progress is not None:
                progress(done, total, {"phase": "retain replies"})

        replies = own_replies(lm, [p.text for p in harmless], max_new_tokens=retain_max_new_tokens,
                              batch_size=batch_size, progress=retain_progress, cancel=cancel, what="retain replies")
        examples += [TrainExample(p.id, p.language, "retain", p.text, reply.strip() or ".")
                     for p, reply in zip(harmless, replies)]
    train = [ex for ex in examples if ex.item_id in train_ids]
    heldout = [ex for ex in examples if ex.item_id in held_ids]
    for p in extra_heldout or ():
        if p.label == "harmful" and p.language in languages:
            item = f"x:{p.id}"
            heldout.append(TrainExample(item, p.language, "refusal", p.text,
                                        pick_template(templates[p.language], seed, item, p.language)))
            held_ids.add(item)
            examples.append(heldout[-1])
    if not train:
        raise PromptSetError("no training items left after the held-out split; add prompts or lower the held-out share")
    digest = hashlib.sha256(json.dumps([asdict(ex) for ex in examples], ensure_ascii=False).encode()).hexdigest()
    return SafetyData(train=train, heldout=heldout, languages=languages, heldout_ids=sorted(held_ids),
                      data_hash=digest[:16])


def _limit_ids(prompts: list, n: int) -> list:
    """The first ``n`` item ids (in sorted order) in every language, so the limit keeps items parallel."""
    keep = set(sorted({p.id for p in prompts})[:n])
    return [p for p in prompts if p.id in keep]


def encode_example(lm, example: TrainExample, max_length: int) -> tuple[list[int], int]:
    """Token ids (prompt + reply) and the index of the first reply token; the reply is cut to fit max_length."""
    prompt, completion = render_pair(lm, example.user_text, example.reply)
    tokenizer = lm.tokenizer
    # As LoadedModel.tokenize_prompts: a real chat template carries its own special tokens (BOS included).
    add_special = not getattr(lm, "has_chat_template", bool(getattr(tokenizer, "chat_template", None)))
    prompt_ids = list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
    reply_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if len(prompt_ids) >= max_length - 1:  # keep the end of the prompt (the template's assistant header)
        prompt_ids = prompt_ids[-(max_length // 2):]
    reply_ids = reply_ids[: max_length - len(prompt_ids)]
    return prompt_ids + reply_ids, len(prompt_ids)


def _collate(encoded: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # [B, T]
    attention = torch.zeros((len(encoded), width), dtype=torch.long)  # [B, T]
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)  # [B, T]; -100 = not scored
    for row, (ids, first) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, first: len(ids)] = torch.tensor(ids[first:])
    return input_ids, attention, labels


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)


def response_loss(model: nn.Module, input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, int]:
    """Mean next-token NLL over the reply tokens of a batch, and how many tokens it covers.

    The output layer runs only from the first position that predicts a reply token on (``logits_to_keep``): the
    prompt positions' logits would be thrown away, and for a 150k-word vocabulary they are a large share of the
    step's time and memory.
    """
    device = _input_device(model)
    scored = (labels[:, 1:] != -100).any(0).nonzero()  # positions t whose next token is scored
    first = int(scored[0]) if len(scored) else 0
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
    try:
        logits = model(**inputs, logits_to_keep=labels.shape[1] - first).logits  # [B, T - first, V]
    except TypeError:  # a model class without logits_to_keep: all positions
        logits, first = model(**inputs).logits, 0
    shift_logits = logits[:, :-1].float()  # kept position first + i predicts token first + i + 1
    shift_labels = labels[:, first + 1:].to(logits.device)
    n_tokens = int((shift_labels != -100).sum())
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100, reduction="sum") / max(n_tokens, 1)
    return loss, n_tokens


def _input_device(model: nn.Module) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def reply_nll(lm, examples: Sequence[TrainExample], context_factory=nullcontext, max_length: int = 256,
              batch_size: int = 8) -> dict[str, float]:
    """Per-language mean NLL (nats/token) of the examples' replies, under the given context (e.g. a delta)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    pad = _pad_id(lm.tokenizer)
    encoded = [(ex.language, encode_example(lm, ex, max_length)) for ex in examples]

    def run_chunk(chunk) -> list[list]:  # [language, nll, tokens] per row; a launch's processes share the batches
        input_ids, attention, labels = _collate([e for _, e in chunk], pad)
        logits = lm.model(input_ids=input_ids.to(_input_device(lm.model)),
                          attention_mask=attention.to(_input_device(lm.model))).logits
        rows = []
        for row, (lang, _) in enumerate(chunk):
            target = labels[row, 1:].to(logits.device)
            keep = target != -100
            if bool(keep.any()):
                nll = F.cross_entropy(logits[row, :-1][keep].float(), target[keep], reduction="sum")
                rows.append([lang, float(nll), int(keep.sum())])
        return rows

    with torch.no_grad(), context_factory():
        rows = distributed.map_chunks(encoded, batch_size, run_chunk, what="computing reply NLLs")
    for lang, nll, n in rows:  # added in the one-process order
        sums[lang] = sums.get(lang, 0.0) + nll
        counts[lang] = counts.get(lang, 0) + n
    return {lang: sums[lang] / counts[lang] for lang in sums}


# ----------------------------------------------------------------------------------------------------------------
# The training loop (shared by all methods)


def _check_cancel(cancel: threading.Event | None, what: str) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} was cancelled; nothing was written")


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """requires_grad=False on every base parameter while training deltas (restored afterwards)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class _PeakMemory:
    """Peak memory during a block: CUDA max allocated, or the process's peak RSS (Linux, reset via clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # "5" resets the peak RSS (VmHWM) of this process
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak_mb = int(line.split()[1]) / 1024
            except OSError:
                self.peak_mb = None
        return False


def is_main_process() -> bool:
    """True unless this is a non-zero rank under ``accelerate launch`` / torchrun (only rank 0 writes files)."""
    return distributed.is_main()


def _train_loop(lm, model: nn.Module, params: list[torch.Tensor], data: SafetyData, config: TrainConfig,
                context_factory=nullcontext, progress: TrainProgress | None = None,
                cancel: threading.Event | None = None) -> tuple[list[float], float, float | None]:
    """AdamW over ``params`` on the reply NLL; returns (losses per step, seconds, peak memory MB)."""
    config.check()
    rank, world = distributed.world().rank, distributed.world().size
    if world > config.batch_size:
        raise TrainingError(f"each of the {world} processes trains on a share of every batch, so the batch size "
                            f"({config.batch_size}) must be at least the number of processes")
    pad = _pad_id(lm.tokenizer)
    encoded = [encode_example(lm, ex, config.max_length) for ex in data.train]
    total = config.total_steps(len(encoded))
    generator = random.Random(config.seed)
    order: list[int] = []

    def next_batch() -> list[tuple[list[int], int]]:
        nonlocal order
        batch = []
        while len(batch) < config.batch_size:
            if not order:
                order = list(range(len(encoded)))
                generator.shuffle(order)
            batch.append(encoded[order.pop()])
        return batch[rank::world] if world > 1 else batch

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def lr_at(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        return config.lr

    losses: list[float] = []
    device = _input_device(model)
    started = time.perf_counter()
    if progress is not None:
        progress(0, total, {"phase": "train"})
    with _PeakMemory(device) as memory:
        for step in range(total):
            _check_cancel(cancel, "training")
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(config.grad_accum):
                batch = next_batch()  # this process's share of the batch (all of it with one process)
                # The loss is the mean over the whole batch's reply tokens: each process contributes its tokens' sum
                # divided by the batch's token count, and the gradients are summed below (one process: n / n = 1).
                n_local = sum(len(ids) - first for ids, first in batch)
                n_batch = n_local if world == 1 else int(distributed.all_reduce_sum(n_local, "counting reply tokens"))
                part = None
                if batch:
                    input_ids, attention, labels = _collate(batch, pad)
                    with context_factory():
                        loss, n_tokens = response_loss(model, input_ids, attention, labels)
                    part = loss * (n_tokens / max(n_batch, 1))
                part_value = 0.0 if part is None else float(part.detach())
                batch_loss = part_value if world == 1 else distributed.all_reduce_sum(part_value, "adding up the loss")
                if not math.isfinite(batch_loss):  # every process sees the same sum and stops the same way
                    raise TrainingError(
                        f"the training loss became {batch_loss} at step {step + 1}; stopped. Lower the learning "
                        f"rate (now {config.lr:g}), enable gradient clipping, or load the model in a wider dtype"
                    )
                if part is not None:
                    (part / config.grad_accum).backward()
                step_loss += batch_loss / config.grad_accum
            if world > 1:  # every rank reduces every tensor (a rank with an empty shard contributes zeros)
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                distributed.all_reduce_gradients([p.grad for p in params])
            grads = [p for p in params if p.grad is not None]
            if config.grad_clip > 0 and grads:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(grads, config.grad_clip))
                if not math.isfinite(grad_norm):
                    raise TrainingError(f"the gradient norm became {grad_norm} at step {step + 1}; stopped. "
                                        f"Lower the learning rate (now {config.lr:g})")
            optimizer.step()
            losses.append(step_loss)
            if progress is not None:
                progress(step + 1, total, {"phase": "train", "loss": step_loss, "lr": lr_at(step)})
    seconds = time.perf_counter() - started
    return losses, seconds, memory.peak_mb


def _total_params(model: nn.Module) -> int:
    total = 0
    for p in model.parameters():
        # bitsandbytes 4-bit packs two values per byte into a [n/2, 1] uint8 tensor
        total += p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()
    return total


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_safety(lm, data: SafetyData, context_factory=nullcontext, *, settings=None, judge=None,
                    max_eval_per_language: int | None = None, batch_size: int = 8, max_length: int = 256,
                    generate_replies: bool = True, cancel: threading.Event | None = None,
                    progress: TrainProgress | None = None, phase: str = "evaluate") -> SafetyEval:
    """Held-out refusal / over-refusal (generate + marker judge) and reply NLLs under a context.

    ``phase`` names this evaluation in ``progress`` ("evaluating before", "evaluating after").
    """
    from ssn_core.judges import MarkerJudge

    heldout = data.heldout
    if max_eval_per_language is not None:
        kept: list[TrainExample] = []
        seen: dict[tuple[str, str], int] = {}
        for ex in heldout:
            key = (ex.kind, ex.language)
            if seen.get(key, 0) < max_eval_per_language:
                kept.append(ex)
                seen[key] = seen.get(key, 0) + 1
        heldout = kept
    harmful = [ex for ex in heldout if ex.kind == "refusal"]
    harmless = [ex for ex in heldout if ex.kind == "retain"]
    n_replies = len(heldout) if generate_replies else 0
    if progress is not None:
        progress(0, n_replies, {"phase": phase})
    refusal_nll = reply_nll(lm, harmful, context_factory, max_length)
    retain_nll = reply_nll(lm, harmless, context_factory, max_length)
    refusal: dict[str, float] = {}
    over: dict[str, float] = {}
    rows: list[dict] = []
    n_harmful = {lang: sum(ex.language == lang for ex in harmful) for lang in data.languages}
    n_harmless = {lang: sum(ex.language == lang for ex in harmless) for lang in data.languages}
    if generate_replies and heldout:
        from ssn_core.generation import GenerationSettings, generate

        settings = settings if settings is not None else GenerationSettings(max_new_tokens=48)
        judge = judge if judge is not None else MarkerJudge()
        todo = harmful + harmless

        def run_chunk(chunk) -> list[str]:  # under a launch each process answers its share of the batches
            _check_cancel(cancel, "evaluation")
            return generate(lm, [ex.user_text for ex in chunk], settings)

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress(done, total, {"phase": phase})

        with context_factory():
            replies = distributed.map_chunks(todo, batch_size, run_chunk, after=report,
                                             what="generating held-out replies")
        verdicts = judge.judge_many([ex.user_text for ex in todo], replies, [ex.language for ex in todo])
        hits: dict[tuple[str, str], list[bool]] = {}
        for ex, reply, verdict in zip(todo, replies, verdicts):
            hits.setdefault((ex.kind, ex.language), []).append(verdict.label == "refusal")
            rows.append({"id": ex.item_id, "language": ex.language,
                         "label": "harmful" if ex.kind == "refusal" else "harmless", "prompt": ex.user_text,
                         "reply": reply, "verdict": verdict.label})
        for (kind, lang), values in hits.items():
            (refusal if kind == "refusal" else over)[lang] = sum(values) / len(values)
    return SafetyEval(refusal=refusal, over_refusal=over, refusal_nll=refusal_nll, retain_nll=retain_nll,
                      n_harmful=n_harmful, n_harmless=n_harmless, rows=rows)


# ----------------------------------------------------------------------------------------------------------------
# Methods


def train_neurons(lm, neurons: NeuronSet, data: SafetyData, config: TrainConfig, *, method: str = "neurons",
                  progress: TrainProgress | None = None, cancel: threading.Event | None = None) -> TrainResult:
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


def run_train(lm, neurons: NeuronSet, data: SafetyData, config: TrainConfig, *, out_dir: str | Path | None = None,
              evaluate: bool = True, eval_kwargs: dict | None = None, progress: TrainProgress | None = None,
              cancel: threading.Event | None = None) -> TrainResult:
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
        result.before = before
        result.after = evaluate_safety(lm, data, lambda: apply_delta(lm, delta), cancel=cancel, progress=progress,
                                       phase="evaluating after", **eval_kwargs)
    _check_cancel(cancel, "training")
    if out_dir is not None:
        result.save(out_dir)
    return result


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


def train_lora(lm, data: SafetyData, config: TrainConfig, rank: int = 8, *, method: str | None = None,
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


def train_full(lm, data: SafetyData, config: TrainConfig, *, evaluate: Callable[[object], SafetyEval] | None = None,
               progress: TrainProgress | None = None, cancel: threading.Event | None = None) -> TrainResult:
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


def compare_methods(lm, neurons: NeuronSet, data: SafetyData, config: TrainConfig,
                    methods: Sequence[str] = ("neurons", "random", "lora-8"), *, eval_kwargs: dict | None = None,
                    random_seed: int = 0, before: SafetyEval | None = None, progress: TrainProgress | None = None,
                    cancel: threading.Event | None = None) -> tuple[list[TrainResult], list[dict]]:
    """Run several methods on the same data, steps and evaluation; returns the results and the comparison table.

    ``before``: the base model's evaluation when already computed (same data and eval settings).
    """
    from ssn_core.validation import random_matched

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise TrainingError(f"unknown training method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    eval_kwargs = dict(eval_kwargs or {})
    eval_kwargs.setdefault("max_length", config.max_length)
    sites = _sites_of(lm)
    if before is None:
        before = evaluate_safety(lm, data, cancel=cancel, progress=progress, phase="evaluating before", **eval_kwargs)
    results: list[TrainResult] = []
    for method in methods:
        _check_cancel(cancel, "the comparison")
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
                                evaluate=lambda m=method: evaluate_safety(lm, data, cancel=cancel, progress=progress,
                                                                          phase=f"evaluating {m}", **eval_kwargs),
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


def _sites_of(lm) -> SiteMap:
    from ssn_core.interventions import resolve_sites

    return resolve_sites(lm)


def _model_name(lm) -> str:
    summary = getattr(lm, "summary", None)
    for attr in ("name", "model_id", "spec"):
        value = getattr(summary, attr, None)
        if value:
            return str(value)
    return getattr(getattr(lm.model, "config", None), "_name_or_path", "") or ""


# ----------------------------------------------------------------------------------------------------------------
# Targets


def resolve_target(target: str, sites: SiteMap, *, identify_dir: str | Path | None = None,
                   languages: Sequence[str] = (), seed: int = 0) -> NeuronSet:
    """The neuron set to train.

    ``ss`` union of SS(lang) over ``languages`` (the run's SS-all when none are given); ``ss:LANG`` SS(LANG);
    ``ms-hr`` the MS-Neurons of the run's high-resource languages (English by default: the paper's gradient
    mask); ``ms:LANG`` MS(LANG);
    ``random`` random neurons matched per layer and site to the ``ss`` set (seeded); anything else is a
    neuron file (.json / .safetensors).
    """
    from ssn_core.validation import random_matched

    name = target.strip()
    keyword = name in ("ss", "ms-hr", "ms:hr", "random") or name.startswith(("ss:", "ms:"))
    if not keyword:
        if not name.endswith((".json", ".safetensors")):
            raise TrainingError(f"unknown target {target!r}: use ss, ss:LANG, ms-hr, ms:LANG, random or a neuron "
                                "file (.json / .safetensors)")
        return NeuronSet.load(name, sites)
    if identify_dir is None:
        raise TrainingError(f"target {target!r} needs the identify results: pass --neurons DIR (from `ssn identify`)")
    from ssn_core.identify import IdentifyResult

    result = IdentifyResult.load(identify_dir, sites)
    ss, ms = dict(result.ss), dict(result.ms)

    def ss_union(langs: Sequence[str]) -> NeuronSet:
        if not langs and len(result.ss_all):
            return result.ss_all
        langs = [lang for lang in langs if lang in ss] if langs else sorted(ss)
        if not langs:
            raise TrainingError(f"the identify results in {identify_dir} have no SS-Neurons for "
                                f"{', '.join(languages) or 'any language'} (they have: {', '.join(sorted(ss))})")
        union = NeuronSet({}, {})
        for lang in langs:
            union = union | ss[lang]
        union.meta.update(name=f"SS({'+'.join(langs)})")
        return union

    def pick(table: dict, lang: str, what: str) -> NeuronSet:
        if lang not in table:
            raise TrainingError(f"the identify results have no {what} for {lang!r} (they have: {', '.join(sorted(table))})")
        return table[lang]

    if name == "ss":
        neurons = ss_union(list(languages))
    elif name.startswith("ss:"):
        neurons = pick(ss, name[3:], "SS-Neurons")
    elif name in ("ms-hr", "ms:hr"):
        hr = [lang for lang in (getattr(result, "hr", ()) or ("en",)) if lang in ms]
        if not hr:
            raise TrainingError(f"the identify results in {identify_dir} have no MS-Neurons of a high-resource language")
        neurons = NeuronSet({}, {})
        for lang in hr:
            neurons = neurons | ms[lang]
        neurons.meta.update(name=f"MS({'+'.join(hr)})")
    elif name.startswith("ms:"):
        neurons = pick(ms, name[3:], "MS-Neurons")
    elif name == "random":
        neurons = random_matched(ss_union(list(languages)), sites, seed=seed)
    if len(neurons) == 0:
        raise TrainingError(f"target {target!r} is empty in {identify_dir}")
    neurons.validate(sites)
    return neurons


@dataclass
class SSShift:
    """How the MS-/SS-Neurons move when the trained delta is active (re-identification under `apply_delta`)."""

    rows: list[dict]  # language, set (MS/SS), n_before, n_after, jaccard
    after: object  # the IdentifyResult computed with the delta on


def ss_shift(lm, delta: NeuronDelta, prompts, languages: Sequence[str], before, **identify_kwargs) -> SSShift:
    """Re-identify with the delta switched on and compare each language's MS and SS sets with ``before``.

    ``before``: the IdentifyResult the target was taken from; use the same prompts and identify settings.
    """
    from ssn_core.identify import identify

    hr = identify_kwargs.pop("hr", None) or (tuple(before.hr) or ("en",))
    with apply_delta(lm, delta):
        after = identify(lm, prompts, list(languages), hr=hr, **identify_kwargs)
    rows = []
    for name, old, new in (("MS", before.ms, after.ms), ("SS", before.ss, after.ss)):
        for lang in new:
            a, b = old.get(lang, NeuronSet()), new[lang]
            rows.append({"language": lang, "set": name, "n_before": len(a), "n_after": len(b),
                         "jaccard": round(a.jaccard(b), 4)})
    return SSShift(rows=rows, after=after)


def load_delta_for(lm, path: str | Path) -> NeuronDelta:
    """Load a delta file and validate it against this LoadedModel (NeuronFileError if it belongs elsewhere)."""
    return NeuronDelta.load(path, lm.model, _sites_of(lm))
