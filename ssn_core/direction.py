"""The refusal direction: the positive control that says how far this model's refusal can be broken at all.

After Arditi et al. (2024), "Refusal in language models is mediated by a single direction": at the last prompt token
(where the model decides how to open its reply), the residual stream after layer l differs between harmful and
harmless prompts mostly along one direction,

    r_l = mean_harmful h_l − mean_harmless h_l,        r̂_l = r_l / ‖r_l‖           (one per layer, [hidden])

and projecting r̂ out of the residual stream everywhere (every layer's input, its attention write and its output, at
every position, while generating) removes the model's ability to refuse. The layer is chosen on the discovery split
(the prompts the directions came from): the candidate whose ablation lowers the continuous refusal margin
(`ssn_core.refusal`) the most. An English-derived direction breaking Chinese refusal is the shared mechanism the
SS-Neuron paper is about; a neuron set's suppression effect is reported as a share of this control's.

`DirectionAblation` is an intervention like the neuron ones: reversible, scoped to the calling context, optionally
restricted to some batch rows, and composable with neuron interventions in one `intervene(...)` block.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ssn_core._conventions import Progress, check_cancel
from ssn_core.errors import NeuronFileError, PromptSetError, SSNError
from ssn_core.hooks import hook_modules
from ssn_core.io import atomic_save_safetensors, read_safetensors
from ssn_core.sites import SiteKind, SiteMap, decoder_layers

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

FORMAT = "ssn-lab/refusal-direction"


# ----------------------------------------------------------------------------------------------------------------
# Result


@dataclass
class RefusalDirection:
    """Unit difference-of-means directions of every layer and the layer chosen as the control."""

    directions: torch.Tensor  # [L, hidden] float32, unit rows (r̂_l at the output of layer l)
    norms: torch.Tensor  # [L] ‖r_l‖ before normalisation
    layer: int  # the chosen layer
    selection: list[dict] = field(default_factory=list)  # per candidate layer: mean refusal margin under ablation
    meta: dict = field(default_factory=dict)  # model_fingerprint, languages, item ids, counts

    @property
    def unit(self) -> torch.Tensor:
        """r̂ of the chosen layer: [hidden]."""
        return self.directions[self.layer]

    def validate(self, sites: SiteMap, hidden_size: int | None = None) -> None:
        recorded = self.meta.get("model_fingerprint")
        if recorded and recorded != sites.fingerprint():
            raise NeuronFileError(f"this refusal direction was computed on another model (fingerprint {recorded}); "
                                  f"the loaded model has {sites.fingerprint()}")
        if self.directions.shape[0] != sites.n_layers:
            raise NeuronFileError(f"the refusal direction has {self.directions.shape[0]} layers, the model "
                                  f"{sites.n_layers}")
        if hidden_size is not None and self.directions.shape[1] != hidden_size:
            raise NeuronFileError(f"the refusal direction has width {self.directions.shape[1]}, the model's residual "
                                  f"stream {hidden_size}")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        header = {"format": FORMAT, "version": "1", "layer": str(self.layer),
                  "selection": json.dumps(self.selection), "meta": json.dumps(self.meta)}
        atomic_save_safetensors(path, {"directions": self.directions.float(), "norms": self.norms.float()}, header)
        return path

    @classmethod
    def load(cls, path: str | Path, sites: SiteMap | None = None) -> RefusalDirection:
        path = Path(path)
        header, tensors = read_safetensors(path, FORMAT, "refusal direction")
        try:
            directions, norms = tensors["directions"].float(), tensors["norms"].float()
            layer = int(header["layer"])
            selection = json.loads(header.get("selection", "[]"))
            meta = json.loads(header.get("meta", "{}"))
        except (KeyError, ValueError, json.JSONDecodeError) as exc:
            raise NeuronFileError(f"{path}: malformed refusal direction ({exc})") from None
        if directions.dim() != 2 or not 0 <= layer < directions.shape[0] or not torch.isfinite(directions).all():
            raise NeuronFileError(f"{path}: malformed refusal direction (shape {tuple(directions.shape)}, layer "
                                  f"{layer})")
        result = cls(directions=directions, norms=norms, layer=layer, selection=selection, meta=meta)
        if sites is not None:
            result.validate(sites)
        return result


# ----------------------------------------------------------------------------------------------------------------
# The intervention


@dataclass
class DirectionAblation:
    """Project ``direction`` out of the residual stream at every layer and position (``rows``: some batch rows only).

    Hooks: every decoder layer's input and output, and the attention output projection's output (so the MLP never
    reads the direction either). After the block the model is untouched.
    """

    direction: torch.Tensor  # [hidden]
    rows: Sequence[bool] | torch.Tensor | None = None
    label: str = "ablate refusal direction"

    def describe(self) -> str:
        return self.label

    def module_fns(self, lm_or_model) -> list[tuple[tuple[nn.Module, str], Callable]]:
        from ssn_core.interventions import resolve_model, resolve_sites

        model, sites = resolve_model(lm_or_model), resolve_sites(lm_or_model)
        norm = float(self.direction.float().norm())
        if not norm > 0 or not torch.isfinite(self.direction).all():
            raise SSNError("the direction to ablate must be a finite, non-zero vector")
        unit = self.direction.detach().float() / norm
        row_mask = None if self.rows is None else torch.as_tensor(self.rows, dtype=torch.bool)
        cache: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

        def project(x: torch.Tensor) -> torch.Tensor:  # x: [B, T, hidden]
            key = (x.device, x.dtype)
            if key not in cache:
                rows = None if row_mask is None else row_mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))
                cache[key] = (unit.to(device=x.device, dtype=x.dtype), rows)
            u, rows = cache[key]
            if x.shape[-1] != u.shape[0]:
                raise SSNError(f"the direction has width {u.shape[0]} but the residual stream has {x.shape[-1]}")
            if rows is not None and rows.shape[0] != x.shape[0]:
                raise SSNError(f"the ablation's row mask has {rows.shape[0]} rows but the batch has {x.shape[0]}")
            projected = x - (x @ u)[..., None] * u
            return projected if rows is None else torch.where(rows, projected, x)

        fns: list[tuple[tuple[nn.Module, str], Callable]] = []
        for layer_index, layer in enumerate(decoder_layers(model)):
            fns.append(((layer, "in"), project))
            fns.append(((sites.get(layer_index, "attn_o").module, "out"), lambda out, x: project(out)))
            fns.append(((layer, "out"), lambda out, x: project(out)))
        return fns


def ablate_direction(lm: LoadedModel, direction: torch.Tensor, rows=None) -> AbstractContextManager[int]:
    """Context manager: the direction projected out of the residual stream inside the block."""
    return hook_modules(DirectionAblation(direction, rows).module_fns(lm))


# ----------------------------------------------------------------------------------------------------------------
# Finding the direction


@torch.no_grad()
def last_token_residuals(lm: LoadedModel, texts: Sequence[str], *, batch_size: int = 8, system: str | None = None,
                         cancel: threading.Event | None = None) -> torch.Tensor:
    """Sum over ``texts`` of each layer's output at the last prompt token: [L, hidden] float64."""
    from ssn_core import distributed

    layers = decoder_layers(lm.model)
    if not texts:
        raise PromptSetError("no prompts to compute residual means on")
    embedding = cast(torch.Tensor, lm.model.get_input_embeddings().weight)  # torch types it as Tensor | Module
    total = torch.zeros(len(layers), embedding.shape[-1], dtype=torch.float64)

    def run_batch(b: int) -> None:  # under a launch each process sums its share of the batches
        check_cancel(cancel, "finding the refusal direction was cancelled")
        start = b * batch_size
        captured: list[torch.Tensor] = [None] * len(layers)  # type: ignore[list-item]

        def capture(i: int, store: list[torch.Tensor] = captured):
            def fn(out, x):
                store[i] = out[:, -1].double().cpu()  # left padding: the last position is every row's last token
            return fn

        enc = lm.tokenize_prompts(lm.prompt_texts(list(texts[start:start + batch_size]), system=system))
        with hook_modules([((layer, "out"), capture(i)) for i, layer in enumerate(layers)]):
            lm.model(**enc, use_cache=False, logits_to_keep=1)
        total.add_(torch.stack([c.sum(0) for c in captured]))  # [L, hidden]

    distributed.run_batches(math.ceil(len(texts) / batch_size), run_batch, gather=False,
                            what="finding the refusal direction")
    distributed.all_reduce_([total], "adding up the residual means")
    return total


