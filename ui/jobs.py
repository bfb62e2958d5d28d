"""Background jobs for long computations (identify, validate, train).

A job runs an `ssn_core` function in a worker thread so the page stays responsive: the function
gets ``progress(done, total, message)`` and ``cancel`` (a `threading.Event`) like every long engine
call. The worker runs in a copy of the session's contextvars context (`bind_context`), so hooks the
session has active apply to it and nobody else. The `Job` objects live in the session's state
(`ui.state.session.jobs`, by name), read through `get_job`, `result_of` and `drop_job` only; `job_panel` polls a job
with an auto-refreshing fragment and reruns the page once when it ends.

Progress is shown per *phase* (`ssn_core.progress.PhaseClock`): the phase's name, its count, the time spent in
it and an ETA from the speed measured in that phase; the phases already over are listed with their times. The
worker runs inside `cancel_scope(job.cancel)`, so generation stops within a token of a Cancel; other engine
loops check the event between their batches or steps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from ssn_core.errors import Cancelled, SSNError
from ssn_core.hooks import bind_context
from ssn_core.progress import PhaseClock, cancel_scope, format_duration
from ui.state import session


@dataclass
class Job:
    name: str
    cancel: threading.Event = field(default_factory=threading.Event)
    done: int = 0
    total: int = 0
    message: str = "starting…"
    result: Any = None
    error: BaseException | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    # Free-form live data a job may publish (e.g. training losses), read by the page while it runs.
    live: dict = field(default_factory=dict)
    # What the page started the job with (e.g. the form's settings), kept to be shown with its result.
    started_with: dict = field(default_factory=dict)
    thread: threading.Thread | None = None
    shown: bool = False  # the page has rerun once after the job ended
    clock: PhaseClock = field(default_factory=PhaseClock)

    @property
    def running(self) -> bool:
        return self.finished is None

    @property
    def fraction(self) -> float:
        return min(max(self.done / self.total, 0.0), 1.0) if self.total else 0.0

    def progress(self, done: int, total: int, message: str | dict = "") -> None:
        """Engine progress callback; training passes a dict ({"phase", "loss"}) instead of a message."""
        self.done, self.total = int(done), int(total)
        if isinstance(message, dict):
            info = message
            message = str(info.get("phase", ""))
            if info.get("loss") is not None:
                self.live.setdefault("losses", []).append({"step": int(done), "loss": float(info["loss"]),
                                                           "series": self.live.get("series", "train")})
        if message:
            self.message = message
        self.clock.update(done, total, message)
        if self.cancel.is_set():
            raise Cancelled("cancelled")

    def status(self) -> str:
        """'training — 3/20 · 45 s · about 1 min 10 s left', or the cancelling note."""
        if self.cancel.is_set() and self.running:
            return f"cancelling… (stops after the current token or step) — {format_duration(self.clock.elapsed)}"
        return self.clock.describe()

    def phases_done(self) -> list[dict]:
        """The phases that are over: name, count, seconds."""
        history = self.clock.history()
        return history if not self.running else history[:-1]

    @property
    def seconds(self) -> float:
        """Wall time of the whole job so far (or in all)."""
        return (self.finished or time.time()) - self.started

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


def start_job(name: str, fn: Callable[..., Any], *args, started_with: dict | None = None, **kwargs) -> Job:
    """Run ``fn(*args, progress=job.progress, cancel=job.cancel, **kwargs)`` in a worker thread.

    ``started_with``: what the page wants back with the result (`Job.started_with`), e.g. the form's settings.
    """
    old = get_job(name)
    if old is not None and old.running:
        old.cancel.set()
    job = Job(name, started_with=dict(started_with or {}))
    session.jobs[name] = job
    launch(job, fn, *args, **kwargs)
    return job


def launch(job: Job, fn: Callable[..., Any], *args, **kwargs) -> Job:
    """Start ``job``'s worker thread (in a copy of this context, inside ``cancel_scope(job.cancel)``)."""

    def run() -> None:
        try:
            with cancel_scope(job.cancel):
                job.result = fn(*args, progress=job.progress, cancel=job.cancel, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported on the page, never lost
            job.error = exc
        finally:
            job.clock.finish()
            job.finished = time.time()

    job.thread = threading.Thread(target=bind_context(run), name=f"ssn-job-{job.name}", daemon=True)
    job.thread.start()
    return job


def get_job(name: str) -> Job | None:
    """This session's job ``name`` (running or finished), or None."""
    return session.jobs.get(name)


def drop_job(name: str) -> None:
    """Forget the job ``name`` (its result has been kept elsewhere, or is not wanted)."""
    session.jobs.pop(name, None)


def result_of(job: Job | None) -> Any | None:
    """The result of a job that ended well, which is then dropped (the page keeps the result in its own state);
    None while it runs, after an error or a cancel (which `job_panel` shows), or without a job."""
    if job is None or job.running or job.error is not None:
        return None
    drop_job(job.name)
    return job.result


def job_panel(name: str, live: Callable[[Job], None] | None = None, poll_s: float = 1.5) -> Job | None:
    """Show a running job's progress bar, message and Cancel button; rerun the page when it ends.

    Returns the job (running or finished) or None. Errors are shown with `st.error` (SSNError) or
    `st.exception` (bugs); a cancel is shown as a note.
    """
    job = get_job(name)
    if job is None:
        return None

    @st.fragment(run_every=poll_s if job.running else None)
    def panel() -> None:
        if job.running:
            st.progress(job.fraction, text=job.status())
            done = job.phases_done()
            if done:
                st.caption("Done: " + " · ".join(f"{p['phase']} {p['done']}/{p['total']} in "
                                                 f"{format_duration(p['seconds'])}" for p in done)
                           + f" — {format_duration(job.seconds)} in all so far")
            if live is not None:
                live(job)
            if st.button("Cancel", key=f"cancel:{name}", disabled=job.cancel.is_set()):
                job.cancel.set()
                job.message = "cancelling…"
        elif not job.shown:
            job.shown = True
            st.rerun()

    if not job.running:
        job.shown = True  # a full run renders the result itself; only a fragment rerun must trigger one
    panel()
    if not job.running:
        if isinstance(job.error, Cancelled):
            st.warning("The job was cancelled; nothing was saved.")
        elif isinstance(job.error, SSNError):
            st.error(str(job.error))
        elif job.error is not None:
            st.error(f"The job failed: {type(job.error).__name__}: {job.error}")
            st.exception(job.error)
    return job
