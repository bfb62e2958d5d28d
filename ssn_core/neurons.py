"""NeuronSet: a set of (layer, site kind, neuron index) triples with the metadata that says where it came from.

Stored as ``{(layer, kind): sorted unique LongTensor of indices}``. Saved as JSON (readable, diffable)
or safetensors (compact; one int64 tensor per (layer, kind), metadata in the header). Loading never
unpickles, and `validate` checks the set against the loaded model's `SiteMap` so that a set computed
on another model fails with a clear message instead of silently indexing the wrong neurons.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ssn_core.errors import NeuronFileError, SSNError
from ssn_core.io import atomic_save_safetensors, atomic_write_json, read_safetensors
from ssn_core.sites import SITE_KINDS, SiteMap

FORMAT_VERSION = 1
Key = tuple[int, str]


_NEURON_NAME = re.compile(r"^\s*[Ll]?\s*(\d+)\s*[.:/ ]\s*(mlp|attn_q|attn_k|attn_v|attn_o)\s*[.:/# ]\s*(\d+)\s*$")
MAX_INDEX = 2**31 - 1  # no model has more layers or neurons per site; larger numbers are damage, not data


def _as_index_tensor(indices) -> torch.Tensor:
    """Sorted unique int64 indices; NeuronFileError for floats, booleans, negatives or absurd sizes."""
    try:
        tensor = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise NeuronFileError(f"neuron indices must be whole numbers >= 0 ({exc})") from None
    if tensor.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise NeuronFileError(f"neuron indices must be whole numbers, got {tensor.dtype} values")
    tensor = tensor.to(torch.long).flatten()
    if int(tensor.min()) < 0 or int(tensor.max()) > MAX_INDEX:
        bad = int(tensor.min()) if int(tensor.min()) < 0 else int(tensor.max())
        raise NeuronFileError(f"neuron index {bad} is out of range (indices are >= 0)")
    return torch.unique(tensor)  # sorted, unique


def _whole_number(value, what: str, where: str) -> int:
    """A JSON whole number in [0, MAX_INDEX] (not a bool, not 1.0, not 1e30, not Infinity)."""
    if type(value) is not int:
        raise NeuronFileError(f"{where}: {what} must be a whole number >= 0, got {value!r}")
    if not 0 <= value <= MAX_INDEX:
        raise NeuronFileError(f"{where}: {what} {value} is out of range")
    return value


def parse_neuron_entries(entries, where: str) -> dict[Key, torch.Tensor]:
    """The ``neurons`` list of a JSON neuron set ({layer, kind, indices} objects) with strict types."""
    if not isinstance(entries, list):
        raise NeuronFileError(f"{where}: 'neurons' must be a list of {{layer, kind, indices}} objects")
    grouped: dict[Key, list[int]] = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"layer", "kind", "indices"} <= set(entry):
            raise NeuronFileError(f"{where}: neuron entry {n} must be an object with layer, kind and indices")
        layer = _whole_number(entry["layer"], "layer", where)
        kind = entry["kind"]
        if not isinstance(kind, str) or kind not in SITE_KINDS:
            raise NeuronFileError(f"{where}: unknown site kind {kind!r}; expected one of {', '.join(SITE_KINDS)}")
        if not isinstance(entry["indices"], list):
            raise NeuronFileError(f"{where}: indices of layer {layer} {kind} must be a list")
        indices = [_whole_number(i, "neuron index", where) for i in entry["indices"]]
        grouped.setdefault((layer, kind), []).extend(indices)
    return {key: _as_index_tensor(indices) for key, indices in grouped.items()}  # every index checked above


def parse_meta(value, where: str) -> dict:
    """A neuron set's metadata: a JSON object (absent = {})."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise NeuronFileError(f"{where}: 'meta' must be a JSON object, got {type(value).__name__}")
    return dict(value)


