"""Tokens and loss: an example as token ids, a batch as tensors, next-token NLL on the reply tokens only.

The prompt goes through the chat template as a user turn; the reply is appended as the template renders it,
end-of-turn token included (`ssn_core.pairs.render_pair`). Only reply tokens are scored (labels -100 elsewhere),
and `response_loss` runs the output layer only from the first position that predicts a reply token. `reply_nll`
is the same loss without gradients, per language, for the evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ssn_core import distributed
from ssn_core.pairs import render_pair
from ssn_core.training.data import TrainExample

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel


def encode_example(lm: LoadedModel, example: TrainExample, max_length: int) -> tuple[list[int], int]:
    """Token ids (prompt + reply) and the index of the first reply token; the reply is cut to fit max_length."""
    prompt, completion = render_pair(lm, example.user_text, example.reply)
    tokenizer = lm.tokenizer
    # As LoadedModel.tokenize_prompts: a real chat template carries its own special tokens (BOS included).
    add_special = not getattr(lm, "has_chat_template", bool(getattr(tokenizer, "chat_template", None)))
    prompt_ids = list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
    reply_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if len(prompt_ids) >= max_length - 1:  # keep the end of the prompt (the template's assistant header)
        prompt_ids = prompt_ids[-(max_length // 2):]
    reply_ids = reply_ids[: max_length - len(prompt_ids)]
    return prompt_ids + reply_ids, len(prompt_ids)


def _collate(encoded: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # [B, T]
    attention = torch.zeros((len(encoded), width), dtype=torch.long)  # [B, T]
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)  # [B, T]; -100 = not scored
    for row, (ids, first) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, first: len(ids)] = torch.tensor(ids[first:])
    return input_ids, attention, labels


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)


def response_loss(model: nn.Module, input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, int]:
    """Mean next-token NLL over the reply tokens of a batch, and how many tokens it covers.

    The output layer runs only from the first position that predicts a reply token on (``logits_to_keep``): the
    prompt positions' logits would be thrown away, and for a 150k-word vocabulary they are a large share of the
    step's time and memory.
    """
    device = _input_device(model)
    scored = (labels[:, 1:] != -100).any(0).nonzero()  # positions t whose next token is scored
    first = int(scored[0]) if len(scored) else 0
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
    try:
        logits = model(**inputs, logits_to_keep=labels.shape[1] - first).logits  # [B, T - first, V]
    except TypeError:  # a model class without logits_to_keep: all positions
        logits, first = model(**inputs).logits, 0
    shift_logits = logits[:, :-1].float()  # kept position first + i predicts token first + i + 1
    shift_labels = labels[:, first + 1:].to(logits.device)
    n_tokens = int((shift_labels != -100).sum())
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100, reduction="sum") / max(n_tokens, 1)
    return loss, n_tokens


def _input_device(model: nn.Module) -> torch.device:
    hf_model: Any = model  # a transformers model, maybe PEFT-wrapped: methods torch's Module type does not know
    try:
        return hf_model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def reply_nll(lm: LoadedModel, examples: Sequence[TrainExample], context_factory=nullcontext, max_length: int = 256,
              batch_size: int = 8) -> dict[str, float]:
    """Per-language mean NLL (nats/token) of the examples' replies, under the given context (e.g. a delta)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    pad = _pad_id(lm.tokenizer)
    encoded = [(ex.language, encode_example(lm, ex, max_length)) for ex in examples]

    def run_chunk(chunk) -> list[list]:  # [language, nll, tokens] per row; a launch's processes share the batches
        input_ids, attention, labels = _collate([e for _, e in chunk], pad)
        logits = lm.model(input_ids=input_ids.to(_input_device(lm.model)),
                          attention_mask=attention.to(_input_device(lm.model))).logits
        rows = []
        for row, (lang, _) in enumerate(chunk):
            target = labels[row, 1:].to(logits.device)
            keep = target != -100
            if bool(keep.any()):
                nll = F.cross_entropy(logits[row, :-1][keep].float(), target[keep], reduction="sum")
                rows.append([lang, float(nll), int(keep.sum())])
        return rows

    with torch.no_grad(), context_factory():
        rows = distributed.map_chunks(encoded, batch_size, run_chunk, what="computing reply NLLs")
    for lang, nll, n in rows:  # added in the one-process order
        sums[lang] = sums.get(lang, 0.0) + nll
        counts[lang] = counts.get(lang, 0) + n
    return {lang: sums[lang] / counts[lang] for lang in sums}
