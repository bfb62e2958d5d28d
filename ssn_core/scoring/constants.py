"""Per-model constants of the closed forms: weight column norms, W_O's per-head factors and Gram matrices, and the
attention geometry of each layer (heads, scaling, soft-capping, sliding window, q/k norms, rotary embedding).

They depend on the weights only, so they are computed once per layer and model (`_constants`, one model at a time)
and reused across batches and methods (`ssn_core.direction` reads `writes_along`). Only what is derived is kept,
never a dense copy of a weight (`ssn_core.quantized`: 4-/8-bit and offloaded layers).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ssn_core.sites import SiteMap


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as a float32 [out, in] matrix (GPT-2 Conv1D stores [in, out]); bitsandbytes 4-/8-bit
    layers dequantized and offloaded layers loaded for the moment (`ssn_core.quantized.dense_weight`)."""
    from ssn_core.quantized import dense_weight

    return dense_weight(module)


def _qr_factor(matrix: torch.Tensor) -> torch.Tensor:
    """R with ‖R y‖ = ‖matrix y‖ for every y, and at most min(rows, cols) rows (cheaper norms)."""
    return torch.linalg.qr(matrix, mode="r")[1] if matrix.shape[0] > matrix.shape[1] else matrix


@dataclass
class _LayerAttention:
    """What the exact attention recomputation needs for one layer."""

    module: nn.Module
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scaling: float
    softcap: float | None
    sliding_window: int | None
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    rotary: nn.Module | None
    rotary_layer_type: str | None
    o_norms: torch.Tensor  # [H*D] column norms of W_O
    v_gram: torch.Tensor  # [K, D, G, G]
    q_factors: torch.Tensor  # [H, r, D]: ‖W_O[:, head h] y‖ = ‖q_factors[h] y‖
    k_factors: torch.Tensor  # [K, r, G*D]: same for a whole kv group


class _ModelConstants:
    """Weight-derived constants, computed once per layer and model and reused across batches. Only what is derived
    (norms, factors, Gram matrices: O(N) or O(H·D²) per layer) is kept, never a dense copy of a weight, so a 4-bit
    model's constants cost one transient dequantized matrix per layer."""

    def __init__(self, model: nn.Module, sites: SiteMap):
        self.model = model
        self.sites = sites
        self.mlp_norms: dict[int, torch.Tensor] = {}
        self.attention: dict[int, _LayerAttention] = {}
        self.along: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.rotary, self.base_model = _find_rotary(model)

    def writes_along(self, layer: int, kind: str, direction: torch.Tensor) -> torch.Tensor:
        """W[:, coords]^T r: what each coordinate of the mlp (W_down) or attn_o (W_O) carrier writes along the
        residual direction r [hidden], on the layer's device; kept per layer for the last r asked for."""
        cached = self.along.get((layer, kind))
        r = direction.detach().float().cpu()
        if cached is not None and torch.equal(cached[0], r):
            return cached[1]
        site = self.sites.get(layer, kind)
        weight = _weight_out_in(site.module)  # [hidden, C]
        value = site.read(weight).T @ r.to(weight.device)  # [N]; read: the carrier's columns (a view when contiguous)
        self.along[(layer, kind)] = (r, value)
        return value

    def mlp(self, layer: int) -> torch.Tensor:
        if layer not in self.mlp_norms:
            site = self.sites.get(layer, "mlp")
            weight = _weight_out_in(site.module)  # [hidden, I]
            self.mlp_norms[layer] = site.read(weight).norm(dim=0)  # no copy of the columns when they are contiguous
        return self.mlp_norms[layer]

    def attn(self, layer: int) -> _LayerAttention:
        if layer in self.attention:
            return self.attention[layer]
        site = self.sites.get(layer, "attn_o")
        H, K, D = site.n_heads, site.n_kv_heads, site.head_dim
        G = H // K
        w_o = site.read(_weight_out_in(site.module)).contiguous()  # [hidden, H*D] (a copy only for GPT-2's Conv1D)
        per_head = w_o.view(w_o.shape[0], K, G, D)
        v_gram = torch.einsum("okgd,okhd->kdgh", per_head, per_head)
        q_factors = torch.stack([_qr_factor(w_o[:, h * D:(h + 1) * D]) for h in range(H)])
        k_factors = torch.stack([_qr_factor(w_o[:, g * G * D:(g + 1) * G * D]) for g in range(K)])
        attn = self.model.get_submodule(site.module_name.rsplit(".", 1)[0])
        model_config: Any = self.model.config  # a transformers config (torch types it as Tensor | Module)
        config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        sliding: int | None
        if hasattr(attn, "sliding_window"):
            sliding = cast("int | None", attn.sliding_window)
        elif self.sites.model_type in ("mistral", "phi3"):
            sliding = getattr(config, "sliding_window", None)
        else:
            sliding = None
        scaling = getattr(attn, "scaling", None)
        if scaling is None:
            scaling = D ** -0.5
        layer_type = getattr(attn, "layer_type", None)
        rotary = self.rotary
        if rotary is not None and "layer_type" not in inspect.signature(rotary.forward).parameters:
            layer_type = None
        self.attention[layer] = _LayerAttention(
            module=attn, n_heads=H, n_kv_heads=K, head_dim=D, scaling=float(scaling),
            softcap=getattr(attn, "attn_logit_softcapping", None), sliding_window=sliding,
            q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
            rotary=rotary, rotary_layer_type=layer_type, o_norms=w_o.norm(dim=0),
            v_gram=v_gram, q_factors=q_factors, k_factors=k_factors,
        )
        return self.attention[layer]


def _find_rotary(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    base = getattr(model, "base_model", model)
    for candidate in (base, getattr(base, "language_model", None), getattr(model, "model", None)):
        rotary = getattr(candidate, "rotary_emb", None) if candidate is not None else None
        if rotary is not None:
            return rotary, base
    return None, base


_CONSTANTS: dict[int, tuple[nn.Module, _ModelConstants]] = {}


def _constants(model: nn.Module, sites: SiteMap) -> _ModelConstants:
    entry = _CONSTANTS.get(id(model))
    if entry is None or entry[0] is not model or entry[1].sites is not sites:
        _CONSTANTS.clear()  # one model at a time: do not keep old models alive
        entry = _CONSTANTS[id(model)] = (model, _ModelConstants(model, sites))
    return entry[1]
