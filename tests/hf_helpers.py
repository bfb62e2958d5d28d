"""A fixed token batch and plain logits of a transformers model, for the site, hook and intervention tests."""

from __future__ import annotations

import torch

TOKENS = torch.tensor([[5, 17, 42, 99, 7, 250, 31], [8, 8, 120, 64, 200, 3, 77]])


def logits(model, input_ids=TOKENS):
    with torch.no_grad():
        return model(input_ids).logits
