"""Reproducible A/B exchanges: one Chat (A/B) turn as a JSON record, and `replay`, which regenerates it.

A record holds what regenerating the turn needs and what tells whether it can be the same:

- the prompt, both replies and their verdicts (with the judge and the language it judged in);
- the intervention on column B: the neuron set itself (so the record is self-contained) and its hash, the scale
  or clamp value and the row mask (``[false, true]``: only B is edited); for the additive reinforcement (``shift``)
  the added offsets too; for the refusal-direction control (``direction``) the direction itself; or "none";
- the generation settings (greedy or sampling, temperature, top-p, max new tokens, system prompt) and the seed;
- the model: name, source, dtype, the neuron-geometry fingerprint and a digest of its weights (a strided sample of
  every parameter: two copies of a model agree, a fine-tuned one does not); library versions.

`replay` regenerates both rows in one batch, exactly as the Chat page does (`generate` of ``[prompt, prompt]``
inside `intervene` with the recorded row mask), and says for each column whether it matches. With greedy
decoding, or sampling with the recorded seed (every row draws from its own generator), the same model and the same
library versions give the same text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ssn_core.errors import NeuronFileError, SSNError
from ssn_core.io import read_json
from ssn_core.neurons import NeuronSet, parse_meta, parse_neuron_entries

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

RECORD_FORMAT = "ssn-lab/ab-exchange"
RECORD_VERSION = 1


def neuron_set_hash(neurons: NeuronSet) -> str:
    """sha256 (16 hex digits) of the set's (layer, kind, indices) content, independent of its metadata."""
    canonical = [[layer, kind, indices.tolist()] for (layer, kind), indices in neurons.neurons.items()]
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()[:16]


_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def weights_digest(model: torch.nn.Module, samples: int = 2048) -> str:
    """sha256 (16 hex digits) of every parameter's name, shape, dtype and a strided sample of its values."""
    if model in _DIGESTS:
        return _DIGESTS[model]
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].float().cpu().contiguous()
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    _DIGESTS[model] = value = digest.hexdigest()[:16]
    return value


def model_identity(lm: LoadedModel) -> dict:
    summary = getattr(lm, "summary", None)
    return {"name": getattr(summary, "name", None), "source": getattr(summary, "source", None),
            "model_type": lm.sites.model_type, "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
            "quantization": getattr(summary, "quantization", None), "fingerprint": lm.sites.fingerprint(),
            "weights": weights_digest(lm.model)}


def _versions() -> dict:
    from ssn_core.identify.run import _versions as versions

    return versions()


def intervention_record(intervention=None, description: str = "", delta=None) -> dict:
    """What column B ran with: ``kind`` none | neurons | delta (a trained delta is described, not embedded)."""
    if delta is not None:
        meta = {k: v for k, v in (getattr(delta, "meta", None) or {}).items() if isinstance(v, str | int | float)}
        return {"kind": "delta", "description": description, "delta": meta}
    if intervention is None:
        return {"kind": "none", "description": description or "no intervention"}
    rows = intervention.rows
    rows_list = None if rows is None else [bool(r) for r in torch.as_tensor(rows).tolist()]
    if not hasattr(intervention, "neurons") and hasattr(intervention, "direction"):  # `DirectionAblation`
        return {"kind": "direction", "description": description or intervention.describe(),
                "direction": [float(x) for x in intervention.direction.detach().float().cpu().tolist()],
                "rows": rows_list, "label": intervention.label}
    if len(intervention.neurons) == 0:
        return {"kind": "none", "description": description or "no intervention"}
    if hasattr(intervention, "offsets"):  # `Shift`: a + offset
        offsets = {f"{layer}|{kind}": [float(x) for x in intervention.offsets[(layer, kind)].float().tolist()]
                   for (layer, kind) in intervention.neurons.neurons}
        return {"kind": "shift", "description": description or intervention.describe(),
                "set_hash": neuron_set_hash(intervention.neurons), "size": len(intervention.neurons),
                "offsets": offsets, "rows": rows_list, "label": intervention.label,
                "neurons": intervention.neurons.to_json_dict()}
    return {"kind": "neurons", "description": description or intervention.describe(),
            "set_hash": neuron_set_hash(intervention.neurons), "size": len(intervention.neurons),
            "scale": float(intervention.scale),
            "value": None if intervention.value is None else float(intervention.value),
            "rows": None if rows is None else [bool(r) for r in torch.as_tensor(rows).tolist()],
            "label": intervention.label, "neurons": intervention.neurons.to_json_dict()}


