"""Batched chat generation, plain and streaming.

Interventions are applied by the caller: wrap the call in ``with intervene(lm, ...)`` (or
``suppress`` / ``reinforce`` / ``clamp``). A per-row mask refers to the positions in ``user_texts``:
row i of the batch is ``user_texts[i]``, always, because the whole list is generated as one batch
(callers chunk long lists themselves, and give each chunk its own mask).

    with suppress(lm, ss_neurons, rows=[False, True]):
        baseline, suppressed = generate(lm, [prompt, prompt], settings)

Sampling draws every row from its own random generator seeded with ``settings.seed``: a row's reply
does not depend on which other rows share its batch, a call is reproducible, and two identical rows
(an A/B pair) see the same random draws, so any difference between them comes from the intervention.
Only the settings given here shape the output: the checkpoint's own generation defaults (sampling
temperature, repetition penalty, ...) are not applied.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextvars import copy_context
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from ssn_core.errors import Cancelled, SSNError, finite
from ssn_core.loading import LoadedModel
from ssn_core.progress import current_cancel


@dataclass
class GenerationSettings:
    """Greedy by default. ``system``: see `LoadedModel.format_chat` (None = the model's default)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    system: str | None = None
    chat: bool = True  # False: the texts are raw prompts, no chat template

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


class RowSampler(LogitsProcessor):
    """Temperature + top-p sampling with one seeded generator per row.

    Runs as the last logits processor of a *greedy* search: it picks each row's token and returns
    scores that are -inf everywhere else, so the greedy argmax takes exactly that token.
    """

    def __init__(self, batch_size: int, seed: int, temperature: float, top_p: float):
        self.batch_size, self.seed = batch_size, seed
        self.temperature, self.top_p = temperature, top_p
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # scores: [B, V]
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(self.seed) for _ in range(self.batch_size)]
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= self.top_p  # keep the token crossing top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        chosen = torch.stack([torch.multinomial(probs[row], 1, generator=gen)[0]
                              for row, gen in enumerate(self.generators)])  # [B]
        picked = torch.full_like(scores, float("-inf"))
        picked.scatter_(-1, chosen[:, None], 0.0)
        return picked


class _StopOnEvent(StoppingCriteria):
    """Ends generation early when the consumer of a stream goes away or the job is cancelled (checked per token)."""

    def __init__(self, *events: threading.Event | None):
        self.events = [e for e in events if e is not None]

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _raise_if_cancelled(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("generation was cancelled")


class _QueueStreamer(BaseStreamer):
    """Receives each step's new tokens [B] from `generate` and hands them to the consuming thread."""

    def __init__(self, out: queue.Queue):
        self.out = out
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt ids
            self.prompt_seen = True
            return
        self.out.put(("tokens", value.detach().reshape(-1).tolist()))

    def end(self) -> None:
        pass  # the worker signals the end itself, with the final sequences


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


def check_prompts(lm: LoadedModel, user_texts: list[str], settings: GenerationSettings) -> None:
    """Raise SSNError unless every text can be answered: not empty, and prompt + max_new_tokens within the model's
    context. `generate` checks each batch; callers with long jobs check all their prompts up front with this."""
    settings.validate()
    _check_texts(user_texts)
    prompts = lm.prompt_texts(user_texts, chat=settings.chat, system=settings.system)
    add_special = not (settings.chat and lm.has_chat_template)
    lengths = [len(ids) for ids in lm.tokenizer(prompts, add_special_tokens=add_special)["input_ids"]]
    _check_lengths(lm, lengths, settings)


def _prepare(lm: LoadedModel, user_texts: list[str], settings: GenerationSettings):
    settings.validate()
    _check_texts(user_texts)
    prompts = lm.prompt_texts(user_texts, chat=settings.chat, system=settings.system)
    inputs = lm.tokenize_prompts(prompts, chat_formatted=settings.chat, padding_side="left")  # [B, T]
    _check_lengths(lm, inputs["attention_mask"].sum(dim=1).tolist(), settings)
    stop_ids = lm.stop_token_ids
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    # generate() fills every field left None from the model's own generation_config, so the fields that
    # would change a greedy search are set explicitly to their neutral values.
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,  # sampling, when asked for, is done by RowSampler on top of greedy search
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        eos_token_id=stop_ids or None,
        pad_token_id=pad_id,
    )
    processors = LogitsProcessorList()
    if settings.do_sample:
        processors.append(RowSampler(len(user_texts), settings.seed, settings.temperature, settings.top_p))
    return inputs, config, processors, stop_ids


