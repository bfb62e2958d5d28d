"""Prompts in, replies out: the checks every prompt passes before generation (not empty, within the model's
context), its token ids (chat-formatted unless ``settings.chat`` is False), and a reply's text from its tokens."""

from __future__ import annotations

from typing import cast

from ssn_core.errors import SSNError
from ssn_core.generation.settings import GenerationSettings
from ssn_core.loading import LoadedModel


def context_length(lm: LoadedModel) -> int | None:
    """The most tokens (prompt + reply) the model's position embeddings cover, from its config; None if unknown."""
    config = lm.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_texts(user_texts: list[str]) -> None:
    for i, text in enumerate(user_texts):
        if not isinstance(text, str) or not text.strip():
            where = "the prompt" if len(user_texts) == 1 else f"prompt {i + 1} of {len(user_texts)}"
            raise SSNError(f"{where} is empty; give some text to answer")


def _check_lengths(lm: LoadedModel, lengths: list[int], settings: GenerationSettings) -> None:
    limit = context_length(lm)
    if limit is None or not lengths:
        return
    worst = max(range(len(lengths)), key=lambda i: lengths[i])
    if lengths[worst] + settings.max_new_tokens > limit:
        where = "the prompt" if len(lengths) == 1 else f"prompt {worst + 1} of {len(lengths)}"
        raise SSNError(f"{where} is {lengths[worst]:,} tokens long (with the chat template); with up to "
                       f"{settings.max_new_tokens:,} new tokens that exceeds the model's context of {limit:,} tokens. "
                       "Shorten the prompt or lower max_new_tokens")


def _encode(lm: LoadedModel, user_texts: list[str], settings: GenerationSettings) -> list[list[int]]:
    """Token ids of each prompt (chat-formatted unless ``settings.chat`` is False), checked against the context."""
    settings.validate()
    _check_texts(user_texts)
    prompts = lm.prompt_texts(user_texts, chat=settings.chat, system=settings.system)
    add_special = not (settings.chat and lm.has_chat_template)  # as `LoadedModel.tokenize_prompts`
    ids = [list(row) for row in lm.tokenizer(prompts, add_special_tokens=add_special)["input_ids"]]
    _check_lengths(lm, [len(row) for row in ids], settings)
    return ids


def check_prompts(lm: LoadedModel, user_texts: list[str], settings: GenerationSettings) -> None:
    """Raise SSNError unless every text can be answered: not empty, and prompt + max_new_tokens within the model's
    context. `generate` checks each batch; callers with long jobs check all their prompts up front with this."""
    _encode(lm, user_texts, settings)


def _reply_tokens(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """Tokens of one reply up to (not including) its first stop token."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens


def _decode(lm: LoadedModel, tokens: list[int], stop_ids: list[int]) -> str:
    # one sequence of ids decodes to one string (transformers types the batch form's list[str] too)
    return cast(str, lm.tokenizer.decode(_reply_tokens(tokens, stop_ids), skip_special_tokens=True))
