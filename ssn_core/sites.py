"""Neuron sites: where the neurons of each layer live in each supported architecture.

A *site* is one kind of neuron vector in one layer:

- ``mlp``     the input of the MLP's output projection (act(gate) * up, or act(fc)).
              Neuron i owns row i of gate/up (or fc) and column i of down.
- ``attn_q``  output coordinates of the query projection. Neuron i owns row i of W_Q.
- ``attn_k``  output coordinates of the key projection (K heads under grouped-query attention).
- ``attn_v``  output coordinates of the value projection.
- ``attn_o``  input coordinates of the attention output projection. Neuron i owns column i of W_O.

Every site is read or edited on one *carrier* tensor: the input (``where="in"``) or the output
(``where="out"``) of one module. ``coords[i]`` is the position of neuron i in the carrier's last
dimension; fused projections (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``)
are handled by those coordinates, so nothing downstream needs to know about fusion.

The parameters a neuron owns are described by `OwnedSlice`s: an *output* coordinate of a module
(a row of ``nn.Linear.weight``, a column of GPT-2's ``Conv1D.weight``, an entry of the bias) or an
*input* coordinate (a column of ``nn.Linear.weight``, a row of ``Conv1D.weight``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn

from ssn_core.errors import UnsupportedArchitectureError

SiteKind = Literal["mlp", "attn_q", "attn_k", "attn_v", "attn_o"]
SITE_KINDS: tuple[SiteKind, ...] = get_args(SiteKind)  # in this order everywhere (tables, files, the pages)

# model_type -> family with the same module layout.
_LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "gemma3_text")
SUPPORTED_FAMILIES: dict[str, str] = {
    **{name: "llama-like" for name in _LLAMA_LIKE},
    "phi3": "phi3",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
}


@dataclass(frozen=True)
class OwnedSlice:
    """Coordinates of one module's parameters owned by the neurons of a site.

    ``axis="out"``: neuron i owns output coordinate ``coords[i]`` of the module (weight row of an
    ``nn.Linear`` and the bias entry). ``axis="in"``: neuron i owns input coordinate ``coords[i]``
    (weight column of an ``nn.Linear``).
    """

    module_name: str
    axis: Literal["out", "in"]
    coords: torch.Tensor  # [N] long


@dataclass(eq=False)
class NeuronSite:
    layer: int
    kind: SiteKind
    module_name: str  # full dotted name of the carrier module inside the model
    module: nn.Module = field(repr=False)
    where: Literal["in", "out"]  # carrier = module input or module output
    coords: torch.Tensor = field(repr=False)  # [N] long: neuron i sits at carrier[..., coords[i]]
    owned: tuple[OwnedSlice, ...] = field(repr=False)
    n_heads: int = 0  # query heads (H)
    n_kv_heads: int = 0  # key/value heads (K)
    head_dim: int = 0  # D
    # First coordinate when coords is a contiguous range, so reads are a cheap slice, not a gather.
    contiguous_start: int | None = None

    @property
    def size(self) -> int:
        return int(self.coords.numel())

    @property
    def key(self) -> tuple[int, str]:
        return (self.layer, self.kind)

    def read(self, carrier: torch.Tensor) -> torch.Tensor:
        """Neuron values [..., N] from the carrier tensor [..., C]."""
        if self.contiguous_start is not None:
            return carrier[..., self.contiguous_start : self.contiguous_start + self.size]
        return carrier.index_select(-1, self.coords.to(carrier.device))

    def carrier_coords(self, neuron_indices: torch.Tensor) -> torch.Tensor:
        """Carrier coordinates of the given neuron indices."""
        return self.coords[neuron_indices.to(self.coords.device)]

    def __hash__(self) -> int:
        return hash((id(self.module), self.layer, self.kind))


def _contiguous_start(coords: torch.Tensor) -> int | None:
    if coords.numel() == 0:
        return None
    start = int(coords[0])
    expected = torch.arange(start, start + coords.numel())
    return start if torch.equal(coords.cpu(), expected) else None


def _span(start: int, length: int) -> torch.Tensor:
    return torch.arange(start, start + length, dtype=torch.long)


@dataclass
class SiteMap:
    """All neuron sites of one model, indexed by (layer, kind)."""

    family: str
    model_type: str
    n_layers: int
    sites: dict[tuple[int, str], NeuronSite]

    def get(self, layer: int, kind: str) -> NeuronSite:
        try:
            return self.sites[(layer, kind)]
        except KeyError:
            raise KeyError(f"no site {kind!r} in layer {layer} (model has {self.n_layers} layers)") from None

    def __iter__(self):
        return iter(self.sites.values())

    def __len__(self) -> int:
        return len(self.sites)

    @property
    def kinds(self) -> tuple[SiteKind, ...]:
        return tuple(k for k in SITE_KINDS if any(key[1] == k for key in self.sites))

    def sizes(self) -> dict[str, int]:
        """Neurons per layer for each kind (every layer has the same sizes in supported families)."""
        return {kind: self.get(0, kind).size for kind in self.kinds}

    def shape_signature(self) -> dict:
        """What a neuron file must agree with to be valid for this model."""
        return {"model_type": self.model_type, "n_layers": self.n_layers, "sizes": self.sizes()}

    def fingerprint(self) -> str:
        """Short stable hash of the model's neuron geometry (not of its weights)."""
        blob = json.dumps(self.shape_signature(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def total_neurons(self) -> int:
        return sum(site.size for site in self.sites.values())

    def table(self) -> list[dict]:
        """One row per kind: for the CLI and the app."""
        rows = []
        for kind, per_layer in self.sizes().items():
            site = self.get(0, kind)
            rows.append(
                {
                    "kind": kind,
                    "layers": self.n_layers,
                    "neurons_per_layer": per_layer,
                    "total": per_layer * self.n_layers,
                    "carrier": f"{site.module_name.split('.', 3)[-1]} ({'input' if site.where == 'in' else 'output'})",
                }
            )
        return rows


def _attention_geometry(config) -> tuple[int, int, int]:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = text_config.num_attention_heads
    n_kv_heads = getattr(text_config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // n_heads
    return n_heads, n_kv_heads, head_dim


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer ModuleList and its dotted name."""
    candidates = ("model.layers", "model.language_model.layers", "language_model.model.layers", "transformer.h",
                  "gpt_neox.layers")
    for path in candidates:
        module: nn.Module | None = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return path, module
    raise UnsupportedArchitectureError("could not find the decoder layers of this model")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order (the residual stream runs through them)."""
    return _find_layers(model)[1]


def _make_site(layer, kind, prefix, layer_module, carrier_rel, where, coords, owned, geometry) -> NeuronSite:
    module = layer_module.get_submodule(carrier_rel)
    coords = coords.to(torch.long)
    return NeuronSite(
        layer=layer,
        kind=kind,
        module_name=f"{prefix}.{carrier_rel}",
        module=module,
        where=where,
        coords=coords,
        owned=tuple(OwnedSlice(f"{prefix}.{name}", axis, c.to(torch.long)) for name, axis, c in owned),
        n_heads=geometry[0],
        n_kv_heads=geometry[1],
        head_dim=geometry[2],
        contiguous_start=_contiguous_start(coords),
    )


def _attention_sites(layer, prefix, block, geometry, qkv: tuple[str, str, str], o_proj: str, q: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor, o: torch.Tensor) -> list[NeuronSite]:
    """attn_q / attn_k / attn_v at the output coordinates of the q, k, v projections (``qkv``: their modules, the same
    one three times when fused) and attn_o at the input coordinates of ``o_proj``: every attention neuron owns exactly
    the slice it is read at."""
    carriers = (("attn_q", qkv[0], "out", q), ("attn_k", qkv[1], "out", k), ("attn_v", qkv[2], "out", v),
                ("attn_o", o_proj, "in", o))
    return [_make_site(layer, kind, prefix, block, name, where, coords, [(name, where, coords)], geometry)
            for kind, name, where, coords in carriers]


def _llama_like_sites(layer, prefix, block, geometry, mlp_size) -> list[NeuronSite]:
    n_heads, n_kv_heads, head_dim = geometry
    q_size, kv_size = n_heads * head_dim, n_kv_heads * head_dim
    mlp = _span(0, mlp_size)
    q, kv = _span(0, q_size), _span(0, kv_size)
    return [
        _make_site(layer, "mlp", prefix, block, "mlp.down_proj", "in", mlp,
                   [("mlp.gate_proj", "out", mlp), ("mlp.up_proj", "out", mlp), ("mlp.down_proj", "in", mlp)],
                   geometry),
        *_attention_sites(layer, prefix, block, geometry, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                          "self_attn.o_proj", q, kv, kv, q),
    ]


def _phi3_sites(layer, prefix, block, geometry, mlp_size) -> list[NeuronSite]:
    # Fused gate_up_proj: [gate (mlp_size) | up (mlp_size)]; fused qkv_proj: [q | k | v].
    n_heads, n_kv_heads, head_dim = geometry
    q_size, kv_size = n_heads * head_dim, n_kv_heads * head_dim
    mlp = _span(0, mlp_size)
    q, k, v = _span(0, q_size), _span(q_size, kv_size), _span(q_size + kv_size, kv_size)
    return [
        _make_site(layer, "mlp", prefix, block, "mlp.down_proj", "in", mlp,
                   [("mlp.gate_up_proj", "out", mlp), ("mlp.gate_up_proj", "out", mlp + mlp_size),
                    ("mlp.down_proj", "in", mlp)], geometry),
        *_attention_sites(layer, prefix, block, geometry, ("self_attn.qkv_proj",) * 3, "self_attn.o_proj", q, k, v, q),
    ]


def _gpt2_sites(layer, prefix, block, geometry, mlp_size) -> list[NeuronSite]:
    # Conv1D modules (weight is [in, out]); fused c_attn output: [q | k | v], each hidden_size wide.
    n_heads, _, head_dim = geometry
    hidden = n_heads * head_dim
    mlp = _span(0, mlp_size)
    q, k, v = _span(0, hidden), _span(hidden, hidden), _span(2 * hidden, hidden)
    return [
        _make_site(layer, "mlp", prefix, block, "mlp.c_proj", "in", mlp,
                   [("mlp.c_fc", "out", mlp), ("mlp.c_proj", "in", mlp)], geometry),
        *_attention_sites(layer, prefix, block, geometry, ("attn.c_attn",) * 3, "attn.c_proj", q, k, v, q),
    ]


def _gpt_neox_sites(layer, prefix, block, geometry, mlp_size) -> list[NeuronSite]:
    # Fused query_key_value output is laid out per head: [h0: q(D) k(D) v(D) | h1: q k v | ...].
    # Neuron (h, j) of q is at h*3D + j, of k at h*3D + D + j, of v at h*3D + 2D + j.
    n_heads, _, head_dim = geometry
    per_head = torch.arange(n_heads).repeat_interleave(head_dim) * 3 * head_dim + torch.arange(head_dim).repeat(n_heads)
    q, k, v = per_head, per_head + head_dim, per_head + 2 * head_dim
    mlp = _span(0, mlp_size)
    o = _span(0, n_heads * head_dim)
    return [
        _make_site(layer, "mlp", prefix, block, "mlp.dense_4h_to_h", "in", mlp,
                   [("mlp.dense_h_to_4h", "out", mlp), ("mlp.dense_4h_to_h", "in", mlp)], geometry),
        *_attention_sites(layer, prefix, block, geometry, ("attention.query_key_value",) * 3, "attention.dense",
                          q, k, v, o),
    ]


_BUILDERS = {
    "llama-like": _llama_like_sites,
    "phi3": _phi3_sites,
    "gpt2": _gpt2_sites,
    "gpt_neox": _gpt_neox_sites,
}


def find_sites(model: nn.Module) -> SiteMap:
    """Map every neuron site of a supported causal LM."""
    config: Any = model.config  # a transformers config (torch types it as Tensor | Module)
    model_type = getattr(config, "model_type", "unknown")
    family = SUPPORTED_FAMILIES.get(model_type)
    if family is None:
        supported = ", ".join(sorted(SUPPORTED_FAMILIES))
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported model types: {supported}"
        )
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    geometry = _attention_geometry(config)
    mlp_size = getattr(text_config, "intermediate_size", None) or getattr(text_config, "n_inner", None)
    if mlp_size is None:  # GPT-2 leaves n_inner unset: 4 * hidden
        mlp_size = 4 * text_config.hidden_size
    layers_path, layers = _find_layers(model)
    sites: dict[tuple[int, str], NeuronSite] = {}
    for layer_idx, block in enumerate(layers):
        for site in _BUILDERS[family](layer_idx, f"{layers_path}.{layer_idx}", block, geometry, mlp_size):
            sites[site.key] = site
    return SiteMap(family=family, model_type=model_type, n_layers=len(layers), sites=sites)


def weight_axis(module: nn.Module, axis: str) -> int:
    """Dimension of ``module.weight`` that indexes the given neuron axis ("out" or "in")."""
    transposed = type(module).__name__ == "Conv1D"
    if axis == "out":
        return 1 if transposed else 0
    return 0 if transposed else 1