@dataclass
class NeuronSet:
    neurons: dict[Key, torch.Tensor] = field(default_factory=dict)
    # model_fingerprint, model_type, n_layers, sizes, method, language, p, data_hash, ... (JSON-serialisable)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        cleaned: dict[Key, torch.Tensor] = {}
        for (layer, kind), indices in self.neurons.items():
            if kind not in SITE_KINDS:
                raise NeuronFileError(f"unknown site kind {kind!r}; expected one of {', '.join(SITE_KINDS)}")
            try:
                layer_number = operator.index(layer)  # ints, numpy ints, integer 0-d tensors; not 1.0
            except TypeError:
                layer_number = -1
            if isinstance(layer, bool) or layer_number < 0:
                raise NeuronFileError(f"a layer must be a whole number >= 0, got {layer!r}")
            tensor = _as_index_tensor(indices)
            if tensor.numel():
                cleaned[(layer_number, kind)] = tensor
        self.neurons = dict(sorted(cleaned.items(), key=lambda item: (item[0][0], SITE_KINDS.index(item[0][1]))))

    # ----- construction -------------------------------------------------------------------------
    @classmethod
    def from_triples(cls, triples: Iterable[tuple[int, str, int]], meta: dict | None = None) -> NeuronSet:
        grouped: dict[Key, list[int]] = {}
        for layer, kind, index in triples:
            grouped.setdefault((int(layer), kind), []).append(int(index))
        return cls({key: _as_index_tensor(indices) for key, indices in grouped.items()}, dict(meta or {}))

    def triples(self) -> Iterator[tuple[int, str, int]]:
        for (layer, kind), indices in self.neurons.items():
            for index in indices.tolist():
                yield layer, kind, index

    # ----- size and counts ----------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(int(t.numel()) for t in self.neurons.values())

    def __contains__(self, triple: tuple[int, str, int]) -> bool:
        layer, kind, index = triple
        indices = self.neurons.get((layer, kind))
        return indices is not None and bool((indices == index).any())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NeuronSet):
            return NotImplemented
        return self.neurons.keys() == other.neurons.keys() and all(
            torch.equal(self.neurons[k], other.neurons[k]) for k in self.neurons
        )

    def get(self, layer: int, kind: str) -> torch.Tensor:
        return self.neurons.get((layer, kind), torch.empty(0, dtype=torch.long))

    def counts(self) -> dict[Key, int]:
        return {key: int(t.numel()) for key, t in self.neurons.items()}

    def counts_per_layer(self) -> dict[int, int]:
        result: dict[int, int] = {}
        for (layer, _), count in self.counts().items():
            result[layer] = result.get(layer, 0) + count
        return result

    def counts_per_kind(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for (_, kind), count in self.counts().items():
            result[kind] = result.get(kind, 0) + count
        return result

    def fraction_of(self, sites: SiteMap) -> float:
        return len(self) / max(sites.total_neurons, 1)

    # ----- set algebra --------------------------------------------------------------------------
    def _combine(self, other: NeuronSet, op: str, meta: dict | None) -> NeuronSet:
        result: dict[Key, torch.Tensor] = {}
        for key in set(self.neurons) | set(other.neurons):
            a, b = self.get(*key), other.get(*key)
            if op == "union":
                result[key] = torch.cat([a, b])
            elif op == "intersection":
                result[key] = a[torch.isin(a, b)]
            else:  # difference
                result[key] = a[~torch.isin(a, b)]
        merged_meta = {k: v for k, v in self.meta.items() if other.meta.get(k) == v}
        merged_meta.update(meta or {})
        return NeuronSet(result, merged_meta)

    def union(self, other: NeuronSet, meta: dict | None = None) -> NeuronSet:
        return self._combine(other, "union", meta)

    def intersection(self, other: NeuronSet, meta: dict | None = None) -> NeuronSet:
        return self._combine(other, "intersection", meta)

    def difference(self, other: NeuronSet, meta: dict | None = None) -> NeuronSet:
        return self._combine(other, "difference", meta)

    __or__ = union
    __and__ = intersection
    __sub__ = difference

    def restrict(self, layers: Iterable[int] | None = None, kinds: Iterable[str] | None = None) -> NeuronSet:
        """The subset in the given layers and/or site kinds (the A/B chat's layer-range filter)."""
        layer_set = None if layers is None else set(layers)
        kind_set = None if kinds is None else set(kinds)
        kept = {
            key: t for key, t in self.neurons.items()
            if (layer_set is None or key[0] in layer_set) and (kind_set is None or key[1] in kind_set)
        }
        return NeuronSet(kept, dict(self.meta))

    def jaccard(self, other: NeuronSet) -> float:
        union = len(self | other)
        return len(self & other) / union if union else 0.0

    # ----- validation ---------------------------------------------------------------------------
    def validate(self, sites: SiteMap) -> None:
        """Raise NeuronFileError unless every neuron exists in this model and the geometry recorded matches."""
        recorded = self.meta.get("model_fingerprint")
        if recorded and recorded != sites.fingerprint():
            expected = sites.shape_signature()
            got = {k: self.meta.get(k) for k in ("model_type", "n_layers", "sizes")}
            raise NeuronFileError(
                f"this neuron set was computed on a different model (fingerprint {recorded}, {got}); "
                f"the loaded model is {expected} (fingerprint {sites.fingerprint()})"
            )
        for (layer, kind), indices in self.neurons.items():
            if layer < 0 or layer >= sites.n_layers:
                raise NeuronFileError(f"neuron set refers to layer {layer}, but the model has {sites.n_layers} layers")
            if (layer, kind) not in sites.sites:
                raise NeuronFileError(f"neuron set refers to site {kind!r}, which this model does not have")
            size = sites.get(layer, kind).size
            if int(indices.min()) < 0 or int(indices.max()) >= size:
                raise NeuronFileError(
                    f"neuron set refers to {kind} neuron {int(indices.max())} in layer {layer}, "
                    f"but that site has {size} neurons"
                )

    def with_model_meta(self, sites: SiteMap) -> NeuronSet:
        """A copy whose metadata records the geometry of the model it belongs to."""
        meta = dict(self.meta)
        meta.update(model_fingerprint=sites.fingerprint(), **sites.shape_signature())
        return NeuronSet(dict(self.neurons), meta)

    # ----- files --------------------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        return {
            "format": "ssn-lab/neuron-set",
            "version": FORMAT_VERSION,
            "meta": self.meta,
            "neurons": [
                {"layer": layer, "kind": kind, "indices": indices.tolist()}
                for (layer, kind), indices in self.neurons.items()
            ],
        }

    def save(self, path: str | Path) -> Path:
        """Save as JSON (``.json``) or safetensors (``.safetensors``), atomically."""
        path = Path(path)
        if path.suffix == ".json":
            atomic_write_json(path, self.to_json_dict())
        elif path.suffix == ".safetensors":
            tensors = {f"{layer}.{kind}": indices for (layer, kind), indices in self.neurons.items()}
            header = {"format": "ssn-lab/neuron-set", "version": str(FORMAT_VERSION), "meta": json.dumps(self.meta)}
            atomic_save_safetensors(path, tensors, header)
        else:
            raise NeuronFileError(f"cannot save a neuron set as {path.suffix!r}: use .json or .safetensors")
        return path

    @classmethod
    def load(cls, path: str | Path, sites: SiteMap | None = None) -> NeuronSet:
        """Load from JSON or safetensors; with ``sites``, validate against that model."""
        path = Path(path)
        if path.is_dir():
            hint = ""
            if (path / "manifest.json").is_file() and (path / "sets").is_dir():
                hint = (f"; it holds an identify result: pass one of its sets, e.g. {path / 'sets' / 'ss_all.json'}, "
                        f"or the folder itself where a command takes --neurons")
            raise NeuronFileError(f"{path} is a folder, not a neuron file{hint}")
        if not path.is_file():
            raise NeuronFileError(f"neuron file not found: {path}")
        if path.suffix == ".json":
            neuron_set = cls._load_json(path)
        elif path.suffix == ".safetensors":
            neuron_set = cls._load_safetensors(path)
        else:
            raise NeuronFileError(f"unknown neuron file type {path.suffix!r} ({path}): expected .json or .safetensors")
        if sites is not None:
            neuron_set.validate(sites)
        return neuron_set

    @classmethod
    def _load_json(cls, path: Path) -> NeuronSet:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NeuronFileError(f"{path} is not a valid JSON neuron file: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != "ssn-lab/neuron-set":
            raise NeuronFileError(f"{path} is not an SSN Lab neuron set (missing format 'ssn-lab/neuron-set')")
        if "neurons" not in data:
            raise NeuronFileError(f"{path}: malformed neuron set (no 'neurons' list)")
        return cls(parse_neuron_entries(data["neurons"], str(path)), parse_meta(data.get("meta"), str(path)))

    @classmethod
    def _load_safetensors(cls, path: Path) -> NeuronSet:
        header, tensors = read_safetensors(path, "ssn-lab/neuron-set", "neuron set")
        grouped: dict[tuple[int, str], torch.Tensor] = {}
        for name, tensor in tensors.items():
            layer, _, kind = name.partition(".")
            if not layer.isdigit() or tensor.dtype not in (torch.int64, torch.int32) or kind not in SITE_KINDS:
                raise NeuronFileError(f"{path}: unexpected tensor {name!r} ({tensor.dtype})")
            grouped[(int(layer), kind)] = tensor
        try:
            meta = json.loads(header.get("meta", "{}"))
        except json.JSONDecodeError:
            raise NeuronFileError(f"{path}: metadata is not valid JSON") from None
        try:
            return cls(grouped, parse_meta(meta, str(path)))
        except NeuronFileError as exc:
            raise NeuronFileError(f"{path}: {exc}") from None


# ----- one neuron by name: L<layer>.<site>.<index> ------------------------------------------------
def format_neuron(neuron: tuple[int, str, int]) -> str:
    layer, kind, index = neuron
    return f"L{layer}.{kind}.{index}"


def check_neuron(sites: SiteMap, neuron: tuple[int, str, int]) -> tuple[int, str, int]:
    """The neuron, or an SSNError saying which part does not exist in this model."""
    layer, kind, index = neuron
    name = format_neuron(neuron)
    if not 0 <= layer < sites.n_layers:
        raise SSNError(f"{name}: this model has layers 0–{sites.n_layers - 1}")
    if kind not in sites.kinds:
        raise SSNError(f"{name}: this model has no {kind} sites (it has {', '.join(sites.kinds)})")
    size = sites.get(layer, kind).size
    if not 0 <= index < size:
        raise SSNError(f"{name}: {kind} sites of this model have neurons 0–{size - 1}")
    return neuron


def parse_neuron(text: str, sites: SiteMap | None = None) -> tuple[int, str, int]:
    """``"L2.mlp.3814"`` (also ``2.mlp.3814``, ``L2 mlp 3814``) -> (2, "mlp", 3814), checked against ``sites``."""
    match = _NEURON_NAME.match(str(text or ""))
    if not match:
        raise SSNError(f"{str(text).strip()!r} is not a neuron: write it as L<layer>.<site>.<index>, e.g. "
                       f"L2.mlp.3814 (sites: {', '.join(SITE_KINDS)})")
    neuron = (int(match.group(1)), match.group(2), int(match.group(3)))
    return check_neuron(sites, neuron) if sites is not None else neuron


def parse_neurons(text: str, sites: SiteMap | None = None) -> list[tuple[int, str, int]]:
    """Comma-separated neurons, in order, without repeats."""
    parts = [part for part in str(text or "").split(",") if part.strip()]
    return list(dict.fromkeys(parse_neuron(part, sites) for part in parts))
