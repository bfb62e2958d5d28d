"""A/B generate-and-judge: one request answered by the model as is and under an edit, side by side, in one batch.

Each row of the batch is an `ABRow`: a prompt, the language its reply is judged in, and what is done to the model in
that row (``edit``): an `Intervention`, `Shift` or `DirectionAblation` given *without* a row mask, a trained
`NeuronDelta`, or None for the model as is. `run_ab` puts row i's edit on batch row i only (`applied`), generates
every row in one batch and judges each reply in its row's language, so seed, sampling and padding are the same in
every column and a difference between two columns is caused by the edit. ``on_update`` sees the partial replies
after every token (streaming); an exception raised there (a page that reruns) stops the generation within a token
and removes every hook.

`two_rows(prompt, edit)` is the usual exchange: column A the model as is, column B edited. The Chat page, the Learn
page's demo and its guided walkthrough (up to three columns, each with its own prompt) run through here;
`exchange_record` writes a two-row exchange as the reproducible record of `ssn_core.records` (what
``ssn chat --replay`` regenerates), and `row_margin` measures a row's refusal margin under its edit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ssn_core.delta import NeuronDelta, apply_delta
from ssn_core.direction import DirectionAblation
from ssn_core.generation import GenerationSettings, generate, stream_generate
from ssn_core.interventions import Intervention, Shift, intervene
from ssn_core.judges import Judge, MarkerJudge, Verdict

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

# What a row does to the model: an edit without a row mask (`applied` gives it its row), or a trained delta.
Edit = Intervention | Shift | DirectionAblation | NeuronDelta


@dataclass
class ABRow:
    """One column: the prompt, what is done to the model in this row (None: as is), the language the reply is
    judged in (None: every language's markers) and the column's name."""

    prompt: str
    edit: Edit | None = None
    language: str | None = None
    label: str = ""


@dataclass
class ABResult:
    """Every row's reply and verdict, in row order, and the settings they were generated with."""

    rows: list[ABRow]
    replies: list[str]
    verdicts: list[Verdict]
    settings: GenerationSettings
    stopped: bool = False  # the replies were cut short (a stopped generation), judged as they are

    @property
    def labels(self) -> list[str]:
        """The verdicts' labels (refusal / compliance / off_target)."""
        return [v.label for v in self.verdicts]


def two_rows(prompt: str, edit: Edit | None, language: str | None = None) -> list[ABRow]:
    """The usual exchange: column A the model as is, column B under ``edit``, the same prompt in both."""
    return [ABRow(prompt, None, language, "A"), ABRow(prompt, edit, language, "B")]


def edits_nothing(edit: Edit | None) -> bool:
    """No edit, or a neuron edit of an empty set (which would change no row)."""
    return edit is None or (isinstance(edit, Intervention | Shift) and len(edit.neurons) == 0)


def on_row(edit: Edit, row: int, n_rows: int) -> Edit:
    """``edit`` restricted to batch row ``row`` of ``n_rows`` (its row mask)."""
    if isinstance(edit, NeuronDelta):
        raise TypeError("a NeuronDelta takes its row mask in apply_delta, not in itself")
    return dataclasses.replace(edit, rows=[i == row for i in range(n_rows)])


@contextmanager
def applied(lm: LoadedModel, rows: Sequence[ABRow]) -> Iterator[None]:
    """Every row's edit on its own batch row (row i of the batch = ``rows[i]``), for one batched generation."""
    n_rows = len(rows)
    interventions = [on_row(row.edit, i, n_rows) for i, row in enumerate(rows)
                     if row.edit is not None and not edits_nothing(row.edit) and not isinstance(row.edit, NeuronDelta)]
    deltas = [(row.edit, [j == i for j in range(n_rows)]) for i, row in enumerate(rows)
              if isinstance(row.edit, NeuronDelta)]
    with ExitStack() as stack:
        stack.enter_context(intervene(lm, *interventions))
        for delta, mask in deltas:
            stack.enter_context(apply_delta(lm, delta, rows=mask))
        yield


@contextmanager
def applied_to_every_row(lm: LoadedModel, edit: Edit | None) -> Iterator[None]:
    """``edit`` on every batch row (for a measurement of one row, e.g. its refusal margin)."""
    if edit is None:
        yield
    elif isinstance(edit, NeuronDelta):
        with apply_delta(lm, edit):
            yield
    else:
        with intervene(lm, dataclasses.replace(edit, rows=None)):
            yield


def generate_rows(lm: LoadedModel, rows: Sequence[ABRow], settings: GenerationSettings | None = None, *,
                  on_update: Callable[[list[str]], None] | None = None) -> list[str]:
    """Every row's reply from one batch, each row under its own edit; ``on_update(replies so far)`` per token."""
    settings = settings or GenerationSettings()
    prompts = [row.prompt for row in rows]
    with applied(lm, rows):
        if on_update is None:
            return generate(lm, prompts, settings)
        replies = [""] * len(rows)
        with closing(stream_generate(lm, prompts, settings)) as stream:
            for replies in stream:
                on_update(list(replies))
        return list(replies)


def judge_rows(rows: Sequence[ABRow], replies: Sequence[str], settings: GenerationSettings | None = None,
               judge: Judge | None = None, *, stopped: bool = False) -> ABResult:
    """Every reply judged in its row's language (default: the marker judge); also for replies cut short."""
    judge = judge if judge is not None else MarkerJudge()
    rows, replies = list(rows), list(replies)
    verdicts = judge.judge_many([row.prompt for row in rows], replies, [row.language for row in rows])
    return ABResult(rows=rows, replies=replies, verdicts=verdicts, settings=settings or GenerationSettings(),
                    stopped=stopped)


def run_ab(lm: LoadedModel, rows: Sequence[ABRow], settings: GenerationSettings | None = None,
           judge: Judge | None = None, *, on_update: Callable[[list[str]], None] | None = None) -> ABResult:
    """Generate every row in one batch (row i under ``rows[i].edit`` only), then judge each reply."""
    settings = settings or GenerationSettings()
    replies = generate_rows(lm, rows, settings, on_update=on_update)
    return judge_rows(rows, replies, settings, judge)


def exchange_record(lm: LoadedModel, result: ABResult, description: str = "", language_how: str = "") -> dict:
    """The reproducible JSON record of a two-row exchange (`ssn_core.records`): column B's edit with its row mask
    ``[false, true]`` (a trained delta is described, not embedded), both replies and verdicts, the settings."""
    from ssn_core.records import intervention_record, make_record, verdict_dict

    if len(result.rows) != 2:
        raise ValueError(f"an A/B record has two rows, not {len(result.rows)}")
    row_a, row_b = result.rows
    delta = row_b.edit if isinstance(row_b.edit, NeuronDelta) else None
    intervention = None if row_b.edit is None or delta is not None else on_row(row_b.edit, 1, 2)
    verdict = result.verdicts[1]
    judge = {"name": verdict.judge, "version": verdict.version, "language": row_b.language,
             "language_how": language_how}
    return make_record(lm, row_a.prompt, result.replies[0], result.replies[1], result.settings,
                       intervention_record(intervention, description, delta),
                       verdicts={side: verdict_dict(v) for side, v in zip("ab", result.verdicts, strict=True)},
                       judge=judge, stopped=result.stopped)


def row_margin(lm: LoadedModel, row: ABRow) -> float | None:
    """The row's refusal margin (nats; positive leans towards refusing) under its edit, or None when the row has no
    language or its language has no refusal / compliance openings (`ssn_core.refusal`)."""
    from ssn_core.errors import PromptSetError
    from ssn_core.refusal import refusal_margin

    if row.language is None:
        return None
    try:
        with applied_to_every_row(lm, row.edit):
            return float(refusal_margin(lm, [row.prompt], [row.language])[0])
    except PromptSetError:
        return None
