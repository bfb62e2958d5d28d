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
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ssn_core.errors import SSNError
from ssn_core.hooks import hook_sites
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


def _edit_fn(site: NeuronSite, neuron_indices: torch.Tensor, intervention: Intervention):
    """The carrier edit for one site.

    Scaling is one out-of-place multiply by a precomputed multiplier (ones except ``scale`` at the
    neurons' coordinates; [B, 1, C] when a row mask is given, so unmasked rows are multiplied by
    exactly 1.0 and stay bit-identical). Clamping writes the value at those coordinates.
    """
    coords = site.carrier_coords(neuron_indices)  # [n] positions in the carrier's last dim
    row_mask = None if intervention.rows is None else torch.as_tensor(intervention.rows, dtype=torch.bool)
    scale, value = float(intervention.scale), intervention.value
    cache: dict[tuple, torch.Tensor] = {}

    def multiplier(carrier: torch.Tensor) -> torch.Tensor:
        key = (carrier.device, carrier.dtype, carrier.shape[-1])
        if key not in cache:
            factors = torch.ones(carrier.shape[-1], dtype=carrier.dtype, device=carrier.device)
            factors[coords.to(carrier.device)] = scale
            if row_mask is not None:  # [B, 1, C]: rows outside the mask keep factor 1
                rows = row_mask.to(carrier.device).view(-1, 1)
                factors = torch.where(rows, factors, torch.ones_like(factors)).unsqueeze(1)
            cache[key] = factors
        return cache[key]

    def check_rows(carrier: torch.Tensor) -> None:
        if row_mask is not None and row_mask.numel() != carrier.shape[0]:
            raise SSNError(
                f"the intervention's row mask has {row_mask.numel()} rows but the batch has {carrier.shape[0]}"
            )

    def scale_edit(carrier: torch.Tensor) -> torch.Tensor:  # carrier: [B, T, C]
        check_rows(carrier)
        factors = multiplier(carrier)
        if factors.dim() == 2 and carrier.dim() == 2:  # unbatched [T, C] carrier with a row mask: not expected
            factors = factors.squeeze(1)
        return carrier * factors

    def clamp_edit(carrier: torch.Tensor) -> torch.Tensor:
        check_rows(carrier)
        coords_d = coords.to(carrier.device)
        selected = carrier.index_select(-1, coords_d)  # [B, T, n]
        edited = carrier.index_copy(-1, coords_d, torch.full_like(selected, value))  # out of place
        if row_mask is None:
            return edited
        rows = row_mask.to(carrier.device).view(-1, *([1] * (carrier.dim() - 1)))
        return torch.where(rows, edited, carrier)

    return clamp_edit if value is not None else scale_edit


@contextmanager
def intervene(target, *interventions: Intervention) -> Iterator[None]:
    """Apply the interventions to forward passes inside the block (this thread/context only)."""
    sites = resolve_sites(target)
    pairs = []
    for intervention in interventions:
        intervention.neurons.validate(sites)
        for (layer, kind), indices in intervention.neurons.neurons.items():
            site = sites.get(layer, kind)
            pairs.append((site, _edit_fn(site, indices, intervention)))
    with hook_sites(pairs):
        yield


def suppress(target, neurons: NeuronSet, rows=None) -> contextmanager:
    """Zero the neurons (the paper's deactivation)."""
    return intervene(target, Intervention(neurons, scale=0.0, rows=rows, label="suppress"))


def reinforce(target, neurons: NeuronSet, alpha: float = 2.0, rows=None) -> contextmanager:
    """Scale the neurons by alpha (> 1 strengthens them)."""
    if alpha < 0:
        raise SSNError(f"reinforcement scale must be >= 0, got {alpha}")
    return intervene(target, Intervention(neurons, scale=alpha, rows=rows, label=f"reinforce x{alpha:g}"))


def clamp(target, neurons: NeuronSet, value: float, rows=None) -> contextmanager:
    """Set the neurons to a fixed value."""
    return intervene(target, Intervention(neurons, value=value, rows=rows, label=f"clamp {value:g}"))