def _reply_tokens(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """Tokens of one reply up to (not including) its first stop token."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens


def _decode(lm: LoadedModel, tokens: list[int], stop_ids: list[int]) -> str:
    return lm.tokenizer.decode(_reply_tokens(tokens, stop_ids), skip_special_tokens=True)


def generate(lm: LoadedModel, user_texts: list[str], settings: GenerationSettings | None = None) -> list[str]:
    """The reply to each user text (without the prompt and special tokens), in input order.

    Inside a `ssn_core.progress.cancel_scope` whose event gets set, generation stops after the current token
    and raises `Cancelled`.
    """
    settings = settings or GenerationSettings()
    if not user_texts:
        return []
    cancel = current_cancel()
    _raise_if_cancelled(cancel)
    inputs, config, processors, stop_ids = _prepare(lm, user_texts, settings)
    stopping = [_StopOnEvent(cancel)] if cancel is not None else None
    with torch.no_grad():
        sequences = lm.model.generate(**inputs, generation_config=config, logits_processor=processors,
                                      stopping_criteria=stopping)  # [B, T+new]
    _raise_if_cancelled(cancel)
    new_tokens = sequences[:, inputs["input_ids"].shape[1]:].tolist()
    return [_decode(lm, row, stop_ids) for row in new_tokens]


def stream_generate(
    lm: LoadedModel, user_texts: list[str], settings: GenerationSettings | None = None
) -> Iterator[list[str]]:
    """Yield the partial replies of every row as tokens arrive; the last yield equals `generate`'s result.

    The model runs in a worker thread started in a *copy of the caller's context*, so interventions
    entered by the caller (contextvars-scoped hooks) apply to it. Closing the iterator early stops
    the worker after its current step; so does the event of an enclosing `cancel_scope` (then `Cancelled`).
    """
    settings = settings or GenerationSettings()
    if not user_texts:
        return
    cancel = current_cancel()
    _raise_if_cancelled(cancel)
    inputs, config, processors, stop_ids = _prepare(lm, user_texts, settings)
    prompt_len = inputs["input_ids"].shape[1]
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    context = copy_context()

    def work() -> None:
        try:
            with torch.no_grad():
                sequences = lm.model.generate(
                    **inputs, generation_config=config, logits_processor=processors,
                    stopping_criteria=[_StopOnEvent(stop, cancel)], streamer=_QueueStreamer(events),
                )
            events.put(("done", sequences[:, prompt_len:].tolist()))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            events.put(("error", exc))

    worker = threading.Thread(target=lambda: context.run(work), name="ssn-generate", daemon=True)
    worker.start()
    rows: list[list[int]] = [[] for _ in user_texts]
    try:
        while True:
            kind, payload = events.get()
            if kind == "error":
                raise payload
            if kind == "done":
                _raise_if_cancelled(cancel)
                yield [_decode(lm, row, stop_ids) for row in payload]
                return
            for row, token in zip(rows, payload, strict=True):
                row.append(token)
            # Hold back a trailing partial UTF-8 character ("\ufffd") until its other bytes arrive.
            yield [_decode(lm, row, stop_ids).rstrip("\ufffd") for row in rows]
    finally:
        stop.set()
        worker.join()
