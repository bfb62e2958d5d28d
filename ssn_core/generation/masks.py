"""Row-masked interventions over a batch that changes: each intervention's mask over the caller's list, cut to the
rows in flight whenever the batch changes (`_applied`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from ssn_core.errors import SSNError
from ssn_core.loading import LoadedModel


def _row_masks(interventions: Sequence, n_rows: int) -> list[torch.Tensor | None]:
    masks: list[torch.Tensor | None] = []
    for intervention in interventions:
        rows = getattr(intervention, "rows", None)
        if rows is None:
            masks.append(None)
            continue
        mask = torch.as_tensor(rows, dtype=torch.bool).flatten()
        if mask.numel() != n_rows:
            raise SSNError(f"an intervention's row mask has {mask.numel()} rows but there are {n_rows} prompts")
        if not dataclasses.is_dataclass(intervention):
            raise SSNError(f"{type(intervention).__name__}: a row-masked intervention must be a dataclass with a "
                           "'rows' field")
        masks.append(mask)
    return masks


def _restricted(interventions: Sequence, masks: list[torch.Tensor | None], rows: list[int]) -> list:
    """The interventions for a batch holding ``rows``: masks cut to those rows; ones touching none of them dropped
    (an all-False mask leaves every row bit-identical, so dropping it changes nothing)."""
    out = []
    index = torch.tensor(rows, dtype=torch.long)
    for intervention, mask in zip(interventions, masks, strict=True):
        if mask is None:
            out.append(intervention)
            continue
        sub = mask[index]
        if bool(sub.any()):
            out.append(dataclasses.replace(intervention, rows=sub))
    return out


def _applied(lm: LoadedModel, interventions: Sequence, masks: list[torch.Tensor | None], rows: list[int]
             ) -> AbstractContextManager[None]:
    """The context that applies ``interventions`` to a batch holding ``rows`` (nothing to enter when none)."""
    if not interventions:
        return nullcontext()
    from ssn_core.interventions import intervene

    return intervene(lm, *_restricted(interventions, masks, rows))
