"""`GenerationSettings` (greedy by default) and `RowSampler`: temperature + top-p sampling with one seeded generator
per row, so a row's reply does not depend on which rows share its batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ssn_core.errors import SSNError, finite

# Rows in flight when generating many replies (validation, `generate_many`). On a CPU a decoding step streams every
# weight whatever the rows, so rows are nearly free: on the 0.5B starter (2-core Xeon, float32) a step of 8 rows cost
# 2.6x one row, 16 rows 3.1x, 24 rows 3.2x, 32 rows 4.0x (bench/README.md), i.e. 32 rows give ~2.5x the replies per
# second of 8. The KV cache of 32 rows is small beside the weights (the starter: ~24 KB a token, ~0.3 GB for 32 rows of
# 350 tokens). Forward-only batches (scoring, perplexity, margins) keep their own, smaller defaults: they run whole
# sequences, whose activations and logits grow with the rows.
GENERATION_BATCH_SIZE = 32


@dataclass
class GenerationSettings:
    """Greedy by default. ``system``: see `LoadedModel.format_chat` (None = the model's default).

    ``stop_at_verdict``: in validation and evaluation, end each reply as soon as the judge's verdict on it can no
    longer change (`ssn_core.judges.MarkerJudge.settled`: a refusal marker is already in its judged window). The
    verdicts are the same as with full replies; the replies themselves are cut short, so leave it off to read them.
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    system: str | None = None
    chat: bool = True  # False: the texts are raw prompts, no chat template
    stop_at_verdict: bool = False

    def validate(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not hasattr(self.max_new_tokens, "__index__"):
            raise SSNError(f"max_new_tokens must be a whole number, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise SSNError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        finite(self.temperature, "temperature")
        finite(self.top_p, "top_p")
        if self.do_sample and self.temperature <= 0:
            raise SSNError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.do_sample and not 0 < self.top_p <= 1:
            raise SSNError(f"top_p must be in (0, 1], got {self.top_p}")


class RowSampler:
    """Temperature + top-p sampling with one seeded generator per row of the caller's list.

    A row's k-th token uses the k-th draw of its own generator, whichever rows share its batch.
    """

    def __init__(self, n_rows: int, seed: int, temperature: float, top_p: float):
        self.seed, self.temperature, self.top_p = seed, temperature, top_p
        self.generators: list[torch.Generator | None] = [None] * n_rows

    def pick(self, rows: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
        """One token per row: ``rows`` [m] indices into the caller's list, ``scores`` [m, V] float logits."""
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= self.top_p  # keep the token crossing top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        chosen = []
        for position, row in enumerate(rows):
            if self.generators[row] is None:
                self.generators[row] = torch.Generator(device=scores.device).manual_seed(self.seed)
            chosen.append(torch.multinomial(probs[position], 1, generator=self.generators[row])[0])
        return torch.stack(chosen)  # [m]
