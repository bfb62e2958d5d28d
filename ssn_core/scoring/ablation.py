"""Exact ablation, the slow reference: zero one neuron at a time and measure the change of the final hidden state.

`ablation_batch` runs ``chunk`` neurons in one forward pass (the batch repeated, each copy with its own row-masked
suppression through `ssn_core.interventions`); `sample_neurons` draws the reproducible neuron sample it is run on,
for ``method="ablation"`` and for `compare_methods`. With ``aggregate="last"`` it is the paper's literal ΔLLM.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ssn_core.errors import SSNError
from ssn_core.interventions import Intervention, intervene
from ssn_core.neurons import NeuronSet
from ssn_core.scoring.batch import EncodedBatch, _aggregate
from ssn_core.scoring.forward import _forward
from ssn_core.sites import SITE_KINDS, SiteKind, SiteMap

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

Triple = tuple[int, str, int]


def sample_neurons(sites: SiteMap, kinds: Sequence[SiteKind], count: int, seed: int = 0, per: str = "site"
                   ) -> list[Triple]:
    """Random neurons, reproducibly: ``count`` from every (layer, kind) site (``per="site"``), or ``count``
    per kind spread uniformly over all layers (``per="kind"``, what `compare-methods` uses)."""
    if count < 1:
        raise SSNError(f"the neuron sample must have at least 1 neuron, got {count}")
    rng = random.Random(seed)
    triples: list[Triple] = []
    for kind in kinds:
        size = sites.get(0, kind).size
        if per == "kind":
            flat = rng.sample(range(sites.n_layers * size), min(count, sites.n_layers * size))
            triples += [(i // size, kind, i % size) for i in flat]
        elif per == "site":
            for layer in range(sites.n_layers):
                triples += [(layer, kind, i) for i in rng.sample(range(size), min(count, size))]
        else:
            raise SSNError(f"per must be 'site' or 'kind', got {per!r}")
    return sorted(triples, key=lambda t: (t[0], SITE_KINDS.index(t[1]), t[2]))


@torch.no_grad()
def ablation_batch(lm: LoadedModel, batch: EncodedBatch, neurons: Sequence[Triple], chunk: int = 8) -> torch.Tensor:
    """Exact effect of zeroing each neuron on the final hidden states: [B, len(neurons)].

    Per token: ‖h_final(suppressed) - h_final(baseline)‖, aggregated with the batch weights (with
    ``aggregate="last"`` this is the paper's literal ΔLLM). ``chunk`` neurons share one forward pass:
    the batch is repeated and each copy gets its own row-masked suppression.
    """
    model = lm.model
    baseline = _forward(model, batch).float()  # [B, T, hidden]
    B = batch.input_ids.shape[0]
    out = torch.zeros(B, len(neurons))
    for start in range(0, len(neurons), chunk):
        group = list(neurons[start:start + chunk])
        m = len(group)
        repeated = EncodedBatch(*(t.repeat(m, *([1] * (t.dim() - 1))) for t in
                                  (batch.input_ids, batch.attention_mask, batch.position_ids, batch.weights)))
        interventions = []
        for i, (layer, kind, index) in enumerate(group):
            rows = torch.zeros(m * B, dtype=torch.bool)
            rows[i * B:(i + 1) * B] = True
            interventions.append(Intervention(NeuronSet({(layer, kind): torch.tensor([index])}), scale=0.0, rows=rows))
        with intervene(lm.sites, *interventions):
            hidden = _forward(model, repeated).float().view(m, B, *baseline.shape[1:])
        delta = (hidden - baseline[None]).norm(dim=-1)  # [m, B, T]
        for i in range(m):
            out[:, start + i] = _aggregate(delta[i], batch.weights).cpu()
    return out
