"""`run_packed` / `run_packed_groups`: every (prompt, condition) pair as one row of one stream of batched generation,
each condition one row-masked intervention, so conditions (and languages) share every forward pass instead of
costing one generation each."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ssn_core._conventions import Progress, check_cancel
from ssn_core.errors import SSNError
from ssn_core.generation.settings import GENERATION_BATCH_SIZE
from ssn_core.interventions import Intervention, Shift
from ssn_core.validation.conditions import Condition

if TYPE_CHECKING:
    from ssn_core.direction import DirectionAblation
    from ssn_core.loading import LoadedModel


@dataclass(frozen=True)
class PackedGroup:
    """Texts answered under conditions and judged in one language: one (language, label) share of a validation run."""

    texts: Sequence[str]
    conditions: Sequence[Condition]
    language: str | None = None


def run_packed(lm: LoadedModel, texts: Sequence[str], conditions: Sequence[Condition], settings,
               batch_size: int = GENERATION_BATCH_SIZE, progress: Progress | None = None,
               cancel: threading.Event | None = None, message: str = "", *, judge=None,
               language: str | None = None) -> list[list[str]]:
    """Replies of every text under every condition: ``result[i][j]`` = text i under condition j.

    One group of `run_packed_groups` (see there).
    """
    return run_packed_groups(lm, [PackedGroup(texts, conditions, language)], settings, batch_size, progress, cancel,
                             message, judge=judge)[0]


def run_packed_groups(lm: LoadedModel, groups: Sequence[PackedGroup], settings,
                      batch_size: int = GENERATION_BATCH_SIZE, progress: Progress | None = None,
                      cancel: threading.Event | None = None, message: str = "", *, judge=None
                      ) -> list[list[list[str]]]:
    """Replies of every group's texts under its conditions: ``result[g][i][j]`` = text i of group g under its
    condition j.

    Every (group, text, condition) triple is one row of a single `ssn_core.generation.generate_many` call, with at
    most ``batch_size`` rows in any forward pass. Each condition with neurons (scaled or shifted by offsets) or a
    direction becomes one intervention whose row mask selects its rows, so a batch mixing conditions costs one
    multiply per site. Rows run longest prompt first (the conditions of one text next to each other), the prompts'
    common prefix (system prompt, chat template) is run once per condition, and a finished row's place goes to a
    waiting one, so no step is spent on a finished reply. All groups share that one stream: a validation run
    (every language, harmful and harmless) has one tail of draining rows, not one per group.

    With ``settings.stop_at_verdict`` and a ``judge`` that can tell (``judge.settled``, e.g. `MarkerJudge`), a reply
    ends as soon as its verdict can no longer change (the group's ``language`` is what the judge is given); the
    verdicts are those of the full replies, the replies are shorter.

    Under a launch (`ssn_core.distributed`) the rows are cut text-major into batches of ``batch_size``, each process
    generates its share of them (each batch through `generate_many`), and the replies are gathered in order.
    """
    from ssn_core import distributed
    from ssn_core.generation import generate_many

    if batch_size < 1:
        raise SSNError("batch_size must be at least 1")
    check_cancel(cancel, "validation was cancelled")
    pairs = [(g, i, j) for g, group in enumerate(groups)
             for i in range(len(group.texts)) for j in range(len(group.conditions))]
    replies: list[list[list[str]]] = [[[""] * len(group.conditions) for _ in group.texts] for group in groups]
    if not pairs:
        return replies

    def interventions_of(rows_pairs) -> list[Intervention | Shift | DirectionAblation]:
        out: list[Intervention | Shift | DirectionAblation] = []
        for g, group in enumerate(groups):
            for j, condition in enumerate(group.conditions):
                rows = [(cg, cj) == (g, j) for cg, _, cj in rows_pairs]
                if not any(rows):
                    continue
                if condition.direction is not None:
                    from ssn_core.direction import DirectionAblation

                    out.append(DirectionAblation(condition.direction, rows=rows, label=condition.key))
                elif condition.offsets is not None:
                    assert condition.neurons is not None, "a shift condition shifts its neurons"
                    out.append(Shift(condition.neurons, condition.offsets, rows=rows, label=condition.key))
                elif condition.neurons is not None and len(condition.neurons):
                    out.append(Intervention(condition.neurons, scale=condition.scale, rows=rows, label=condition.key))
        return out

    def replies_of(rows_pairs, report=None) -> list[str]:
        stop = None
        if getattr(settings, "stop_at_verdict", False) and hasattr(judge, "settled"):
            def stop(row: int, reply: str) -> bool:
                g, i, _ = rows_pairs[row]
                return judge.settled(groups[g].texts[i], reply, groups[g].language)

        return generate_many(lm, [groups[g].texts[i] for g, i, _ in rows_pairs], settings, batch_size=batch_size,
                             interventions=interventions_of(rows_pairs), stop=stop, progress=report, cancel=cancel)

    total = math.ceil(len(pairs) / batch_size)  # progress in batches' worth of replies, as callers count it
    if distributed.world().active:
        # Under a launch each process generates its share of the packed batches of ``batch_size`` rows (text-major,
        # as `distributed.run_batches` splits them), each batch through `generate_many`.
        def run_batch(b: int) -> list[str]:
            check_cancel(cancel, "validation was cancelled")
            return replies_of(pairs[b * batch_size:(b + 1) * batch_size])

        def report_batches(done: int) -> None:
            if progress is not None:
                progress(done, total, f"{message}generating replies, batch {done}/{total}")

        outputs = [reply for batch in distributed.run_batches(total, run_batch, after=report_batches,
                                                              what="generating validation replies")
                   for reply in batch]
    else:
        reported = [0]

        def report(done: int, n_rows: int) -> None:
            batches = total if done == n_rows else done // batch_size
            if progress is not None and batches > reported[0]:
                reported[0] = batches
                progress(batches, total, f"{message}generating replies, batch {batches}/{total}")

        outputs = replies_of(pairs, report)
    for (g, i, j), reply in zip(pairs, outputs, strict=True):
        replies[g][i][j] = reply
    return replies
