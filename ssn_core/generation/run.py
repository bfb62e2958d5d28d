"""The entry points: `generate` (one batch), `generate_many` (many prompts through a pool of rows, with row-masked
interventions and an optional stop test) and `stream_generate` (partial replies as tokens arrive)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Sequence
from contextvars import copy_context

import torch

from ssn_core._conventions import check_cancel
from ssn_core.errors import SSNError
from ssn_core.generation.decoder import StopFn
from ssn_core.generation.encode import _decode, _encode
from ssn_core.generation.pool import RowProgress, _generate_rows
from ssn_core.generation.settings import GENERATION_BATCH_SIZE, GenerationSettings
from ssn_core.loading import LoadedModel
from ssn_core.progress import current_cancel


def generate(lm: LoadedModel, user_texts: list[str], settings: GenerationSettings | None = None) -> list[str]:
    """The reply to each user text (without the prompt and special tokens), in input order, as one batch.

    Inside a `ssn_core.progress.cancel_scope` whose event gets set, generation stops after the current token
    and raises `Cancelled`.
    """
    settings = settings or GenerationSettings()
    if not user_texts:
        return []
    cancel = current_cancel()
    check_cancel(cancel, "generation was cancelled")
    prompts = _encode(lm, user_texts, settings)
    with torch.no_grad():
        tokens = _generate_rows(lm, prompts, settings, batch_size=len(prompts), fixed=True, cancel=cancel)
    return [_decode(lm, row, lm.stop_token_ids) for row in tokens]


def generate_many(lm: LoadedModel, user_texts: Sequence[str], settings: GenerationSettings | None = None, *,
                  batch_size: int = GENERATION_BATCH_SIZE, interventions: Sequence = (), stop: StopFn | None = None,
                  progress: RowProgress | None = None, cancel: threading.Event | None = None) -> list[str]:
    """The reply to each user text, in input order, with at most ``batch_size`` rows in any forward pass.

    Rows go through the model longest prompt first; a row leaves as soon as it is finished and a waiting one
    takes its place, so no step is spent on padding after a short reply and few on padding before a short prompt.
    ``interventions``: applied here, to the rows their ``rows`` mask selects (a mask over ``user_texts``; None: all
    rows). Interventions entered around the call must not have row masks (the batch changes under them).
    ``stop(row, reply_so_far)``: True ends that reply early (e.g. once a judge's verdict on it is settled).
    ``progress(done, total)``: after each finished reply. ``cancel`` (or an enclosing `cancel_scope`) raises
    `Cancelled` within a token.
    """
    settings = settings or GenerationSettings()
    if batch_size < 1:
        raise SSNError("batch_size must be at least 1")
    texts = list(user_texts)
    if not texts:
        return []
    stop_events = _AnyEvent([e for e in (cancel, current_cancel()) if e is not None])
    check_cancel(stop_events, "generation was cancelled")
    prompts = _encode(lm, texts, settings)
    with torch.no_grad():
        tokens = _generate_rows(lm, prompts, settings, batch_size=batch_size, interventions=interventions,
                                stop=stop, cancel=stop_events, progress=progress)
    return [_decode(lm, row, lm.stop_token_ids) for row in tokens]


class _AnyEvent:
    """Set when any of several events is set (all that `check_cancel` asks of an event)."""

    def __init__(self, events: list[threading.Event]):
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def stream_generate(
    lm: LoadedModel, user_texts: list[str], settings: GenerationSettings | None = None
) -> Generator[list[str], None, None]:
    """Yield the partial replies of every row as tokens arrive; the last yield equals `generate`'s result.

    The model runs in a worker thread started in a *copy of the caller's context*, so interventions
    entered by the caller (contextvars-scoped hooks) apply to it. Closing the iterator early stops
    the worker after its current step; so does the event of an enclosing `cancel_scope` (then `Cancelled`).
    """
    settings = settings or GenerationSettings()
    if not user_texts:
        return
    cancel = current_cancel()
    check_cancel(cancel, "generation was cancelled")
    prompts = _encode(lm, user_texts, settings)
    stop_ids = lm.stop_token_ids
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    context = copy_context()

    def work() -> None:
        try:
            with torch.no_grad():
                tokens = _generate_rows(lm, prompts, settings, batch_size=len(prompts), fixed=True, cancel=cancel,
                                        halt=stop, on_step=lambda rows: events.put(("tokens", [list(r) for r in rows])))
            events.put(("done", tokens))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            events.put(("error", exc))

    worker = threading.Thread(target=lambda: context.run(work), name="ssn-generate", daemon=True)
    worker.start()
    try:
        while True:
            kind, payload = events.get()
            if kind == "error":
                raise payload
            if kind == "done":
                check_cancel(cancel, "generation was cancelled")
                yield [_decode(lm, row, stop_ids) for row in payload]
                return
            # Hold back a trailing partial UTF-8 character ("\ufffd") until its other bytes arrive.
            yield [_decode(lm, row, stop_ids).rstrip("\ufffd") for row in payload]
    finally:
        stop.set()
        worker.join()
