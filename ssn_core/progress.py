"""Progress of long jobs: named phases, counts, times and ETAs measured as the job runs; cooperative cancel.

Long engine calls take ``progress(done, total, message)`` (training passes ``{"phase": ..., "loss": ...}``
instead of a message). The *phase* of a call is its message without the counts ("scored 8/24 prompts" and
"scored 16/24 prompts" are the phase "scored prompts"), so a caller can draw one bar per phase that updates in
place (`PhaseClock`, the CLI's tqdm bars, the app's job panel). The ETA of a phase comes from the speed
measured in that phase so far, nothing else.

Cancel: `cancel_scope(event)` makes ``event`` the current cancel flag of this thread/context; generation
checks it after every token (`ssn_core.generation`), so a job is cancelled within one decoding step instead of
at the end of a batch.
"""

from __future__ import annotations

import contextvars
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# What the engine's short phase keys mean to a person.
PHASE_NAMES: dict[str, str] = {
    "train": "training",
    "evaluate": "evaluating",
}

_COUNT = re.compile(r",?\s*\b(?:batch\s+)?\d+\s*/\s*\d+\b")  # "3/10", ", batch 3/10"
_SPACES = re.compile(r"\s+")


def phase_of(message: str | dict | None) -> str:
    """The phase named by a progress message: the message without its running counts.

    >>> phase_of("scored 8/24 prompts")
    'scored prompts'
    >>> phase_of("en: generating replies, batch 3/10")
    'en: generating replies'
    >>> phase_of({"phase": "train", "loss": 1.0})
    'training'
    """
    if isinstance(message, dict):
        message = str(message.get("phase", ""))
    text = _COUNT.sub("", str(message or ""))
    text = _SPACES.sub(" ", text).strip(" :,—-")
    return PHASE_NAMES.get(text, text)


def format_duration(seconds: float | None) -> str:
    """'8 s', '3 min 10 s', '1 h 05 min'; '?' for None."""
    if seconds is None or math.isnan(seconds):
        return "?"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@dataclass
class PhaseRecord:
    """One phase of a job: its name, last count, when it started and (once over) how long it took."""

    name: str
    done: int = 0
    total: int = 0
    started: float = 0.0
    ended: float | None = None
    counted_from: float = 0.0  # when the count was last 0 (the speed is measured from there)
    counted_base: int = 0
    last_update: float = 0.0

    def seconds(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.started

    def rate(self, now: float) -> float | None:
        """Items per second measured in this phase, None before the first item."""
        items = self.done - self.counted_base
        elapsed = now - self.counted_from
        return items / elapsed if items > 0 and elapsed > 0 else None

    def eta(self, now: float) -> float | None:
        """Seconds left in this phase at the measured speed; None until there is a speed."""
        if self.total <= 0 or self.done >= self.total:
            return 0.0 if self.total > 0 else None
        rate = self.rate(now)
        return None if rate is None else (self.total - self.done) / rate


@dataclass
class PhaseClock:
    """Follows ``progress`` calls: the current phase with its count and ETA, and the phases already over."""

    now: Callable[[], float] = time.time
    started: float = field(default=0.0)
    phases: list[PhaseRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.started:
            self.started = self.now()

    @property
    def current(self) -> PhaseRecord | None:
        return self.phases[-1] if self.phases else None

    def update(self, done: int, total: int, message: str | dict | None = "") -> PhaseRecord:
        now = self.now()
        done, total = int(done), int(total)
        name = phase_of(message) or (self.current.name if self.current else "working")
        phase = self.current
        if phase is not None and phase.name != name and phase.done == 0 and total == phase.total and done > 0:
            phase.name = name  # "scoring 24 prompts" at 0/24 announced the phase that "scored 8/24" continues
        if phase is None or phase.name != name:
            previous = phase
            if previous is not None:
                previous.ended = previous.last_update
            # A phase whose first report already counts items began when the one before it last reported.
            if done == 0:
                start = now
            elif previous is not None:
                start = previous.last_update
            else:
                start = self.started
            phase = PhaseRecord(name, started=start, counted_from=start)
            self.phases.append(phase)
        elif done < phase.done or (total != phase.total and phase.done == 0):
            phase.counted_from, phase.counted_base = now, done  # a restarted count: measure afresh
        phase.done, phase.total, phase.last_update = done, total, now
        return phase

    def finish(self) -> None:
        if self.current is not None and self.current.ended is None:
            self.current.ended = self.now()

    @property
    def elapsed(self) -> float:
        return self.now() - self.started

    def describe(self, unit: str = "") -> str:
        """'training — 3/20 steps · 45 s · about 1 min 10 s left' (or '… · measuring speed…')."""
        phase = self.current
        if phase is None:
            return f"starting… ({format_duration(self.elapsed)})"
        now = self.now()
        count = f"{phase.done}/{phase.total}" + (f" {unit}" if unit else "") if phase.total else "…"
        eta = phase.eta(now)
        if phase.ended is not None:
            left = "done"
        elif eta is None:
            left = "measuring speed…"
        else:
            left = f"about {format_duration(eta)} left"
        return f"{phase.name} — {count} · {format_duration(phase.seconds(now))} · {left}"

    def history(self) -> list[dict]:
        """The phases so far: name, count, seconds (what a result can record)."""
        now = self.now()
        return [{"phase": p.name, "done": p.done, "total": p.total, "seconds": round(p.seconds(now), 2)}
                for p in self.phases]


# ----------------------------------------------------------------------------------------------------------------
# Cooperative cancel

_CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("ssn_cancel", default=None)


@contextmanager
def cancel_scope(event: threading.Event | None) -> Iterator[threading.Event | None]:
    """Make ``event`` the cancel flag that generation checks after every token, in this context."""
    token = _CANCEL.set(event)
    try:
        yield event
    finally:
        _CANCEL.reset(token)


def current_cancel() -> threading.Event | None:
    """The cancel flag of the enclosing `cancel_scope`, if any."""
    return _CANCEL.get()


def cancel_requested() -> bool:
    event = _CANCEL.get()
    return event is not None and event.is_set()
