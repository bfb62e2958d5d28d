"""Held-out evaluation of one model state: refusal and over-refusal (generate + judge) and reply NLLs.

The same evaluation runs before training and after each method, on the held-out items of the `SafetyData`, under
the method's context (a delta switched on, an adapter, a tuned copy), so that the numbers compare. Replies are
generated in shares under a launch (`distributed.map_chunks`).
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import TYPE_CHECKING

from ssn_core import distributed
from ssn_core._conventions import check_cancel
from ssn_core.training.data import SafetyData, TrainExample
from ssn_core.training.loss import reply_nll
from ssn_core.training.results import SafetyEval, TrainProgress

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel


def evaluate_safety(lm: LoadedModel, data: SafetyData, context_factory=nullcontext, *, settings=None, judge=None,
                    max_eval_per_language: int | None = None, batch_size: int = 8, max_length: int = 256,
                    generate_replies: bool = True, cancel: threading.Event | None = None,
                    progress: TrainProgress | None = None, phase: str = "evaluate") -> SafetyEval:
    """Held-out refusal / over-refusal (generate + marker judge) and reply NLLs under a context.

    ``phase`` names this evaluation in ``progress`` ("evaluating before", "evaluating after").
    """
    from ssn_core.judges import MarkerJudge

    heldout = data.heldout
    if max_eval_per_language is not None:
        kept: list[TrainExample] = []
        seen: dict[tuple[str, str], int] = {}
        for ex in heldout:
            key = (ex.kind, ex.language)
            if seen.get(key, 0) < max_eval_per_language:
                kept.append(ex)
                seen[key] = seen.get(key, 0) + 1
        heldout = kept
    harmful = [ex for ex in heldout if ex.kind == "refusal"]
    harmless = [ex for ex in heldout if ex.kind == "retain"]
    n_replies = len(heldout) if generate_replies else 0
    if progress is not None:
        progress(0, n_replies, {"phase": phase})
    refusal_nll = reply_nll(lm, harmful, context_factory, max_length)
    retain_nll = reply_nll(lm, harmless, context_factory, max_length)
    refusal: dict[str, float] = {}
    over: dict[str, float] = {}
    rows: list[dict] = []
    n_harmful = {lang: sum(ex.language == lang for ex in harmful) for lang in data.languages}
    n_harmless = {lang: sum(ex.language == lang for ex in harmless) for lang in data.languages}
    if generate_replies and heldout:
        from ssn_core.generation import GenerationSettings, generate

        settings = settings if settings is not None else GenerationSettings(max_new_tokens=48)
        judge = judge if judge is not None else MarkerJudge()
        todo = harmful + harmless

        def run_chunk(chunk) -> list[str]:  # under a launch each process answers its share of the batches
            check_cancel(cancel, "evaluation was cancelled; nothing was written")
            return generate(lm, [ex.user_text for ex in chunk], settings)

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress(done, total, {"phase": phase})

        with context_factory():
            replies = distributed.map_chunks(todo, batch_size, run_chunk, after=report,
                                             what="generating held-out replies")
        verdicts = judge.judge_many([ex.user_text for ex in todo], replies, [ex.language for ex in todo])
        hits: dict[tuple[str, str], list[bool]] = {}
        for ex, reply, verdict in zip(todo, replies, verdicts, strict=True):
            hits.setdefault((ex.kind, ex.language), []).append(verdict.label == "refusal")
            rows.append({"id": ex.item_id, "language": ex.language,
                         "label": "harmful" if ex.kind == "refusal" else "harmless", "prompt": ex.user_text,
                         "reply": reply, "verdict": verdict.label})
        for (kind, lang), values in hits.items():
            (refusal if kind == "refusal" else over)[lang] = sum(values) / len(values)
    return SafetyEval(refusal=refusal, over_refusal=over, refusal_nll=refusal_nll, retain_nll=retain_nll,
                      n_harmful=n_harmful, n_harmless=n_harmless, rows=rows)
