"""Encoding prompts for scoring: chat template, left padding, and how each token counts in a prompt's score.

`encode_prompt` gives a prompt's token ids and which of them are the user's own text (and, for (prompt, reply)
pairs, where the reply starts); `make_batch` left-pads them into an `EncodedBatch` with per-token aggregation
weights (``aggregate``: ``content``, ``last``, ``all``, ``reply``); `_aggregate` is the weighted mean over tokens
that every method applies to its per-token values. Also used by `ssn_core.top_examples` and `ssn_core.direction`,
so that every method counts the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args, overload

import torch

from ssn_core.errors import SSNError

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

Aggregate = Literal["content", "last", "all", "reply"]
AGGREGATES: tuple[Aggregate, ...] = get_args(Aggregate)
TEMPLATES: tuple[str, ...] = ("chat", "raw")


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor  # [B, T] left-padded
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    position_ids: torch.Tensor  # [B, T] 0.. for real tokens (so padding does not shift positions)
    weights: torch.Tensor  # [B, T] float32, rows sum to 1: how each token counts in the prompt's score


def _token_weights(n_tokens: int, content: list[int], aggregate: Aggregate, reply_start: int | None = None
                   ) -> list[float]:
    """How each token counts in a prompt's score (rows sum to 1).

    With a teacher-forced reply appended (``reply_start`` = index of its first token), ``last`` is still the last
    *prompt* token (where the model decides how to open its reply) and ``reply`` is every position that predicts a
    reply token: the last prompt token and the reply's own tokens but its last.
    """
    weights = [0.0] * n_tokens
    prompt_end = n_tokens if reply_start is None else reply_start  # tokens before this are the prompt
    if aggregate == "reply":
        if reply_start is None or reply_start >= n_tokens:
            raise SSNError("aggregate 'reply' scores (prompt, reply) pairs; this prompt has no reply "
                           "(build pairs with ssn_core.pairs.build_pairs)")
        chosen = list(range(reply_start - 1, n_tokens - 1))
    elif aggregate == "last" or prompt_end == 0:
        chosen = [max(prompt_end - 1, 0)]
    elif aggregate == "all" or not content:  # no user tokens (empty prompt): fall back to all tokens
        chosen = list(range(n_tokens))
    else:
        chosen = content
    for i in chosen:
        weights[i] = 1.0 / len(chosen)
    return weights


def _content_token_indices(tokenizer, text: str, span: tuple[int, int],
                           add_special: bool) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the indices of the tokens that overlap the character span."""
    start, end = span
    try:
        encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
        content = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        return ids, content
    except (NotImplementedError, KeyError, TypeError, ValueError):
        # Slow tokenizers have no offset mapping: count the tokens of the text before and through the span.
        ids = list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
        n_before = len(tokenizer(text[:start], add_special_tokens=add_special)["input_ids"])
        n_through = len(tokenizer(text[:end], add_special_tokens=add_special)["input_ids"])
        return ids, list(range(min(n_before, len(ids)), min(n_through, len(ids))))


@overload
def encode_prompt(lm: LoadedModel, text: str, template: str = "chat", reply: None = None
                  ) -> tuple[list[int], list[int]]: ...
@overload
def encode_prompt(lm: LoadedModel, text: str, template: str = "chat", *, reply: str
                  ) -> tuple[list[int], list[int], int]: ...
@overload
def encode_prompt(lm: LoadedModel, text: str, template: str = "chat", reply: str | None = None
                  ) -> tuple[list[int], list[int]] | tuple[list[int], list[int], int]: ...
def encode_prompt(lm: LoadedModel, text: str, template: str = "chat", reply: str | None = None
                  ) -> tuple[list[int], list[int]] | tuple[list[int], list[int], int]:
    """(token ids, indices of the user-content tokens) for one prompt; with a ``reply``, the reply's tokens are
    appended as the chat template renders an assistant turn and the index of its first token comes third."""
    if template == "chat":
        formatted, span = lm.format_chat_with_span(text)
        ids, content = _content_token_indices(lm.tokenizer, formatted, span, add_special=False)
    elif template == "raw":
        formatted = text
        ids, content = _content_token_indices(lm.tokenizer, text, (0, len(text)), add_special=True)
    else:
        raise SSNError(f"unknown prompt template {template!r}; expected one of {', '.join(TEMPLATES)}")
    if reply is None:
        return ids, content
    from ssn_core.pairs import completion_text

    reply_ids = list(lm.tokenizer(completion_text(lm, text, reply, formatted if template == "chat" else None),
                                  add_special_tokens=False)["input_ids"])
    return ids + reply_ids, content, len(ids)


def make_batch(encoded: Sequence[tuple], aggregate: Aggregate, pad_id: int,
               device: torch.device | str = "cpu") -> EncodedBatch:
    """Left-pad encoded prompts ((ids, content) or (ids, content, reply_start)) into one batch with per-token
    aggregation weights."""
    if aggregate not in AGGREGATES:
        raise SSNError(f"unknown aggregate {aggregate!r}; expected one of {', '.join(AGGREGATES)}")
    width = max(len(item[0]) for item in encoded)
    ids_rows, mask_rows, weight_rows = [], [], []
    for item in encoded:
        ids, content = item[0], item[1]
        reply_start = item[2] if len(item) > 2 else None
        pad = width - len(ids)
        ids_rows.append([pad_id] * pad + list(ids))
        mask_rows.append([0] * pad + [1] * len(ids))
        weight_rows.append([0.0] * pad + _token_weights(len(ids), content, aggregate, reply_start))
    mask = torch.tensor(mask_rows, dtype=torch.long)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return EncodedBatch(
        input_ids=torch.tensor(ids_rows, dtype=torch.long, device=device),
        attention_mask=mask.to(device),
        position_ids=position_ids.to(device),
        weights=torch.tensor(weight_rows, dtype=torch.float32, device=device),
    )


def _aggregate(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over tokens: values [B, T, ...] -> [B, ...]; zero-weight (padding) tokens never count.

    Fast path: one batched matmul. Padding rows of some attention kernels can hold NaN/inf, and
    0 · NaN = NaN, so a non-finite result is recomputed with the padded tokens masked out explicitly.
    """
    weights = weights.to(device=values.device, dtype=values.dtype)  # layers may sit on different devices
    B, T = weights.shape
    flat = values.reshape(B, T, -1)
    out = torch.bmm(weights[:, None, :], flat)[:, 0]
    if not bool(torch.isfinite(out).all()):
        flat = torch.where((weights > 0)[..., None], flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
        out = torch.bmm(weights[:, None, :], flat)[:, 0]
    return out.reshape(B, *values.shape[2:])
