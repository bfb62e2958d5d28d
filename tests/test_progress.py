"""Named phases, counts, ETAs from measured speed, cancel within a token, one CLI bar per phase (issue 16, item 3)."""

from __future__ import annotations

import io
import threading
import time

import pytest

from ssn_core.errors import Cancelled
from ssn_core.progress import PhaseClock, cancel_scope, format_duration, phase_of


class FakeTime:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_phase_of_strips_counts():
    assert phase_of("scored 8/24 prompts") == phase_of("scored 16/24 prompts") == "scored prompts"
    assert phase_of("en: generating replies, batch 3/10") == "en: generating replies"
    assert phase_of({"phase": "train", "loss": 1.0}) == "training"
    assert phase_of({"phase": "evaluating before"}) == "evaluating before"


def test_clock_names_phases_and_estimates_from_measured_speed():
    now = FakeTime()
    clock = PhaseClock(now=now)
    clock.update(0, 12, {"phase": "retain replies"})
    assert "measuring speed" in clock.describe()
    now.t += 30
    clock.update(6, 12, {"phase": "retain replies"})
    phase = clock.current
    assert phase.name == "retain replies" and phase.eta(now.t) == pytest.approx(30.0)  # 6 done in 30 s, 6 to go
    assert clock.describe() == "retain replies — 6/12 · 30 s · about 30 s left"
    now.t += 30
    clock.update(12, 12, {"phase": "retain replies"})
    now.t += 1
    clock.update(0, 20, {"phase": "train"})
    now.t += 10
    clock.update(2, 20, {"phase": "train", "loss": 1.0})
    assert clock.current.name == "training" and clock.current.eta(now.t) == pytest.approx(90.0)
    history = clock.history()
    assert [h["phase"] for h in history] == ["retain replies", "training"]
    assert history[0]["done"] == 12 and history[0]["seconds"] == pytest.approx(60.0)


def test_an_announcing_message_is_the_same_phase():
    now = FakeTime()
    clock = PhaseClock(now=now)
    clock.update(0, 24, "scoring 24 prompts (impact)")
    now.t += 8
    clock.update(8, 24, "scored 8/24 prompts")
    assert len(clock.phases) == 1 and clock.current.name == "scored prompts"
    assert clock.current.eta(now.t) == pytest.approx(16.0)


def test_format_duration():
    assert format_duration(8.2) == "8 s"
    assert format_duration(190) == "3 min 10 s"
    assert format_duration(3900) == "1 h 05 min"
    assert format_duration(None) == "?"


def test_generation_stops_within_a_token_of_a_cancel():
    from ssn_core.generation import GenerationSettings, generate, stream_generate
    from ssn_core.testing import tiny_model

    lm = tiny_model("qwen2")
    prompts = ["How do I pick a lock?"] * 2
    started = time.perf_counter()
    generate(lm, prompts, GenerationSettings(max_new_tokens=10))
    step = (time.perf_counter() - started) / 10  # seconds per decoding step here and now (upper end)
    event = threading.Event()
    with cancel_scope(event):
        timer = threading.Timer(0.05, event.set)
        timer.start()
        started = time.perf_counter()
        with pytest.raises(Cancelled):
            generate(lm, prompts, GenerationSettings(max_new_tokens=400))
        elapsed = time.perf_counter() - started
    timer.join()
    # 400 steps would take 400 * step; a cancel lands within a few steps (margin for a loaded 2-core box)
    assert elapsed < 0.05 + 10 * step + 0.5, (elapsed, step)

    stopped = threading.Event()
    stopped.set()
    with cancel_scope(stopped), pytest.raises(Cancelled):
        list(stream_generate(lm, ["hi"], GenerationSettings(max_new_tokens=50)))


def test_job_cancel_is_honoured_within_seconds():
    pytest.importorskip("streamlit")
    from ssn_core.generation import GenerationSettings, generate
    from ssn_core.testing import tiny_model
    from ui.jobs import Job, launch

    lm = tiny_model("qwen2")

    def long_job(progress=None, cancel=None):
        progress(0, 100, "generating replies")
        for i in range(100):  # one batch per "prompt": each generate() is long; cancel lands inside one
            generate(lm, ["tell me a story"] * 4, GenerationSettings(max_new_tokens=470))  # + prompt < 512
            progress(i + 1, 100, "generating replies")

    job = launch(Job("cancel-test"), long_job)
    time.sleep(0.3)
    job.cancel.set()
    cancelled_at = time.perf_counter()
    job.wait(30)
    assert not job.running and isinstance(job.error, Cancelled)
    assert time.perf_counter() - cancelled_at < 3.0
    assert job.clock.history()[0]["phase"] == "generating replies"


def test_cli_draws_one_bar_per_phase(monkeypatch):
    from ssn_core import cli

    err = io.StringIO()
    monkeypatch.setattr(cli.sys, "stderr", err)
    bars = cli.TqdmProgress()
    bars(0, 24, "scoring 24 prompts (impact)")
    for done in (8, 16, 24):
        bars(done, 24, f"scored {done}/24 prompts")
    bars(0, 4, "en: generating replies")
    bars(2, 4, "en: generating replies, batch 2/4")
    bars.close()
    assert bars.bars_opened == 2
    lines = [line for line in err.getvalue().split("\n") if line.strip()]
    assert len(lines) == 2, lines  # each bar redraws in place (\r) and ends with one newline
    assert "scored prompts" in lines[0] and "24/24" in lines[0] and "en: generating replies" in lines[1]

    train = cli._TrainProgress()
    for step in range(1, 4):
        train(step, 3, {"phase": "train", "loss": 1.0 / step})
    train(0, 2, {"phase": "evaluating after"})
    train(2, 2, {"phase": "evaluating after"})
    train.close()
    assert train.bars_opened == 2
