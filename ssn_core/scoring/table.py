"""The score table: mean importance per neuron for each (language, label) group, and its file.

What every scoring method produces and every later step reads (identify, bundle, faithfulness, the pages). Kept
apart from the computation so that reading a saved table needs no model and none of the scoring kernels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch

from ssn_core.errors import NeuronFileError, SSNError
from ssn_core.io import atomic_save_safetensors, read_safetensors
from ssn_core.sites import SITE_KINDS, SiteMap

ScoringMethod = Literal["impact", "activation", "ablation", "global", "attribution", "direction"]
METHODS: tuple[ScoringMethod, ...] = get_args(ScoringMethod)
FORMAT = "ssn-lab/score-table"
FORMAT_VERSION = 1

Group = tuple[str, str]  # (language, label)


@dataclass
class ScoreTable:
    """Mean importance per neuron for each (language, label) group.

    ``groups[(language, label)][kind]`` is a float32 tensor [n_layers, N]. For ``ablation`` neurons that
    were not in the sample are NaN. ``signed`` (activation method only) holds the mean signed activation
    in the same layout; ``groups`` then holds the mean |activation|.
    """

    # A ScoringMethod and an Aggregate for a table scored here; a loaded table keeps what its file says (unchecked).
    method: str
    aggregate: str
    groups: dict[Group, dict[str, torch.Tensor]]
    counts: dict[Group, int]
    meta: dict = field(default_factory=dict)  # model_fingerprint, model_type, n_layers, sizes, template, ...
    signed: dict[Group, dict[str, torch.Tensor]] | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        present = {kind for per_kind in self.groups.values() for kind in per_kind}
        return tuple(k for k in SITE_KINDS if k in present)

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(language for language, _ in self.groups))

    def get(self, language: str, label: str, kind: str) -> torch.Tensor:
        try:
            return self.groups[(language, label)][kind]
        except KeyError:
            raise SSNError(f"no {kind} scores for ({language}, {label}) in this score table") from None

    def validate(self, sites: SiteMap) -> None:
        recorded = self.meta.get("model_fingerprint")
        if recorded and recorded != sites.fingerprint():
            raise NeuronFileError(
                f"these scores were computed on a different model (fingerprint {recorded}, "
                f"{ {k: self.meta.get(k) for k in ('model_type', 'n_layers', 'sizes')} }); the loaded model is "
                f"{sites.shape_signature()} (fingerprint {sites.fingerprint()})"
            )
        sizes = sites.sizes()
        for group, per_kind in self.groups.items():
            for kind, tensor in per_kind.items():
                expected = (sites.n_layers, sizes.get(kind, -1))
                if tuple(tensor.shape) != expected:
                    raise NeuronFileError(
                        f"scores for {group} {kind} have shape {tuple(tensor.shape)}, but the model has {expected}"
                    )

    # ----- files --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save as safetensors (atomic): one tensor per (language, label, kind), metadata as JSON."""

        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for (language, label), per_kind in self.groups.items():
            for kind, tensor in per_kind.items():
                tensors[f"mean|{language}|{label}|{kind}"] = tensor.float()
        for (language, label), per_kind in (self.signed or {}).items():
            for kind, tensor in per_kind.items():
                tensors[f"signed|{language}|{label}|{kind}"] = tensor.float()
        header = {
            "format": FORMAT,
            "version": str(FORMAT_VERSION),
            "method": self.method,
            "aggregate": self.aggregate,
            "counts": json.dumps([[lang, label, n] for (lang, label), n in self.counts.items()]),
            "meta": json.dumps(self.meta),
        }
        atomic_save_safetensors(path, tensors, header)
        return path

    @classmethod
    def load(cls, path: str | Path, sites: SiteMap | None = None) -> ScoreTable:
        path = Path(path)
        header, tensors = read_safetensors(path, FORMAT, "score table")
        try:
            counts = {(str(lang), str(label)): int(n) for lang, label, n in json.loads(header.get("counts", "[]"))}
            meta = json.loads(header.get("meta", "{}"))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise NeuronFileError(f"{path}: malformed score-table metadata ({exc})") from None
        groups: dict[Group, dict[str, torch.Tensor]] = {}
        signed: dict[Group, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            parts = name.split("|")
            if len(parts) != 4 or parts[0] not in ("mean", "signed") or parts[3] not in SITE_KINDS:
                raise NeuronFileError(f"{path}: unexpected tensor {name!r}")
            target = groups if parts[0] == "mean" else signed
            target.setdefault((parts[1], parts[2]), {})[parts[3]] = tensor.float()
        table = cls(
            method=header.get("method", "?"), aggregate=header.get("aggregate", "?"), groups=groups,
            counts=counts, meta=meta, signed=signed or None,
        )
        if sites is not None:
            table.validate(sites)
        return table