def make_record(lm: LoadedModel, prompt: str, reply_a: str, reply_b: str, settings, intervention: dict,
                verdicts: dict | None = None, judge: dict | None = None, stopped: bool = False) -> dict:
    """The JSON record of one A/B turn (``intervention`` from `intervention_record`)."""
    return {"format": RECORD_FORMAT, "version": RECORD_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "prompt": prompt, "replies": {"a": reply_a, "b": reply_b}, "stopped": bool(stopped),
            "verdicts": verdicts or {}, "judge": judge or {}, "intervention": intervention,
            "generation": dataclasses.asdict(settings), "seed": int(settings.seed), "model": model_identity(lm),
            "versions": _versions()}


def verdict_dict(verdict) -> dict | None:
    return None if verdict is None else {"label": verdict.label, "reason": verdict.reason}


# ---------------------------------------------------------------------------------------------------
# Reading and replaying
# ---------------------------------------------------------------------------------------------------
def load_record(path: str | Path) -> dict:
    """A record file, checked: NeuronFileError naming what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NeuronFileError(f"{path} is a folder, not an A/B record" if path.is_dir() else
                              f"A/B record not found: {path}")
    record = read_json(path, NeuronFileError)
    return check_record(record, str(path))


def check_record(record, where: str = "the record") -> dict:
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise NeuronFileError(f"{where} is not an SSN Lab A/B record (format {RECORD_FORMAT!r}); download one with "
                              "'Download this exchange' on the Chat page")
    for key, kind in (("prompt", str), ("replies", dict), ("generation", dict), ("intervention", dict)):
        if not isinstance(record.get(key), kind):
            raise NeuronFileError(f"{where}: {key!r} is missing or malformed")
    if not all(isinstance(record["replies"].get(side), str) for side in ("a", "b")):
        raise NeuronFileError(f"{where}: 'replies' must hold the texts of 'a' and 'b'")
    if not record["prompt"].strip():
        raise NeuronFileError(f"{where}: the prompt is empty")
    return record


def record_settings(record: dict):
    """The recorded `GenerationSettings` (unknown fields ignored), validated."""
    from ssn_core.generation import GenerationSettings

    known = {f.name for f in dataclasses.fields(GenerationSettings)}
    try:
        settings = GenerationSettings(**{k: v for k, v in record["generation"].items() if k in known})
    except TypeError as exc:
        raise NeuronFileError(f"the record's generation settings are malformed ({exc})") from None
    settings.validate()
    return settings


def record_intervention(record: dict, sites):
    """The recorded intervention on column B (None for "none"), its neurons checked against ``sites``."""
    from ssn_core.interventions import Intervention, Shift

    info = record["intervention"]
    kind = info.get("kind")
    if kind == "none":
        return None
    if kind == "delta":
        raise SSNError("column B of this exchange used a trained delta, which the record describes but does not hold; "
                       "load the delta on the Fine-tune page and compare there")
    if kind == "direction":
        return _record_direction(info)
    if kind not in ("neurons", "shift") or not isinstance(info.get("neurons"), dict):
        raise NeuronFileError(f"the record's intervention is malformed (kind {kind!r})")
    data = info["neurons"]
    neurons = NeuronSet(parse_neuron_entries(data.get("neurons"), "the record's neuron set"),
                        parse_meta(data.get("meta"), "the record's neuron set"))
    if info.get("set_hash") and neuron_set_hash(neurons) != info["set_hash"]:
        raise NeuronFileError(f"the record's neuron set does not match its hash {info['set_hash']}: the file was "
                              "edited or damaged")
    neurons.validate(sites)
    rows = _record_rows(info)
    if kind == "shift":
        offsets = _record_offsets(info.get("offsets"), neurons)
        return Shift(neurons, offsets, rows=rows, label=str(info.get("label", "")))
    value = info.get("value")
    return Intervention(neurons, scale=float(info.get("scale", 0.0)), value=None if value is None else float(value),
                        rows=rows, label=str(info.get("label", "")))


def _record_rows(info: dict):
    rows = info.get("rows")
    if rows is not None and (not isinstance(rows, list) or len(rows) != 2 or
                             not all(isinstance(r, bool) for r in rows)):
        raise NeuronFileError("the record's row mask must be two true/false values (column A, column B)")
    return rows


def _record_direction(info: dict):
    """The recorded refusal-direction ablation (`DirectionAblation`)."""
    import math

    from ssn_core.direction import DirectionAblation

    values = info.get("direction")
    if not isinstance(values, list) or not values or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in values):
        raise NeuronFileError("the record's refusal direction must be a list of finite numbers")
    return DirectionAblation(torch.tensor(values, dtype=torch.float32), rows=_record_rows(info),
                             label=str(info.get("label", "")))


def _record_offsets(data, neurons: NeuronSet) -> dict:
    """The recorded additive offsets, one list per (layer, kind) of the set, as many values as it has neurons."""
    import math

    if not isinstance(data, dict):
        raise NeuronFileError("the record's additive reinforcement has no offsets")
    offsets = {}
    for (layer, kind), indices in neurons.neurons.items():
        values = data.get(f"{layer}|{kind}")
        if not isinstance(values, list) or len(values) != indices.numel() or not all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in values):
            raise NeuronFileError(f"the record's offsets for {kind} layer {layer} must be {indices.numel()} finite "
                                  "numbers")
        offsets[(layer, kind)] = torch.tensor(values, dtype=torch.float32)
    return offsets


@dataclass
class Replay:
    a: str
    b: str
    recorded_a: str
    recorded_b: str
    stopped: bool
    notes: list[str] = field(default_factory=list)

    def same(self, side: str) -> bool:
        new, old = (self.a, self.recorded_a) if side == "a" else (self.b, self.recorded_b)
        return new.startswith(old) if self.stopped else new == old  # a stopped turn holds a prefix of the reply

    @property
    def matches(self) -> bool:
        return self.same("a") and self.same("b")


def replay(lm: LoadedModel, record: dict) -> Replay:
    """Regenerate both columns of a record on ``lm`` (one batch, the recorded row mask) and compare."""
    from ssn_core.generation import check_prompts, generate
    from ssn_core.interventions import intervene

    record = check_record(record)
    settings = record_settings(record)
    intervention = record_intervention(record, lm.sites)
    prompt = record["prompt"]
    check_prompts(lm, [prompt, prompt], settings)
    notes = []
    recorded, current = record.get("model") or {}, model_identity(lm)
    if recorded.get("fingerprint") and recorded["fingerprint"] != current["fingerprint"]:
        notes.append(f"the record was made on another model ({recorded.get('name')}, {recorded.get('model_type')})")
    elif recorded.get("weights") and recorded["weights"] != current["weights"]:
        notes.append(f"the model's weights differ from the record's (weights digest {current['weights']} vs "
                     f"{recorded['weights']}): the replies may differ")
    if recorded.get("dtype") and recorded["dtype"] != current["dtype"]:
        notes.append(f"the record used {recorded['dtype']} weights, this model is {current['dtype']}")
    versions, now = record.get("versions") or {}, _versions()
    changed = [f"{k} {versions[k]} → {now[k]}" for k in ("torch", "transformers")
               if versions.get(k) not in (None, now[k])]
    if changed:
        notes.append("library versions differ (" + ", ".join(changed) + "): greedy replies can change with them")
    with intervene(lm, *([intervention] if intervention is not None else [])):
        a, b = generate(lm, [prompt, prompt], settings)
    return Replay(a=a, b=b, recorded_a=record["replies"]["a"], recorded_b=record["replies"]["b"],
                  stopped=bool(record.get("stopped")), notes=notes)
