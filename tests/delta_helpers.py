"""A neuron set touching every site kind, token ids, and a random delta on it, for the delta and training tests."""

from __future__ import annotations

import torch

from ssn_core.delta import NeuronDelta
from ssn_core.neurons import NeuronSet

NEURONS = NeuronSet({(0, "mlp"): [1, 5, 7], (1, "attn_q"): [0, 3], (1, "attn_k"): [2], (0, "attn_v"): [4, 9],
                     (1, "attn_o"): [1, 2, 40]})


def token_ids(n: int = 2, t: int = 9) -> torch.Tensor:
    return torch.randint(16, 200, (n, t), generator=torch.Generator().manual_seed(1))


def random_delta(lm, neurons=NEURONS, scale: float = 0.1) -> NeuronDelta:
    delta = NeuronDelta.zeros(lm.model, lm.sites, neurons)
    g = torch.Generator().manual_seed(0)
    for p in delta.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * scale)
    return delta
