"""Training deltas: small explicit tensors for the parameter slices owned by a neuron set.

A `NeuronDelta` holds, for every (module, axis) touched by the neurons of a `NeuronSet`
(`NeuronSite.owned`), one trainable tensor:

- ``axis="out"`` (rows of gate/up/fc, of W_Q/W_K/W_V): ``Δ [n, in]``; the module output gets
  ``out[..., c] += x @ Δᵀ``.
- ``axis="in"`` (columns of down/W_O): ``Δ [out, n]``; the module output gets ``out += x[..., c] @ Δᵀ``.

The base model stays frozen and untouched; `apply_delta` adds the terms with `hooks.hook_modules`
only inside its ``with`` block (and only in the calling context). This is why:

- optimizer state is proportional to the selected slices, not to the model;
- it works on a bitsandbytes 4-/8-bit base exactly as on full precision (the hook never reads the
  quantized weight);
- the delta can be switched on and off (A/B chat: base vs tuned in one session), saved alone as a
  small safetensors file, validated against a model, and merged into full-precision weights only
  when the user explicitly asks (`merge_delta` edits the model it is given, in place; never call it
  on the app's cached model, load a separate copy).

Bias entries owned by "out" neurons are not trained (they are a negligible share of the slice).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ssn_core.errors import NeuronFileError, TrainingError
from ssn_core.hooks import hook_modules
from ssn_core.interventions import resolve_model
from ssn_core.io import atomic_save_safetensors, read_safetensors
from ssn_core.neurons import NeuronSet, parse_meta, parse_neuron_entries
from ssn_core.sites import SiteMap, weight_axis

DELTA_FORMAT = "ssn-lab/neuron-delta"
DELTA_VERSION = 1


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module: nn.Linear, bitsandbytes Linear4bit/8bitLt, Conv1D."""
    # torch types a module's attributes as Tensor | Module; these are a weight tensor and two ints.
    if type(module).__name__ == "Conv1D":  # GPT-2: weight [in, out]
        weight = cast(torch.Tensor, module.weight)
        return int(weight.shape[0]), int(weight.shape[1])
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(cast(int, module.in_features)), int(cast(int, module.out_features))
    raise TrainingError(f"cannot train slices of a {type(module).__name__} module (not a linear layer)")


def _module_device(module: nn.Module) -> torch.device:
    """Where the module computes: its weights' device, or, for a layer accelerate offloaded (weights on the meta
    device between passes), the device its hook runs it on."""
    for param in module.parameters():
        if param.device.type == "meta":
            execution = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
            if execution is not None:
                return torch.device(execution)
        return param.device
    return torch.device("cpu")


def neuron_set_hash(neurons: NeuronSet) -> str:
    """Stable short hash of the neurons themselves (not of their metadata)."""
    digest = hashlib.sha256()
    for (layer, kind), indices in neurons.neurons.items():
        digest.update(f"{layer}.{kind}:".encode())
        digest.update(",".join(map(str, indices.tolist())).encode())
        digest.update(b";")
    return digest.hexdigest()[:16]


@dataclass
class SliceDelta:
    """The trainable delta of one module's owned slice."""

    module_name: str
    axis: str  # "out" | "in"
    coords: torch.Tensor  # [n] long, sorted unique positions on the module's ``axis``
    weight: torch.Tensor  # out: [n, in_features]; in: [out_features, n]

    @property
    def key(self) -> str:
        return f"{self.module_name}::{self.axis}"


