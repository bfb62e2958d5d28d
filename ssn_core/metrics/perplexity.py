"""Perplexity: token-weighted mean NLL of raw texts, or of a continuation after its prompt, independent of the batch
size (right padding masked out of attention and loss)."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ssn_core import distributed
from ssn_core._conventions import Progress, check_cancel, input_device, pad_id
from ssn_core.errors import SSNError

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel


@dataclass(frozen=True)
class PerplexityResult:
    nll: float  # token-weighted mean negative log-likelihood, nats per scored token
    perplexity: float  # exp(nll)
    n_tokens: int  # scored tokens
    n_texts: int


def _encode_for_ppl(tokenizer, item: str | tuple[str, str], max_length: int) -> tuple[list[int], int]:
    """Token ids and the index of the first scored token (1 for plain text: the first token has no context)."""
    if isinstance(item, str):
        ids = list(tokenizer(item, add_special_tokens=True)["input_ids"])
        first = 1
    elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item):
        prompt_ids = list(tokenizer(item[0], add_special_tokens=True)["input_ids"])
        ids = prompt_ids + list(tokenizer(item[1], add_special_tokens=False)["input_ids"])
        first = max(1, len(prompt_ids))
    else:
        raise SSNError("perplexity takes texts or (prompt, continuation) pairs of strings")
    return ids[:max_length], first


def perplexity(lm: LoadedModel, texts: Sequence[str | tuple[str, str]], batch_size: int = 8, *, max_length: int = 1024,
               progress: Progress | None = None, cancel: threading.Event | None = None) -> PerplexityResult:
    """Token-weighted perplexity of `texts` (raw text, no chat template).

    A (prompt, continuation) pair scores only the continuation's tokens. Batches are right-padded and padding is
    masked out of attention and loss, so the result does not depend on `batch_size`.
    """
    if batch_size < 1:
        raise SSNError("batch_size must be at least 1")
    tokenizer, model = lm.tokenizer, lm.model
    device = input_device(model)
    pad = pad_id(lm)
    encoded = [_encode_for_ppl(tokenizer, t, max_length) for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths share a batch

    def run_batch(b: int) -> list[list[float]]:  # [nll, tokens] per scored row; a launch's processes share batches
        check_cancel(cancel, "perplexity was cancelled")
        batch = [encoded[i] for i in order[b * batch_size:(b + 1) * batch_size]]
        width = max(len(ids) for ids, _ in batch)
        if width < 2:
            return []
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
        for row, (ids, _) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits  # [B,T,V]
        rows = []
        for row, (ids, first) in enumerate(batch):
            if len(ids) <= first:
                continue
            # position t predicts token t+1: score tokens first..len-1 from logits first-1..len-2
            pred = logits[row, first - 1:len(ids) - 1].float()  # [S, V]
            target = torch.tensor(ids[first:], dtype=torch.long, device=pred.device)  # [S]
            rows.append([F.cross_entropy(pred, target, reduction="sum").item(), len(ids) - first])
        return rows

    def report(done_batches: int) -> None:
        if progress is not None:
            done = min(done_batches * batch_size, len(order))
            progress(done, len(order), f"perplexity: {done}/{len(order)} texts")

    total_nll, total_tokens = 0.0, 0
    for part in distributed.run_batches(math.ceil(len(order) / batch_size), run_batch, after=report,
                                        what="computing perplexity"):
        for nll, tokens in part:  # added in the one-process order
            total_nll += nll
            total_tokens += int(tokens)
    if total_tokens == 0:
        raise SSNError("perplexity needs at least one text with a token to score (texts are empty or one token)")
    nll = total_nll / total_tokens
    return PerplexityResult(nll=nll, perplexity=math.exp(nll), n_tokens=total_tokens, n_texts=len(texts))


def perplexity_by_language(lm: LoadedModel, texts_by_language: Mapping[str, Sequence[str | tuple[str, str]]],
                           batch_size: int = 8, **kwargs) -> dict[str, PerplexityResult]:
    """`perplexity` of each language's texts."""
    return {lang: perplexity(lm, texts, batch_size, **kwargs) for lang, texts in texts_by_language.items()}
