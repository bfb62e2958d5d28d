"""Interventions on neuron sets: suppress (scale 0), reinforce (scale alpha > 1), clamp to a value.

Each intervention is a context manager built on `ssn_core.hooks.hook_sites`: the edit exists only
inside the ``with`` block and only in the calling context (thread), and the model's weights are
never touched. An optional per-row mask applies the edit to some batch rows only, so that one
batched ``generate`` can carry an untouched row and an intervened row (the A/B chat):

    with suppress(lm, ss_neurons, rows=[False, True]):
        replies = generate(lm, [prompt, prompt], settings)   # row 0 = baseline, row 1 = suppressed
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ssn_core.errors import SSNError, finite
from ssn_core.hooks import hook_modules, hook_sites
from ssn_core.neurons import NeuronSet
from ssn_core.sites import NeuronSite, SiteMap, find_sites


@dataclass
class Intervention:
    """Scale the given neurons by ``scale`` or, if ``value`` is set, clamp them to ``value``.

    ``rows``: optional per-batch-row mask (True = edit this row); None edits every row.
    """

    neurons: NeuronSet
    scale: float = 0.0
    value: float | None = None
    rows: Sequence[bool] | torch.Tensor | None = None
    label: str = ""

    def describe(self) -> str:
        action = f"clamp to {self.value:g}" if self.value is not None else (
            "suppress" if self.scale == 0 else f"scale ×{self.scale:g}")
        return f"{action} {len(self.neurons)} neurons" + (f" ({self.label})" if self.label else "")


@dataclass
class Shift:
    """Add ``offsets`` to the given neurons: a ← a + offset (the additive form of reinforcement, e.g. β times each
    neuron's mean activation on harmful prompts). ``offsets[(layer, kind)]`` is a [n] tensor aligned with
    ``neurons.get(layer, kind)``; ``rows`` as for `Intervention`."""

    neurons: NeuronSet
    offsets: dict[tuple[int, str], torch.Tensor]
    rows: Sequence[bool] | torch.Tensor | None = None
    label: str = ""

    def describe(self) -> str:
        return f"shift {len(self.neurons)} neurons" + (f" ({self.label})" if self.label else "")

    def site_fns(self, sites: SiteMap) -> list[tuple[NeuronSite, object]]:
        self.neurons.validate(sites)
        row_mask = None if self.rows is None else torch.as_tensor(self.rows, dtype=torch.bool)
        fns = []
        for key, indices in self.neurons.neurons.items():
            offset = self.offsets.get(key)
            if offset is None or offset.numel() != indices.numel():
                raise SSNError(f"the shift has no offset of {indices.numel()} values for {key[1]} layer {key[0]}")
            if not bool(torch.isfinite(offset).all()):
                raise SSNError(f"the shift's offsets for {key[1]} layer {key[0]} are not finite")
            fns.append((sites.get(*key), _shift_fn(sites.get(*key), indices, offset.float(), row_mask)))
        return fns


def _shift_fn(site: NeuronSite, indices: torch.Tensor, offset: torch.Tensor, row_mask: torch.Tensor | None):
    cache: dict[tuple, torch.Tensor] = {}

    def shift_edit(carrier: torch.Tensor) -> torch.Tensor:  # carrier: [B, T, C]
        _check_rows(row_mask, carrier)
        key = (carrier.device, carrier.dtype, carrier.shape[-1])
        if key not in cache:
            full = torch.zeros(carrier.shape[-1], dtype=carrier.dtype, device=carrier.device)
            full[site.carrier_coords(indices).to(carrier.device)] = offset.to(device=carrier.device,
                                                                            dtype=carrier.dtype)
            if row_mask is not None:
                full = torch.where(row_mask.to(carrier.device).view(-1, 1), full, torch.zeros_like(full)).unsqueeze(1)
            cache[key] = full
        return carrier + cache[key]

    return shift_edit


_SITE_MAPS: weakref.WeakKeyDictionary[nn.Module, SiteMap] = weakref.WeakKeyDictionary()


def resolve_sites(target) -> SiteMap:
    """SiteMap of a LoadedModel, a SiteMap, or a bare model (cached per model)."""
    if isinstance(target, SiteMap):
        return target
    sites = getattr(target, "sites", None)
    if isinstance(sites, SiteMap):
        return sites
    if isinstance(target, nn.Module):
        if target not in _SITE_MAPS:
            _SITE_MAPS[target] = find_sites(target)
        return _SITE_MAPS[target]
    raise TypeError(f"expected a LoadedModel, SiteMap or model, got {type(target).__name__}")


def resolve_model(target) -> nn.Module:
    """The model of a LoadedModel (its ``.model``), or a bare model itself: a bare model is never unwrapped, since an
    HF CausalLM also has a ``.model`` attribute (its decoder without the LM head)."""
    if isinstance(target, nn.Module):
        return target
    model = getattr(target, "model", None)
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"expected a LoadedModel or model, got {type(target).__name__}")


def _check_rows(row_mask: torch.Tensor | None, carrier: torch.Tensor) -> None:
    if row_mask is not None and row_mask.numel() != carrier.shape[0]:
        raise SSNError(f"the intervention's row mask has {row_mask.numel()} rows but the batch has {carrier.shape[0]}")


def _row_mask(intervention: Intervention) -> torch.Tensor | None:
    return None if intervention.rows is None else torch.as_tensor(intervention.rows, dtype=torch.bool)


def _scale_fn(site: NeuronSite, parts: list[tuple[torch.Tensor, Intervention]]):
    """One carrier edit for all the scale interventions on a site: a single out-of-place multiply.

    The multiplier is ones except each intervention's scale at its neurons' coordinates ([B, 1, C] when any has a
    row mask, 1.0 outside its rows, so untouched rows stay bit-identical); several interventions multiply into
    one tensor, so a validation batch packing many conditions still costs one multiply per site.
    """
    masks = [_row_mask(intervention) for _, intervention in parts]
    cache: dict[tuple, torch.Tensor] = {}

    def multiplier(carrier: torch.Tensor) -> torch.Tensor:
        key = (carrier.device, carrier.dtype, carrier.shape[-1])
        if key not in cache:
            width = carrier.shape[-1]
            n_rows = next((m.numel() for m in masks if m is not None), None)
            combined = torch.ones(width if n_rows is None else (n_rows, 1, width), dtype=carrier.dtype,
                                  device=carrier.device)
            for (indices, intervention), row_mask in zip(parts, masks, strict=True):
                factors = torch.ones(width, dtype=carrier.dtype, device=carrier.device)
                factors[site.carrier_coords(indices).to(carrier.device)] = float(intervention.scale)
                if row_mask is not None:  # [B, 1, C]: rows outside the mask keep factor 1
                    rows = row_mask.to(carrier.device).view(-1, 1)
                    factors = torch.where(rows, factors, torch.ones_like(factors)).unsqueeze(1)
                combined = combined * factors
            cache[key] = combined
        return cache[key]

    def scale_edit(carrier: torch.Tensor) -> torch.Tensor:  # carrier: [B, T, C]
        for row_mask in masks:
            _check_rows(row_mask, carrier)
        factors = multiplier(carrier)
        if factors.dim() == 3 and carrier.dim() == 2:  # unbatched [T, C] carrier with a row mask: not expected
            factors = factors.squeeze(1)
        return carrier * factors

    return scale_edit


def _clamp_fn(site: NeuronSite, neuron_indices: torch.Tensor, intervention: Intervention):
    """Set the neurons' carrier values to ``intervention.value`` (out of place; only in the masked rows)."""
    coords = site.carrier_coords(neuron_indices)  # [n] positions in the carrier's last dim
    row_mask = _row_mask(intervention)
    value = intervention.value
    assert value is not None  # a clamp intervention (the caller checked)

    def clamp_edit(carrier: torch.Tensor) -> torch.Tensor:
        _check_rows(row_mask, carrier)
        coords_d = coords.to(carrier.device)
        selected = carrier.index_select(-1, coords_d)  # [B, T, n]
        edited = carrier.index_copy(-1, coords_d, torch.full_like(selected, value))  # out of place
        if row_mask is None:
            return edited
        rows = row_mask.to(carrier.device).view(-1, *([1] * (carrier.dim() - 1)))
        return torch.where(rows, edited, carrier)

    return clamp_edit


@contextmanager
def intervene(target, *interventions) -> Iterator[None]:
    """Apply the interventions to forward passes inside the block (this thread/context only).

    Neuron interventions (`Intervention`) and module-level ones (anything with ``module_fns(target)``, such as
    `ssn_core.direction.DirectionAblation`) can be mixed; module-level ones need a LoadedModel or a model as target.
    """
    sites = resolve_sites(target)
    neuron_interventions = [i for i in interventions if isinstance(i, Intervention)]
    shifts = [i for i in interventions if isinstance(i, Shift)]
    module_interventions = [i for i in interventions if not isinstance(i, (Intervention, Shift))]
    module_fns = []
    for intervention in module_interventions:
        if not hasattr(intervention, "module_fns"):
            raise SSNError(f"not an intervention: {type(intervention).__name__}")
        if isinstance(target, SiteMap):
            raise SSNError(f"{intervention.describe()} needs the model (a LoadedModel), not only its site map")
        module_fns += intervention.module_fns(target)
    # Per site, in order: consecutive scale interventions merge into one multiply; a clamp stands alone.
    per_site: dict[tuple[int, str], list[tuple[torch.Tensor, Intervention]]] = {}
    for intervention in neuron_interventions:
        finite(intervention.scale if intervention.value is None else intervention.value,
               "an intervention's scale" if intervention.value is None else "an intervention's clamp value")
        intervention.neurons.validate(sites)
        for key, indices in intervention.neurons.neurons.items():
            per_site.setdefault(key, []).append((indices, intervention))
    pairs = []
    for (layer, kind), parts in per_site.items():
        site = sites.get(layer, kind)
        run: list[tuple[torch.Tensor, Intervention]] = []
        for indices, intervention in parts:
            if intervention.value is None:
                run.append((indices, intervention))
                continue
            if run:
                pairs.append((site, _scale_fn(site, run)))
                run = []
            pairs.append((site, _clamp_fn(site, indices, intervention)))
        if run:
            pairs.append((site, _scale_fn(site, run)))
    for shift in shifts:  # after any scale or clamp on the same site
        pairs += shift.site_fns(sites)
    with hook_sites(pairs), hook_modules(module_fns):
        yield


def suppress(target, neurons: NeuronSet, rows=None) -> AbstractContextManager[None]:
    """Zero the neurons (the paper's deactivation)."""
    return intervene(target, Intervention(neurons, scale=0.0, rows=rows, label="suppress"))


def reinforce(target, neurons: NeuronSet, alpha: float = 2.0, rows=None) -> AbstractContextManager[None]:
    """Scale the neurons by alpha (> 1 strengthens them)."""
    if finite(alpha, "the reinforcement scale alpha") < 0:
        raise SSNError(f"reinforcement scale must be >= 0, got {alpha}")
    return intervene(target, Intervention(neurons, scale=alpha, rows=rows, label=f"reinforce x{alpha:g}"))


def clamp(target, neurons: NeuronSet, value: float, rows=None) -> AbstractContextManager[None]:
    """Set the neurons to a fixed value."""
    return intervene(target, Intervention(neurons, value=value, rows=rows, label=f"clamp {value:g}"))