@dataclass
class NeuronDelta:
    """Trainable slice deltas for one neuron set on one model."""

    neurons: NeuronSet
    slices: dict[str, SliceDelta]
    meta: dict = field(default_factory=dict)

    # ----- construction -------------------------------------------------------------------------
    @classmethod
    def zeros(cls, model: nn.Module, sites: SiteMap, neurons: NeuronSet, dtype: torch.dtype = torch.float32,
              meta: dict | None = None) -> NeuronDelta:
        """All-zero deltas for the slices the neurons own (so applying it changes nothing yet)."""
        neurons.validate(sites)
        coords_per: dict[tuple[str, str], list[torch.Tensor]] = {}
        for (layer, kind), indices in neurons.neurons.items():
            site = sites.get(layer, kind)
            for owned in site.owned:
                # Slice coords of the selected neurons: owned.coords[i] is neuron i's position.
                coords_per.setdefault((owned.module_name, owned.axis), []).append(owned.coords[indices])
        slices: dict[str, SliceDelta] = {}
        for (module_name, axis), parts in coords_per.items():
            module = model.get_submodule(module_name)
            n_in, n_out = module_dims(module)
            coords = torch.unique(torch.cat(parts))  # sorted; fused modules may get coords from several kinds
            shape = (coords.numel(), n_in) if axis == "out" else (n_out, coords.numel())
            weight = torch.zeros(shape, dtype=dtype, device=_module_device(module))
            piece = SliceDelta(module_name, axis, coords, weight)
            slices[piece.key] = piece
        base_meta = {"model_fingerprint": sites.fingerprint(), "model_type": sites.model_type,
                     "neuron_set_hash": neuron_set_hash(neurons), "n_neurons": len(neurons)}
        base_meta.update(meta or {})
        return cls(neurons.with_model_meta(sites), slices, base_meta)

    # ----- size ---------------------------------------------------------------------------------
    def parameters(self) -> list[torch.Tensor]:
        return [piece.weight for piece in self.slices.values()]

    def requires_grad_(self, flag: bool = True) -> NeuronDelta:
        for piece in self.slices.values():
            piece.weight.requires_grad_(flag)
        return self

    @property
    def num_params(self) -> int:
        return sum(piece.weight.numel() for piece in self.slices.values())

    def norm(self) -> float:
        return float(sum(float(p.detach().float().pow(2).sum()) for p in self.parameters()) ** 0.5)

    # ----- validation ---------------------------------------------------------------------------
    def validate(self, model: nn.Module, sites: SiteMap) -> None:
        """Raise NeuronFileError unless every slice exists in this model with the recorded shape."""
        recorded = self.meta.get("model_fingerprint")
        if recorded and recorded != sites.fingerprint():
            raise NeuronFileError(
                f"this delta was trained on a different model ({self.meta.get('model_type')}, fingerprint "
                f"{recorded}); the loaded model is {sites.shape_signature()} (fingerprint {sites.fingerprint()})"
            )
        self.neurons.validate(sites)
        for piece in self.slices.values():
            try:
                module = model.get_submodule(piece.module_name)
            except AttributeError:
                raise NeuronFileError(f"delta refers to module {piece.module_name!r}, which this model lacks") from None
            n_in, n_out = module_dims(module)
            n = piece.coords.numel()
            expected = (n, n_in) if piece.axis == "out" else (n_out, n)
            limit = n_out if piece.axis == "out" else n_in
            if tuple(piece.weight.shape) != expected or (n and (int(piece.coords.max()) >= limit
                                                                 or int(piece.coords.min()) < 0)):
                raise NeuronFileError(
                    f"delta slice {piece.key} has shape {tuple(piece.weight.shape)} but the model's module needs "
                    f"{expected}: the delta belongs to another model"
                )

    # ----- files --------------------------------------------------------------------------------
    def save(self, path: str | Path, extra_meta: dict | None = None) -> Path:
        """Write one small safetensors file (deltas + coords; neuron set and metadata in the header), atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise NeuronFileError(f"a delta is saved as .safetensors, got {path.name!r}")
        tensors: dict[str, torch.Tensor] = {}
        for piece in self.slices.values():
            tensors[f"{piece.key}.delta"] = piece.weight.detach()
            tensors[f"{piece.key}.coords"] = piece.coords
        meta = dict(self.meta)
        meta.update(extra_meta or {})
        header = {
            "format": DELTA_FORMAT,
            "version": str(DELTA_VERSION),
            "meta": json.dumps(meta, ensure_ascii=False),
            "neurons": json.dumps(self.neurons.to_json_dict()),
        }
        atomic_save_safetensors(path, tensors, header)
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, sites: SiteMap | None = None,
             device: torch.device | str | None = None) -> NeuronDelta:
        """Read a delta file (never unpickles); with ``model`` and ``sites``, validate it against that model."""
        path = Path(path)
        header, tensors = read_safetensors(path, DELTA_FORMAT, "delta")
        try:
            meta = json.loads(header.get("meta", "{}"))
            neuron_data = json.loads(header["neurons"])
        except (KeyError, TypeError, ValueError) as exc:
            raise NeuronFileError(f"{path}: malformed delta header ({exc!r})") from None
        if not isinstance(meta, dict) or not isinstance(neuron_data, dict):
            raise NeuronFileError(f"{path}: malformed delta header (meta and neurons must be JSON objects)")
        neurons = NeuronSet(parse_neuron_entries(neuron_data.get("neurons"), f"{path} (neuron set)"),
                            parse_meta(neuron_data.get("meta"), f"{path} (neuron set)"))
        slices: dict[str, SliceDelta] = {}
        for name, tensor in tensors.items():
            if not name.endswith(".delta"):
                continue
            key = name[: -len(".delta")]
            module_name, sep, axis = key.rpartition("::")
            coords = tensors.get(f"{key}.coords")
            if not sep or axis not in ("out", "in") or coords is None or tensor.dim() != 2:
                raise NeuronFileError(f"{path}: unexpected tensor {name!r}")
            if not tensor.is_floating_point():
                raise NeuronFileError(f"{path}: delta {key!r} holds {tensor.dtype} values, not floating point numbers")
            if not bool(torch.isfinite(tensor).all()):
                raise NeuronFileError(f"{path}: delta {key!r} holds non-finite values (NaN or infinity): the training "
                                      "that wrote it diverged or the file is damaged")
            n = tensor.shape[0] if axis == "out" else tensor.shape[1]
            if coords.dtype not in (torch.int64, torch.int32) or coords.dim() != 1 or coords.numel() != n:
                raise NeuronFileError(f"{path}: coords of {key!r} do not match its delta")
            if n and int(coords.min()) < 0:
                raise NeuronFileError(f"{path}: coords of {key!r} are negative ({int(coords.min())})")
            weight = tensor.to(device) if device is not None else tensor
            slices[key] = SliceDelta(module_name, axis, coords.to(torch.long), weight)
        delta = cls(neurons, slices, meta)
        if model is not None and sites is not None:
            delta.validate(model, sites)
            if device is None:  # put each slice next to its module (multi-device models)
                for piece in delta.slices.values():
                    piece.weight = piece.weight.to(_module_device(model.get_submodule(piece.module_name)))
        return delta


# ----- applying -----------------------------------------------------------------------------------

def _slice_fn(piece: SliceDelta, rows: torch.Tensor | None):
    coords_on: dict[torch.device, torch.Tensor] = {}
    rows_on: dict[torch.device, torch.Tensor] = {}

    def add_delta(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, in], output: [B, T, out]
        device = output.device
        if device not in coords_on:
            coords_on[device] = piece.coords.to(device)
        coords = coords_on[device]
        weight = piece.weight
        if piece.axis == "out":
            term = x.to(weight.dtype) @ weight.t()  # [B, T, n]
        else:
            term = x.index_select(-1, coords).to(weight.dtype) @ weight.t()  # [B, T, out]
        term = term.to(output.dtype)
        if rows is not None:
            if device not in rows_on:
                rows_on[device] = rows.to(device)
            mask = rows_on[device]
            if mask.numel() != output.shape[0]:
                raise TrainingError(f"the delta's row mask has {mask.numel()} rows but the batch has {output.shape[0]}")
            term = term * mask.view(-1, *([1] * (term.dim() - 1))).to(term.dtype)
        if piece.axis == "out":
            return output.index_add(-1, coords, term)  # out of place: autograd-safe
        return output + term

    return add_delta


@contextmanager
def apply_delta(target, delta: NeuronDelta, rows: Sequence[bool] | torch.Tensor | None = None) -> Iterator[None]:
    """Add the delta to forward passes inside the block (this thread/context only); the model is untouched.

    ``target`` is a LoadedModel (``.model``) or a bare model, resolved as `intervene` resolves its target
    (`interventions.resolve_model`). ``rows``: optional per-batch-row mask (True = tuned), so one batched generate
    can carry a base row and a tuned row.
    """
    model = resolve_model(target)
    row_mask = None if rows is None else torch.as_tensor(rows, dtype=torch.bool)
    pairs = [((model.get_submodule(piece.module_name), "out"), _slice_fn(piece, row_mask))
             for piece in delta.slices.values()]
    with hook_modules(pairs):
        yield


def _is_full_precision(weight: torch.Tensor) -> bool:
    return type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype.is_floating_point


@torch.no_grad()
def merge_delta(model: nn.Module, delta: NeuronDelta) -> None:
    """Add the delta into the weights of ``model`` IN PLACE (full-precision models only).

    This permanently modifies the model you pass: use it on a copy you mean to export, never on a
    model shared with other sessions (the app's cached model). Quantized (bitsandbytes) weights
    cannot be merged into; keep using `apply_delta` there.
    """
    for piece in delta.slices.values():
        module = model.get_submodule(piece.module_name)
        weight = cast(torch.Tensor, module.weight)
        if not _is_full_precision(weight):
            raise TrainingError(
                f"cannot merge into {piece.module_name}: its weight is {type(weight).__name__} ({weight.dtype}); "
                "merging needs a full-precision model (load it without quantization), or keep the delta as a hook"
            )
        dim = weight_axis(module, piece.axis)
        coords = piece.coords.to(weight.device)
        # Linear weight [out, in]: out-slice rows W[c, :] += Δ [n, in]; in-slice cols W[:, c] += Δ [out, n].
        # Conv1D weight [in, out] is the transpose.
        update = piece.weight.to(weight.device, torch.float32)
        if type(module).__name__ == "Conv1D":
            update = update.t()
        current = weight.index_select(dim, coords).float()
        weight.index_copy_(dim, coords, (current + update).to(weight.dtype))
