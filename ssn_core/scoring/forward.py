"""One batch, every site, one forward pass: `score_batch` (``impact`` and ``activation``).

Hooks on the neuron carriers reduce each to a per-prompt vector [B, N] inside the forward pass and drop the
activation: the closed forms for mlp / attn_o / attn_v, and for attn_q / attn_k the captured q, k, v handed to the
exact recomputation (`ssn_core.scoring.qk`) at the layer's o_proj. `_forward` (the base model without its LM head:
scores are layer-local) is shared by ablation, `ssn_core.attribution`, `ssn_core.direction` and
`ssn_core.top_examples`. To swap the q/k kernel (``bench/legacy.py``), patch ``_qk_impact`` here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ssn_core.errors import SSNError
from ssn_core.hooks import hook_sites
from ssn_core.scoring.attention import _attention_bias
from ssn_core.scoring.batch import EncodedBatch, _aggregate
from ssn_core.scoring.constants import _constants, _LayerAttention, _ModelConstants
from ssn_core.scoring.qk import _qk_impact
from ssn_core.sites import SITE_KINDS, NeuronSite, SiteKind, SiteMap

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel
    from ssn_core.scoring.table import ScoringMethod


def _check_kinds(kinds: Iterable[str], sites: SiteMap) -> tuple[SiteKind, ...]:
    kinds = tuple(kinds)
    for kind in kinds:
        if kind not in SITE_KINDS:
            raise SSNError(f"unknown site kind {kind!r}; expected some of {', '.join(SITE_KINDS)}")
        if kind not in sites.kinds:
            raise SSNError(f"this model has no {kind!r} sites")
    if not kinds:
        raise SSNError("no site kinds selected")
    return tuple(k for k in SITE_KINDS if k in kinds)


def _forward(model: nn.Module, batch: EncodedBatch) -> torch.Tensor:
    """Run the base model (no LM head: scores are layer-local) and return the final hidden states."""
    base = getattr(model, "base_model", model)
    output = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False)
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _rope_tables(consts: _ModelConstants, geo: _LayerAttention, batch: EncodedBatch, cache: dict):
    if geo.rotary is None:
        return None, None
    key = geo.rotary_layer_type
    if key not in cache:
        dummy = torch.zeros(1, dtype=torch.float32, device=batch.position_ids.device)
        args = (dummy, batch.position_ids) if key is None else (dummy, batch.position_ids, key)
        cos, sin = geo.rotary(*args)
        cache[key] = (cos.float(), sin.float())
    return cache[key]


@torch.no_grad()
def score_batch(lm: LoadedModel, batch: EncodedBatch, method: ScoringMethod = "impact",
                kinds: Sequence[SiteKind] = SITE_KINDS, layers: Iterable[int] | None = None
                ) -> dict[tuple[int, str], torch.Tensor | tuple]:
    """Per-prompt scores [B, N] for every (layer, kind) from one forward pass.

    ``method="impact"`` returns tensors; ``method="activation"`` returns (mean |a|, mean a) pairs.
    """
    sites: SiteMap = lm.sites
    kinds = _check_kinds(kinds, sites)
    layers = range(sites.n_layers) if layers is None else list(layers)
    model = lm.model
    device = batch.input_ids.device
    weights = batch.weights.to(device)
    results: dict[tuple[int, str], torch.Tensor | tuple] = {}
    pairs: list[tuple[NeuronSite, Callable]] = []

    if method == "activation":
        def activation_hook(site: NeuronSite):
            def fn(carrier):
                values = site.read(carrier).float()  # [B, T, N]
                results[site.key] = (_aggregate(values.abs(), weights), _aggregate(values, weights))
            return fn

        for layer in layers:
            for kind in kinds:
                site = sites.get(layer, kind)
                pairs.append((site, activation_hook(site)))
        with hook_sites(pairs):
            _forward(model, batch)
        return results

    if method != "impact":
        raise SSNError(f"score_batch supports 'impact' and 'activation', not {method!r}")
    consts = _constants(model, sites)
    attn_kinds = [k for k in kinds if k != "mlp"]
    needs_recompute = any(k in kinds for k in ("attn_q", "attn_k"))
    rope_cache: dict = {}
    bias_cache: dict = {}
    check_tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2

    def mlp_hook(site: NeuronSite):
        def fn(carrier):
            values = site.read(carrier).float().abs()  # [B, T, N]
            results[site.key] = _aggregate(values, weights) * consts.mlp(site.layer).to(values.device)
        return fn

    def capture_hook(site: NeuronSite, store: dict):
        def fn(carrier):
            store[site.kind] = site.read(carrier).float()
        return fn

    def o_hook(site: NeuronSite, store: dict):
        def fn(carrier):
            geo = consts.attn(site.layer)
            H, K, D = geo.n_heads, geo.n_kv_heads, geo.head_dim
            z = site.read(carrier).float()  # [B, T, H*D]
            B, T = z.shape[:2]
            if "attn_o" in kinds:
                results[(site.layer, "attn_o")] = _aggregate(z.abs(), weights) * geo.o_norms.to(z.device)
            if "attn_v" in kinds:
                zg = z.view(B, T, K, H // K, D)
                squared = torch.einsum("btkgd,kdgh,btkhd->btkd", zg, geo.v_gram.to(z.device), zg)
                results[(site.layer, "attn_v")] = _aggregate(squared.clamp(min=0).sqrt(), weights).reshape(B, K * D)
            if needs_recompute:
                cos, sin = _rope_tables(consts, geo, batch, rope_cache)
                if cos is not None:
                    cos, sin = cos.to(z.device), sin.to(z.device)
                if geo.sliding_window not in bias_cache:
                    bias_cache[geo.sliding_window] = _attention_bias(batch.attention_mask, geo.sliding_window)
                qk = _qk_impact(
                    geo, store.pop("attn_q").view(B, T, H, D), store.pop("attn_k").view(B, T, K, D),
                    store.pop("attn_v").view(B, T, K, D), z.view(B, T, H, D), cos, sin,
                    bias_cache[geo.sliding_window].to(z.device), weights.to(z.device), kinds, check_tol,
                )
                for kind, value in qk.items():
                    results[(site.layer, kind)] = value
            store.clear()
        return fn

    for layer in layers:
        if "mlp" in kinds:
            site = sites.get(layer, "mlp")
            pairs.append((site, mlp_hook(site)))
        if attn_kinds:
            store: dict[str, torch.Tensor] = {}
            if needs_recompute:
                for kind in ("attn_q", "attn_k", "attn_v"):
                    pairs.append((sites.get(layer, kind), capture_hook(sites.get(layer, kind), store)))
            pairs.append((sites.get(layer, "attn_o"), o_hook(sites.get(layer, "attn_o"), store)))
    with hook_sites(pairs):
        _forward(model, batch)
    return results