def find_refusal_direction(lm: LoadedModel, prompts, languages: Sequence[str] | None = None, *, candidate_layers=None,
                           select_n: int = 8, batch_size: int = 8, system: str | None = None,
                           progress: Progress | None = None, cancel: threading.Event | None = None
                           ) -> RefusalDirection:
    """Difference-of-means directions on ``prompts`` (harmful vs harmless of ``languages``) and the best layer.

    Layer choice: for every candidate (default: the middle half of the layers), the mean refusal margin of the first
    ``select_n`` harmful prompts of each language with that layer's direction ablated; the lowest wins. Only the
    given prompts are used, so the control is chosen on the discovery split like the neurons.
    """
    from ssn_core.refusal import refusal_margin

    items = list(getattr(prompts, "prompts", prompts))
    languages = list(dict.fromkeys(languages or [p.language for p in items]))
    harmful = [p for p in items if p.label == "harmful" and p.language in languages]
    harmless = [p for p in items if p.label == "harmless" and p.language in languages]
    if not harmful or not harmless:
        raise PromptSetError("the refusal direction needs harmful and harmless prompts")
    n_layers = len(decoder_layers(lm.model))
    if progress:
        progress(0, 2, "residual means")
    mean_harmful = last_token_residuals(lm, [p.text for p in harmful], batch_size=batch_size, system=system,
                                        cancel=cancel) / len(harmful)
    mean_harmless = last_token_residuals(lm, [p.text for p in harmless], batch_size=batch_size, system=system,
                                         cancel=cancel) / len(harmless)
    diff = (mean_harmful - mean_harmless).float()  # [L, hidden]
    norms = diff.norm(dim=-1)
    directions = diff / norms.clamp(min=1e-12)[:, None]
    if candidate_layers is None:
        candidate_layers = range(n_layers // 4, (3 * n_layers) // 4 + 1)
    candidates = [int(c) for c in candidate_layers if 0 <= int(c) < n_layers]
    if not candidates:
        raise SSNError(f"no candidate layer in range for a model with {n_layers} layers")
    probe = [p for lang in languages for p in [q for q in harmful if q.language == lang][:select_n]]
    texts, langs = [p.text for p in probe], [p.language for p in probe]
    baseline = float(refusal_margin(lm, texts, langs, batch_size=batch_size, system=system, cancel=cancel).mean())
    selection = []
    for i, layer in enumerate(candidates):
        with ablate_direction(lm, directions[layer]):
            margin = float(refusal_margin(lm, texts, langs, batch_size=batch_size, system=system,
                                          cancel=cancel).mean())
        selection.append({"layer": layer, "margin": margin, "baseline_margin": baseline, "norm": float(norms[layer])})
        if progress:
            progress(i + 1, len(candidates), f"refusal direction: layer {layer} margin {margin:+.2f} "
                                             f"(baseline {baseline:+.2f})")
    best = min(selection, key=lambda s: (s["margin"], s["layer"]))["layer"]
    sites: SiteMap = lm.sites
    meta = {"model_fingerprint": sites.fingerprint(), "languages": languages, "n_harmful": len(harmful),
            "n_harmless": len(harmless), "item_ids": sorted({p.id for p in harmful + harmless}),
            "select_n": select_n, "position": "last prompt token", "system": system}
    return RefusalDirection(directions=directions, norms=norms, layer=int(best), selection=selection, meta=meta)


def difference_of_means(lm: LoadedModel, prompts, *, batch_size: int = 8, system: str | None = None,
                        cancel: threading.Event | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit directions [L, hidden], norms [L]): harmful minus harmless mean at the last prompt token, per layer."""
    items = list(getattr(prompts, "prompts", prompts))
    harmful = [p.text for p in items if p.label == "harmful"]
    harmless = [p.text for p in items if p.label == "harmless"]
    if not harmful or not harmless:
        raise PromptSetError("the refusal direction needs harmful and harmless prompts")
    diff = (last_token_residuals(lm, harmful, batch_size=batch_size, system=system, cancel=cancel) / len(harmful)
            - last_token_residuals(lm, harmless, batch_size=batch_size, system=system, cancel=cancel) / len(harmless))
    diff = diff.float()
    norms = diff.norm(dim=-1)
    return diff / norms.clamp(min=1e-12)[:, None], norms


# ----------------------------------------------------------------------------------------------------------------
# Scoring neurons by what they write along the direction


@torch.no_grad()
def direction_batch(lm: LoadedModel, batch, kinds: Sequence[SiteKind], directions: torch.Tensor
                    ) -> dict[tuple[int, str], torch.Tensor]:
    """Each neuron's write along its layer's refusal direction, per prompt: {(layer, kind): [B, N]} (signed).

    mlp neuron k of layer l writes a_tk · W_down[:, k] into the residual stream, so its write along r̂_l is
    a_tk · (W_down[:, k] · r̂_l); attn_o coordinate k likewise with W_O[:, k]; attn_v (kv head g, dim j) writes
    Σ_{h in g} z_thj · (W_O[:, hD+j] · r̂_l). Aggregated over tokens with the batch weights (``last``: the
    last prompt token). Positive: the neuron pushes the residual towards "refuse". One forward pass, no gradients.
    """
    from ssn_core.scoring import _aggregate, _constants, _forward

    unsupported = [k for k in kinds if k in ("attn_q", "attn_k")]
    if unsupported:
        raise SSNError("direction scores cover the sites that write into the residual stream (mlp, attn_v, attn_o); "
                       f"leave out {', '.join(unsupported)}")
    sites: SiteMap = lm.sites
    consts = _constants(lm.model, sites)
    weights = batch.weights
    results: dict[tuple[int, str], torch.Tensor] = {}
    pairs = []

    # The per-neuron writes W[:, k]·r̂ are computed inside the forward pass, when the layer's weights are there
    # (an offloaded layer's are loaded for it), once per layer and direction (`_ModelConstants.writes_along`).
    def mlp_hook(site, r):
        def fn(carrier):
            along = consts.writes_along(site.layer, "mlp", r)  # [N] = W_down[:, coords]^T r̂
            values = site.read(carrier).float()  # [B, T, N]
            results[site.key] = _aggregate(values * along.to(values.device), weights.to(values.device))
        return fn

    def o_hook(site, r):
        def fn(carrier):
            geo = consts.attn(site.layer)
            along = consts.writes_along(site.layer, "attn_o", r)  # [H*D] = W_O^T r̂
            z = site.read(carrier).float() * along.to(carrier.device)  # [B, T, H*D]
            w = weights.to(z.device)
            if "attn_o" in kinds:
                results[(site.layer, "attn_o")] = _aggregate(z, w)
            if "attn_v" in kinds:
                B, T = z.shape[:2]
                K, D = geo.n_kv_heads, geo.head_dim
                per_v = z.view(B, T, K, geo.n_heads // K, D).sum(3).reshape(B, T, K * D)
                results[(site.layer, "attn_v")] = _aggregate(per_v, w)
        return fn

    for layer in range(sites.n_layers):
        r = directions[layer].float()
        if "mlp" in kinds:
            site = sites.get(layer, "mlp")
            pairs.append((site, mlp_hook(site, r)))
        if "attn_o" in kinds or "attn_v" in kinds:
            site = sites.get(layer, "attn_o")
            pairs.append((site, o_hook(site, r)))
    from ssn_core.hooks import hook_sites

    with hook_sites(pairs):
        _forward(lm.model, batch)
    return results
